"""The cams stage: contract of cams.h5 for both classifiers, streaming in chunks, wrong checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train import tiny_dataset

from weak2full import cams, h5
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
        streamed = f["cam"][:]
    with h5.DatasetFile(ds) as d:  # chunked streaming gives what one pass over all rows gives
        model = load_model(ckpt)[0]
        whole, _ = cams.predict_cams(model, d, np.arange(24), params.input, 16, batch_size=24)
    np.testing.assert_allclose(streamed, whole.astype(np.float16), atol=2e-3, rtol=2e-3)


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
