"""HDF5 contracts: atomic writes, checked opening, the annotated-mask guard."""

import h5py
import numpy as np
import pytest

from weak2full.errors import InvalidInputError
from weak2full.h5 import DatasetFile, atomic_output, open_checked, truth_mask, write_dataset


def _arrays(n=6, size=8):
    rng = np.random.default_rng(0)
    mask = np.zeros((n, size, size), np.uint8)
    mask[1, 2:4, 2:4] = 1
    mask[4, 5:7, 1:3] = 2
    return dict(
        image=rng.integers(-1000, 100, (n, size, size)).astype(np.int16),
        patient=np.repeat([0, 1, 2], n // 3).astype(np.int32),
        slice_index=np.tile(np.arange(n // 3), 3).astype(np.int32),
        label=np.stack([mask.any((1, 2)), (mask == 1).any((1, 2)), (mask == 2).any((1, 2))],
                       1).astype(np.uint8),
        mask=mask,
        has_mask=np.array([0, 0, 1, 1, 1, 1], bool),
        split=np.array([0, 0, 1, 1, 2, 2], np.uint8),
        classes=["any", "a", "b"],
        mask_classes=["a", "b"],
        masks_complete=True,
        source="test",
    )


def test_write_and_read_dataset(tmp_path):
    path = tmp_path / "dataset.h5"
    write_dataset(path, **_arrays())
    with DatasetFile(path) as d:
        assert (d.n, d.height, d.width) == (6, 8, 8)
        assert d.classes == ["any", "a", "b"] and d.mask_classes == ["a", "b"]
        assert d.indices("test").tolist() == [4, 5]
        assert d.images([5, 1]).shape == (2, 8, 8)
        assert d.annotated_masks([4])[0, 5, 1] == 2
        assert d.labels_for(["b"]).ravel().tolist() == [0, 0, 0, 0, 1, 0]


def test_same_arrays_same_bytes(tmp_path):
    write_dataset(tmp_path / "a.h5", **_arrays())
    write_dataset(tmp_path / "b.h5", **_arrays())
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_weak_path_cannot_read_unannotated_masks(tmp_path):
    path = tmp_path / "dataset.h5"
    write_dataset(path, **_arrays())
    with DatasetFile(path) as d:
        with pytest.raises(InvalidInputError, match="outside the annotated subset"):
            d.annotated_masks([0, 2])
        assert d.all_masks([1])[0].any()  # the oracle's door


def test_contract_violations_leave_no_file(tmp_path):
    path = tmp_path / "dataset.h5"
    bad = _arrays()
    bad["mask"] = bad["mask"].copy()
    bad["mask"][0, 0, 0] = 7
    with pytest.raises(InvalidInputError, match="mask values go up to 7"):
        write_dataset(path, **bad)
    empty = _arrays()
    for k in ("image", "mask"):
        empty[k] = empty[k][:0]
    with pytest.raises(InvalidInputError, match="empty"):
        write_dataset(path, **empty)
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_open_checked_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        open_checked(tmp_path / "missing.h5", "dataset")
    trunc = tmp_path / "trunc.h5"
    write_dataset(trunc, **_arrays())
    trunc.write_bytes(trunc.read_bytes()[:1000])
    with pytest.raises(InvalidInputError, match="not a readable HDF5"):
        open_checked(trunc, "dataset")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["kind"] = "cams"
    with pytest.raises(InvalidInputError, match="expected a 'dataset' file"):
        open_checked(other, "dataset")
    old = tmp_path / "old.h5"
    write_dataset(old, **_arrays())
    with h5py.File(old, "a") as f:
        f.attrs["schema_version"] = 0
    with pytest.raises(InvalidInputError, match="schema version 0"):
        DatasetFile(old)


def test_truth_mask_classes():
    m = np.array([[0, 1, 2]], np.uint8)
    assert truth_mask(m, ["a", "b"], "any").tolist() == [[False, True, True]]
    assert truth_mask(m, ["a", "b"], "b").tolist() == [[False, False, True]]
    with pytest.raises(InvalidInputError, match="one class 'any'"):
        truth_mask(m, ["any"], "a")
