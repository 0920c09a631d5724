"""The end of a run: the buffered samples under the final SAE, the held-out FVU, and the run's
summary figures (``summary.json``)."""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any, Iterable

import torch

from sae_shards.capture.delta import DeltaCapture
from sae_shards.capture.event_capture import EventCapture
from sae_shards.capture.pipeline import Pipeline
from sae_shards.capture.runner import ActivationLog, encode_buffer, starved_budget_text
from sae_shards.core.metrics import evaluate_heldout
from sae_shards.run.config import RunnerConfig

log = logging.getLogger(__name__)


def final_activations(parts: Pipeline) -> ActivationLog:
    """Every buffered sample encoded by the final SAE (empty if it never trained)."""
    return encode_buffer(parts.sae, parts.buffer, parts.trainer.n_steps)


def heldout_fvu(parts: Pipeline) -> tuple[float, int]:
    """Pooled FVU of the final SAE on the buffered held-out samples (NaN with fewer than two, or
    when the SAE never trained), and how many there are."""
    slots = parts.buffer.chronological_slots()
    heldout = slots[torch.tensor([parts.buffer.metadata(s).heldout for s in slots.tolist()],
                                 dtype=torch.bool)]
    if heldout.numel() < 2 or not parts.sae.input_scale > 0:
        return math.nan, int(heldout.numel())
    batches = [parts.buffer.gather(chunk) for chunk in heldout.split(256)]  # [<= 256] slots
    return evaluate_heldout(parts.sae, batches).fvu, int(heldout.numel())


def run_summary(parts: Pipeline, capture: DeltaCapture | EventCapture, runner: RunnerConfig,
                rewards: list[float], fvu: list[float], extra: dict[str, Any]) -> dict[str, Any]:
    """``summary.json``: reward (mean per RL step, in order) over the first and last fifth of the
    steps, FVU over the first and last tenth of the SAE steps, the capture's and the SAE's
    counters, the dead fraction, the training samples the SAE drew per captured delta
    (``samples_per_slot``), with ``runner.sae_budget`` the share of RL time sae-shards used
    (``budget_used``: its time on the RL thread and the SAE's, over the RL time that earned
    credit), plus ``extra``; a ``warning`` when the SAE never trained, when the budget did not
    cover the hooks' own time (``SAEBudget.starved``: the SAE got next to no steps), or when it
    ends reconstructing worse than the samples' mean (``fvu_last`` > 1); the samples the outlier
    test skipped (``outliers_note``) and the capture's ``precision_note`` (16-bit targets: the updates are
    what survived rounding) are added to it."""
    trainer = parts.trainer
    (reward_first, reward_last), (fvu_first, fvu_last) = first_last(rewards, 5), first_last(fvu, 10)
    summary = {
        "rl_steps": parts.loop.last_rl_step, "sae_steps": trainer.n_steps,
        "reward_first": reward_first, "reward_last": reward_last,
        "fvu_first": fvu_first, "fvu_last": fvu_last,
        "captured": capture.n_captured, "zero_samples": capture.n_zero,
        "nonfinite_samples": capture.n_nonfinite, "outlier_samples": capture.n_outliers,
        # per step: updates skipped (no previous update, lr = 0); per event, the events left
        # out are counted as zero_advantage_events and zero_samples instead
        "skipped_steps": None if isinstance(capture, EventCapture) else capture.n_skipped,
        "sae_rejected_nonfinite": trainer.n_rejected_nonfinite,
        "sae_skipped_zero": trainer.n_skipped_zero,
        "sae_skipped_degenerate": trainer.n_skipped_degenerate,  # batches of one distinct sample
        # dead: silent for sae.dead_after samples, which a short run may never see (then null)
        "dead_frac": trainer.stats.dead_frac(parts.sae.cfg.dead_after),
        "never_fired_frac": float((trainer.stats.fire_count == 0).float().mean()),
        "samples_per_slot": trainer.stats.n_samples / max(capture.n_captured, 1),
        **_budget_figures(parts.loop.budget),
        **(capture.summary() if isinstance(capture, EventCapture) else {}),
        **extra,
    }
    if trainer.n_steps == 0:
        why = _why_untrained(capture, runner, trainer.n_skipped_degenerate,
                             bool(extra.get("interrupted")))
        summary["warning"] = (f"the SAE never trained: {why}. The checkpoint holds the random "
                              "initialisation")
        log.warning("%s", summary["warning"])
    elif parts.loop.budget is not None and parts.loop.budget.starved():
        summary["warning"] = starved_budget_text(
            runner.sae_budget, parts.loop.budget.hooks_share(),
            f"the SAE got {trainer.n_steps} step(s) in all ({summary['samples_per_slot']:.2f} "
            "training samples per captured delta)")
        log.warning("%s", summary["warning"])
    elif worse := worse_than_mean(summary["fvu_last"], trainer.n_steps, summary["fvu_first"],
                                  parts.sae.cfg.lr):
        summary["warning"] = worse if diverged(summary["fvu_last"]) else (
            f"{worse}. Train it longer ({_more_sae_steps(runner)}) or lower sae.lr")
        log.warning("%s", summary["warning"])
    for note in (outliers_note(capture),
                 getattr(capture, "precision_note", None)):  # said at the start: the report too
        if note:
            summary["warning"] = f"{summary['warning']}. Also: {note}" if "warning" in summary \
                else note
    return summary


def outliers_note(capture: DeltaCapture | EventCapture) -> str | None:
    """What the outlier test left out of the SAE's samples, when it left anything out."""
    skipped = capture.n_outliers
    if not skipped:
        return None
    what = "events" if isinstance(capture, EventCapture) else "samples"
    return (f"{skipped} of {skipped + capture.n_captured} {what} "
            f"{'was' if skipped == 1 else 'were'} skipped as outliers (a norm "
            f"over capture.outlier_ratio={capture.outliers.ratio:g} times the running RMS of the "
            "accepted ones before it); capture.outlier_ratio=0 keeps every finite one")


DIVERGED = 10.0
"""An SAE whose FVU over its last tenth of steps is above this diverged: an untrained one
reconstructs about as well as the samples' mean (FVU near 1), and training a diverged one
longer makes it worse."""


def diverged(fvu_last: float | None) -> bool:
    """Whether the SAE's last FVU is past ``DIVERGED`` (NaN or missing: not known, False)."""
    return isinstance(fvu_last, (int, float)) and fvu_last > DIVERGED


def worse_than_mean(fvu_last: float | None, sae_steps: int | None,
                    fvu_first: float | None = None, lr: float | None = None) -> str | None:
    """The warning for an SAE that ends reconstructing its samples worse than their mean does
    (FVU over its last tenth of steps above 1), or None (also for a missing or NaN FVU); one
    that ``diverged`` is told to lower its learning rate ``lr``
    (``sae.lr``), not to train longer (``fvu_first``: said beside it)."""
    if not (isinstance(fvu_last, (int, float)) and fvu_last > 1):  # NaN compares False
        return None
    if diverged(fvu_last):
        now = "" if lr is None else f", now {lr:g}"
        began = (f" ({fvu_first:.3g} over its first)"
                 if isinstance(fvu_first, (int, float)) else "")
        return (f"the SAE diverged: its FVU over its last tenth of steps is {fvu_last:.3g}"
                f"{began}, after {sae_steps} SAE steps, so its shards describe nothing and "
                f"training longer makes it worse. Lower sae.lr{now}")
    return (f"the SAE reconstructs its samples worse than their mean does (FVU over its last "
            f"tenth of steps {fvu_last:.3g} > 1, after {sae_steps} SAE steps): its shards do "
            "not describe the updates yet")


def _more_sae_steps(runner: RunnerConfig) -> str:
    """How to give the SAE more steps: with ``runner.sae_budget`` set, the budget decides how
    many there are and ``runner.sae_steps_per_rl_step`` is not used."""
    if runner.sae_budget > 0:
        return (f"more RL steps, or a larger runner.sae_budget={runner.sae_budget:g}, which sets "
                "the SAE steps; runner.sae_steps_per_rl_step is not used with a budget")
    return "more RL steps, or runner.sae_steps_per_rl_step"


def _why_untrained(capture: DeltaCapture | EventCapture, runner: RunnerConfig,
                   degenerate: int = 0, interrupted: bool = False) -> str:
    """Why the SAE took no step: nothing but zeros to train on, every batch it drew one sample
    repeated (``degenerate``: the trainer's batches skipped so), or too few samples by the end
    (``interrupted``: a run stopped before it got them, which its resume gives)."""
    n, zero = capture.n_captured, capture.n_zero
    if not isinstance(capture, EventCapture) and n and zero == n:
        return (f"every one of the {n} captured samples was all zeros, nothing to train on (no "
                "target weight changed: every prompt group's completions rewarded alike, so "
                "every advantage was 0 (a reward the policy never earns, or always earns); a "
                "learning rate of 0; or every optimizer step skipped, as fp16 loss scaling does "
                "after an inf gradient)")
    if isinstance(capture, EventCapture) and not n and (capture.n_skipped or zero):
        counts = (f"no event was captured ({capture.n_skipped} had every advantage 0: all "
                  f"completions of their prompt rewarded alike; {zero} a zero gradient)")
        if zero:  # advantages that moved, and still nothing reached the targets' hooks
            return (f"{counts}: the events whose advantages differed had no gradient on the "
                    "targets, so their gradient did not pass through the targets' modules (a "
                    "weight the loss uses outside its module) or RL does not change them; check "
                    "capture.targets, or capture per step (capture.granularity=step)")
        return (f"{counts}: no prompt group's completions were rewarded differently, so there "
                "was no gradient to split; a reward that tells a group's completions apart (or "
                "more completions per prompt, num_generations) gives events")
    if degenerate:  # it did start: each batch it drew held one distinct sample
        zeros = (f"; {zero} of the captured samples were all zeros, which it drops from a "
                 "batch (a step or event whose gradient on the targets was zero)" if zero else "")
        return (f"{n} sample{'s were' if n != 1 else ' was'} captured and the SAE started, but "
                f"each of its {degenerate} batches held one distinct nonzero sample (repeated), "
                f"which it skips (no spread to reconstruct: sae_skipped_degenerate){zeros}. It "
                "needs at least two different nonzero samples buffered when it starts: run more "
                f"RL steps, or start it later (runner.min_samples={runner.min_samples}, "
                f"runner.sae_start_step={runner.sae_start_step})")
    return (f"{n} samples were captured, but it starts once runner.min_samples="
            f"{runner.min_samples} trainable samples are buffered and RL reaches "
            f"runner.sae_start_step={runner.sae_start_step}; "
            + ("the run was stopped before that: resume it to train the SAE" if interrupted
               else "run more RL steps or lower them"))


def clip_figures(rows: Iterable[dict[str, Any]], max_grad_norm: float | None) -> dict[str, Any]:
    """``summary.json``'s clipping figures of a per-event run, whose samples are gradients
    before clipping: of the RL steps whose ``grad_norm`` (the trainer's, before clipping) the
    metrics log holds, how many the trainer clipped (``grad_norm > max_grad_norm``). A clipped
    step applied its events' sum scaled by ``max_grad_norm / grad_norm``."""
    norms = [float(r["grad_norm"]) for r in rows if r.get("kind") == "rl"
             and isinstance(r.get("grad_norm"), (int, float)) and math.isfinite(r["grad_norm"])]
    clips = max_grad_norm is not None and max_grad_norm > 0
    return {"max_grad_norm": max_grad_norm if clips else None, "grad_norm_steps": len(norms),
            "clipped_steps": sum(n > max_grad_norm for n in norms) if clips else 0}


def first_last(values: list[float], parts: int) -> tuple[float, float]:
    """Means of the first and the last ``1 / parts`` of ``values`` (at least one value each;
    NaNs left out; NaN when nothing is left): ``summary.json``'s reward (fifths of the RL
    steps) and FVU (tenths of the SAE steps) first and last."""
    n = max(1, len(values) // parts)
    return _mean(values[:n]), _mean(values[-n:])


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def _budget_figures(budget) -> dict[str, float]:
    if budget is None:
        return {}
    paid, rl = budget.totals()  # the whole run's, resumed processes included (as wall_s)
    return {"budget_used": paid / rl if rl else math.nan, "budget_paid_s": paid, "budget_rl_s": rl}
