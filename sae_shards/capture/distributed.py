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
from typing import Any, Mapping, TypeVar

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


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (a collective under several processes)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())



def launcher(n_processes: int, env: Mapping[str, str] | None = None) -> str:
    """The launcher that starts a job again on ``n_processes`` processes ("" for one):
    ``accelerate launch`` with the backend this process was launched with (accelerate's
    environment: DeepSpeed with its ZeRO stage, FSDP, else DDP, ``--multi_gpu`` also on CPU,
    where ``--cpu`` starts one process), or ``torchrun`` for a process torchrun started without
    accelerate. ``config.json`` records it as ``launch``."""
    if n_processes <= 1:
        return ""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and "ACCELERATE_MIXED_PRECISION" not in env:
        # torchrun itself (accelerate launch, which runs torchrun too, sets that variable for
        # every backend); --nproc_per_node counts one node's processes
        local = int(env.get("LOCAL_WORLD_SIZE") or n_processes)
        nodes = f"--nnodes {n_processes // local} " if n_processes > local else ""
        return f"torchrun {nodes}--nproc_per_node {local}"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        backend = "--use_deepspeed" + (f" --zero_stage {stage}" if stage else "")
    elif env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        backend = "--use_fsdp --fsdp_version 2"
    else:
        backend = "--multi_gpu"
    return f"accelerate launch {backend} --num_processes {n_processes}"


def fsdp_not_applied(sharded: bool, n_processes: int,
                     env: Mapping[str, str] | None = None) -> str | None:
    """The warning for a launch that asked accelerate for FSDP (``--use_fsdp``) whose policy is
    not sharded (``sharded``: any FSDP2 / ZeRO-3 parameter): accelerate applies FSDP only on
    accelerators, so on a CPU every process holds the whole model, as under DDP. None otherwise."""
    env = os.environ if env is None else env
    if n_processes <= 1 or sharded or env.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return None
    return ("accelerate was launched with FSDP (--use_fsdp), but the policy's parameters are not "
            "sharded: accelerate applies FSDP only on accelerators, so every process holds the "
            "whole model and this run is DDP's (its capture and memory too); config.json records "
            "the launch as given")


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` moved to the CPU (for ``gather_to_main``)."""
    return {k: v.detach().cpu() for k, v in tensors.items()}


def world_mismatch(run_dir: Any, saved: Mapping[str, Any], now: int) -> str | None:
    """Why a run trained on ``saved["world_size"]`` processes cannot resume on ``now``, with the
    launch to resume it with (``saved["launch"]``, as recorded); None when they match."""
    before = saved.get("world_size", 1)
    if before == now:
        return None
    how = ("one process" if before == 1 else
           f"{saved.get('launch') or launcher(before)}: on CPU too, where --cpu starts one "
           "process")
    return (f"{run_dir} was trained on {before} process(es) and is resumed on {now}: the RL "
            f"steps would change size mid-run; resume it with the launch it started with ({how})")
