"""Segmentation and classification metrics of the evaluate stage (names are DESIGN.md's contract).

A functional core in the shape of ``smp.metrics``: first per-slice counts (:func:`binary_stats`), then
scores built from them. Everything takes numpy arrays and returns plain Python numbers, so a result
dict goes straight into ``metrics/evaluate.json``.

Conventions (chosen so that no score is ever NaN):

* A *slice* is one (H, W) mask. A slice is **positive** when its truth has a foreground pixel outside
  ``ignore``, **negative** otherwise. Slices whose every pixel is ignored are not scored at all.
* Per-slice Dice is ``2tp / (2tp + fp + fn)`` and IoU ``tp / (tp + fp + fn)``, counted over pixels
  outside ``ignore``. When truth and prediction are both empty the slice scores **1.0** (nothing to
  find, nothing predicted); an empty truth with any predicted pixel scores 0.0.
* A metric whose subset is empty (``dice_pos`` on a set without positive slices, ``fp_slice_rate`` on a
  set without negative ones, ``hd95`` when no slice has both masks non-empty) is ``None`` (JSON
  ``null``), not NaN. A set with no scorable slice at all raises :class:`InvalidInputError`.
* Distances (``hd95``) are in pixels of the mask grid.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from weak2full.errors import InvalidInputError
from weak2full.h5 import truth_mask

__all__ = [
    "binary_stats",
    "dice_per_slice",
    "dice_pos_and_fp_rate",
    "iou_per_slice",
    "hd95_per_slice",
    "point_hits",
    "score_method",
    "score_multiclass",
    "classification_metrics",
    "dice_vs_threshold",
    "patient_resamples",
    "bootstrap_interval",
]

# pred_labels value of a pseudo-mask pixel left unlabeled by the CRF band: scored as background,
# because it is no claim of foreground.
UNLABELED = 255


# ------------------------------------------------------------------------------------------- checks


def _as_masks(name: str, arr, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Return ``arr`` as a bool (N, H, W) array; accept bool or integer 0/1 arrays only."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise InvalidInputError(f"{name} must be a stack of masks (N, H, W), got shape {arr.shape}.")
    if shape is not None and arr.shape != shape:
        raise InvalidInputError(f"{name} has shape {arr.shape}, expected {shape} like the truth.")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidInputError(f"{name} must be bool or integer 0/1, got dtype {arr.dtype}.")
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise InvalidInputError(
                f"{name} must hold only 0 and 1, found values in [{arr.min()}, {arr.max()}]; "
                "threshold probabilities or pick one class first."
            )
        arr = arr.astype(bool)
    return arr


def _vector(name: str, arr, n: int) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.shape != (n,):
        raise InvalidInputError(f"{name} has shape {arr.shape}, expected ({n},): one value per slice.")
    return arr


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


# ---------------------------------------------------------------------------------------- per slice


def binary_stats(pred, truth, ignore=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice true positive, false positive and false negative pixel counts.

    Args:
        pred: predicted foreground, bool (N, H, W).
        truth: true foreground, bool (N, H, W).
        ignore: pixels left out of every count, bool (N, H, W), or None.

    Returns:
        ``(tp, fp, fn)``, each int64 (N,).
    """
    truth = _as_masks("truth", truth)
    pred = _as_masks("pred", pred, truth.shape)
    if ignore is not None:
        keep = ~_as_masks("ignore", ignore, truth.shape)
        pred, truth = pred & keep, truth & keep
    axes = (1, 2)
    tp = np.count_nonzero(pred & truth, axis=axes).astype(np.int64)
    fp = np.count_nonzero(pred & ~truth, axis=axes).astype(np.int64)
    fn = np.count_nonzero(~pred & truth, axis=axes).astype(np.int64)
    return tp, fp, fn


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0/0 = 1.0 (both masks empty: perfect agreement)."""
    out = np.ones(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def dice_per_slice(pred, truth, ignore=None) -> np.ndarray:
    """Dice of each slice, ``2tp / (2tp + fp + fn)``; 1.0 where truth and prediction are both empty.

    Shapes: pred, truth, ignore bool (N, H, W) -> float64 (N,). Never NaN.
    """
    tp, fp, fn = binary_stats(pred, truth, ignore)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def dice_pos_and_fp_rate(pred, truth) -> tuple[float, float]:
    """One class over a set of slices: ``dice_pos``, the mean Dice over the slices whose truth holds it,
    and ``fp_slice_rate``, the share of the other slices with any predicted pixel. NaN where there is no
    such slice. pred, truth bool (N, H, W). The quick pair that model selection needs each epoch.
    """
    pos = np.asarray(truth).any(axis=(1, 2))
    pred = np.asarray(pred)
    dice = float(dice_per_slice(pred[pos], truth[pos]).mean()) if pos.any() else float("nan")
    fp = float(pred[~pos].any(axis=(1, 2)).mean()) if (~pos).any() else float("nan")
    return dice, fp


def iou_per_slice(pred, truth, ignore=None) -> np.ndarray:
    """IoU (Jaccard) of each slice, ``tp / (tp + fp + fn)``; 1.0 where both are empty. (N,) float64."""
    tp, fp, fn = binary_stats(pred, truth, ignore)
    return _ratio(tp, tp + fp + fn)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2-D mask: foreground pixels with a background 4-neighbour (or the edge)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _hd95(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = _surface(a), _surface(b)
    # distance_transform_edt measures the distance to the nearest zero, so invert the surfaces.
    to_b = ndimage.distance_transform_edt(~sb)
    to_a = ndimage.distance_transform_edt(~sa)
    distances = np.concatenate([to_b[sa], to_a[sb]])
    return float(np.percentile(distances, 95))


def hd95_per_slice(pred, truth, ignore=None) -> np.ndarray:
    """Symmetric 95th-percentile Hausdorff distance of each slice, in pixels.

    The distances from every boundary pixel of the prediction to the truth's boundary and back are
    pooled and their 95th percentile taken (the medpy ``hd95`` definition). Slices where either mask is
    empty (after ``ignore``) have no distance: their entry is NaN, and :func:`score_method` leaves them
    out of its mean.

    Shapes: pred, truth, ignore bool (N, H, W) -> float64 (N,).
    """
    truth = _as_masks("truth", truth)
    pred = _as_masks("pred", pred, truth.shape)
    if ignore is not None:
        keep = ~_as_masks("ignore", ignore, truth.shape)
        pred, truth = pred & keep, truth & keep
    out = np.full(truth.shape[0], np.nan)
    for i in range(truth.shape[0]):
        if pred[i].any() and truth[i].any():
            out[i] = _hd95(pred[i], truth[i])
    return out


def point_hits(heatmap, truth, ignore=None) -> np.ndarray:
    """Whether each slice's heatmap argmax falls inside its truth mask (the PYLON pointing game).

    The argmax cell (i, j) of an (S, S) map is mapped to the mask pixel under its centre,
    ``(floor((i + 0.5) * H / S), floor((j + 0.5) * W / S))``, so maps coarser or finer than the mask
    are handled alike. A point on an ignored pixel is a miss.

    Args:
        heatmap: (N, S, S') float maps, any scale (only the argmax matters).
        truth: bool (N, H, W).
        ignore: bool (N, H, W) or None.

    Returns:
        bool (N,).
    """
    truth = _as_masks("truth", truth)
    heatmap = np.asarray(heatmap)
    if heatmap.ndim != 3 or heatmap.shape[0] != truth.shape[0]:
        raise InvalidInputError(
            f"heatmap must be (N, S, S) with N={truth.shape[0]} like the truth, got shape {heatmap.shape}."
        )
    if ignore is not None:
        truth = truth & ~_as_masks("ignore", ignore, truth.shape)
    n, s_h, s_w = heatmap.shape
    h, w = truth.shape[1:]
    flat = heatmap.reshape(n, -1)
    if n and not np.isfinite(flat).all():
        raise InvalidInputError("heatmap holds NaN or infinite values.")
    i, j = np.unravel_index(np.argmax(flat, axis=1), (s_h, s_w))
    y = np.minimum(((i + 0.5) * h / s_h).astype(np.int64), h - 1)
    x = np.minimum(((j + 0.5) * w / s_w).astype(np.int64), w - 1)
    return truth[np.arange(n), y, x]


# ----------------------------------------------------------------------------------------- one class


def score_method(pred, truth, patient, slice_ids, ignore=None, heatmap=None) -> dict:
    """Every DESIGN metric of one method for one class, over one set of annotated slices.

    Args:
        pred: predicted foreground of the class, bool (N, H, W).
        truth: true foreground of the class, bool (N, H, W).
        patient: (N,) patient id of each slice.
        slice_ids: (N,) slice index within its patient; (patient, slice) pairs must be unique, so a
            slice cannot be scored twice by mistake.
        ignore: bool (N, H, W) pixels left out of every count, or None.
        heatmap: (N, S, S) map of the class, or None; gives ``point_acc``.

    Returns:
        ``dice_pos``, ``iou_pos`` (means over positive slices), ``dice_patient`` (Dice of each patient's
        stacked slices, averaged over patients with any true foreground), ``fp_slice_rate`` (share of
        negative slices with any predicted foreground), ``hd95`` (mean over slices where both masks are
        non-empty, pixels), ``point_acc`` (only with a heatmap: share of positive slices whose map argmax
        is inside the truth), and the counts ``n_slices``, ``n_pos``, ``n_neg``, ``n_patients``.
        Undefined means are ``None`` (see the module docstring).

    Raises:
        InvalidInputError: on mismatched shapes, duplicate slices, or nothing to score.
    """
    truth = _as_masks("truth", truth)
    pred = _as_masks("pred", pred, truth.shape)
    n = truth.shape[0]
    patient = _vector("patient", patient, n)
    slice_ids = _vector("slice_ids", slice_ids, n)
    if ignore is not None:
        ignore = _as_masks("ignore", ignore, truth.shape)
        keep = ~ignore
        scored = keep.any(axis=(1, 2))  # a fully ignored slice carries no evidence either way
        pred, truth = pred & keep, truth & keep
    else:
        scored = np.ones(n, dtype=bool)
    if not scored.any():
        raise InvalidInputError(
            f"nothing to score: {n} slices given and every pixel of them is ignored."
            if n
            else "nothing to score: the annotated subset is empty (0 slices)."
        )
    pairs = np.stack([patient, slice_ids], axis=1)
    if np.unique(pairs, axis=0).shape[0] != n:
        raise InvalidInputError(
            "the same (patient, slice) pair occurs more than once; each slice is scored once."
        )

    pred, truth, patient = pred[scored], truth[scored], patient[scored]
    tp, fp, fn = binary_stats(pred, truth)
    pos = truth.any(axis=(1, 2))
    neg = ~pos
    has_pred = pred.any(axis=(1, 2))

    # Per-patient Dice: sum the counts over each patient's slices (= Dice of the stacked volume).
    pos_patients = np.unique(patient[pos])
    patient_dice = []
    for p in pos_patients:
        sel = patient == p
        t, f_p, f_n = tp[sel].sum(), fp[sel].sum(), fn[sel].sum()
        patient_dice.append(2 * t / (2 * t + f_p + f_n))

    both = pos & has_pred
    hd = np.array([_hd95(pred[i], truth[i]) for i in np.flatnonzero(both)])

    out = {
        "dice_pos": _mean_or_none(_ratio(2 * tp, 2 * tp + fp + fn)[pos]),
        "iou_pos": _mean_or_none(_ratio(tp, tp + fp + fn)[pos]),
        "dice_patient": _mean_or_none(np.asarray(patient_dice, dtype=np.float64)),
        "fp_slice_rate": _mean_or_none(has_pred[neg].astype(np.float64)),
        "hd95": _mean_or_none(hd),
    }
    if heatmap is not None:
        heatmap = np.asarray(heatmap)
        if heatmap.ndim != 3 or heatmap.shape[0] != n:
            raise InvalidInputError(f"heatmap must be (N, S, S) with N={n}, got shape {heatmap.shape}.")
        hits = point_hits(heatmap[scored], truth)
        out["point_acc"] = _mean_or_none(hits[pos].astype(np.float64))
    out.update(
        n_slices=int(scored.sum()),
        n_pos=int(pos.sum()),
        n_neg=int(neg.sum()),
        n_patients=int(np.unique(patient).size),
    )
    return out


# --------------------------------------------------------------------------------------- all classes


def score_multiclass(
    pred_labels,
    truth_labels,
    patient,
    slice_ids,
    classes: Sequence[str],
    mask_classes: Sequence[str],
    ignore=None,
    heatmap=None,
) -> dict:
    """Score a label map: class ``any`` at the top level, every scorable class under ``per_class``.

    Args:
        pred_labels: uint8 (N, H, W), 0 background, k = ``classes[k-1]``; 255 (a pseudo-mask's unlabeled
            band) counts as background.
        truth_labels: uint8 (N, H, W), 0 background, k = ``mask_classes[k-1]`` (dataset.h5 ``mask``).
        patient, slice_ids: (N,) as in :func:`score_method`.
        classes: names of the predicted classes (``common.classes``).
        mask_classes: names of the truth values (the dataset's ``mask_classes`` attribute).
        ignore: bool (N, H, W) or None.
        heatmap: (N, len(classes), S, S) class maps, or None. ``any`` uses its own map when ``any`` is
            among ``classes``, else the pixelwise maximum over the class maps.

    Returns:
        ``score_method``'s dict for ``any`` (predicted: any class; truth: any mask value) plus
        ``per_class``: ``{class: score_method dict}`` for each class of ``classes`` that the masks can
        score. A class is skipped when the masks outline every bleed as one ``any`` class, or when it is
        not among ``mask_classes``.
    """
    classes = list(classes)
    pred_labels = np.asarray(pred_labels)
    truth_labels = np.asarray(truth_labels)
    if pred_labels.ndim != 3 or pred_labels.shape != truth_labels.shape:
        raise InvalidInputError(
            f"pred_labels {pred_labels.shape} and truth_labels {truth_labels.shape} must both be (N, H, W)."
        )
    valid = (pred_labels <= len(classes)) | (pred_labels == UNLABELED)
    if not valid.all():
        bad = np.unique(pred_labels[~valid])[:5].tolist()
        raise InvalidInputError(
            f"pred_labels holds values {bad} outside 0..{len(classes)} (and {UNLABELED}) "
            f"for the classes {classes}."
        )
    if int(truth_labels.max(initial=0)) > len(mask_classes):
        raise InvalidInputError(
            f"truth_labels go up to {int(truth_labels.max())} but there are {len(mask_classes)} mask classes "
            f"{list(mask_classes)}."
        )
    maps = None
    if heatmap is not None:
        maps = np.asarray(heatmap)
        if maps.ndim != 4 or maps.shape[:2] != (pred_labels.shape[0], len(classes)):
            raise InvalidInputError(
                f"heatmap must be (N, K, S, S) with N={pred_labels.shape[0]} and K={len(classes)} "
                f"classes, got shape {maps.shape}."
            )

    def class_map(k: int | None):
        if maps is None:
            return None
        return maps.max(axis=1) if k is None else maps[:, k]

    pred_any = (pred_labels > 0) & (pred_labels != UNLABELED)
    any_k = classes.index("any") if "any" in classes else None
    out = score_method(pred_any, truth_labels > 0, patient, slice_ids, ignore, class_map(any_k))
    per_class = {}
    for k, cls in enumerate(classes):
        if cls == "any":
            per_class[cls] = {key: v for key, v in out.items()}
            continue
        if list(mask_classes) == ["any"] or cls not in mask_classes:
            continue
        truth = truth_mask(truth_labels, mask_classes, cls)
        per_class[cls] = score_method(pred_labels == k + 1, truth, patient, slice_ids, ignore, class_map(k))
    out["per_class"] = per_class
    return out


# ------------------------------------------------------------------------------------ classification


def classification_metrics(prob, label, classes: Sequence[str]) -> dict:
    """Image-level AUROC and average precision, macro-averaged over classes where both labels occur.

    Args:
        prob: (N, K) predicted probabilities (or any monotone score).
        label: (N, K) 0/1 image labels.
        classes: the K class names.

    Returns:
        ``{"auroc", "ap", "per_class": {class: {"auroc", "ap", "n_pos", "n_neg"}}}``; a class with only
        one label value present has ``auroc``/``ap`` None and is left out of the macro means (which are
        None when no class qualifies).
    """
    classes = list(classes)
    prob = np.asarray(prob, dtype=np.float64)
    label = np.asarray(label)
    if prob.ndim != 2 or prob.shape[1] != len(classes) or label.shape != prob.shape:
        raise InvalidInputError(
            f"prob {prob.shape} and label {label.shape} must both be (N, {len(classes)}) "
            f"for classes {classes}."
        )
    if prob.shape[0] == 0:
        raise InvalidInputError("nothing to score: no slices given for the classification metrics.")
    if not np.isfinite(prob).all():
        raise InvalidInputError("prob holds NaN or infinite values.")
    per_class = {}
    aurocs, aps = [], []
    for k, cls in enumerate(classes):
        y = label[:, k] > 0
        n_pos = int(y.sum())
        entry = {"auroc": None, "ap": None, "n_pos": n_pos, "n_neg": int(y.size - n_pos)}
        if 0 < n_pos < y.size:
            entry["auroc"] = float(roc_auc_score(y, prob[:, k]))
            entry["ap"] = float(average_precision_score(y, prob[:, k]))
            aurocs.append(entry["auroc"])
            aps.append(entry["ap"])
        per_class[cls] = entry
    return {
        "auroc": _mean_or_none(np.asarray(aurocs)),
        "ap": _mean_or_none(np.asarray(aps)),
        "per_class": per_class,
    }


# ------------------------------------------------------------------------------------------- curves


def dice_vs_threshold(prob_map, truth, thresholds: Sequence[float], ignore=None) -> list[dict]:
    """``dice_pos``, ``iou_pos`` and ``fp_slice_rate`` of ``prob_map >= t`` for each threshold t.

    Args:
        prob_map: (N, H, W) foreground probabilities in 0..1.
        truth: bool (N, H, W).
        thresholds: the probabilities to cut at.
        ignore: bool (N, H, W) or None.

    Returns:
        One record per threshold, in the given order:
        ``[{"threshold": t, "dice_pos": ..., "iou_pos": ..., "fp_slice_rate": ...}, ...]`` (a plot's rows).
    """
    truth = _as_masks("truth", truth)
    prob_map = np.asarray(prob_map)
    if prob_map.shape != truth.shape:
        raise InvalidInputError(
            f"prob_map has shape {prob_map.shape}, expected {truth.shape} like the truth."
        )
    if not len(thresholds):
        raise InvalidInputError("thresholds is empty: give at least one probability to cut at.")
    if ignore is not None:
        keep = ~_as_masks("ignore", ignore, truth.shape)
        scored = keep.any(axis=(1, 2))
        truth = truth & keep
    else:
        keep, scored = None, np.ones(truth.shape[0], dtype=bool)
    if not scored.any():
        raise InvalidInputError("nothing to score: no slice with a pixel outside ignore was given.")
    pos = truth.any(axis=(1, 2))[scored]
    records = []
    for t in thresholds:
        pred = prob_map >= t
        if keep is not None:
            pred &= keep
        tp, fp, fn = (s[scored] for s in binary_stats(pred, truth))
        has_pred = pred.any(axis=(1, 2))[scored]
        records.append(
            {
                "threshold": float(t),
                "dice_pos": _mean_or_none(_ratio(2 * tp, 2 * tp + fp + fn)[pos]),
                "iou_pos": _mean_or_none(_ratio(tp, tp + fp + fn)[pos]),
                "fp_slice_rate": _mean_or_none(has_pred[~pos].astype(np.float64)),
            }
        )
    return records


# ----------------------------------------------------------------------------- patient bootstrap


def patient_resamples(patient, n_resamples: int, seed: int) -> np.ndarray:
    """Weights (n_resamples, N) of a bootstrap over patients: row b counts how often the patient of each
    of the N slices is drawn when the distinct patients are drawn with replacement, as many as there are.

    Slices of one patient are alike (one head, one scan), so the patient, not the slice, is the unit a
    test set samples; resampling slices would understate the spread. The same weights serve every method
    of a table, so intervals of differences and ratios are paired.
    """
    patient = np.asarray(patient)
    if patient.ndim != 1 or patient.size == 0:
        raise InvalidInputError(f"patient must be a non-empty (N,) vector, got shape {patient.shape}.")
    if n_resamples < 1:
        raise InvalidInputError(f"n_resamples must be at least 1, got {n_resamples}.")
    ids, inverse = np.unique(patient, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(n_resamples, len(ids)))
    counts = np.stack([np.bincount(row, minlength=len(ids)) for row in draws])  # (B, P)
    return counts[:, inverse].astype(np.float64)


def bootstrap_interval(values, weights: np.ndarray, level: float = 0.95, baseline=None) -> dict | None:
    """Percentile interval of the mean of ``values`` (N,) over the resamples of ``weights`` (B, N)
    (:func:`patient_resamples`), or of the ratio of its mean to the mean of ``baseline`` (N,) on the same
    resamples. Returns ``{"low", "high"}``, or None when a resample leaves nothing to average.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape != weights.shape[1:]:
        raise InvalidInputError(f"values of shape {values.shape} for bootstrap weights of {weights.shape}.")
    total = weights @ values
    if baseline is None:
        den = weights.sum(axis=1)
    else:
        den = weights @ np.asarray(baseline, dtype=np.float64)
    if not (den > 0).all():
        return None
    stats = total / den
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return {"low": float(low), "high": float(high)}

