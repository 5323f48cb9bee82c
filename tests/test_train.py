"""The one training loop on tiny real data: loss falls, runs are reproducible, resume works, stages write."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from weak2full import data, h5, losses, train
from weak2full.errors import InvalidParameterError, LocalisationWarning
from weak2full.models import create_heatmap, load_model


def tiny_dataset(path, size: int = 32, patients: int = 6, slices: int = 4, seed: int = 0):
    """A dataset.h5 of bright discs (60 HU blood on 35 HU brain) on every other slice; split 4/1/1 patients.

    Val and test are annotated. Masks use the single class ``any``.
    """
    rng = np.random.default_rng(seed)
    n = patients * slices
    yy, xx = np.mgrid[:size, :size]
    image = np.full((n, size, size), -1000, np.int16)
    head = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    mask = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        image[i][head] = 35 + rng.normal(0, 2, head.sum()).astype(np.int16)
        if i % 2:
            cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 10) ** 2
            image[i][blob] = 60
            mask[i][blob] = 1
    patient = np.repeat(np.arange(patients), slices)
    split = np.select([patient == patients - 2, patient == patients - 1], [1, 2], 0)
    h5.write_dataset(path, image=image, patient=patient, slice_index=np.tile(np.arange(slices), patients),
                     label=(mask.reshape(n, -1).max(1) > 0)[:, None].astype(np.uint8), mask=mask,
                     has_mask=split > 0, split=split, classes=["any"], mask_classes=["any"],
                     masks_complete=True, source="test")
    return path


TINY = dict(encoder="resnet10t", batch_size=4, steps_per_epoch=2, epochs=2,
            lr=3e-3, augment=dict(affine=0.0))
HEAT = {**TINY, "heatmap_size": 32, "decoder_channels": [16, 8]}


@pytest.fixture
def tiny(tmp_path):
    return tiny_dataset(tmp_path / "dataset.h5")


def test_heatmap_loss_falls(tiny, make_params):
    p = make_params(common={"device": "cpu"}, train_classifier=HEAT).train_classifier
    torch.manual_seed(0)
    model = create_heatmap(p, 3, 1, 32)
    ds = data.SliceDataset(tiny, np.arange(16), make_params().input, ["any"], "label")
    x, y = map(torch.stack, zip(*(ds[i] for i in range(8))))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = losses.heatmap_loss(model(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first


def test_negative_pixel_term_pushes_down_every_pixel_of_negative_slices_only():
    maps = torch.zeros(2, 1, 8, 8, requires_grad=True)  # slice 0 positive, slice 1 negative
    out = {"map": maps, "logits": maps.mean(dim=(2, 3)), "aux_maps": [], "aux_logits": []}
    target = torch.tensor([[1.0], [0.0]])
    base = losses.heatmap_loss(out, target, 0.0, 0.0)
    with_term = losses.heatmap_loss(out, target, 0.0, 0.0, negative_pixel_weight=2.0)
    assert float((with_term - base).detach()) == pytest.approx(2 * np.log(2.0), rel=1e-5)  # BCE(0, 0) = log 2
    with_term.backward()
    # Image BCE through mean pooling: (sigmoid(0) - label) / (2 slices x 64 pixels) on each pixel; the
    # term adds weight x sigmoid(0) / 64 pixels on the negative slice alone.
    assert torch.allclose(maps.grad[0], torch.full((1, 8, 8), -0.5 / 128))
    assert torch.allclose(maps.grad[1], torch.full((1, 8, 8), 0.5 / 128 + 2.0 * 0.5 / 64))


def test_balanced_sampler_is_seeded_and_balanced():
    positive = np.arange(20) < 3
    a = list(data.BalancedBatchSampler(positive, 4, 5, 0.5, seed=1))
    b = list(data.BalancedBatchSampler(positive, 4, 5, 0.5, seed=1))
    assert a == b
    assert all(sum(positive[i] for i, _ in batch) == 2 for batch in a)


def test_dataset_pickles_without_a_file_handle(tiny, make_params):
    ds = data.SliceDataset(tiny, np.arange(4), make_params().input, ["any"], "label")
    ds[0]  # opens the file in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._file is None
    x, y = clone[1]
    assert x.shape == (3, 32, 32) and y.tolist() == [1.0]


def test_slices_mode_repeats_edge_slices():
    patient = np.array([0, 0, 0, 1, 1])
    prev, nxt = data.neighbours(patient, np.arange(5))
    assert prev.tolist() == [0, 0, 1, 3, 3]
    assert nxt.tolist() == [1, 2, 2, 4, 4]
    # with slice indices, a missing slice (patient 1 lacks slice 1) breaks the adjacency too
    prev, nxt = data.neighbours(patient, np.arange(5), np.array([0, 1, 2, 0, 2]))
    assert prev.tolist() == [0, 0, 1, 3, 4]
    assert nxt.tolist() == [1, 2, 2, 3, 4]


def test_windows_neighbours_mode_stacks_the_windows_then_the_neighbours(make_params):
    hu = np.stack([np.full((2, 2), v, np.float32) for v in (10.0, 40.0, 70.0)])[None]  # prev, current, next
    ip = make_params(input={"mode": "windows_neighbours", "windows": [[40, 80], [40, 40]],
                            "slice_window": [50, 100]}).input
    x = data.build_channels(hu, ip)
    assert ip.in_channels == 4 and x.shape == (1, 4, 2, 2)
    # current 40 HU in each window, then prev 10 HU and next 70 HU in the slice window (0..100 HU)
    assert x[0, :, 0, 0].tolist() == pytest.approx([0.5, 0.5, 0.1, 0.7])


def test_classifier_stage_is_reproducible_and_writes_outputs(tiny, tmp_path, make_params):
    params = make_params(common={"device": "cpu"}, train_classifier={**HEAT, "epochs": 1})
    a = train.run_classifier(params, tiny, tmp_path / "a.pt", tmp_path / "a.json", tmp_path / "live")
    train.run_classifier(params, tiny, tmp_path / "b.pt", tmp_path / "b.json", None)
    wa, wb = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["state_dict"] for n in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    saved = json.loads((tmp_path / "a.json").read_text())
    for split in ("val", "test"):
        assert {"auroc", "ap", "per_class", "point_acc", "map_dice"} <= set(saved[split])
    assert saved["val"]["auroc"] == pytest.approx(a["val"]["auroc"])
    val_t = saved["val"]["per_class"]["any"]["map_threshold"]  # calibrated on val, applied to test
    assert val_t in train.MAP_THRESHOLDS and saved["test"]["per_class"]["any"]["map_threshold"] == val_t
    assert (tmp_path / "live" / "metrics.json").is_file()
    assert not (tmp_path / ".a.resume.pt").exists()  # the resume state goes once training finished
    model, ckpt = load_model(tmp_path / "a.pt", arch="heatmap")
    assert ckpt["classes"] == ["any"] and model(torch.zeros(1, 3, 32, 32))["map"].shape == (1, 1, 32, 32)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_continues_from_the_last_epoch(tiny, tmp_path, make_params, capsys, ema_decay):
    params = make_params(common={"device": "cpu"}, baseline_cam={**TINY, "epochs": 2, "ema_decay": ema_decay})
    full = train.run_baseline(params, tiny, tmp_path / "full.pt", tmp_path / "full.json", None)

    class Stop(Exception):
        pass

    calls = {"n": 0}
    real = train.classifier_metrics

    def interrupt_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Stop
        return real(*args, **kwargs)

    train.classifier_metrics = interrupt_in_epoch_two
    try:
        with pytest.raises(Stop):
            train.run_baseline(params, tiny, tmp_path / "r.pt", tmp_path / "r.json", None)
    finally:
        train.classifier_metrics = real
    assert (tmp_path / ".r.resume.pt").is_file() and not (tmp_path / "r.pt").exists()
    resumed = train.run_baseline(params, tiny, tmp_path / "r.pt", tmp_path / "r.json", None)
    captured = capsys.readouterr()
    assert "resuming after epoch 1" in captured.out + captured.err
    wf, wr = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["state_dict"] for n in ("full", "r"))
    assert all(torch.allclose(wf[k].float(), wr[k].float()) for k in wf)
    assert resumed["test"]["auroc"] == pytest.approx(full["test"]["auroc"])


def test_amp_is_bf16_autocast_where_the_cpu_computes_bf16_natively(tiny, tmp_path, make_params):
    # amp on a CPU with AVX512-BF16/AMX trains other (bf16-rounded) weights than float32; on a CPU that
    # would emulate bf16 the switch is ignored and the weights are float32's to the bit.
    from weak2full.runtime import fast_bf16

    weights = {}
    for amp in (False, True):
        section = {**TINY, "epochs": 1, "amp": amp}
        params = make_params(common={"device": "cpu"}, baseline_cam=section)
        train.run_baseline(params, tiny, tmp_path / f"{amp}.pt", tmp_path / f"{amp}.json", None)
        weights[amp] = torch.load(tmp_path / f"{amp}.pt", weights_only=True)["state_dict"]
    assert all(v.dtype != torch.bfloat16 for v in weights[True].values())  # saved in float32
    assert all(torch.isfinite(v.float()).all() for v in weights[True].values())
    same = all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])
    assert same is not fast_bf16(torch.device("cpu"))


def test_ema_weights_are_the_ones_selected_and_saved(tiny, tmp_path, make_params):
    # The same steps with and without the moving average: the raw weights are identical, so the saved
    # checkpoints differ only by the averaging, and the averaged one sits between start and end.
    runs = {}
    for decay in (0.0, 0.9):
        section = {**TINY, "epochs": 1, "steps_per_epoch": 4, "ema_decay": decay}
        params = make_params(common={"device": "cpu"}, baseline_cam=section)
        train.run_baseline(params, tiny, tmp_path / f"{decay}.pt", tmp_path / f"{decay}.json", None)
        runs[decay] = torch.load(tmp_path / f"{decay}.pt", weights_only=True)["state_dict"]
    weights = [k for k, v in runs[0.0].items() if v.is_floating_point() and "bn" not in k]
    assert any(not torch.equal(runs[0.0][k], runs[0.9][k]) for k in weights)
    from weak2full.models import create_model, model_config
    from weak2full.runtime import seed_everything

    seed_everything(params.common.seed)  # as the stage does before building the network
    start = create_model("gap_cam", model_config("gap_cam", params.baseline_cam, 3, 1, 32), None).state_dict()
    moved_raw = sum(float((runs[0.0][k] - start[k]).norm()) for k in weights)
    moved_ema = sum(float((runs[0.9][k] - start[k]).norm()) for k in weights)
    assert 0 < moved_ema < moved_raw


def test_skull_gap_cuts_one_thin_line_through_the_bone_only():
    size = 64
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 32, xx - 32)
    hu = np.full((2, size, size), -1000.0, np.float32)
    hu[:, r < 26] = 1200.0  # skull
    hu[:, r < 23] = 35.0  # brain
    out = data.skull_gap(hu, np.random.default_rng(0))
    changed = out != hu
    assert changed.any() and (changed[0] == changed[1]).all()  # the same line on every plane
    assert (hu[changed] == 1200.0).all() and (out[changed] == data.SOFT_TISSUE_HU).all()  # bone only
    assert changed[0].sum() <= 3 * 2  # about the skull's thickness times the line's width
    # Cut through: inside and outside of the skull were apart, now they meet.
    assert ndi.label(hu[0] < 250)[1] == 2 and ndi.label(out[0] < 250)[1] == 1
    brainless = np.full((1, size, size), 35.0, np.float32)
    assert data.skull_gap(brainless, np.random.default_rng(0)) is brainless  # no bone, nothing to cut


def test_a_diverged_epoch_stops_with_the_keys_to_change(tiny, tmp_path, make_params, monkeypatch):
    # A NaN loss (here forced; on a real run a too-high lr or a bf16 kernel) must not reach validation,
    # where scikit-learn would fail on NaN scores; nothing is written.
    params = make_params(common={"device": "cpu"}, baseline_cam={**TINY, "epochs": 1})
    real = losses.gap_cam_loss
    monkeypatch.setattr(losses, "gap_cam_loss", lambda out, target: real(out, target) * float("nan"))
    diverged = r"gap_cam: training diverged in epoch 1.*'lr'.*'amp'"
    with pytest.raises(InvalidParameterError, match=diverged):
        train.run_baseline(params, tiny, tmp_path / "d.pt", tmp_path / "d.json", None)
    assert not (tmp_path / "d.pt").exists() and not (tmp_path / "d.json").exists()


def test_a_heatmap_network_that_does_not_point_at_the_lesions_is_warned_about(tiny, tmp_path, make_params,
                                                                                monkeypatch):
    with pytest.warns(LocalisationWarning, match=r"model\.pt: .* on only 10% .*AUROC 0\.84"):
        train.warn_if_not_localising({"auroc": 0.84, "point_acc": 0.1}, "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a network that points, nor without val positives
        train.warn_if_not_localising({"auroc": 0.84, "point_acc": train.LOCALISATION_FLOOR}, "model.pt")
        train.warn_if_not_localising({"auroc": 0.84, "point_acc": float("nan")}, "model.pt")
    # the stage checks its selected network's val figures, after its outputs are whole (a floor no
    # network reaches, so the test does not hang on what two training steps happen to learn)
    monkeypatch.setattr(train, "LOCALISATION_FLOOR", 1.01)
    params = make_params(common={"device": "cpu"},
                         train_classifier={**HEAT, "epochs": 1, "steps_per_epoch": 2})
    with pytest.warns(LocalisationWarning, match="c.pt") as caught:
        result = train.run_classifier(params, tiny, tmp_path / "c.pt", tmp_path / "c.json", None)
    assert f"on only {result['val']['point_acc']:.0%} of" in str(caught[0].message)
    assert (tmp_path / "c.pt").is_file() and (tmp_path / "c.json").is_file()
