"""Which bleeds the networks point at: point_acc by the bleed's contrast and area on the held-out cohort.

Each positive slice of the bench/heldout.py cohort (every val/test slice annotated) is binned by how
visible its bleed is:

* contrast: the median HU inside the mask minus the median HU of brain (10-60 HU, inside the skull) in
  a ring 2-4 px around it. A tighter, median-based ring than `synthetic.summary_statistics`' 5 mm mean
  (DESIGN.md's measure), so that a bleed's own rim and a neighbouring bone edge do not set it;
* area: mask pixels at the dataset's resolution.

For each network it prints point_acc per bin (the heatmap network's relative map, as `metrics/classifier.json`
reads it; a segmenter's argmax, as bench/heldout.py's `as_classifier`), the share of "visible" bleeds
(contrast >= 10 HU and area >= 30 px) and point_acc on them and on the rest, and AUROC with the hard
positives left out, and the positives that no network given points at. docs/TUNING.md, Sessions 18 and
19. Networks are name=kind:checkpoint, kind heatmap or segmenter (read with the test-time flip when
evaluate.flip_tta is on). `--dataset` with `--split` reads another dataset's annotated slices instead of
the cohort, e.g. the default test split, where #3's targets are stated:

    OMP_NUM_THREADS=1 .venv/bin/python bench/visibility.py heatmap=heatmap:models/classifier.pt \\
        oracle=segmenter:models/oracle.pt segmenter=segmenter:models/segmenter.pt
    .venv/bin/python bench/visibility.py --dataset data/prepared/dataset.h5 --split test \\
        heatmap=heatmap:models/classifier.pt oracle=segmenter:models/oracle.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from heldout import cohort, scored_rows, segmenter_probs, split_rows
from scipy import ndimage as ndi
from sklearn.metrics import roc_auc_score

from weak2full.brain import intracranial_mask
from weak2full.cams import NORMALISATION, normalise_cam, predict_cams
from weak2full.h5 import DatasetFile, truth_mask
from weak2full.metrics import point_hits
from weak2full.models import load_model
from weak2full.params import InputParams, load_params
from weak2full.runtime import inference_model

CONTRAST_BINS = (-np.inf, 5, 10, 15, 20, 30, np.inf)  # HU
AREA_BINS = (0, 15, 30, 60, 100, 300, np.inf)  # pixels
VISIBLE_HU, VISIBLE_PX = 10.0, 30


def bleed_visibility(hu: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contrast (HU) and area (px) of each slice's bleed; ``hu`` (n, H, W), ``truth`` bool (n, H, W) with
    a bleed on every slice. Contrast is NaN where the ring holds no brain."""
    contrast, area = np.full(len(truth), np.nan), truth.sum(axis=(1, 2))
    for i, (h, t) in enumerate(zip(hu.astype(np.float32), truth)):
        ring = ndi.binary_dilation(t, iterations=4) & ~ndi.binary_dilation(t, iterations=1)
        ring &= intracranial_mask(h) & (h > 10) & (h < 60)
        if ring.any():
            contrast[i] = np.median(h[t]) - np.median(h[ring])
    return contrast, area


def network_reading(kind: str, path: Path, ds: DatasetFile, idx: np.ndarray, flip: bool):
    """(maps (n, H, W) whose argmax is the network's point, slice score (n,)) on rows ``idx``, class union."""
    if kind == "heatmap":
        model, ckpt = load_model(path, arch="heatmap")
        net, channels_last = inference_model(model)
        cam, prob = predict_cams(net, ds, idx, InputParams(**ckpt["input"]), int(ckpt["heatmap_size"]),
                                 channels_last=channels_last)
        maps = torch.nn.functional.interpolate(torch.from_numpy(normalise_cam(cam, NORMALISATION["heatmap"])),
                                               size=(ds.height, ds.width), mode="bilinear",
                                               align_corners=False).numpy()
        return maps.max(axis=1), prob.max(axis=1)
    if kind == "segmenter":
        union = segmenter_probs(path, ds, flip=flip, idx=idx).max(axis=1)
        return union, union.reshape(len(union), -1).max(axis=1)
    raise SystemExit(f"{path}: kind {kind!r} is neither heatmap nor segmenter")


def binned(values: np.ndarray, edges, hits: dict[str, np.ndarray], unit: str) -> str:
    lines = [f"| {unit} | n | " + " | ".join(hits) + " |", "|---|---:|" + "---:|" * len(hits)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (values >= lo) & (values < hi)
        cells = " | ".join(f"{h[sel].mean():.2f}" if sel.any() else "" for h in hits.values())
        lines.append(f"| {lo:g} to {hi:g} | {int(sel.sum())} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("networks", nargs="+", metavar="NAME=KIND:CHECKPOINT")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--cache", type=Path, default=Path("data/heldout"))
    ap.add_argument("--dataset", type=Path, default=None,
                    help="read this dataset.h5 instead of the cohort (with --split)")
    ap.add_argument("--split", default="test", help="with --dataset: comma-separated splits (default: test)")
    args = ap.parse_args()
    params = load_params(args.params)
    path = args.dataset or cohort(params, args.patients, params.common.seed + 101, args.cache)
    hits, scores = {}, {}
    with DatasetFile(path) as ds:
        if args.dataset is None:
            idx = scored_rows(ds)
        else:
            idx = split_rows(ds, args.split)
            idx = idx[ds.has_mask[idx]]
        truth = truth_mask(ds.annotated_masks(idx), ds.mask_classes, "any")
        pos = truth.any(axis=(1, 2))
        label = ds.labels_for(list(params.common.classes))[idx].max(axis=1) > 0
        contrast, area = bleed_visibility(ds.images(idx[pos]), truth[pos])
        for spec in args.networks:
            name, _, rest = spec.partition("=")
            kind, _, file = rest.partition(":")
            maps, scores[name] = network_reading(kind, Path(file), ds, idx, params.evaluate.flip_tta)
            hits[name] = point_hits(maps[pos], truth[pos])
    print(f"\n{path}: {int(pos.sum())} positive slices; contrast percentiles 10/25/50/75/90 "
          f"{np.nanpercentile(contrast, [10, 25, 50, 75, 90]).round(1).tolist()} HU, area "
          f"{np.percentile(area, [10, 25, 50, 75, 90]).round(0).tolist()} px")
    print("\npoint_acc overall: " + ", ".join(f"{n} {h.mean():.3f}" for n, h in hits.items()))
    print("\n" + binned(contrast, CONTRAST_BINS, hits, "contrast HU"))
    print("\n" + binned(area, AREA_BINS, hits, "area px"))
    visible = (contrast >= VISIBLE_HU) & (area >= VISIBLE_PX)
    print(f"\nvisible (>= {VISIBLE_HU:g} HU and >= {VISIBLE_PX} px): {visible.mean():.3f} of the positives")
    print("| network | point_acc visible | point_acc rest | AUROC | AUROC without the rest's positives "
          "| AUROC without positives under 5 HU |\n|---|---:|---:|---:|---:|---:|")
    positives = np.flatnonzero(pos)
    hard = np.ones(len(label), bool)
    hard[positives[~visible]] = False
    faint = np.ones(len(label), bool)
    faint[positives[contrast < 5]] = False
    for name, h in hits.items():
        s = scores[name]
        print(f"| {name} | {h[visible].mean():.3f} | {h[~visible].mean():.3f} | "
              f"{roc_auc_score(label, s):.3f} | {roc_auc_score(label[hard], s[hard]):.3f} | "
              f"{roc_auc_score(label[faint], s[faint]):.3f} |")
    # what a network that pointed wherever any of these does would read: the ceiling these networks show
    missed = ~np.any(list(hits.values()), axis=0)
    print(f"\npositives that no network above points at: {int(missed.sum())} of {len(missed)}, so "
          f"point_acc {1 - missed.mean():.3f} for one that hit every bleed any of them hits")
    if 0 < missed.sum() <= 20:
        for c, a in sorted(zip(contrast[missed], area[missed])):
            print(f"  contrast {c:5.1f} HU, area {int(a):4d} px")
    elif missed.any():
        print(f"  their contrast median {np.nanmedian(contrast[missed]):.1f} HU (cohort "
              f"{np.nanmedian(contrast):.1f}), area median {np.median(area[missed]):.0f} px "
              f"({np.median(area):.0f})")


if __name__ == "__main__":
    main()
