"""Train one network with param overrides and score it on the held-out cohort: the rows of docs/TUNING.md.

Trains the oracle (`train_oracle` section, `train.run_oracle`), the weak segmenter (`train_segmenter`,
`train.run_segmenter`, on the pseudo-masks of the last `dvc repro`) or the heatmap classifier
(`train_classifier`, `train.run_classifier`) exactly as its stage does, on the prepared default dataset,
with model selection on its val split; then scores the chosen checkpoint on the cohort of
bench/heldout.py (100 fresh patients, seed common.seed + 101, every val/test slice annotated):

* oracle, segmenter: dice_pos and fp_slice_rate of the first class of common.classes (`any` by default)
  at fixed thresholds, dice_pos by the bleed's area, and the network read as a slice classifier (AUROC of
  a slice's highest probability, point_acc of its argmax; bench/heldout.py's `as_classifier`);
* classifier: AUROC, AP, point_acc, and map Dice at the map threshold that is best on the cohort itself
  (optimistic by a few hundredths, alike for every setting).

The rows of docs/TUNING.md were measured with one torch thread on one core; another thread count moves
them (README). After `dvc repro prepare` (`dvc repro pseudo_masks` for the segmenter):

    OMP_NUM_THREADS=1 .venv/bin/python bench/tune.py oracle
    OMP_NUM_THREADS=1 .venv/bin/python bench/tune.py oracle --set train_oracle.upsample=1 \\
        --set train_oracle.crop_size=null --set train_oracle.dice_per_slice=false \\
        --set train_oracle.epochs=8 --set train_oracle.steps_per_epoch=40     # the old default
    OMP_NUM_THREADS=1 .venv/bin/python bench/tune.py classifier --set input.skull_strip=true
    OMP_NUM_THREADS=1 .venv/bin/python bench/tune.py segmenter --set train_segmenter.ema_decay=0.98
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from heldout import as_classifier, cohort, scored_rows

from weak2full import train
from weak2full.errors import InvalidParameterError
from weak2full.h5 import DatasetFile, truth_mask
from weak2full.metrics import dice_per_slice, dice_pos_and_fp_rate
from weak2full.models import load_model, predict_masks
from weak2full.params import InputParams, load_params, parse_params

THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
AREA_BINS = ((0, 30), (30, 100), (100, 300), (300, None))  # bleed pixels on the slice


def with_overrides(params, sets: list[str]):
    """``params`` with ``section.key=value`` overrides (values read as YAML), validated again (an unknown
    key or a bad value is the schema's one-line error)."""
    raw = params.model_dump(mode="json")
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        *path, last = key.split(".")
        node = raw
        for part in path:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"--set {item!r}: params have no section {part!r}")
            node = node[part]
        node[last] = yaml.safe_load(value)
    try:
        return parse_params(raw, "params.yaml with the --set overrides")
    except InvalidParameterError as exc:
        raise SystemExit(str(exc)) from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("network", choices=("oracle", "segmenter", "classifier"))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--dataset", type=Path, default=Path("data/prepared/dataset.h5"))
    ap.add_argument("--pseudo", type=Path, default=Path("data/pseudo/pseudo_masks.h5"),
                    help="the pseudo-masks the segmenter trains on")
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--cache", type=Path, default=Path("data/heldout"))
    ap.add_argument("--save", type=Path, default=None,
                    help="keep the trained checkpoint here (an existing one is resumed: resume: true)")
    args = ap.parse_args()
    base = load_params(args.params)
    params = with_overrides(base, args.sets)
    # The cohort follows the params file's seed, so `--set common.seed=N` changes only the training seed.
    path = cohort(params, args.patients, base.common.seed + 101, args.cache)
    classes = list(params.common.classes)
    row: dict = {"network": args.network, "set": args.sets}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.save or Path(tmp) / "model.pt"
        t0 = time.perf_counter()
        if args.network == "oracle":
            train.run_oracle(params, args.dataset, model_path, live_dir=None)
        elif args.network == "segmenter":
            train.run_segmenter(params, args.dataset, args.pseudo, model_path, live_dir=None)
        else:
            train.run_classifier(params, args.dataset, model_path, Path(tmp) / "metrics.json", live_dir=None)
        row["train_s"] = round(time.perf_counter() - t0, 1)
        model, ckpt = load_model(model_path)
        ip = InputParams(**ckpt["input"])  # what the network saw (input.segmenter_windows for segmenters)
        with DatasetFile(path) as ds:
            idx = scored_rows(ds)
            if args.network == "classifier":
                r = train.classifier_metrics(model, ds, idx, ip, classes, "heatmap",
                                             params.train_classifier.heatmap_size)
                row.update({k: round(r[k], 4) for k in ("auroc", "ap", "point_acc", "map_dice")})
            else:
                # the first class; read as evaluate reads it (evaluate.flip_tta)
                prob = predict_masks(model, ds, idx, ip, flip=params.evaluate.flip_tta)[:, 0]
                truth = truth_mask(ds.annotated_masks(idx), ds.mask_classes, classes[0])
                # read as a slice classifier too, as bench/heldout.py does: the yardstick for the
                # heatmap network's AUROC and point_acc
                label = ds.labels_for(classes)[idx].max(axis=1) > 0
                row.update({k: round(v, 4) for k, v in as_classifier(prob[:, None], label, truth).items()})
                for t in THRESHOLDS:
                    row[f"dice_pos, fp_slice_rate @ {t}"] = [round(v, 4) for v in
                                                            dice_pos_and_fp_rate(prob >= t, truth)]
                pos = truth.any(axis=(1, 2))
                dice, area = dice_per_slice(prob[pos] >= 0.5, truth[pos]), truth[pos].sum(axis=(1, 2))
                for lo, hi in AREA_BINS:
                    sel = (area >= lo) & (area < (hi if hi is not None else np.inf))
                    row[f"dice_pos @ 0.5, {lo}-{hi or ''} px (n={int(sel.sum())})"] = round(
                        float(dice[sel].mean()), 4) if sel.any() else None
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
