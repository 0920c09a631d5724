"""Which process this is, and the few collectives the capture needs, over torch.distributed.

sae-shards never launches or wraps processes itself: the RL run does, through ``accelerate
launch`` (or ``torchrun``), as TRL does. Under DDP every rank holds the same parameters after
each optimizer step, so per-step capture, the ring buffer, the SAE and every file of the run
directory live on the main process (rank 0). Per-event capture is the exception: each rank's
hooks see only that rank's rows, so each rank computes its own events' factors (small) and
``gather_to_main`` hands them to rank 0 once per optimizer step.

Before ``torch.distributed`` is initialised (a ``ShardCallback`` built before the trainer) the
rank comes from the launcher's ``RANK`` / ``WORLD_SIZE`` environment variables.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank() -> int:
    """This process's global rank (0 without a process group or launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the run (1 without a process group or launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this is the process that owns the buffer, the SAE and the run directory."""
    return rank() == 0


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` on rank 0, in rank order; None on the other ranks. A collective:
    every rank must call it at the same point. Tensors inside ``obj`` should be on the CPU (the
    objects are pickled between the run's own processes; nothing is read from disk)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective under several processes)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` moved to the CPU (for ``gather_to_main``)."""
    return {k: v.detach().cpu() for k, v in tensors.items()}
