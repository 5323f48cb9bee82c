"""Localisation of the heatmap network vs the GAP-CAM baseline on the annotated test slices.

Prints AUROC (all test slices; with the slice context the cams stage gives the image probabilities,
`cams.neighbour_weight`, and of each slice alone), point_acc and map Dice (annotated test positives; each
method's normalised map thresholded where it was best on val) for both classifiers, with the seconds
each took to train. Either scores
existing checkpoints, or (--train) trains both first with the params file's settings:

    .venv/bin/python bench/bench_localisation.py --dataset data/prepared/dataset.h5 --train
    .venv/bin/python bench/bench_localisation.py --dataset data/prepared/dataset.h5 \\
        --heatmap models/classifier.pt --gap-cam models/gap_cam.pt
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from heldout import classifier_scores

from weak2full import train
from weak2full.h5 import DatasetFile
from weak2full.params import Params, load_params


def score(path: Path, method: str, dataset: Path, classes: list[str], neighbour_weight: float) -> dict:
    with DatasetFile(dataset) as ds:  # the test split holds whole patients: every slice has its neighbours
        return classifier_scores(path, method, ds, ds.indices("test"), classes, neighbour_weight)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=Path("data/prepared/dataset.h5"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--train", action="store_true", help="train both classifiers first")
    ap.add_argument("--heatmap", type=Path, default=Path("models/classifier.pt"))
    ap.add_argument("--gap-cam", type=Path, default=Path("models/gap_cam.pt"))
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
        rows = {m: score(paths[m], m, args.dataset, classes, weight) for m in ("heatmap", "gap_cam")}
    print(f"\nannotated test slices of {args.dataset}, classes {classes}; auroc with slice context "
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


if __name__ == "__main__":
    main()
