"""Network shapes, parameter errors that name the key or file, and checkpoints."""

from __future__ import annotations

import pytest
import torch

from weak2full.errors import InvalidInputError, InvalidParameterError
from weak2full.models import (
    GapCamNet,
    HeatmapNet,
    create_model,
    load_model,
    model_config,
    save_checkpoint,
    save_disabled,
)


def heatmap(**kw) -> HeatmapNet:
    args = dict(encoder="resnet10t", in_channels=3, num_classes=2, input_size=64, heatmap_size=64,
                decoder_channels=[16, 8])
    return HeatmapNet(**{**args, **kw})


@pytest.mark.parametrize("pooling", ["lse", "max", "topk"])
@pytest.mark.parametrize("stride", [1, 2, 4])
def test_heatmap_maps_have_the_stated_shape(pooling, stride):
    torch.manual_seed(0)
    model = heatmap(heatmap_size=64 // stride, pooling=pooling).eval()
    out = model(torch.randn(2, 3, 64, 64))
    s = 64 // stride
    assert out["map"].shape == (2, 2, s, s)
    assert out["logits"].shape == (2, 2)
    assert [m.shape[-1] for m in out["aux_maps"]] == [s // 2, s // 4]  # deep supervision, fine to coarse
    assert model.stride == stride


@pytest.mark.parametrize("stride", [1, 2])
def test_test_scale_reads_the_enlarged_slice_in_eval_mode_only_and_train_scale_in_training(stride):
    import torch.nn.functional as F

    torch.manual_seed(0)
    plain = heatmap(heatmap_size=64 // stride).eval()
    scaled = heatmap(heatmap_size=64 // stride, test_scale=2.0)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        big = plain(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        out = scaled.eval()(x)
        assert out["map"].shape == (2, 2, 64 // stride, 64 // stride)  # the plain map's grid
        assert torch.allclose(out["map"], F.avg_pool2d(big["map"], 2), atol=1e-6)
        assert torch.allclose(out["logits"], big["logits"])
        scaled.train()
        assert torch.equal(scaled(x)["map"], plain.train()(x)["map"])  # training sees the slice as it is
    # train_scale: the same enlargement in training mode, eval mode untouched.
    trained_big = heatmap(heatmap_size=64 // stride, train_scale=2.0)
    trained_big.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.allclose(trained_big.eval()(x)["map"], plain.eval()(x)["map"], atol=1e-6)
        plain.train(), trained_big.train()
        torch.manual_seed(1)
        big = plain(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        torch.manual_seed(1)
        out = trained_big(x)
        assert out["map"].shape == (2, 2, 64 // stride, 64 // stride)
        assert torch.allclose(out["map"], F.avg_pool2d(big["map"], 2), atol=1e-5)
    # A slice-context network enlarges every slice of the window.
    context = heatmap(slice_context="attention", context_slices=3, test_scale=1.5).eval()
    assert context(torch.randn(2, 3, 3, 64, 64))["map"].shape == (2, 2, 64, 64)


def test_test_flip_averages_the_slice_and_its_mirror_in_eval_mode():
    torch.manual_seed(0)
    plain = heatmap(heatmap_size=32, test_scale=2.0).eval()
    flipped = heatmap(heatmap_size=32, test_scale=2.0, test_flip=True).eval()
    flipped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, m, out = plain(x), plain(x.flip(-1)), flipped(x)
        assert torch.allclose(out["map"], 0.5 * (a["map"] + m["map"].flip(-1)), atol=1e-6)
        assert torch.allclose(out["logits"], 0.5 * (a["logits"] + m["logits"]), atol=1e-6)
        # so mirroring the slice mirrors the map and keeps the image logits
        mirrored = flipped(x.flip(-1))
        assert torch.allclose(mirrored["map"], out["map"].flip(-1), atol=1e-5)
        assert torch.allclose(mirrored["logits"], out["logits"], atol=1e-5)
        flipped.train()
        assert torch.equal(flipped(x)["map"], plain.train()(x)["map"])  # training reads one slice


def test_lse_pooling_lies_between_mean_and_max():
    model = heatmap(pooling="lse").eval()
    maps = torch.randn(3, 2, 8, 8)
    pooled = model.pool(maps)
    assert torch.all(pooled <= maps.flatten(2).amax(2) + 1e-5)
    assert torch.all(pooled >= maps.flatten(2).mean(2) - 1e-5)
    assert {n for n, _ in model.pool.named_parameters()} == {"raw_r", "bias"}  # learnable r and bias


def test_heatmap_has_no_groupnorm_or_global_pooling_in_the_decoder():
    model = heatmap()
    kinds = {type(m).__name__ for m in model.blocks.modules()}
    assert "BatchNorm2d" in kinds and not kinds & {"GroupNorm", "AdaptiveAvgPool2d"}


@pytest.mark.parametrize("size", [48, 8, 128])
def test_heatmap_size_that_does_not_fit_names_the_key(size):
    with pytest.raises(InvalidParameterError, match=r"train_classifier\.heatmap_size.*Got %d" % size):
        heatmap(heatmap_size=size)


def test_gap_cam_map_is_stride_32_and_averages_to_the_logit():
    model = GapCamNet("resnet10t", 3, 2).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["map"].shape == (2, 2, 2, 2) and model.stride == 32
    assert torch.allclose(out["map"].mean(dim=(2, 3)), out["logits"], atol=1e-5)


def test_encoder_weights_from_a_local_file(tmp_path):
    source = heatmap()
    path = tmp_path / "enc.pt"
    torch.save(source.encoder.state_dict(), path)
    loaded = heatmap(encoder_weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(source.encoder.state_dict().values(),
                                                  loaded.encoder.state_dict().values()))


def test_missing_encoder_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(InvalidInputError, match="nowhere.pth.*does not exist"):
        heatmap(encoder_weights=str(missing))


def test_mismatched_encoder_weights_file_is_named(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(GapCamNet("resnet18", 3, 1).encoder.state_dict(), path)
    with pytest.raises(InvalidInputError, match="resnet18.pth does not fit the encoder"):
        heatmap(encoder_weights=str(path))


def test_checkpoint_round_trip_and_architecture_check(tmp_path, make_params):
    p = make_params(baseline_cam={"encoder": "resnet10t"}).baseline_cam
    config = model_config("gap_cam", p, 3, 1, 64)
    model = create_model("gap_cam", config)
    save_checkpoint(tmp_path / "gap.pt", model, "gap_cam", config, ["any"], input={})
    loaded, ckpt = load_model(tmp_path / "gap.pt", arch="gap_cam")
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded(x)["logits"], model.eval()(x)["logits"])
    with pytest.raises(InvalidInputError, match="gap.pt holds a 'gap_cam' network, expected a 'heatmap' one"):
        load_model(tmp_path / "gap.pt", arch="heatmap")


def test_disabled_marker_and_foreign_files_are_refused(tmp_path):
    save_disabled(tmp_path / "oracle.pt", "the oracle is disabled (train_oracle.enabled is false)")
    with pytest.raises(InvalidInputError, match="oracle.pt is a marker: the oracle is disabled"):
        load_model(tmp_path / "oracle.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(InvalidInputError, match="other.pt is not a weak2full checkpoint"):
        load_model(tmp_path / "other.pt")
