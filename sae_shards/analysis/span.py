"""Shards together: how much of a run's reward change goes through the span of its shards.

One shard's ablation (``interventions.ablate``) says what one direction does. A reader of a
report asks next: of everything RL changed in the reward, how much do these shards carry
between them? The run's update ``Delta = theta_T - theta_0`` is projected onto the span of the
shards' unit directions ``d_i`` (least squares, so overlapping shards are not counted twice):

    P = sum_i w_i d_i,   G w = c,   G_ij = <d_i, d_j>,   c_i = <Delta, d_i>

and the policy is scored four ways beside the run's own two (``theta_0``, ``theta_T``):

- *removed*: ``theta_T - P``, the final policy without the shards' part of the update;
- *kept*: ``theta_0 + P``, the initial policy with only that part added;
- each again with a Gaussian direction of ``P``'s norm in place of ``P`` (the control), and
  with the run's whole update on the same parameters in place of ``P`` (the reference: what
  those parameters carry at all, of which the span can carry at most about as much);
- *overshoot*: ``theta_T + P``, as far again past the final policy. Near a reward optimum a
  move that far along directions the updates vary in costs reward either way, so what a
  removal costs is read beside it (as for one shard, ``interventions.ablate``).

Two shares of the run's reward change ``R_T - R_0`` follow, each a ratio of changes paired on the
same prompts and rollout seed: what removing ``P`` undoes, ``(R_T - R(theta_T - P)) / (R_T -
R_0)``, and what adding ``P`` alone recovers, ``(R(theta_0 + P) - R_0) / (R_T - R_0)`` (the
overshoot's share, ``(R_T - R(theta_T + P)) / (R_T - R_0)``, is what it loses). Their
standard errors come from each prompt's residual ``a_i - r b_i`` (the delta method for a ratio
of means), and neither is given when the run's own change is not resolved from 0
(``resolution``: about two standard errors): a share of an unresolved change is noise. The two
need not agree, nor stay within [0, 1]: the reward is not linear in the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from sae_shards.analysis.interventions import (CONTROL_SEED, ROLLOUT_SEED, AnyTask, Direction,
                                               Scored, add_direction, check_baseline, estimate,
                                               eval_prompts, label_rewards, paired_change,
                                               prompt_means, random_direction_like,
                                               score_rollouts, set_weights, weights_of)
from sae_shards.analysis.resolution import within_noise



def span_weights(gram: Tensor, coefficients: Tensor, rtol: float = 1e-6) -> Tensor:
    """``w`` with ``G w = c`` in the least-squares sense: the weights of the update's projection
    onto the span of the directions. ``gram``: ``[k, k]`` inner products of the directions
    (their cosines, for unit ones); ``coefficients``: ``[k]``, ``<Delta, d_i>``. Directions that
    are (nearly) linear combinations of the others share their weight (pseudo-inverse, singular
    values below ``rtol`` of the largest dropped) instead of blowing up. Returns ``[k]`` float64."""
    g = gram.detach().to(torch.float64)
    c = coefficients.detach().to(torch.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or c.shape != (g.shape[0],):
        raise ValueError(f"span_weights: gram must be [k, k] and coefficients [k], got "
                         f"{tuple(g.shape)} and {tuple(c.shape)}")
    g = (g + g.T) / 2  # symmetric to rounding, as hermitian=True assumes
    return torch.linalg.pinv(g, rtol=rtol, hermitian=True) @ c


def combine(directions: Iterable[Direction], weights: Sequence[float]) -> dict[str, Tensor]:
    """``sum_i w_i d_i`` in fp32, over the union of the directions' parameters; the directions
    are taken one at a time (give a generator to hold one of them besides the sum)."""
    total: dict[str, Tensor] = {}
    n = 0
    for n, (d, w) in enumerate(zip(directions, weights, strict=True), start=1):
        for name, t in d.items():
            part = t.detach().to(torch.float32) * float(w)
            if name in total:
                total[name].add_(part.to(total[name].device))
            else:
                total[name] = part
    if n == 0:
        raise ValueError("combine: no directions")
    return total


def update_share(projected: Direction, final: nn.Module | Mapping[str, Tensor],
                 initial: nn.Module | Mapping[str, Tensor]) -> float:
    """``||P||^2 / ||Delta||^2`` over ``projected``'s parameters (float64 sums): the share of the
    update's squared norm on those weights that lies in the span (1 when it all does)."""
    final = weights_of(final, "update_share final")
    initial = weights_of(initial, "update_share initial")
    pp, dd = 0.0, 0.0
    with torch.no_grad():
        for name, p in projected.items():
            delta = final[name].detach().float() - initial[name].detach().to(
                final[name].device, torch.float32)
            pp += float(p.float().pow(2).sum(dtype=torch.float64))
            dd += float(delta.pow(2).sum(dtype=torch.float64))
    return pp / dd if dd > 0 else math.nan


def share_of_change(initial: Tensor, final: Tensor, part_from: Tensor, part_to: Tensor
                    ) -> tuple[float, float]:
    """``(share, stderr)``: the mean of ``part_to - part_from`` over the mean of ``final -
    initial`` (``[n_prompts, n_samples]`` rewards of the same prompts and rollout seed each),
    with the delta method's standard error over prompts; ``(nan, nan)`` when the denominator
    (the run's change) is not resolved (``resolution.within_noise``) or there are fewer than
    two prompts."""
    r0, rt, pf, pt = prompt_means(initial, final, part_from, part_to)
    n = r0.numel()
    if n < 2:
        return math.nan, math.nan
    b, a = rt - r0, pt - pf  # [n] each
    mb = float(b.mean())
    if within_noise(mb, float(b.std()) / math.sqrt(n), n):
        return math.nan, math.nan
    share = float(a.mean()) / mb
    return share, float((a - share * b).std()) / math.sqrt(n) / abs(mb)


@dataclass(frozen=True)
class SpanEffect:
    """The shards' span scored against the run's whole update (module docstring)."""

    n: int
    """Completions scored per estimate."""
    n_prompts: int
    """Prompts scored per estimate: the units of every standard error here, whose count
    decides when a change is resolved (``resolution.resolved_bound``)."""
    rewards: dict[str, float]
    """Mean reward of each policy: ``initial`` (theta_0), ``final`` (theta_T), ``removed``
    (theta_T - P), ``removed_control`` (theta_T minus the random direction),
    ``removed_whole`` (theta_T with P's parameters back at theta_0), ``kept`` (theta_0 + P),
    ``kept_control``, ``kept_whole`` (theta_0 with P's parameters at theta_T), ``overshoot``
    (theta_T + P)."""
    changes: dict[str, tuple[float, float]]
    """Paired ``(change, stderr)``: ``run`` (final - initial), ``removed`` (removed - final),
    ``removed_control``, ``removed_whole``, ``kept`` (kept - initial), ``kept_control``,
    ``kept_whole``, ``overshoot`` (overshoot - final); ``removed_beyond_control`` (removed -
    removed_control) and ``kept_beyond_control`` (kept - kept_control): the span against a
    random direction of its norm, within noise of 0 (``resolution.within_noise``) when the two
    are not told apart."""
    shares: dict[str, tuple[float, float]]
    """``(share of the run's change, stderr)``: ``removed`` (what removing P undoes),
    ``kept`` (what adding P alone recovers), and the same for the random direction
    (``removed_control``, ``kept_control``) and for the whole update on P's parameters
    (``removed_whole``, ``kept_whole``); ``overshoot``: what moving as far again past theta_T
    loses; NaN when the run's change is not resolved."""
    by_label: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    """Each context's paired changes ``run``, ``removed``, ``kept``, ``removed_whole``,
    ``kept_whole`` (a built-in task's reward scale divided out); ``{}`` unless the prompts carry
    at least two contexts."""
    whole_is_run: bool = False
    """Whether P's parameters are all the parameters the run changed: the whole update on them
    is then the run's own, ``removed_whole`` is theta_0 and ``kept_whole`` theta_T, and their
    100% is so by construction, no measure of what those parameters carry."""

    @property
    def resolved(self) -> bool:
        """Whether the run's own reward change is resolved (the shares are given)."""
        return not math.isnan(self.shares["removed"][0])


def span_effect(
    initial: nn.Module,
    final: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: AnyTask,
    projected: Direction,
    control_seed: int = CONTROL_SEED,
    n_prompts: int = 32,
    baselines: tuple[Scored | None, Scored | None] = (None, None),
    **reward_kwargs: Any,
) -> SpanEffect:
    """Score the run's two policies (``initial``: theta_0, ``final``: theta_T) with the
    projection ``projected`` (P, in parameter units: :func:`combine` of the shards' unit
    directions with :func:`span_weights`) removed from the final one and added to the initial
    one, each beside a Gaussian direction of P's norm (``control_seed``) and beside the whole
    update on P's parameters (those parameters of one policy set to the other's values, so no
    copy of the update is made), and added to the final one (the overshoot), on the same
    prompts and rollout seed (:func:`interventions.eval_prompts`; ``reward_kwargs`` as
    :func:`interventions.score_rollouts` takes them). ``baselines``: the two policies'
    :class:`Scored` on those prompts when the caller has them. Both models are restored
    bit-exactly afterwards."""
    data = eval_prompts(task, n_prompts, reward_kwargs.get("seed", ROLLOUT_SEED))
    for b in baselines:
        check_baseline(b, n_prompts, reward_kwargs, "span_effect")

    def score(model: nn.Module) -> Scored:
        return score_rollouts(model, tokenizer, task, data, **reward_kwargs)

    s: dict[str, Scored] = {
        "initial": baselines[0] if baselines[0] is not None else score(initial),
        "final": baselines[1] if baselines[1] is not None else score(final)}
    control = random_direction_like(projected, torch.Generator().manual_seed(control_seed))
    for suffix, d in (("", projected), ("_control", control)):
        with add_direction(final, d, -1.0):
            s["removed" + suffix] = score(final)
        with add_direction(initial, d, 1.0):
            s["kept" + suffix] = score(initial)
    del control
    with add_direction(final, projected, 1.0):
        s["overshoot"] = score(final)
    theta0, theta_t = weights_of(initial, "initial"), weights_of(final, "final")
    whole_is_run = not changed_elsewhere(theta0, theta_t, projected)
    with set_weights(final, {name: theta0[name] for name in projected}):
        s["removed_whole"] = score(final)
    with set_weights(initial, {name: theta_t[name] for name in projected}):
        s["kept_whole"] = score(initial)
    r = {k: v.rewards for k, v in s.items()}
    changes = {"run": paired_change(r["initial"], r["final"]),
               **{f"{kind}_beyond_control": paired_change(r[f"{kind}_control"], r[kind])
                  for kind in ("removed", "kept")}}
    shares = {"overshoot": share_of_change(r["initial"], r["final"], r["overshoot"], r["final"])}
    changes["overshoot"] = paired_change(r["final"], r["overshoot"])
    for suffix in ("", "_control", "_whole"):
        changes["removed" + suffix] = paired_change(r["final"], r["removed" + suffix])
        changes["kept" + suffix] = paired_change(r["initial"], r["kept" + suffix])
        shares["removed" + suffix] = share_of_change(r["initial"], r["final"],
                                                     r["removed" + suffix], r["final"])
        shares["kept" + suffix] = share_of_change(r["initial"], r["final"], r["initial"],
                                                  r["kept" + suffix])
    labelled = {k: label_rewards(v, task) for k, v in s.items()}
    by_label = {}
    if len(labelled["final"]) >= 2:
        for label in labelled["final"]:
            lr = {k: v[label] for k, v in labelled.items()}
            by_label[label] = {"run": paired_change(lr["initial"], lr["final"]),
                               **{kind + suffix: paired_change(lr[start], lr[kind + suffix])
                                  for kind, start in (("removed", "final"), ("kept", "initial"))
                                  for suffix in ("", "_whole")}}
    est = {k: estimate(v) for k, v in r.items()}
    return SpanEffect(n=est["final"].n, n_prompts=r["final"].shape[0],
                      rewards={k: e.mean for k, e in est.items()},
                      changes=changes, shares=shares, by_label=by_label,
                      whole_is_run=whole_is_run)


def changed_elsewhere(theta0: Mapping[str, Tensor], theta_t: Mapping[str, Tensor],
                      names: Iterable[str]) -> list[str]:
    """The parameters outside ``names`` whose values differ between the two policies' ``{name:
    parameter}`` (a name tied to one of ``names``, the same tensor under another name, is not
    outside them). Empty when the run changed nothing but ``names``."""
    inside = set(names)
    tied = {id(theta_t[n]) for n in inside if n in theta_t}
    return [n for n, p in theta_t.items()
            if n not in inside and id(p) not in tied and n in theta0
            and not torch.equal(theta0[n].detach(), p.detach().to(theta0[n].device))]
