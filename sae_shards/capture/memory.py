"""The ring buffer's and the SAE's memory, checked before anything is allocated.

``check_buffer_memory`` compares ``capacity * slot entries * bytes`` with a budget (by default a
share of the device's free memory) and, when it does not fit, says what would: bf16 storage, the
largest capacity that fits, or fewer targets, with values the config accepts.
``check_sae_memory`` does the same for a lower bound of the SAE's training memory against what
is free besides the buffer (``sae.n_latents``, ``sae.batch_size``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from sae_shards.capture.buffer import check_storage_dtype
from sae_shards.core.events import slot_shape
from sae_shards.core.host_memory import HostMemory, memory_available
from sae_shards.core.targets import TargetSpec

_GIB = 1024**3


def slot_numel(targets: Sequence[TargetSpec], event_rank: int | None = None) -> int:
    """Entries of one buffer slot: ``D`` (dense samples) or ``sum_p event_rank (m_p + n_p)`` over
    matrix targets plus the vectors' sizes (per-event factors)."""
    return sum(math.prod(slot_shape(t, event_rank)) for t in targets)


def buffer_memory_bytes(targets: Sequence[TargetSpec], capacity: int, dtype: torch.dtype,
                        event_rank: int | None = None) -> int:
    """Bytes a ``DeltaRingBuffer`` of these targets allocates: ``capacity * slot entries *
    bytes``."""
    return (int(capacity) * slot_numel(targets, event_rank)
            * torch.tensor([], dtype=dtype).element_size())


def default_memory_budget(device: torch.device | str, fraction: float = 0.5) -> int:
    """``fraction`` of the memory free now on ``device`` (CUDA: mem_get_info; CPU:
    ``host_available``, MemAvailable or what a cgroup memory limit leaves, the smaller)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memory budget fraction must be in (0, 1], got {fraction}")
    device = torch.device(device)
    match device.type:
        case "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        case "cpu":
            free = host_available().bytes
        case other:
            raise ValueError(
                f"no free-memory query for device type {other!r}; pass an explicit budget in bytes"
            )
    return int(free * fraction)


def host_available() -> HostMemory:
    """Host memory this process may allocate now: ``MemAvailable``, or what its cgroup's
    memory limit leaves when smaller (a SLURM job, a container: ``core.host_memory``)."""
    available = memory_available()
    if available is None:
        raise ValueError("cannot read MemAvailable from /proc/meminfo on this system; pass an "
                         "explicit buffer memory budget in bytes")
    return available


def cgroup_note(host: HostMemory) -> str:
    """The line an error quoting host memory ``host`` adds when a cgroup limit sets it, so the
    user knows why it is below the machine's; "" otherwise."""
    return f"\nHost memory available, {host.bytes / _GIB:.3f} GiB, is {host.note()}." \
        if host.limited else ""


def check_buffer_memory(
    targets: Sequence[TargetSpec],
    capacity: int,
    dtype: torch.dtype,
    budget_bytes: int | None = None,
    device: torch.device | str = "cpu",
    event_rank: int | None = None,
    min_samples: int | None = None,
) -> int:
    """Raise ``ValueError`` before training if the buffer would not fit; return its bytes.

    ``budget_bytes=None`` means ``default_memory_budget(device)``. The error states the need, the
    budget, and what each remedy (bf16 storage, smaller capacity, fewer targets) would give;
    a capacity below ``min_samples`` (``runner.min_samples``) is suggested with it lowered too.
    """
    check_storage_dtype(dtype)
    needed = buffer_memory_bytes(targets, capacity, dtype, event_rank)
    budget = default_memory_budget(device) if budget_bytes is None else int(budget_bytes)
    if needed <= budget:
        return needed
    raise ValueError(_memory_error(targets, capacity, dtype, needed, budget, torch.device(device),
                                   event_rank, min_samples))


def sae_min_bytes(targets: Sequence[TargetSpec], n_latents: int, batch_size: int,
                  event_rank: int | None = None, b_dec: bool | None = None) -> int:
    """A lower bound of the bytes training the SAE takes (fp32): its factored directions
    (``2 N sum_p r_p (m_p + n_p)`` weights) with their gradients and Adam's two moments, its
    decoder bias (the targets' full size ``D`` with its gradient and moments, 4 D, when
    ``b_dec`` is true; none when false; None: trained for dense samples, as ``sae.use_b_dec``'s
    default), one batch of samples, the encoder's intermediate that
    autograd keeps for backward (dense samples: ``[batch, m_p, N r_p]`` per matrix target) and
    the two ``[N r_p, N r_p]`` Grams per matrix target whose product is the decoder Gram of the
    factored loss (kept for backward, ``core.factored.cross_gram``). Backward's temporaries
    come on top: measured peaks are up to ``SAE_BOUND_RATIO`` times this bound."""
    weights = 2 * n_latents * sum(t.factored_numel for t in targets)
    trained_bias = event_rank is None if b_dec is None else b_dec
    bias = 4 * sum(t.numel for t in targets) if trained_bias else 0
    matrices = [t for t in targets if t.is_matrix]
    encode = 0 if event_rank is not None else batch_size * n_latents * sum(
        t.shape[0] * t.rank for t in matrices)
    grams = sum(2 * (n_latents * t.rank) ** 2 for t in matrices)
    floats = (4 * weights + bias + batch_size * slot_numel(targets, event_rank) + encode
              + grams)
    return 4 * floats


SAE_BOUND_RATIO = 3
"""Measured training peaks over ``sae_min_bytes`` on the tiny model's 14 targets (CPU, the
process's peak RSS over the SAE's first 3 steps, n_latents 500-4000, batch 8-128): 1.20-2.28
(``scripts/bench_sae_bound.py``, docs/benchmarks.md). ``check_sae_memory`` suggests values
whose bound is this many times below what is free."""


def check_sae_memory(targets: Sequence[TargetSpec], n_latents: int, batch_size: int,
                     budget_bytes: int, device: torch.device | str,
                     event_rank: int | None = None, b_dec: bool | None = None) -> None:
    """Raise ``ValueError`` before training if even the lower bound ``sae_min_bytes`` exceeds
    ``budget_bytes`` (the memory free besides the buffer), suggesting ``sae.n_latents`` and
    ``sae.batch_size`` values whose bound is ``SAE_BOUND_RATIO`` times below it. Settings
    under the bound pass: the check refuses only what cannot run."""
    need = sae_min_bytes(targets, n_latents, batch_size, event_rank, b_dec)
    if need <= budget_bytes:
        return
    budget = max(int(budget_bytes), 0)
    room = budget // SAE_BOUND_RATIO
    latents = _largest(lambda n: sae_min_bytes(targets, n, batch_size, event_rank, b_dec)
                       <= room, n_latents)
    samples = _largest(lambda b: sae_min_bytes(targets, n_latents, b, event_rank, b_dec)
                       <= room, batch_size)
    samples = samples if samples >= 2 else 0  # the loss needs two samples' spread
    lines = [f"the SAE needs more than {need / _GIB:.3f} GiB to train with sae.n_latents="
             f"{n_latents} and sae.batch_size={batch_size} (a lower bound: its directions with "
             f"their gradients and Adam moments, its decoder bias, a batch of samples of "
             f"{slot_numel(targets, event_rank)} entries, the encoder's activations and the "
             f"loss's Grams) but "
             f"{budget / _GIB:.3f} GiB is free on {torch.device(device)} besides the buffer; "
             f"training takes up to {SAE_BOUND_RATIO}x this bound (measured). To fit:"]
    lines.append(f"  - sae.n_latents={latents}, with this batch" if latents else
                 "  - sae.n_latents: even 1 latent is too many with this batch")
    lines.append(f"  - sae.batch_size={samples}, with these latents" if samples else
                 "  - sae.batch_size: even 2 samples (the fewest) are too many with these "
                 "latents")
    if (event_rank is None) if b_dec is None else b_dec:
        saved = 4 * 4 * sum(t.numel for t in targets)
        lines.append(f"  - sae.use_b_dec=false: no decoder bias, {saved / _GIB:.3f} GiB less "
                     "(the bias, its gradient and Adam moments: the targets' full size, 4 times)")
    lines.append("  - fewer targets via capture.targets, or a smaller sae.rank")
    raise ValueError("\n".join(lines))


def checkpoint_host_bytes(targets: Sequence[TargetSpec], n_latents: int, capacity: int,
                          dtype: torch.dtype, event_rank: int | None = None,
                          b_dec: bool | None = None) -> int:
    """Host memory a step checkpoint of an accelerator run holds while it is written: the ring
    buffer copied off the device (``capacity`` slots, a full buffer) and the SAE's parameters
    with Adam's two moments, copied so the SAE trains on meanwhile (``resume.snapshot_step``).
    A lower bound: safetensors 0.8 writes these copies without another (older versions copy
    each tensor once more)."""
    weights = 2 * n_latents * sum(t.factored_numel for t in targets) + n_latents
    trained_bias = event_rank is None if b_dec is None else b_dec
    bias = sum(t.numel for t in targets) if trained_bias else 0
    return buffer_memory_bytes(targets, capacity, dtype, event_rank) + 3 * 4 * (weights + bias)


def check_checkpoint_host_memory(need: int, available: int, device: torch.device | str,
                                 capacity: int, per_slot: int) -> None:
    """Refuse an accelerator run whose step checkpoints (``checkpoint_host_bytes``) would not fit
    in host memory: the process would be killed at its first checkpoint, hours in."""
    if need <= available:
        return
    room = max(available - (need - capacity * per_slot), 0) // per_slot
    lines = [f"each step checkpoint copies the ring buffer and the SAE with its Adam state from "
             f"{torch.device(device)} to host memory, {need / _GIB:.3f} GiB, but "
             f"{max(available, 0) / _GIB:.3f} GiB of host memory is available: the run would be "
             f"killed at its first checkpoint. To fit:",
             "  - runner.checkpoint_every=0 (in a script, the trainer's save_strategy='no'): "
             "no resumable step checkpoints; a killed run cannot resume, the shards are still "
             "written at the end"]
    lines.append(f"  - capture.capacity={room}: the largest buffer whose copy fits" if room >= 2
                 else "  - capture.capacity: even 2 slots do not fit beside the SAE's copy")
    lines.append("  - capture.storage_dtype=bfloat16, or capture.granularity=group (per-event "
                 "samples are far smaller), or fewer targets via capture.targets")
    raise ValueError("\n".join(lines))


def _largest(fits, upper: int) -> int:
    """The largest ``n`` in ``[1, upper]`` with ``fits(n)`` (monotone), or 0 when none."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _memory_error(
    targets: Sequence[TargetSpec],
    capacity: int,
    dtype: torch.dtype,
    needed: int,
    budget: int,
    device: torch.device,
    event_rank: int | None = None,
    min_samples: int | None = None,
) -> str:
    per_slot = buffer_memory_bytes(targets, 1, dtype, event_rank)
    entries = slot_numel(targets, event_rank)
    fits = max(budget, 0) // per_slot
    lines = [
        f"the delta buffer needs {needed / _GIB:.3f} GiB ({needed} bytes: capture.capacity="
        f"{capacity} slots x {entries} entries x {per_slot // entries} "
        f"bytes) but the budget on {device} is {max(budget, 0) / _GIB:.3f} GiB "
        f"({max(budget, 0)} bytes). To fit:",
    ]
    if dtype == torch.float32:
        half = buffer_memory_bytes(targets, capacity, torch.bfloat16, event_rank)
        verdict = "fits" if half <= budget else "still too large"
        lines.append(f"  - capture.storage_dtype=bfloat16: {half / _GIB:.3f} GiB ({verdict})")
    if fits >= 1:
        also = (f" with runner.min_samples={fits} (now {min_samples}: the SAE starts once that "
                "many samples are buffered, so it cannot exceed the capacity)"
                if min_samples is not None and fits < min_samples else "")
        lines.append(
            f"  - capture.capacity={fits}{also}: {fits * per_slot / _GIB:.3f} GiB (the largest "
            "that fits)"
        )
    else:
        lines.append(
            f"  - capture.capacity: even 1 slot ({per_slot / _GIB:.3f} GiB) exceeds the budget"
        )
    biggest = sorted(targets, key=lambda t: slot_numel([t], event_rank), reverse=True)[:3]
    costs = ", ".join(
        f"{t.name} {buffer_memory_bytes([t], capacity, dtype, event_rank) / _GIB:.3f} GiB"
        for t in biggest
    )
    lines.append(
        f"  - fewer targets via capture.targets ({len(targets)} now); the largest cost: {costs}"
    )
    return "\n".join(lines)
