"""Segmenter: loss with the ignore label, pseudo-mask and oracle targets, the two segmenter stages."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from test_train import tiny_dataset

from weak2full import data, h5, losses, train
from weak2full.errors import InvalidInputError, InvalidParameterError
from weak2full.models import create_segmenter, load_model, predict_masks
from weak2full.params import InputParams

TINY_SEG = dict(arch="Unet", encoder="resnet18", decoder_channels=[16, 16, 8, 8, 8], batch_size=4,
                crop_size=None, steps_per_epoch=3, epochs=1, augment=dict(affine=0.0))


def write_pseudo(path, mask: np.ndarray, classes=("any",), trusted=None):
    """A minimal pseudo_masks.h5 (the contract's datasets and attributes; ``trusted`` flags if given)."""
    with h5py.File(path, "w") as f:
        f["mask"] = mask.astype(np.uint8)
        if trusted is not None:
            f["trusted"] = np.asarray(trusted, np.uint8)
        f["fg_fraction"] = ((mask > 0) & (mask != 255)).mean(axis=(1, 2)).astype(np.float32)
        f["ignore_fraction"] = (mask == 255).mean(axis=(1, 2)).astype(np.float32)
        f.attrs.update(kind="pseudo_masks", schema_version=h5.SCHEMA_VERSION,
                       classes=json.dumps(list(classes)), fg=0.5, bg=0.1, crf="{}", thresholds="fixed")
    return path


def test_segmentation_loss_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = torch.randint(0, 2, (2, 1, 8, 8), dtype=torch.uint8)
    target[:, :, :4] = 255
    loss = losses.segmentation_loss(logits, target)
    loss.backward()
    assert torch.all(logits.grad[:, :, :4] == 0) and logits.grad[:, :, 4:].abs().sum() > 0
    other = logits.detach().clone()
    other[:, :, :4] = 100.0  # whatever is predicted under the ignore label does not matter
    assert losses.segmentation_loss(other, target) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_segmentation_loss_has_gradient_on_an_all_negative_batch():
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    losses.segmentation_loss(logits, torch.zeros(2, 1, 8, 8, dtype=torch.uint8)).backward()
    assert logits.grad.sum() > 0  # pushes every pixel towards background


def test_per_slice_dice_weighs_a_small_lesion_like_a_large_one():
    # Slice 0: a 4-pixel lesion missed entirely; slice 1: a 400-pixel lesion found. Over the batch the
    # miss is 1% of the foreground; per slice it is half the Dice term. Negatives add no Dice term.
    target = torch.zeros(3, 1, 32, 32, dtype=torch.uint8)
    target[0, 0, :2, :2] = 1
    target[1, 0, 6:26, 6:26] = 1
    logits = torch.where(target == 1, 20.0, -20.0).float()
    logits[0] = -20.0
    batch = losses.segmentation_loss(logits, target)  # Dice term ~0.005
    per_slice = losses.segmentation_loss(logits, target, per_slice=True)  # (0.8 + 0.0) / 2
    assert float(per_slice) - float(batch) == pytest.approx(0.395, abs=0.01)
    assert float(losses.segmentation_loss(logits[2:], target[2:], per_slice=True)) < 1e-6


def test_slice_term_punishes_a_speck_on_a_negative_slice_and_skips_unknown_slices():
    target = torch.zeros(3, 1, 16, 16, dtype=torch.uint8)
    target[1, 0, 4:12, 4:12] = 1  # a bleed, found
    target[2, 0, :4] = 255  # no foreground, but partly ignored: may hold a bleed, so not a negative
    clean = torch.where(target == 1, 10.0, -10.0).float()
    speck = clean.clone()
    speck[0, 0, 8, 8] = 10.0  # one confident pixel on a negative slice
    plain = float(losses.segmentation_loss(speck, target)) - float(losses.segmentation_loss(clean, target))
    gated = (float(losses.segmentation_loss(speck, target, slice_weight=1.0))
             - float(losses.segmentation_loss(clean, target, slice_weight=1.0)))
    assert plain < 0.1 and gated > 3.0  # per-pixel BCE barely notices; the slice term does
    unknown = clean.clone()
    unknown[2, 0, 0, 0] = 10.0  # a speck under the ignore label of the unknown slice
    assert float(losses.segmentation_loss(unknown, target, slice_weight=1.0)) == pytest.approx(
        float(losses.segmentation_loss(clean, target, slice_weight=1.0)))


def test_pseudo_targets_keep_ignore_and_union_any():
    mask = np.array([[0, 1, 2], [255, 0, 2]], np.uint8)
    t = data.mask_targets(mask, ["epidural", "subdural"], ["any", "subdural"])
    assert t[0].tolist() == [[0, 1, 1], [255, 0, 1]]
    assert t[1].tolist() == [[0, 0, 1], [255, 0, 1]]


def test_segmenter_stage_trains_on_pseudo_masks_and_predicts(tmp_path, make_params):
    ds = tiny_dataset(tmp_path / "dataset.h5")
    with h5.DatasetFile(ds) as f:
        truth = f.all_masks(np.arange(f.n))  # test fixture only: pseudo-masks that equal the truth
    truth[:, :2] = 255
    pseudo = write_pseudo(tmp_path / "pseudo.h5", truth)
    params = make_params(common={"device": "cpu"}, train_segmenter=TINY_SEG)
    metrics = train.run_segmenter(params, ds, pseudo, tmp_path / "seg.pt", None)
    assert {"dice_pos", "fp_slice_rate"} <= set(metrics)
    model, ckpt = load_model(tmp_path / "seg.pt", arch="segmenter")
    with h5.DatasetFile(ds) as f:
        prob = predict_masks(model, f, [5, 1, 3], params.input.for_segmenter(), batch_size=2)
    assert prob.shape == (3, 1, 32, 32) and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
    # A cascade's gate: rows where ``keep`` is False predict nothing, so they find no bleed and fire on
    # no negative slice; keeping every row changes nothing.
    with h5.DatasetFile(ds) as f:
        rows = f.indices("test")
        ip = params.input.for_segmenter()
        score = lambda keep: train.segmenter_metrics(model, f, rows, ip, ["any"], keep=keep)  # noqa
        assert score(np.ones(len(rows), bool)) == score(None)
        assert score(np.zeros(len(rows), bool)) == {"dice_pos": 0.0, "fp_slice_rate": 0.0}


def test_segmenter_does_not_train_on_slices_marked_untrusted(tmp_path, make_params):
    ds = tiny_dataset(tmp_path / "dataset.h5")
    with h5.DatasetFile(ds) as f:
        truth = f.all_masks(np.arange(f.n))  # test fixture only
        train_rows = f.indices("train")
    untrusted = train_rows[truth[train_rows].any(axis=(1, 2))][::2]  # half the positive train slices
    trusted = np.ones(len(truth), np.uint8)
    trusted[untrusted] = 0
    params = make_params(common={"device": "cpu"}, train_segmenter=TINY_SEG)
    rng = np.random.default_rng(0)

    def weights(flags, tag):  # the untrusted slices' masks replaced by fresh garbage each time
        mask = truth.copy()
        mask[untrusted] = rng.integers(0, 2, mask[untrusted].shape)
        pseudo = write_pseudo(tmp_path / f"{tag}.h5", mask, trusted=flags)
        train.run_segmenter(params, ds, pseudo, tmp_path / f"{tag}.pt", None)
        return load_model(tmp_path / f"{tag}.pt", arch="segmenter")[0].state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(weights(trusted, "a"), weights(trusted, "b"))  # what they hold does not matter
    assert not same(weights(None, "c"), weights(None, "d"))  # without the flags it does
    bad = write_pseudo(tmp_path / "bad.h5", truth, trusted=trusted[:-1])
    with pytest.raises(InvalidInputError, match=r"bad.h5: trusted flags of shape \(\d+,\), but .*re-run"):
        train.run_segmenter(params, ds, bad, tmp_path / "bad.pt", None)


def test_segmenter_and_oracle_read_input_segmenter_windows(tmp_path, make_params):
    ds = tiny_dataset(tmp_path / "dataset.h5")
    with h5.DatasetFile(ds) as f:
        pseudo = write_pseudo(tmp_path / "pseudo.h5", f.all_masks(np.arange(f.n)))  # test fixture only
    four = [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0], [40.0, 40.0]]
    params = make_params(common={"device": "cpu"}, input={"segmenter_windows": four},
                         train_segmenter=TINY_SEG, train_oracle=TINY_SEG)
    assert params.input.in_channels == 3  # the classifiers keep input.windows
    assert make_params(input={"segmenter_windows": None}).input.for_segmenter().in_channels == 3
    train.run_segmenter(params, ds, pseudo, tmp_path / "seg.pt", None)
    train.run_oracle(params, ds, tmp_path / "oracle.pt", None)
    for name in ("seg.pt", "oracle.pt"):
        model, ckpt = load_model(tmp_path / name, arch="segmenter")
        ip = InputParams(**ckpt["input"])  # evaluate rebuilds the input from the checkpoint
        assert [list(w) for w in ip.windows] == four and ip.in_channels == 4
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert first_conv.in_channels == 4
        with h5.DatasetFile(ds) as f:
            assert predict_masks(model, f, [0, 1], ip).shape == (2, 1, 32, 32)
    with pytest.raises(InvalidParameterError, match="input.segmenter_windows.*width > 0"):
        make_params(input={"segmenter_windows": [[40.0, 0.0]]})


@pytest.mark.parametrize("select_by, kept", [("dice_pos", 1), ("last", 2)])
def test_segmenter_keeps_the_best_val_epoch_or_the_last(tmp_path, make_params, monkeypatch, select_by, kept):
    # A val Dice that falls after the first epoch: dice_pos keeps epoch 1, last keeps epoch 2 anyway.
    ds = tiny_dataset(tmp_path / "dataset.h5")
    scores = iter([0.9, 0.1])
    monkeypatch.setattr(train, "segmenter_metrics", lambda *a, **k: {"dice_pos": next(scores)})
    params = make_params(common={"device": "cpu"},
                         train_oracle={**TINY_SEG, "epochs": 2, "select_by": select_by})
    metrics = train.run_oracle(params, ds, tmp_path / "oracle.pt", None)
    assert metrics == {"dice_pos": 0.9 if kept == 1 else 0.1}
    _, ckpt = load_model(tmp_path / "oracle.pt", arch="segmenter")
    assert ckpt["selected_by"] == select_by and ckpt["val"] == metrics


def test_masks_without_a_class_are_refused():
    expected = r"pseudo.h5: masks hold the classes \['any'\].*\['subdural'\]"
    with pytest.raises(InvalidInputError, match=expected):
        data.check_mask_classes(["any"], ["any", "subdural"], "pseudo.h5")


def test_oracle_disabled_writes_a_marker(tmp_path, make_params):
    ds = tiny_dataset(tmp_path / "dataset.h5")
    params = make_params(train_oracle={"enabled": False})
    train.run_oracle(params, ds, tmp_path / "oracle.pt", None)
    with pytest.raises(InvalidInputError, match="disabled"):
        load_model(tmp_path / "oracle.pt")


def test_segmenter_encoder_weights_file_is_checked(tmp_path):
    missing = tmp_path / "encoder.pth"
    with pytest.raises(InvalidInputError, match="encoder.pth does not exist"):
        create_segmenter("Unet", "resnet18", 3, 1, encoder_weights=str(missing))


def test_crop_training_sees_foreground_patches_and_predicts_whole_slices(tmp_path, make_params):
    ds = tiny_dataset(tmp_path / "dataset.h5")
    params = make_params(common={"device": "cpu"}, train_oracle={**TINY_SEG, "crop_size": 16})
    train_set = data.SliceDataset(ds, np.arange(16), params.input.for_segmenter(), ["any"], "oracle",
                                  params.train_oracle.augment, crop_size=16)
    for pos in np.flatnonzero(train_set.positive):
        x, y = train_set[(int(pos), 7)]
        assert x.shape == (4, 16, 16) and y.shape == (1, 16, 16)
        assert y.max() == 1  # the patch of a positive slice holds lesion pixels
    train.run_oracle(params, ds, tmp_path / "oracle.pt", None)
    model, _ = load_model(tmp_path / "oracle.pt", arch="segmenter")
    with h5.DatasetFile(ds) as f:
        assert predict_masks(model, f, [1], params.input.for_segmenter()).shape == (1, 1, 32, 32)


def test_upsampled_segmenter_works_on_the_enlarged_slice_and_answers_on_its_grid(tmp_path, make_params):
    seen = []
    net = create_segmenter("Unet", "resnet18", 3, 1, decoder_channels=[8, 8, 8, 8, 8], upsample=2)
    net.model.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 32, 32) and seen == [(2, 3, 64, 64)]
    ds = tiny_dataset(tmp_path / "dataset.h5")
    params = make_params(common={"device": "cpu"}, train_oracle={**TINY_SEG, "upsample": 2})
    train.run_oracle(params, ds, tmp_path / "oracle.pt", None)
    model, ckpt = load_model(tmp_path / "oracle.pt", arch="segmenter")
    assert ckpt["config"]["upsample"] == 2 and model.factor == 2
    with h5.DatasetFile(ds) as f:
        assert predict_masks(model, f, [1, 2], params.input.for_segmenter()).shape == (2, 1, 32, 32)


def test_flip_tta_averages_the_logits_of_the_slice_and_its_mirror(tmp_path, make_params):
    # Two "networks" that weigh the slice by a left-to-right ramp and by its mirror image: read plainly
    # they disagree; with the test-time flip each sees both ramps, so they give the same masks.
    class Ramp(torch.nn.Module):
        def __init__(self, reverse: bool):
            super().__init__()
            ramp = torch.linspace(0.0, 1.0, 32)
            self.register_buffer("w", ramp.flip(0) if reverse else ramp)

        def forward(self, x):
            return 4 * x[:, :1] * self.w

    class Half(torch.nn.Module):
        def forward(self, x):
            return 2 * x[:, :1]

    ds = tiny_dataset(tmp_path / "dataset.h5")
    ip = make_params().input
    with h5.DatasetFile(ds) as f:
        a, b = (predict_masks(Ramp(r), f, [1, 2, 3], ip) for r in (False, True))
        fa, fb = (predict_masks(Ramp(r), f, [1, 2, 3], ip, flip=True) for r in (False, True))
    assert not np.allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(fa, fb, atol=1e-6)
    # ramp + mirrored ramp = 1 at every column, so the mean of the two logits is 4 x / 2
    with h5.DatasetFile(ds) as f:
        np.testing.assert_allclose(fa, predict_masks(Half(), f, [1, 2, 3], ip), atol=1e-6)
    assert fa.shape == a.shape == (3, 1, 32, 32) and fa.std() > 0.01


def test_crop_larger_than_the_slice_or_on_image_labels_is_refused(tmp_path, make_params):
    ds = tiny_dataset(tmp_path / "dataset.h5")
    ip, aug = make_params().input, make_params().train_oracle.augment
    with pytest.raises(InvalidParameterError, match="crop_size parameter \\(64\\).*32x32"):
        data.SliceDataset(ds, np.arange(4), ip, ["any"], "oracle", aug, crop_size=64)
    with pytest.raises(ValueError, match="image label"):
        data.SliceDataset(ds, np.arange(4), ip, ["any"], "label", aug, crop_size=16)
