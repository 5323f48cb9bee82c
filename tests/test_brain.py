"""The intracranial mask: found from HU alone, fracture gaps bridged, and applied to maps and masks."""

from __future__ import annotations

import numpy as np
import pytest

from weak2full.brain import intracranial_mask, restrict_to_brain
from weak2full.errors import InvalidParameterError
from weak2full.params import parse_params


def skull_slice(size=64, gap=False):
    """Air, a 3-pixel skull ring of 1200 HU (optionally cut by a 2-pixel fracture), 35 HU brain inside."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    hu = np.full((size, size), -1000.0)
    hu[r < 0.42 * size] = 35.0
    ring = (r >= 0.36 * size) & (r < 0.42 * size)
    hu[ring] = 1200.0
    if gap:
        hu[ring & (np.abs(xx - size / 2) <= 1) & (yy < size / 2)] = 40.0  # soft tissue in the fracture
    return hu, r < 0.36 * size


@pytest.mark.parametrize("gap", [False, True])
def test_inside_of_the_skull_is_found_even_across_a_fracture(gap):
    hu, inside = skull_slice(gap=gap)
    mask = intracranial_mask(hu)
    assert (mask == inside).mean() > 0.98 and mask[32, 32] and not mask[0, 0]


def test_a_slice_without_a_closed_skull_keeps_every_pixel():
    hu = np.full((2, 32, 32), 35.0)
    hu[1, :, :3] = 1200.0  # bone along one border only: nothing enclosed
    assert intracranial_mask(hu).all()


def test_maps_outside_the_brain_become_their_background_level():
    brain = intracranial_mask(skull_slice()[0])
    maps = np.random.default_rng(0).normal(size=(1, 1, 32, 32)).astype(np.float32)
    maps[0, 0, 0, 0] = 50.0  # a peak on the skull / outside
    out = restrict_to_brain(maps, brain[None])
    small = brain[1::2, 1::2]  # the nearest-neighbour pick of restrict_to_brain
    assert np.array_equal(out[0, 0][small], maps[0, 0][small])
    assert np.allclose(out[0, 0][~small], np.median(maps[0, 0][small]))
    assert out.argmax() != 0


def test_brain_mask_needs_hounsfield_units():
    with pytest.raises(InvalidParameterError, match="input.brain_mask.*percentile"):
        parse_params({"data": {"source": "nifti-folder", "path": "x", "intensity": "percentile"}})
    with pytest.raises(InvalidParameterError, match="input.skull_strip.*percentile"):
        parse_params({"data": {"source": "nifti-folder", "path": "x", "intensity": "percentile"},
                      "input": {"brain_mask": False, "skull_strip": True}})
    parse_params({"data": {"source": "nifti-folder", "path": "x", "intensity": "percentile"},
                  "input": {"brain_mask": False}})


def test_cams_and_segmenter_masks_are_kept_inside_the_skull(tmp_path, make_params):
    import torch

    from weak2full import h5
    from weak2full.cams import predict_cams
    from weak2full.models import create_heatmap, create_segmenter, predict_masks

    hu = np.stack([skull_slice(32)[0], skull_slice(32, gap=True)[0]]).astype(np.int16)
    n = len(hu)
    path = tmp_path / "dataset.h5"
    h5.write_dataset(
        path, image=hu, patient=np.zeros(n), slice_index=np.arange(n),
        label=np.ones((n, 1), np.uint8), mask=np.zeros_like(hu, np.uint8), has_mask=np.ones(n, bool),
        split=np.full(n, 2), classes=["any"], mask_classes=["any"], masks_complete=True, source="test")
    brain = intracranial_mask(hu.astype(np.float32))
    on, off = make_params().input, make_params(input={"brain_mask": False}).input
    torch.manual_seed(0)
    heat = create_heatmap(make_params(train_classifier={"decoder_channels": [8, 8], "heatmap_size": 32,
                                                        "encoder": "resnet10t"}).train_classifier,
                          3, 1, 32)
    seg = create_segmenter("Unet", "resnet18", 3, 1, decoder_channels=[8, 8, 8, 8, 8])
    with h5.DatasetFile(path) as f:
        cam_on, _ = predict_cams(heat, f, [0, 1], on, 32)
        cam_off, _ = predict_cams(heat, f, [0, 1], off, 32)
        seg_on, seg_off = predict_masks(seg, f, [0, 1], on), predict_masks(seg, f, [0, 1], off)
    assert np.array_equal(cam_on[:, 0][brain], cam_off[:, 0][brain])
    assert np.allclose(cam_on[0, 0][~brain[0]], np.median(cam_off[0, 0][brain[0]]))
    assert np.array_equal(seg_on[:, 0][brain], seg_off[:, 0][brain]) and (seg_on[:, 0][~brain] == 0).all()


def test_skull_stripping_shows_the_network_only_the_inside_of_the_skull(make_params):
    from weak2full.data import build_channels

    hu, inside = skull_slice(gap=True)
    hu[10, 32] = 1500.0  # a bone fragment of the fracture, outside the intracranial region
    planes = hu[None, None].astype(np.float32)
    plain = build_channels(planes, make_params().input)[0]
    stripped = build_channels(planes, make_params(input={"skull_strip": True}).input)[0]
    brain = intracranial_mask(hu)
    assert np.array_equal(stripped[:, brain], plain[:, brain])
    assert (stripped[:, ~brain] == 0).all() and plain[2, 10, 32] > 0  # air in every window
