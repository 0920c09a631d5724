"""Per-event capture: one buffer slot per reinforcement event (``capture.granularity``).

``EventCapture`` is the ``TrainerCallback`` counterpart of ``DeltaCapture`` for
``granularity=group`` (one sample per prompt group) and ``completion``. Per optimizer step::

    on_step_begin            EventRecorder.start_step: hooks start collecting
    forward/backward x G     hooks keep each event's factors (capture/event_hooks.py)
    on_pre_optimizer_step    EventRecorder.finish_step: the step's events, before clipping
    optimizer.step()
    on_step_end              precondition (Adam's v now includes this step), normalise, check
                             norms, write each event's factors into a slot, then push the step's
                             slots to the SAE runner at once

Each event's ``StepMeta`` is the step's, narrowed to the event: its completions (``rows``), their
task labels and rewards, its mean advantage and its norm before normalisation. ``last_events``
holds the committed events' records for ``events.jsonl``.

Under DDP (``accelerate launch``) every rank records its own rows' events (scaled by ``1 /
world_size``: their share of DDP's averaged gradient) and sends them, with its skip counters and
K-FAC sums, to rank 0 at ``on_pre_optimizer_step`` (``distributed.gather_to_main``); rank 0 alone
preconditions and writes them. Other ranks build ``EventCapture`` with ``buffer=None``. A prompt
group must not straddle two ranks (each rank's generation batch a multiple of
``num_generations``), or ``on_train_begin`` raises.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import TrainerCallback

from sae_shards.capture import distributed
from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.capture.event_hooks import Event, EventRecorder
from sae_shards.capture.event_precondition import (COVARIANCE_KINDS, EventPreconditioner,
                                                   normalize_unit)
from sae_shards.capture.outliers import NormOutliers
from sae_shards.capture.rollouts import population_std
from sae_shards.capture.selection import LoraTarget
from sae_shards.capture.zero3_delta import zero3_targets
from sae_shards.core import events as ev
from sae_shards.core.targets import TargetSpec
from sae_shards.run.config import CaptureConfig, generation_use_of, generations_reused

logger = logging.getLogger(__name__)

ERROR_EVERY = 10
"""``precondition=adam``: the factored approximation's error is measured on the first event of
every this many steps (it materialises one ``m x n`` matrix per target)."""


class EventCapture(TrainerCallback):
    """Write each reinforcement event of every optimizer step into ``buffer``.

    ``meta_fn(global_step)`` gives the step's ``StepMeta``; ``rows_fn(global_step)`` the step's
    ``rollouts.jsonl`` row (or None); ``on_push(slots)`` gets the step's committed slots.
    ``room`` is the most events one step may write without overwriting slots the SAE runner has
    not encoded yet (checked when a step has more). ``buffer=None``: a rank other than 0 under
    DDP, which records its events and sends them to rank 0 (see the module docstring).
    """

    def __init__(
        self,
        targets: Mapping[str, Any],
        specs: Sequence[TargetSpec],
        buffer: DeltaRingBuffer | None,
        cfg: CaptureConfig,
        trainer: Any,
        meta_fn: Callable[[int], StepMeta] | None = None,
        rows_fn: Callable[[int], dict | None] | None = None,
        on_push: Callable[[list[int]], None] | None = None,
        room: int | None = None,
    ) -> None:
        if trainer is None:
            raise ValueError(
                f"capture.granularity={cfg.granularity} needs the TRL trainer (to tell which "
                "completions each forward pass holds); add ShardCallback with "
                "trainer.add_callback(...) or pass it to the trainer's callbacks")
        if buffer is not None and buffer.event_rank != cfg.event_rank:
            raise ValueError(f"the buffer keeps {buffer.event_rank} rows per event, "
                             f"capture.event_rank is {cfg.event_rank}")
        self.targets = dict(targets)
        self.specs = list(specs)
        self.buffer = buffer
        self.cfg = cfg
        self.trainer = trainer
        self.meta_fn = meta_fn
        self.rows_fn = rows_fn
        self.on_push = on_push
        self.room = room
        self.preconditioner = EventPreconditioner(cfg.precondition, self.targets, self.specs,
                                                  kfac_damping=cfg.kfac_damping)
        self._covariances_needed = cfg.precondition in COVARIANCE_KINDS
        self.recorder: EventRecorder | None = None
        self.outliers = NormOutliers(cfg.outlier_ratio if cfg.normalize == "none" else 0.0)
        """Outlier test on the events' norms (before ``unit`` normalisation, which makes it moot)."""
        self.n_captured = 0
        """Events committed to the buffer."""
        self.n_zero = 0
        """Events with a zero gradient (skipped; their completions' advantages were not all 0)."""
        self.n_skipped = 0
        """Events skipped because every advantage of their completions is 0 (no gradient)."""
        self.n_nonfinite = 0
        """Events skipped because an entry was nan or inf."""
        self.n_outliers = 0
        """Events skipped as outliers (``capture.outlier_ratio``)."""
        self.precision_note: str | None = None
        """Why the events are not the exact gradients (LoRA dropout), set when training begins;
        ``summary.json`` repeats it."""
        self.n_truncated = 0
        """Events cut to ``capture.event_rank`` rows with energy lost."""
        self.kept_energy_min = 1.0
        """Smallest fraction of an event's squared norm kept by the rank cut."""
        self.precond_error: list[float] = []
        """``precondition=adam``: per measured event, the largest of its targets' relative
        errors of the factored approximation (``summary.json``'s ``precond_error_mean`` is
        their mean; each target's is in ``events.jsonl``)."""
        self.last_norm = math.nan
        self.last_events: list[dict[str, Any]] = []
        """Records (``events.jsonl`` rows) of the events the last step committed."""
        self._events: list[Event] = []
        self._covariances: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._recorded = (0, 0)  # recorder's (n_zero_advantage, n_zero_gradient) already counted

    # ---- callback events ----

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trl_args = getattr(self.trainer, "args", None)
        reused = generations_reused(trl_args)
        if reused:
            raise ValueError(
                f"ShardCallback(capture={{'granularity': '{self.cfg.granularity}'}}) needs one "
                f"generation per optimizer step (each event is a prompt group of the step that "
                f"trains on it); the trainer's config has {reused}, with which "
                f"{generation_use_of(trl_args)}: set num_iterations=1 and leave "
                "steps_per_generation and generation_batch_size unset (TRL derives "
                "steps_per_generation from generation_batch_size), or capture per step")
        by_trainer = getattr(trl_args, "torch_compile", False)
        if by_trainer or hasattr(model, "_orig_mod"):
            fix = ("set torch_compile=False in the trainer's config (and do not torch.compile "
                   "the model)" if by_trainer else "give the trainer the model itself, not "
                   "torch.compile(model)")
            raise ValueError(
                f"ShardCallback(capture={{'granularity': '{self.cfg.granularity}'}}) records each "
                "event's inputs and output gradients with module hooks, which torch.compile "
                f"traces into its graph (the modules then seem never to run); {fix}, or capture "
                "per step (capture.granularity=step), which runs under it")
        self.precision_note = _lora_dropout_note(self.targets, self.cfg.granularity)
        if args.world_size > 1:
            _check_groups_within_ranks(self.trainer, self.cfg.granularity)
        if self.recorder is None:
            self.recorder = EventRecorder(model, self.targets, self.trainer, self.cfg.granularity,
                                          self.cfg.event_rank,
                                          track_covariance=self._covariances_needed,
                                          grad_scale=1.0 / args.world_size)
            self.recorder.install()
            self.preconditioner.bind_layouts(self.recorder.layouts())
        if self.cfg.precondition == "adam" and zero3_targets(self.targets):
            raise ValueError(
                "capture.precondition=adam is not supported under DeepSpeed ZeRO-3: Adam's "
                "second moment is partitioned across ranks; use capture.precondition=none or kfac")
        if self.cfg.precondition == "adam" and self.buffer is not None:
            self.preconditioner.bind_optimizer(optimizer)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.start_step()

    def take_hook_seconds(self) -> float:
        """The recorder's time inside RL's forward and backward since the last call
        (``EventRecorder.take_hook_seconds``): sae-shards' work the callback's own hooks do not
        time."""
        return self.recorder.take_hook_seconds() if self.recorder is not None else 0.0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """The step's events (all ranks' on rank 0; a collective under DDP)."""
        if self.recorder is None:
            return
        events = self.recorder.finish_step()
        counts = self._recorder_counts()
        cov = self.recorder.covariances() if self._covariances_needed else {}
        if args.world_size > 1:
            events, counts, cov = _gather_step(events, counts, cov, self.recorder)
        self.n_skipped += counts[0]
        self.n_zero += counts[1]
        self._events, self._covariances = events, cov

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        self.last_events = []
        if self.recorder is None or self.buffer is None:  # other ranks sent theirs already
            return
        step = state.global_step
        events, self._events = self._events, []
        if self._covariances_needed:
            self.preconditioner.observe(self._covariances)
        if self.room is not None and len(events) > self.room:
            raise ValueError(
                f"step {step} has {len(events)} events but the ring buffer can take at most "
                f"{self.room} per step without overwriting samples the SAE has not read; raise "
                f"capture.capacity above {self.buffer.capacity} (or lower runner.max_lag)")
        step_meta = self.meta_fn(step) if self.meta_fn else StepMeta(step)
        row = self.rows_fn(step) if self.rows_fn else None
        slots = []
        for i, event in enumerate(events):
            slot = self._write(event, step, step_meta, row, measure=i == 0 and
                               step % ERROR_EVERY == 1)
            if slot is not None:
                slots.append(slot)
        if slots and self.on_push is not None:
            self.on_push(slots)

    def on_train_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None

    # ---- one event ----

    def _write(self, event: Event, step: int, step_meta: StepMeta, row: dict | None,
               measure: bool) -> int | None:
        """Precondition, normalise, check and commit one event; its slot, or None if skipped."""
        factors = self.preconditioner.apply(event.factors)
        error = self.preconditioner.approx_error(event.factors) if measure else {}
        if error and all(map(math.isfinite, error.values())):  # (a non-finite event: skipped below)
            self.precond_error.append(max(error.values()))
        norm = math.sqrt(float(sum(ev.sq_norm(factors[t.name], t) for t in self.specs)))
        if not math.isfinite(norm):
            self.n_nonfinite += 1
            logger.warning("step %d: event %d has non-finite entries; skipped (%d so far)", step,
                           event.group, self.n_nonfinite)
            return None
        if norm == 0.0:
            self.n_zero += 1
            return None
        if self.outliers.is_outlier(norm, step):
            self.n_outliers += 1
            logger.warning(
                "step %d: event %d's norm %.3g is over capture.outlier_ratio=%g times the running "
                "RMS %.3g; skipped (%d so far)", step, event.group, norm, self.outliers.ratio,
                self.outliers.last_rms, self.n_outliers)
            return None
        if self.cfg.normalize == "unit":
            factors, _ = normalize_unit(factors, self.specs, norm)  # its Grams taken above
        if event.kept_energy < 1.0:
            self.n_truncated += 1
            self.kept_energy_min = min(self.kept_energy_min, event.kept_energy)
            if self.n_truncated == 1:  # once per run (a resumed run counts its earlier cuts)
                logger.warning(
                    "step %d: event %d has more token positions than capture.event_rank=%d on "
                    "a target: it is kept as a rank-%d approximation (about %.4f of its "
                    "squared norm), so a step's events sum to its gradient approximately; "
                    "summary.json counts such events (truncated_events, kept_energy_min). A "
                    "larger capture.event_rank keeps more (the buffer grows with it)", step,
                    event.group, self.cfg.event_rank, self.cfg.event_rank, event.kept_energy)
        meta = _event_meta(step_meta, event, row, norm)
        slot, views = self.buffer.begin_write()
        try:
            for t in self.specs:
                _fill(views[t.name], factors[t.name], t)
        except BaseException:
            self.buffer.abort(slot)
            raise
        self.buffer.commit(slot, meta)
        self.n_captured += 1
        self.last_norm = norm
        self.last_events.append({
            "step": step, "event": event.group, "rows": list(event.rows),
            "advantage": event.advantage, "abs_advantage": event.abs_advantage, "norm": norm,
            "kept_energy": event.kept_energy,
            "reward": meta.reward_mean, "tasks": list(meta.task_labels),
            **({"precond_error": error} if error else {})})
        return slot

    def _recorder_counts(self) -> tuple[int, int]:
        """Events the recorder skipped since the last call: (zero advantage, zero gradient)."""
        zero_adv, zero_grad = self.recorder.n_zero_advantage, self.recorder.n_zero_gradient
        counts = (zero_adv - self._recorded[0], zero_grad - self._recorded[1])
        self._recorded = (zero_adv, zero_grad)
        return counts

    # ---- resume ----

    def counters(self) -> dict[str, float]:
        return {"n_captured": self.n_captured, "n_zero": self.n_zero,
                "n_nonfinite": self.n_nonfinite, "n_skipped": self.n_skipped,
                "n_outliers": self.n_outliers, "n_truncated": self.n_truncated,
                "kept_energy_min": self.kept_energy_min,
                "precond_error": list(self.precond_error), **self.outliers.state()}

    def load_counters(self, saved: dict[str, float]) -> None:
        for key in ("n_captured", "n_zero", "n_nonfinite", "n_skipped", "n_outliers",
                    "n_truncated"):
            setattr(self, key, int(saved[key]))
        self.kept_energy_min = float(saved["kept_energy_min"])
        # absent from an earlier version's files: the mean then covers the events after resume
        self.precond_error = [float(x) for x in saved.get("precond_error", []) if x is not None]
        self.outliers.load_state(saved)

    def summary(self) -> dict[str, Any]:
        """Figures for ``summary.json``."""
        return {"granularity": self.cfg.granularity, "events": self.n_captured,
                "zero_advantage_events": self.n_skipped, "truncated_events": self.n_truncated,
                "kept_energy_min": self.kept_energy_min,
                "precond_error_mean": (statistics.fmean(self.precond_error)
                                       if self.precond_error else None)}


def _lora_dropout_note(targets: Mapping[str, Any], granularity: str) -> str | None:
    """Said once when training begins, and returned for ``summary.json``'s warning: LoRA dropout
    feeds the adapter another input than the one the hooks see, so the events of adapted
    weights are approximate (exact with ``lora_dropout=0``). None without dropout."""
    rates = {float(getattr(t.layer.lora_dropout[t.adapter], "p", 0.0))
             for t in targets.values() if isinstance(t, LoraTarget)}
    if not any(p > 0 for p in rates):
        return None
    note = (f"capture.granularity={granularity} with lora_dropout={max(rates):g}: each event's "
            "gradient of the adapted weights is approximate, since the adapter sees dropped-out "
            "inputs the hooks do not (at lora_dropout=0.1 a step's summed events were 27-41% "
            "off the adapter's gradient); set lora_dropout=0 in the LoraConfig for exact events")
    logger.warning("%s", note)
    return note


def _check_groups_within_ranks(trainer: Any, granularity: str) -> None:
    """Under DDP each rank must hold whole prompt groups: TRL hands rank ``r`` rows ``r * n ...
    (r + 1) * n - 1`` of each generation batch, ``n = per_device_train_batch_size *
    steps_per_generation``, and a group is ``num_generations`` consecutive rows."""
    if granularity != "group":
        return
    args = trainer.args
    n = args.per_device_train_batch_size * args.steps_per_generation
    k = trainer.num_generations
    if n % k:
        raise ValueError(
            f"capture.granularity=group with several processes needs each rank's generation "
            f"batch (per_device_train_batch_size x steps_per_generation = {n}) to be a multiple "
            f"of num_generations={k}, so no prompt group is split between ranks; change "
            "per_device_train_batch_size, steps_per_generation (default: "
            "gradient_accumulation_steps) or num_generations, or use capture.granularity="
            "completion")


def _gather_step(events: list[Event], counts: tuple[int, int],
                 cov: dict[str, tuple[torch.Tensor, torch.Tensor, int]],
                 recorder: EventRecorder) -> tuple[list[Event], tuple[int, int], dict]:
    """Every rank's events (sorted by event id), skip counts and K-FAC sums, on rank 0; nothing
    elsewhere. The factors travel on the CPU and return to the targets' devices."""
    sent = ([dataclasses.replace(e, factors=distributed.to_cpu(e.factors)) for e in events],
            counts, {n: (l.cpu(), r.cpu(), c) for n, (l, r, c) in cov.items()})
    got = distributed.gather_to_main(sent)
    if got is None:
        return [], (0, 0), {}
    devices = recorder.devices
    merged = sorted((dataclasses.replace(e, factors={n: x.to(devices[n]) for n, x in
                                                     e.factors.items()})
                     for rank_events, _, _ in got for e in rank_events), key=lambda e: e.group)
    ids = [e.group for e in merged]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"events {sorted({i for i in ids if ids.count(i) > 1})} came from "
                           "more than one rank: a prompt group split between ranks")
    total = (sum(c[0] for _, c, _ in got), sum(c[1] for _, c, _ in got))
    summed: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for _, _, rank_cov in got:
        for n, (l, r, c) in rank_cov.items():
            l, r = l.to(devices[n]), r.to(devices[n])
            if n in summed:
                sl, sr, sc = summed[n]
                l, r, c = sl + l, sr + r, sc + c
            summed[n] = (l, r, c)
    return merged, total, summed


def _fill(view: torch.Tensor, factor: torch.Tensor, spec: TargetSpec) -> None:
    """Copy an event's factors ``[k, m + n]`` or vector ``[m]`` into its slot ``[rows, m + n]``,
    zeroing the rows it does not use. ``k > rows`` happens only when ``rows = min(m, n)`` (the
    slot is capped at the matrix's rank): the factors are then re-cut to ``rows``, exactly."""
    if view.ndim == 1:
        view.copy_(factor)
        return
    rows = view.shape[0]
    if factor.shape[0] > rows and bool(factor[rows:].ne(0).any()):
        cut = ev.truncate(*ev.split(factor, spec.shape[0]), rows)
        factor = ev.join(cut.L, cut.R)
    factor = factor[:rows]  # past ``rows``: zero padding only
    k = factor.shape[0]
    view[:k].copy_(factor)
    view[k:].zero_()


def _event_meta(step: StepMeta, event: Event, row: dict | None, norm: float) -> StepMeta:
    """The step's metadata narrowed to one event's completions."""
    labels, rewards = step.task_labels, []
    if row is not None:
        n = len(row["prompts"])
        if any(r >= n for r in event.rows):
            raise ValueError(
                f"step {step.global_step}: event {event.group} names completions {event.rows} "
                f"but the step's rollouts hold {n}; the completion log and the trained batch "
                "disagree (TRL's steps_per_generation or num_iterations differ from the "
                "defaults?)")
        if row.get("tasks"):
            labels = tuple(sorted({row["tasks"][r] for r in event.rows}))
        rewards = [row["rewards"][r] for r in event.rows if row["rewards"][r] is not None]
    return dataclasses.replace(
        step, task_labels=labels, event=event.group, rows=event.rows,
        reward_mean=statistics.fmean(rewards) if rewards else math.nan,
        reward_std=population_std(rewards) if len(rewards) > 1 else math.nan,
        advantage=event.advantage, norm=norm)
