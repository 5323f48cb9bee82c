"""Class activation maps: extraction from a trained network, and normalisation to 0..1."""

from __future__ import annotations

import numpy as np

__all__ = ["normalise_cam"]


def normalise_cam(cam: np.ndarray, how: str) -> np.ndarray:
    """Map raw class maps (..., S, S) to 0..1 per map, float32.

    ``sigmoid``: the heatmap network's maps are per-pixel logits of the same classifier whose pooled
    logit is the image logit, so the sigmoid is already a probability (comparable across images).
    ``max``: the classic CAM convention for gap_cam, ReLU then divide by the map's maximum (a map with
    no positive value stays all zero).
    """
    cam = np.asarray(cam, dtype=np.float32)
    if how == "sigmoid":
        return (1.0 / (1.0 + np.exp(-np.clip(cam, -60.0, 60.0)))).astype(np.float32)
    if how == "max":
        pos = np.maximum(cam, 0.0)
        peak = pos.max(axis=(-2, -1), keepdims=True)
        return np.divide(pos, peak, out=np.zeros_like(pos), where=peak > 0).astype(np.float32)
    raise ValueError(f"unknown CAM normalisation {how!r}; expected 'sigmoid' or 'max'")
