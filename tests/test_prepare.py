"""The prepare stage on the synthetic source: the dataset.h5 contract, splits, resampling, the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weak2full import prepare, synthetic
from weak2full.errors import InvalidInputError
from weak2full.h5 import DatasetFile
from weak2full.importers.resample import area_weights, resample_volume
from weak2full.params import SplitParams

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "image_size": 64,
    "synthetic": {"patients": 10, "slices_per_patient": 8, "positive_patient_fraction": 0.6},
}


def patients_with(d: DatasetFile, split: int, positive: bool | None = None) -> set:
    sel = d.split == split
    if positive:
        sel &= d.label[:, 0] > 0
    return set(d.patient[sel].tolist())


def test_synthetic_dataset_contract(make_params, tmp_path):
    out, montage = tmp_path / "data" / "dataset.h5", tmp_path / "reports" / "data_montage.png"
    params = make_params(data=SMALL, common={"seed": 3})
    prepare.run(params, out, montage)
    d = DatasetFile(out)
    assert (d.n, d.height, d.width) == (80, 64, 64)
    assert d.classes == synthetic.CLASSES and d.mask_classes == synthetic.MASK_CLASSES and d.masks_complete
    assert d.source == "synthetic" and len(d.pixel_spacing) == 2
    # A patient's slices are contiguous and increasing.
    assert (np.diff(d.patient) >= 0).all() and (np.diff(d.slice)[np.diff(d.patient) == 0] == 1).all()
    # Splits by patient, each with a positive patient; masks annotated on val and test only.
    for split in (0, 1, 2):
        assert patients_with(d, split, positive=True), split
    assert all(len({int(s) for s in d.split[d.patient == p]}) == 1 for p in np.unique(d.patient))
    assert not d.has_mask[d.split == 0].any() and d.has_mask[d.split > 0].all()
    assert json.loads(d.h5.attrs["params"]) == params.data.model_dump(mode="json")
    prov = json.loads(d.h5.attrs["provenance"])
    assert prov["seed"] == 3 and prov["generator"]["patients"] == 10 and prov["source"] == "synthetic"
    with Image.open(montage) as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["data_montage.png", "dataset.h5"]


def test_same_params_same_bytes(make_params, tmp_path):
    params = make_params(data=SMALL)
    prepare.run(params, tmp_path / "a.h5", None)
    prepare.run(params, tmp_path / "b.h5", None)
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_generic_checks_catch_a_bad_generator(make_params, tmp_path, monkeypatch):
    """The checks run on every source: a mask value beyond the mask classes is refused, nothing written."""
    real = synthetic.generate

    def broken(p, image_size, seed):
        data = real(p, image_size, seed)
        data.mask[0, 0, 0] = 7
        return data

    monkeypatch.setattr(synthetic, "generate", broken)
    out = tmp_path / "dataset.h5"
    with pytest.raises(
        InvalidInputError, match=r"synthetic patient 0: mask value 7 is outside the class range 0\.\.5"
    ):
        prepare.run(make_params(data=SMALL), out, tmp_path / "montage.png")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------- splits


def test_split_patients_stratified_and_seeded():
    keys = [f"p{i:02d}" for i in range(20)]
    positive = [i % 4 == 0 for i in range(20)]  # 5 positive patients
    sp = SplitParams(annotated_val_fraction=0.5, annotated_test_fraction=0.5)
    split, annotated = prepare.split_patients(keys, positive, sp, seed=0, annotatable=True)
    assert [sum(split[k] == s for k in keys) for s in (0, 1, 2)] == [12, 4, 4]
    for s in (0, 1, 2):
        assert any(split[k] == s and p for k, p in zip(keys, positive)), s
    assert not any(annotated[k] for k in keys if split[k] == 0)
    assert sum(annotated.values()) == 4  # half of each of val and test
    for s in (1, 2):  # the annotated half holds a positive patient
        assert any(annotated[k] and p for k, p in zip(keys, positive) if split[k] == s)
    assert prepare.split_patients(keys, positive, sp, seed=0, annotatable=True) == (split, annotated)
    assert prepare.split_patients(keys, positive, sp, seed=1, annotatable=True)[0] != split
    assert not any(prepare.split_patients(keys, positive, sp, seed=0, annotatable=False)[1].values())


def test_split_patients_without_positives_and_errors():
    split, _ = prepare.split_patients(["a", "b", "c"], [False] * 3, SplitParams(), seed=0, annotatable=True)
    assert sorted(split.values()) == [0, 1, 2]
    with pytest.raises(
        InvalidInputError, match=r"the data holds 2 patients; train, val and test need at least 3"
    ):
        prepare.split_patients(["a", "b"], [True, True], SplitParams(), seed=0, annotatable=True)
    with pytest.raises(InvalidInputError, match=r"only 1 patients have a positive slice"):
        prepare.split_patients(list("abcdef"), [True] + [False] * 5, SplitParams(), seed=0, annotatable=True)


# ------------------------------------------------------------------------------------------ resample


def test_area_weights_average_exactly():
    w = area_weights(6, 4)  # each output pixel covers 1.5 input pixels
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    np.testing.assert_allclose(w[0], [2 / 3, 1 / 3, 0, 0, 0, 0])
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    out, _, spacing = resample_volume(image, None, (0.5, 0.5), 2, pad_value=0)
    np.testing.assert_allclose(out[0], [[2.5, 4.5], [10.5, 12.5]])  # 2x2 block means
    assert spacing == (1.0, 1.0)


def test_resample_pads_to_square_and_keeps_mask_values():
    image = np.full((1, 4, 8), 100.0, np.float32)  # wide: padded top and bottom with the pad value
    mask = np.zeros((1, 4, 8), np.uint8)
    mask[0, :, :4], mask[0, :, 4:] = 2, 5
    out, m, spacing = resample_volume(image, mask, (1.0, 0.5), 4, pad_value=-1000)
    np.testing.assert_allclose(out[0, :, 0], [-1000, 100, 100, -1000])
    np.testing.assert_array_equal(m[0], [[0, 0, 0, 0], [2, 2, 5, 5], [2, 2, 5, 5], [0, 0, 0, 0]])
    assert spacing == (2.0, 1.0)


# -------------------------------------------------------------------------------------------- script


def test_stage_script_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(f"data:\n  source: ct-ich\n  path: {tmp_path / 'missing'}\n")
    out = tmp_path / "dataset.h5"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "stages" / "prepare.py"),
            "--params",
            str(tmp_path / "params.yaml"),
            "--out",
            str(out),
            "--montage",
            str(tmp_path / "montage.png"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert (
        res.stderr.strip()
        == f"prepare: error: data.path {tmp_path / 'missing'} does not exist or is not a folder "
        "(source 'ct-ich')."
    )
    assert not out.exists() and not (tmp_path / "montage.png").exists()
