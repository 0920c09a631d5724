"""SAETrainer: one SAE optimisation step at a time on batches of samples from any source.

Samples come in parameter units (``{target: [batch, *shape]}``, or factored per-event samples
``[batch, T, m + n]`` for an SAE with ``sample_form="factored"``), from an iterator, a callable or a
ring buffer's ``sample()``. The trainer keeps what changes during training: Adam state, the
running input scale, per-latent firing statistics and counters of rejected samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from sae_shards.core import events
from sae_shards.core.event_losses import dense_event_losses, event_losses
from sae_shards.core.factored import StepLosses, dense_losses, factored_losses
from sae_shards.core.metrics import sample_sq_norms
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sparsity import SparseCodes
from sae_shards.core.targets import check_batch

Sample = Mapping[str, Tensor]


@dataclass(frozen=True)
class StepMetrics:
    """Figures of one SAE step (logged as ``sae/<field>``)."""

    fvu: float
    """Batch-pooled fraction of variance unexplained."""
    aux_loss: float
    """AuxK loss: how badly the top dead latents reconstruct the residual (0 when none dead)."""
    loss: float
    """fvu + aux_coef * aux_loss."""
    l0: float
    """Mean number of active latents per sample."""
    dead_frac: float | None
    """Fraction of latents that have not fired in the last ``dead_after`` samples; None until
    the SAE has seen ``dead_after`` samples (``dead_fraction``)."""
    n_samples: int
    """Samples trained on in this step (after rejecting non-finite and all-zero ones)."""
    input_scale: float
    """Running RMS of sample norms, parameter units."""


def dead_fraction(samples_since_fired: Tensor, dead_after: int,
                  n_samples: int | None = None) -> float | None:
    """Fraction of latents silent for the last ``dead_after`` training samples
    (``samples_since_fired [n_latents]``), or None while the SAE has seen fewer than
    ``dead_after`` samples in all (``n_samples``; when unknown, the longest silence is its
    lower bound): before that no latent can be called dead, and 0 would claim that none is."""
    seen = n_samples if n_samples is not None else int(samples_since_fired.max()) if samples_since_fired.numel() else 0
    if seen < dead_after:
        return None
    return float(is_dead(samples_since_fired, dead_after).float().mean())


def is_dead(samples_since_fired: Tensor, dead_after: int) -> Tensor:
    """Which latents are dead: silent for at least the last ``dead_after`` training samples
    (the set AuxK trains and the one ``dead_fraction`` counts), ``[n_latents]`` bool."""
    return samples_since_fired >= dead_after


class LatentStats:
    """Per-latent firing statistics, updated after every step (stored in checkpoints)."""

    def __init__(self, n_latents: int, device: torch.device):
        self.samples_since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.fire_count = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.abs_act_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.last_active_step = torch.full((n_latents,), -1, dtype=torch.long, device=device)
        self.n_samples = 0

    @torch.no_grad()
    def update(self, codes: SparseCodes, step: int) -> None:
        idx, val = codes  # [batch, width]; a padded entry has value 0 and counts nowhere
        flat = idx.reshape(-1)
        n = idx.new_zeros(self.fire_count.shape[0])  # [n_latents] firings in this batch
        n.scatter_add_(0, flat, (val != 0).reshape(-1).long())
        self.fire_count += n
        self.abs_act_sum.scatter_add_(0, flat, val.abs().double().reshape(-1))  # padding adds 0
        fired = n > 0
        self.samples_since_fired += idx.shape[0]
        self.samples_since_fired.masked_fill_(fired, 0)  # masks, not indexing: no device sync
        self.last_active_step.masked_fill_(fired, step)
        self.n_samples += idx.shape[0]

    def dead_mask(self, dead_after: int) -> Tensor:
        return is_dead(self.samples_since_fired, dead_after)

    def dead_frac(self, dead_after: int) -> float | None:
        """``dead_fraction`` of these statistics (None before ``dead_after`` samples)."""
        frac = self.dead_frac_tensor(dead_after)
        return None if frac is None else float(frac)

    def dead_frac_tensor(self, dead_after: int) -> Tensor | None:
        """:meth:`dead_frac` as a 0-d tensor on the device, read with the step's other figures
        (None before ``dead_after`` samples: known on the host)."""
        if self.n_samples < dead_after:
            return None
        return is_dead(self.samples_since_fired, dead_after).float().mean()

    def density(self) -> Tensor:
        """Fraction of all training samples on which each latent fired, [n_latents]."""
        return self.fire_count.double() / max(self.n_samples, 1)

    def mean_abs_act(self) -> Tensor:
        """Mean |activation| when firing (scaled units), [n_latents]."""
        return self.abs_act_sum / self.fire_count.clamp_min(1).double()

    def as_tensors(self) -> dict[str, Tensor]:
        return {
            "stats.density": self.density().float(),
            "stats.mean_abs_act": self.mean_abs_act().float(),
            "stats.last_active_step": self.last_active_step.clone(),
            "stats.fire_count": self.fire_count.clone(),
            "stats.samples_since_fired": self.samples_since_fired.clone(),
        }


class SAETrainer:
    """Trains a :class:`LowRankSAE` one batch at a time (Adam, fp32 state)."""

    def __init__(self, sae: LowRankSAE, dense_loss: bool = False):
        self.sae = sae
        # True: the dense reference loss (reconstruction [batch, m, n] per target; factored
        # samples are materialised first), for parity tests and benchmarks; default: the
        # factored loss (core/factored.py; core/event_losses.py for factored samples).
        self.dense_loss = dense_loss
        self.cfg = sae.cfg
        self.optimizer = torch.optim.Adam(
            [p for p in sae.parameters() if p.requires_grad], lr=self.cfg.lr, fused=True
        )
        self.stats = LatentStats(self.cfg.n_latents, sae.device)
        self.n_steps = 0
        self.n_rejected_nonfinite = 0
        self.n_skipped_zero = 0
        self.n_skipped_degenerate = 0
        """Steps skipped because every kept sample of the batch was the same sample (one slot
        drawn each time, the others all zero): no variance for the FVU to divide by."""

    # ------------------------------------------------------------------ data hygiene
    def _clean(self, batch: Sample) -> tuple[dict[str, Tensor], Tensor, bool] | None:
        """Check names/shapes, move to the SAE's device, drop non-finite and all-zero samples.

        Returns the kept samples, their squared norms ``[batch]`` and whether those norms are
        all equal (``_one_distinct_sample``'s first test), or None if none is kept. What the
        host needs to know is read in one device sync, not one per figure.
        """
        factored = self.sae.sample_form == "factored"
        if factored:
            events.check_event_batch(batch, self.sae.targets)
        else:
            check_batch(batch, self.sae.targets)
        x = {t.name: batch[t.name].to(self.sae.device, torch.float32) for t in self.sae.targets}
        # [batch]; inf/NaN exactly for rows with a non-finite entry
        sq = events.sq_norms(x, self.sae.targets) if factored else sample_sq_norms(x)
        finite = sq.isfinite()
        nonzero = sq > 0
        keep = finite & nonzero
        lowest = torch.where(keep, sq, torch.inf).min()
        highest = torch.where(keep, sq, -torch.inf).max()  # == lowest: every kept norm equal
        n_nonfinite, n_zero, n_kept, equal = torch.stack(
            [(~finite).sum(), (finite & ~nonzero).sum(), keep.sum(), (lowest == highest).long()]
        ).tolist()
        self.n_rejected_nonfinite += n_nonfinite
        self.n_skipped_zero += n_zero
        if n_kept == 0:
            return None
        if n_kept < keep.numel():
            x = {k: v[keep] for k, v in x.items()}
            sq = sq[keep]
        return x, sq, bool(equal)

    @torch.no_grad()
    def _update_scale(self, sq_norms: Tensor) -> None:
        """The running RMS of sample norms: an EMA of the mean square, or the batch's own before
        the first batch (a ``where``, not a branch: no device sync)."""
        ms = sq_norms.mean()
        s = self.sae.input_scale
        ema = ((1 - self.cfg.scale_ema) * s.pow(2) + self.cfg.scale_ema * ms).sqrt()
        s.copy_(torch.where(s > 0, ema, ms.sqrt()))

    # ------------------------------------------------------------------ the step
    def step(self, batch: Sample) -> StepMetrics | None:
        """One optimisation step; returns None when every sample was rejected."""
        cleaned = self._clean(batch)
        if cleaned is None:
            return None
        x, sq_norms, equal_norms = cleaned
        if _one_distinct_sample(x, sq_norms, equal_norms):
            # no spread about the batch mean: the FVU's denominator is 0 and one step at ~1e30
            # would put inf into Adam's moments for good
            self.n_skipped_degenerate += 1
            return None
        self._update_scale(sq_norms)
        if self.n_steps == 0 and self.sae.b_dec is not None:
            with torch.no_grad():
                for t, bd in zip(self.sae.targets, self.sae.b_dec):
                    bd.copy_(x[t.name].mean(0)).div_(self.sae.input_scale)
        dead = self.stats.dead_mask(self.cfg.dead_after)

        # enable_grad: callers may sit inside no_grad (the capture callback does).
        with torch.enable_grad(), torch.autocast(self.sae.device.type, torch.bfloat16,
                                                 enabled=self.cfg.autocast_bf16):
            res = self._losses(x, sq_norms, dead)
            main, aux = res.fvu, res.aux
            loss = main + self.cfg.aux_coef * aux if self.cfg.aux_coef > 0 else main
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sae.normalize_decoder_()
        if res.batch_threshold is not None:
            self._update_threshold(res.batch_threshold)
        self.stats.update(res.codes, self.n_steps)
        self.n_steps += 1
        dead_frac = self.stats.dead_frac_tensor(self.cfg.dead_after)  # None before dead_after
        figures = [main, aux, loss, res.codes.active().sum(1).float().mean(),
                   self.sae.input_scale] + ([] if dead_frac is None else [dead_frac])
        # one device sync for the step's figures (float64 holds each fp32 value exactly)
        fvu, aux_loss, total, l0, scale, *dead = torch.stack(
            [f.detach().double() for f in figures]).tolist()
        return StepMetrics(fvu=fvu, aux_loss=aux_loss, loss=total, l0=l0,
                           dead_frac=dead[0] if dead else None,
                           n_samples=sq_norms.shape[0], input_scale=scale)

    def _losses(self, x: dict[str, Tensor], sq_norms: Tensor, dead: Tensor) -> StepLosses:
        """The step's losses on the cleaned parameter-unit batch ``x`` (norms ``[batch]``)."""
        aux_k, aux_coef = self.cfg.effective_aux_k, self.cfg.aux_coef
        if self.sae.sample_form == "factored":
            if self.dense_loss:  # reference: materialise every event, [batch, m, n]
                dense = events.materialize_all(x, self.sae.targets)
                xs = {k: v / self.sae.input_scale for k, v in dense.items()}
                return dense_event_losses(self.sae, xs, dead, aux_k, aux_coef)
            return event_losses(self.sae, x, dead, aux_k, aux_coef, sq_norms)
        if self.dense_loss or self.cfg.autocast_bf16:
            # bf16 inner products are too coarse for the factored loss's cancellation
            return dense_losses(self.sae, self.sae.to_scaled(x), dead, aux_k, aux_coef)
        return factored_losses(self.sae, x, dead, aux_k, aux_coef)

    @torch.no_grad()
    def _update_threshold(self, floor: Tensor) -> None:
        thr = self.sae.threshold  # NaN until the first batch_topk step sets it
        ema = thr * (1 - self.cfg.threshold_ema) + self.cfg.threshold_ema * floor
        thr.copy_(torch.where(torch.isnan(thr), floor, ema))

    # ------------------------------------------------------------------ resume state
    def state_tensors(self) -> dict[str, Tensor]:
        """Everything needed to resume, as plain tensors (written with safetensors)."""
        out: dict[str, Tensor] = {}
        params = [p for p in self.sae.parameters() if p.requires_grad]
        for i, p in enumerate(params):
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    out[f"adam.{i}.{key}"] = st[key].detach().clone()
            if "step" in st:
                out[f"adam.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).clone()
        for k, v in self.stats.as_tensors().items():
            out[f"trainer.{k}"] = v
        out["trainer.abs_act_sum"] = self.stats.abs_act_sum.clone()
        out["trainer.counters"] = torch.tensor(
            [self.n_steps, self.n_rejected_nonfinite, self.n_skipped_zero, self.stats.n_samples],
            dtype=torch.long)
        out["trainer.n_skipped_degenerate"] = torch.tensor(self.n_skipped_degenerate)
        return out

    def load_state_tensors(self, state: Mapping[str, Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (the SAE's own weights are loaded separately)."""
        params = [p for p in self.sae.parameters() if p.requires_grad]
        for i, p in enumerate(params):
            if f"adam.{i}.exp_avg" in state:
                self.optimizer.state[p] = {  # fused Adam keeps its step beside the parameter
                    "step": state[f"adam.{i}.step"].to(p.device, torch.float32).clone(),
                    "exp_avg": state[f"adam.{i}.exp_avg"].to(p.device).clone(),
                    "exp_avg_sq": state[f"adam.{i}.exp_avg_sq"].to(p.device).clone(),
                }
        dev = self.sae.device
        self.stats.fire_count = state["trainer.stats.fire_count"].to(dev).clone()
        self.stats.samples_since_fired = state["trainer.stats.samples_since_fired"].to(dev).clone()
        self.stats.last_active_step = state["trainer.stats.last_active_step"].to(dev).clone()
        self.stats.abs_act_sum = state["trainer.abs_act_sum"].to(dev).clone()
        counters = state["trainer.counters"].tolist()
        self.n_steps, self.n_rejected_nonfinite, self.n_skipped_zero, self.stats.n_samples = counters
        degenerate = state.get("trainer.n_skipped_degenerate")  # absent before 2026-12-02
        self.n_skipped_degenerate = int(degenerate) if degenerate is not None else 0


def _one_distinct_sample(x: Mapping[str, Tensor], sq_norms: Tensor, equal_norms: bool) -> bool:
    """Whether the batch holds one sample, or copies of one (``sq_norms``: ``[batch]``): equal
    norms first (``equal_norms``, read with the batch's other figures), then the rows
    themselves."""
    if sq_norms.numel() < 2:
        return True
    if not equal_norms:
        return False
    return all(torch.equal(v[i], v[0]) for v in x.values() for i in range(1, v.shape[0]))
