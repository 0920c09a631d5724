"""Training the SAE beside the RL run: what happens per captured delta, inline or in a thread.

``SAEWorkLoop.process(slot)`` is the unit of work for one captured delta: record the sample's
activations under the current SAE and run SAE steps on batches sampled from the ring buffer (once
``min_samples`` are buffered and RL reached ``sae_start_step``): ``sae_steps_per_rl_step`` of them,
or with ``sae_budget > 0`` as many as fit in that fraction of the RL run's wall time
(``SAEBudget``).
``InlineRunner`` calls it from the capture callback (the RL step waits for it); ``ThreadRunner``
hands it to a background worker through a bounded queue, so RL waits only when the worker is
``max_lag`` deltas behind, or would overwrite a sample the worker may still draw. The worker
draws each push's batches from the buffer as it was at that push, less the oldest samples RL may
overwrite meanwhile (a held ``SampleWindow``), so a run is reproducible whatever the timing. A
worker error is re-raised in the RL thread at the next push (and at
``finish``), which stops the run; so does a worker that stays busy past ``worker_timeout_s``
(a hung SAE step must not block RL forever). ``wait_idle`` lets the callback checkpoint a
consistent state: every pushed delta processed.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from array import array
from typing import Callable, NamedTuple

import torch

from sae_shards.capture.buffer import DeltaRingBuffer, SampleWindow
from sae_shards.run.config import RunnerConfig, flush_every, push_room
from sae_shards.core.sparsity import SparseCodes
from sae_shards.core.trainer import SAETrainer, StepMetrics

log = logging.getLogger(__name__)

STARVED_PUSHES = 20
"""Pushes in a row without an SAE step, once the SAE may train, after which a budget whose
hooks' time alone exceeds it is reported (``SAEWorkLoop``): the SAE will not train."""


class SAEStepRecord(NamedTuple):
    sae_step: int  # trainer.n_steps after the step
    rl_step: int  # RL step whose push triggered it
    metrics: StepMetrics


class ActivationLog:
    """Which latents each captured sample activated, under the SAE as it was at capture time.

    Kept compact for long runs: the per-sample integers in typed arrays (8 bytes each, not a
    Python int and a list slot), and the codes of recent adds merged into one block every
    ``MERGE_EVERY`` adds (each add's small tensors cost about 1 KB of object and allocator
    overhead beside their payload; merging only the recent adds keeps the work linear)."""

    MERGE_EVERY = 64

    def __init__(self) -> None:
        self.rl_step = array("q")
        self.event = array("q")  # the sample's event in its step (-1: a per-step sample)
        self.sae_step = array("q")
        self.codes: list[SparseCodes] = []  # each [n, k]
        self._merged = 0  # leading blocks of codes that are merges of MERGE_EVERY adds

    def __len__(self) -> int:
        return len(self.rl_step)

    def add(self, rl_steps: list[int], sae_step: int, codes: SparseCodes,
            events: list[int] | None = None) -> None:
        """Record ``codes`` ([n, k]) of the samples of ``rl_steps`` (n of them; ``events``: their
        event ids, default -1)."""
        self.rl_step.extend(rl_steps)
        self.event.extend([-1] * len(rl_steps) if events is None else events)
        self.sae_step.extend([sae_step] * len(rl_steps))
        self.codes.append(SparseCodes(codes.indices.cpu(), codes.values.float().cpu()))
        if len(self.codes) - self._merged >= self.MERGE_EVERY:  # the adds since the last merge
            self.codes[self._merged:] = [stack_codes(self.codes[self._merged:])]
            self._merged += 1

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "ActivationLog":
        """Inverse of ``tensors`` (one block of codes; logs written before event ids existed
        read as per-step samples)."""
        log = cls()
        log.rl_step = array("q", tensors[f"{prefix}.rl_step"].tolist())
        log.sae_step = array("q", tensors[f"{prefix}.sae_step"].tolist())
        event = tensors.get(f"{prefix}.event")
        log.event = array("q", [-1] * len(log.rl_step) if event is None else event.tolist())
        if log.rl_step:
            log.codes = [SparseCodes(tensors[f"{prefix}.indices"], tensors[f"{prefix}.values"])]
            log._merged = 1
        return log

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix}.rl_step [S]``, ``.event [S]``, ``.sae_step [S]``, ``.indices [S, k]``,
        ``.values [S, k]``."""
        return {
            f"{prefix}.rl_step": _long_tensor(self.rl_step),
            f"{prefix}.event": _long_tensor(self.event),
            f"{prefix}.sae_step": _long_tensor(self.sae_step),
            **{f"{prefix}.{k}": v for k, v in stack_codes(self.codes)._asdict().items()},
        }


def _long_tensor(values: array) -> torch.Tensor:
    """An ``array("q")`` as an int64 tensor of its own memory."""
    return torch.frombuffer(values, dtype=torch.long).clone() if values else \
        torch.zeros(0, dtype=torch.long)


def encode_chunk_slots(sample_numel: int, encode_chunk_mib: int, most: int = 64) -> int:
    """Slots ``encode_buffer`` encodes at once: at most ``most``, and no more than keep a chunk's
    two fp32 copies (gathered and scaled) within ``encode_chunk_mib`` (a large model's dense
    delta: one slot at a time)."""
    copy_bytes = 2 * 4 * sample_numel
    return max(1, min(most, (encode_chunk_mib << 20) // copy_bytes))


def encode_buffer(sae, buffer: DeltaRingBuffer, sae_step: int) -> ActivationLog:
    """Every sample in ``buffer`` (oldest first) encoded by ``sae`` (a ``LowRankSAE``), in chunks
    of ``encode_chunk_slots``; empty when the SAE never trained (no input scale yet). The run's
    final timeline, and that of a killed run re-encoded from its resume file."""
    out = ActivationLog()
    chunk = encode_chunk_slots(buffer.sample_numel, sae.cfg.encode_chunk_mib)
    if sae.input_scale > 0:
        with torch.no_grad():
            for part in buffer.chronological_slots().split(chunk):  # [<= chunk] slots
                x = sae.to_scaled(buffer.gather(part))
                metas = [buffer.metadata(s) for s in part.tolist()]
                out.add([m.global_step for m in metas], sae_step, sae.encode(x),
                        [m.event for m in metas])
    return out


def stack_codes(codes: list[SparseCodes]) -> SparseCodes:
    """Concatenate codes of varying width (batch_topk), padding with value-0 entries."""
    if not codes:
        return SparseCodes(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0))
    width = max(c.indices.shape[1] for c in codes)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return SparseCodes(torch.cat([pad(c.indices) for c in codes]),
                       torch.cat([pad(c.values) for c in codes]))


class SAEBudget:
    """How many SAE steps fit in ``runner.sae_budget`` of the RL run's wall time.

    The budget covers all of sae-shards' work, not the SAE steps alone: "never slow RL by more
    than this fraction". RL time is the wall time since the first push less the time the RL
    thread spent on sae-shards' work: ``charge``-d hook time (capture, rollout logging,
    checkpoint snapshots, activation flushes between pushes) and, inline, the pushes themselves;
    and the time it ``waited`` for a busy thread worker. Every second of it earns ``sae_budget``
    seconds of credit. Each ``process`` spends its own wall time (encode, SAE steps), on
    whichever thread it runs, and ``charge`` the rest. So a thread worker's time is paid for
    once, whether RL runs meanwhile (then it earns) or waits for it (then it does not, as
    inline), and both runners grant the same share of RL time. A push
    runs as many SAE steps as the credit left pays for at the measured cost per step (the first
    one runs one step to measure it). Credit is capped at ``cap_steps`` steps, so a long pause
    does not buy a burst. Thread-safe (the RL thread charges while a worker spends). The counts
    depend on timing: runs with a budget are not bit-reproducible.
    """

    def __init__(self, fraction: float, cap_steps: int = 32,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.fraction = fraction
        self.cap_steps = cap_steps
        self.clock = clock
        self.credit_s = 0.0
        self.step_s: float | None = None  # running mean wall time of one SAE step
        self.paid_s = 0.0
        """All time paid so far (``process`` and ``charge``)."""
        self.earned_from_s = 0.0
        """RL time that earned credit so far."""
        self.resumed_from = (0.0, 0.0)
        """``(paid_s, earned_from_s)`` of the processes this run resumed from, up to the
        checkpoint it resumed from (``totals``; this process's own figures start at 0)."""
        self._origin: float | None = None  # when RL time starts to count: the first push
        self._rl_paid_before = 0.0  # what the RL thread had paid by then
        self._rl_thread = threading.get_ident()  # the thread that charges (builds the run)
        self._lock = threading.Lock()
        self._paid_by: dict[int, float] = {}  # thread id -> seconds paid in that thread
        self._waited_by: dict[int, float] = {}  # thread id -> seconds waited there (``waited``)
        self.waited_s = 0.0
        """All time the RL thread waited for a thread worker (``waited``; not paid again)."""
        self.charged_s = 0.0
        """All time ``charge``-d: sae-shards' work on the RL thread outside ``process``."""

    def steps(self, started: float) -> int:
        """SAE steps to run in the ``process`` that started at ``started``."""
        with self._lock:
            self._earn(started)
            if self.step_s is None:
                return 1
            self.credit_s = min(self.credit_s, self.cap_steps * self.step_s)
            return max(0, int(self.credit_s // self.step_s))  # in debt: none until it is repaid

    def charge(self, seconds: float) -> None:
        """Pay for sae-shards work done on the RL thread outside ``process`` (capture, logs,
        checkpoints, activation flushes; its waits for a thread worker are ``waited``): from the
        credit, and not counted as RL time either. Call it from the RL thread."""
        with self._lock:
            self._rl_thread = threading.get_ident()
            self._pay(seconds)
            self.charged_s += seconds

    def hooks_share(self, since: tuple[float, float] = (0.0, 0.0)) -> float:
        """The ``charge``-d time (the hooks' capture, logging, checkpoints) over the RL time
        that earned credit, since ``since`` (an earlier ``marks()``; default: the start of this
        process); NaN before any RL time. Above ``fraction``, the hooks alone spend more than
        the budget earns and nothing is left for SAE steps."""
        with self._lock:
            rl = self.earned_from_s - since[1]
            return (self.charged_s - since[0]) / rl if rl > 0 else float("nan")

    def marks(self) -> tuple[float, float]:
        """``(charged_s, earned_from_s)`` now, for a later ``hooks_share(since=...)``."""
        with self._lock:
            return self.charged_s, self.earned_from_s

    def starved(self, since: tuple[float, float] = (0.0, 0.0)) -> bool:
        """The hooks' time alone exceeds the budget (``hooks_share``), since ``since``."""
        return self.hooks_share(since) > self.fraction

    def waited(self, seconds: float) -> None:
        """The RL thread waited ``seconds`` for a thread worker (a full queue, a checkpoint's
        ``wait_idle``, a held buffer slot): not RL time, so it earns nothing, and not paid, as the
        worker's ``process`` pays for its own time meanwhile (charging it too would pay for that
        time twice). Call it from the RL thread."""
        with self._lock:
            me = threading.get_ident()
            self._waited_by[me] = self._waited_by.get(me, 0.0) + seconds
            self.waited_s += seconds

    def paid_in_this_thread(self) -> float:
        """Seconds paid so far by calls made in the calling thread."""
        with self._lock:
            return self._paid_by.get(threading.get_ident(), 0.0)

    def accounted_in_this_thread(self) -> float:
        """Seconds paid or ``waited`` so far by calls made in the calling thread: the part of
        its wall time the budget has already accounted for."""
        with self._lock:
            me = threading.get_ident()
            return self._paid_by.get(me, 0.0) + self._waited_by.get(me, 0.0)

    def spent(self, started: float, n_steps: int, steps_s: float) -> None:
        """Charge the ``process`` that started at ``started`` (``steps_s`` of it on SAE steps)."""
        with self._lock:
            if self._origin is None:
                self._earn(started)  # the first push: RL time counts from its start
            self._pay(self.clock() - started)
            if n_steps > 0:
                per_step = steps_s / n_steps
                self.step_s = (per_step if self.step_s is None
                               else 0.8 * self.step_s + 0.2 * per_step)

    def totals(self) -> tuple[float, float]:
        """The whole run's ``(paid_s, earned_from_s)``: this process's and, after a resume,
        those of the processes before it (``resumed_from``), as ``summary.json``'s ``wall_s``."""
        with self._lock:
            return self.resumed_from[0] + self.paid_s, self.resumed_from[1] + self.earned_from_s

    def _earn(self, now: float) -> None:
        """Credit for the RL time up to ``now`` not yet credited. RL time so far can briefly
        read high (a hook whose time is charged when it ends) and is credited only once."""
        rl_paid = (self._paid_by.get(self._rl_thread, 0.0)  # and waited: not RL time either
                   + self._waited_by.get(self._rl_thread, 0.0))
        if self._origin is None:
            self._origin, self._rl_paid_before = now, rl_paid
            return
        rl_s = (now - self._origin) - (rl_paid - self._rl_paid_before) - self.earned_from_s
        if rl_s > 0:
            self.credit_s += self.fraction * rl_s
            self.earned_from_s += rl_s

    def _pay(self, seconds: float) -> None:
        self.credit_s -= seconds
        self.paid_s += seconds
        me = threading.get_ident()
        self._paid_by[me] = self._paid_by.get(me, 0.0) + seconds


def starved_budget_text(fraction: float, share: float, consequence: str) -> str:
    """What to do when ``runner.sae_budget`` does not cover sae-shards' own work on the RL
    thread (``SAEBudget.starved``), which took ``share`` of RL time: ``consequence`` says what
    it did to the SAE."""
    return (f"runner.sae_budget={fraction:g} does not cover sae-shards' own work on the RL "
            f"thread (capture, logging, checkpoints), which took {share:.0%} of RL time: nothing "
            f"is left for SAE steps, so {consequence}. Raise runner.sae_budget well above "
            f"{share:.2f}, capture less (per step instead of per event, or fewer "
            "capture.targets), or set runner.sae_budget=0 to run a fixed "
            "runner.sae_steps_per_rl_step")


class SAEWorkLoop:
    """The SAE's work for each captured delta (used by both runners)."""

    def __init__(self, trainer: SAETrainer, buffer: DeltaRingBuffer, cfg: RunnerConfig,
                 generator: torch.Generator) -> None:
        self.trainer = trainer
        self.buffer = buffer
        self.cfg = cfg
        self.generator = generator
        """CPU generator of the batches drawn from the buffer (saved with resume state)."""
        self.budget = SAEBudget(cfg.sae_budget) if cfg.sae_budget else None
        """``runner.sae_budget > 0``: steps per push set by time, not ``sae_steps_per_rl_step``."""
        self.activations = ActivationLog()
        """Each captured sample under the SAE as it was when the sample arrived (``online``);
        complete after ``flush_activations``."""
        self._pending: list[tuple[int, int, int]] = []  # (slot, rl step, event) not encoded yet
        # Encode pending samples together, before any slot of theirs can be overwritten (RL may
        # be max_lag pushes ahead of the thread worker).
        self._flush_at = flush_every(buffer.capacity, cfg.max_lag)
        self._records: list[SAEStepRecord] = []
        self._lock = threading.Lock()
        self.last_rl_step = 0
        """The last RL step trained (``reached``): the run's ``rl_steps`` and its checkpoints'
        ``rl_step``."""
        self._without_steps = 0  # pushes in a row the budget granted no SAE step
        self._streak_from = (0.0, 0.0)  # the budget's marks() when that streak began
        self._told_starved = False

    def first_read(self, window: SampleWindow, n: int) -> int:
        """The oldest commit ``process`` may read for a push of the newest ``n`` samples at
        ``window.end``: its batches' (``window``), its own samples' and those of earlier pushes
        still waiting to be encoded (fewer than ``_flush_at``, just before its own)."""
        return max(0, min(window.start, window.end - n - (self._flush_at - 1)))

    def room(self, threaded: bool) -> int:
        """The most samples one push may commit without the ring overwriting a slot not yet
        encoded: up to ``_flush_at - 1`` wait in ``_pending``, and a thread worker may have
        ``max_lag`` more pushes queued."""
        return push_room(self.buffer.capacity, self.cfg.max_lag, threaded)

    def flush_activations(self, charge: bool = True) -> None:
        """Encode the samples captured since the last flush with the SAE as it is now, which is
        the SAE they arrived at (it trains only after a flush): one batch instead of one encode
        per push. Call with the runner idle. ``charge``: pay its time from ``runner.sae_budget``
        (``process`` passes False: it charges its whole wall time itself)."""
        sae = self.trainer.sae
        if not self._pending or not sae.input_scale > 0:
            self._pending.clear()  # before the SAE has seen data there is nothing to encode
            return
        t0 = time.perf_counter()
        slots, steps, events = zip(*self._pending)
        for at in range(0, len(slots), 64):
            x = sae.to_scaled(self.buffer.gather(list(slots[at:at + 64])))
            self.activations.add(list(steps[at:at + 64]), self.trainer.n_steps, sae.encode(x),
                                 list(events[at:at + 64]))
        self._pending.clear()
        if charge and self.budget is not None:
            self.budget.charge(time.perf_counter() - t0)

    def process(self, slots: int | list[int], window: SampleWindow | None = None) -> None:
        """The SAE's work for one push: one captured sample (a slot), or the events of one RL
        step (their slots): training runs once per push. ``window``: the samples its batches
        are drawn from (None: the whole buffer as it is now, as inline)."""
        started = self.budget.clock() if self.budget is not None else 0.0
        slots = [slots] if isinstance(slots, int) else list(slots)
        metas = [self.buffer.metadata(s) for s in slots]
        if len(self._pending) + len(slots) > self._flush_at:
            self.flush_activations(charge=False)  # before the ring can overwrite a pending slot
        self._pending.extend((s, m.global_step, m.event) for s, m in zip(slots, metas))
        rl_step = metas[-1].global_step
        n_steps, steps_s = 0, 0.0
        if len(self._pending) >= self._flush_at:
            self.flush_activations(charge=False)
        trainable = (self.buffer.n_trainable if window is None
                     else self.buffer.n_trainable_in(window))
        if rl_step >= self.cfg.sae_start_step and trainable >= self.cfg.min_samples:
            n_steps = (self.budget.steps(started) if self.budget is not None
                       else self.cfg.sae_steps_per_rl_step)
            if self.budget is not None:
                self._note_granted(n_steps)
            if n_steps:
                # the samples so far, under the SAE before this training
                self.flush_activations(charge=False)
            t0 = time.perf_counter()
            for _ in range(n_steps):
                batch = self.buffer.sample(self.trainer.sae.cfg.batch_size, self.generator,
                                           self.cfg.recent_frac, window=window)
                m = self.trainer.step(batch.batch)
                if m is not None:
                    with self._lock:
                        self._records.append(SAEStepRecord(self.trainer.n_steps, rl_step, m))
            steps_s = time.perf_counter() - t0
        if self.budget is not None:
            self.budget.spent(started, n_steps, steps_s)
        self.reached(rl_step)

    def _note_granted(self, n_steps: int) -> None:
        """Warn once when the budget grants no SAE step for ``STARVED_PUSHES`` pushes in a row
        because the hooks' time over that streak alone exceeds it (the SAE will not train)."""
        if n_steps:
            self._without_steps = 0
            return
        if self._without_steps == 0:
            self._streak_from = self.budget.marks()
        self._without_steps += 1
        if (self._without_steps >= STARVED_PUSHES and not self._told_starved
                and self.budget.starved(self._streak_from)):
            self._told_starved = True
            log.warning("%s", starved_budget_text(
                self.cfg.sae_budget, self.budget.hooks_share(self._streak_from),
                f"the SAE has had no step for the last {self._without_steps} captured deltas "
                "and will not train"))

    def reached(self, rl_step: int) -> None:
        """Note that RL has trained through ``rl_step`` (``last_rl_step`` never goes back): a
        step that gave no sample (every group tied, a skipped non-finite update) counts too.
        Thread-safe: the RL thread notes every step, a worker the steps it processes."""
        with self._lock:
            self.last_rl_step = max(self.last_rl_step, rl_step)

    def pop_records(self) -> list[SAEStepRecord]:
        """SAE step figures since the last call (thread-safe; the main thread logs them)."""
        with self._lock:
            out, self._records = self._records, []
        return out


STOP_GRACE_S = 60.0
"""How long stopping a failed run waits for the SAE worker to finish the step in hand: a
thread still inside torch when the interpreter exits aborts the process."""


class SAEWorkerError(RuntimeError):
    """SAE training failed (inline or in the worker); the RL run is stopped."""


class InlineRunner:
    """Runs the SAE work inside the capture callback, on the RL thread."""

    def __init__(self, loop: SAEWorkLoop) -> None:
        self.loop = loop

    def on_push(self, slot: int | list[int]) -> None:
        try:
            self.loop.process(slot)
        except Exception as e:
            raise SAEWorkerError(f"the SAE step failed: {type(e).__name__}: {e}") from e

    def wait_idle(self) -> None:
        """Nothing is pending inline."""

    def finish(self) -> None:
        """Nothing is pending inline."""

    def stop(self, grace_s: float = STOP_GRACE_S) -> bool:
        """Nothing runs beside RL inline: stopped."""
        return True


class Push(NamedTuple):
    """One captured delta handed to the thread worker."""

    slots: int | list[int]
    window: SampleWindow
    """What its batches draw from."""
    first: int
    """The oldest commit the worker may read for it (``SAEWorkLoop.first_read``), held in the
    buffer until the worker is done with it."""


class ThreadRunner:
    """Runs the SAE work on a background thread fed through a bounded queue.

    Each push's batches come from the buffer as it was at that push, less its oldest
    ``(max_lag + 1) x`` the push's samples: the ones RL may overwrite while up to ``max_lag``
    later pushes wait in the queue and one more is written. What the worker may read for a push
    (the window, the push's own samples, earlier ones not yet encoded) is held in the buffer, so
    should RL get further ahead (a larger push later) it waits instead of overwriting it. The SAE a run trains is then the same whatever the timing (not
    the inline runner's, whose batches draw from the whole buffer)."""

    _STOP = None

    def __init__(self, loop: SAEWorkLoop, max_lag: int, timeout_s: float) -> None:
        if loop.buffer.capacity <= max_lag + 1:
            raise ValueError(
                f"capture.capacity={loop.buffer.capacity} must exceed runner.max_lag={max_lag} + 1 "
                "so a queued slot is not overwritten before the SAE worker reads it")
        self.loop = loop
        self.max_lag = max_lag
        self.timeout_s = timeout_s
        self._queue: queue.Queue[Push | None] = queue.Queue(maxsize=max_lag)
        self._error: BaseException | None = None
        self._busy_since: float | None = None  # monotonic start of the slot being processed
        device = loop.buffer.device
        # On CUDA the SAE runs on a stream of its own, so its kernels neither queue behind RL's
        # nor hold them up; the buffer's CUDA events order its gathers against RL's writes.
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._work, name="sae-worker", daemon=True)
        self._thread.start()
        loop.buffer.on_wait = self._check_worker  # RL waiting on a held window
        loop.buffer.on_waited = self._waited
        # A script whose trainer.train() raised (its reward function's error, a second SIGTERM)
        # exits without close(): stop the worker before the interpreter finalises, which would
        # end it inside torch and abort the process (SIGABRT, 'terminate called without an
        # active exception'). The hook holds the runner weakly; finish() and stop() drop it.
        self._exit_hook = _stop_at_exit(weakref.ref(self))
        atexit.register(self._exit_hook)

    def _work(self) -> None:
        # torch's intra-op pool is process-wide: the entry point set its size.
        if self._stream is not None:
            with torch.cuda.device(self._stream.device), torch.cuda.stream(self._stream):
                self._work_loop()
        else:
            self._work_loop()

    def _work_loop(self) -> None:
        while True:
            push = self._queue.get()
            try:
                if push is self._STOP:
                    return
                if self._error is None:  # once failed, drain without working
                    self._busy_since = time.monotonic()
                    self.loop.process(push.slots, push.window)
                    if self._stream is not None:  # idle means done: the RL thread may read
                        self._stream.synchronize()  # the SAE (checkpoints) once we are
            except BaseException as e:  # handed to the RL thread, which raises it
                self._error = e
            finally:
                if push is not self._STOP:
                    self.loop.buffer.release(push.first)
                self._busy_since = None
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise SAEWorkerError(
                f"the SAE worker failed: {type(self._error).__name__}: {self._error}") from self._error

    def _raise_if_hung(self) -> None:
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.timeout_s:
            raise SAEWorkerError(
                f"the SAE worker has been on one captured delta for more than "
                f"runner.worker_timeout_s={self.timeout_s:g} s; the run is stopped rather than "
                "blocking RL (raise the timeout if SAE steps are legitimately this slow)")

    def _check_worker(self) -> None:
        self._raise_if_failed()
        self._raise_if_hung()

    def _wait(self, done) -> None:
        """Poll ``done()`` until true, raising if the worker failed or hangs."""
        t0 = time.perf_counter()
        try:
            while not done():
                self._check_worker()
                time.sleep(0.001)
        finally:
            self._waited(time.perf_counter() - t0)
        self._raise_if_failed()

    def _waited(self, seconds: float) -> None:
        """RL waited ``seconds`` for the worker: the budget's (``SAEBudget.waited``)."""
        if self.loop.budget is not None:
            self.loop.budget.waited(seconds)

    def on_push(self, slots: int | list[int]) -> None:
        self._raise_if_failed()
        n = 1 if isinstance(slots, int) else len(slots)
        window = self.loop.buffer.window(reserve=(self.max_lag + 1) * n)
        push = Push(slots, window, self.loop.first_read(window, n))
        try:
            self.loop.buffer.hold(push.first)  # before the worker can take (and release) it
            try:
                self._queue.put_nowait(push)
                return
            except queue.Full:  # max_lag deltas are already waiting: RL waits for the worker
                t0 = time.perf_counter()
            try:
                while True:
                    try:
                        self._queue.put(push, timeout=0.05)
                        return
                    except queue.Full:
                        self._check_worker()
            finally:
                self._waited(time.perf_counter() - t0)
        except BaseException:  # not queued (a Ctrl-C, a failed worker): nobody else releases it
            self.loop.buffer.release(push.first)
            raise

    def wait_idle(self) -> None:
        """Block until every pushed delta is processed (for a consistent checkpoint)."""
        self._wait(lambda: self._queue.unfinished_tasks == 0)

    def finish(self) -> None:
        """Let the worker drain the queue, stop it, and raise its error if it had one."""
        self.wait_idle()
        self._queue.put(self._STOP)
        self._thread.join()
        atexit.unregister(self._exit_hook)
        self._raise_if_failed()

    def stop(self, grace_s: float = STOP_GRACE_S) -> bool:
        """After a failure (the worker's, a hang, or RL's own): drop the queued deltas, let the
        worker finish the one in hand and end, waiting up to ``grace_s``; never raises. Whether
        it ended (a worker that is truly stuck is left to the process's exit)."""
        if self._error is None:
            self._error = SAEWorkerError("stopped after a failure")  # drain without working
        deadline = time.monotonic() + grace_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(self._STOP, timeout=0.05)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self.loop.buffer.release_all()  # what a stuck worker still held
        if not self._exit_hook.running:  # unregistering inside atexit's own call is not needed
            atexit.unregister(self._exit_hook)
        return not self._thread.is_alive()


def _stop_at_exit(runner_ref: weakref.ref) -> Callable[[], None]:
    """An ``atexit`` hook that stops the worker of ``runner_ref``'s runner, if it still runs."""
    def hook() -> None:
        runner = runner_ref()
        if runner is not None and runner._thread.is_alive():
            hook.running = True
            runner.stop()

    hook.running = False  # type: ignore[attr-defined]
    return hook


def make_runner(loop: SAEWorkLoop, cfg: RunnerConfig) -> InlineRunner | ThreadRunner:
    match cfg.concurrency:
        case "inline":
            return InlineRunner(loop)
        case "thread":
            return ThreadRunner(loop, cfg.max_lag, cfg.worker_timeout_s)
        case other:
            raise ValueError(f"runner.concurrency={other!r}; use inline or thread")
