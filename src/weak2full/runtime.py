"""Where and how training runs: device choice, seeding, CPU threads."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["choose_device", "seed_everything", "set_threads"]


def choose_device(setting: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error naming the key."""
    if setting == "cuda" and not torch.cuda.is_available():
        from weak2full.errors import InvalidParameterError

        raise InvalidParameterError(
            "The 'common.device' parameter is 'cuda' but no CUDA device is available."
        )
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; on CPU the same seed and params then give the same weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(n: int | None = None) -> int:
    """Intra-op threads for torch on CPU (default: the CPUs this process may use); returns the number."""
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()
