"""How good are the pseudo-masks of the slices the trust rule leaves out? The table behind
`pseudo_masks.untrusted_fraction` (docs/TUNING.md, "Session 7").

    python bench/trust_peaks.py          # after `make run` (or `dvc repro pseudo_masks`)

The labelled slices of the train split, and of val + test, in fifths by their map peak
(``map_peak`` in pseudo_masks.h5, :func:`weak2full.pseudo_masks.map_peaks`): per fifth the mean Dice of
the pseudo-mask against the truth and the share of slices whose map's highest pixel lies on the bleed,
plus the same two figures for the trusted and the untrusted slices. It reads the masks of the train
slices (``DatasetFile.all_masks``), which the pipeline never does: it needs a source with complete masks,
such as the synthetic default. With several classes the map's highest pixel is taken over all of them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from weak2full.h5 import DatasetFile, open_checked
from weak2full.metrics import dice_per_slice
from weak2full.pseudo_masks import IGNORE, upsample_bilinear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=Path("data/prepared/dataset.h5"))
    ap.add_argument("--cams", type=Path, default=Path("data/cams/cams.h5"))
    ap.add_argument("--pseudo", type=Path, default=Path("data/pseudo/pseudo_masks.h5"))
    args = ap.parse_args()
    with DatasetFile(args.dataset) as ds, open_checked(args.pseudo, "pseudo_masks") as pm, \
            open_checked(args.cams, "cams") as cf:
        if not ds.masks_complete:
            raise SystemExit(f"{args.dataset}: not every slice has a mask; this bench needs complete masks.")
        if "map_peak" not in pm:
            raise SystemExit(f"{args.pseudo}: no map_peak (made before the trust rule); re-run pseudo_masks.")
        classes = json.loads(pm.attrs["classes"])
        labelled = ds.labels_for(classes).any(axis=1)
        peaks, trusted = pm["map_peak"][:], pm["trusted"][:].astype(bool)
        print(f"trust cut-off {float(pm.attrs['trust_cutoff']):.3f} on the raw map")
        print("| slices | n | " + " | ".join(f"fifth {k + 1}" for k in range(5)) + " | trusted | untrusted |")
        print("|---|---:|" + "---:|" * 7)
        for name, splits in (("train", ("train",)), ("val + test", ("val", "test"))):
            rows = np.sort(np.concatenate([ds.indices(s) for s in splits]))
            rows = rows[labelled[rows]]
            truth = ds.all_masks(rows) > 0
            mask = pm["mask"][rows]  # rows are sorted, as h5py wants
            dice = dice_per_slice((mask > 0) & (mask != IGNORE), truth)
            cam = cf["cam"][rows].astype(np.float32).max(axis=1)  # (n, S, S); over all classes
            on_bleed = np.empty(len(rows), bool)
            for i, (c, t) in enumerate(zip(cam, truth)):
                m = upsample_bilinear(c[None], t.shape)[0]
                on_bleed[i] = t.flat[int(np.argmax(m))]
            order = np.argsort(peaks[rows], kind="stable")
            cells = [f"{dice[f].mean():.2f} / {on_bleed[f].mean():.2f}" for f in np.array_split(order, 5)]
            cells += [f"{dice[sel].mean():.2f} / {on_bleed[sel].mean():.2f}" if sel.any() else "-"
                      for sel in (trusted[rows], ~trusted[rows])]
            print(f"| {name}: Dice / peak on the bleed | {len(rows)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
