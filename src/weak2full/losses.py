"""Losses of the one training loop.

* :func:`heatmap_loss` - multi-label BCE on the pooled image logits, plus deep supervision (the same BCE
  on the pooled coarser maps) and the cross-scale consistency term (average-pooled finer map ~ the next
  coarser one, on probabilities);
* :func:`gap_cam_loss` - multi-label BCE on the GAP logits;
* :func:`segmentation_loss` - per-pixel BCE + soft Dice over the K sigmoid channels, both ignoring 255.
  BCE is needed beside Dice: on a batch with no foreground Dice alone has (almost) nothing to push.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["heatmap_loss", "gap_cam_loss", "segmentation_loss", "consistency"]

IGNORE = 255


def consistency(maps: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared difference between avg-pooled sigmoid(finer map) and sigmoid(next coarser map)."""
    total = maps[0].new_zeros(())
    for fine, coarse in zip(maps[:-1], maps[1:]):
        pooled = F.adaptive_avg_pool2d(torch.sigmoid(fine.float()), coarse.shape[-2:])
        total = total + F.mse_loss(pooled, torch.sigmoid(coarse.float()))
    return total / max(1, len(maps) - 1)


def heatmap_loss(
    out: dict, target: torch.Tensor, ds_weight: float = 0.5, cons_weight: float = 0.1
) -> torch.Tensor:
    """``out`` from :class:`weak2full.models.HeatmapNet`; ``target`` float (B, K) in {0, 1}."""
    loss = F.binary_cross_entropy_with_logits(out["logits"].float(), target)
    if out["aux_logits"] and ds_weight > 0:
        aux = sum(F.binary_cross_entropy_with_logits(a.float(), target) for a in out["aux_logits"])
        loss = loss + ds_weight * aux / len(out["aux_logits"])
    if out["aux_maps"] and cons_weight > 0:
        loss = loss + cons_weight * consistency([out["map"], *out["aux_maps"]])
    return loss


def gap_cam_loss(out: dict, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out["logits"].float(), target)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                      smooth: float = 1.0) -> torch.Tensor:
    """BCE + ``dice_weight`` x soft Dice; logits float (B, K, H, W), target uint8 (B, K, H, W) 0/1/255.

    Pixels marked 255 contribute to neither term. Dice is computed per class over the whole batch
    (so a positive slice among negatives still weighs), then averaged over classes.
    """
    logits = logits.float()
    valid = (target != IGNORE).float()
    t = (target == 1).float()
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    loss = (bce * valid).sum() / valid.sum().clamp_min(1.0)
    if dice_weight > 0:
        p = torch.sigmoid(logits) * valid
        dims = (0, 2, 3)
        inter = (p * t).sum(dims)
        dice = (2 * inter + smooth) / (p.sum(dims) + (t * valid).sum(dims) + smooth)
        loss = loss + dice_weight * (1 - dice).mean()
    return loss
