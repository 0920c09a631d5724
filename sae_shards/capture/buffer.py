"""Ring buffer of deltas on the SAE's device, written by the capture callback, sampled by the SAE.

One *slot* holds one sample (``{target: tensor of the target's shape}``, or with ``event_rank``
the factors ``[event_rank, m + n]`` of a per-event sample, ``core/events.py``) and its
``StepMeta``. A mixture of experts' stacked ``[E, m, n]`` target is stored whole and read out
as one ``[batch, m, n]`` view per expert under the SAE's names (``core/targets.py``).
Writers fill a slot in place::

    slot, views = buffer.begin_write()      # views[name]: [*shape], storage dtype
    views[name].copy_(fp32_delta)           # rounds to bf16 here if storage is bf16
    buffer.commit(slot, meta)               # now the slot can be sampled

The delta itself is always computed in fp32 by the writer; with bf16 storage only the stored copy
is rounded. A background SAE thread may call ``sample`` while the RL thread writes: a lock guards
the slot bookkeeping only. A reader picks its slots and marks them as being read (a count per
slot) under the lock, gathers them without it, then unmarks them; ``begin_write`` waits only
while readers still hold the one slot it hands out (the oldest, at the write index), so a writer
never overwrites a slot being read and is not held up by gathers of other slots. A drawn slot
among the next ``EARLY_SLOTS`` to be written is copied out first and released at once, so the
writer waits for one sample's copy at most, unless it commits more than ``EARLY_SLOTS`` samples
during one gather. A slot between ``begin_write`` and ``commit`` is never handed out. On CUDA,
CUDA events order the writer's kernels before any read of the slot and every earlier read before
the next overwrite, whichever streams the two threads use.

A reader that lags behind the writer (the thread runner's worker) reads the buffer as it was at
a push, not as it is when the reader gets there: it draws from a ``SampleWindow`` (the samples
committed as the ``start``-th to the ``end - 1``-th, counting every commit), ``hold``-s the
commits it may still read (the window's, and any others it reads by slot) until it is done, and
``begin_write`` waits rather than overwrite a held sample. What it reads then depends on the
pushes alone, not on how far ahead the writer got.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch

from sae_shards.core.events import slot_shape
from sae_shards.core.targets import TargetSpec, split_stacked

STORAGE_DTYPES = (torch.float32, torch.bfloat16)
EARLY_SLOTS = 2
"""A gather copies out first, and releases at once, drawn slots among the next this many writes."""


@dataclass(frozen=True)
class StepMeta:
    """What is known about the RL step whose sample a slot holds."""

    global_step: int
    """``state.global_step`` after the optimizer step that produced the sample (1-based)."""
    reward_mean: float = math.nan
    """Mean reward of the step's completions; nan when unknown."""
    reward_std: float = math.nan
    """Standard deviation of the step's rewards; nan when unknown."""
    task_labels: tuple[str, ...] = ()
    """Tasks active in the step (e.g. ``("A",)``); empty when the task provides none."""
    heldout: bool = False
    """Held out from SAE training (``sample`` never draws it); kept for held-out evaluation."""
    event: int = -1
    """Per-event samples: the event's index in the step's generation batch (its prompt group, or
    its completion); -1 for a per-step sample."""
    rows: tuple[int, ...] = ()
    """Per-event samples: the completions (indices into the step's ``rollouts.jsonl`` row) whose
    gradient the sample is."""
    advantage: float = math.nan
    """Per-event samples: the mean advantage of its completions (about 0 for a GRPO group, whose
    advantages are normalised within it; each completion's is in ``rollouts.jsonl``)."""
    norm: float = math.nan
    """Per-event samples: the event's norm before ``capture.normalize`` (after preconditioning)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_labels", tuple(str(t) for t in self.task_labels))
        object.__setattr__(self, "rows", tuple(int(r) for r in self.rows))


class BufferSample(NamedTuple):
    """A batch drawn from the buffer."""

    batch: dict[str, torch.Tensor]
    """``{target: fp32 tensor [batch, *shape]}`` on the buffer's device, under the SAE's target
    names (``expand_stacked`` of the buffer's targets)."""
    slots: torch.Tensor
    """``LongTensor [batch]`` on CPU: the slot each row came from (for ``metadata``)."""


class SampleWindow(NamedTuple):
    """The samples a lagging reader may draw: those committed as the ``start``-th to the
    ``end - 1``-th (counting every commit from 0, overwritten ones included)."""

    start: int
    end: int


WAIT_POLL_S = 0.05
"""The longest a writer waiting for a held window goes without calling ``on_wait`` (a hung or
late reader must not block the writer silently; it also calls it on every wake-up)."""


class DeltaRingBuffer:
    """Preallocated ``[capacity, *shape]`` tensors per target; new samples replace the oldest.

    Slots are written in order 0, 1, ..., capacity - 1, 0, ...; the write index advances on
    ``commit``. Only committed slots are sampled, counted by ``len`` or listed by
    ``chronological_slots``. One writer at a time.
    """

    def __init__(
        self,
        targets: Sequence[TargetSpec],
        capacity: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        event_rank: int | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capture.capacity must be >= 1 slot, got {capacity}")
        check_storage_dtype(dtype)
        names = [t.name for t in targets]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"buffer targets must be non-empty and unique, got {names}")
        stacked = [t.name for t in targets if t.is_stacked]
        if stacked and event_rank is not None:
            raise ValueError(f"stacked expert targets {stacked[:3]} cannot be stored per event; "
                             "capture them per step (capture.granularity=step)")
        self.targets = list(targets)
        """The capture's targets, as written (a stacked expert tensor whole); ``sample`` and
        ``gather`` return the SAE's, ``expand_stacked(targets)``."""
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.dtype = dtype
        self.event_rank = event_rank
        """None: dense samples; else per-event factors with this many rows per matrix target."""
        self._data = {  # name -> [capacity, *slot_shape]
            t.name: torch.zeros((self.capacity, *slot_shape(t, event_rank)), dtype=dtype,
                                device=self.device)
            for t in self.targets
        }
        self._meta: list[StepMeta | None] = [None] * self.capacity  # None: slot holds no sample
        self._filled = torch.zeros(self.capacity, dtype=torch.bool)  # [capacity] committed slots
        self._heldout = torch.zeros(self.capacity, dtype=torch.bool)  # [capacity] not for training
        self._next = 0  # the slot the next begin_write hands out
        self._writing: int | None = None
        self._n_pushed = 0
        self._held: list[int] = []  # per hold, the first commit a lagging reader may still read
        self.on_wait: Callable[[], None] | None = None
        """Called at least every ``WAIT_POLL_S`` while ``begin_write`` waits for a held sample
        (the thread runner raises there if its worker failed or hangs)."""
        self.on_waited: Callable[[float], None] | None = None
        """Called with the seconds ``begin_write`` waited for a held sample, after a wait (the
        thread runner tells ``runner.sae_budget`` that RL was held up, not working)."""
        self._lock = threading.Lock()
        self._unread = threading.Condition(self._lock)  # notified when a slot's readers reach 0
        self._readers = [0] * self.capacity  # gathers in progress that read each slot
        self._write_done: torch.cuda.Event | None = None  # CUDA only: last commit's kernels
        # CUDA only: per reading stream, the last gather's event (a later gather on the same
        # stream covers the earlier ones; gathers on different streams are not ordered).
        self._read_done: dict[tuple[int, int], torch.cuda.Event] = {}

    # ---- writing ----------------------------------------------------------------------------

    def begin_write(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Claim the next slot; return it and ``{target: view [*shape]}`` to fill in place.

        The slot's old sample is dropped now (it is no longer sampled). Views have the storage
        dtype: fill them with ``view.copy_(fp32_delta)`` or write with ``out=`` when storage is
        fp32. Finish with ``commit`` (or ``abort``).
        """
        with self._lock:
            if self._writing is not None:
                raise RuntimeError(
                    f"slot {self._writing} is still being written; commit or abort it first "
                    "(the buffer takes one writer at a time)"
                )
            slot = self._next
            waited_from = None
            # a filled next slot holds the oldest sample, the (n_pushed - n_filled)-th commit
            while self._filled[slot] and self._held and \
                    self._n_pushed - int(self._filled.sum()) >= min(self._held):
                waited_from = waited_from or time.perf_counter()
                # at every wake-up, not only on a timeout: a late reader's gathers notify too
                self._unread.wait(WAIT_POLL_S)
                if self.on_wait is not None:
                    self.on_wait()  # may raise: nothing is claimed yet
            self._writing = slot
            self._meta[slot] = None
            self._filled[slot] = False  # no new reader picks it from now on
            # Gathers that picked the slot earlier finish first; gathers of other slots go on.
            self._unread.wait_for(lambda: self._readers[slot] == 0)
            read_done = list(self._read_done.values())
        if waited_from is not None and self.on_waited is not None:
            self.on_waited(time.perf_counter() - waited_from)
        for event in read_done:  # earlier gathers must finish before the slot is overwritten
            torch.cuda.current_stream(self.device).wait_event(event)
        return slot, {name: data[slot] for name, data in self._data.items()}

    def commit(self, slot: int, meta: StepMeta) -> None:
        """Mark ``slot`` (from ``begin_write``) as holding the sample of ``meta``."""
        event = self._record_event()
        with self._lock:
            self._check_writing(slot)
            self._meta[slot] = meta
            self._filled[slot] = True
            self._heldout[slot] = meta.heldout
            self._n_pushed += 1
            self._next = (slot + 1) % self.capacity
            self._writing = None
            if event is not None:
                self._write_done = event

    def abort(self, slot: int) -> None:
        """Give up writing ``slot``: it stays empty and the next ``begin_write`` reuses it."""
        with self._lock:
            self._check_writing(slot)
            self._writing = None

    def push(self, delta: Mapping[str, torch.Tensor], meta: StepMeta) -> int:
        """Copy one sample ``{target: [*shape]}`` into the next slot, commit it, return the slot."""
        slot, views = self.begin_write()
        try:
            for name, view in views.items():
                if name not in delta or tuple(delta[name].shape) != tuple(view.shape):
                    got = tuple(delta[name].shape) if name in delta else "missing"
                    raise ValueError(
                        f"target {name!r}: pushed delta has shape {got}, the buffer expects "
                        f"{tuple(view.shape)}"
                    )
                view.copy_(delta[name])
        except BaseException:
            self.abort(slot)
            raise
        self.commit(slot, meta)
        return slot

    # ---- reading ----------------------------------------------------------------------------

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        recent_frac: float = 0.0,
        recent_window: int | None = None,
        window: SampleWindow | None = None,
    ) -> BufferSample:
        """Draw ``batch_size`` committed slots uniformly, with replacement, and gather them in fp32.

        With ``recent_frac > 0``, the first ``n_recent = round(recent_frac * batch_size)`` rows are
        drawn uniformly (with replacement) from the ``recent_window`` newest committed slots
        (default ``batch_size``; clamped to ``len(self)``), the remaining rows from all committed
        slots, so the newest samples are seen more often. ``generator`` is a CPU generator.
        ``window``: draw only from its samples (kept with ``hold``), as if the buffer were as it
        was at its ``end``.
        """
        if batch_size < 1:
            raise ValueError(f"sample batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= recent_frac <= 1.0:
            raise ValueError(f"recent_frac must be in [0, 1], got {recent_frac}")
        with self._lock:
            committed = self._trainable_locked(window)  # [n], oldest first
            if committed.numel() == 0:
                raise RuntimeError(
                    "cannot sample from an empty DeltaRingBuffer: no trainable slot has been "
                    "committed yet (push at least one delta that is not held out first)"
                )
            slots = _draw(committed, batch_size, generator, recent_frac, recent_window)
            marked = self._mark_locked(slots)
        return BufferSample(self._gather_marked(slots, marked), slots)

    def gather(self, slots: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """``{target: fp32 [len(slots), *shape]}`` of the given committed slots (e.g. held out),
        under the SAE's target names (``expand_stacked``: a stacked target as one view per
        expert)."""
        slots = torch.as_tensor(slots, dtype=torch.long).reshape(-1)
        with self._lock:
            empty = [s for s in slots.tolist() if not 0 <= s < self.capacity or not self._filled[s]]
            if empty:
                raise KeyError(f"slots {empty[:5]} hold no committed sample")
            marked = self._mark_locked(slots)
        return self._gather_marked(slots, marked)

    def metadata(self, slot: int) -> StepMeta:
        """The ``StepMeta`` of a committed slot."""
        with self._lock:
            meta = self._meta[slot]
        if meta is None:
            raise KeyError(f"slot {slot} holds no committed sample")
        return meta

    def chronological_slots(self) -> torch.Tensor:
        """Committed slots, oldest sample first, as a ``LongTensor [len(self)]`` on CPU."""
        with self._lock:
            return self._chronological_locked()

    def __len__(self) -> int:
        with self._lock:
            return int(self._filled.sum())

    @property
    def n_trainable(self) -> int:
        """Committed slots that ``sample`` may draw (not held out)."""
        with self._lock:
            return int((self._filled & ~self._heldout).sum())

    def n_trainable_in(self, window: SampleWindow) -> int:
        """Slots ``sample(window=window)`` may draw."""
        with self._lock:
            return self._trainable_locked(window).numel()

    # ---- lagging readers ----------------------------------------------------------------------

    def window(self, reserve: int) -> SampleWindow:
        """The samples committed so far, less the oldest ``reserve`` of a full ring: those the
        next ``reserve`` writes may overwrite while a lagging reader works on this window."""
        with self._lock:
            end = self._n_pushed
        return SampleWindow(max(0, end - self.capacity + reserve), end)

    def hold(self, first: int) -> None:
        """Keep the samples committed as the ``first``-th and after from being overwritten
        until ``release(first)``: ``begin_write`` waits instead."""
        with self._lock:
            self._held.append(first)

    def release(self, first: int) -> None:
        """Undo one ``hold(first)`` (a no-op if none is left)."""
        with self._lock:
            if first in self._held:
                self._held.remove(first)
            self._unread.notify_all()

    def release_all(self) -> None:
        """Undo every ``hold`` (a stopped reader draws nothing more)."""
        with self._lock:
            self._held.clear()
            self._unread.notify_all()

    @property
    def n_pushed(self) -> int:
        """Samples ever committed (including those since overwritten)."""
        return self._n_pushed

    # ---- resume -----------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to rebuild the buffer: ``({"buffer.<target>": [n_filled, *shape]
        (the committed slots only, in slot order), "buffer.filled" [capacity], "buffer.heldout"
        [capacity]}, {"next", "n_pushed", "meta": [StepMeta or None]})`` (tensors and JSON-able
        data only)."""
        with self._lock:
            if self._writing is not None:
                raise RuntimeError(f"slot {self._writing} is being written; save between steps")
            filled = self._filled.nonzero().flatten().to(self.device)  # [n_filled]
            # Slots fill in ring order from 0, so the committed slots are a prefix until the ring
            # wraps and all of them after: saved as views, with no copy on the CPU (the caller
            # writes them before the next step; the runner is idle, so nothing writes to them).
            n = filled.numel()
            prefix = n == 0 or int(filled[-1]) == n - 1
            tensors = {f"buffer.{name}": (data[:n] if prefix else data.index_select(0, filled))
                       .cpu() for name, data in self._data.items()}
            tensors["buffer.filled"] = self._filled.clone()
            tensors["buffer.heldout"] = self._heldout.clone()
            meta = [None if m is None else dataclasses.asdict(m) for m in self._meta]
            return tensors, {"next": self._next, "n_pushed": self._n_pushed, "meta": meta}

    def load_state(self, tensors: Mapping[str, torch.Tensor], info: Mapping) -> None:
        """Restore what ``state`` returned (same targets, capacity and storage dtype)."""
        filled = tensors["buffer.filled"]
        if tuple(filled.shape) != (self.capacity,) or len(info["meta"]) != self.capacity:
            raise ValueError(f"saved buffer has {len(info['meta'])} slots, this one "
                             f"{self.capacity}; resume with the run's own capture.capacity")
        slots = filled.nonzero().flatten()  # [n_filled]
        for name, data in self._data.items():
            saved = tensors[f"buffer.{name}"]
            want = (slots.numel(), *data.shape[1:])
            if tuple(saved.shape) != want or saved.dtype != data.dtype:
                raise ValueError(
                    f"saved buffer target {name!r} is {saved.dtype} {tuple(saved.shape)}, this "
                    f"buffer needs {data.dtype} {want}: resume with the run's own "
                    "capture.capacity, capture.storage_dtype and targets")
        with self._lock:
            self._unread.wait_for(lambda: not any(self._readers))
            for name, data in self._data.items():
                data.zero_()
                data.index_copy_(0, slots.to(self.device), tensors[f"buffer.{name}"].to(self.device))
            self._filled.copy_(filled)
            self._heldout.copy_(tensors["buffer.heldout"])
            self._meta = [None if m is None else _step_meta(m) for m in info["meta"]]
            self._next, self._n_pushed = int(info["next"]), int(info["n_pushed"])

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the sample storage."""
        return sum(d.numel() * d.element_size() for d in self._data.values())

    @property
    def sample_numel(self) -> int:
        """Entries of one slot's sample over all targets (a gathered sample is this many fp32)."""
        return sum(d[0].numel() for d in self._data.values())

    # ---- internals --------------------------------------------------------------------------

    def _check_writing(self, slot: int) -> None:
        if self._writing != slot:
            raise RuntimeError(
                f"slot {slot} is not being written (begin_write handed out {self._writing})"
            )

    def _mark_locked(
        self, slots: torch.Tensor
    ) -> tuple[list[int], torch.cuda.Event | None, list[int]]:
        """Mark committed ``slots`` as being read (under the lock, where they were picked), so
        ``begin_write`` cannot hand one out until ``_gather_marked`` is done with it. Also returns
        those of them the next ``EARLY_SLOTS`` writes take, soonest first."""
        unique = slots.unique().tolist()
        for s in unique:
            self._readers[s] += 1
        soon = [(self._next + i) % self.capacity for i in range(min(EARLY_SLOTS, self.capacity))]
        return unique, self._write_done, [s for s in soon if s in unique]

    def _unmark(self, slots: Sequence[int], event: torch.cuda.Event | None) -> None:
        with self._lock:
            if event is not None:  # before the slots are unmarked: begin_write reads it then
                stream = torch.cuda.current_stream(self.device)
                self._read_done[(stream.device_index, stream.stream_id)] = event
            for s in slots:
                self._readers[s] -= 1
            self._unread.notify_all()

    def _gather_marked(
        self, slots: torch.Tensor, marked: tuple[list[int], torch.cuda.Event | None, list[int]]
    ) -> dict[str, torch.Tensor]:
        """Gather ``slots`` (marked by ``_mark_locked``) without the lock, then unmark them.

        Drawn slots that the next writes take are copied out first, one by one, and unmarked at
        once: a writer waits for one sample's copy at most, not for the whole batch (unless it
        laps the gather by more than ``EARLY_SLOTS`` commits)."""
        unique, write_done, soon = marked
        held = [s for s in unique if s not in soon]
        event = None
        try:
            if write_done is not None:  # committed kernels finish before our gather
                torch.cuda.current_stream(self.device).wait_event(write_done)
            early: dict[int, dict[str, torch.Tensor]] = {}  # slot -> name -> [*shape] fp32 copy
            for s in list(soon):
                early[s] = {name: data[s].to(torch.float32, copy=True)
                            for name, data in self._data.items()}
                self._unmark([s], self._record_event())
                soon.remove(s)
            if held:  # rows of early slots read another slot here and are filled in below
                index = slots.masked_fill(torch.isin(slots, torch.tensor(list(early),
                                                                        dtype=torch.long)),
                                          held[0]).to(self.device)  # [batch]
                batch = {name: data.index_select(0, index).float()
                         for name, data in self._data.items()}
            else:
                batch = {name: torch.empty((len(slots), *data.shape[1:]), dtype=torch.float32,
                                           device=self.device)
                         for name, data in self._data.items()}
            for s, copies in early.items():
                rows = (slots == s).nonzero().squeeze(1).to(self.device)  # [n]
                for name, x in batch.items():
                    x[rows] = copies[name]
            event = self._record_event()
        finally:
            self._unmark(held + soon, event)  # soon: what an error left marked
        return split_stacked(batch, self.targets)  # {SAE target: [batch, *shape]}

    def _trainable_locked(self, window: SampleWindow | None) -> torch.Tensor:
        """Committed slots not held out (within ``window`` if given), oldest first. ``[n]``"""
        committed = self._chronological_locked()  # [n_committed], oldest first
        keep = ~self._heldout[committed]  # held-out slots are never trained on
        if window is not None:  # the committed samples are always the newest commits (each
            # write drops the oldest), so the i-th oldest is the (n_pushed - n + i)-th
            seq = torch.arange(self._n_pushed - committed.numel(), self._n_pushed)  # [n]
            keep &= (seq >= window.start) & (seq < window.end)
        return committed[keep]

    def _chronological_locked(self) -> torch.Tensor:
        # Slots are written strictly in ring order, so the oldest sample sits at the first
        # committed slot at or after the next write position.
        ring = torch.arange(self.capacity).roll(-self._next)  # [capacity], oldest position first
        return ring[self._filled[ring]]

    def _record_event(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


def _draw(
    committed: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None,
    recent_frac: float,
    recent_window: int | None,
) -> torch.Tensor:
    """Indices into the buffer: recent rows first (see ``DeltaRingBuffer.sample``). ``[batch]``."""
    if recent_window is not None and recent_window < 1:
        raise ValueError(f"recent_window must be >= 1 slot, got {recent_window}")
    n_recent = round(recent_frac * batch_size)
    window = min(batch_size if recent_window is None else recent_window, committed.numel())
    recent = committed[-window:]
    pick_recent = torch.randint(window, (n_recent,), generator=generator)
    pick_all = torch.randint(committed.numel(), (batch_size - n_recent,), generator=generator)
    return torch.cat([recent[pick_recent], committed[pick_all]])


def _step_meta(saved: Mapping) -> StepMeta:
    """A ``StepMeta`` from its saved JSON (NaN rewards were written as null)."""
    nan_if_none = {k: math.nan if saved[k] is None else saved[k]
                   for k in ("reward_mean", "reward_std", "advantage", "norm") if k in saved}
    return StepMeta(**{**saved, **nan_if_none, "task_labels": tuple(saved["task_labels"]),
                       "rows": tuple(saved.get("rows", ()))})


def check_storage_dtype(dtype: torch.dtype) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"capture.storage_dtype {dtype} is not supported; use float32 or bfloat16 "
            "(float16 flushes typical RL deltas of 1e-6..1e-4 to zero or subnormals)"
        )


# ---- memory budget ------------------------------------------------------------------------
