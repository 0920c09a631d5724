"""Capture: write each optimizer step's delta (or gradient) of the targets into the buffer.

``DeltaCapture`` is the ``transformers.TrainerCallback`` that, once per optimizer step, writes one
sample straight into a ``DeltaRingBuffer`` slot and hands the slot to ``on_push`` (where the SAE
runner hooks in). Targets come from ``selection.select_targets``.

When the callbacks fire (transformers 5.23, ``Trainer._run_epoch``), per optimizer step with
``gradient_accumulation_steps = G``::

    on_step_begin                       once, before the first of the G micro-batches
    G x (forward, backward)             on_substep_end after each of the first G - 1
    clip gradients (max_grad_norm > 0)
    on_pre_optimizer_step               gradients are final and clipped here
    optimizer.step(); on_optimizer_step; lr_scheduler.step(); zero_grad()
    state.global_step += 1; on_step_end

Sources (see ``DeltaCapture`` for what each supports):

- ``update`` snapshots the targets (fp32) at ``on_step_begin`` and writes ``theta_after -
  snapshot`` (fp32) at ``on_step_end``; this stays correct where the weights change before
  ``on_pre_optimizer_step`` (DeepSpeed steps inside backward). With fp32 storage on the targets'
  device the snapshot of a dense target is taken straight into the buffer slot (claimed at
  ``on_step_begin``) and the diff is taken in place: a copy, then one read of the target and one
  read-modify-write of the slot, with no fp32 snapshot tensor of its own.
- ``grad`` copies the clipped gradient at ``on_pre_optimizer_step``.
- ``precond`` (Adam/AdamW) copies the clipped gradient ``g_t`` at ``on_pre_optimizer_step`` and
  divides it by Adam's denominator ``P_t = sqrt(v_t / (1 - beta2^t)) + eps``, read from the
  optimizer's state at ``on_optimizer_step`` (right after ``optimizer.step()``).
- ``deconv`` takes the update exactly as ``update`` does and removes the momentum using only
  consecutive updates and the step's hyperparameters (``step_rules.deconv_coefficients``): for
  AdamW it equals ``g_t / P_t`` when ``P_t = P_{t-1}``, for SGD with momentum it is ``g_t``
  itself. The step's learning rate is read at ``on_step_begin``: the scheduler steps before
  ``on_step_end``.

Every sample is committed at ``on_step_end`` with ``StepMeta.global_step = state.global_step``
(the 1-based number of the step just taken). Its norm (for the finite check, the outlier test,
``n_zero`` and ``last_norm``) is accumulated while it is written: on CPU the sample is written
in pieces of ``CHUNK`` elements and each piece is read back while still in cache, and all targets
share one host sync per step.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

import torch
from transformers import TrainerCallback

from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.capture.outliers import NormOutliers
from sae_shards.capture.rollouts import calling_trainer
from sae_shards.capture.selection import (LoraTarget, Target, check_not_sharded, few_names,
                                          full_shape)
from sae_shards.capture.step_rules import (Scratch, deconv_coefficients, deconv_state, step_rule,
                                           unwrap_optimizer, write_deconv, write_precond)
from sae_shards.capture.update_writer import (SqNorm, alloc_snapshot, finite_norm,
                                              target_params, write_updates)
from sae_shards.core.targets import check_batch
from sae_shards.run.config import SOURCES
from sae_shards.run.versions import fp32_matmul

logger = logging.getLogger(__name__)

_OPTIMIZER_SOURCES = ("precond", "deconv")  # need to know the optimizer's step rule


def warn_low_precision_weights(targets: Mapping[str, Target], source: str) -> str | None:
    """Warn when targets are stored in 16 bits: the optimizer's step is added to weights that
    keep 8 (bf16) or 11 (fp16) significant bits, so a step smaller than about 2^-9 of a weight
    rounds away, and ``theta_after - theta_before`` holds only what survived the rounding (at a
    small learning rate, most entries zero). That is what the weights did, not what the
    optimizer asked for; float32 weights (with bf16 autocast) keep the whole step. Returns the
    warning (None without one), which ``summary.json`` repeats for the report's reader."""
    low = {n: p.dtype for n, t in targets.items() for p in target_params(t)
           if p.dtype in (torch.bfloat16, torch.float16)}
    if low:
        dtypes = sorted({str(d).removeprefix("torch.") for d in low.values()})
        text = (f"capture.source={source}: {len(low)} of the targets ({few_names(list(low), 3)}) "
                f"are stored in {'/'.join(dtypes)}, whose weights round away an optimizer step "
                "smaller than about 2^-9 of their magnitude: the captured update is what "
                "survived that rounding (often mostly zeros at a small learning rate), not the "
                "optimizer's step. Load the model in float32 (dtype=torch.float32) and train "
                "with bf16=True (autocast) to capture the whole step")
        logger.warning("%s", text)
        return text
    return None


def lora_matmul_note(n_lora: int, precision: str) -> str | None:
    """The note for ``n_lora`` LoRA targets on a GPU whose fp32 matmuls run at ``precision``
    (``run/versions.py``'s ``fp32_matmul``): a LoRA target's update ``s * (B0 dA + dB A1)`` is
    formed by two matrix products, which TF32 (or bf16) computes from inputs rounded to 10 (7)
    mantissa bits, so its entries are off by about 1e-3 (1e-2) of their size instead of fp32
    rounding; a dense target's update is a difference and stays exact. None when there is no
    LoRA target or the products are full fp32 (``"ieee"``)."""
    if not n_lora or precision == "ieee":
        return None
    return (f"capture.source=update: the {n_lora} LoRA targets' updates are matrix products of "
            f"their factors, which torch computes in {precision} here (fp32_precision, or "
            "transformers' tf32=True): each captured entry is rounded to about "
            f"{'1e-3' if precision == 'tf32' else '1e-2'} of its size, not to fp32's 1e-7. Set "
            "tf32=False in the trainer's arguments, or torch.backends.cuda.matmul.fp32_precision "
            "= 'ieee', for updates exact to fp32 rounding")


def warn_lora_matmul_precision(targets: Mapping[str, Target]) -> str | None:
    """Warn with :func:`lora_matmul_note` for the LoRA targets on a GPU (the CPU's matmuls keep
    fp32 unless oneDNN has bf16 hardware: not flagged); returns the note."""
    lora = [t for t in targets.values() if isinstance(t, LoraTarget) and t.A.device.type == "cuda"]
    note = lora_matmul_note(len(lora), fp32_matmul(lora[0].A.device)) if lora else None
    if note:
        logger.warning("%s", note)
    return note


def _under_deepspeed(args: Any) -> bool:
    """Whether the trainer runs under DeepSpeed: its own ``deepspeed`` argument, or the
    launcher's (``accelerate launch --use_deepspeed``, which leaves ``args.deepspeed`` unset;
    the trainer that calls this hook then says so)."""
    return bool(getattr(args, "deepspeed", None)
                or getattr(calling_trainer(), "is_deepspeed_enabled", False))


# ---- the callback -----------------------------------------------------------------------------


class DeltaCapture(TrainerCallback):
    """Write one sample per optimizer step into ``buffer``, then call ``on_push(slot)``.

    ``targets`` comes from ``select_targets`` on the model the Trainer trains (with TRL, select
    from ``trainer.model`` after the trainer is built: it may load or wrap the model itself).
    ``source`` is one of

    - ``update``: fp32 ``theta_after - theta_before``; for LoRA the effective dense delta.
    - ``grad``: the clipped gradient.
    - ``precond``: Adam's preconditioned gradient ``g_t / (sqrt(v_t / (1 - beta2^t)) + eps)``,
      with ``g_t`` the clipped gradient and ``v_t``, ``t`` from the optimizer's state after the
      step. Needs ``torch.optim.Adam``/``AdamW`` without ``amsgrad`` (AMSGrad divides by the
      running maximum of ``v``; not supported).
    - ``deconv``: the update with the momentum removed, from consecutive updates and the step's
      learning rate, beta1/momentum and weight decay alone (no optimizer state; see
      ``step_rules.deconv_coefficients``). Adam/AdamW: an estimate of ``precond``, exact while
      Adam's denominator is unchanged between steps. ``torch.optim.SGD`` (dampening 0, no Nesterov):
      the clipped gradient, exactly up to fp32 rounding of the weights. A step with learning
      rate 0 cannot be inverted, nor a step that changed no weight (the optimizer skipped it:
      fp16 loss scaling found an inf), nor the step after either, nor the first step after
      resuming from a checkpoint (no previous update): these are skipped and counted in
      ``n_skipped``, with a warning. Adam's bias correction counts ``global_step``, so after
      skipped optimizer steps it runs ahead of Adam's own count (a small error, early only).

    ``grad``, ``precond`` and ``deconv`` take dense targets only and are not supported under
    DeepSpeed (gradients are not in ``param.grad``, parameters are flattened in the optimizer).
    ``meta_fn(global_step)`` gives the step's ``StepMeta``. A sample with a non-finite entry is
    skipped (``n_nonfinite`` counts it, with a warning); all-zero samples are pushed and counted in
    ``n_zero``.

    Distributed: capture runs only where ``state.is_world_process_zero``. Under DDP every rank
    holds identical parameters and gradients (after the all-reduce), so rank 0 sees the full delta.
    DeepSpeed ZeRO-1/2 work for ``update`` (full parameters on every rank). FSDP2 shards
    parameters into DTensors: ``ShardedDeltaCapture`` (``capture/sharded_delta.py``) takes
    ``update`` there, and ``Zero3DeltaCapture`` (``capture/zero3_delta.py``) under ZeRO-3.
    FSDP1 is not supported: this class's ``on_train_begin`` raises if a parameter looks sharded
    (``ds_id`` attribute, FSDP flat parameter, DTensor, or numel 0).
    ``buffer`` is None only on ranks other than 0 of a sharded capture.
    """

    sharded = False
    """Whether the targets are sharded across ranks (``ShardedDeltaCapture``)."""

    def __init__(
        self,
        targets: Mapping[str, Target],
        buffer: DeltaRingBuffer | None,
        source: str = "update",
        meta_fn: Callable[[int], StepMeta] | None = None,
        on_push: Callable[[int], None] | None = None,
        outlier_ratio: float = 0.0,
    ) -> None:
        match source:
            case "update" | "grad" | "precond" | "deconv":
                pass
            case other:
                raise ValueError(f"capture.source {other!r} is not supported; use one of {SOURCES}")
        if source != "update" and any(isinstance(t, LoraTarget) for t in targets.values()):
            raise ValueError(
                f"capture.source={source!r} is not supported for LoRA targets (the gradient and "
                "optimizer state of the effective weight are not available from the adapter "
                "factors); use source='update'"
            )
        if buffer is not None:
            shapes = {name: torch.empty(full_shape(t), device="meta")
                      for name, t in targets.items()}
            check_batch(shapes, buffer.targets, batched=False)
        if not self.sharded:
            check_not_sharded((n, p) for n, t in targets.items() for p in target_params(t))
        self.targets = dict(targets)
        self.buffer = buffer
        self.source = source
        self.meta_fn = meta_fn
        self.on_push = on_push
        self.n_captured = 0
        """Samples this callback committed to the buffer."""
        self.n_zero = 0
        """Samples pushed whose every entry is zero (e.g. all rewards of every group equal)."""
        self.n_nonfinite = 0
        """Samples skipped because an entry was nan or inf."""
        self.outliers = NormOutliers(outlier_ratio)
        """Skips a sample whose norm exceeds ``outlier_ratio`` times the running RMS norm."""
        self.n_outliers = 0
        """Samples skipped as outliers (``outlier_ratio``)."""
        self.precision_note: str | None = None
        """Why the captured updates are not the optimizer's whole step (16-bit targets) or not
        exact (LoRA products in TF32 on a GPU), set when training begins; ``summary.json``
        repeats it."""
        self.n_skipped = 0
        """``deconv`` steps that could not be inverted (learning rate 0, or no weight changed,
        at the step or the one before, or the first step after a resume)."""
        self.last_norm = math.nan
        """Frobenius norm over all targets of the last finite sample (fp32)."""
        self._snapshots: dict[str, tuple[torch.Tensor, ...]] | None = None  # allocated lazily
        # update with fp32 slots on the targets' device: the slot itself holds the snapshot of
        # dense targets (claimed at on_step_begin), and the diff is taken in place.
        slot_device = (torch.empty(0, device=buffer.device).device  # "cuda" -> "cuda:0"
                       if buffer is not None else None)
        self._snap_in_slot = (source == "update" and buffer is not None
                              and buffer.dtype == torch.float32) and all(
            isinstance(t, LoraTarget) or t.device == slot_device for t in targets.values())
        self._armed = False  # a snapshot for the current optimizer step exists
        self._slot: int | None = None  # slot being written this step
        self._slot_views: dict[str, torch.Tensor] = {}
        # precond / deconv (dense targets), resolved at on_train_begin:
        self._optimizer: torch.optim.Optimizer | None = None  # the torch optimizer, unwrapped
        self._kind = ""  # "adam" or "sgd": the optimizer's step rule
        self._groups: dict[str, dict] = {}  # target -> its optimizer param group
        self._scratch: dict[str, Scratch] = {}  # fp32 work tensors, allocated once
        self._lr: dict[str, float] = {}  # deconv: target -> learning rate of the current step
        self._t = 0  # deconv: 1-based number of the current optimizer step
        self._have_prev = False  # deconv: _scratch[*].prev holds a_{t-1} of the previous step

    # ---- callback events ----

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._reset()
        if not state.is_world_process_zero:
            return
        check_not_sharded(model.named_parameters())
        if self.source != "update" and _under_deepspeed(args):
            raise ValueError(
                f"capture.source={self.source!r} is not supported under DeepSpeed (gradients are "
                "not in param.grad at on_pre_optimizer_step and the optimizer holds flattened "
                "parameters); use source='update'"
            )
        self._check_owned(model)
        if self.source in ("update", "deconv"):
            notes = (warn_low_precision_weights(self.targets, self.source),
                     warn_lora_matmul_precision(self.targets) if self.source == "update" else None)
            self.precision_note = ". Also: ".join(n for n in notes if n) or None
        if self.source in _OPTIMIZER_SOURCES:
            self._optimizer = unwrap_optimizer(optimizer)
            self._kind, self._groups = step_rule(self._optimizer, self.targets, self.source)
            if not self._scratch:
                self._scratch = {
                    n: Scratch.alloc(p, self.source, self.buffer) for n, p in self.targets.items()
                }
        if self._snapshots is None and self.source in ("update", "deconv"):
            self._snapshots = {
                n: () if self._snap_in_slot and not isinstance(t, LoraTarget)
                else alloc_snapshot(t, self.buffer) for n, t in self.targets.items()}

    def _reset(self) -> None:
        """Forget a step a previous ``train()`` stopped in the middle of."""
        if self._slot is not None:
            self.buffer.abort(self._slot)
        self._armed, self._slot, self._slot_views = False, None, {}
        self._have_prev = False

    def _check_owned(self, model: torch.nn.Module) -> None:
        """Every target's parameters belong to ``model``, the model being trained."""
        owned = {id(p) for p in model.parameters()}
        foreign = [n for n, t in self.targets.items() if not {id(p) for p in target_params(t)} <= owned]
        if foreign:
            raise ValueError(
                f"capture targets {few_names(foreign, 3)} are not parameters of the trained model; "
                "select them from trainer.model after the trainer is built (under FSDP2, after "
                "it sharded the model)"
            )

    @torch.no_grad()
    def on_step_begin(self, args, state, control, **kwargs):
        # Fires once per optimizer step in transformers 5.23; the flag keeps one snapshot per
        # optimizer step even if it fired per micro-batch (weights do not change in between).
        if self.source not in ("update", "deconv") or not state.is_world_process_zero:
            return
        if self._armed:
            return
        if self._snap_in_slot:
            self._slot, self._slot_views = self.buffer.begin_write()
        pairs = [(snap, p) for name, target in self.targets.items()
                 for snap, p in zip(self._snapshots[name] or (self._slot_views[name],),
                                    target_params(target))]
        torch._foreach_copy_([s for s, _ in pairs], [p.detach() for _, p in pairs])
        if self.source == "deconv":
            # The value this step's optimizer.step() uses: the scheduler steps after it, before
            # on_step_end. global_step counts optimizer steps, across resumes.
            self._lr = {name: float(group["lr"]) for name, group in self._groups.items()}
            self._t = state.global_step + 1
        self._armed = True

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.source not in ("grad", "precond") or not state.is_world_process_zero:
            return
        self._slot, self._slot_views = self.buffer.begin_write()
        for name, p in self.targets.items():
            view = self._slot_views[name]
            g = view if self.source == "grad" else self._scratch[name].grad(view)
            if p.grad is None:  # no gradient reached p this step
                g.zero_()
            else:
                g.copy_(p.grad)

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.source != "precond" or not state.is_world_process_zero:
            return
        states = {name: self._optimizer.state.get(p) for name, p in self.targets.items()}
        steps = steps_on_host({n: st["step"] for n, st in states.items() if st})
        for name, opt_state in states.items():
            group, view, scratch = self._groups[name], self._slot_views[name], self._scratch[name]
            if not opt_state:  # torch's Adam skips parameters without a gradient
                view.zero_()
                continue
            write_precond(
                scratch.grad(view), opt_state["exp_avg_sq"], steps[name],
                beta2=group["betas"][1], eps=group["eps"], denom=scratch.denom, view=view,
            )

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        sq_norm = SqNorm()  # of the sample, added as it is written
        if self.source == "update":
            assert self._armed, "on_step_end without a snapshot from on_step_begin"
            if not self._snap_in_slot:
                self._slot, self._slot_views = self.buffer.begin_write()
            write_updates(((target, self._snapshots[name] or (self._slot_views[name],),
                            self._slot_views[name]) for name, target in self.targets.items()),
                          sq_norm)
            self._armed = False
        elif self.source == "deconv":
            assert self._armed, "on_step_end without a snapshot from on_step_begin"
            self._armed = False
            if not self._deconv_step(state.global_step):
                return
        self._commit(state.global_step, sq_norm)

    def _commit(self, global_step: int, sq_norm: SqNorm) -> None:
        """Check the slot being written (finite, not an outlier) and commit it, or abort it."""
        slot, views = self._slot, self._slot_views
        self._slot, self._slot_views = None, {}
        if not sq_norm:  # grad / precond / deconv: one more read of the written slot
            for view in views.values():
                sq_norm.add(view)
        norm = finite_norm(sq_norm, views.values())
        if norm is None:
            self.buffer.abort(slot)
            self.n_nonfinite += 1
            logger.warning(
                "step %d: the %s sample has non-finite entries; skipped (%d so far)",
                global_step, self.source, self.n_nonfinite,
            )
            return
        if self.outliers.is_outlier(norm, global_step):
            self.buffer.abort(slot)
            self.n_outliers += 1
            logger.warning(
                "step %d: the %s sample's norm %.3g is over capture.outlier_ratio=%g times the "
                "running RMS %.3g; skipped (%d so far)", global_step, self.source, norm,
                self.outliers.ratio, self.outliers.last_rms, self.n_outliers,
            )
            return
        self.last_norm = norm
        self.n_zero += int(norm == 0.0)
        meta = self.meta_fn(global_step) if self.meta_fn else StepMeta(global_step)
        self.buffer.commit(slot, meta)
        self.n_captured += 1
        if self.on_push is not None:
            self.on_push(slot)

    def counters(self) -> dict[str, float]:
        """The counters and the outlier reference, for resume state."""
        return {"n_captured": self.n_captured, "n_zero": self.n_zero,
                "n_nonfinite": self.n_nonfinite, "n_skipped": self.n_skipped,
                "n_outliers": self.n_outliers, **self.outliers.state()}

    def load_counters(self, saved: dict[str, float]) -> None:
        for key in ("n_captured", "n_zero", "n_nonfinite", "n_skipped", "n_outliers"):
            setattr(self, key, int(saved[key]))
        self.outliers.load_state(saved)

    def _deconv_step(self, global_step: int) -> bool:
        """Claim a slot and write this step's ``deconv`` sample; False if the step was skipped."""
        coef = {n: deconv_coefficients(self._kind, g, self._t) for n, g in self._groups.items()}
        lr_zero = any(self._lr[n] == 0.0 for n in self.targets)
        # the optimizer skipped the step (fp16 loss scaling found an inf): an update of zero
        # is no step of its rule, and the next step's momentum is not the one it inverts
        unchanged = all(torch.equal(p, self._snapshots[n][0]) for n, p in self.targets.items())
        no_prev = not self._have_prev and any(c.beta != 0.0 for c in coef.values())
        if lr_zero or unchanged or no_prev:
            if not (lr_zero or unchanged):  # keep a_t, so the next step can be inverted
                for name, p in self.targets.items():
                    deconv_state(p, self._snapshots[name][0], self._lr[name], coef[name],
                                 out=self._scratch[name].prev)
            self._have_prev = not (lr_zero or unchanged)
            self.n_skipped += 1
            why = ("the learning rate is 0" if lr_zero else
                   "no weight changed: the optimizer skipped the step, e.g. fp16 loss scaling "
                   "found an inf" if unchanged else "the previous update is unknown")
            logger.warning(
                "step %d: no deconv sample (%s: the update cannot be inverted); skipped "
                "(%d so far)", global_step, why, self.n_skipped,
            )
            return False
        self._slot, self._slot_views = self.buffer.begin_write()
        for name, p in self.targets.items():
            scratch = self._scratch[name]
            theta = self._snapshots[name][0]
            a_t = write_deconv(p, theta, scratch, self._lr[name], coef[name],
                               self._slot_views[name])
            # a_t now lies in the snapshot tensor: it becomes the next step's a_{t-1}, and the
            # old a_{t-1} tensor becomes the next snapshot (no copy).
            self._snapshots[name], scratch.prev = (scratch.prev,), a_t
        self._have_prev = True
        return True


def steps_on_host(steps: dict[str, Any]) -> dict[str, float]:
    """Adam's step counts by target as floats, read with one host sync per device: fused and
    capturable Adam keep each parameter's count in a tensor on its device, and reading them one
    by one would stall the RL loop once per target every step."""
    out = {n: float(s) for n, s in steps.items() if not torch.is_tensor(s)}
    by_device: dict[torch.device, list[str]] = {}
    for name, s in steps.items():
        if torch.is_tensor(s):
            by_device.setdefault(s.device, []).append(name)
    for names in by_device.values():
        values = torch.stack([steps[n].detach().reshape(()).to(torch.float64) for n in names])
        out.update(zip(names, values.tolist()))
    return out
