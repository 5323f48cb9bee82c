"""Synthetic pretraining: the weights it saves are the ones the chain's networks start from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from weak2full.errors import InvalidInputError, InvalidParameterError
from weak2full.h5 import DatasetFile
from weak2full.models import create_model, model_config, resolve_encoder_weights
from weak2full.models.segmenter import create_segmenter
from weak2full.params import Params, parse_params
from weak2full.pretrain import make_pretraining_set, run

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("train_classifier", "baseline_cam", "train_segmenter", "train_oracle")


def _smoke(**pretrain) -> dict:
    raw = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
    if pretrain:
        net = {"epochs": 3, "steps_per_epoch": 4, "batch_size": 4}
        raw["pretrain"] = {"enabled": True, "volumes": 4, "val_volumes": 1, "slices_per_volume": 8,
                           "classifier": net, "segmenter": net, **pretrain}
        for s in STAGES:
            raw[s]["encoder_weights"] = "synthetic"
    return raw


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    params = parse_params(_smoke(seed=500))
    result = run(params, out / "classifier_encoder.pt", out / "segmenter_encoder.pt", out / "pretrain.json")
    return params, out, result


def test_pretraining_saves_encoders_the_classifiers_and_segmenters_load(pretrained):
    params, out, result = pretrained
    ip, size = params.input, params.data.image_size
    seg_channels = ip.for_segmenter().in_channels  # input.segmenter_windows
    saved = torch.load(out / "classifier_encoder.pt", weights_only=True)["state_dict"]
    for arch, section in (("heatmap", params.train_classifier), ("gap_cam", params.baseline_cam)):
        weights = resolve_encoder_weights("synthetic", out / "classifier_encoder.pt", "x")
        model = create_model(arch, model_config(arch, section, ip.in_channels, 1, size), weights)
        own = model.encoder.state_dict()
        assert own.keys() == saved.keys()
        for k, v in saved.items():
            assert own[k].shape == v.shape and torch.equal(own[k], v), k
    saved = torch.load(out / "segmenter_encoder.pt", weights_only=True)["state_dict"]
    for section in (params.train_segmenter, params.train_oracle):
        model = create_model("segmenter", model_config("segmenter", section, seg_channels, 1, 0),
                             str(out / "segmenter_encoder.pt"))
        own = model.encoder.state_dict()
        assert own.keys() == saved.keys()
        for k, v in saved.items():
            assert own[k].shape == v.shape and torch.equal(own[k], v), k


def test_pretraining_loss_falls_and_metrics_are_written(pretrained):
    _, out, result = pretrained
    assert json.loads((out / "pretrain.json").read_text()) == json.loads(json.dumps(result))
    assert result["enabled"] and result["seconds"] > 0
    for network in ("classifier", "segmenter"):
        r = result[network]
        assert r["trained"] and len(r["epochs"]) == 3
        assert r["train_loss_last_epoch"] < r["train_loss_first_epoch"], r
        assert {"val_loss", "dice_pos", "fp_slice_rate"} <= set(r["selected"])


def test_synthetic_weights_in_a_mismatched_encoder_name_the_file(pretrained):
    _, out, _ = pretrained
    path = out / "classifier_encoder.pt"  # a timm resnet10t: not the segmenter's resnet18
    named = re.escape(str(path))
    with pytest.raises(InvalidInputError, match=rf"{named}.*does not fit the encoder.*'resnet10t' encoder"):
        create_segmenter("Unet", "resnet18", 3, 1, encoder_weights=str(path))
    with pytest.raises(InvalidInputError, match=rf"{named}.*does not fit.*3 input channels"):
        create_model("heatmap", dict(encoder="resnet10t", in_channels=1, num_classes=1, input_size=64,
                                     heatmap_size=64, decoder_channels=[16]), str(path))


def test_disabled_pretraining_writes_constant_markers_that_loaders_refuse(tmp_path):
    params = parse_params(_smoke())
    digests = []
    for run_dir in ("a", "b"):
        out = tmp_path / run_dir
        result = run(params, out / "c.pt", out / "s.pt", out / "m.json")
        assert result == {"enabled": False, "classifier": {"trained": False},
                          "segmenter": {"trained": False}}
        digests.append([(out / n).read_bytes() for n in ("c.pt", "s.pt", "m.json")])
    assert digests[0] == digests[1]  # DVC sees the same bytes: nothing downstream re-runs
    marker = tmp_path / "a" / "s.pt"
    with pytest.raises(InvalidInputError, match=rf"{re.escape(str(marker))} is a marker: pretraining is off"):
        create_segmenter("Unet", "resnet18", 3, 1, encoder_weights=str(marker))


def test_pretraining_set_is_randomised_per_volume_and_seeded(tmp_path):
    pp = Params().pretrain.model_copy(update={"volumes": 3, "val_volumes": 1, "slices_per_volume": 4})
    make_pretraining_set(pp, 32, "hu", tmp_path / "a.h5")
    make_pretraining_set(pp, 32, "hu", tmp_path / "b.h5")
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    with DatasetFile(tmp_path / "a.h5") as ds:
        assert len(ds.indices("train")) == 12 and len(ds.indices("val")) == 4
        assert ds.has_mask[ds.indices("val")].all() and ds.masks_complete
        images = ds.images(slice(None))
    # Each volume its own noise draw: the air outside the head differs in spread between volumes.
    spreads = [float(images[v * 4:(v + 1) * 4, :3, :3].std()) for v in range(4)]
    assert len(set(round(s, 3) for s in spreads)) > 1


def test_synthetic_needs_the_pretrain_stage_and_a_shared_start():
    with pytest.raises(InvalidParameterError, match=r"encoder_weights is 'synthetic' but pretrain.enabled"):
        parse_params({"train_segmenter": {"encoder_weights": "synthetic"},
                      "train_oracle": {"encoder_weights": "synthetic"}})
    with pytest.raises(InvalidParameterError, match=r"train_segmenter.encoder_weights .* train_oracle"):
        parse_params({"pretrain": {"enabled": True}, "train_segmenter": {"encoder_weights": "synthetic"}})
    with pytest.raises(InvalidParameterError, match=r"no stage's encoder_weights is 'synthetic'"):
        parse_params({"pretrain": {"enabled": True}})
    raw = _smoke(seed=10_000)
    raw["common"]["seed"] = 10_003
    with pytest.raises(InvalidParameterError, match=r"common.seed 10003 lies in the pretraining seeds"):
        parse_params(raw)
    # The oracle switched off has no start to share.
    parse_params({"pretrain": {"enabled": True}, "train_segmenter": {"encoder_weights": "synthetic"},
                  "train_oracle": {"enabled": False}})
    with pytest.raises(InvalidInputError, match=r"train_classifier.encoder_weights is 'synthetic'"):
        resolve_encoder_weights("synthetic", None, "train_classifier.encoder_weights")
