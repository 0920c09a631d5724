"""Per-event capture: the gradient of each reinforcement event of a TRL step, factored.

For a matrix target ``y = W x`` the gradient of the step's loss is ``sum_t g_t a_t^T`` over every
token position ``t`` of every row of the batch (``a_t`` the module's input, ``g_t = dL/dy_t``),
across micro-batches and gradient accumulation. Split by the rows of TRL's generation batch it
gives each completion's gradient exactly; summed over a prompt's ``num_generations`` completions,
each group's (TRL's unit of advantage normalisation). ``EventRecorder`` keeps ``a_t`` with a
forward hook on the module owning each target and receives ``g_t`` through a tensor hook on the
module's output, then files the positions of each row under that row's event, in the factored
form of ``core.events``:

- ``nn.Linear`` (weight ``[out, in] = (m, n)``): ``L = g [T, m]``, ``R = a [T, n]``.
- GPT-2 ``Conv1D`` (weight ``[in, out] = (m, n)``): ``L = a [T, m]``, ``R = g [T, n]``.
- LoRA (``LoraTarget``): hooks on peft's ``lora.Linear`` itself, whose input is ``x`` and output
  ``base(x) + s B A x``, so the sample is the gradient of the effective weight ``W0 + s B A``
  (``[out, in]``). Exact with ``lora_dropout = 0`` (dropout feeds the adapter a different ``x``).
  The adapter gradients follow by the chain rule: ``dA = s B^T X``, ``dB = s X A^T``.
- Biases of Linear / Conv1D layers: dense vectors ``sum_t g_t``. Other 1-D targets (norm
  weights) are refused at construction.

All positions count (prompt tokens receive gradient through attention); positions whose
gradient row is exactly zero (padding, tokens after EOS) are dropped. At the end of each
micro-batch each event's factors are merged with its running factors and cut to ``event_rank``
rows with ``events.truncate``: exact (no rounding) while an event has at most ``event_rank``
positions, the best rank-``event_rank`` approximation when it is cut once, and a bounded-memory
approximation when it is cut at several micro-batches. ``Event.kept_energy`` is the kept fraction
of ``||X||^2`` of that one cut, or, over several cuts, ``||P||^2 / (||P||^2 + sum of the energies
cut)`` (``P`` the final factors): an estimate, since the pieces cut need not be orthogonal.

How rows reach the hooks (TRL 1.16, GRPO and RLOO alike; checked against their source):

1. ``_prepare_inputs`` calls ``self._generate_and_score_completions(local_batch)`` once per
   generation batch. Its output is a dict of per-row tensors (``prompt_ids``, ``advantages``, ...)
   for this process's ``len(prompts)`` rows, which are rows ``process_index * len(prompts) + i``
   of the gathered batch (TRL slices its gathered advantages the same way), and the order of
   TRL's completion log. The recorder wraps this method *on the trainer instance* and adds the
   tensor ``sae_event_row`` (the global row of each row).
2. ``shuffle_sequence_dict`` permutes every tensor with a batch dimension in unison and
   ``split_tensor_dict`` slices them into ``steps_per_generation`` micro-batches, so the key
   travels with its rows.
3. ``training_step`` calls ``self.compute_loss(model, inputs)`` per micro-batch; the wrapper notes
   the micro-batch's rows and advantages. ``_get_per_token_logps_and_entropies`` runs the model
   over the rows in order, possibly in chunks of ``batch_size`` rows: a forward pre-hook on the
   top-level model hands each grad-enabled forward the next rows of the micro-batch.
4. The group of global row ``r`` is ``r // num_generations``: TRL's ``RepeatSampler`` yields each
   prompt ``num_generations`` times in a row and TRL normalises advantages over
   ``rewards.view(-1, num_generations)`` of the gathered batch.

Forwards under ``no_grad`` (generation, old and reference log-probs) are ignored. A grad-enabled
forward of the model during a step that is not inside ``compute_loss``, a forward over more rows
than the micro-batch holds, a micro-batch whose rows are not all consumed, or a batch without
``sae_event_row`` raise ``RuntimeError``. Under non-reentrant activation checkpointing a
layer's forward re-runs inside backward; the hook ignores that run (the first one was filed and
receives the gradient). Reentrant checkpointing (its first forward runs without grad) and fp16
loss scaling (hooks would see scaled gradients) are refused at ``install``.
A layer fed the forward's positions flattened row-major to ``[B * S, d]`` (OPT's MLP, a
shared expert) is read back as ``[B, S, d]``. Padding-free packing (several rows in one sequence)
and a mixture of experts' routed tokens fail the row-count check.

Distributed (DDP): each rank's hooks see only that rank's rows and the gradient of its local
loss, while ``param.grad`` is the average over ranks after DDP's all-reduce; ``grad_scale = 1 /
world_size`` makes each rank's events its share of that average. Rows are labelled globally, so
the events of all ranks fit together; ``EventCapture`` gathers them to rank 0.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from sae_shards.capture.event_sites import (Site, batch_shape, check_checkpointing,
                                            check_supported, hook_sites, in_backward,
                                            zero_advantage_means_zero_gradient)
from sae_shards.capture.selection import Target
from sae_shards.core import events as ev
from sae_shards.core.targets import TargetSpec

ROW_KEY = "sae_event_row"
"""Key added to TRL's generation batch: the row's index in the gathered generation batch."""
GRANULARITIES = ("group", "completion")
_WRAPPED = ("_generate_and_score_completions", "compute_loss")


@dataclass
class Event:
    """One reinforcement event's exact gradient (up to rank truncation) on every target."""

    group: int
    """Event index within the generation batch: the group id, or the row for ``completion``."""
    rows: tuple[int, ...]
    """Global rows of the generation batch (indices into TRL's completion log of that batch)
    whose gradient it sums."""
    factors: dict[str, Tensor]
    """Matrix target: fp32 ``[k, m + n]`` with ``k <= event_rank`` (not padded; ``k = 0`` if no
    position of the event reached it with gradient); 1-D target: fp32 ``[m]``. On the targets'
    device."""
    kept_energy: float
    """Minimum over targets of the kept fraction of ``||X||^2`` (1.0: nothing cut)."""
    advantage: float
    """Mean advantage of its rows (about 0 for a GRPO group: advantages are normalised within
    the group)."""
    abs_advantage: float = 0.0
    """Mean |advantage| of its rows: how strongly the event was reinforced."""


def _timed(method):
    """An ``EventRecorder`` method that runs inside RL's forward, backward or loss: its wall
    time is added to ``hook_s`` (sae-shards' work, which ``runner.sae_budget`` pays for)."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.hook_s += time.perf_counter() - t0
    return timed


@dataclass
class _Forward:
    """Rows of one grad-enabled forward of the top-level model."""

    events: list[int]  # [B] event id of each row (-1: not filed, its gradient is zero)
    seq: int  # S, positions per row
    n_prompt: int  # prompt positions at the start of each row (the test-only switch)
    step: int  # the recorder's step serial when it ran


@dataclass
class _Slot:
    """Running state of one (event, matrix target)."""

    running: Tensor | None = None  # [k, m + n], k <= event_rank
    pending: list[Tensor] = field(default_factory=list)  # [T_i, m + n] rows of this micro-batch
    cut: float = 0.0  # energy removed by truncations so far


class EventRecorder:
    """Records, during a TRL GRPO / RLOO optimizer step, each event's gradient of ``targets``.

    ``model`` is the model the trainer trains (``trainer.model``, under any peft wrapper);
    ``targets`` come from ``selection.select_targets`` on it. ``granularity`` is ``group`` (one
    event per prompt group) or ``completion`` (one per completion). ``event_rank`` caps the rows
    of each event's factors. With ``track_covariance`` the step's sums of ``l l^T`` and ``r r^T``
    per matrix target over every position that reached it with non-zero gradient (the positions
    of the events) are kept (``covariances``). Output gradients are multiplied by ``grad_scale``
    (DDP: ``1 / world_size``, see the module docstring) before anything is kept.

    Use: ``install()`` once after the trainer is built, ``start_step()`` at ``on_step_begin``,
    ``finish_step()`` at ``on_pre_optimizer_step``, ``remove()`` when done. Events whose rows all
    have advantage zero are skipped and counted in ``n_zero_advantage`` when the loss gives them
    no gradient (RLOO; GRPO with ``beta = 0``, no entropy bonus, no MoE aux loss); otherwise they
    are kept, since the KL / entropy / aux terms move them. Events with an exactly zero gradient
    are skipped and counted in ``n_zero_gradient``. Counters run over all steps.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Mapping[str, Target],
        trainer,
        granularity: str = "group",
        event_rank: int = 64,
        track_covariance: bool = False,
        grad_scale: float = 1.0,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"capture.granularity={granularity!r} is not supported; use one of {GRANULARITIES}"
            )
        if event_rank < 1:
            raise ValueError(f"capture.event_rank={event_rank} must be >= 1")
        if not targets:
            raise ValueError("EventRecorder needs at least one target")
        check_supported(model, trainer)
        self.model = model
        self.trainer = trainer
        self.granularity = granularity
        self.event_rank = event_rank
        self.track_covariance = track_covariance
        self.grad_scale = float(grad_scale)
        self.targets = dict(targets)
        self._sites = hook_sites(model, self.targets)  # module -> its targets
        by_name = {s.name: s for sites in self._sites.values() for s in sites}
        self._shapes = {name: by_name[name].shape for name in self.targets}  # targets' order
        self._devices = {name: by_name[name].device for name in self.targets}
        self._group_size = int(trainer.num_generations) if granularity == "group" else 1
        self._skip_zero_advantage = zero_advantage_means_zero_gradient(trainer)
        self.n_zero_advantage = 0
        """Events skipped because every row's advantage was zero (their gradient is zero)."""
        self.n_zero_gradient = 0
        """Events skipped because their gradient on every target was exactly zero."""
        self.n_events = 0
        """Events returned by ``finish_step`` so far."""
        self.hook_s = 0.0
        """Wall time of the recorder's work inside RL's forward, backward and ``compute_loss``
        (noting rows, filing positions, merging factors) not yet taken by
        ``take_hook_seconds`` (on a GPU, the host's time launching that work)."""
        self._skip_prompt_positions = False  # test-only: drop prompt positions (must break sums)
        self._handles: list = []
        self._saved_methods: dict[str, object] = {}
        self._installed = False
        self._in_step = False
        self._in_loss = False  # inside a capturing compute_loss
        self._serial = 0  # counts start_step calls
        self._reset_step()
        self._last_covariances: dict[str, tuple[Tensor, Tensor, int]] = {}

    def layouts(self) -> dict[str, str]:
        """``{target: "out_in" | "in_out"}``: each target's weight layout (which factor holds the
        output gradients)."""
        return {site.name: site.layout for sites in self._sites.values() for site in sites}

    # ---- lifecycle ----

    def install(self) -> None:
        """Register the hooks and wrap the trainer instance's methods (idempotent)."""
        if self._installed:
            return
        check_supported(self.model, self.trainer)
        for name in _WRAPPED:
            self._saved_methods[name] = self.trainer.__dict__.get(name)
        original_generate = self.trainer._generate_and_score_completions
        original_loss = self.trainer.compute_loss
        self.trainer._generate_and_score_completions = self._wrap_generate(original_generate)
        self.trainer.compute_loss = self._wrap_loss(original_loss)
        top = self.model
        self._handles.append(top.register_forward_pre_hook(self._on_model_pre, with_kwargs=True))
        self._handles.append(top.register_forward_hook(self._on_model_post))
        for module in self._sites:
            self._handles.append(module.register_forward_hook(self._on_module, with_kwargs=True))
        self._installed = True

    def remove(self) -> None:
        """Remove every hook and restore the trainer's methods."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, saved in self._saved_methods.items():
            if saved is None:
                self.trainer.__dict__.pop(name, None)
            else:
                setattr(self.trainer, name, saved)
        self._saved_methods.clear()
        self._installed = False
        self._in_step = self._in_loss = False
        self._reset_step()

    def start_step(self) -> None:
        """Begin an optimizer step (``on_step_begin``): forget anything left from before."""
        if not self._installed:
            raise RuntimeError("EventRecorder.start_step before install()")
        check_checkpointing(self.model, self.trainer)
        self._reset_step()
        self._serial += 1
        self._in_step = True

    def finish_step(self) -> list[Event]:
        """End the step (``on_pre_optimizer_step``, gradients complete): its events by group."""
        if not self._in_step:
            raise RuntimeError("EventRecorder.finish_step without start_step")
        self._compress()
        self._check_every_module_ran()
        out = [e for e in map(self._event, sorted(self._rows)) if e is not None]
        self.n_events += len(out)
        if self.track_covariance:
            self._last_covariances = {n: (l, r, self._cov_count[n])
                                      for n, (l, r) in self._cov.items()}
        self._in_step = False
        self._reset_step()
        return out

    def _check_every_module_ran(self) -> None:
        """A step whose loss ran forwards must have run every target's module: one that never did
        was used another way (TRL's fused LM head multiplies by ``lm_head.weight`` directly), and
        its events would silently read as zero."""
        if not self._forwards:
            return  # no grad-enabled forward of the model this step (nothing to check)
        missing = [sites[0].name for module, sites in self._sites.items()
                   if module not in self._ran]
        if missing:
            raise ValueError(
                f"per-event capture: the modules of targets {missing[:3]} never ran during the "
                "step's forward passes, so their gradients cannot be split by event (TRL computes "
                "log-probabilities from lm_head.weight directly, outside the module); leave them "
                "out of capture.targets, or use capture.granularity=step")

    def take_hook_seconds(self) -> float:
        """``hook_s`` so far, reset to 0 (the callback pays it from ``runner.sae_budget``)."""
        taken, self.hook_s = self.hook_s, 0.0
        return taken

    @property
    def devices(self) -> dict[str, torch.device]:
        """Each target's device (where its events' factors live)."""
        return dict(self._devices)

    def covariances(self) -> dict[str, tuple[Tensor, Tensor, int]]:
        """``{matrix target: (S_l [m, m], S_r [n, n], positions)}`` of the last finished step:
        sums over every kept position of ``l l^T`` and ``r r^T`` (``track_covariance``)."""
        if not self.track_covariance:
            raise RuntimeError("covariances() needs EventRecorder(track_covariance=True)")
        return dict(self._last_covariances)

    # ---- trainer wrappers ----

    def _wrap_generate(self, original):
        def generate_and_score(inputs, *args, **kwargs):
            out = original(inputs, *args, **kwargs)
            if self.trainer.model.training and isinstance(out, dict):
                n_local = out["prompt_ids"].shape[0]
                first = self.trainer.accelerator.process_index * n_local
                out[ROW_KEY] = torch.arange(first, first + n_local,
                                            device=out["prompt_ids"].device)
            return out
        return generate_and_score

    def _wrap_loss(self, original):
        def compute_loss(model, inputs, *args, **kwargs):
            if not (self._in_step and torch.is_grad_enabled() and self.model.training):
                return original(model, inputs, *args, **kwargs)
            self._begin_micro_batch(inputs)
            try:
                loss = original(model, inputs, *args, **kwargs)
            finally:
                self._in_loss = False
            if self._cursor != len(self._mb_events):
                raise RuntimeError(
                    f"compute_loss ran grad-enabled forwards over {self._cursor} of the "
                    f"micro-batch's {len(self._mb_events)} rows; EventRecorder cannot map the "
                    "rows to events (a TRL version whose loss skips or reorders rows?)")
            return loss
        return compute_loss

    @_timed
    def _begin_micro_batch(self, inputs) -> None:
        """Previous micro-batch's backward is done: compress it, then note this one's rows."""
        self._compress()
        if ROW_KEY not in inputs:
            raise RuntimeError(
                f"the training batch has no {ROW_KEY!r}: it did not come from the wrapped "
                "_generate_and_score_completions (install() after the trainer is built, and "
                "before train())")
        rows_t = inputs[ROW_KEY]  # [B] global row of each completion
        adv = inputs["advantages"].detach().float().reshape(rows_t.shape[0], -1)  # [B, 1] or [B, T]
        # the rows, whether each row's advantage moves anything, and its mean, in one device
        # read (float64 holds each row number and fp32 mean exactly)
        rows, moving, means = torch.stack(
            [rows_t.double(), adv.ne(0).any(-1).double(), adv.mean(-1).double()]).tolist()
        rows = [int(r) for r in rows]
        events = []
        for row, moves, mean in zip(rows, moving, means):
            event = row // self._group_size
            moves = bool(moves)
            self._rows.setdefault(event, []).append(row)
            self._adv.setdefault(event, []).append(mean)
            self._nonzero_adv[event] = self._nonzero_adv.get(event, False) or moves
            # A row with advantage 0 has exactly zero gradient when the loss is all advantage
            # terms: its positions need not be filed.
            events.append(-1 if self._skip_zero_advantage and not moves else event)
        self._mb_events = events
        self._mb_prompt = int(inputs["prompt_ids"].shape[1])
        self._cursor = 0
        self._in_loss = True

    # ---- hooks ----

    def _on_model_pre(self, module, args, kwargs):
        if not (self._in_step and torch.is_grad_enabled()):
            return
        if not self._in_loss:
            raise RuntimeError(
                "a grad-enabled forward of the model ran during the step outside compute_loss; "
                "EventRecorder cannot map its rows to events")
        n, seq = batch_shape(args, kwargs)
        stop = self._cursor + n
        if stop > len(self._mb_events):
            raise RuntimeError(
                f"a forward over {n} rows exceeds the micro-batch's {len(self._mb_events)} rows "
                f"({self._cursor} used); EventRecorder cannot map it to events")
        self._forward = _Forward(self._mb_events[self._cursor:stop], seq, self._mb_prompt,
                                 self._serial)
        self._cursor = stop
        self._forwards += 1

    def _on_model_post(self, module, args, output):
        self._forward = None

    @_timed
    def _on_module(self, module, args, kwargs, output):
        if not (self._in_step and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        fwd = self._forward
        if fwd is None and in_backward():
            return  # a non-reentrant checkpoint re-running the layer: its first run was filed
        if fwd is None:
            raise RuntimeError(
                f"{type(module).__name__} holding {self._sites[module][0].name} ran outside a "
                "forward of the model's rows; EventRecorder cannot map it to events")
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        rows = len(fwd.events)
        if x.shape[0] == output.shape[0] == rows:
            a = x.detach()  # [B, S, n_in]
        elif x.ndim == output.ndim == 2 and x.shape[0] == output.shape[0] == rows * fwd.seq:
            a = x.detach().view(rows, fwd.seq, -1)  # positions flattened row-major (OPT's MLP)
        else:
            raise RuntimeError(
                f"{self._sites[module][0].name}: input {tuple(x.shape)} has neither the "
                f"forward's {rows} rows first nor its {rows} x {fwd.seq} positions flattened "
                "(a mixture of experts' routed tokens, or padding-free packing?); EventRecorder "
                "cannot map positions to rows")
        self._ran.add(module)
        sites = self._sites[module]
        output.register_hook(lambda g: self._on_grad(sites, fwd, a, g))

    @_timed
    @torch.no_grad()
    def _on_grad(self, sites: list[Site], fwd: _Forward, a: Tensor, g: Tensor) -> None:
        """File the positions of one forward under their events. ``a [B, S, n_in]``,
        ``g [B, S, n_out]``."""
        if not self._in_step or fwd.step != self._serial:
            return  # a backward run after its step was finished: not part of any step
        g = g.detach().float().reshape(*a.shape[:-1], g.shape[-1])  # [B, S, n_out]
        if self.grad_scale != 1.0:
            g = g * self.grad_scale
        a = a.float()
        if self._skip_prompt_positions:
            g = g.clone()
            g[:, :fwd.n_prompt] = 0
        # [B, S] positions with gradient, on the host: one device read for every event of the
        # forward (boolean indexing on the device would be one per event, inside backward)
        live = g.ne(0).any(-1).cpu()
        seq = live.shape[1]
        g, a = g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1])  # [B * S, n], row-major
        for event in sorted(set(fwd.events) - {-1}):
            idx = torch.tensor([b for b, e in enumerate(fwd.events) if e == event])
            b, s = live[idx].nonzero(as_tuple=True)  # the event's live positions, row-major
            if not b.numel():
                continue
            at = (idx[b] * seq + s).to(g.device, non_blocking=True)  # [T] flat positions
            ge = g.index_select(0, at)  # [T, n_out]
            ae = a.index_select(0, at)  # [T, n_in]
            for site in sites:
                self._file(event, site, ae, ge)

    def _file(self, event: int, site: Site, a: Tensor, g: Tensor) -> None:
        if site.kind == "bias":
            vec = self._vectors.setdefault((event, site.name), torch.zeros_like(g[0]))
            vec += g.sum(0)
            return
        L, R = (g, a) if site.layout == "out_in" else (a, g)  # [T, m], [T, n]
        self._slots.setdefault((event, site.name), _Slot()).pending.append(ev.join(L, R))
        if self.track_covariance:
            self._add_covariance(site.name, L, R)

    def _add_covariance(self, name: str, L: Tensor, R: Tensor) -> None:
        if name not in self._cov:
            m, n = L.shape[1], R.shape[1]
            self._cov[name] = (L.new_zeros(m, m), R.new_zeros(n, n))
            self._cov_count[name] = 0
        sl, sr = self._cov[name]
        sl += L.T @ L  # [m, m]
        sr += R.T @ R  # [n, n]
        self._cov_count[name] += L.shape[0]

    # ---- per-step state ----

    def _reset_step(self) -> None:
        self._rows: dict[int, list[int]] = {}  # event -> global rows seen this step
        self._adv: dict[int, list[float]] = {}  # event -> advantage of each row
        self._nonzero_adv: dict[int, bool] = {}
        self._slots: dict[tuple[int, str], _Slot] = {}
        self._vectors: dict[tuple[int, str], Tensor] = {}  # (event, bias target) -> [m]
        self._cov: dict[str, tuple[Tensor, Tensor]] = {}
        self._cov_count: dict[str, int] = {}
        self._mb_events: list[int] = []
        self._mb_prompt = 0
        self._cursor = 0
        self._forward: _Forward | None = None
        self._ran: set[nn.Module] = set()  # target modules whose forward ran this step
        self._forwards = 0  # grad-enabled forwards of the model this step

    def _compress(self) -> None:
        """Merge each slot's pending rows into its running factors, at most ``event_rank`` rows."""
        for (_, name), slot in self._slots.items():
            if not slot.pending:
                continue
            parts = ([slot.running] if slot.running is not None else []) + slot.pending
            x = torch.cat(parts)  # [T, m + n]
            slot.pending = []
            if x.shape[0] <= self.event_rank:
                slot.running = x
                continue
            m = self._shapes[name][0]
            cut = ev.truncate(*ev.split(x, m), self.event_rank)
            kept_sq = float(cut.L.double().pow(2).sum())  # = sum of the kept S^2
            slot.cut += kept_sq * (1.0 / cut.kept - 1.0)
            slot.running = ev.join(cut.L, cut.R)

    def _event(self, event: int) -> Event | None:
        """The finished ``Event``, or None (skipped and counted)."""
        if self._skip_zero_advantage and not self._nonzero_adv[event]:
            self.n_zero_advantage += 1
            return None
        factors, kept, energy = {}, 1.0, 0.0
        for name, shape in self._shapes.items():
            if len(shape) == 1:
                x = self._vectors.get((event, name))
                x = torch.zeros(shape, device=self._devices[name]) if x is None else x
                energy += float(x.double().pow(2).sum())
            else:
                slot = self._slots.get((event, name))
                x = (torch.zeros(0, sum(shape), device=self._devices[name])
                     if slot is None or slot.running is None else slot.running)
                sq = float(ev.sq_norm(x.double(), TargetSpec(name, shape)))
                energy += sq
                if slot is not None and slot.cut > 0:
                    kept = min(kept, sq / (sq + slot.cut))
            factors[name] = x
        if energy == 0.0:
            self.n_zero_gradient += 1
            return None
        adv = self._adv[event]
        return Event(event, tuple(sorted(self._rows[event])), factors, kept, sum(adv) / len(adv),
                     sum(map(abs, adv)) / len(adv))
