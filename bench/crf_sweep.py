"""How good are the CRF's pseudo-masks under other CRF settings? The table behind
`pseudo_masks.calibration.compat_grid` (docs/TUNING.md, "Session 10").

    python bench/crf_sweep.py --set compat=10 --set compat=40 --set compat=40,bilateral_srgb=5

Each ``--set`` is one setting: ``pseudo_masks.crf`` of params.yaml with the given keys replaced
(``window=40:40`` for the window). With ``fg`` and ``bg`` fixed (``--fg``, ``--bg``; the stage calibrates
them), every labelled slice of the trusted train, untrusted train (``trusted`` in pseudo_masks.h5) and val
groups gets its pseudo-mask from the maps of cams.h5, as the stage makes it, and is scored against the
truth: mean Dice, the median ratio of mask to true area, and the mean share of the true bleed that falls
in the ignored band. It reads the masks of the train slices (``DatasetFile.all_masks``), which the pipeline
never does: it needs a source with complete masks, such as the synthetic default. One core, about 10 s a
setting at the default size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from weak2full.cams import normalise_cam
from weak2full.h5 import DatasetFile, open_checked
from weak2full.metrics import dice_per_slice
from weak2full.params import CRFParams, load_params
from weak2full.pseudo_masks import IGNORE, make_pseudo_mask


def crf_setting(base: CRFParams, text: str) -> CRFParams:
    """``base`` with ``key=value[,key=value...]`` replaced, validated by the schema."""
    update: dict = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {text!r}: expected key=value[,key=value...]")
        update[key] = value.split(":") if key == "window" else value
    try:
        return CRFParams(**{**base.model_dump(), **update})
    except ValueError as exc:  # pydantic's ValidationError: an unknown key or a bad value, named
        raise SystemExit(f"--set {text!r}: {exc}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--fg", type=float, default=0.5)
    ap.add_argument("--bg", type=float, default=0.1)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--dataset", type=Path, default=Path("data/prepared/dataset.h5"))
    ap.add_argument("--cams", type=Path, default=Path("data/cams/cams.h5"))
    ap.add_argument("--pseudo", type=Path, default=Path("data/pseudo/pseudo_masks.h5"),
                    help="for its trusted flags only")
    args = ap.parse_args()
    base = load_params(args.params).pseudo_masks.crf
    settings = [crf_setting(base, s) for s in args.sets] or [base]
    with DatasetFile(args.dataset) as ds, open_checked(args.pseudo, "pseudo_masks") as pm, \
            open_checked(args.cams, "cams") as cf:
        if not ds.masks_complete:
            raise SystemExit(f"{args.dataset}: not every slice has a mask; this bench needs complete masks.")
        classes = json.loads(pm.attrs["classes"])
        normalisation = cf.attrs["normalisation"]
        labels = ds.labels_for(classes)
        labelled = labels.any(axis=1)
        trusted = pm["trusted"][:].astype(bool)
        train, val = ds.indices("train"), ds.indices("val")
        groups = {"trusted train": train[labelled[train] & trusted[train]],
                  "untrusted train": train[labelled[train] & ~trusted[train]],
                  "val": val[labelled[val]]}
        # Read each group once; every setting reuses it.
        data = {name: (rows, ds.images(rows), ds.all_masks(rows) > 0, cf["cam"][rows].astype(np.float32))
                for name, rows in groups.items()}
        print(f"fg {args.fg}, bg {args.bg}; slices: " + ", ".join(f"{k} {len(v)}" for k, v in groups.items()))
        print("| setting | " + " | ".join(f"{k}: Dice / area / truth ignored" for k in groups) + " |")
        print("|---|" + "---:|" * len(groups))
        defaults = base.model_dump()
        for crf in settings:
            changed = {k: v for k, v in crf.model_dump().items() if v != defaults[k]}
            cells = []
            for rows, images, truth, cams in data.values():
                masks = np.stack([make_pseudo_mask(normalise_cam(c, normalisation), labels[r], im, args.fg,
                                                   args.bg, crf) for r, im, c in zip(rows, images, cams)])
                fg = (masks > 0) & (masks != IGNORE)
                area = fg.sum(axis=(1, 2)) / np.maximum(truth.sum(axis=(1, 2)), 1)
                ignored = ((masks == IGNORE) & truth).sum(axis=(1, 2)) / np.maximum(truth.sum(axis=(1, 2)), 1)
                cells.append(f"{dice_per_slice(fg, truth).mean():.3f} / {np.median(area):.2f} / "
                             f"{ignored.mean():.2f}")
            print(f"| {changed or 'params.yaml'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
