"""Known-answer tests of weak2full.metrics (SMP style: exact scores on hand-made masks)."""

import numpy as np
import pytest

from weak2full.errors import InvalidInputError
from weak2full.metrics import (
    binary_stats,
    classification_metrics,
    dice_per_slice,
    dice_vs_threshold,
    hd95_per_slice,
    bootstrap_interval,
    iou_per_slice,
    patient_resamples,
    point_hits,
    score_method,
    score_multiclass,
)

H = W = 16


def masks(*boxes):
    """One (H, W) slice per box (y0, y1, x0, x1); None gives an empty slice."""
    out = np.zeros((len(boxes), H, W), dtype=bool)
    for i, box in enumerate(boxes):
        if box is not None:
            y0, y1, x0, x1 = box
            out[i, y0:y1, x0:x1] = True
    return out


def ids(n, patient=None):
    return (np.zeros(n, int) if patient is None else np.asarray(patient)), np.arange(n)


# ----------------------------------------------------------------------------------------- per slice


@pytest.mark.parametrize(
    "pred_box, truth_box, dice, iou",
    [
        ((2, 6, 2, 6), (2, 6, 2, 6), 1.0, 1.0),  # identical
        ((0, 4, 0, 4), (8, 12, 8, 12), 0.0, 0.0),  # disjoint
        ((0, 4, 0, 4), (0, 4, 0, 8), 2 / 3, 0.5),  # prediction covers half of the truth
        ((0, 4, 0, 6), (0, 4, 2, 8), 2 / 3, 0.5),  # half overlap both ways
        (None, None, 1.0, 1.0),  # empty truth, empty prediction: agreement
        ((0, 2, 0, 2), None, 0.0, 0.0),  # empty truth with a prediction: a false positive
        (None, (0, 2, 0, 2), 0.0, 0.0),  # missed bleed
    ],
)
def test_dice_and_iou_known_answers(pred_box, truth_box, dice, iou):
    pred, truth = masks(pred_box), masks(truth_box)
    assert dice_per_slice(pred, truth)[0] == pytest.approx(dice)
    assert iou_per_slice(pred, truth)[0] == pytest.approx(iou)


def test_binary_stats_counts_and_ignore():
    pred, truth = masks((0, 4, 0, 4)), masks((0, 4, 2, 6))
    tp, fp, fn = binary_stats(pred, truth)
    assert (tp[0], fp[0], fn[0]) == (8, 8, 8)
    ignore = masks((0, 4, 0, 2))  # hides the false positives
    tp, fp, fn = binary_stats(pred, truth, ignore)
    assert (tp[0], fp[0], fn[0]) == (8, 0, 8)
    assert dice_per_slice(pred, truth, ignore)[0] == pytest.approx(2 * 8 / (2 * 8 + 8))


def test_all_ignored_slice_is_empty_vs_empty_and_not_scored():
    pred, truth = masks((0, 4, 0, 4)), masks((0, 8, 0, 8))
    ignore = np.ones_like(truth)
    assert dice_per_slice(pred, truth, ignore)[0] == 1.0
    p, s = ids(1)
    with pytest.raises(InvalidInputError, match="nothing to score: 1 slices given and every pixel"):
        score_method(pred, truth, p, s, ignore=ignore)


def test_masks_are_checked():
    with pytest.raises(InvalidInputError, match="pred has shape"):
        dice_per_slice(np.zeros((1, 4, 4), bool), np.zeros((1, 5, 5), bool))
    with pytest.raises(InvalidInputError, match="must hold only 0 and 1"):
        dice_per_slice(np.full((1, 4, 4), 255, np.uint8), np.zeros((1, 4, 4), bool))
    with pytest.raises(InvalidInputError, match=r"must be a stack of masks \(N, H, W\)"):
        dice_per_slice(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    # integer 0/1 masks are accepted as bool
    assert dice_per_slice(np.ones((1, 4, 4), np.uint8), np.ones((1, 4, 4), np.uint8))[0] == 1.0


@pytest.mark.parametrize("shift", [1, 3, 5])
def test_hd95_of_shifted_squares_is_the_shift(shift):
    a = np.zeros((1, 40, 40), bool)
    a[0, 10:20, 10:20] = True
    b = np.zeros_like(a)
    b[0, 10:20, 10 + shift : 20 + shift] = True
    assert hd95_per_slice(a, b)[0] == pytest.approx(shift)
    assert hd95_per_slice(b, a)[0] == pytest.approx(shift)  # symmetric


def test_hd95_is_nan_per_slice_when_a_mask_is_empty():
    out = hd95_per_slice(masks((0, 4, 0, 4), None), masks(None, (0, 4, 0, 4)))
    assert np.isnan(out).all()


def test_point_hits_scales_the_argmax_to_the_mask():
    truth = masks((8, 12, 8, 12), (8, 12, 8, 12))
    heat = np.zeros((2, 4, 4))
    heat[0, 2, 2] = 1.0  # cell (2, 2) of 4x4 covers pixels 8..11: inside
    heat[1, 0, 3] = 1.0  # top right: outside
    assert point_hits(heat, truth).tolist() == [True, False]
    with pytest.raises(InvalidInputError, match="heatmap must be"):
        point_hits(np.zeros((3, 4, 4)), truth)


# -------------------------------------------------------------------------------------- score_method


def test_score_method_known_answers():
    # slice 0: perfect; slice 1: half (dice 2/3); slice 2: negative, clean; slice 3: negative with a FP.
    truth = masks((0, 4, 0, 4), (0, 4, 0, 8), None, None)
    pred = masks((0, 4, 0, 4), (0, 4, 0, 4), None, (0, 1, 0, 1))
    heat = np.zeros((4, 16, 16))
    heat[0, 1, 1] = heat[1, 10, 10] = 1.0  # inside on slice 0, outside on slice 1
    out = score_method(pred, truth, np.array([1, 1, 2, 2]), np.arange(4), heatmap=heat)
    assert out["dice_pos"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert out["iou_pos"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["fp_slice_rate"] == pytest.approx(0.5)
    assert out["point_acc"] == pytest.approx(0.5)
    assert out["hd95"] is not None and out["hd95"] > 0
    # patient 1 stacks slices 0 and 1: tp 32, fn 16 -> 64 / 80; patient 2 has no truth.
    assert out["dice_patient"] == pytest.approx(64 / 80)
    assert {k: out[k] for k in ("n_slices", "n_pos", "n_neg", "n_patients")} == {
        "n_slices": 4, "n_pos": 2, "n_neg": 2, "n_patients": 2,
    }


def test_dice_patient_differs_from_the_slice_mean():
    # One patient: a large perfect slice and a small missed one. Slice mean 0.5, volume Dice near 1.
    truth = masks((0, 10, 0, 10), (0, 1, 0, 1))
    pred = masks((0, 10, 0, 10), None)
    out = score_method(pred, truth, *ids(2))
    assert out["dice_pos"] == pytest.approx(0.5)
    assert out["dice_patient"] == pytest.approx(200 / 201)
    assert out["hd95"] == 0.0  # only the first slice has both masks


def test_score_method_without_positives_or_negatives_gives_none_not_nan():
    neg = score_method(masks(None, (0, 1, 0, 1)), masks(None, None), *ids(2), heatmap=np.zeros((2, 4, 4)))
    assert neg["dice_pos"] is None and neg["dice_patient"] is None and neg["hd95"] is None
    assert neg["point_acc"] is None
    assert neg["fp_slice_rate"] == 0.5
    pos = score_method(masks((0, 2, 0, 2)), masks((0, 2, 0, 2)), *ids(1))
    assert pos["fp_slice_rate"] is None and "point_acc" not in pos


def test_empty_subset_and_duplicates_raise():
    empty = np.zeros((0, H, W), bool)
    with pytest.raises(InvalidInputError, match=r"nothing to score: the annotated subset is empty"):
        score_method(empty, empty, np.zeros(0), np.zeros(0))
    with pytest.raises(InvalidInputError, match=r"the same \(patient, slice\) pair occurs more than once"):
        score_method(masks(None, None), masks(None, None), np.array([3, 3]), np.array([1, 1]))
    with pytest.raises(InvalidInputError, match=r"patient has shape \(3,\), expected \(2,\)"):
        score_method(masks(None, None), masks(None, None), np.zeros(3), np.arange(2))


# ---------------------------------------------------------------------------------------- multiclass


def test_score_multiclass_per_class_and_any():
    classes = ["any", "epidural", "subdural"]
    mask_classes = ["epidural", "subdural"]
    truth = np.zeros((2, H, W), np.uint8)
    truth[0, 0:4, 0:4] = 1  # epidural
    truth[1, 8:12, 8:12] = 2  # subdural
    pred = np.zeros_like(truth)
    pred[0, 0:4, 0:4] = 3  # right place, wrong class (subdural)
    pred[1, 8:12, 8:12] = 3  # subdural, right
    pred[1, 0:2, 0:2] = 255  # unlabeled band: background
    out = score_multiclass(pred, truth, *ids(2), classes=classes, mask_classes=mask_classes)
    assert out["dice_pos"] == 1.0  # any: the union is perfect
    assert set(out["per_class"]) == {"any", "epidural", "subdural"}
    assert out["per_class"]["any"]["dice_pos"] == 1.0
    assert out["per_class"]["epidural"]["dice_pos"] == 0.0
    assert out["per_class"]["subdural"]["dice_pos"] == 1.0
    assert out["per_class"]["subdural"]["fp_slice_rate"] == 1.0  # slice 0 has no subdural truth


def test_score_multiclass_skips_classes_the_masks_cannot_score():
    truth = masks((0, 4, 0, 4)).astype(np.uint8)
    pred = (truth * 2).astype(np.uint8)  # predicted as class 2 = epidural
    heat = np.zeros((1, 2, 4, 4))
    heat[0, 0, 3, 3] = 1.0  # the `any` map points outside the bleed
    heat[0, 1, 0, 0] = 1.0  # the epidural map points into it
    out = score_multiclass(
        pred, truth, *ids(1), classes=["any", "epidural"], mask_classes=["any"], heatmap=heat
    )
    assert set(out["per_class"]) == {"any"}  # masks of one class `any` cannot score epidural
    assert out["dice_pos"] == 1.0
    assert out["point_acc"] == 0.0  # `any` is scored with its own map
    out = score_multiclass(truth, truth, *ids(1), classes=["epidural"], mask_classes=["any"],
                           heatmap=heat[:, 1:])
    assert out["point_acc"] == 1.0  # no `any` map: the max over class maps
    with pytest.raises(InvalidInputError, match=r"pred_labels holds values \[7\] outside 0..2"):
        score_multiclass(np.full_like(truth, 7), truth, *ids(1), classes=["any", "epidural"],
                         mask_classes=["any"])


# ------------------------------------------------------------------------------ curves, classification


def test_dice_vs_threshold_records():
    truth = masks((0, 4, 0, 4), None)
    prob = np.zeros((2, H, W))
    prob[0, 0:4, 0:4] = 0.8
    prob[0, 0:4, 4:8] = 0.4
    prob[1, 0:1, 0:1] = 0.4
    rec = dice_vs_threshold(prob, truth, [0.3, 0.5, 0.9])
    assert [r["threshold"] for r in rec] == [0.3, 0.5, 0.9]
    assert rec[0]["dice_pos"] == pytest.approx(2 / 3) and rec[0]["fp_slice_rate"] == 1.0
    assert rec[1]["dice_pos"] == 1.0 and rec[1]["fp_slice_rate"] == 0.0
    assert rec[2]["dice_pos"] == 0.0 and rec[2]["iou_pos"] == 0.0


def test_classification_metrics_macro_over_defined_classes():
    label = np.array([[1, 0], [1, 0], [0, 0], [0, 0]])
    prob = np.array([[0.9, 0.1], [0.2, 0.2], [0.3, 0.3], [0.1, 0.4]])
    out = classification_metrics(prob, label, ["any", "epidural"])
    assert out["per_class"]["any"]["auroc"] == pytest.approx(0.75)
    assert out["per_class"]["epidural"] == {"auroc": None, "ap": None, "n_pos": 0, "n_neg": 4}
    assert out["auroc"] == pytest.approx(0.75)  # epidural has no positives: left out of the mean
    assert out["ap"] == pytest.approx(out["per_class"]["any"]["ap"])
    with pytest.raises(InvalidInputError, match="nothing to score"):
        classification_metrics(np.zeros((0, 2)), np.zeros((0, 2)), ["any", "epidural"])


@pytest.mark.parametrize(
    "grid, message",
    [([], "non-empty list of probabilities in \\(0, 1\\)"), ([0.5, 1.0], "in \\(0, 1\\)"),
     ([0.5, 0.3], "must be strictly increasing")],
)
def test_evaluate_threshold_grid_is_validated(grid, message):
    from weak2full.errors import InvalidParameterError
    from weak2full.params import parse_params

    with pytest.raises(InvalidParameterError, match="The 'evaluate.threshold_grid' parameter .*" + message):
        parse_params({"evaluate": {"threshold_grid": grid}})


def test_cascade_gate_is_the_strictest_that_keeps_the_val_dice():
    from weak2full.evaluate import _gate_on_val

    truth = np.zeros((4, 8, 8), bool)
    truth[0, 2:4, 2:4] = truth[1, 5:7, 5:7] = True
    pred = truth.copy()  # both bleeds found exactly ...
    pred[2, 0, 0] = pred[3, 7, 7] = True  # ... and a speck on each negative slice
    slice_prob = np.array([0.95, 0.9, 0.05, 0.3])
    # Any gate in (0.3, 0.9] clears both negatives and keeps both bleeds; 0.9 is the strictest.
    assert _gate_on_val(pred, slice_prob, truth, 1.0) == (0.9, {"dice_pos": 1.0, "fp_slice_rate": 0.0})
    # A bleed the classifier doubts (0.2): keeping all the Dice keeps the 0.3 speck too ...
    doubted = np.array([0.95, 0.2, 0.05, 0.3])
    assert _gate_on_val(pred, doubted, truth, 1.0) == (0.2, {"dice_pos": 1.0, "fp_slice_rate": 0.5})
    # ... while giving up half of it buys clean negatives.
    assert _gate_on_val(pred, doubted, truth, 0.5) == (0.95, {"dice_pos": 0.5, "fp_slice_rate": 0.0})
    # No positive slice on val: nothing to keep, no gate.
    assert _gate_on_val(pred[2:], slice_prob[2:], truth[2:], 0.95) == (0.0, {})


def test_val_threshold_is_the_highest_within_the_tolerance_of_the_best_dice():
    from weak2full.evaluate import _threshold_on_val

    truth = np.zeros((3, 8, 8), bool)
    truth[0, 1:5, 1:5] = truth[1, 3:7, 3:7] = True
    prob = np.where(truth, 0.95, 0.0)
    prob[0, 7, 7] = 0.45  # slice 0: a stray pixel below 0.5 (Dice 0.970 up to t = 0.4, then 1)
    prob[1, 3, 3] = 0.45  # slice 1: a bleed pixel below 0.5 (Dice 1 up to t = 0.4, then 0.968)
    prob[2, 4, 4] = 0.55  # a speck on the negative slice up to t = 0.5
    grid = [round(0.1 * i, 1) for i in range(1, 10)]
    # dice_pos 0.9848 up to 0.4, then 0.9839: the best is 0.4 (ties go up) ...
    assert _threshold_on_val(prob, truth, grid, 0.5)[0] == 0.4
    # ... and within 0.01 of it, 0.9 is the highest: the same Dice without the speck.
    t, curve = _threshold_on_val(prob, truth, grid, 0.5, tolerance=0.01)
    assert t == 0.9 and [r["fp_slice_rate"] for r in curve][4:6] == [1.0, 0.0]
    assert _threshold_on_val(prob[2:], truth[2:], grid, 0.5, tolerance=0.01) == (0.5, [])  # no positive


def test_patient_resamples_draw_whole_patients():
    patient = np.array([5, 5, 5, 9, 2, 2])
    w = patient_resamples(patient, 500, seed=0)
    assert w.shape == (500, 6)
    # Every slice of a patient carries that patient's count, and each resample draws three patients.
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    assert (w[:, [0, 3, 4]].sum(axis=1) == 3).all()
    assert np.array_equal(w, patient_resamples(patient, 500, seed=0))
    with pytest.raises(InvalidInputError, match="non-empty"):
        patient_resamples(np.array([]), 10, seed=0)


def test_bootstrap_interval_of_a_mean_and_of_a_paired_ratio():
    # Two patients: one whose slices all score 1.0, one whose slices all score 0.0.
    patient = np.array([0, 0, 1, 1])
    dice = np.array([1.0, 1.0, 0.0, 0.0])
    w = patient_resamples(patient, 2000, seed=1)
    ci = bootstrap_interval(dice, w)
    assert ci == {"low": 0.0, "high": 1.0}  # draws of (0, 0) and (1, 1) each happen a quarter of the time
    # Hand-computed weights: the resampled means are 1/2, 1 and 0.
    w = np.array([[1.0, 1, 1, 1], [2, 2, 0, 0], [0, 0, 2, 2]])
    assert bootstrap_interval(dice, w, level=0.0) == {"low": 0.5, "high": 0.5}
    # Paired ratio: the same network on both sides is 1 on every resample.
    assert bootstrap_interval(dice + 0.5, w, baseline=dice + 0.5) == {"low": 1.0, "high": 1.0}
    ratio = bootstrap_interval(np.array([0.5, 0.5, 0.2, 0.2]), w, level=0.0, baseline=dice + 0.5)
    assert ratio["low"] == pytest.approx(0.7 / 2.0)  # median of 0.35, 0.333 and 0.4
    # A resample whose baseline sums to zero leaves the ratio undefined.
    assert bootstrap_interval(dice, w, baseline=dice) is None

