"""Losses of the one training loop.

* :func:`heatmap_loss` - multi-label BCE on the pooled image logits, plus deep supervision (the same BCE
  on the pooled coarser maps) and the cross-scale consistency term (average-pooled finer map ~ the next
  coarser one, on probabilities);
* :func:`gap_cam_loss` - multi-label BCE on the GAP logits;
* :func:`segmentation_loss` - per-pixel BCE + soft Dice over the K sigmoid channels, both ignoring 255.
  BCE is needed beside Dice: on a batch with no foreground Dice alone has (almost) nothing to push;
* :func:`minmax_entropy_loss` - the min-max entropy false-positive control of Belharbi et al. (the map's
  masked-in image must be classified confidently, its masked-out remainder must leave the classifier
  uncertain), an optional term of the heatmap classifier's loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["heatmap_loss", "gap_cam_loss", "segmentation_loss", "consistency", "minmax_entropy_loss"]

IGNORE = 255


def consistency(maps: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared difference between avg-pooled sigmoid(finer map) and sigmoid(next coarser map)."""
    total = maps[0].new_zeros(())
    for fine, coarse in zip(maps[:-1], maps[1:]):
        pooled = F.adaptive_avg_pool2d(torch.sigmoid(fine.float()), coarse.shape[-2:])
        total = total + F.mse_loss(pooled, torch.sigmoid(coarse.float()))
    return total / max(1, len(maps) - 1)


def heatmap_loss(
    out: dict, target: torch.Tensor, ds_weight: float = 0.5, cons_weight: float = 0.1,
    negative_pixel_weight: float = 0.0,
) -> torch.Tensor:
    """``out`` from :class:`weak2full.models.HeatmapNet`; ``target`` float (B, K) in {0, 1}.

    ``negative_pixel_weight``: plus BCE of every map pixel against 0 on the slices labelled without the
    class. An image label of 0 is a full mask (no bleed anywhere), and pooling alone pushes down only a
    negative map's highest pixels; this term pushes down all of them, so what every slice shows (the
    brain's rim, the skull) cannot stay warm on a positive one.
    """
    loss = F.binary_cross_entropy_with_logits(out["logits"].float(), target)
    if negative_pixel_weight > 0:
        maps = out["map"].float()  # (B, K, S, S), on the image logit's scale
        negative = (target == 0).float()[:, :, None, None].expand_as(maps)
        pixel = F.binary_cross_entropy_with_logits(maps, torch.zeros_like(maps), reduction="none")
        loss = loss + negative_pixel_weight * (pixel * negative).sum() / negative.sum().clamp_min(1.0)
    if out["aux_logits"] and ds_weight > 0:
        aux = sum(F.binary_cross_entropy_with_logits(a.float(), target) for a in out["aux_logits"])
        loss = loss + ds_weight * aux / len(out["aux_logits"])
    if out["aux_maps"] and cons_weight > 0:
        loss = loss + cons_weight * consistency([out["map"], *out["aux_maps"]])
    return loss


def gap_cam_loss(out: dict, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out["logits"].float(), target)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                      smooth: float = 1.0, per_slice: bool = False,
                      slice_weight: float = 0.0) -> torch.Tensor:
    """BCE + ``dice_weight`` x soft Dice; logits float (B, K, H, W), target uint8 (B, K, H, W) 0/1/255.

    Pixels marked 255 contribute to neither term. Dice is computed per class over the whole batch
    (so a positive slice among negatives still weighs), then averaged over classes. ``per_slice``: Dice
    per (slice, class) pair holding foreground instead, averaged; this is what ``dice_pos`` scores, and a
    30-pixel bleed weighs as much as a 600-pixel one instead of a twentieth (negatives: BCE only).
    ``slice_weight``: plus BCE between each slice's highest logit and whether it holds foreground (the
    multiple-instance view of a mask), so a speck on a negative slice costs as much as a missed bleed;
    slices without foreground but with ignored pixels are left out (they may hold some).
    """
    logits = logits.float()
    valid = (target != IGNORE).float()
    t = (target == 1).float()
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    loss = (bce * valid).sum() / valid.sum().clamp_min(1.0)
    if dice_weight > 0:
        p = torch.sigmoid(logits) * valid
        dims = (2, 3) if per_slice else (0, 2, 3)
        inter = (p * t).sum(dims)
        fg = (t * valid).sum(dims)
        dice = (2 * inter + smooth) / (p.sum(dims) + fg + smooth)
        if per_slice:
            has = fg > 0
            term = (1 - dice)[has].mean() if bool(has.any()) else logits.new_zeros(())
        else:
            term = (1 - dice).mean()
        loss = loss + dice_weight * term
    if slice_weight > 0:
        peak = logits.masked_fill(valid == 0, -1e4).amax(dim=(2, 3))
        has = (t * valid).amax(dim=(2, 3))
        known = (has > 0) | (valid.amin(dim=(2, 3)) > 0)
        if bool(known.any()):
            loss = loss + slice_weight * F.binary_cross_entropy_with_logits(peak[known], has[known])
    return loss


def _frozen_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image logits of ``model`` on ``x`` as it stands: eval mode (BatchNorm running statistics, nothing
    updated) and detached weights, so gradients reach ``x`` only."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        return torch.func.functional_call(model, params, (x,))["logits"].float()
    finally:
        model.train(was_training)


def minmax_entropy_loss(model: torch.nn.Module, out: dict, target: torch.Tensor) -> torch.Tensor:
    """Min-max entropy term for the heatmap network ``model`` whose output on a batch is ``out``.

    After Belharbi, Rony, Dolz, Ben Ayed, McCaffrey, Granger, "Deep interpretable classification and
    weakly-supervised segmentation of histology images via max-min uncertainty" (IEEE TMI 2022; first as
    "Weakly supervised localization using min-max entropy: an interpretable framework", arXiv 1907.12934).
    For every (slice, class k) labelled positive, the soft mask M = sigmoid(map_k) (upsampled to the
    input) splits the image: x * M must carry the class evidence (low conditional entropy: BCE towards
    "k present"), x * (1 - M) must not (high entropy: log 2 - H(p), zero at p = 1/2). Negative slices
    add nothing: they have no evidence to place, and the image BCE already pushes their maps down.

    The paper trains a separate classifier on the masked images; here the judge is the heatmap network
    itself, frozen for this term (:func:`_frozen_logits`), so the gradient moves only the map and the
    network cannot learn to read the mask's shape instead of the image. Cost: one more forward and
    backward pass over twice the batch's positive slices. ``out["input"]`` is the batch (B, C, H, W) or
    (B, T, C, H, W) with a slice context (the mask applies to every slice of the window).
    """
    b, k = torch.nonzero(target > 0.5, as_tuple=True)
    maps = out["map"]
    if len(b) == 0:
        return maps.sum() * 0.0
    x = out["input"]
    mask = torch.sigmoid(maps[b, k].float())[:, None]  # (n, 1, s, s)
    mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
    if x.dim() == 5:
        mask = mask[:, None]
    xb = x[b].float()
    logits = _frozen_logits(model, torch.cat([xb * mask, xb * (1.0 - mask)]).to(x.dtype))
    n = len(b)
    inside, outside = logits[:n, :][torch.arange(n), k], logits[n:, :][torch.arange(n), k]
    keep = F.binary_cross_entropy_with_logits(inside, torch.ones_like(inside))
    p = torch.sigmoid(outside)
    entropy = -(p * F.logsigmoid(outside) + (1.0 - p) * F.logsigmoid(-outside))  # Bernoulli H(p), nats
    return keep + (math.log(2.0) - entropy).mean()
