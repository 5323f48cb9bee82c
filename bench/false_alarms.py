"""Where the heatmap classifier's false alarms are, and what slice context and an HU gate do to them: the
tables of docs/TUNING.md "Session 11". After `make run`:

    python bench/false_alarms.py                 # the classifier: about 3 min with two threads
    python bench/false_alarms.py --segmenters    # plus the segmenters: about 20 more with one thread

On the cohort of bench/heldout.py (100 fresh patients, cached under data/heldout/), it runs the heatmap
network of models/classifier.pt over every slice and prints, on the annotated val + test slices:

* the AUROC of the image probability, and of each slice's logit averaged with its two neighbours' (same
  patient; weight w each side; since Session 12 the cams stage does this at `cams.neighbour_weight`,
  0.5), and point_acc / map Dice (at 0.5 of the relative map) of the maps averaged the same way;
* the maps set to background within ``d`` pixels of anything above 100 HU (the calcified mimics): the
  AUROC of the map's peak, point_acc, map Dice and the share of the true bleed the gate removes;
* the highest-scoring tenth of the negative slices by quarter of the head's height, against all
  negatives; and the AUROC with the positives split by bleed area.

``--segmenters``: the same neighbour averaging on the segmenter's and the oracle's probabilities
(dice_pos / fp_slice_rate at 0.5 and 0.8), and their false-positive slices by tenth of the head's height.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from heldout import cohort
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from weak2full.cams import average_with_neighbours, normalise_cam, predict_cams, probability_logit
from weak2full.data import neighbours
from weak2full.h5 import DatasetFile, truth_mask
from weak2full.metrics import dice_per_slice, dice_pos_and_fp_rate, point_hits
from weak2full.models import load_model, predict_masks
from weak2full.params import InputParams, load_params
from weak2full.runtime import inference_model


def relative_level(patient: np.ndarray, slice_index: np.ndarray) -> np.ndarray:
    """Each slice's height in its patient's stack, 0 (lowest) to 1 (highest)."""
    top = np.zeros(patient.max() + 1)
    np.maximum.at(top, patient, slice_index)
    return slice_index / np.maximum(top[patient], 1)


def bin_counts(bins: np.ndarray, n: int) -> list[int]:
    return np.bincount(bins, minlength=n).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--cache", type=Path, default=Path("data/heldout"))
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--segmenters", action="store_true", help="also the segmenter and the oracle")
    args = ap.parse_args()
    params = load_params(args.params)
    path = cohort(params, args.patients, params.common.seed + 101, args.cache)
    with DatasetFile(path) as ds:
        every = np.arange(ds.n)
        prev, nxt = neighbours(ds.patient, every)
        level = relative_level(ds.patient, ds.slice)
        scored = np.flatnonzero(ds.has_mask & (ds.split > 0))
        images = ds.images(scored).astype(np.float32)
        truth = truth_mask(ds.annotated_masks(scored), ds.mask_classes, "any")
        label = truth.any(axis=(1, 2))
        model, ckpt = load_model(args.models / "classifier.pt", arch="heatmap")
        net, channels_last = inference_model(model)
        cam, prob = predict_cams(net, ds, every, InputParams(**ckpt["input"]), int(ckpt["heatmap_size"]),
                                 channels_last=channels_last)
        cam, logit = cam.max(axis=1), probability_logit(prob.max(axis=1))  # the image score, ranked below
        pos, neg = label, ~label

        print(f"cohort {path}: {len(scored)} annotated val/test slices, {int(pos.sum())} with a bleed\n")
        print("| reading | AUROC | point_acc | map Dice |\n|---|---:|---:|---:|")
        for w in (0.0, 0.25, 0.5, 1.0):
            auroc = roc_auc_score(label, average_with_neighbours(logit, prev, nxt, w)[scored])
            averaged = average_with_neighbours(cam, prev, nxt, w)[scored][pos]
            maps = normalise_cam(averaged[:, None], "relative")[:, 0]
            print(f"| slice and neighbours, weight {w} | {auroc:.3f} | "
                  f"{point_hits(maps, truth[pos]).mean():.3f} | "
                  f"{dice_per_slice(maps >= 0.5, truth[pos]).mean():.3f} |")
        own = cam[scored]
        background = np.median(own, axis=(1, 2), keepdims=True)
        for dilation in (0, 1, 2):
            dense = images > 100.0
            if dilation:
                square = np.ones((1, 2 * dilation + 1, 2 * dilation + 1), bool)
                dense = ndimage.binary_dilation(dense, square)
            gated = np.where(dense, background, own)
            maps = normalise_cam(gated[pos][:, None], "relative")[:, 0]
            print(f"| map gated within {dilation} px of > 100 HU, image score its peak "
                  f"(truth removed {(dense & truth).sum() / truth.sum():.3f}) | "
                  f"{roc_auc_score(label, gated.reshape(len(gated), -1).max(axis=1)):.3f} | "
                  f"{point_hits(maps, truth[pos]).mean():.3f} | "
                  f"{dice_per_slice(maps >= 0.5, truth[pos]).mean():.3f} |")

        negatives = np.flatnonzero(neg)
        top = negatives[np.argsort(-logit[scored][negatives], kind="stable")[: len(negatives) // 10]]
        quarter = np.minimum((level[scored] * 4).astype(int), 3)
        print(f"\nnegatives by quarter of the head's height (bottom first): highest-scoring tenth "
              f"{bin_counts(quarter[top], 4)}, all {bin_counts(quarter[neg], 4)}")
        area, cells = truth.sum(axis=(1, 2)), []
        for lo, hi in ((0, 30), (30, 100), (100, 300), (300, None)):
            m = pos & (area >= lo) & (area < (hi or np.inf))
            y = np.r_[np.ones(m.sum()), np.zeros(neg.sum())]
            auroc = roc_auc_score(y, np.r_[logit[scored][m], logit[scored][neg]])
            cells.append(f"{lo}-{hi or ''} px ({int(m.sum())}) {auroc:.3f}")
        print("AUROC by the positive slice's bleed area: " + ", ".join(cells))

        if not args.segmenters:
            return
        tenth = np.minimum((level[scored] * 10).astype(int), 9)
        print("\n| network, weight each side | t = 0.5: dice_pos / fp | t = 0.8: dice_pos / fp |\n"
              "|---|---:|---:|")
        for name in ("oracle", "segmenter"):
            model, ckpt = load_model(args.models / f"{name}.pt", arch="segmenter")
            # Every slice, so that each scored slice has its neighbours' probabilities.
            full = predict_masks(model, ds, every, InputParams(**ckpt["input"]),
                                 flip=params.evaluate.flip_tta).max(axis=1)
            probs = full[scored]
            for w in (0.0, 0.1, 0.2, 0.35):
                avg = average_with_neighbours(full, prev, nxt, w)[scored]
                cells = [dice_pos_and_fp_rate(avg >= t, truth) for t in (0.5, 0.8)]
                print(f"| {name}, {w} | " + " | ".join(f"{d:.3f} / {f:.3f}" for d, f in cells) + " |")
            fp = (probs >= 0.8).any(axis=(1, 2)) & neg
            rate = np.bincount(tenth[neg], weights=fp[neg], minlength=10) / bin_counts(tenth[neg], 10)
            print(f"| {name}: false-positive slices at 0.8 by tenth of height | "
                  + ", ".join(f"{r:.2f}" for r in rate) + " | |")


if __name__ == "__main__":
    main()
