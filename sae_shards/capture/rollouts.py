"""The rollouts of each optimizer step, read from the TRL trainer's own completion log.

TRL's GRPO and RLOO trainers append the prompts, completions, per-function rewards and
advantages of each generation batch to ``trainer._logs`` (gathered from every process; extra
columns that reward functions add with ``log_extra`` under ``_logs["extra"]``), evaluation
generations too, keeping one generation batch's worth. ``TRLRollouts`` copies each training
generation out as it is made (wrapping ``_generate_and_score_completions`` on the trainer
instance), so a step's row holds exactly the generations it trained on. ``_logs`` is private to
TRL: this module is the one place that reads it, and it fails loudly if the layout changes.

A ``TrainerCallback`` is not handed its trainer, so ``calling_trainer`` finds it on the call
stack: callback events are invoked from ``Trainer`` methods, whose ``self`` is the trainer.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
from typing import Any, NamedTuple

from sae_shards.run.config import REUSED, generation_use_of, generations_reused

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
    """Reads each optimizer step's training generations from a TRL GRPO/RLOO trainer's
    completion log.

    ``install`` wraps the trainer instance's ``_generate_and_score_completions`` so that every
    generation made in training mode is copied out of the log as it is made: evaluation
    generations, which TRL appends to the same log, never reach ``rollouts.jsonl``, and a step
    that trains on several generations (``steps_per_generation`` below
    ``gradient_accumulation_steps``; the log keeps only the last) records all of them. A step
    whose generation was made for an earlier step (``num_iterations`` > 1,
    ``steps_per_generation`` above ``gradient_accumulation_steps``) gets that whole generation
    batch again. Not installed, ``read`` takes the log as it stands."""

    def __init__(self, trainer: Any, label_column: str | None = "task") -> None:
        logs = getattr(trainer, "_logs", None)
        needed = ("prompt", "completion", "rewards", "advantages", "extra")
        if (not isinstance(logs, dict) or any(k not in logs for k in needed)
                or not hasattr(trainer, "_generate_and_score_completions")):
            raise ValueError(
                f"{type(trainer).__name__} keeps no TRL completion log (trainer._logs with "
                f"{list(needed)}, filled by _generate_and_score_completions); rollouts can be "
                "read from trl.GRPOTrainer, trl.RLOOTrainer and their subclasses (TRL 1.x); "
                "pass ShardCallback(..., record_rollouts=False) to capture without them")
        self.trainer = trainer
        self.label_column = label_column
        self._warned = False
        self._fresh: list[dict[str, Any]] = []  # training generations since the last read
        self._last: dict[str, Any] | None = None  # the latest step's generations
        self._saved: Any = None  # the trainer instance's own attribute, restored by remove
        self._wrapper: Any = None
        self._saved_extra: Any = None  # the same, for TRL's log_extra
        self._extra_wrapper: Any = None
        self._logged: dict[str, int] | None = None  # values log_extra took per column, this
        # generation (None: not counted)
        self._misaligned: set[str] = set()  # columns warned about
        self._warned_missing = False
        names = list(getattr(trainer, "reward_func_names", None) or [])
        shared = sorted({n for n in names if names.count(n) > 1})
        if shared:
            log.warning("reward functions share a name (%s; partials of one function, two "
                        "lambdas or two instances of one class): TRL's completion log keeps one "
                        "column per name, the last such function's rewards, so rollouts.jsonl's "
                        "rewards, and the run's reward figures, are not the reward it trained "
                        "on; give each function a name of its own (def, or set __name__)",
                        ", ".join(shared))
        if generation_use_of(getattr(trainer, "args", None)) == REUSED:
            log.warning("the trainer trains on each generation over several optimizer steps "
                        "(%s): rollouts.jsonl gives each step the whole generation batch its "
                        "step came from, not the completions that step alone trained on",
                        generations_reused(trainer.args))

    def install(self) -> None:
        """Copy each training generation out of the log as it is made (idempotent)."""
        if self._wrapper is not None:
            return
        self._saved = self.trainer.__dict__.get(_GENERATE)
        original = getattr(self.trainer, _GENERATE)

        def generate_and_score(inputs, *args, **kwargs):
            if self._extra_wrapper is not None:
                self._logged = {}
            out = original(inputs, *args, **kwargs)
            if self.trainer.model.training:
                self._fresh.append(self._snapshot(out))
            return out

        self._wrapper = generate_and_score
        setattr(self.trainer, _GENERATE, generate_and_score)
        log_extra = getattr(self.trainer, _LOG_EXTRA, None)
        if callable(log_extra):  # counts what each generation's reward functions log

            def counting_log_extra(column, values, *args, **kwargs):
                values = list(values)  # TRL takes any iterable (a map, a generator): count it
                if self._logged is not None:
                    self._logged[column] = self._logged.get(column, 0) + len(values)
                return log_extra(column, values, *args, **kwargs)

            self._saved_extra = self.trainer.__dict__.get(_LOG_EXTRA)
            self._extra_wrapper = counting_log_extra
            setattr(self.trainer, _LOG_EXTRA, counting_log_extra)

    def remove(self) -> None:
        """Restore the trainer's method (unless something wrapped it over this one since)."""
        if self._wrapper is None:
            return
        for name, wrapper, saved in ((_GENERATE, self._wrapper, self._saved),
                                     (_LOG_EXTRA, self._extra_wrapper, self._saved_extra)):
            if wrapper is not None and self.trainer.__dict__.get(name) is wrapper:
                if saved is None:
                    del self.trainer.__dict__[name]
                else:
                    setattr(self.trainer, name, saved)
        self._wrapper = self._saved = self._extra_wrapper = self._saved_extra = None
        self._logged = None

    def _snapshot(self, out: Any) -> dict[str, Any]:
        """The log's rows of the generation just made: the last ``rows`` of each column (every
        process's rows, gathered; the whole log when the batch's size is unknown)."""
        logs = self.trainer._logs
        local = out.get("prompt_ids") if isinstance(out, dict) else None
        processes = getattr(getattr(self.trainer, "accelerator", None), "num_processes", 1)
        rows = len(logs["prompt"]) if local is None else int(local.shape[0]) * processes
        tail = lambda column: list(column)[-rows:] if rows else []  # noqa: E731
        return {"prompt": tail(logs["prompt"]), "completion": tail(logs["completion"]),
                "rewards": {name: tail(v) for name, v in logs["rewards"].items()},
                "advantages": tail(logs["advantages"]),
                "extra": {name: tail(v) for name, v in logs["extra"].items()
                          if self._aligned(name, None if local is None else int(local.shape[0]))}}

    def _aligned(self, column: str, local_rows: int | None) -> bool:
        """Whether the log's ``column`` holds one value per completion of the generation just
        made, as far as this process can tell: its reward functions logged a whole multiple of
        its rows (two functions logging the same labels: twice). Fewer, or none this time,
        and the log's last rows hold other completions' values (TRL's log keeps earlier
        generations'), which would label the wrong completions: left out, said once."""
        logged = None if self._logged is None else self._logged.get(column, 0)
        if logged is None or local_rows is None or (logged and logged % local_rows == 0):
            return True
        if column not in self._misaligned:
            self._misaligned.add(column)
            log.warning(
                "the reward functions logged %d value(s) of %r with log_extra for a generation "
                "of %d completions (on this process): its values cannot be matched to the "
                "completions, so rollouts.jsonl leaves them out%s where that happens. Log one "
                "value per completion, in the completions' order (e.g. the %r argument the "
                "reward function was given, whole)", logged, column, local_rows,
                " (the samples carry no labels)" if column == self.label_column else "",
                column)
        return False

    def read(self, step: int) -> StepRollouts | None:
        """The rollouts of optimizer step ``step``: the training generations made since the
        last read, or (none made: a reused generation) the last step's again; None when nothing
        was generated yet."""
        if self._wrapper is None:
            logs = self._snapshot(None)
        else:
            if self._fresh:
                self._last, self._fresh = _concatenate(self._fresh), []
            logs = self._last
            if logs is None:
                return None
        prompts, completions = logs["prompt"], logs["completion"]
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
        if labels is not None and None in extra[self.label_column]:
            labels = None  # a completion without one (a generation's left out, or None logged)
            if self.label_column not in self._misaligned:  # (that warning said so)
                self._warn_missing_labels()
        if (labels is None and not self._warned and self.label_column not in self._misaligned
                and self.label_column not in extra):  # logged, but not for every completion
            self._warn_unlogged_labels(sorted(extra))
        row = {"step": step, "prompts": prompts, "completions": completions, "rewards": totals,
               "advantages": [float(a) for a in logs["advantages"]], "tasks": labels,
               "reward_funcs": per_func}
        scored = [r for r in totals if r is not None]
        std = population_std(scored) if len(scored) > 1 else 0.0
        return StepRollouts(row, scored_mean(totals), std, tuple(sorted(set(labels or ()))))

    def _warn_missing_labels(self) -> None:
        """Once: some completions of a step have no label (None: logged so, or TRL's filler for
        a generation or process that logged none), so the step's rows carry none, rather than a
        context called "None"."""
        if self._warned_missing:
            return
        self._warned_missing = True
        log.warning("some completions have no %r label (None logged for them, or their "
                    "generation's labels left out): such steps' rollouts and samples carry no "
                    "labels", self.label_column)

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


_GENERATE = "_generate_and_score_completions"
_LOG_EXTRA = "_log_completion_extra"  # TRL hands it to reward functions as ``log_extra``


def _concatenate(generations: list[dict[str, Any]]) -> dict[str, Any]:
    """Several generations' snapshots as one, in order (a column one of them lacks: None)."""
    if len(generations) == 1:
        return generations[0]
    sizes = [len(g["prompt"]) for g in generations]
    joined = lambda key, name: [x for g, n in zip(generations, sizes)  # noqa: E731
                                for x in g[key].get(name, [None] * n)]
    return {"prompt": [x for g in generations for x in g["prompt"]],
            "completion": [x for g in generations for x in g["completion"]],
            "advantages": [x for g in generations for x in g["advantages"]],
            **{key: {name: joined(key, name) for name in dict.fromkeys(
                name for g in generations for name in g[key])} for key in ("rewards", "extra")}}


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _weighted_total(i: int, per_func: dict[str, list[float | None]],
                    weights: dict[str, float]) -> float | None:
    """TRL's total reward of completion ``i``: the weighted sum over the functions that scored
    it; None when none did (TRL's "unscorable")."""
    scored = [(weights[name], values[i]) for name, values in per_func.items()
              if values[i] is not None]
    return sum(w * v for w, v in scored) if scored else None
