"""The one training loop, and the four training stages built on it.

:func:`fit` trains any of the chain's networks: AdamW, cosine schedule with linear warm-up, balanced
sampling (:class:`weak2full.data.BalancedBatchSampler`), augmentation, channels_last, bf16 autocast where
the device computes bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX), resume from the stage's last
state after an interruption, tqdm progress, dvclive logging, and model selection on a validation score.
Same params + seed on the same CPU give the same weights.

Stages (each writes through ``atomic_output``):

* :func:`run_classifier` - heatmap network on image labels -> models/classifier.pt, metrics/classifier.json;
* :func:`run_baseline` - GAP-CAM on image labels -> models/gap_cam.pt, metrics/baseline_cam.json;
* :func:`run_segmenter` - smp segmenter on pseudo_masks.h5 of the train split -> models/segmenter.pt;
* :func:`run_oracle` - the same segmenter on the true train masks (the ceiling) -> models/oracle.pt.

Classifiers are selected by localisation on the annotated val slices (``select_by``: map_dice or
point_acc; AUROC can be won by shortcuts). Segmenters keep their last epoch (``select_by: last``) or
the best ``dice_pos`` on the annotated val slices, and read ``input.for_segmenter()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from weak2full import distributed, losses
from weak2full.cams import NORMALISATION, normalise_cam, predict_cams
from weak2full.data import BalancedBatchSampler, SliceDataset
from weak2full.errors import InvalidInputError, InvalidParameterError, LocalisationWarning
from weak2full.h5 import (
    DatasetFile,
    atomic_output,
    file_sha256,
    open_checked,
    trusted_flags,
    truth_mask,
    write_json,
)
from weak2full.metrics import dice_per_slice, dice_pos_and_fp_rate
from weak2full.models import (
    create_model,
    resolve_encoder_weights,
    model_config,
    predict_masks,
    save_checkpoint,
    save_disabled,
)
from weak2full.params import Params, TrainParams
from weak2full.runtime import (
    choose_device,
    fast_bf16,
    inference_model,
    rng_state,
    seed_everything,
    set_rng_state,
    set_threads,
)

__all__ = [
    "fit",
    "classifier_metrics",
    "MAP_THRESHOLDS",
    "LOCALISATION_FLOOR",
    "warn_if_not_localising",
    "segmenter_metrics",
    "score_classifier",
    "score_segmenter",
    "selection_rows",
    "run_classifier",
    "run_baseline",
    "run_segmenter",
    "run_oracle",
]


# ------------------------------------------------------------------------------------------ the loop


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def fit(
    model: torch.nn.Module,
    train_set: SliceDataset,
    loss_fn: Callable[[object, torch.Tensor], torch.Tensor],
    validate: Callable[[torch.nn.Module], dict],
    p: TrainParams,
    *,
    select_key: str | None,
    seed: int,
    device: torch.device,
    live_dir: str | Path | None,
    state_path: str | Path | None,
    desc: str = "train",
) -> tuple[dict, dict]:
    """Train ``model`` and return ``(best state_dict, its validation metrics)``.

    ``loss_fn(model_output, target)`` gives the scalar loss; ``validate(model)`` returns a flat dict of
    floats holding ``select_key`` (higher is better), run after every epoch; ``select_key`` None keeps
    the last epoch, where the schedule ends (validation is then only logged). ``state_path`` keeps the
    last epoch's full state (model, optimiser, schedule, best so far, random states) so that a rerun with
    the same params and data resumes (``p.resume``); the caller removes it once its outputs are written,
    so a kill between the last epoch and the final checkpoint resumes too. ``live_dir``: dvclive folder.
    Under torchrun each rank trains on its share of every batch (:mod:`weak2full.distributed`).
    """
    cuda = device.type == "cuda"
    _check_positives(train_set)
    steps = p.steps_per_epoch or max(1, math.ceil(len(train_set) / p.batch_size))
    total = steps * p.epochs
    sampler = BalancedBatchSampler(train_set.positive, p.batch_size, steps, p.positive_fraction, seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=distributed.ShardedBatches(sampler, p.batch_size),
        num_workers=p.num_workers, pin_memory=cuda,
        persistent_workers=p.num_workers > 0,
    )
    model.to(device)
    if p.channels_last:  # oneDNN and cuDNN convolutions both prefer NHWC
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(round(p.warmup_epochs * steps))))
    use_amp = p.amp and fast_bf16(device)  # the losses cast the outputs back to float32
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    # Under torchrun: DDP for the training forward, validation on rank 0 shared with all, rank 0 writes.
    net, main = distributed.wrap(model, device), distributed.is_main()
    validate = distributed.main_only(validate)

    ema = ModelEmaV3(model, decay=p.ema_decay, use_warmup=True) if p.ema_decay > 0 else None
    scored = ema.module if ema is not None else model  # what is validated, selected and returned

    fingerprint = _fingerprint(p, seed, len(train_set), model, train_set)
    start_epoch, best_score, best_state, best_metrics = 0, -math.inf, None, {}
    state_path = Path(state_path) if state_path is not None else None
    if p.resume and state_path is not None and state_path.is_file():
        state = _resume_state(state_path, fingerprint, desc)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.module.load_state_dict(state["ema"])
            start_epoch, best_score = state["epoch"] + 1, state["best_score"]
            best_state, best_metrics = state["best_state"], state["best_metrics"]
            set_rng_state(state["rng"])  # the sampler draws from (seed, epoch): nothing else to restore
            tqdm.write(f"{desc}: resuming after epoch {start_epoch} from {state_path}")

    live = _live(live_dir if main else None, resume=start_epoch > 0)
    try:
        for epoch in range(start_epoch, p.epochs):
            sampler.set_epoch(epoch)
            model.train()
            running, seen = 0.0, 0
            bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{p.epochs}", leave=False, unit="step",
                       disable=not main)
            for x, target in bar:
                x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True)
                if p.channels_last and x.dim() == 4:  # not the (B, T, C, H, W) slice windows
                    x = x.contiguous(memory_format=torch.channels_last)
                with amp:
                    loss = loss_fn(net(x), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update(model, step=sched.last_epoch)  # LambdaLR counts optimiser steps
                running += float(loss.detach())
                seen += 1
                bar.set_postfix(loss=f"{running / seen:.4f}")
            _check_finite(model, running, desc, epoch)
            metrics = validate(scored)
            # select_key None: the epoch number is the score, so each epoch replaces the one before.
            score = float(metrics[select_key]) if select_key is not None else float(epoch)
            improved = score > best_score or best_state is None
            if improved:
                best_score, best_metrics = score, dict(metrics)
                best_state = {k: v.detach().cpu().clone() for k, v in scored.state_dict().items()}
            if main:
                tqdm.write(f"{desc} epoch {epoch + 1}/{p.epochs}: loss {running / max(1, seen):.4f} "
                           + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                           + (" *" if improved else ""))
            if live is not None:
                live.log_metric("train/loss", running / max(1, seen))
                live.log_metric("train/lr", sched.get_last_lr()[0])
                for k, v in metrics.items():
                    live.log_metric(f"val/{k}", float(v))
                live.next_step()
            if state_path is not None and main:
                with atomic_output(state_path) as tmp:
                    torch.save({"fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                "best_score": best_score, "best_state": best_state,
                                "best_metrics": best_metrics, "rng": rng_state(),
                                "ema": ema.module.state_dict() if ema is not None else None}, tmp)
        if live is not None:
            for k, v in best_metrics.items():
                live.summary[f"best/{k}"] = float(v)
    finally:
        if live is not None:
            live.end()
    return best_state, best_metrics


def _check_positives(train_set: SliceDataset) -> None:
    """Refuse a train split where a class has no positive slice: nothing to learn it from."""
    missing = [c for k, c in enumerate(train_set.classes) if not train_set.labels[:, k].any()]
    if missing:
        raise InvalidInputError(
            f"{train_set.dataset_path}: no positive slice for classes {missing} among the "
            f"{len(train_set)} train slices; a network cannot learn them (drop them from common.classes)."
        )


def _resume_state(path: Path, fingerprint: str, desc: str) -> dict | None:
    """The resume state at ``path`` when it belongs to this run (same params, data and network), else None."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a foreign or damaged file: start over, say why
        tqdm.write(f"{desc}: not resuming: {path} is unreadable ({str(exc)[:200]}); starting over")
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint or "rng" not in state:
        tqdm.write(f"{desc}: not resuming: {path} was made with other params, data or network; starting over")
        return None
    return state


def _fingerprint(p: TrainParams, seed: int, n: int, model: torch.nn.Module, train_set=None) -> str:
    shapes = [list(v.shape) for v in model.state_dict().values()]
    blob = [p.model_dump(mode="json"), seed, n, shapes]
    if train_set is not None:  # the same params on other data (a re-run prepare) must not resume
        blob += [train_set.input_params.model_dump(mode="json"), train_set.classes, train_set.targets,
                 hashlib.sha256(train_set.indices.tobytes()).hexdigest(),
                 *(file_sha256(f) if f is not None else None
                   for f in (train_set.dataset_path, train_set.pseudo_path))]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _live(live_dir, resume: bool):
    if live_dir is None:
        return None
    from dvclive import Live

    return Live(str(live_dir), resume=resume, dvcyaml=False, save_dvc_exp=False, report=None)


# ------------------------------------------------------------------------------------------ metrics


def _check_finite(model: torch.nn.Module, loss_sum: float, desc: str, epoch: int) -> None:
    """A diverged epoch (NaN or infinite loss or weights) stops training with the key to change, before
    validation would fail deep inside scikit-learn on NaN scores; the resume state of the epoch before
    stays, and no output is written."""
    bad = next((name for name, t in model.named_parameters() if not bool(torch.isfinite(t).all())), None)
    if bad is None and math.isfinite(loss_sum):
        return
    where = f"the weights ({bad})" if bad is not None else "the loss"
    raise InvalidParameterError(
        f"{desc}: training diverged in epoch {epoch + 1}: {where} became NaN or infinite. Lower the 'lr' "
        "parameter of this network's section, or set its 'amp' parameter to false (bf16 training)."
    )


def _auroc_ap(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if y.min() == y.max():
        return float("nan"), float("nan")
    return float(roc_auc_score(y, score)), float(average_precision_score(y, score))


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


# Map thresholds (on the normalised map) among which classifier_metrics calibrates map_dice.
MAP_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def classifier_metrics(
    model: torch.nn.Module,
    ds: DatasetFile,
    idx: np.ndarray,
    input_params,
    classes: list[str],
    method: str,
    heatmap_size: int,
    batch_size: int = 32,
    device="cpu",
    thresholds: dict[str, float] | None = None,
) -> dict:
    """Image-level and localisation metrics of a classifier on dataset rows ``idx`` (one split).

    ``auroc``/``ap`` (macro over classes, and ``per_class``) on all rows; ``point_acc`` (argmax of the
    map inside the true mask) and ``map_dice`` (normalised map >= a threshold vs the mask, at image
    size) on annotated rows whose mask holds the class, macro over the classes the masks can score.
    ``thresholds`` maps a class to its map threshold; None calibrates it here, the best of
    :data:`MAP_THRESHOLDS` (``per_class[cls]["map_threshold"]``): do that on val, then score test at the
    val thresholds. Calibrating is needed because balanced sampling shifts a classifier's logits (a 50%
    positive batch is not the data's 11%), and gap_cam's max-normalised map has no natural threshold.
    Masks are read through ``annotated_masks`` only. The network runs in its inference form
    (:func:`weak2full.runtime.inference_model`: BatchNorm folded, channels_last), as in the cams stage.
    """
    idx = np.asarray(idx, dtype=np.int64)
    net, channels_last = inference_model(model.to(device))
    cam, prob = predict_cams(net, ds, idx, input_params, heatmap_size, batch_size, device, channels_last)
    return score_classifier(cam, prob, ds, idx, classes, method, thresholds)


def score_classifier(cam: np.ndarray, prob: np.ndarray, ds: DatasetFile, idx: np.ndarray, classes: list[str],
                     method: str, thresholds: dict[str, float] | None = None) -> dict:
    """The metrics of :func:`classifier_metrics` from maps and probabilities already predicted for rows
    ``idx`` (:func:`weak2full.cams.predict_cams`), so a caller that needs them too runs the network once."""
    idx = np.asarray(idx, dtype=np.int64)
    labels = ds.labels_for(classes)[idx]
    per_class = {}
    annotated = ds.has_mask[idx]
    masks = ds.annotated_masks(idx[annotated]) if annotated.any() else None
    maps = normalise_cam(cam[annotated], NORMALISATION[method]) if annotated.any() else None
    if maps is not None and maps.shape[-1] != ds.width:
        maps = torch.nn.functional.interpolate(torch.from_numpy(maps), size=(ds.height, ds.width),
                                               mode="bilinear", align_corners=False).numpy()
    for k, cls in enumerate(classes):
        grid = MAP_THRESHOLDS if thresholds is None else (thresholds[cls],)
        auroc, ap = _auroc_ap(labels[:, k], prob[:, k])
        entry = {"auroc": auroc, "ap": ap, "point_acc": float("nan"), "map_dice": float("nan"),
                 "map_threshold": float("nan"), "n_pos": 0}
        scorable = masks is not None and (cls == "any" or cls in ds.mask_classes)
        if scorable:
            truth = truth_mask(masks, ds.mask_classes, cls)
            pos = truth.any(axis=(1, 2))
            if pos.any():
                truth, m = truth[pos], maps[pos, k]
                peak = m.reshape(len(m), -1).argmax(axis=1)
                hits = truth.reshape(len(truth), -1)[np.arange(len(truth)), peak]
                grid_dice = np.array([dice_per_slice(m >= t, truth).mean() for t in grid])
                best = int(np.argmax(grid_dice)) if thresholds is None else 0
                entry.update(point_acc=float(hits.mean()), map_dice=float(grid_dice[best]),
                             map_threshold=float(grid[best]), n_pos=int(pos.sum()))
        per_class[cls] = entry
    return {
        "auroc": _nanmean(e["auroc"] for e in per_class.values()),
        "ap": _nanmean(e["ap"] for e in per_class.values()),
        "point_acc": _nanmean(e["point_acc"] for e in per_class.values()),
        "map_dice": _nanmean(e["map_dice"] for e in per_class.values()),
        "per_class": per_class,
    }


def segmenter_metrics(model, ds: DatasetFile, idx: np.ndarray, input_params, classes: list[str],
                      batch_size: int = 32, device="cpu", threshold: float = 0.5,
                      keep: np.ndarray | None = None, flip: bool = False) -> dict:
    """``dice_pos`` (mean per-slice Dice over annotated rows holding the class) and ``fp_slice_rate``
    (share of annotated rows without the class that get any predicted pixel), macro over classes.

    ``keep``: bool per row of ``idx``; a row where it is False predicts nothing (a cascade's gate).
    ``flip``: test-time flip (:func:`weak2full.models.predict_masks`)."""
    idx = np.asarray(idx, dtype=np.int64)
    annotated = ds.has_mask[idx]
    prob = predict_masks(model, ds, idx[annotated], input_params, batch_size, device, flip=flip)
    if keep is not None:
        keep = np.asarray(keep, bool)[annotated]
    masks = ds.annotated_masks(idx[annotated])
    return score_segmenter(prob, masks, ds.mask_classes, classes, threshold, keep)


def score_segmenter(prob: np.ndarray, masks: np.ndarray, mask_classes: list[str], classes: list[str],
                    threshold: float = 0.5, keep: np.ndarray | None = None) -> dict:
    """The metrics of :func:`segmenter_metrics` from probabilities (n, K, H, W) already predicted
    (:func:`weak2full.models.predict_masks`) and the rows' annotated masks (n, H, W), so a caller scoring
    the same slices several times (thresholds, a gate) reads and predicts them once; ``keep``: bool per
    row."""
    if keep is not None:
        prob = prob * keep[:, None, None, None]
    dice_pos, fp = [], []
    for k, cls in enumerate(classes):
        if cls != "any" and cls not in mask_classes:
            continue
        dice, rate = dice_pos_and_fp_rate(prob[:, k] >= threshold, truth_mask(masks, mask_classes, cls))
        dice_pos.append(dice)
        fp.append(rate)
    return {"dice_pos": _nanmean(dice_pos), "fp_slice_rate": _nanmean(fp)}


# ------------------------------------------------------------------------------------------ stages


def selection_rows(ds: DatasetFile, classes: list[str], ratio: float | None, seed: int) -> np.ndarray:
    """Annotated val rows for per-epoch model selection: every positive, plus ``ratio`` negatives per
    positive drawn with ``seed`` (``ratio=None``: all annotated val rows). Sorted."""
    rows = ds.indices("val", annotated=True)
    if ratio is None:
        return rows
    pos = ds.labels_for(classes)[rows].max(axis=1) > 0
    neg = rows[~pos]
    k = min(len(neg), int(round(ratio * max(1, pos.sum()))))
    picked = np.random.default_rng([seed, 1]).choice(neg, size=k, replace=False) if k else neg[:0]
    return np.sort(np.concatenate([rows[pos], picked]))


def _setup(params: Params):
    set_threads()
    seed_everything(params.common.seed)
    return distributed.init(choose_device(params.common.device))


def _state_path(out_model: Path) -> Path:
    return out_model.with_name(f".{out_model.stem}.resume.pt")


# Below this val point_acc a heatmap network's maps do not point at the lesions: it learned the label from
# something else (DESIGN.md: AUROC 0.84 with point_acc 0.00 on real CT). The default reads 0.75-0.83 on
# val at four seeds; two runs whose maps collapsed (docs/TUNING.md Sessions 13, 14) read <= 0.03 and 0.28.
LOCALISATION_FLOOR = 0.3


def warn_if_not_localising(val: dict, model_path: str | Path) -> None:
    """A :class:`~weak2full.errors.LocalisationWarning` when the selected heatmap network's val ``point_acc``
    (macro over classes, from :func:`classifier_metrics`) is under :data:`LOCALISATION_FLOOR`. Without
    annotated val positives (NaN) there is nothing to say."""
    point_acc = val.get("point_acc", float("nan"))
    if point_acc < LOCALISATION_FLOOR:  # False for NaN
        warnings.warn(
            f"{model_path}: the selected heatmap network's map peak lies inside the lesion on only "
            f"{point_acc:.0%} of the annotated val positives (AUROC {val.get('auroc', float('nan')):.2f}): "
            "it classifies by something other than the lesion, and pseudo-masks made from its maps will be "
            "poor. Look at the maps (reports/index.html), try another common.seed, or see docs/TUNING.md.",
            LocalisationWarning, stacklevel=2)


def _train_classifier(params: Params, arch: str, dataset: str | Path, out_model: str | Path,
                      out_metrics: str | Path, live_dir: str | Path | None, pretrained=None) -> dict:
    name = "train_classifier" if arch == "heatmap" else "baseline_cam"
    section = getattr(params, name)
    device = _setup(params)
    classes, ip = list(params.common.classes), params.input
    with DatasetFile(dataset) as ds:
        size = ds.height
        train_idx, val_idx, test_idx = ds.indices("train"), ds.indices("val"), ds.indices("test")
        if len(train_idx) == 0 or not ds.has_mask[val_idx].any():
            raise InvalidInputError(
                f"{dataset}: needs train slices and annotated val slices to select a model."
            )
        select_idx = selection_rows(ds, classes, section.val_negative_ratio, params.common.seed)
    heatmap_size = params.train_classifier.heatmap_size
    config = model_config(arch, section, ip.in_channels, len(classes), size)
    weights = resolve_encoder_weights(section.encoder_weights, pretrained, f"{name}.encoder_weights")
    model = create_model(arch, config, weights)
    context = getattr(model, "context_slices", 1)  # a slice-context network reads windows of slices
    train_set = SliceDataset(dataset, train_idx, ip, classes, "label", section.augment,
                             context_slices=context)
    if arch == "heatmap":
        p = section

        def loss_fn(out, y):
            loss = losses.heatmap_loss(out, y, p.deep_supervision_weight if p.deep_supervision else 0.0,
                                       p.consistency_weight if p.deep_supervision else 0.0,
                                       negative_pixel_weight=p.negative_pixel_weight)
            if p.minmax_entropy_weight > 0:
                loss = loss + p.minmax_entropy_weight * losses.minmax_entropy_loss(model, out, y)
            return loss
    else:
        loss_fn = losses.gap_cam_loss
    eval_bs = params.cams.batch_size

    def validate(m):
        with DatasetFile(dataset) as ds:
            r = classifier_metrics(m, ds, select_idx, ip, classes, arch, heatmap_size, eval_bs, device)
        return {k: r[k] for k in ("auroc", "ap", "point_acc", "map_dice")}

    out_model = Path(out_model)
    best, _ = fit(model, train_set, loss_fn, validate, section, select_key=section.select_by,
                  seed=params.common.seed, device=device, live_dir=live_dir,
                  state_path=_state_path(out_model), desc=arch)
    if not distributed.is_main():  # under torchrun rank 0 alone scores and writes
        return {}
    model.load_state_dict(best)
    with DatasetFile(dataset) as ds:  # map thresholds calibrated on val, applied to test
        val = classifier_metrics(model, ds, val_idx, ip, classes, arch, heatmap_size, eval_bs, device)
        thresholds = {c: e["map_threshold"] for c, e in val["per_class"].items()}
        test = classifier_metrics(model, ds, test_idx, ip, classes, arch, heatmap_size, eval_bs, device,
                                  thresholds=thresholds)
    result = {"val": val, "test": test}
    save_checkpoint(out_model, model, arch, config, classes, input=ip.model_dump(mode="json"),
                    heatmap_size=heatmap_size, selected_by=section.select_by, map_thresholds=thresholds)
    write_json(out_metrics, result)
    _state_path(out_model).unlink(missing_ok=True)  # only now: the outputs are whole
    if arch == "heatmap":  # gap_cam's coarse CAM is the baseline, not expected to point
        warn_if_not_localising(val, out_model)
    return result


def run_classifier(
    params: Params, dataset, out_model, out_metrics, live_dir="dvclive/train_classifier", pretrained=None
) -> dict:
    """train_classifier stage: heatmap network -> ``out_model`` and ``{"val": ..., "test": ...}`` metrics.

    ``pretrained``: the pretrain stage's encoder file, used when ``encoder_weights`` is ``synthetic``.
    """
    return _train_classifier(params, "heatmap", dataset, out_model, out_metrics, live_dir, pretrained)


def run_baseline(params: Params, dataset, out_model, out_metrics, live_dir="dvclive/baseline_cam",
                 pretrained=None) -> dict:
    """baseline_cam stage: GAP-CAM classifier -> ``out_model`` and the same metrics as the heatmap network."""
    return _train_classifier(params, "gap_cam", dataset, out_model, out_metrics, live_dir, pretrained)


def _train_segmenter(
    params: Params, section_name: str, train_set: SliceDataset, dataset, out_model, live_dir, pretrained=None
) -> dict:
    """The shared body of the train_segmenter and train_oracle stages. ``section_name`` is the params
    section (``train_segmenter`` or ``train_oracle``); without its prefix it names the run."""
    section, desc = getattr(params, section_name), section_name.removeprefix("train_")
    device = _setup(params)
    # The input the callers built the train set with (input.for_segmenter()): the checkpoint stores it.
    classes, ip = list(params.common.classes), train_set.input_params
    config = model_config("segmenter", section, ip.in_channels, len(classes), 0)
    model = create_model("segmenter", config, resolve_encoder_weights(section.encoder_weights, pretrained,
                                                                      f"{section_name}.encoder_weights"))
    with DatasetFile(dataset) as ds:
        val_idx = selection_rows(ds, classes, section.val_negative_ratio, params.common.seed)
    if len(val_idx) == 0:
        raise InvalidInputError(f"{dataset}: no annotated val slices to select the segmenter on.")
    eval_bs = params.evaluate.batch_size

    def validate(m):
        with DatasetFile(dataset) as ds:
            return segmenter_metrics(m, ds, val_idx, ip, classes, eval_bs, device)

    def loss_fn(out, y):
        return losses.segmentation_loss(out, y, section.dice_weight, per_slice=section.dice_per_slice,
                                       slice_weight=section.slice_weight)

    out_model = Path(out_model)
    select_key = None if section.select_by == "last" else section.select_by
    best, metrics = fit(model, train_set, loss_fn, validate, section, select_key=select_key,
                        seed=params.common.seed, device=device, live_dir=live_dir,
                        state_path=_state_path(out_model), desc=desc)
    if not distributed.is_main():
        return metrics
    model.load_state_dict(best)
    save_checkpoint(out_model, model, "segmenter", config, classes, input=ip.model_dump(mode="json"),
                    selected_by=section.select_by, val=metrics)
    _state_path(out_model).unlink(missing_ok=True)  # only now: the output is whole
    return metrics


def run_segmenter(params: Params, dataset, pseudo, out_model, live_dir="dvclive/train_segmenter",
                  pretrained=None) -> dict:
    """train_segmenter stage: smp segmenter on the pseudo-masks of the train split (negatives included),
    leaving out the slices pseudo_masks.h5 marks untrusted (``trusted`` 0; a file without it trusts all)."""
    with DatasetFile(dataset) as ds:
        train_idx, n = ds.indices("train"), ds.n
    with open_checked(pseudo, "pseudo_masks") as p:
        train_idx = train_idx[trusted_flags(p, pseudo, n)[train_idx] > 0]
    train_set = SliceDataset(dataset, train_idx, params.input.for_segmenter(), params.common.classes,
                             "pseudo", params.train_segmenter.augment, pseudo_path=pseudo,
                             crop_size=params.train_segmenter.crop_size)
    return _train_segmenter(params, "train_segmenter", train_set, dataset, out_model, live_dir, pretrained)


def run_oracle(params: Params, dataset, out_model, live_dir="dvclive/train_oracle", pretrained=None) -> dict:
    """train_oracle stage: the same segmenter on the true masks of the train split (the ceiling).

    With ``train_oracle.enabled: false`` it writes a marker checkpoint that :func:`load_model` refuses.
    """
    if not params.train_oracle.enabled:
        if distributed.is_main():
            save_disabled(out_model, "the oracle is disabled (train_oracle.enabled is false)")
        return {}
    with DatasetFile(dataset) as ds:
        if not ds.masks_complete:
            raise InvalidInputError(
                f"{dataset}: the oracle needs a mask for every train slice (masks_complete is false); "
                "set train_oracle.enabled to false for this source."
            )
        train_idx = ds.indices("train")
    train_set = SliceDataset(dataset, train_idx, params.input.for_segmenter(), params.common.classes,
                             "oracle", params.train_oracle.augment, crop_size=params.train_oracle.crop_size)
    return _train_segmenter(params, "train_oracle", train_set, dataset, out_model, live_dir, pretrained)
