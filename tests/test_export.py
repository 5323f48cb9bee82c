"""Export: the shippable pseudo-label folder, its card, its loader, and the bad inputs it refuses."""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from weak2full.errors import InvalidInputError
from weak2full.export import CARD_FIELDS, load_pseudo_labels, run
from weak2full.h5 import SCHEMA_VERSION, write_dataset
from weak2full.params import parse_params

N, SIZE = 6, 8


def _dataset(path):
    mask = np.zeros((N, SIZE, SIZE), np.uint8)
    mask[1, 2:4, 2:4] = 1
    write_dataset(
        path, image=np.zeros((N, SIZE, SIZE), np.int16), patient=np.repeat([3, 5], 3).astype(np.int32),
        slice_index=np.tile(np.arange(3), 2).astype(np.int32),
        label=np.stack([mask.any((1, 2))] * 2, 1).astype(np.uint8), mask=mask,
        has_mask=np.zeros(N, bool), split=np.array([0, 0, 0, 2, 2, 2], np.uint8),
        classes=["any", "bleed"], mask_classes=["bleed"], masks_complete=True, source="test",
        pixel_spacing=[0.5, 0.5],
    )


def _pseudo(path, n=N):
    mask = np.zeros((n, SIZE, SIZE), np.uint8)
    mask[1, 2:4, 2:4] = 1
    mask[1, 4, 4] = 255
    with h5py.File(path, "w") as f:
        f["mask"] = mask
        f["trusted"] = (np.arange(n) != 3).astype(np.uint8)
        f["fg_fraction"] = (mask == 1).mean((1, 2)).astype(np.float32)
        f["ignore_fraction"] = (mask == 255).mean((1, 2)).astype(np.float32)
        f.attrs.update(kind="pseudo_masks", schema_version=SCHEMA_VERSION, classes=json.dumps(["any"]))


@pytest.fixture
def inputs(tmp_path):
    _dataset(tmp_path / "dataset.h5")
    _pseudo(tmp_path / "pseudo.h5")
    metrics = tmp_path / "pseudo_masks.json"
    metrics.write_text(json.dumps({"test": {"crf": {"dice_pos": 0.61}}}))
    return tmp_path, metrics


def test_export_writes_a_loadable_dataset_with_its_card(inputs):
    tmp, metrics = inputs
    params = parse_params({"export": {"name": "demo"}})
    out = run(params, tmp / "dataset.h5", tmp / "pseudo.h5", [metrics], tmp / "dist")
    assert out == tmp / "dist" / "demo"
    ds = load_pseudo_labels(out)
    assert ds.mask.shape == (N, SIZE, SIZE) and ds.mask[1, 4, 4] == 255
    assert ds.label[:, 0].tolist() == [0, 1, 0, 0, 0, 0]
    assert ds.trusted.tolist() == [1, 1, 1, 0, 1, 1] and ds.card["untrusted_slices"] == 1
    assert ds.card["quality"]["pseudo_masks"]["test"]["crf"]["dice_pos"] == 0.61
    assert ds.card["class_balance"]["any"]["positive_slices"] == 1
    assert set(CARD_FIELDS) <= set(ds.card)
    assert len(ds.card["input_sha256"]["dataset.h5"]) == 64
    vol = nib.load(out / "nifti" / "00003.nii.gz")
    assert vol.shape == (SIZE, SIZE, 3) and np.asarray(vol.dataobj)[2, 2, 1] == 1
    assert "How to load" in (out / "card.md").read_text()


def test_export_is_byte_stable(inputs):
    tmp, metrics = inputs
    params = parse_params({"export": {"name": "demo", "nifti": False}})
    a = run(params, tmp / "dataset.h5", tmp / "pseudo.h5", [metrics], tmp / "a")
    b = run(params, tmp / "dataset.h5", tmp / "pseudo.h5", [metrics], tmp / "b")
    for name in ("pseudo_labels.h5", "card.json", "card.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_slice_count_mismatch_fails_without_output(inputs):
    tmp, metrics = inputs
    _pseudo(tmp / "short.h5", n=N - 1)
    with pytest.raises(InvalidInputError, match=r"short\.h5: 5 pseudo-masks .* do not match"):
        run(parse_params({}), tmp / "dataset.h5", tmp / "short.h5", [metrics], tmp / "dist")
    assert not (tmp / "dist").exists() or not any((tmp / "dist").iterdir())


def test_missing_metrics_file_names_it(inputs):
    tmp, _ = inputs
    with pytest.raises(InvalidInputError, match=r"nope\.json: metrics file does not exist"):
        run(parse_params({}), tmp / "dataset.h5", tmp / "pseudo.h5", [tmp / "nope.json"], tmp / "dist")


def test_loader_refuses_a_card_without_a_field(inputs):
    tmp, metrics = inputs
    out = run(parse_params({"export": {"nifti": False}}), tmp / "dataset.h5", tmp / "pseudo.h5", [metrics],
              tmp / "dist")
    card = json.loads((out / "card.json").read_text())
    del card["quality"]
    (out / "card.json").write_text(json.dumps(card))
    with pytest.raises(InvalidInputError, match=r"card lacks the fields \['quality'\]"):
        load_pseudo_labels(out)


def test_loader_refuses_a_folder_without_a_card(tmp_path):
    with pytest.raises(InvalidInputError, match="no dataset card"):
        load_pseudo_labels(tmp_path)


def test_re_export_replaces_the_old_folder(inputs):
    tmp, metrics = inputs
    params = parse_params({"export": {"name": "demo", "nifti": False}})
    out = run(params, tmp / "dataset.h5", tmp / "pseudo.h5", [metrics], tmp / "dist")
    (out / "stale.txt").write_text("from an older export")
    run(params, tmp / "dataset.h5", tmp / "pseudo.h5", [metrics], tmp / "dist")
    assert not (out / "stale.txt").exists()
    assert [p.name for p in (tmp / "dist").iterdir()] == ["demo"]
