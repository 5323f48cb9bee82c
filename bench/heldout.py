"""The pipeline's trained networks scored on an independent synthetic cohort: a low-noise reading.

The default test split holds 12 patients and about 31 positive annotated slices, so a Dice or a
point_acc read from `metrics/evaluate.json` carries a standard error of roughly 0.05-0.09, and two runs
that differ only in torch's thread count can differ by that much (README). This bench draws a fresh
cohort from the same generator with another seed (default 100 patients, never seen by training, model
selection or calibration), annotates every val/test slice of it, and scores the checkpoints of the last
`dvc repro` at the thresholds the pipeline chose on val:

* heatmap and gap_cam: AUROC and AP on every slice, point_acc and map Dice on the positives (the map
  threshold stored in each checkpoint); the image probabilities with their slice context
  (`cams.neighbour_weight`) as the cams stage writes them, and the AUROC of each slice alone beside;
* segmenter and oracle: dice_pos and fp_slice_rate (the threshold in `metrics/evaluate.json`; with the
  test-time flip when `evaluate.flip_tta` is on, as evaluate reads them), and weak_over_full from them;
  beside them each read as a slice classifier (AUROC of a slice's highest probability, with the same
  slice context as the heatmap network's and alone; point_acc of its argmax): the oracle's pair is what
  full pixel supervision gives on this data, a yardstick for the heatmap network's AUROC and point_acc;
* cascade: the segmenter with nothing predicted where the heatmap network's slice probability is below
  the gate the evaluate stage chose on val.

The pseudo-mask row needs cams and the CRF on the cohort and is not part of it. The cohort is cached
under data/heldout/ (about 80 MB for 100 patients at 128x128). Needs a synthetic `data.source`.

    .venv/bin/python bench/heldout.py                       # 100 patients, seed common.seed + 101
    .venv/bin/python bench/heldout.py --patients 200 --out bench/results/heldout.json
    .venv/bin/python bench/heldout.py --sweep     # and dice_pos / fp_slice_rate over the threshold grid
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from sklearn.metrics import roc_auc_score

from weak2full import prepare, train
from weak2full.cams import predict_cams, with_slice_context
from weak2full.h5 import DatasetFile, truth_mask
from weak2full.metrics import (bootstrap_interval, classification_metrics, dice_per_slice, patient_resamples,
                               point_hits)
from weak2full.models import load_model, predict_masks
from weak2full.params import InputParams, load_params
from weak2full.report import format_cell
from weak2full.runtime import inference_model


def cohort(params, patients: int, seed: int, root: Path) -> Path:
    """dataset.h5 of ``patients`` fresh synthetic patients (seed ``seed``), cached by its settings."""
    raw = params.model_dump(mode="json")
    raw["common"]["seed"] = seed
    raw["data"]["synthetic"]["patients"] = patients
    raw["data"]["split"].update(val_fraction=0.45, test_fraction=0.45,
                                annotated_val_fraction=1.0, annotated_test_fraction=1.0)
    cohort_params = type(params).model_validate(raw)
    key = json.dumps(raw["data"], sort_keys=True)
    path = root / f"cohort_seed{seed}_n{patients}_{hashlib.sha256(key.encode()).hexdigest()[:8]}.h5"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        prepare.run(cohort_params, path)
        print(f"made {path} in {time.perf_counter() - t0:.0f} s")
    return path


def split_rows(ds: DatasetFile, split: str) -> np.ndarray:
    """Rows of the comma-separated splits (``"test"``, ``"val,test"``), sorted; a split holds whole
    patients, so every slice has its neighbours for the slice context."""
    return np.sort(np.concatenate([ds.indices(name) for name in split.split(",")]))


def scored_rows(ds: DatasetFile) -> np.ndarray:
    """The cohort's scored rows: every annotated val/test slice."""
    idx = split_rows(ds, "val,test")
    return idx[ds.has_mask[idx]]


def classifier_scores(path: Path, method: str, ds: DatasetFile, idx: np.ndarray, classes: list[str],
                      neighbour_weight: float) -> tuple[dict, np.ndarray]:
    """A classifier's metrics on rows ``idx`` (:func:`weak2full.train.score_classifier`'s dict), and its
    probability that each row holds a bleed (max over classes).

    The probabilities get their slice context as the cams stage gives it (``idx`` should hold whole
    stacks, so that each slice has its neighbours); ``auroc_slice_alone`` is the AUROC without it."""
    model, ckpt = load_model(path, arch=method)
    net, channels_last = inference_model(model)
    cam, own = predict_cams(net, ds, idx, InputParams(**ckpt["input"]), int(ckpt["heatmap_size"]),
                            channels_last=channels_last)
    prob = with_slice_context(own, ds.patient[idx], ds.slice[idx], neighbour_weight)
    r = train.score_classifier(cam, prob, ds, idx, classes, method, thresholds=ckpt["map_thresholds"])
    r["auroc_slice_alone"] = classification_metrics(own, ds.labels_for(classes)[idx], classes)["auroc"]
    return r, prob.max(axis=1)


def classifier_row(path: Path, method: str, ds: DatasetFile, classes: list[str],
                   neighbour_weight: float) -> tuple[dict, np.ndarray]:
    """A classifier's row on the scored rows (every val/test slice of the cohort), and its slice
    probability."""
    r, slice_prob = classifier_scores(path, method, ds, scored_rows(ds), classes, neighbour_weight)
    return {k: r[k] for k in ("auroc", "ap", "point_acc", "map_dice", "auroc_slice_alone")}, slice_prob


def segmenter_probs(path: Path, ds: DatasetFile, flip: bool = False,
                    idx: np.ndarray | None = None) -> np.ndarray:
    """A segmenter's foreground probabilities (n, K, H, W) on rows ``idx`` (default: the scored rows), as
    evaluate reads them."""
    model, ckpt = load_model(path, arch="segmenter")
    rows = scored_rows(ds) if idx is None else idx
    return predict_masks(model, ds, rows, InputParams(**ckpt["input"]), flip=flip)


def segmenter_row(prob: np.ndarray, threshold: float, masks: np.ndarray, mask_classes: list[str],
                  classes: list[str], keep: np.ndarray | None = None) -> dict:
    """dice_pos and fp_slice_rate at ``threshold`` on the scored rows (``masks`` their annotated masks)."""
    r = train.score_segmenter(prob, masks, mask_classes, classes, threshold, keep)
    return {**r, "threshold": threshold}


def as_classifier(prob: np.ndarray, label: np.ndarray, truth: np.ndarray,
                  context: tuple[np.ndarray, np.ndarray, float] | None = None) -> dict:
    """A segmenter read as a slice classifier: ``auroc`` of each slice's highest probability and
    ``point_acc`` of its argmax on the slices whose ``truth`` (n, H, W) holds a bleed (the heatmap network's
    metrics, on the union of the classes), which puts the classifier's figures beside what full
    supervision gives.

    With ``context`` = (patient, slice, neighbour_weight) of the rows (whole stacks, sorted), ``auroc`` is
    read after the slice context the cams stage gives the heatmap network's probabilities
    (:func:`weak2full.cams.with_slice_context`), so the two AUROCs compare like for like;
    ``auroc_slice_alone`` is the AUROC without it."""
    union = prob.max(axis=1)  # (n, H, W)
    pos = truth.any(axis=(1, 2))
    score = union.reshape(len(union), -1).max(axis=1)
    row = {"auroc": float(roc_auc_score(label, score)),
           "point_acc": float(point_hits(union[pos], truth[pos]).mean())}
    if context is not None:
        patient, slice_index, weight = context
        row["auroc_slice_alone"] = row["auroc"]
        row["auroc"] = float(roc_auc_score(label, with_slice_context(score[:, None], patient, slice_index,
                                                                     weight)[:, 0]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--seed", type=int, default=None, help="cohort seed (default: common.seed + 101)")
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--evaluate", type=Path, default=Path("metrics/evaluate.json"),
                    help="the evaluate stage's metrics: the segmenter and oracle thresholds chosen on val")
    ap.add_argument("--cache", type=Path, default=Path("data/heldout"))
    ap.add_argument("--out", type=Path, default=None, help="also write the rows here as JSON")
    ap.add_argument("--sweep", action="store_true",
                    help="also print the segmenters' dice_pos and fp_slice_rate at every threshold of "
                         "evaluate.threshold_grid (docs/TUNING.md, Session 8)")
    args = ap.parse_args()
    params = load_params(args.params)
    if params.data.source != "synthetic":
        raise SystemExit(f"{args.params}: data.source is {params.data.source!r}; this bench draws a "
                         "synthetic cohort and needs data.source: synthetic.")
    seed = params.common.seed + 101 if args.seed is None else args.seed
    classes = list(params.common.classes)
    chosen = json.loads(args.evaluate.read_text())
    path = cohort(params, args.patients, seed, args.cache)
    rows: dict[str, dict] = {}
    sweep: dict[str, list[dict]] = {}
    with DatasetFile(path) as ds:
        idx = scored_rows(ds)
        label = ds.labels_for(classes)[idx].max(axis=1) > 0
        n_pos = int(label.sum())
        masks = ds.annotated_masks(idx)
        truth = truth_mask(masks, ds.mask_classes, "any")
        pos = truth.any(axis=(1, 2))
        # Patient-bootstrap intervals, as the evaluate stage gives them on the test split.
        weights = patient_resamples(ds.patient[idx][pos], params.evaluate.bootstrap_resamples or 2000, seed)
        per_slice: dict[str, np.ndarray] = {}
        weight = params.cams.neighbour_weight
        rows["gap_cam"], _ = classifier_row(args.models / "gap_cam.pt", "gap_cam", ds, classes, weight)
        rows["heatmap"], slice_prob = classifier_row(args.models / "classifier.pt", "heatmap", ds, classes,
                                                     weight)
        for method, file in (("segmenter", "segmenter.pt"), ("oracle", "oracle.pt")):
            if method not in chosen or "threshold" not in chosen[method]:
                continue
            prob = segmenter_probs(args.models / file, ds, flip=params.evaluate.flip_tta)
            rows[method] = {**segmenter_row(prob, float(chosen[method]["threshold"]), masks, ds.mask_classes,
                                            classes),
                            **as_classifier(prob, label, truth, (ds.patient[idx], ds.slice[idx], weight))}
            chosen_mask = prob.max(axis=1) >= float(chosen[method]["threshold"])
            per_slice[method] = dice_per_slice(chosen_mask, truth)[pos]
            rows[method]["dice_pos_ci95"] = bootstrap_interval(per_slice[method], weights)
            if args.sweep:
                sweep[method] = [train.score_segmenter(prob, masks, ds.mask_classes, classes, t)
                                 for t in params.evaluate.threshold_grid]
            if method == "segmenter" and "cascade" in chosen:
                keep = slice_prob >= float(chosen["cascade"]["gate"])
                rows["cascade"] = {**segmenter_row(prob, float(chosen["cascade"]["threshold"]), masks,
                                                   ds.mask_classes, classes, keep=keep),
                                   "gate": float(chosen["cascade"]["gate"])}
    ratio = (rows["segmenter"]["dice_pos"] / rows["oracle"]["dice_pos"]
             if "oracle" in rows and rows["oracle"]["dice_pos"] > 0 else float("nan"))
    ratio_ci = (bootstrap_interval(per_slice["segmenter"], weights, baseline=per_slice["oracle"])
                if "oracle" in per_slice and "segmenter" in per_slice else None)
    print(f"\nheld-out cohort: {args.patients} synthetic patients, seed {seed}, {n_pos} positive annotated "
          f"slices ({path})")
    cols = ("auroc", "point_acc", "map_dice", "dice_pos", "dice_pos_ci95", "fp_slice_rate")
    print("| method | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for method, r in rows.items():
        print(f"| {method} | " + " | ".join(format_cell(r.get(c), c) for c in cols) + " |")
    print(f"\nAUROC with slice context (cams.neighbour_weight {params.cams.neighbour_weight:g}) above; "
          "of each slice alone: " + ", ".join(f"{m} {r['auroc_slice_alone']:.3f}"
                                              for m, r in rows.items() if "auroc_slice_alone" in r))
    interval = format_cell(ratio_ci, "weak_over_full_ci95")
    interval = f" (95% interval over patients {interval})" if interval else ""
    print(f"\nweak_over_full: {ratio:.3f}{interval}")
    if sweep:
        grid = params.evaluate.threshold_grid
        print("\n| threshold | " + " | ".join(f"{t:g}" for t in grid) + " |\n|---|" + "---:|" * len(grid))
        for method, scores in sweep.items():
            for key in ("dice_pos", "fp_slice_rate"):
                print(f"| {method} {key} | " + " | ".join(f"{r[key]:.3f}" for r in scores) + " |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"seed": seed, "patients": args.patients, "n_pos": n_pos,
                                        "rows": rows, "weak_over_full": ratio,
                                        "weak_over_full_ci95": ratio_ci,
                                        **({"sweep": sweep} if sweep else {})}, indent=2) + "\n")


if __name__ == "__main__":
    main()
