"""Localisation of the heatmap network vs the GAP-CAM baseline on the annotated test slices.

Prints AUROC (all test slices; with the slice context the cams stage gives the image probabilities,
`cams.neighbour_weight`, and of each slice alone), point_acc and map Dice (annotated test positives; each
method's normalised map thresholded where it was best on val) for both classifiers, with the seconds
each took to train. Either scores
existing checkpoints, or (--train) trains both first with the params file's settings:

    .venv/bin/python bench/bench_localisation.py --dataset data/prepared/dataset.h5 --train
    .venv/bin/python bench/bench_localisation.py --dataset data/prepared/dataset.h5 \\
        --heatmap models/classifier.pt --gap-cam models/gap_cam.pt

`--segmenter NAME=CHECKPOINT` (repeatable) also reads a segmenter on the same slices as a slice
classifier (AUROC of a slice's highest probability, with the same slice context and alone; point_acc of
its argmax; bench/heldout.py's `as_classifier`), read with the flip as evaluate reads it: the oracle's row
is what full pixel supervision reaches on the split #3's targets are stated on.

    .venv/bin/python bench/bench_localisation.py --segmenter oracle=models/oracle.pt \\
        --segmenter segmenter=models/segmenter.pt

`--split val,test` with `--dataset` the bench/heldout.py cohort (data/heldout/cohort_*.h5, every val/test
slice annotated) reads the same on that cohort's scored rows, as bench/heldout.py reads them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from heldout import as_classifier, classifier_scores, segmenter_probs, split_rows

from weak2full import train
from weak2full.h5 import DatasetFile, truth_mask
from weak2full.params import Params, load_params


def score(path: Path, method: str, dataset: Path, split: str, classes: list[str],
          neighbour_weight: float) -> dict:
    with DatasetFile(dataset) as ds:
        return classifier_scores(path, method, ds, split_rows(ds, split), classes, neighbour_weight)[0]


def score_segmenter(path: Path, dataset: Path, split: str, classes: list[str], neighbour_weight: float,
                    flip: bool) -> dict:
    """A segmenter read as a slice classifier on the split's annotated slices (every test slice of the
    default data)."""
    with DatasetFile(dataset) as ds:
        idx = split_rows(ds, split)
        idx = idx[ds.has_mask[idx]]
        prob = segmenter_probs(path, ds, flip=flip, idx=idx)
        label = ds.labels_for(classes)[idx].max(axis=1) > 0
        truth = truth_mask(ds.annotated_masks(idx), ds.mask_classes, "any")
        return {**as_classifier(prob, label, truth, (ds.patient[idx], ds.slice[idx], neighbour_weight)),
                "n_pos": int(truth.any(axis=(1, 2)).sum())}


def named_checkpoint(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such checkpoint")
    return name, Path(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=Path("data/prepared/dataset.h5"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--split", default="test", help="comma-separated splits to score (default: test)")
    ap.add_argument("--train", action="store_true", help="train both classifiers first")
    ap.add_argument("--heatmap", type=Path, default=Path("models/classifier.pt"))
    ap.add_argument("--gap-cam", type=Path, default=Path("models/gap_cam.pt"))
    ap.add_argument("--segmenter", dest="segmenters", type=named_checkpoint, action="append", default=[],
                    metavar="NAME=CHECKPOINT", help="also read this segmenter as a slice classifier")
    args = ap.parse_args()
    params = load_params(args.params) if args.params.is_file() else Params()
    classes = list(params.common.classes)
    seconds = {"heatmap": float("nan"), "gap_cam": float("nan")}
    paths = {"heatmap": args.heatmap, "gap_cam": args.gap_cam}
    with tempfile.TemporaryDirectory() as tmp:
        if args.train:
            for method, fn in (("heatmap", train.run_classifier), ("gap_cam", train.run_baseline)):
                paths[method] = Path(tmp) / f"{method}.pt"
                t0 = time.perf_counter()
                fn(params, args.dataset, paths[method], Path(tmp) / f"{method}.json", None)
                seconds[method] = time.perf_counter() - t0
        weight = params.cams.neighbour_weight
        rows = {m: score(paths[m], m, args.dataset, args.split, classes, weight)
                for m in ("heatmap", "gap_cam")}
    print(f"\n{args.split} slices of {args.dataset}, classes {classes}; auroc with slice context "
          f"(cams.neighbour_weight {weight:g}), auroc_alone without")
    head = ("auroc", "auroc_alone", "ap", "point_acc", "map_dice", "n_pos", "train_s")
    print(f"{'method':10s} " + " ".join(f"{h:>11s}" for h in head))
    for m, r in rows.items():
        n_pos = sum(e["n_pos"] for e in r["per_class"].values())
        print(f"{m:10s} {r['auroc']:11.3f} {r['auroc_slice_alone']:11.3f} {r['ap']:11.3f} "
              f"{r['point_acc']:11.3f} "
              f"{r['map_dice']:11.3f} {n_pos:11d} {seconds[m]:11.0f}")
    gain = rows["heatmap"]["map_dice"] - rows["gap_cam"]["map_dice"]
    print(f"map Dice gain of the heatmap network over gap_cam: {gain:+.3f}")
    if args.segmenters:
        print(f"\nsegmenters read as slice classifiers on the same slices (highest probability; argmax; "
              f"evaluate.flip_tta {params.evaluate.flip_tta})")
        head = ("auroc", "auroc_alone", "point_acc", "n_pos")
        width = max(10, *(len(name) for name, _ in args.segmenters))
        print(f"{'method':{width}s} " + " ".join(f"{h:>11s}" for h in head))
        for name, path in args.segmenters:
            r = score_segmenter(path, args.dataset, args.split, classes, weight, params.evaluate.flip_tta)
            print(f"{name:{width}s} {r['auroc']:11.3f} {r['auroc_slice_alone']:11.3f} {r['point_acc']:11.3f} "
                  f"{r['n_pos']:11d}")


if __name__ == "__main__":
    main()
