"""The rollouts of each optimizer step, read from the TRL trainer's own completion log.

TRL's GRPO and RLOO trainers keep the prompts, completions, per-function rewards and advantages
of the latest generation batch in ``trainer._logs`` (gathered from every process; extra columns
that reward functions add with ``log_extra`` under ``_logs["extra"]``). With ``num_iterations``
1 and ``steps_per_generation`` equal to ``gradient_accumulation_steps`` (TRL's defaults) that is
exactly the batch the optimizer step at hand trained on. ``_logs`` is private to TRL: this module
is the one place that reads it, and it fails loudly if the layout changes.

A ``TrainerCallback`` is not handed its trainer, so ``calling_trainer`` finds it on the call
stack: callback events are invoked from ``Trainer`` methods, whose ``self`` is the trainer.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
from typing import Any, NamedTuple

from sae_shards.run.config import generations_reused

log = logging.getLogger(__name__)


class StepRollouts(NamedTuple):
    """One optimizer step's rollouts (one entry per completion) and its reward statistics."""

    row: dict[str, Any]
    """``{"step", "prompts", "completions", "rewards", "advantages", "tasks", "reward_funcs"}``
    (``tasks``: the label column, None without one);
    ``rewards`` are TRL's weighted totals (NaN-free: unscorable completions are ``None``)."""
    reward_mean: float
    reward_std: float
    labels: tuple[str, ...]
    """The distinct labels of the step (sorted), empty when the trainer logs none."""


def calling_trainer(depth_limit: int = 64) -> Any | None:
    """The ``transformers.Trainer`` whose method is on the call stack, or None."""
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(depth_limit):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back
    return None


def scored_mean(rewards: list[float | None]) -> float:
    """A step's mean reward over its scored completions (one no reward function could score is
    logged as None and left out); NaN when none was scored."""
    scored = [r for r in rewards if r is not None]
    return statistics.fmean(scored) if scored else math.nan


class TRLRollouts:
    """Reads the latest generation batch from a TRL GRPO/RLOO trainer's completion log."""

    def __init__(self, trainer: Any, label_column: str | None = "task") -> None:
        logs = getattr(trainer, "_logs", None)
        needed = ("prompt", "completion", "rewards", "advantages", "extra")
        if not isinstance(logs, dict) or any(k not in logs for k in needed):
            raise ValueError(
                f"{type(trainer).__name__} keeps no TRL completion log (trainer._logs with "
                f"{list(needed)}); rollouts can be read from trl.GRPOTrainer and trl.RLOOTrainer "
                "(TRL 1.x); pass ShardCallback(..., record_rollouts=False) to capture without them")
        self.trainer = trainer
        self.label_column = label_column
        self._warned = False
        reused = generations_reused(getattr(trainer, "args", None))
        if reused:
            log.warning("the trainer trains on each generation over several optimizer steps "
                        "(%s): rollouts.jsonl gives each step the whole generation batch its "
                        "step came from, not the completions that step alone trained on",
                        reused)

    def read(self, step: int) -> StepRollouts | None:
        """The rollouts of optimizer step ``step`` (None when nothing was generated yet)."""
        logs = self.trainer._logs
        prompts, completions = list(logs["prompt"]), list(logs["completion"])
        if not prompts:
            return None
        per_func = {name: [_finite_or_none(v) for v in values]
                    for name, values in logs["rewards"].items()}
        weights = dict(zip(self.trainer.reward_func_names,
                           self.trainer.reward_weights.tolist(), strict=True))
        totals = [_weighted_total(i, per_func, weights) for i in range(len(prompts))]
        extra = logs["extra"]
        labels = ([str(x) for x in extra[self.label_column]]
                  if self.label_column and self.label_column in extra else None)
        if labels is None and not self._warned:
            self._warn_unlogged_labels(sorted(extra))
        row = {"step": step, "prompts": prompts, "completions": completions, "rewards": totals,
               "advantages": [float(a) for a in logs["advantages"]], "tasks": labels,
               "reward_funcs": per_func}
        scored = [r for r in totals if r is not None]
        std = population_std(scored) if len(scored) > 1 else 0.0
        return StepRollouts(row, scored_mean(totals), std, tuple(sorted(set(labels or ()))))

    def _warn_unlogged_labels(self, logged: list[str]) -> None:
        """Once: the dataset has the label column but no reward function logged it, or the
        reward functions log other columns (``logged``) and none is the label column, so every
        rollout and sample would go unlabelled without a word."""
        self._warned = True
        columns = getattr(getattr(self.trainer, "train_dataset", None), "column_names", None)
        if self.label_column and logged:
            log.warning(
                "the reward functions log %s with log_extra but not the label column %r: "
                "rollouts.jsonl and the samples carry no labels. If one of them names each "
                "completion's context, pass ShardCallback(label_column=%r)",
                logged, self.label_column, logged[0])
        elif self.label_column and columns and self.label_column in columns:
            log.warning(
                "the dataset has a %r column, but TRL's completion log does not: rollouts.jsonl "
                "and the samples carry no labels. Have a reward function log it "
                "(log_extra(%r, kwargs[%r]); TRL passes reward functions log_extra and the "
                "dataset's columns), or pass ShardCallback(label_column=None) to silence this",
                self.label_column, self.label_column, self.label_column)


def population_std(xs: list[float]) -> float:
    """Population standard deviation in float arithmetic (``statistics.pstdev`` computes it
    exactly with fractions, ~100x slower: noticeable once per RL step)."""
    mean = statistics.fmean(xs)
    return math.sqrt(statistics.fmean([(x - mean) ** 2 for x in xs]))


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _weighted_total(i: int, per_func: dict[str, list[float | None]],
                    weights: dict[str, float]) -> float | None:
    """TRL's total reward of completion ``i``: the weighted sum over the functions that scored
    it; None when none did (TRL's "unscorable")."""
    scored = [(weights[name], values[i]) for name, values in per_func.items()
              if values[i] is not None]
    return sum(w * v for w, v in scored) if scored else None
