"""The weak path never reads a mask outside the annotated subset.

Two copies of one dataset differ only in the masks of non-annotated slices (garbage in one of them).
Every weak-path stage (classifier, baseline, cams, pseudo-masks, segmenter) must give identical outputs.
"""

import shutil

import h5py
import numpy as np
import torch
from test_train import HEAT, TINY, tiny_dataset

from weak2full import cams, pseudo_masks, train

SEG = dict(TINY, encoder="resnet18", decoder_channels=[16, 16, 8, 8, 8], crop_size=None)


def _chain(root, dataset, params):
    root.mkdir()
    train.run_classifier(params, dataset, root / "classifier.pt", root / "classifier.json", None)
    train.run_baseline(params, dataset, root / "gap_cam.pt", root / "baseline.json", None)
    cams.run(params, root / "classifier.pt", dataset, root / "cams.h5")
    cams.run(params, root / "gap_cam.pt", dataset, root / "gap_cam.h5")
    pseudo_masks.run(params, dataset, root / "cams.h5", root / "pseudo.h5", root / "pm.json",
                     root / "cal.json")
    train.run_segmenter(params, dataset, root / "pseudo.h5", root / "segmenter.pt", None)
    return root


def test_garbage_in_unannotated_masks_changes_no_weak_output(tmp_path, make_params):
    clean = tiny_dataset(tmp_path / "clean.h5")
    dirty = tmp_path / "dirty.h5"
    shutil.copy(clean, dirty)
    with h5py.File(dirty, "r+") as f:
        hidden = ~f["has_mask"][:]
        rng = np.random.default_rng(1)
        f["mask"][np.flatnonzero(hidden)] = rng.integers(0, 2, (hidden.sum(),) + f["mask"].shape[1:])
        assert (f["mask"][:] != h5py.File(clean, "r")["mask"][:]).any()
    params = make_params(common={"device": "cpu"}, train_classifier=HEAT, baseline_cam=TINY,
                         train_segmenter=SEG, pseudo_masks={"workers": 1})
    a = _chain(tmp_path / "a", clean, params)
    b = _chain(tmp_path / "b", dirty, params)
    for name in ("cams.h5", "gap_cam.h5", "pseudo.h5", "classifier.json", "baseline.json", "pm.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa = torch.load(a / "segmenter.pt", weights_only=True)["state_dict"]
    sb = torch.load(b / "segmenter.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
