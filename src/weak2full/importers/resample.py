"""Square resampling shared by every source: pad to square, then images by area, masks by nearest."""

from __future__ import annotations

import numpy as np

__all__ = ["area_weights", "resample_volume"]


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix: row i averages the input pixels that output pixel i covers.

    Output pixel i spans [i, i+1) * n_in / n_out input pixels; each input pixel weighs by its overlap,
    so the rows sum to 1. This is exact area averaging for any ratio (and plain replication when
    upsampling).
    """
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    hi = lo + scale
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / scale


def resample_volume(
    image: np.ndarray,
    mask: np.ndarray | None,
    spacing: tuple[float, float] | None,
    size: int,
    pad_value: float,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float] | None]:
    """Bring (Z, H, W) slices to (Z, size, size).

    The slices are first padded to a square side S = max(H, W), centred, with ``pad_value`` (the caller
    passes the volume's darkest value: air in CT, background in MRI), so the anatomy keeps its aspect.
    The image is then area-averaged (float32 out), the mask (uint8) takes the nearest source pixel, and
    the pixel spacing (dy, dx) grows by S / size.
    """
    h, w = image.shape[1:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pads = ((0, 0), (top, side - h - top), (left, side - w - left))
    image = np.pad(image.astype(np.float32, copy=False), pads, constant_values=pad_value)
    if mask is not None:
        mask = np.pad(mask, pads, constant_values=0)
    if side != size:
        weights = area_weights(side, size).astype(np.float32)
        image = weights @ image @ weights.T  # (size, S) @ (Z, S, S) @ (S, size)
        if mask is not None:
            nearest = np.minimum(((np.arange(size) + 0.5) * side / size).astype(np.int64), side - 1)
            mask = mask[:, nearest][:, :, nearest]
    if spacing is not None:
        spacing = (spacing[0] * side / size, spacing[1] * side / size)
    return np.ascontiguousarray(image), mask, spacing
