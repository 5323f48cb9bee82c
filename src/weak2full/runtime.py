"""Where and how training runs: device choice, seeding, CPU threads."""

from __future__ import annotations

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
    """Intra-op threads for torch on CPU (default: this process's share of its CPUs); returns the number."""
    if n is None:
        from weak2full.distributed import local_cpus

        n = local_cpus()  # under torchrun, the ranks on this machine share its CPUs
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()
