"""From HU slices to network inputs: windowing and channel building (applied at load time)."""

from __future__ import annotations

import numpy as np

__all__ = ["window"]


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip HU to [level - width/2, level + width/2] and scale to 0..1 (float32)."""
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / float(width), 0.0, 1.0)
