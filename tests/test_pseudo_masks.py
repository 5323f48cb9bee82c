"""Pseudo-masks: thresholds and CRF on hand-made maps, the stage's files, calibration, bad input."""

import json

import h5py
import numpy as np
import pytest
import torch

from weak2full.errors import InvalidInputError, InvalidParameterError
from weak2full.h5 import SCHEMA_VERSION, write_dataset
from weak2full.params import parse_params
from weak2full.pseudo_masks import (
    IGNORE,
    make_pseudo_mask,
    map_peaks,
    raw_mask,
    run,
    trusted_slices,
    upsample_bilinear,
)

SIZE = 32  # image side
S = 16  # map side (upsampled x2 to the image)


def write_cams(
    path, cam, prob, classes, method="heatmap", heatmap_size=None, stride=1, normalisation="sigmoid"
):
    """Write a cams.h5 by the contract of docs/ARCHITECTURE.md (cam float16 (N,K,S,S), prob (N,K))."""
    cam = np.asarray(cam)
    with h5py.File(path, "w") as f:
        f.create_dataset("cam", data=cam.astype(np.float16), chunks=(1,) + cam.shape[1:])
        f.create_dataset("prob", data=np.asarray(prob, dtype=np.float32))
        f.attrs["kind"] = "cams"
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["classes"] = json.dumps(list(classes))
        f.attrs["method"] = method
        f.attrs["heatmap_size"] = int(heatmap_size if heatmap_size is not None else cam.shape[-1])
        f.attrs["stride"] = int(stride)
        f.attrs["normalisation"] = normalisation


def _disc(size, cy, cx, r):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _blob_logits(cy, cx, size=S, peak=4.0, floor=-6.0, width=2.5):
    """A Gaussian bump of logits centred at (cy, cx) in map pixels."""
    yy, xx = np.mgrid[:size, :size]
    g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    return (floor + (peak - floor) * g).astype(np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _head(blob=None):
    """A 32x32 HU slice: brain at 35 HU, a 70 HU blob (a bleed) where ``blob`` is true."""
    img = np.full((SIZE, SIZE), 35, np.int16)
    if blob is not None:
        img[blob] = 70
    return img


CRF = parse_params({}).pseudo_masks.crf


# ------------------------------------------------------------------------------------------ one slice


def test_blob_on_bright_region_becomes_the_mask():
    blob = _disc(SIZE, 12, 20, 4)
    cam = _sigmoid(_blob_logits(6, 10))[None]  # map centre = blob centre / 2
    mask = make_pseudo_mask(cam, np.array([1]), _head(blob), fg=0.5, bg=0.1, crf=CRF)
    fg = mask == 1
    dice = 2 * (fg & blob).sum() / (fg.sum() + blob.sum())
    assert dice > 0.85
    assert not fg[~_disc(SIZE, 12, 20, 8)].any()  # nothing far from the blob
    assert set(np.unique(mask)) <= {0, 1, IGNORE}


def test_flat_map_gives_no_foreground():
    blob = _disc(SIZE, 16, 16, 5)
    flat = np.full((1, S, S), 0.3, np.float32)  # inside the band everywhere: nothing to grow from
    mask = make_pseudo_mask(flat, np.array([1]), _head(blob), fg=0.5, bg=0.1, crf=CRF)
    assert not (mask == 1).any()
    low = np.full((1, S, S), 0.02, np.float32)  # below bg everywhere
    assert (make_pseudo_mask(low, np.array([1]), _head(blob), fg=0.5, bg=0.1, crf=CRF) == 0).all()


def test_ignore_band_lands_where_the_thresholds_say():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    ramp = (xx / (SIZE - 1)).astype(np.float32)[None]  # 0 at the left edge .. 1 at the right
    off = CRF.model_copy(update={"enabled": False})
    mask = make_pseudo_mask(ramp, np.array([1]), _head(), fg=0.6, bg=0.2, crf=off)
    m = ramp[0]
    assert (mask[m < np.float32(0.2)] == 0).all()
    assert (mask[m >= np.float32(0.6)] == 1).all()
    band = (m >= np.float32(0.2)) & (m < np.float32(0.6))
    assert band.any() and (mask[band] == IGNORE).all()
    assert np.array_equal(mask, raw_mask(ramp, np.array([1]), (SIZE, SIZE), 0.6, 0.2))


def test_crf_keeps_the_confident_background_and_ignores_what_it_does_not_claim():
    blob = _disc(SIZE, 16, 16, 4)
    cam = _sigmoid(_blob_logits(8, 8, width=4.0))[None]
    mask = make_pseudo_mask(cam, np.array([1]), _head(blob), fg=0.5, bg=0.1, crf=CRF)
    m = upsample_bilinear(cam, (SIZE, SIZE))[0]
    assert (mask[m < np.float32(0.1)] == 0).all()
    assert (mask[m >= np.float32(0.1)] != 0).all()  # foreground or ignored, never background
    assert (mask == IGNORE).any() and (mask == 1).any()


def test_negative_slice_is_all_background():
    cam = _sigmoid(_blob_logits(8, 8))[None]
    mask = make_pseudo_mask(cam, np.array([0]), _head(_disc(SIZE, 16, 16, 4)), fg=0.5, bg=0.1, crf=CRF)
    assert mask.dtype == np.uint8 and (mask == 0).all()


def test_two_classes_take_the_labelled_one_only():
    cams = np.stack([_sigmoid(_blob_logits(6, 6)), _sigmoid(_blob_logits(10, 10))])
    blob = _disc(SIZE, 20, 20, 4)
    mask = make_pseudo_mask(cams, np.array([0, 1]), _head(blob), fg=0.5, bg=0.1, crf=CRF)
    assert (mask[blob] == 2).mean() > 0.8 and not (mask == 1).any()


def test_upsampling_matches_torch_bilinear():
    maps = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    ours = upsample_bilinear(maps, (13, 9))
    ref = torch.nn.functional.interpolate(torch.from_numpy(maps)[None], size=(13, 9), mode="bilinear")
    np.testing.assert_allclose(ours, ref[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("fg, bg", [(0.3, 0.3), (0.2, 0.5), (1.2, 0.1), (0.5, -0.1)])
def test_impossible_thresholds_are_refused(fg, bg):
    with pytest.raises(InvalidParameterError, match="0 <= bg < fg <= 1"):
        make_pseudo_mask(np.zeros((1, S, S), np.float32), np.array([1]), _head(), fg=fg, bg=bg, crf=CRF)


# ------------------------------------------------------------------------------------------ the stage


def _files(tmp_path, n=10, nan_at=None, normalisation="sigmoid"):
    """dataset.h5 + cams.h5: odd slices carry a blob (labelled, masked), maps point at it, shifted a bit."""
    rng = np.random.default_rng(0)
    image = np.empty((n, SIZE, SIZE), np.int16)
    mask = np.zeros((n, SIZE, SIZE), np.uint8)
    cam = np.full((n, 1, S, S), -6.0, np.float32)
    for i in range(n):
        image[i] = 35 + rng.normal(0, 2, (SIZE, SIZE)).round()
        if i % 2:
            cy, cx, r = 8 + i, 10 + i, 3 + i % 3
            blob = _disc(SIZE, cy, cx, r)
            image[i][blob] += 35
            mask[i][blob] = 1
            cam[i, 0] = _blob_logits(cy / 2 + 0.5, cx / 2 - 0.5, width=1.0 + 0.5 * r)
    if nan_at is not None:
        cam[nan_at, 0, 3, 3] = np.nan
    split = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2][:n] + [0] * max(0, n - 10), np.uint8)
    label = mask.any(axis=(1, 2))[:, None].astype(np.uint8)
    write_dataset(
        tmp_path / "dataset.h5",
        image=image,
        patient=np.arange(n, dtype=np.int32) // 2,
        slice_index=np.arange(n, dtype=np.int32) % 2,
        label=label,
        mask=mask,
        has_mask=split > 0,
        split=split,
        classes=["any"],
        mask_classes=["any"],
        masks_complete=True,
        source="test",
    )
    write_cams(tmp_path / "cams.h5", cam, label.astype(np.float32), ["any"], normalisation=normalisation)
    return tmp_path / "dataset.h5", tmp_path / "cams.h5"


def _params(**pm):
    grid = {"fg_grid": [0.4, 0.6], "bg_grid": [0.1, 0.3], "compat_grid": [3.0, 10.0]}
    base = {"workers": 1, "chunk_size": 3, "calibration": grid}
    return parse_params({"pseudo_masks": base | pm})


def _run(tmp_path, params, dataset, cams, tag="a"):
    out = tmp_path / tag / "pseudo_masks.h5"
    d = tmp_path / tag
    run(params, dataset, cams, out, d / "m.json", d / "cal.json", d / "plots")
    return out


def test_stage_writes_the_contract_and_metrics(tmp_path):
    dataset, cams = _files(tmp_path)
    out = _run(tmp_path, _params(), dataset, cams)
    with h5py.File(out, "r") as f:
        assert f.attrs["kind"] == "pseudo_masks" and json.loads(f.attrs["classes"]) == ["any"]
        assert f["mask"].shape == (10, SIZE, SIZE) and f["mask"].chunks == (1, SIZE, SIZE)
        masks = f["mask"][:]
        assert (masks[::2] == 0).all()  # negative slices
        assert (f["fg_fraction"][1::2] > 0).all()
        np.testing.assert_allclose(f["ignore_fraction"][:], (masks == IGNORE).mean(axis=(1, 2)), rtol=1e-6)
        cal = json.loads((tmp_path / "a" / "cal.json").read_text())
        assert (f.attrs["fg"], f.attrs["bg"], json.loads(f.attrs["crf"])["compat"]) == (
            cal["fg"],
            cal["bg"],
            cal["compat"],
        )
    metrics = json.loads((tmp_path / "a" / "m.json").read_text())
    for split in ("val", "test"):
        for variant in ("raw", "crf"):
            row = metrics[split][variant]
            assert set(row) >= {"dice_pos", "precision", "recall", "fp_slice_rate", "ignore_fraction"}
            assert row["per_class"]["any"]["dice_pos"] == row["dice_pos"]
        assert metrics[split]["crf"]["dice_pos"] > 0.7
        assert metrics[split]["crf"]["fp_slice_rate"] == 0.0
    assert metrics["thresholds"]["mode"] == "calibrated"
    assert (tmp_path / "a" / "plots" / "calibration.png").stat().st_size > 0
    assert (tmp_path / "a" / "plots" / "calibration.csv").read_text().startswith("fg,bg,compat,dice_pos_raw")


def test_output_bytes_do_not_depend_on_worker_count(tmp_path):
    dataset, cams = _files(tmp_path)
    one = _run(tmp_path, _params(workers=1), dataset, cams, "one")
    two = _run(tmp_path, _params(workers=2), dataset, cams, "two")
    assert one.read_bytes() == two.read_bytes()
    assert (tmp_path / "one" / "m.json").read_text() == (tmp_path / "two" / "m.json").read_text()


def test_masks_outside_the_annotated_subset_are_never_read(tmp_path):
    dataset, cams = _files(tmp_path)
    clean = _run(tmp_path, _params(), dataset, cams, "clean")
    with h5py.File(dataset, "r+") as f:
        hidden = ~f["has_mask"][:]
        noise = np.random.default_rng(1).integers(0, 2, (hidden.sum(), SIZE, SIZE))
        f["mask"][np.flatnonzero(hidden)] = noise
    garbage = _run(tmp_path, _params(), dataset, cams, "garbage")
    assert clean.read_bytes() == garbage.read_bytes()
    for name in ("m.json", "cal.json"):
        assert (tmp_path / "clean" / name).read_text() == (tmp_path / "garbage" / name).read_text()


def test_calibration_picks_the_best_grid_point(tmp_path):
    # Radial maps m = 1 - d / 8 on a disc of radius 4: m >= 0.5 is exactly the disc, so the raw Dice
    # peaks at fg = 0.5 among the grid.
    n = 6
    yy, xx = np.mgrid[:SIZE, :SIZE]
    d = np.hypot(yy - 16, xx - 16)
    ramp = np.clip(1.0 - d / 8.0, 0.0, 1.0).astype(np.float32)
    disc = ramp >= np.float32(0.5)
    image = np.where(disc, 70, 35).astype(np.int16)[None].repeat(n, 0)
    mask = disc.astype(np.uint8)[None].repeat(n, 0)
    split = np.array([1, 1, 1, 2, 2, 0], np.uint8)
    write_dataset(
        tmp_path / "dataset.h5",
        image=image,
        patient=np.arange(n, dtype=np.int32),
        slice_index=np.zeros(n, np.int32),
        label=np.ones((n, 1), np.uint8),
        mask=mask,
        has_mask=split > 0,
        split=split,
        classes=["any"],
        mask_classes=["any"],
        masks_complete=True,
        source="test",
    )
    cam = ramp[None, None].repeat(n, 0)
    write_cams(tmp_path / "cams.h5", cam, np.ones((n, 1)), ["any"], normalisation="max")
    grid = {"fg_grid": [0.3, 0.5, 0.7, 0.9], "bg_grid": [0.05, 0.2], "compat_grid": [3.0]}
    params = _params(calibration=grid, crf={"enabled": False}, fg=0.9, bg=0.2)
    _run(tmp_path, params, tmp_path / "dataset.h5", tmp_path / "cams.h5")
    cal = json.loads((tmp_path / "a" / "cal.json").read_text())
    assert cal["fg"] == 0.5 and cal["val_slices"] == 3 and cal["objective"] == "dice_pos_raw"
    best = max(r["dice_pos_raw"] for r in cal["table"])
    assert best == pytest.approx(1.0) and len(cal["table"]) == 8  # every (fg, bg) has fg > bg here
    assert cal["bg"] == 0.2  # a tie in Dice keeps the params' own bg
    with h5py.File(tmp_path / "a" / "pseudo_masks.h5", "r") as f:
        assert np.array_equal(f["mask"][0] == 1, disc)


def test_fixed_thresholds_are_used_as_given(tmp_path):
    dataset, cams = _files(tmp_path)
    out = _run(tmp_path, _params(thresholds="fixed", fg=0.7, bg=0.25, crf={"compat": 4.0}), dataset, cams)
    with h5py.File(out, "r") as f:
        assert (f.attrs["fg"], f.attrs["bg"], f.attrs["thresholds"]) == (0.7, 0.25, "fixed")
        assert json.loads(f.attrs["crf"])["compat"] == 4.0


# ------------------------------------------------------------------------------------------ bad input


def test_peaks_are_the_raw_maximum_over_the_labelled_classes_only():
    cam = np.zeros((3, 2, 4, 4), np.float32)
    cam[:, 0, 1, 1], cam[:, 1, 2, 2] = 5.0, 9.0
    labels = np.array([[1, 0], [1, 1], [0, 0]])
    peaks = map_peaks(cam, labels, chunk_size=2, path="cams.h5")
    assert peaks[:2].tolist() == [5.0, 9.0] and np.isnan(peaks[2])


def test_the_weakest_share_of_labelled_train_slices_is_untrusted_and_the_cutoff_applies_everywhere():
    peaks = np.array([np.nan, 1.0, 2.0, 3.0, 4.0, np.nan, 1.5, 3.5], np.float32)
    labels = (~np.isnan(peaks))[:, None]
    train = np.arange(6)  # rows 6 and 7 are val
    trusted, cutoff = trusted_slices(peaks, labels, train, fraction=0.5)
    assert cutoff == 2.5  # the median of the train peaks 1, 2, 3, 4
    assert trusted.tolist() == [1, 0, 0, 1, 1, 1, 0, 1]  # negatives always trusted
    trusted, cutoff = trusted_slices(peaks, labels, train, fraction=0.0)
    assert trusted.all() and cutoff == -np.inf


def test_stage_marks_a_slice_whose_map_peaks_weakly_untrusted(tmp_path):
    dataset, cams = _files(tmp_path)  # labelled slices 1 and 3 are train, 5 and 7 val, 9 test
    with h5py.File(cams, "r") as f:
        c, p = f["cam"][:].astype(np.float32), f["prob"][:]
    c[1] -= 3.0  # the same map, peaking lower
    c[7] -= 3.0
    _rewrite_cams(cams, cam=c, prob=p)
    out = _run(tmp_path, _params(untrusted_fraction=0.5), dataset, cams)
    with h5py.File(out, "r") as f:
        assert f["trusted"][:].tolist() == [1, 0, 1, 1, 1, 1, 1, 0, 1, 1]
        np.testing.assert_allclose(f["map_peak"][1::2], c[1::2].max(axis=(1, 2, 3)))
        assert np.isnan(f["map_peak"][::2]).all()
        assert f.attrs["trust_cutoff"] == np.quantile(c[[1, 3]].max(axis=(1, 2, 3)), 0.5)
    trust = json.loads((tmp_path / "a" / "m.json").read_text())["trust"]
    assert (trust["train_labelled_slices"], trust["train_untrusted_slices"]) == (2, 1)
    assert trust["val"]["trusted"]["slices"] == 1 and trust["val"]["untrusted"]["slices"] == 1
    assert trust["test"]["untrusted"] == {"slices": 0, "dice_pos": None}
    assert trust["test"]["trusted"]["dice_pos"] > 0.7


def _rewrite_cams(cams, **changes):
    with h5py.File(cams, "r") as f:
        cam, prob = f["cam"][:].astype(np.float32), f["prob"][:]
    args = dict(cam=cam, prob=prob, classes=["any"]) | changes
    write_cams(cams, **args)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c, p: dict(cam=c[:-1], prob=p[:-1]), "holds maps of 9 slices"),
        (lambda c, p: dict(classes=["epidural"]), "common.classes is"),
        (
            lambda c, p: dict(cam=np.concatenate([c, c], 1), prob=np.concatenate([p, p], 1)),
            r"expected \(N, 1, 16, 16\)",
        ),
        (lambda c, p: dict(heatmap_size=8), r"expected \(N, 1, 8, 8\)"),
        (lambda c, p: dict(normalisation="softmax"), "unknown normalisation"),
    ],
)
def test_cams_that_disagree_with_the_dataset_fail_without_output(tmp_path, change, message):
    dataset, cams = _files(tmp_path)
    with h5py.File(cams, "r") as f:
        c, p = f["cam"][:].astype(np.float32), f["prob"][:]
    _rewrite_cams(cams, **change(c, p))
    with pytest.raises(InvalidInputError, match=message):
        _run(tmp_path, _params(), dataset, cams)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


@pytest.mark.parametrize("nan_at", [4, 9])  # a val slice (calibration) and a test slice (main pass)
def test_nan_maps_fail_without_output(tmp_path, nan_at):
    dataset, cams = _files(tmp_path, nan_at=nan_at)
    with pytest.raises(InvalidInputError, match=f"cam of slice {nan_at} holds NaN"):
        _run(tmp_path, _params(), dataset, cams)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_band_with_fg_not_above_bg_is_a_params_error():
    with pytest.raises(InvalidParameterError, match="fg must be greater than bg"):
        parse_params({"pseudo_masks": {"fg": 0.2, "bg": 0.4}})
    with pytest.raises(InvalidParameterError, match="no grid point has fg > bg"):
        parse_params({"pseudo_masks": {"calibration": {"fg_grid": [0.1], "bg_grid": [0.2]}}})


def test_stage_script_reports_bad_input_in_one_line(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "stages" / "pseudo_masks.py"
    spec = importlib.util.spec_from_file_location("stage", script)
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    dataset, cams = _files(tmp_path, nan_at=9)
    (tmp_path / "params.yaml").write_text("pseudo_masks:\n  workers: 1\n")
    argv = ["--params", str(tmp_path / "params.yaml"), "--dataset", str(dataset), "--cams", str(cams)]
    argv += ["--out", str(tmp_path / "o.h5"), "--metrics", str(tmp_path / "m.json")]
    argv += ["--calibration", str(tmp_path / "c.json")]
    with pytest.raises(SystemExit) as exc:
        stage.main(argv)
    assert exc.value.code == 2
    assert "pseudo_masks: error:" in capsys.readouterr().err and not (tmp_path / "o.h5").exists()
