"""Synthetic pretraining: CT-aware encoder weights made offline, the project's substitute for ImageNet.

Nothing here may download pretrained weights, but the generator's masks are free. The pretrain stage
renders a pretraining set of synthetic head CT whose seeds the evaluation data never uses, each volume
with its own draw of generator settings (domain randomisation, ``pretrain.randomise``: noise, blur,
texture, bleed contrast and size, oedema, streaks, calcified mimics, fractures), and trains with full
supervision

* the heatmap network of ``train_classifier`` (same encoder, decoder and map size), and
* the segmenter of ``train_segmenter`` (same arch, encoder, decoder) plus an image-level head on its
  deepest feature,

each on one loss (:func:`pretrain_loss`): per-pixel BCE + Dice against the true mask at the map's size,
image-level BCE, and a false-positive term, a hinge on the largest pixel logit of a negative slice, gated
by the batch's own Dice. The last is there because transfer without it fires on most negative slices
(DESIGN.md); the gate because at full weight from the first step it stops segmentation from starting at
all. Every sample gets
strong augmentation (flip and affine: head size and pose; HU offset, noise, and a contrast scale about the
first window's level). Inputs are built as the chain builds them (``data.intensity``, then ``input``), so
the weights fit the networks that load them.

Only the encoders are kept, as ``{"state_dict", "made_for"}`` files that ``encoder_weights`` reads
(:func:`weak2full.models._encoder.load_encoder_weights`). A network that no stage starts from, or
both when ``pretrain.enabled`` is false, gets a marker file instead. Markers are constant bytes, so DVC
re-runs nothing downstream.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from tqdm import tqdm

from weak2full import losses
from weak2full.data import SliceDataset
from weak2full.errors import InvalidParameterError
from weak2full.h5 import DatasetFile, atomic_output, write_dataset
from weak2full.importers.nifti_folder import percentile_scale
from weak2full.metrics import dice_pos_and_fp_rate
from weak2full.models import create_model, model_config, save_disabled
from weak2full.params import SYNTHETIC_WEIGHTS, Params, PretrainParams
from weak2full.runtime import choose_device, seed_everything, set_threads
from weak2full.synthetic import CLASSES, MASK_CLASSES, generate, randomised_params
from weak2full.train import fit

__all__ = ["run", "needed", "make_pretraining_set", "pretrain_loss", "RandomisedSliceDataset", "NETWORKS"]

NETWORKS = ("classifier", "segmenter")
FP_MARGIN = 0.0  # the false-positive hinge acts while a negative slice would fire (a logit above 0)
DISABLED = "pretraining is off (pretrain.enabled is false)"
UNUSED = {
    "classifier": "no stage starts from it (train_classifier.encoder_weights is not 'synthetic')",
    "segmenter": "no stage starts from it (train_segmenter.encoder_weights is not 'synthetic')",
}


def needed(params: Params) -> dict[str, bool]:
    """Which encoders the chain starts from (the validated params make the paired stages agree)."""
    on = params.pretrain.enabled
    return {
        "classifier": on and params.train_classifier.encoder_weights == SYNTHETIC_WEIGHTS,
        "segmenter": on and params.train_segmenter.encoder_weights == SYNTHETIC_WEIGHTS,
    }


# ----------------------------------------------------------------------------------------- the data


def make_pretraining_set(pp: PretrainParams, image_size: int, intensity: str, path: str | Path) -> dict:
    """Render ``pp.volumes`` train and ``pp.val_volumes`` val volumes into a dataset.h5 at ``path``.

    Volume v is drawn with generator seed ``pp.seed + v`` and its own settings from ``pp.randomise``;
    exactly ``round(positive_volume_fraction * n)`` volumes of each split bleed. With
    ``intensity == "percentile"`` each volume goes through the nifti-folder importer's mapping (air
    as 0, 1st..99th percentile of the head to 0..1000), as real MRI volumes do. Returns a summary.
    """
    n_train, n_val = pp.volumes, pp.val_volumes
    positive = np.zeros(n_train + n_val, bool)
    for start, n in ((0, n_train), (n_train, n_val)):
        k = int(round(pp.positive_volume_fraction * n))
        positive[start + np.random.default_rng([pp.seed, start]).permutation(n)[:k]] = True
    image, mask, label, spacing = [], [], [], None
    for v in tqdm(range(n_train + n_val), desc="pretrain: rendering", unit="volume", leave=False):
        settings = randomised_params(pp.randomise, np.random.default_rng([pp.seed, v, 7]), patients=1,
                                     slices_per_patient=pp.slices_per_volume,
                                     positive_patient_fraction=1.0 if positive[v] else 0.0)
        d = generate(settings, image_size, pp.seed + v)
        vol = d.image
        if intensity == "percentile":
            vol = np.clip(vol.astype(np.float32) + 1000.0, 0.0, None)  # air becomes 0, as in MRI
            vol = percentile_scale(vol, f"pretraining volume {v}")
            vol = np.clip(np.rint(vol), -32768, 32767).astype(np.int16)
        image.append(vol)
        mask.append(d.mask)
        label.append(d.label)
        spacing = d.pixel_spacing
    s = pp.slices_per_volume
    split = np.repeat(np.r_[np.zeros(n_train, np.uint8), np.ones(n_val, np.uint8)], s)
    label = np.concatenate(label)
    write_dataset(
        path, image=np.concatenate(image), patient=np.repeat(np.arange(n_train + n_val, dtype=np.int32), s),
        slice_index=np.tile(np.arange(s, dtype=np.int32), n_train + n_val), label=label,
        mask=np.concatenate(mask), has_mask=split == 1, split=split, classes=CLASSES,
        mask_classes=MASK_CLASSES, masks_complete=True, source="synthetic-pretraining", pixel_spacing=spacing,
        params=pp.model_dump(mode="json"),
    )
    return {"train_volumes": n_train, "val_volumes": n_val, "slices": int(len(split)),
            "positive_slices": float(label[:, 0].mean())}


class RandomisedSliceDataset(SliceDataset):
    """:class:`SliceDataset` whose augmentation also scales contrast about ``pivot`` (HU) by a factor
    drawn log-uniformly from ``contrast``: a window (or scanner) that shows tissue differences wider or
    narrower than the chain's windows do."""

    def __init__(self, *args, contrast: tuple[float, float] = (1.0, 1.0), pivot: float = 40.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.contrast, self.pivot = contrast, pivot

    def _augment(self, planes, mask, seed):
        planes, mask = super()._augment(planes, mask, seed)
        lo, hi = self.contrast
        scale = float(np.exp(np.random.default_rng([seed, 1]).uniform(np.log(lo), np.log(hi))))
        return (self.pivot + (planes - self.pivot) * scale).astype(np.float32), mask


# ----------------------------------------------------------------------------------------- the loss


def pretrain_loss(maps: torch.Tensor, image_logits: torch.Tensor, target: torch.Tensor,
                  dice_weight: float = 1.0, cls_weight: float = 0.5, fp_weight: float = 1.0) -> torch.Tensor:
    """Fully supervised loss of both pretrained networks.

    ``maps`` (B, K, h, w) pixel logits, ``image_logits`` (B, K), ``target`` uint8 (B, K, H, W) true masks
    (max-pooled to h x w when the map is coarser). BCE + ``dice_weight`` x Dice on the map, plus
    ``cls_weight`` x BCE of the image logits, plus the false-positive term: ``fp_weight`` x the hinge
    max(0, largest pixel logit) averaged over the (slice, class) pairs without that class (a negative slice
    that fires is pushed until it would not), times a gate, the batch's soft Dice on its bleeds.
    """
    t = target.float()
    if t.shape[-2:] != maps.shape[-2:]:
        t = F.adaptive_max_pool2d(t, maps.shape[-2:])
    present = t.amax(dim=(2, 3))
    loss = losses.segmentation_loss(maps, t.to(torch.uint8), dice_weight)
    if cls_weight > 0:
        loss = loss + cls_weight * F.binary_cross_entropy_with_logits(image_logits.float(), present)
    if fp_weight > 0:
        absent = 1.0 - present
        peak = F.relu(maps.float().amax(dim=(2, 3)) + FP_MARGIN)
        # The gate (no gradient through it) holds the term back until the network segments: at full weight
        # from the start it pushes down the brightest structures, the bleeds' look-alikes, before the
        # network can tell them apart, and segmentation never starts (docs/PRETRAIN.md).
        with torch.no_grad():
            p = torch.sigmoid(maps.float()) * present[:, :, None, None]
            gate = (2 * (p * t).sum() / (p.sum() + t.sum()).clamp_min(1.0)).clamp(0.0, 1.0)
        loss = loss + fp_weight * gate * (peak * absent).sum() / absent.sum().clamp_min(1.0)
    return loss


# ------------------------------------------------------------------------------------- the networks


def _build(params: Params, network: str, in_channels: int, num_classes: int, size: int):
    """(model, output -> (maps, image logits), the encoder module to save, its name)."""
    if network == "classifier":
        p = params.train_classifier
        # One slice at a time: a slice-context module sits after the encoder, and only the encoder is kept.
        config = {**model_config("heatmap", p, in_channels, num_classes, size), "slice_context": "none"}
        model = create_model("heatmap", config)
        return model, lambda out: (out["map"], out["logits"]), model.encoder, p.encoder
    p = params.train_segmenter
    kwargs = {"decoder_channels": list(p.decoder_channels)} if p.decoder_channels is not None else {}
    try:  # the chain's segmenter plus smp's image-level head on the deepest feature
        model = smp.create_model(p.arch, encoder_name=p.encoder, encoder_weights=None,
                                 in_channels=in_channels, classes=num_classes,
                                 aux_params={"classes": num_classes}, **kwargs)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise InvalidParameterError(
            f"The 'train_segmenter.arch'/'train_segmenter.encoder' parameters do not make an smp model with "
            f"an image-level head (arch={p.arch!r}, encoder={p.encoder!r}): {exc}"
        ) from None
    encoder = model.encoder.model if p.encoder.startswith("tu-") else model.encoder
    return model, lambda out: out, encoder, p.encoder


@torch.no_grad()
def _validate(model, split_out, val_set: SliceDataset, pp: PretrainParams, batch_size: int,
              device) -> dict:
    """Loss, ``dice_pos``, ``fp_slice_rate`` (map sigmoid >= 0.5, macro over classes) on val volumes."""
    model.eval()
    loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size)
    total, n, preds, truths = 0.0, 0, [], []
    for x, y in loader:
        maps, logits = split_out(model(x.to(device)))
        total += float(pretrain_loss(maps, logits, y.to(device), pp.dice_weight, pp.cls_weight,
                                     pp.fp_weight)) * len(x)
        n += len(x)
        prob = torch.sigmoid(maps.float())
        if prob.shape[-2:] != y.shape[-2:]:
            prob = F.interpolate(prob, size=y.shape[-2:], mode="bilinear", align_corners=False)
        preds.append((prob >= 0.5).cpu().numpy())
        truths.append((y == 1).numpy())
    pred, truth = np.concatenate(preds), np.concatenate(truths)
    dice, fp = np.array([dice_pos_and_fp_rate(pred[:, k], truth[:, k]) for k in range(truth.shape[1])]).T
    # A class with no positive (or no negative) val slice adds nothing; none at all scores 0.
    dice_pos = float(np.nanmean(dice)) if not np.isnan(dice).all() else 0.0
    fp_rate = float(np.nanmean(fp)) if not np.isnan(fp).all() else 0.0
    loss = total / max(1, n)
    # The epoch is chosen by the val loss (higher is better for fit): continuous, where Dice and the
    # false-positive rate both sit at 0 while the network still predicts nothing.
    return {"val_loss": loss, "dice_pos": dice_pos, "fp_slice_rate": fp_rate, "neg_val_loss": -loss}


def _pretrain_one(params: Params, network: str, dataset: Path, out: Path, device) -> dict:
    pp, classes = params.pretrain, list(params.common.classes)
    ip = params.input.for_segmenter() if network == "segmenter" else params.input
    section = getattr(pp, network)
    with DatasetFile(dataset) as ds:
        train_idx, val_idx, size = ds.indices("train"), ds.indices("val"), ds.height
    seed_everything(pp.seed)
    model, split_out, encoder, name = _build(params, network, ip.in_channels, len(classes), size)
    pivot = ip.slice_window[0] if ip.mode == "slices" else ip.windows[0][0]
    train_set = RandomisedSliceDataset(dataset, train_idx, ip, classes, "oracle", section.augment,
                                       contrast=pp.contrast, pivot=pivot)
    val_set = SliceDataset(dataset, val_idx, ip, classes, "oracle")
    step_losses: list[float] = []
    history: list[dict] = []

    def loss_fn(out, target):
        maps, logits = split_out(out)
        loss = pretrain_loss(maps, logits, target, pp.dice_weight, pp.cls_weight, pp.fp_weight)
        step_losses.append(float(loss.detach()))
        return loss

    def validate(m):
        metrics = _validate(m, split_out, val_set, pp, params.evaluate.batch_size, device)
        history.append(metrics)
        return metrics

    start, cpu = time.perf_counter(), time.process_time()
    best, selected = fit(model, train_set, loss_fn, validate, section, select_key="neg_val_loss",
                         seed=pp.seed, device=device, live_dir=None,
                         state_path=out.with_name(f".{out.stem}.resume.pt"), desc=f"pretrain {network}")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    model.load_state_dict(best)
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    made_for = (f"the '{name}' encoder of the {network} with {ip.in_channels} input channels "
                "(written by the pretrain stage)")
    with atomic_output(out) as tmp:
        torch.save({"state_dict": state, "made_for": made_for, "encoder": name,
                    "in_channels": ip.in_channels}, tmp)
    steps = section.steps_per_epoch or max(1, math.ceil(len(train_idx) / section.batch_size))
    per_epoch = [float(np.mean(step_losses[i:i + steps])) for i in range(0, len(step_losses), steps)]
    for entry, loss in zip(history[-len(per_epoch):], per_epoch):
        entry["train_loss"] = loss
    return {"trained": True, "encoder": name, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "train_loss_first_epoch": per_epoch[0] if per_epoch else float("nan"),
            "train_loss_last_epoch": per_epoch[-1] if per_epoch else float("nan"),
            "epochs": history, "selected": selected}


def run(params: Params, out_classifier: str | Path, out_segmenter: str | Path,
        out_metrics: str | Path) -> dict:
    """pretrain stage: encoder weights (or markers) at ``out_classifier`` / ``out_segmenter`` and the
    metrics (time, per-epoch losses and val scores) at ``out_metrics``."""
    outs = {"classifier": Path(out_classifier), "segmenter": Path(out_segmenter)}
    todo = needed(params)
    result: dict = {"enabled": params.pretrain.enabled}
    for network in NETWORKS:
        if not todo[network]:
            save_disabled(outs[network], DISABLED if not params.pretrain.enabled else UNUSED[network])
            result[network] = {"trained": False}
    if any(todo.values()):
        start, cpu = time.perf_counter(), time.process_time()
        set_threads()
        device = choose_device(params.common.device)
        with tempfile.TemporaryDirectory(prefix="weak2full-pretrain-") as tmp:
            dataset = Path(tmp) / "pretraining.h5"
            result["set"] = make_pretraining_set(params.pretrain, params.data.image_size,
                                                 params.data.intensity, dataset)
            result["generate_seconds"] = round(time.perf_counter() - start, 1)
            for network in NETWORKS:
                if todo[network]:
                    result[network] = _pretrain_one(params, network, dataset, outs[network], device)
        # Wall time depends on who else uses the machine; CPU time (all threads) less so.
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["cpu_seconds"] = round(time.process_time() - cpu, 1)
    with atomic_output(out_metrics) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
