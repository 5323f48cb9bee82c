"""The published methods as options (docs/METHODS.md): PYLON decoder, slice context, min-max entropy.

Each option trains a few steps on a tiny 128x128 dataset through the real train_classifier stage, then
the unchanged cams stage must write 128x128 maps. Smaller tests pin what each option is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import tiny_dataset

from weak2full import cams, data, h5, losses, train
from weak2full.errors import InvalidParameterError
from weak2full.models import HeatmapNet, load_model
from weak2full.params import parse_params

TINY128 = dict(encoder="resnet10t", batch_size=4, steps_per_epoch=2, epochs=1, lr=3e-3,
               heatmap_size=128, decoder_channels=[8], augment=dict(affine=0.0), val_negative_ratio=None)

# The default decoder's chain is tested in test_cams / test_weak_path; here, each option's.
OPTIONS = {
    "pylon (published)": {"decoder": "pylon", "pooling": "max", "deep_supervision": False},
    "gru slice context": {"slice_context": "gru", "context_slices": 3},
    "attention slice context": {"slice_context": "attention", "context_slices": 3},
    "min-max entropy": {"minmax_entropy_weight": 1.0},
}


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("methods") / "dataset.h5", size=128, patients=4)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_trains_and_cams_writes_128_maps(option, tiny128, tmp_path, make_params):
    params = make_params(common={"device": "cpu"}, train_classifier={**TINY128, **OPTIONS[option]},
                         cams={"batch_size": 8, "chunk_size": 10})
    metrics = train.run_classifier(params, tiny128, tmp_path / "c.pt", tmp_path / "c.json", None)
    assert 0.0 <= metrics["test"]["point_acc"] <= 1.0
    out = cams.run(params, tmp_path / "c.pt", tiny128, tmp_path / "cams.h5")
    with h5.open_checked(out, "cams") as f:
        assert f["cam"].shape == (16, 1, 128, 128) and f.attrs["heatmap_size"] == 128
        assert np.isfinite(f["cam"][:]).all() and np.isfinite(f["prob"][:]).all()
        decoder = OPTIONS[option].get("decoder", "unet")
        assert f.attrs["stride"] == (4 if decoder == "pylon" else 1)  # PYLON's map is upsampled by cams
    model, ckpt = load_model(tmp_path / "c.pt", arch="heatmap")
    assert ckpt["config"]["decoder"] == decoder
    assert model.context_slices == OPTIONS[option].get("context_slices", 1)


def test_pylon_decoder_is_the_published_design():
    torch.manual_seed(0)
    model = HeatmapNet("resnet10t", 3, 1, 128, 128, [16], decoder="pylon", pooling="max",
                       deep_supervision=False).eval()
    kinds = [type(m).__name__ for m in model.pylon.modules()]
    assert "BatchNorm2d" in kinds and not set(kinds) & {"GroupNorm", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d"}
    assert "PyramidAttention" in kinds and kinds.count("PylonUp") == 3  # strides 16, 8, 4
    out = model(torch.rand(2, 3, 128, 128))
    assert out["map"].shape == (2, 1, 32, 32) and model.stride == 4  # the 4x4 deepest map still works
    assert torch.equal(out["logits"], out["map"].flatten(2).amax(2))  # global max pooling
    assert out["aux_maps"] == []


def test_context_windows_stay_inside_the_patient():
    patient = np.array([0, 0, 0, 1, 1, 2])
    rows = data.context_rows(patient, np.arange(6), 5)
    assert rows.tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 2],
                             [3, 3, 3, 4, 4], [3, 3, 4, 4, 4], [5, 5, 5, 5, 5]]
    assert data.context_rows(patient, np.array([1]), 3).tolist() == [[0, 1, 2]]


def test_slice_context_starts_as_the_plain_network_and_then_reads_neighbours():
    torch.manual_seed(0)
    model = HeatmapNet("resnet10t", 3, 1, 64, 64, [8], slice_context="gru", context_slices=3).eval()
    x = torch.rand(2, 3, 3, 64, 64)
    other = x.clone()
    other[:, 0] = torch.rand(2, 3, 64, 64)  # another previous slice
    assert torch.equal(model(x)["map"], model(other)["map"])  # zero-initialised fusion: the plain network
    torch.nn.init.normal_(model.context.proj.weight, std=0.1)
    fused, fused_other = model._features(x), model._features(other)
    assert all(torch.equal(a, b) for a, b in zip(fused[:-1], fused_other[:-1]))  # skips: the centre slice's
    assert not torch.allclose(fused[-1], fused_other[-1])  # the deepest map now reads the neighbour
    with pytest.raises(ValueError, match=r"takes \(B, 3, C, H, W\)"):
        model(x[:, 1])


def test_dataset_yields_windows_for_a_context_network(tiny128, make_params):
    ip = make_params().input
    ds = data.SliceDataset(tiny128, np.arange(8), ip, ["any"], "label", context_slices=5,
                           augment=make_params().train_classifier.augment)
    x, y = ds[(4, 7)]  # augmented: one geometric transform for the whole window
    assert x.shape == (5, 3, 128, 128) and y.tolist() == [0.0]
    plain = data.SliceDataset(tiny128, np.arange(8), ip, ["any"], "label")
    with h5.DatasetFile(tiny128) as f:  # slice 4 opens patient 1: its window repeats it twice
        window = data.model_input(f.h5["image"], [4], f.patient, ip, 5)[0]
    assert torch.equal(torch.from_numpy(window[2]), plain[4][0])
    assert torch.equal(torch.from_numpy(window[0]), plain[4][0])
    assert torch.equal(ds[4][0], torch.from_numpy(window))


def test_minmax_entropy_moves_only_the_map():
    torch.manual_seed(0)
    model = HeatmapNet("resnet10t", 3, 1, 64, 64, [8]).train()
    x = torch.rand(4, 3, 64, 64)
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    out = model(x)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    loss = losses.minmax_entropy_loss(model, out, y)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert 0.0 <= float(loss.detach()) and loss.requires_grad
    frozen = losses.minmax_entropy_loss(model, dict(out, map=out["map"].detach()), y)
    assert not frozen.requires_grad  # the judge's weights and the input are constants: the map is the path
    negatives = losses.minmax_entropy_loss(model, out, torch.zeros_like(y))
    assert float(negatives.detach()) == 0.0


def test_option_params_are_checked():
    with pytest.raises(InvalidParameterError, match=r"train_classifier\.context_slices.*odd.*Got 4"):
        parse_params({"train_classifier": {"context_slices": 4}})
    with pytest.raises(InvalidParameterError, match=r"train_classifier\.decoder"):
        parse_params({"train_classifier": {"decoder": "fpn"}})
    with pytest.raises(InvalidParameterError, match=r"train_classifier\.minmax_entropy_weight"):
        parse_params({"train_classifier": {"minmax_entropy_weight": -1}})
