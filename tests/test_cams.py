"""The cams stage: contract of cams.h5 for both classifiers, streaming in chunks, wrong checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_train import tiny_dataset

from weak2full import cams, h5, runtime
from weak2full.errors import InvalidInputError
from weak2full.models import create_model, load_model, model_config, save_checkpoint


def checkpoint(path, arch, make_params, heatmap_size=32):
    heat = {"encoder": "resnet10t", "decoder_channels": [8], "heatmap_size": heatmap_size}
    p = make_params(train_classifier=heat, baseline_cam={"encoder": "resnet10t"})
    section = p.train_classifier if arch == "heatmap" else p.baseline_cam
    torch.manual_seed(0)
    config = model_config(arch, section, 3, 1, 32)
    save_checkpoint(path, create_model(arch, config), arch, config, ["any"],
                    input=p.input.model_dump(mode="json"), heatmap_size=heatmap_size)
    return path


@pytest.mark.parametrize("method, norm, stride", [("heatmap", "relative", 2), ("gap_cam", "max", 32)])
def test_cams_file_follows_the_contract(tmp_path, make_params, method, norm, stride):
    ds = tiny_dataset(tmp_path / "dataset.h5")
    ckpt = checkpoint(tmp_path / "m.pt", method, make_params, heatmap_size=16)
    params = make_params(common={"device": "cpu"}, cams={"batch_size": 3, "chunk_size": 5})
    out = cams.run(params, ckpt, ds, tmp_path / "cams.h5")
    with h5.open_checked(out, "cams") as f:
        assert f["cam"].dtype == np.float16 and f["cam"].shape == (24, 1, 16, 16)
        assert f["cam"].chunks == (1, 1, 16, 16)
        assert f["prob"].dtype == np.float32 and f["prob"].shape == (24, 1)
        assert f.attrs["method"] == method and f.attrs["normalisation"] == norm
        assert f.attrs["stride"] == stride and f.attrs["heatmap_size"] == 16
        assert json.loads(f.attrs["classes"]) == ["any"]
        assert f.attrs["neighbour_weight"] == params.cams.neighbour_weight == 0.5
        streamed, prob = f["cam"][:], f["prob"][:]
    with h5.DatasetFile(ds) as d:  # chunked streaming gives what one pass over all rows gives
        model = load_model(ckpt)[0]
        whole, own = cams.predict_cams(model, d, np.arange(24), params.input, 16, batch_size=24)
        # the slice context crosses chunk borders: it is applied once every chunk is in
        context = cams.with_slice_context(own, d.patient, d.slice, params.cams.neighbour_weight)
    np.testing.assert_allclose(streamed, whole.astype(np.float16), atol=2e-3, rtol=2e-3)
    # an untrained network's probabilities differ in the sixth digit, its context's too
    np.testing.assert_allclose(prob, context, rtol=0, atol=1e-7)
    assert np.abs(prob - own).max() > 1e-6


def test_slice_context_averages_logits_of_the_same_patients_adjacent_slices():
    logit = np.array([0.0, 2.0, -2.0, 4.0, 1.0, 3.0])
    prob = (1 / (1 + np.exp(-logit)))[:, None].astype(np.float32)
    patient = np.array([0, 0, 0, 1, 1, 1])
    slice_index = np.array([0, 1, 2, 0, 1, 3])  # patient 1 lacks slice 2: slices 1 and 3 are no neighbours
    got = cams.with_slice_context(prob, patient, slice_index, 0.5)
    # a stack's end and a gap count the slice itself in the neighbour's place
    want = np.array([(0 + 0.5 * (0 + 2)) / 2, (2 + 0.5 * (0 - 2)) / 2, (-2 + 0.5 * (2 - 2)) / 2,
                     (4 + 0.5 * (4 + 1)) / 2, (1 + 0.5 * (4 + 1)) / 2, (3 + 0.5 * (3 + 3)) / 2])
    np.testing.assert_allclose(got[:, 0], 1 / (1 + np.exp(-want)), rtol=1e-5)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(cams.with_slice_context(prob, patient, slice_index, 0.0), prob)


def test_probability_logit_is_finite_and_keeps_float32_near_ties_apart():
    got = cams.probability_logit(np.array([0.0, 0.5, 1.0, 0.9999, 0.99999], dtype=np.float32))
    assert got.dtype == np.float64 and np.isfinite(got).all()
    np.testing.assert_allclose(got[:3], [np.log(1e-7 / (1 - 1e-7)), 0.0, np.log((1 - 1e-7) / 1e-7)])
    assert got[3] < got[4] < got[2]  # probabilities float32 still tells apart stay apart


def test_maps_average_with_their_neighbours_pixel_by_pixel():
    maps = np.stack([np.full((2, 2), v) for v in (0.0, 3.0, 6.0)])
    prev, nxt = np.array([0, 0, 1]), np.array([1, 2, 2])  # data.neighbours of one three-slice stack
    got = cams.average_with_neighbours(maps, prev, nxt, 0.25)
    np.testing.assert_allclose(got[:, 0, 0], [(0 + 0.25 * (0 + 3)) / 1.5, 3.0, (6 + 0.25 * (3 + 6)) / 1.5])
    assert got.shape == maps.shape


def test_cams_refuses_a_checkpoint_of_another_kind(tmp_path, make_params):
    ds = tiny_dataset(tmp_path / "dataset.h5")
    ckpt = checkpoint(tmp_path / "gap.pt", "gap_cam", make_params)
    params = make_params(common={"device": "cpu"})
    with pytest.raises(InvalidInputError, match="gap.pt holds a 'gap_cam' network, expected a 'heatmap' one"):
        cams.run(params, ckpt, ds, tmp_path / "cams.h5", method="heatmap")
    assert not (tmp_path / "cams.h5").exists()
    with pytest.raises(InvalidInputError, match=r"trained for classes \['any'\].*common.classes"):
        cams.run(make_params(common={"classes": ["any", "subdural"]}), ckpt, ds, tmp_path / "cams.h5")


def test_normalise_cam_sigmoid_and_max():
    cam = np.array([[[-1.0, 0.0], [1.0, 3.0]]])
    np.testing.assert_allclose(cams.normalise_cam(cam, "sigmoid")[0, 1, 1], 1 / (1 + np.exp(-3)), rtol=1e-6)
    np.testing.assert_allclose(cams.normalise_cam(cam, "max")[0], [[0, 0], [1 / 3, 1]], rtol=1e-6)
    assert not cams.normalise_cam(-np.ones((2, 2)), "max").any()


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:  # counted in pages
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(runtime._malloc_trim() is None, reason="glibc's malloc_trim only")
def test_release_freed_memory_hands_fragmented_heap_back():
    """What the cams stage calls between chunks: freed heap buffers that free() keeps resident (their
    neighbours pin the heap) go back to the OS."""
    lift = np.ones(16 << 20, np.uint8)  # freeing a 16 MiB mmapped block lifts glibc's mmap threshold,
    del lift                           # so the 1 MiB buffers below come from the heap
    blocks, pins = [], []
    for _ in range(200):
        blocks.append(np.ones(1 << 20, np.uint8))
        pins.append(np.ones(64 << 10, np.uint8))  # a live neighbour after each: no free() trims the top
    before = _resident_mib()
    del blocks
    runtime.release_freed_memory()
    assert _resident_mib() < before - 100  # of the 200 MiB freed, most is no longer resident
    assert len(pins) == 200
