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

import logging
import os
from typing import Any, Callable, Mapping, Sequence, TypeVar

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


_quiet_holds = 0
"""How many holders (``ShardCallback`` instances, ``sae-shards train``'s jobs) keep sae-shards'
logger quiet on this rank (``quiet_other_ranks``)."""


def quiet_other_ranks() -> Callable[[], None]:
    """On a rank other than 0, leave sae-shards' own log records below ERROR unsaid: rank 0
    says what the run does (what another rank alone finds as training begins reaches it through
    ``begin_together``), and every rank said each warning of a resume, once per rank and
    unlabelled, into one log. A level the user set on the ``sae_shards`` logger is kept.

    Returns what undoes it (once; nothing where nothing was changed): the logger speaks again
    when every holder let go, unless the user set a level since. ``ShardCallback`` lets go
    when its training ends, or when it is closed or collected, so a process that outlives the
    run (a notebook with ``RANK`` set) hears sae-shards again."""
    global _quiet_holds
    package = logging.getLogger(__name__.split(".")[0])
    if is_main() or (_quiet_holds == 0 and package.level != logging.NOTSET):
        return lambda: None
    if _quiet_holds == 0:
        package.setLevel(logging.ERROR)
    _quiet_holds += 1
    held = [True]

    def undo() -> None:
        global _quiet_holds
        if not held:
            return
        held.clear()
        _quiet_holds -= 1
        if _quiet_holds == 0 and package.level == logging.ERROR:  # not the user's level since
            package.setLevel(logging.NOTSET)

    return undo


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


def stop_asked_anywhere(asked: int | None) -> tuple[int, int] | None:
    """A collective: None when no rank was asked to stop, else ``(signal, rank)`` of the rank
    that was (``asked``: this rank's signal, 0 for ``request_stop``, None for none); the
    highest signal wins, then the highest rank. One all-reduce of ``(1 + signal) x world +
    rank``, so every rank learns the same pair."""
    world = world_size()
    mine = 0 if asked is None else (asked + 1) * world + rank()
    anywhere = max_over_ranks(mine)
    if anywhere == 0:
        return None
    signum, where = divmod(anywhere, world)
    return signum - 1, where


class StoppedWithAnotherRank(RuntimeError):
    """Raised on the ranks of a launch that could begin training when another rank could not
    (``begin_together``): they stop with that rank's reason instead of a lost connection in the
    next collective. The rank that could not raises its own error, which says why."""


def told_every_rank(error: BaseException) -> None:
    """Record on ``error`` that every rank of the launch learnt of it (``begin_together``, or
    rank 0's refusal of a job's setup, broadcast): the other ranks stopped with it, so none is
    left waiting in that run's collectives (``every_rank_knows``)."""
    error.sae_shards_every_rank_knows = True  # type: ignore[attr-defined]


def every_rank_knows(error: BaseException) -> bool:
    """Whether every rank stopped with ``error`` (or with the error it was raised from): a
    launch can go on to its next job (a sweep's) only then; after a failure of one rank alone
    the others may be inside that job's collectives, and the next job's would not match."""
    while error is not None:
        if isinstance(error, StoppedWithAnotherRank) or getattr(
                error, "sae_shards_every_rank_knows", False):
            return True
        error = error.__cause__
    return False


CALLBACK_WAIT_S = 120.0
"""How long rank 0's callback waits, as training begins, for every rank's to begin too: the
ranks leave transformers' ``accelerator.prepare`` (a collective) together, so a rank that has
not begun by then has no callback."""

_begun = [0]  # how many trainings this process's callbacks began (the same on every rank)


def check_callback_on_every_rank(did: str = "began training") -> None:
    """Refuse a ``ShardCallback`` that is on some ranks only (added under ``if
    accelerator.is_main_process``, as a logging callback is): its collectives then paired
    with DDP's own on the other ranks and gloo aborted without a word (audit 135 F5). Each
    rank says it began (``did``: what the callback was asked to do, said in the refusal) in
    the process group's key-value store, which no collective can mismatch, and rank 0 waits
    ``CALLBACK_WAIT_S`` for all. Nothing on one process, or where the store cannot be
    reached."""
    if world_size() == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception:  # noqa: BLE001 (a torch without it: the check is skipped, not the run)
        return
    import datetime

    _begun[0] += 1
    keys = [f"sae_shards/callback/{_begun[0]}/{r}" for r in range(world_size())]
    store.set(keys[rank()], "began")
    if not is_main():
        return
    try:
        store.wait(keys, datetime.timedelta(seconds=CALLBACK_WAIT_S))
    except Exception:  # noqa: BLE001 (torch's timeout error has changed its type over versions)
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        if not missing:
            return
        raise ValueError(
            f"ShardCallback {did} on rank 0 but not on rank(s) "
            f"{', '.join(map(str, missing))} within {CALLBACK_WAIT_S:g} s: add it to the "
            "trainer on every process (rank 0 alone writes the run directory; the others take "
            "part in its collectives, so it must not be guarded by is_main_process)") from None


def check_same(name: str, value: str, fix: str) -> None:
    """Refuse, on every rank, a setting ``name`` whose ``value`` differs between the run's
    processes (``fix``: what to do); a collective that every rank must reach. One process, or
    no process group yet: nothing."""
    if world_size() == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, value)  # the run's own processes only
    if len(set(everyone)) > 1:
        shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(everyone[:4]))
        more = f", ... ({len(everyone) - 4} more)" if len(everyone) > 4 else ""
        raise ValueError(f"{name} differs between the run's processes ({shown}{more}); {fix}")


def check_same_run_dir(run_dir: Any) -> None:
    """``check_same`` of the run directory: rank 0 alone writes it, and each rank's resume is
    decided from it, so a ``run_dir`` built from ``RANK``, the time or the host name (a
    script's path, ``run_dir=runs/r_${oc.env:RANK}``) is refused on every rank (audit 135)."""
    check_same("run_dir", os.path.abspath(run_dir),
               "give every process the same run_dir, which rank 0 alone writes (a path built "
               "from RANK, LOCAL_RANK, the time or the host name differs between them)")


def check_same_settings(settings: Mapping[str, Any], fix: str) -> None:
    """Refuse, on every rank, ``settings`` (field name to value) that differ between the run's
    processes, naming each differing field and every rank's value (``fix``: what to do). The
    settings that decide a rank's collectives (capture granularity, source, checkpoint steps...)
    must agree, or the ranks wait in different collectives until gloo's or NCCL's timeout,
    where no signal handler runs (audit 141). A collective that every rank must reach; one
    process, or no process group yet: nothing."""
    if world_size() == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, {k: repr(v) for k, v in settings.items()})
    names = sorted({k for mine in everyone for k in mine})
    differ = [k for k in names if len({mine.get(k) for mine in everyone}) > 1]
    if differ:
        shown = "; ".join(f"{k} (" + ", ".join(f"rank {r}: {mine.get(k, 'not set')}"
                                                for r, mine in enumerate(everyone[:4]))
                          + (", ..." if len(everyone) > 4 else "") + ")" for k in differ[:4])
        more = f"; and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ValueError(f"ShardCallback's settings differ between the run's processes: "
                         f"{shown}{more}; {fix}")


def begin_together(problem: BaseException | None, notes: Sequence[str] = ()) -> list[str]:
    """After each rank prepared its side of a run (rank 0 its resume, the others their hooks),
    learn whether every rank did; a collective, which every rank must reach, ``problem`` being
    this rank's error (None when it got through). A rank that got through raises
    ``StoppedWithAnotherRank`` naming the first rank that did not; a rank with a ``problem``
    returns, to raise it. Returns every rank's ``notes`` (warnings for rank 0 to say: rank 0's
    log is the run's), in rank order, on rank 0; [] on the other ranks. One process: its own."""
    if problem is not None:
        told_every_rank(problem)
    if world_size() == 1:
        return list(notes)
    said = None if problem is None else f"{type(problem).__name__}: {problem}"
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, (said, list(notes)))  # the run's own processes only
    failed = [(r, why) for r, (why, _) in enumerate(everyone) if why is not None]
    if problem is None and failed:
        r, why = failed[0]
        raise StoppedWithAnotherRank(f"rank {r} could not begin training, so this rank stops "
                                     f"too: {why}")
    return [note for _, rank_notes in everyone for note in rank_notes] if is_main() else []


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


def distribution(trainer: Any, n_processes: int) -> str:
    """How ``trainer`` spreads its run over processes: ``"DeepSpeed ZeRO-<stage>"``, ``"FSDP"``,
    ``"DDP"``, or ``"one process"``. Each keeps TRL's checkpoint of the weights and the
    optimizer in its own format, so a resume must train the way the run did; ``config.json``
    records it as ``distribution``."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        state = getattr(getattr(trainer, "accelerator", None), "state", None)
        stage = getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None)
        return "DeepSpeed" + (f" ZeRO-{stage}" if stage is not None else "")
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    return "DDP" if n_processes > 1 else "one process"


def distribution_mismatch(run_dir: Any, saved: Mapping[str, Any], now: str) -> str | None:
    """Why a run trained as ``saved["distribution"]`` cannot resume as ``now``
    (``distribution``), with the launch it started with; None when they match or the run
    recorded none."""
    before = saved.get("distribution")
    if not isinstance(before, str) or before == now:
        return None
    how = saved.get("launch") or "one process"
    return (f"{run_dir} was trained under {before} and is resumed under {now}: TRL's "
            f"checkpoint holds the weights and the optimizer in {before}'s format, which "
            f"{now} does not read as they were (nothing of the checkpoint is damaged); resume "
            f"it with the launch it started with ({how})")


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
