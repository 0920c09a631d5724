"""Causal tests of shards: does adding or removing a shard move its own task's reward, and only it?

For each task t and each *kind* of direction (the task's shard, its supervised principal
direction, and the controls), with ``d`` the kind's unit direction (parameter names -> tensors)
and ``c = <theta_T - theta_0, d>`` the run's own coefficient along it (``update_coefficient``):

- **steering**: the initial weights plus ``+alpha * v`` and ``-alpha * v``, ``v = c d`` (the run's
  own component along d; ``+`` moves the initial policy the way the run moved it);
- **ablation**: the final weights minus ``v`` (the run's cumulative update along d removed).

Rewards are fresh rollouts (``interventions.task_rewards``: ``n_prompts`` prompts of every task,
``n_samples`` completions each, one fixed rollout seed at every point, so differences come from
the weights alone; sampled with the run's own settings, ``CausalSettings.sampling``), on
**every** task. The effect on task u is the reward change (steering) or
the reward drop against the final weights (ablation), and

    selectivity = effect on the kind's own task / max(mean |effect| on the other tasks, floor)

(``floor``: about the smallest reward change the estimate resolves, so that a direction that
moves nothing scores ~0 rather than 0/0). Where the other tasks' mean |effect| is below the floor
the figure is the own task's effect in units of the floor, a size rather than a ratio of two
measured effects: each entry says so (``steering_floored``, ``ablation_floored``), and each kind
gives the share of its tasks where it happened (``..._floored_rate``). Steering's selectivity is
the ``+`` side's; the ``-`` side's is ``steering_minus_selectivity``. Per kind the headline is
the median over tasks (a mean of ratios is ruled by one small denominator); the mean is
reported too. For ablation also the task
that drops most (``broken_task``), whether it is the own task (``own_first``; the rate over tasks
is the label-specific evidence: the team's shared/design.md, "Causal ablation needs a stronger
control than a random direction"; None, hence not own, when no drop reaches ``floor`` or the
largest is tied), and ``drop_ratio`` (largest drop over the mean |drop| of the others).

Controls, both applied at the *shard's* magnitude ``|c_shard|`` (norm-matched), with the sign of
the run's own coefficient along them:

- ``random``: a Gaussian direction (``random_direction_like``), one per task;
- ``shuffled_<i>``: the principal direction of the training samples a shuffled labelling gives to
  task t (same span and same norm as a task direction; its "own" task is the shuffled label t).
  Chance for ``own_first`` is 1 / n_tasks.
- ``random_<kind>`` (``random_for``): a Gaussian direction at another kind's own magnitude, e.g.
  ``random_shard_family`` for shard families, whose ``|c|`` differs from the single shard's.

Cost: ``2 + 3 * n_kinds * n_tasks`` reward estimates, each one ``generate`` of
``n_tasks * n_prompts * n_samples`` completions; with the defaults (4 tasks, 8 prompts, 4 samples,
kinds shard, supervised, random and 2 shuffled: 62 estimates) 4-7 s on one CPU thread for the
tiny model (measured on 600-step planted runs; the whole ``evaluate_run`` of such a run, 2400
events, took 25-28 s and 4.4 GB).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sae_shards.analysis.interventions import (Direction, add_direction, random_direction_like,
                                               task_rewards, update_coefficient)

CONTROL_KINDS = ("random", "shuffled")
"""Kinds norm-matched to the shard (a kind ``shuffled_<i>`` counts as ``shuffled``)."""


@dataclass(frozen=True)
class CausalSettings:
    """How the causal tests are run (costs: module docstring)."""

    alpha: float = 2.0
    """Steering strength in units of the run's own component along the direction."""
    n_prompts: int = 8
    """Prompts per task per reward estimate."""
    n_samples: int = 4
    """Completions per prompt."""
    max_new_tokens: int = 16
    """Completion length (the run's ``rl.max_completion_length``)."""
    floor: float = 0.005
    """Smallest denominator of a selectivity (reward units; ~2.5 completions' worth of one class
    character at 8 x 4 completions and target length 16)."""
    seed: int = 0
    """Rollout seed (the same at every point) and the random controls' seed."""
    sampling: Mapping[str, Any] = field(default_factory=dict)
    """The run's other sampling settings (``shards.run_sampling`` without ``max_new_tokens``,
    a field above: ``temperature``, ``top_p``, ``top_k``, ``generation_kwargs``,
    ``reward_batch``...), passed to every reward estimate so the rollouts are sampled as the
    run sampled them (and as ``sae-shards analyze`` samples them); empty: ``score_rollouts``'
    defaults (temperature 1)."""


def _others_mean(effects: Mapping[str, float], own: str) -> float:
    """Mean ``|effects[u]|`` over the tasks u other than ``own`` (0 when there are none)."""
    others = [abs(v) for u, v in effects.items() if u != own]
    return sum(others) / len(others) if others else 0.0


def selectivity(effects: Mapping[str, float], own: str, floor: float = 0.005) -> float:
    """``effects[own] / max(mean |effects[u]| over u != own, floor)``."""
    return float(effects[own]) / max(_others_mean(effects, own), floor)


def floored(effects: Mapping[str, float], own: str, floor: float = 0.005) -> bool:
    """Whether ``selectivity``'s denominator is the floor: the other tasks moved less than the
    estimate resolves, so the figure is the own task's effect in units of ``floor`` (a size),
    not a ratio of two measured effects."""
    return _others_mean(effects, own) < floor


TIE_RTOL = 1e-5
"""Drops this close (relative) are one drop to ``broken_task``: float32's rounding is 6e-8."""


def broken_task(drops: Mapping[str, float], floor: float = 0.005) -> str | None:
    """The task whose reward drops most, or None when no drop reaches ``floor`` or the largest
    drop is shared by several tasks (nothing broke first): equal to ``TIE_RTOL``, so rewards
    computed in float32 that differ in their last bits are a tie, not a task broken first."""
    top = max(drops.values())
    if top < floor or sum(1 for v in drops.values()
                          if math.isclose(v, top, rel_tol=TIE_RTOL)) > 1:
        return None
    return next(u for u, v in drops.items() if v == top)


def _median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x == x]
    return float(statistics.median(xs)) if xs else float("nan")


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x == x]
    return float(statistics.fmean(xs)) if xs else float("nan")


def _scaled(unit: Direction, factor: float) -> dict[str, Tensor]:
    return {n: d.float() * factor for n, d in unit.items()}


def _unit(direction: Direction) -> dict[str, Tensor]:
    """``direction`` (fp32) over its norm across every tensor; an all-zero one as it is."""
    norm = sum(float(d.float().pow(2).sum()) for d in direction.values()) ** 0.5
    return _scaled(direction, 1.0 / norm) if norm > 0 else _scaled(direction, 1.0)


def kind_family(kind: str) -> str:
    """``shuffled_3`` -> ``shuffled``; other kinds are their own family."""
    return "shuffled" if kind.startswith("shuffled") else kind


def causal_tests(initial: nn.Module, final: nn.Module, tokenizer: Any, task: Any,
                 tasks: Sequence[str], directions: Mapping[str, Mapping[str, Direction]],
                 settings: CausalSettings = CausalSettings(), matched_to: str = "shard",
                 random_control: bool = True, random_for: Sequence[str] = (),
                 reward_fn: Callable[[nn.Module], Mapping[str, float]] | None = None
                 ) -> dict[str, Any]:
    """Steering and ablation of every ``directions[kind][task]`` (unit directions, parameter
    names of ``initial``/``final``), with the effect on every task (module docstring).

    ``matched_to`` names the kind whose ``|c|`` sets the magnitude of the control kinds (``random``,
    added here when ``random_control``, and every ``shuffled_<i>`` given). ``random_for``: further
    kinds that get their own norm-matched random control, ``random_<kind>`` (its own summary, not
    pooled with ``random``). Both models are restored
    bit-exactly. ``reward_fn(model) -> {task: mean reward}`` replaces the rollouts
    (``interventions.task_rewards`` with ``settings``; ``tokenizer`` and ``task`` are then unused),
    e.g. for a model whose rewards are known in closed form. Returns ``{"settings",
    "base_initial", "base_final", "kinds": {kind: {"per_task": {task: ...}, summaries}},
    "families": {family: pooled summaries}, "n_reward_estimates", "wall_s"}``.
    """
    t0 = time.perf_counter()
    tasks = list(tasks)
    s = settings
    n_est = 0

    def rewards(model: nn.Module) -> dict[str, float]:
        nonlocal n_est
        n_est += 1
        if reward_fn is not None:
            return {u: float(v) for u, v in reward_fn(model).items()}
        est = task_rewards(model, tokenizer, task, tasks, n_prompts=s.n_prompts,
                           n_samples=s.n_samples, max_new_tokens=s.max_new_tokens, seed=s.seed,
                           **s.sampling)
        return {u: e.mean for u, e in est.items()}

    p0 = {n: p.detach() for n, p in initial.named_parameters()}
    p1 = {n: p.detach() for n, p in final.named_parameters()}
    kinds = {k: dict(v) for k, v in directions.items()}
    if random_control:
        if matched_to not in kinds:
            raise ValueError(f"matched_to={matched_to!r} is not a kind of directions "
                             f"({sorted(kinds)})")
        g = torch.Generator().manual_seed(s.seed)
        kinds["random"] = {t: random_direction_like(_scaled(kinds[matched_to][t], 1.0), g)
                           for t in tasks if t in kinds[matched_to]}
    # |c| along each unit direction, as it is applied below (audit 117: a direction given at
    # norm k set its controls to |c| / k); one direction normalised at a time
    coefficients = lambda kind: {t: abs(update_coefficient(p1, p0, _unit(d)))  # noqa: E731
                                 for t, d in kinds.get(kind, {}).items()}
    matched_c = coefficients(matched_to)
    # control kind -> |c| per task of the kind it is norm-matched to
    matched = {k: matched_c for k in kinds if kind_family(k) in CONTROL_KINDS}
    for base in random_for:
        if base not in kinds:
            raise ValueError(f"random_for: {base!r} is not a kind of directions ({sorted(kinds)})")
        g = torch.Generator().manual_seed(s.seed + 1 + list(kinds).index(base))
        kinds[f"random_{base}"] = {t: random_direction_like(_scaled(d, 1.0), g)
                                   for t, d in kinds[base].items()}
        matched[f"random_{base}"] = coefficients(base)

    base_init, base_final = rewards(initial), rewards(final)
    out_kinds: dict[str, Any] = {}
    for kind, per in kinds.items():
        entries = {}
        for t, direction in per.items():
            unit = _unit(direction)
            c = update_coefficient(p1, p0, unit)
            magnitude = matched[kind][t] if t in matched.get(kind, {}) else abs(c)
            v = _scaled(unit, (1.0 if c >= 0 else -1.0) * magnitude)
            e: dict[str, Any] = {"coefficient": c, "magnitude": magnitude}
            for name, sign in (("steer_plus", 1.0), ("steer_minus", -1.0)):
                with add_direction(initial, v, sign * s.alpha):
                    r = rewards(initial)
                e[name] = {u: r[u] - base_init[u] for u in tasks}
            with add_direction(final, v, -1.0):
                r = rewards(final)
            drops = {u: base_final[u] - r[u] for u in tasks}
            e["ablate_drop"] = drops
            e["steering_selectivity"] = selectivity(e["steer_plus"], t, s.floor)
            e["steering_minus_selectivity"] = selectivity(
                {u: -x for u, x in e["steer_minus"].items()}, t, s.floor)
            e["ablation_selectivity"] = selectivity(drops, t, s.floor)
            e["steering_floored"] = floored(e["steer_plus"], t, s.floor)
            e["ablation_floored"] = floored(drops, t, s.floor)
            broken = broken_task(drops, s.floor)
            e["broken_task"] = broken
            e["own_first"] = broken == t
            e["drop_ratio"] = selectivity(drops, broken, s.floor) if broken else 0.0
            entries[t] = e
        out_kinds[kind] = {"per_task": entries, **_summary(entries.values())}
    families: dict[str, Any] = {}
    for kind, v in out_kinds.items():
        families.setdefault(kind_family(kind), []).extend(v["per_task"].values())
    return {
        "settings": asdict(s), "matched_to": matched_to, "tasks": tasks,
        "base_initial": base_init, "base_final": base_final, "kinds": out_kinds,
        "families": {f: _summary(es) for f, es in families.items()},
        "n_reward_estimates": n_est, "wall_s": time.perf_counter() - t0,
    }


def _summary(entries) -> dict[str, float]:
    entries = list(entries)
    out = {}
    for key in ("steering_selectivity", "steering_minus_selectivity", "ablation_selectivity",
                "drop_ratio"):
        xs = [e[key] for e in entries]
        out[key] = _median(xs)
        out[f"{key}_mean"] = _mean(xs)
    out["own_first_rate"] = _mean([float(e["own_first"]) for e in entries])
    for key in ("steering_floored", "ablation_floored"):  # the share of floored denominators
        out[f"{key}_rate"] = _mean([float(e[key]) for e in entries])
    out["n"] = len(entries)
    return out
