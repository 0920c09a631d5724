"""Causal tests (steering and ablation) on a model whose task rewards are known in closed form:
a planted direction that moves exactly one task is selective and breaks its own task first; a
norm-matched random direction and a shuffled (mixed) direction of the same norm are not."""

import pytest
import torch
from torch import nn

from sae_shards.planted.causal import (CausalSettings, broken_task, causal_tests, floored,
                                       kind_family, selectivity)

TASKS = ["A", "B", "C", "D"]
D = 64


class Toy(nn.Module):
    """A policy whose only parameter is a vector; task k's reward reads its component on e_k."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())


def _basis():
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))
    return {t: q[:, k].contiguous() for k, t in enumerate(TASKS)}


def _reward_fn(basis):
    # reward of task k: its component along e_k, clipped to [0, 1] (0 at init, 1 after RL)
    def rewards(model):
        w = model.w.detach()
        return {t: float((w @ e / 3.0).clamp(0, 1)) for t, e in basis.items()}
    return rewards


def _toy_run():
    basis = _basis()
    w0 = torch.zeros(D)
    # the run moved every task by 3 along its own direction, plus a little task-free drift
    g = torch.Generator().manual_seed(1)
    drift = torch.randn(D, generator=g)
    for e in basis.values():
        drift -= (drift @ e) * e
    w1 = w0 + 3 * sum(basis.values()) + 0.1 * drift / drift.norm()
    return Toy(w0), Toy(w1), basis


def test_selectivity_and_broken_task():
    assert selectivity({"A": 0.5, "B": 0.0, "C": 0.0}, "A", floor=0.01) == pytest.approx(50.0)
    assert selectivity({"A": 0.5, "B": 0.5, "C": -0.5}, "A") == pytest.approx(1.0)
    assert selectivity({"A": -0.2, "B": 0.1, "C": 0.1}, "A") == pytest.approx(-2.0)
    # over the MEAN |effect| of the other tasks, not the largest
    assert selectivity({"A": 0.6, "B": 0.1, "C": -0.3}, "A") == pytest.approx(3.0)
    assert broken_task({"A": 0.3, "B": 0.1}) == "A"
    assert broken_task({"A": 0.3, "B": 0.3}) is None  # tied: nothing broke first
    # float32 rounding of equal drops (the toy below: 0.49999994 vs 0.5) is a tie too
    assert broken_task({"A": 0.4999999403953552, "B": 0.5, "C": 0.4999998211860657}) is None
    assert broken_task({"A": 0.4999, "B": 0.5}) == "B"  # a real difference is not
    assert broken_task({"A": 0.001, "B": 0.0}, floor=0.005) is None  # nothing broke
    assert kind_family("shuffled_3") == "shuffled" and kind_family("shard") == "shard"


def test_a_floored_selectivity_says_so():
    """Where the other tasks moved less than the floor, the figure is the own effect in units of
    the floor (a size): ``floored`` names those, and only those."""
    assert floored({"A": 0.05, "B": 0.001, "C": -0.003}, "A", floor=0.005)
    assert selectivity({"A": 0.05, "B": 0.001, "C": -0.003}, "A", floor=0.005) == \
        pytest.approx(10.0)  # 0.05 / 0.005, not 0.05 / 0.002
    assert not floored({"A": 0.05, "B": 0.004, "C": -0.008}, "A", floor=0.005)  # mean 0.006
    assert not floored({"A": 0.0, "B": 0.01}, "A", floor=0.005)
    assert floored({"A": 0.3}, "A")  # no other task: the floor


def test_planted_direction_is_selective_and_controls_are_not():
    initial, final, basis = _toy_run()
    before = (initial.w.detach().clone(), final.w.detach().clone())
    mixed = sum(basis.values()) / 2.0  # unit: the span of all tasks, like a shuffled-label mix
    directions = {
        "shard": {t: {"w": e} for t, e in basis.items()},
        "shuffled_0": {t: {"w": mixed} for t in TASKS},
    }
    out = causal_tests(initial, final, None, None, TASKS, directions,
                       CausalSettings(alpha=1.0, floor=0.005), reward_fn=_reward_fn(basis))
    # models restored bit-exactly
    assert torch.equal(initial.w, before[0]) and torch.equal(final.w, before[1])
    assert out["base_initial"] == {t: 0.0 for t in TASKS}
    assert out["base_final"] == {t: 1.0 for t in TASKS}
    assert out["n_reward_estimates"] == 2 + 3 * 3 * len(TASKS)  # shard, shuffled, random
    shard = out["kinds"]["shard"]
    for t in TASKS:
        e = shard["per_task"][t]
        assert e["coefficient"] == pytest.approx(3.0, rel=1e-5)
        # steering: the initial weights plus the run's own component raise exactly task t
        assert e["steer_plus"][t] == pytest.approx(1.0, abs=1e-5)
        assert all(abs(e["steer_plus"][u]) < 1e-5 for u in TASKS if u != t)
        # ablation: the final weights minus it break exactly task t
        assert e["ablate_drop"][t] == pytest.approx(1.0, abs=1e-5)
        assert e["broken_task"] == t and e["own_first"]
        assert e["ablation_selectivity"] > 100 and e["steering_selectivity"] > 100
        assert e["steering_floored"] and e["ablation_floored"]  # the others did not move
    fam = out["families"]
    assert fam["shard"]["own_first_rate"] == 1.0
    # a norm-matched random direction in 64 dimensions moves nothing much: selectivity ~<= 1
    rnd = out["kinds"]["random"]
    for t in TASKS:
        assert rnd["per_task"][t]["magnitude"] == pytest.approx(3.0, rel=1e-5)  # shard's |c|
    assert abs(fam["random"]["ablation_selectivity"]) < 20
    assert fam["random"]["ablation_selectivity"] < fam["shard"]["ablation_selectivity"] / 10
    # the mixed direction at the same norm breaks every task alike: selectivity 1, no own first
    for t in TASKS:
        e = out["kinds"]["shuffled_0"]["per_task"][t]
        assert e["ablate_drop"][t] == pytest.approx(0.5, abs=1e-4)
        assert e["ablation_selectivity"] == pytest.approx(1.0, abs=1e-3)
        assert e["broken_task"] is None and not e["own_first"]
    assert fam["shuffled"]["own_first_rate"] == 0.0
    assert fam["shard"]["ablation_floored_rate"] == 1.0
    assert fam["shuffled"]["ablation_floored_rate"] == 0.0  # every task dropped 0.5
    assert fam["shuffled"]["ablation_selectivity"] == pytest.approx(1.0, abs=1e-3)


def test_wrongly_matched_shard_breaks_another_task():
    """A shard assigned to the wrong task (labels swapped) breaks that other task first: the
    own-first rate, not the size of the effect, is the label-specific evidence."""
    initial, final, basis = _toy_run()
    swapped = {"A": basis["B"], "B": basis["A"], "C": basis["D"], "D": basis["C"]}
    out = causal_tests(initial, final, None, None, TASKS,
                       {"shard": {t: {"w": e} for t, e in swapped.items()}},
                       CausalSettings(alpha=1.0), reward_fn=_reward_fn(basis))
    fam = out["families"]["shard"]
    assert fam["own_first_rate"] == 0.0
    assert fam["ablation_selectivity"] == 0.0  # its own task does not move at all
    assert fam["drop_ratio"] > 100  # ... though something else broke, selectively
    # the minus sign lowers the (wrong) own task by nothing either
    assert fam["steering_minus_selectivity"] == pytest.approx(0.0, abs=1e-6)


def test_real_rollouts_on_the_tiny_model():
    """With rollouts (no reward_fn): an lm_head direction that raises the vowels' logits is
    task A's (multiskill A rewards vowels); removing it from a "final" model that holds it breaks
    A first, and a random direction of the same norm does not. Also checks the cost bound."""
    import time

    from sae_shards.recipe.models import tiny_model_and_tokenizer
    from sae_shards.recipe.tasks import build_task

    torch.set_num_threads(1)
    initial, tok = tiny_model_and_tokenizer(seed=0)
    final, _ = tiny_model_and_tokenizer(seed=0)
    task = build_task("multiskill")
    prompts = list(task.dataset(16, seed=99)["prompt"])
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        hidden = initial(**batch, output_hidden_states=True).hidden_states[-1][:, -1].mean(0)
    d = torch.zeros_like(initial.lm_head.weight)
    for ch in "aeiou":
        d[tok.convert_tokens_to_ids(ch)] = hidden / hidden.norm()
    d = d / d.norm()
    with torch.no_grad():
        final.lm_head.weight += 10.0 * d  # the "run" learnt task A's vowels
    t0 = time.perf_counter()
    out = causal_tests(initial, final, tok, task, list(task.labels),
                       {"shard": {"A": {"lm_head.weight": d}}},
                       CausalSettings(alpha=1.0, n_prompts=8, n_samples=4))
    wall = time.perf_counter() - t0
    e = out["kinds"]["shard"]["per_task"]["A"]
    assert e["coefficient"] == pytest.approx(10.0, rel=1e-3)
    assert out["base_final"]["A"] > out["base_initial"]["A"] + 0.4
    assert e["steer_plus"]["A"] > 0.4 and e["ablate_drop"]["A"] > 0.4
    assert e["own_first"] and e["ablation_selectivity"] > 5
    c = out["kinds"]["random"]["per_task"]["A"]
    assert abs(c["ablate_drop"]["A"]) < 0.1 and c["ablation_selectivity"] < e["ablation_selectivity"] / 3
    assert wall < 20, wall


def test_a_shard_pointing_against_the_update_is_applied_along_the_runs_own_component():
    """A decoder direction's sign is arbitrary: for a shard whose coefficient is negative,
    steering still adds the run's own component (raising its task) and ablation still removes
    it. Rewards linear here (not clipped at 0), so steering with the minus sign lowers the task
    and its selectivity (of the negated effects) is positive too."""
    initial, final, basis = _toy_run()

    def linear(model):
        w = model.w.detach()
        return {t: float(w @ e / 3.0) for t, e in basis.items()}

    out = causal_tests(initial, final, None, None, TASKS,
                       {"shard": {t: {"w": -e} for t, e in basis.items()}},
                       CausalSettings(alpha=1.0), random_control=False, reward_fn=linear)
    for t in TASKS:
        e = out["kinds"]["shard"]["per_task"][t]
        assert e["coefficient"] == pytest.approx(-3.0, rel=1e-5)
        assert e["steer_plus"][t] == pytest.approx(1.0, abs=1e-5)
        assert e["steer_minus"][t] == pytest.approx(-1.0, abs=1e-5)
        assert e["ablate_drop"][t] == pytest.approx(1.0, abs=1e-5)
        assert e["steering_minus_selectivity"] > 100 and e["own_first"]


def test_per_kind_summaries_are_medians_over_tasks_with_the_mean_beside():
    """One task with a tiny denominator must not rule the headline: the median is it."""
    from sae_shards.planted.causal import _summary

    entries = [{"steering_selectivity": s, "steering_minus_selectivity": s,
                "ablation_selectivity": s, "drop_ratio": s, "own_first": s > 1,
                "steering_floored": s > 50, "ablation_floored": False}
               for s in (1.0, 2.0, 90.0)]
    out = _summary(entries)
    assert out["ablation_selectivity"] == 2.0 and out["ablation_selectivity_mean"] == 31.0
    assert out["own_first_rate"] == pytest.approx(2 / 3) and out["n"] == 3
    assert out["steering_floored_rate"] == pytest.approx(1 / 3)
    assert out["ablation_floored_rate"] == 0.0


def _linear(basis):
    """Task k's reward: its component along e_k over 3, unclipped (signs and sizes visible)."""
    def rewards(model):
        w = model.w.detach()
        return {t: float(w @ e / 3.0) for t, e in basis.items()}
    return rewards


def test_a_task_that_gains_from_an_ablation_is_not_the_one_it_broke():
    """Audit 117 C04: the broken task is the one whose reward dropped most, not the one that
    moved most; a removal that drops A by 0.3 and raises B by 0.5 broke A."""
    assert broken_task({"A": 0.3, "B": -0.5, "C": 0.0}) == "A"


def test_steering_moves_the_initial_weights_by_alpha_times_the_runs_component():
    """Audit 117 C13: every other test steers at alpha = 1, where alpha applied twice is alpha.
    At the default 2 the steered weights are theta_0 +- 2 c d: with a linear reward the own
    task moves by +-2 (the run's 3 units of update over 3)."""
    initial, final, basis = _toy_run()
    out = causal_tests(initial, final, None, None, TASKS,
                       {"shard": {t: {"w": e} for t, e in basis.items()}},
                       CausalSettings(alpha=2.0), random_control=False, reward_fn=_linear(basis))
    for t in TASKS:
        e = out["kinds"]["shard"]["per_task"][t]
        assert e["steer_plus"][t] == pytest.approx(2.0, abs=1e-4)
        assert e["steer_minus"][t] == pytest.approx(-2.0, abs=1e-4)


@pytest.mark.parametrize("sign, scale", [(-1.0, 1.0), (1.0, 2.0)])
def test_controls_take_the_shards_magnitude_unsigned_whatever_its_scale(sign, scale):
    """Audit 117 C15, F14: a shard the run moved against (negative coefficient), or given at
    norm 2: its norm-matched controls still get its |c| (3), each applied along its own run
    component, so the shuffled control's ablation removes the run's update along it (every
    task drops by 0.5) instead of adding it, and a direction's scale does not shrink them."""
    initial, final, basis = _toy_run()
    mixed = sum(basis.values()) / 2.0
    out = causal_tests(initial, final, None, None, TASKS,
                       {"shard": {t: {"w": sign * scale * e} for t, e in basis.items()},
                        "shuffled_0": {t: {"w": mixed} for t in TASKS}},
                       CausalSettings(alpha=1.0), reward_fn=_linear(basis))
    for kind in ("shard", "shuffled_0", "random"):
        for t in TASKS:
            e = out["kinds"][kind]["per_task"][t]
            assert e["magnitude"] == pytest.approx(3.0, rel=1e-5), (kind, t)
    for t in TASKS:
        assert out["kinds"]["shuffled_0"]["per_task"][t]["ablate_drop"][t] == \
            pytest.approx(0.5, abs=1e-4)
        assert out["kinds"]["shard"]["per_task"][t]["ablate_drop"][t] == \
            pytest.approx(1.0, abs=1e-4)
