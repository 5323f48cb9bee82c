"""Where and how networks run: device choice, seeding and random states, CPU threads, inference form."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import random

import numpy as np
import torch

__all__ = ["choose_device", "fast_bf16", "inference_model", "seed_everything", "rng_state", "set_rng_state",
           "set_threads", "release_freed_memory"]


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


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up on ``device``: any CUDA GPU, and a CPU whose oneDNN has
    native bf16 kernels (AVX512-BF16 or AMX; on this 2-core Xeon a resnet18 UNet trains 2.2x faster at
    128x128, bench/bench_train.py). Elsewhere bf16 would be emulated, slower than float32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probe: assume emulation
        return False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; on CPU the same seed and params then give the same weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global random state (Python, NumPy, torch CPU and CUDA) as tensors and plain values, so
    that a resume checkpoint holding it still loads with ``torch.load(weights_only=True)``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (a resumed run then draws what the uninterrupted one drew)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_threads(n: int | None = None) -> int:
    """Intra-op threads for torch on CPU; returns the number.

    Default: this process's share of its CPUs, or fewer where the environment sets ``OMP_NUM_THREADS``
    (the usual knob, which torch itself honours: ``OMP_NUM_THREADS=1`` means one thread, pinned or not).
    """
    if n is None:
        from weak2full.distributed import local_cpus

        n = local_cpus()  # under torchrun, the ranks on this machine share its CPUs
        asked = os.environ.get("OMP_NUM_THREADS", "").strip()
        if asked.isdigit() and int(asked) > 0:
            n = min(n, int(asked))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def inference_model(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """A forward-only copy of ``model``: BatchNorm folded into the convolutions before it (torch.fx), in
    channels_last; returns it and whether inputs should be channels_last. ``model`` itself is left as
    it was (but switched to eval mode), so a training loop may validate through this.

    On this 2-core CPU (bench/run_all.py, default heatmap network, batch 32 at 128x128) the cams stage
    makes 1.6x the images/s it makes with the network as loaded (61.9 against 39.1; folding alone was
    ~1.1x in a forward-only comparison: oneDNN's convolutions prefer NHWC); maps agree to ~1e-7. The
    default segmenter (Unet resnet18, upsample 2, flip) predicts 192 slices in 25.1 s against 39.4 s,
    one thread, the same masks. A network torch.fx cannot trace is used unfolded.
    """
    import copy

    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        fast = fuse(model)  # a copy
    except Exception:  # noqa: BLE001 - an untraceable encoder only loses the folding
        fast = copy.deepcopy(model)
    return fast.to(memory_format=torch.channels_last), True


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the heap pages that freed buffers left behind back to the OS (glibc ``malloc_trim(0)``; a
    no-op without glibc). Call it between chunks of a streaming loop.

    Why: glibc raises its mmap threshold each time a large mmapped block is freed, after which buffers
    of a few MiB (a batch of slices enlarged twice, its activations) come from the heap, where freed
    ones fragment and stay resident. The cams stage's resident memory then stepped up by 100-300 MiB at
    random points of long runs (docs/SCALE.md). Trimming after every chunk keeps it flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
