"""The ring buffer's memory, checked before anything is allocated.

``check_buffer_memory`` compares ``capacity * slot entries * bytes`` with a budget (by default a
share of the device's free memory) and, when it does not fit, says what would: bf16 storage, the
largest capacity that fits, or fewer targets, with values the config accepts.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from sae_shards.capture.buffer import check_storage_dtype
from sae_shards.core.events import slot_shape
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
    """``fraction`` of the memory free now on ``device`` (CUDA: mem_get_info; CPU: MemAvailable)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memory budget fraction must be in (0, 1], got {fraction}")
    device = torch.device(device)
    match device.type:
        case "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        case "cpu":
            free = _cpu_available_bytes()
        case other:
            raise ValueError(
                f"no free-memory query for device type {other!r}; pass an explicit budget in bytes"
            )
    return int(free * fraction)


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except FileNotFoundError:
        pass
    raise ValueError(
        "cannot read MemAvailable from /proc/meminfo on this system; pass an explicit "
        "buffer memory budget in bytes"
    )


def check_buffer_memory(
    targets: Sequence[TargetSpec],
    capacity: int,
    dtype: torch.dtype,
    budget_bytes: int | None = None,
    device: torch.device | str = "cpu",
    event_rank: int | None = None,
) -> int:
    """Raise ``ValueError`` before training if the buffer would not fit; return its bytes.

    ``budget_bytes=None`` means ``default_memory_budget(device)``. The error states the need, the
    budget, and what each remedy (bf16 storage, smaller capacity, fewer targets) would give.
    """
    check_storage_dtype(dtype)
    needed = buffer_memory_bytes(targets, capacity, dtype, event_rank)
    budget = default_memory_budget(device) if budget_bytes is None else int(budget_bytes)
    if needed <= budget:
        return needed
    raise ValueError(_memory_error(targets, capacity, dtype, needed, budget, torch.device(device),
                                   event_rank))


def _memory_error(
    targets: Sequence[TargetSpec],
    capacity: int,
    dtype: torch.dtype,
    needed: int,
    budget: int,
    device: torch.device,
    event_rank: int | None = None,
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
        lines.append(
            f"  - capture.capacity={fits}: {fits * per_slot / _GIB:.3f} GiB (the largest that fits)"
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
