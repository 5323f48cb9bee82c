"""Several processes on torch.distributed: what the chain's stages do when torchrun starts them.

``torchrun --nproc_per_node N stages/<stage>.py ...`` (or ``common.launcher: torchrun`` through
:mod:`weak2full.launch`) starts N copies of a stage with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a
rendezvous in the environment. Started plainly (no ``WORLD_SIZE``, or 1), everything here is a no-op
and a stage runs exactly as before.

* Training (:func:`weak2full.train.fit`): :func:`init` joins the process group (nccl on CUDA, one GPU
  per local rank; gloo on CPU), :func:`wrap` puts the model in DistributedDataParallel, and
  :class:`ShardedBatches` gives each rank a disjoint share of every batch the seeded
  :class:`weak2full.data.BalancedBatchSampler` draws. ``batch_size`` stays the global batch, so the
  schedule, the samples seen and their augmentation are those of one process, and the averaged
  gradient is that of the whole batch; only BatchNorm statistics are per rank (batch_size / N slices).
  Validation runs on rank 0 and its result reaches every rank (:func:`main_only`), so all ranks keep
  the same best epoch. Only rank 0 writes checkpoints, metrics and dvclive logs.
* ``cams`` and ``pseudo_masks``: each rank computes a contiguous, chunk-aligned share of the slices
  (:func:`shard`) into a part file beside the output (:func:`part_path`); rank 0 then writes the output
  from the parts with the same writes, in the same order, as one process, so the bytes are the same
  (for cams on the CPU, as one process with the same intra-op threads: oneDNN may split a small
  convolution differently by thread count, moving the last bits of a map). Across machines the output
  folder must be shared (a network file system).
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TypeVar

from weak2full.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

__all__ = [
    "world",
    "rank",
    "is_main",
    "init",
    "barrier",
    "wrap",
    "main_only",
    "ShardedBatches",
    "shard",
    "part_path",
    "shards",
    "local_cpus",
]

T = TypeVar("T")

# Rank and world size come from torchrun's environment, so that asking needs no torch import (the
# pseudo_masks pool forks before torch is loaded) and holds before the process group is joined.


def world() -> int:
    """Number of processes of this run (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a plain single process): the one process that writes outputs."""
    return rank() == 0


def local_cpus() -> int:
    """CPUs this process may use, shared fairly among the ranks on this machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init(device: torch.device | None = None, backend: str | None = None) -> torch.device | None:
    """Join the process group when started by torchrun; return the device this rank computes on.

    ``backend`` None: nccl for CUDA (rank ``LOCAL_RANK`` takes GPU ``LOCAL_RANK``), gloo for the CPU
    (and for ``device`` None: a stage that computes without torch). The stages that only exchange
    small Python objects and barriers (cams, pseudo_masks) ask for gloo. The group is left at exit.
    """
    if world() <= 1:
        return device
    import torch

    if device is not None and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = backend or ("nccl" if device is not None and device.type == "cuda" else "gloo")
        torch.distributed.init_process_group(backend)
        atexit.register(_leave)
    return device


def _leave() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if world() > 1:
        import torch

        torch.distributed.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when several processes train, else ``model`` itself.

    Use the wrapper for the training forward only; evaluate and save the unwrapped ``model`` (a DDP
    forward is a collective, and rank 0 validates alone).
    """
    if world() <= 1:
        return model
    import torch

    ids = [device.index] if device.type == "cuda" else None
    # static_graph: the same parameters take part in every step, and any left out of the loss (deep
    # supervision weighted 0) are then no error.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)


def main_only(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run on rank 0 only; every rank returns rank 0's result (a picklable object)."""
    if world() <= 1:
        return fn

    import torch

    def run(*args, **kwargs):
        box = [fn(*args, **kwargs) if is_main() else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    return run


class ShardedBatches:
    """This rank's share of every batch of ``batches`` (a batch sampler), positions ``rank::world``.

    Every rank draws the same seeded global batches, so the shares are disjoint and together the whole
    batch; ``set_epoch`` is passed on. With one process the batches pass through unchanged.
    """

    def __init__(self, batches, batch_size: int, what: str = "batch_size"):
        self.batches, self.rank, self.world = batches, rank(), world()
        if batch_size % self.world:
            raise InvalidParameterError(
                f"The '{what}' parameter of a training stage must be a multiple of the number of "
                f"processes ({self.world}), so that each rank trains on an equal share of every batch. "
                f"Got {batch_size} instead."
            )

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list]:
        for batch in self.batches:
            yield batch[self.rank :: self.world]


def shard(n: int, chunk: int, ranks: int | None = None, at: int | None = None) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that rank ``at`` of ``ranks`` computes: whole chunks of ``chunk``
    rows, contiguous, as even as chunks allow (a rank may get none: ``start == stop``)."""
    ranks = world() if ranks is None else ranks
    at = rank() if at is None else at
    chunks = -(-n // chunk)
    first = at * chunks // ranks
    last = (at + 1) * chunks // ranks
    return min(n, first * chunk), min(n, last * chunk)


def part_path(out: str | Path, at: int | None = None) -> Path:
    """Where rank ``at`` puts its share of ``out`` (hidden, beside it; removed once merged)."""
    out = Path(out)
    return out.with_name(f".{out.name}.part{rank() if at is None else at}-of-{world()}")


def shards(n: int, chunk: int) -> Sequence[tuple[int, int, int]]:
    """``(rank, start, stop)`` of every rank's share, in row order."""
    return [(r, *shard(n, chunk, world(), r)) for r in range(world())]
