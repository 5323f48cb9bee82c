"""The evaluate stage: every method scored on the same annotated test slices.

Rows of ``metrics/evaluate.json`` (DESIGN.md's names):

* ``gap_cam``, ``heatmap``: the classifiers' maps, label-informed as on the train split (a slice whose
  image label is negative gets no foreground), thresholded at the value that maximises ``dice_pos`` on the
  annotated *val* slices (the same calibration the pseudo-masks get), with ``auroc``/``ap`` of their image
  probabilities on the whole test split beside them;
* ``pseudo_mask``: the test slices' CAM -> CRF output (255 counts as background);
* ``segmenter``: the network trained on pseudo-masks, from pixels only, thresholded at the highest value
  whose ``dice_pos`` on the annotated val slices is within ``evaluate.threshold_tolerance`` of the best
  (``evaluate.calibrate_threshold``; else at ``evaluate.threshold``);
* ``cascade``: the segmenter's mask kept only on slices whose image probability from the heatmap
  classifier reaches a gate calibrated on the annotated val slices (the usual screening cascade: it
  trades a few missed bleeds for clean negative slices): the strictest gate that keeps
  ``evaluate.cascade_keep_dice`` of the segmenter's val ``dice_pos`` (:func:`_gate_on_val`);
* ``oracle``: the same segmenter trained on true masks — the ceiling, thresholded by the same rule;
  absent when switched off;
* ``weak_over_full`` = segmenter ``dice_pos`` / oracle ``dice_pos``.

With ``evaluate.bootstrap_resamples`` > 0 each row's ``dice_pos_ci95`` and the top-level
``weak_over_full_ci95`` give 95% percentile intervals (``{"low", "high"}``) from resampling the test
*patients* with replacement (:func:`weak2full.metrics.patient_resamples`; every method on the same
resamples, so the ratio's interval is paired). They say how much of a difference between two runs the
test split can tell from chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_curve

from weak2full import metrics as M
from weak2full import report
from weak2full.cams import normalise_cam
from weak2full.errors import InvalidInputError
from weak2full.h5 import DatasetFile, _take, open_checked, trusted_flags, write_json
from weak2full.params import InputParams, Params

__all__ = ["run", "labels_from_probs"]

METHODS = ("gap_cam", "heatmap", "pseudo_mask", "segmenter", "oracle")


def labels_from_probs(prob: np.ndarray, threshold: float) -> np.ndarray:
    """(n, K, H, W) class probabilities -> uint8 (n, H, W) label map: the likeliest class where its
    probability reaches ``threshold``, else background (0)."""
    best = prob.argmax(axis=1)
    return np.where(prob.max(axis=1) >= threshold, best + 1, 0).astype(np.uint8)


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if maps.shape[-2:] == tuple(size):
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False).numpy()


def _load_maps(path: Path, ds: DatasetFile, classes: list[str]):
    """Normalised maps (0..1) of a cams file, checked against the dataset; returns (reader, prob, how)."""
    f = open_checked(path, "cams")
    cams_classes = json.loads(f.attrs["classes"])
    if f["cam"].shape[0] != ds.n:
        raise InvalidInputError(f"{path}: {f['cam'].shape[0]} slices, but {ds.path} has {ds.n}; re-run cams.")
    if cams_classes != classes:
        raise InvalidInputError(f"{path}: classes {cams_classes} differ from common.classes {classes}.")
    how = str(f.attrs["normalisation"])

    def read(idx: np.ndarray) -> np.ndarray:
        return normalise_cam(_take(f["cam"], idx), how)

    return f, read


def _threshold_on_val(prob_any_val: np.ndarray, truth_any_val: np.ndarray, grid: list[float],
                      default: float, tolerance: float = 0.0) -> tuple[float, list[dict]]:
    """The threshold of ``grid`` chosen on the val slices: the highest whose ``dice_pos`` is within
    ``tolerance`` of the best (with 0, the best itself; ties go to the higher threshold). A segmenter's
    Dice is often flat over the grid while its false-positive slices fall steeply with the threshold,
    and which of near-equal thresholds wins on some 40 slices is chance (the one-standard-error rule of
    model selection, applied to a threshold)."""
    if prob_any_val.shape[0] == 0 or not truth_any_val.any():
        return default, []
    curve = M.dice_vs_threshold(prob_any_val, truth_any_val, grid)
    dice = [r["dice_pos"] if r["dice_pos"] is not None else -1.0 for r in curve]
    near = [r["threshold"] for r, d in zip(curve, dice) if d >= max(dice) - tolerance]
    return float(max(near)), curve


def _gate_on_val(pred_val: np.ndarray, slice_prob_val: np.ndarray, truth_val: np.ndarray,
                 keep_dice: float) -> tuple[float, dict]:
    """The cascade's gate on the classifier's slice probability, chosen on val.

    ``pred_val``: the segmenter's (n, H, W) foreground; ``slice_prob_val``: (n,) the classifier's
    probability that the slice holds a bleed; ``truth_val``: (n, H, W) true foreground. Every operating
    point of the classifier is a candidate (0: no gate). Raising the gate can only lower both
    ``dice_pos`` (a gated-away bleed scores 0) and ``fp_slice_rate``, so the answer is the highest gate
    whose ``dice_pos`` is still ``keep_dice`` times the ungated one. Returns the gate and its val scores.
    """
    pos = truth_val.any(axis=(1, 2))
    if not pos.any() or pos.all():
        return 0.0, {}
    dice = M.dice_per_slice(pred_val[pos], truth_val[pos])
    fires = pred_val[~pos].any(axis=(1, 2))
    gates = np.unique(np.concatenate([[0.0], slice_prob_val]))
    kept_pos = slice_prob_val[pos][None, :] >= gates[:, None]  # (gates, positive slices)
    kept_neg = slice_prob_val[~pos][None, :] >= gates[:, None]
    dice_pos = (dice[None, :] * kept_pos).mean(axis=1)
    fp = (fires[None, :] & kept_neg).mean(axis=1)
    best = int(np.flatnonzero(dice_pos >= keep_dice * dice_pos[0] - 1e-12).max())
    return float(gates[best]), {"dice_pos": float(dice_pos[best]), "fp_slice_rate": float(fp[best])}


def _segmenter_probs(path: Path, ds: DatasetFile, idx: np.ndarray, params: Params):
    """(n, K, H, W) probabilities of a trained segmenter on dataset rows ``idx``."""
    from weak2full.models import load_model
    from weak2full.models.segmenter import predict_masks
    from weak2full.runtime import choose_device

    device = choose_device(params.common.device)
    model, ckpt = load_model(path, arch="segmenter", device=str(device))
    if list(ckpt["classes"]) != list(params.common.classes):
        raise InvalidInputError(
            f"{path} was trained for classes {ckpt['classes']}, common.classes is {params.common.classes}."
        )
    return predict_masks(model, ds, idx, InputParams(**ckpt["input"]), params.evaluate.batch_size, device,
                         flip=params.evaluate.flip_tta)


def _add_intervals(table: dict, dice_pos_slices: dict, patient_pos: np.ndarray, resamples: int,
                   seed: int) -> None:
    """Patient-bootstrap 95% intervals: ``dice_pos_ci95`` in each row of ``dice_pos_slices`` (class
    ``any``), ``weak_over_full_ci95`` at the top level (paired: the same resamples for both networks)."""
    weights = M.patient_resamples(patient_pos, resamples, seed)
    for method, dice in dice_pos_slices.items():
        table[method]["dice_pos_ci95"] = M.bootstrap_interval(dice, weights)
    if table.get("weak_over_full") is not None:
        table["weak_over_full_ci95"] = M.bootstrap_interval(
            dice_pos_slices["segmenter"], weights, baseline=dice_pos_slices["oracle"])


def run(
    params: Params,
    dataset: Path,
    heatmap_cams: Path,
    gap_cams: Path,
    pseudo: Path,
    segmenter: Path,
    oracle: Path,
    out: Path,
    plots_dir: Path,
    report_path: Path,
) -> dict:
    """Score every method on the annotated test slices; write evaluate.json, plots and the HTML report."""
    p = params.evaluate
    classes = list(params.common.classes)
    with DatasetFile(dataset) as ds:
        test = ds.indices("test", annotated=True)
        val = ds.indices("val", annotated=True)
        if test.size == 0:
            raise InvalidInputError(
                f"nothing to score: {dataset} has no annotated test slices (has_mask within split test); "
                "raise data.split.annotated_test_fraction or give a source with masks."
            )
        size = (ds.height, ds.width)
        truth_test = ds.annotated_masks(test)
        if not (truth_test > 0).any():
            raise InvalidInputError(f"nothing to score: {dataset} has no annotated test slice with a bleed.")
        truth_val = ds.annotated_masks(val)
        any_test, any_val = truth_test > 0, truth_val > 0
        labels = ds.labels_for(classes).astype(np.float32)
        patient, slice_ids = ds.patient[test], ds.slice[test]
        score = lambda lab, **kw: M.score_multiclass(  # noqa: E731
            lab, truth_test, patient, slice_ids, classes, ds.mask_classes, **kw)

        table: dict = {}
        curves: dict = {}
        dice_pos_slices: dict = {}
        roc: dict = {}
        probs_any: dict = {}
        image_probs: dict = {}  # the classifiers' (n_slices, K) image probabilities, every row
        maps_for_report = None
        pos = any_test.any(axis=(1, 2))
        all_test = ds.indices("test")

        # -- the classifiers' maps, label-informed
        for method, path in (("gap_cam", gap_cams), ("heatmap", heatmap_cams)):
            f, read = _load_maps(Path(path), ds, classes)
            with f:
                maps_test = read(test) * labels[test][:, :, None, None]
                maps_val = read(val) * labels[val][:, :, None, None]
                prob_test = _upsample(maps_test, size)
                prob_val = _upsample(maps_val, size)
                t, _ = _threshold_on_val(prob_val.max(1), any_val, p.threshold_grid, p.threshold)
                row = score(labels_from_probs(prob_test, t), heatmap=maps_test)
                row["threshold"] = t
                image_prob = image_probs[method] = f["prob"][:]
                cls_metrics = M.classification_metrics(image_prob[all_test], ds.labels_for(classes)[all_test],
                                                        classes)
                row["auroc"], row["ap"] = cls_metrics["auroc"], cls_metrics["ap"]
                y = ds.labels_for(classes)[all_test].max(1)
                if 0 < y.sum() < y.size:
                    fpr, tpr, _ = roc_curve(y, image_prob[all_test].max(1))
                    roc[method] = (fpr, tpr)
            table[method] = row
            probs_any[method] = prob_test.max(1)
            curves[method] = M.dice_vs_threshold(probs_any[method], any_test, p.threshold_grid)
            dice_pos_slices[method] = M.dice_per_slice(probs_any[method] >= t, any_test)[pos]
            if method == "heatmap":
                maps_for_report = maps_test.max(1)

        # -- pseudo-masks of the test slices (the same CAM -> CRF path as for train)
        with open_checked(pseudo, "pseudo_masks") as pm:
            if pm["mask"].shape[0] != ds.n:
                raise InvalidInputError(f"{pseudo}: {pm['mask'].shape[0]} slices, {dataset} has {ds.n}.")
            pseudo_test = _take(pm["mask"], test)
            trusted_test = trusted_flags(pm, pseudo, ds.n)[test] > 0  # the trust rule's flag, for the report
        table["pseudo_mask"] = score(pseudo_test)
        pseudo_fg = (pseudo_test > 0) & (pseudo_test != 255)
        dice_pos_slices["pseudo_mask"] = M.dice_per_slice(pseudo_fg, any_test)[pos]

        # -- the segmenter and the ceiling, from pixels only
        seg_pred = None
        cascade_dice = None  # per positive slice, for its interval only (the plots leave the cascade out)
        # train_oracle.enabled false: its stage wrote a marker checkpoint, and the row is left out.
        networks = [("segmenter", segmenter)] + ([("oracle", oracle)] if params.train_oracle.enabled else [])
        for method, path in networks:
            t = p.threshold
            gated = method == "segmenter"  # the cascade row needs its val probabilities too
            # The threshold depends on val dice_pos alone, so without the cascade's gate (which needs
            # the negatives' false positives) only the val slices with a bleed are predicted.
            rows = slice(None) if gated else any_val.any(axis=(1, 2))
            need_val = p.calibrate_threshold or gated
            prob_val = _segmenter_probs(Path(path), ds, val[rows], params) if need_val else None
            if p.calibrate_threshold:
                t, _ = _threshold_on_val(prob_val.max(1), any_val[rows], p.threshold_grid, p.threshold,
                                         p.threshold_tolerance)
            prob = _segmenter_probs(Path(path), ds, test, params)
            labels_test = labels_from_probs(prob, t)
            table[method] = score(labels_test)
            table[method]["threshold"] = t
            probs_any[method] = prob.max(1)
            curves[method] = M.dice_vs_threshold(probs_any[method], any_test, p.threshold_grid)
            dice_pos_slices[method] = M.dice_per_slice(probs_any[method] >= t, any_test)[pos]
            if gated:
                seg_pred = probs_any[method] >= t
                slice_prob = image_probs["heatmap"].max(axis=1)  # "any bleed here?"
                gate, at_gate = _gate_on_val(labels_from_probs(prob_val, t) > 0, slice_prob[val], any_val,
                                             p.cascade_keep_dice)
                kept = (slice_prob[test] >= gate)[:, None, None]
                table["cascade"] = score(np.where(kept, labels_test, 0).astype(np.uint8))
                table["cascade"].update(threshold=t, gate=gate, val_at_gate=at_gate)
                cascade_dice = M.dice_per_slice(seg_pred & kept, any_test)[pos]

        seg, orc = table["segmenter"].get("dice_pos"), table.get("oracle", {}).get("dice_pos")
        table["weak_over_full"] = (seg / orc) if (seg is not None and orc) else None
        if p.bootstrap_resamples > 0:
            scored = dice_pos_slices if cascade_dice is None else {**dice_pos_slices, "cascade": cascade_dice}
            _add_intervals(table, scored, patient[pos], p.bootstrap_resamples, params.common.seed)

        # -- files
        write_json(out, table)
        report.write_plots(curves, dice_pos_slices, roc, plots_dir)
        examples = []
        pos_rows = np.flatnonzero(pos)
        for group, i in report.pick_examples(dice_pos_slices["segmenter"], p.report_examples):
            r = pos_rows[i]
            examples.append(dict(
                image_hu=ds.images([test[r]])[0], heatmap=maps_for_report[r], pseudo_mask=pseudo_test[r],
                pseudo_trusted=bool(trusted_test[r]), segmenter_pred=seg_pred[r], truth=any_test[r],
                title=f"{group}: patient {int(patient[r])}, slice {int(slice_ids[r])}",
                dice=float(dice_pos_slices["segmenter"][i]),
            ))
        report.write_html_report(report_path, table, examples, curves=curves)
    return table
