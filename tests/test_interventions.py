"""Weight interventions restore bit-exactly, validate first, and steering measures reward."""

import pytest
import torch
from helpers import vowel_direction

from sae_shards.analysis.interventions import (
    ablate,
    add_direction,
    direction_norm,
    dose_response,
    eval_prompts,
    label_rewards,
    mean_reward,
    paired_change,
    random_direction_like,
    remove_direction,
    score_rollouts,
    set_weights,
)
from sae_shards.recipe.models import tiny_model_and_tokenizer
from sae_shards.recipe.tasks import build_task

BODY = "model.layers.0.mlp.down_proj.weight"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model_and_tokenizer(seed=0)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_bit_equal(model, snapshot):
    for name, p in model.named_parameters():
        assert torch.equal(p, snapshot[name]), name


def _random_direction(model, names, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=gen) for n in names}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_direction_changes_then_restores_bit_exactly(dtype):
    model, _ = tiny_model_and_tokenizer(seed=0)
    model.to(dtype)
    before = _snapshot(model)
    direction = _random_direction(model, [BODY, "lm_head.weight", "model.norm.weight"])
    with add_direction(model, direction, 0.37):
        params = dict(model.named_parameters())
        expected = (before[BODY].float() + 0.37 * direction[BODY]).to(dtype)
        assert torch.equal(params[BODY], expected)
        assert params[BODY].dtype == dtype
        assert torch.equal(params["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    _assert_bit_equal(model, before)


def test_an_alpha_that_is_no_finite_number_is_refused_before_any_change(model_and_tokenizer):
    """alpha=NaN or inf was taken (every weight inside the block non-finite, in silence) and
    alpha="1" failed inside torch; an empty dose_response returned an empty curve."""
    import numpy as np

    model, tokenizer = model_and_tokenizer
    before = _snapshot(model)
    direction = _random_direction(model, [BODY])
    for bad, why in ((float("nan"), "must be finite"), (float("inf"), "must be finite"),
                     ("1", "must be a number"), (True, "must be a number")):
        with pytest.raises(ValueError, match=rf"add_direction: alpha=.* {why}"):
            with add_direction(model, direction, bad):
                pass
    _assert_bit_equal(model, before)
    with add_direction(model, direction, np.float32(0.5)):  # numpy and torch scalars are numbers
        with add_direction(model, direction, torch.tensor(-0.5)):
            pass
    _assert_bit_equal(model, before)
    task = build_task("letters")
    with pytest.raises(ValueError, match=r"dose_response: alphas is empty"):
        dose_response(model, tokenizer, task, direction, alphas=())
    with pytest.raises(ValueError, match=r"dose_response: alpha=nan must be finite"):
        dose_response(model, tokenizer, task, direction, alphas=(0, float("nan")))


def test_a_change_bf16_weights_round_away_is_warned_about(caplog):
    """A unit direction at a small alpha is mostly lost in bf16 weights (8 significant bits):
    said with the share lost, as is ablating it; large changes and fp32 weights are not."""
    import logging

    model, _ = tiny_model_and_tokenizer(seed=0)
    direction = _random_direction(model, [BODY])
    direction[BODY] /= direction[BODY].norm()
    said = lambda: [r.getMessage() for r in caplog.records if "cannot hold" in r.getMessage()]  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="sae_shards.analysis.interventions"):
        for alpha in (1e-4, 10.0):
            with add_direction(model, direction, alpha):  # fp32: every change is held
                pass
        assert said() == []
        model.to(torch.bfloat16)
        with add_direction(model, direction, 10.0):
            pass
        assert said() == []
        with add_direction(model, direction, 1e-4):
            pass
        (line,) = said()
        lost = float(line.split("rounding loses ")[1].split("%")[0])
        assert line.startswith("the model's torch.bfloat16 weights cannot hold this change")
        assert lost > 50 and "model.float()" in line
        initial = {BODY: dict(model.named_parameters())[BODY].float() - 1e-4 * direction[BODY]}
        with remove_direction(model, direction, initial) as c:
            assert c == pytest.approx(1e-4, rel=0.2)
        assert len(said()) == 2


def test_restore_after_exception_in_body(model_and_tokenizer):
    model, _ = model_and_tokenizer
    before = _snapshot(model)
    direction = _random_direction(model, [BODY])
    with pytest.raises(RuntimeError, match="boom"):
        with add_direction(model, direction, 1e-3):  # small: float rounding would show
            assert not torch.equal(dict(model.named_parameters())[BODY], before[BODY])
            raise RuntimeError("boom")
    _assert_bit_equal(model, before)
    with pytest.raises(RuntimeError, match="boom"):
        with set_weights(model, {BODY: torch.zeros_like(before[BODY])}):
            raise RuntimeError("boom")
    _assert_bit_equal(model, before)


def test_bad_names_and_shapes_fail_before_any_change(model_and_tokenizer):
    model, _ = model_and_tokenizer
    before = _snapshot(model)
    good = _random_direction(model, [BODY])
    with pytest.raises(ValueError, match="no_such.weight"):
        with add_direction(model, {**good, "no_such.weight": torch.zeros(3)}, 1.0):
            pass
    bad_shape = {**good, "lm_head.weight": torch.zeros(5, 7)}
    with pytest.raises(ValueError, match=r"lm_head\.weight.*\(5, 7\).*\(82, 64\)"):
        with add_direction(model, bad_shape, 1.0):
            pass
    with pytest.raises(ValueError, match="lm_head.weight"):
        with set_weights(model, bad_shape):
            pass
    _assert_bit_equal(model, before)


def test_remove_direction_recovers_coefficient_and_rest():
    model, _ = tiny_model_and_tokenizer(seed=0)
    names = [BODY, "model.layers.1.self_attn.o_proj.weight"]
    theta_0 = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    d = _random_direction(model, names, seed=1)
    e = _random_direction(model, names, seed=2)
    # Make e orthogonal to d (Frobenius over both targets), then theta_T = theta_0 + 3 d + e.
    proj = sum((e[n] * d[n]).sum() for n in names) / sum((d[n] ** 2).sum() for n in names)
    e = {n: e[n] - proj * d[n] for n in names}
    theta_T = {n: theta_0[n] + 3.0 * d[n] + e[n] for n in names}
    with set_weights(model, theta_T):
        final = _snapshot(model)
        with remove_direction(model, d, theta_0) as c:
            assert c == pytest.approx(3.0, rel=1e-5)
            params = dict(model.named_parameters())
            for n in names:
                torch.testing.assert_close(params[n], theta_0[n] + e[n], rtol=0, atol=1e-5)
        _assert_bit_equal(model, final)
    with pytest.raises(ValueError, match="initial weights lack"):
        with remove_direction(model, d, {BODY: theta_0[BODY]}):
            pass


def test_random_control_matches_norm_and_shapes(model_and_tokenizer):
    model, _ = model_and_tokenizer
    direction = _random_direction(model, [BODY, "model.norm.weight"])
    direction = {n: 0.01 * t for n, t in direction.items()}
    control = random_direction_like(direction, torch.Generator().manual_seed(0))
    assert {n: t.shape for n, t in control.items()} == {n: t.shape for n, t in direction.items()}
    assert direction_norm(control) == pytest.approx(direction_norm(direction), rel=1e-5)
    again = random_direction_like(direction, torch.Generator().manual_seed(0))
    assert all(torch.equal(control[n], again[n]) for n in control)


def test_mean_reward_is_reproducible_and_sees_weight_changes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = build_task("letters")
    rng_state = torch.get_rng_state()
    a = mean_reward(model, tokenizer, task, n_prompts=8, n_samples=4, seed=3)
    b = mean_reward(model, tokenizer, task, n_prompts=8, n_samples=4, seed=3)
    assert a == b
    assert a.n == 32 and a.stderr > 0
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is untouched
    direction = _random_direction(model, ["lm_head.weight"])
    with add_direction(model, direction, 5.0):
        c = mean_reward(model, tokenizer, task, n_prompts=8, n_samples=4, seed=3)
    assert c.mean != a.mean


def test_dose_response_rewards_the_vowel_direction_over_control(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = build_task("letters")
    before = _snapshot(model)
    direction = vowel_direction(model, tokenizer, task)
    curve = dose_response(
        model, tokenizer, task, direction, alphas=[0.0, 2.0, 10.0], n_prompts=16, n_samples=4
    )
    _assert_bit_equal(model, before)
    assert curve.alphas == [0.0, 2.0, 10.0]
    assert curve.reward_shard[0] == curve.reward_control[0]  # alpha 0: same weights, same seed
    base = curve.reward_shard[0]
    assert base < 0.15  # random tiny model: ~5/82 vowels
    # Measured (seeds 0-2): shard ~0.07 -> ~0.5 -> ~0.98, control stays ~0.07.
    assert curve.reward_shard[1] > base + 0.2
    assert curve.reward_shard[2] > curve.reward_shard[1] + 0.2
    assert curve.reward_shard[2] > curve.reward_control[2] + 0.5
    assert abs(curve.reward_control[2] - base) < 0.1
    # paired against alpha 0: 0 there, and what a change of the same prompts resolves elsewhere
    assert curve.stderr_change_shard[0] == 0.0 == curve.stderr_change_control[0]
    assert all(e > 0 for e in curve.stderr_change_shard[1:])
    assert dose_response(model, tokenizer, task, direction, alphas=[1.0], n_prompts=4,
                         n_samples=1).stderr_change_shard == []  # no alpha 0 to pair with


def test_dose_response_draws_each_contexts_curve_from_the_same_rollouts(model_and_tokenizer):
    """On a multi-task task the per-context curves average to the pooled one (equal prompts per
    context, no reward scale), and the vowel direction raises task A's curve alone."""
    model, tokenizer = model_and_tokenizer
    task = build_task("multiskill")
    direction = vowel_direction(model, tokenizer, build_task("letters"))
    curve = dose_response(model, tokenizer, task, direction, alphas=[0.0, 10.0], n_prompts=32,
                          n_samples=4)
    assert list(curve.shard_by_label) == list(task.labels) == list(curve.control_by_label)
    for i in range(2):
        mean = sum(c[i] for c in curve.shard_by_label.values()) / len(task.labels)
        assert mean == pytest.approx(curve.reward_shard[i], abs=1e-12)
    a = curve.shard_by_label["A"]
    assert a[1] > a[0] + 0.4  # A rewards the vowels
    assert all(abs(c[1] - c[0]) < 0.1 for t, c in curve.shard_by_label.items() if t != "A")
    assert all(abs(c[1] - c[0]) < 0.1 for c in curve.control_by_label.values())
    one = dose_response(model, tokenizer, build_task("letters"), direction, alphas=[0.0],
                        n_prompts=4)
    assert one.shard_by_label == {}  # one context: no split


def test_ablation_removes_what_the_run_added_along_the_shard(model_and_tokenizer):
    """A "run" that moved theta_0 by 10 x the vowel direction: removing its update along that
    direction brings task A's reward back down, and leaves the other tasks; removing the same
    amount of a random direction leaves A's gain; the final weights are restored bit-exactly."""
    from sae_shards.analysis.interventions import ablate

    model, tokenizer = model_and_tokenizer
    task = build_task("multiskill")
    direction = vowel_direction(model, tokenizer, build_task("letters"))
    theta0 = _snapshot(model)
    with add_direction(model, direction, 10.0):  # the "final" policy
        final = _snapshot(model)
        ab = ablate(model, tokenizer, task, direction, theta0, n_prompts=32, n_samples=4)
        _assert_bit_equal(model, final)
    assert ab.coefficient == pytest.approx(10.0, rel=1e-4)
    assert list(ab.removed_by_label) == list(task.labels)
    a_drop = ab.final_by_label["A"] - ab.removed_by_label["A"]
    assert a_drop > 0.4  # the vowel reward falls back towards the untrained model's
    assert all(abs(ab.final_by_label[t] - ab.removed_by_label[t]) < 0.1 for t in "BCD")
    assert abs(ab.final_by_label["A"] - ab.control_by_label["A"]) < 0.1
    pooled = sum(ab.removed_by_label.values()) / 4
    assert pooled == pytest.approx(ab.reward_removed, abs=1e-12)
    assert ab.n_by_label == {t: 32 for t in task.labels}  # 8 prompts of each, 4 samples
    assert a_drop > 4 * ab.stderr_change_removed_by_label["A"] > 0  # resolved, paired
    assert ab.change_removed == pytest.approx(ab.reward_removed - ab.reward_final, abs=1e-12)
    assert ab.change_overshoot == pytest.approx(ab.reward_overshoot - ab.reward_final,
                                                abs=1e-12)
    # the shard against its control, paired per prompt (the report's last column): told apart
    # over all four tasks, though only A's prompts (a quarter) move
    assert ab.beyond_control == pytest.approx(ab.reward_removed - ab.reward_control, abs=1e-12)
    assert ab.beyond_control < -2 * ab.stderr_beyond_control < 0


def test_task_rewards_per_label_from_one_batch(model_and_tokenizer):
    """Per-task rewards of a multi-task task: reproducible, the caller's RNG untouched, and a
    direction that raises task A's characters (vowels) raises A's reward alone."""
    from sae_shards.analysis.interventions import task_rewards

    model, tokenizer = model_and_tokenizer
    task = build_task("multiskill")
    labels = list(task.labels)
    rng_state = torch.get_rng_state()
    a = task_rewards(model, tokenizer, task, labels, n_prompts=8, n_samples=4, seed=3)
    assert a == task_rewards(model, tokenizer, task, labels, n_prompts=8, n_samples=4, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert list(a) == labels and all(e.n == 32 for e in a.values())
    assert all(e.mean < 0.2 for e in a.values())  # random tiny model: ~5/82 per class
    letters = build_task("letters")  # its target characters are the vowels, as multiskill A's
    direction = vowel_direction(model, tokenizer, letters)
    with add_direction(model, direction, 10.0):
        b = task_rewards(model, tokenizer, task, labels, n_prompts=8, n_samples=4, seed=3)
    assert b["A"].mean > a["A"].mean + 0.4
    assert all(abs(b[t].mean - a[t].mean) < 0.1 for t in labels if t != "A")
    with pytest.raises(ValueError, match="labels"):
        task_rewards(model, tokenizer, task, [], n_prompts=8)


def test_task_rewards_ignore_the_training_reward_scale(model_and_tokenizer):
    from sae_shards.analysis.interventions import task_rewards

    model, tokenizer = model_and_tokenizer
    plain = build_task("multiskill")
    if "reward_scale" not in {f for f in plain.__dataclass_fields__}:
        pytest.skip("multiskill has no reward_scale in this build")
    scaled = build_task("multiskill", reward_scale={"B": 3.0})
    a = task_rewards(model, tokenizer, plain, list(plain.labels), n_prompts=4, seed=1)
    b = task_rewards(model, tokenizer, scaled, list(plain.labels), n_prompts=4, seed=1)
    assert {t: e.mean for t, e in a.items()} == pytest.approx({t: e.mean for t, e in b.items()})


def test_weights_change_one_parameter_at_a_time(monkeypatch):
    """add_direction / remove_direction make each parameter's new value from its original and
    set it before the next one's is made: besides the originals' copy, one parameter's new value
    is held at a time, never a second copy of every weight (a 0.5B body: 1.4 GB each). The
    values are those of the whole-dict formula, and every parameter is restored bit-exactly."""
    import sae_shards.analysis.interventions as iv

    model, _ = tiny_model_and_tokenizer(seed=0)
    names = [BODY, "model.layers.1.self_attn.o_proj.weight", "model.norm.weight"]
    before = _snapshot(model)
    direction = _random_direction(model, names, seed=4)
    seen = []  # per new value made: how many of the named parameters had changed already
    params = dict(model.named_parameters())
    made = iv._changed

    def spy(ps, new_value):
        def tracked(name, p):
            seen.append(sum(not torch.equal(params[n], before[n]) for n in names))
            return new_value(name, p)
        return made(ps, tracked)

    monkeypatch.setattr(iv, "_changed", spy)
    with add_direction(model, direction, 0.37):
        for n in names:
            assert torch.equal(params[n], before[n].float() + 0.37 * direction[n])
    assert seen == [0, 1, 2]
    _assert_bit_equal(model, before)
    theta0 = {n: before[n] - 2.0 * direction[n] for n in names}
    seen.clear()
    with remove_direction(model, direction, theta0) as c:
        for n in names:
            assert torch.equal(params[n], before[n].float() - c * direction[n])
    assert seen == [0, 1, 2]
    _assert_bit_equal(model, before)


def test_random_control_is_the_scaled_gaussian_draw(model_and_tokenizer):
    """Scaled in place, the control holds exactly the bits of ``draw * scale``."""
    model, _ = model_and_tokenizer
    direction = _random_direction(model, [BODY, "model.norm.weight"], seed=5)
    control = random_direction_like(direction, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    draws = {n: torch.randn(d.shape, generator=gen) for n, d in direction.items()}
    scale = direction_norm(direction) / direction_norm(draws)
    assert all(torch.equal(control[n], draws[n] * scale) for n in direction)


def test_dose_response_scores_alpha_zero_once_or_takes_the_baseline(model_and_tokenizer,
                                                                    monkeypatch):
    """Alpha 0 is the unchanged model for the shard and the control alike: scored once (not
    twice under a zero change), or taken from ``baseline``, with the same figures either way."""
    import sae_shards.analysis.interventions as iv

    model, tokenizer = model_and_tokenizer
    task = build_task("letters")
    direction = vowel_direction(model, tokenizer, task)
    score = iv.score_rollouts
    calls = []
    monkeypatch.setattr(iv, "score_rollouts", lambda *a, **k: calls.append(1) or score(*a, **k))
    alphas = [-1.0, 0.0, 2.0]
    curve = dose_response(model, tokenizer, task, direction, alphas, n_prompts=8, n_samples=2)
    assert len(calls) == 1 + 2 * 2  # alpha 0 once; the shard and the control at -1 and 2
    assert curve.reward_shard[1] == curve.reward_control[1]
    base = score(model, tokenizer, task, iv.eval_prompts(task, 8), n_samples=2)
    # the unchanged model scores as under a zero change (the old way): the same rollouts
    with add_direction(model, direction, 0.0):
        zero = score(model, tokenizer, task, iv.eval_prompts(task, 8), n_samples=2)
    assert torch.equal(zero.rewards.nan_to_num(-1), base.rewards.nan_to_num(-1))
    calls.clear()
    given = dose_response(model, tokenizer, task, direction, alphas, n_prompts=8, n_samples=2,
                          baseline=base)
    assert len(calls) == 2 * 2 and given == curve
    with pytest.raises(ValueError, match="baseline scores"):
        dose_response(model, tokenizer, task, direction, alphas, n_prompts=4, n_samples=2,
                      baseline=base)


def test_reward_estimates_and_paired_changes_by_definition():
    """The error bars of dose-responses and ablations: prompts are the independent units
    (stderr = std of per-prompt means / sqrt(prompts)); NaN (unscorable) completions are left
    out of a prompt's mean, and a prompt is dropped only when none of its completions scored."""
    import math

    from sae_shards.analysis.interventions import _until_stop, estimate, paired_change

    nan = float("nan")
    whole = estimate(torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    assert whole.mean == pytest.approx(0.5) and whole.n == 6
    assert whole.stderr == pytest.approx(float(torch.tensor([0.5, 0.0, 1.0]).std()) / math.sqrt(3))
    holes = estimate(torch.tensor([[1.0, 0.0, nan], [0.0, 0.0, 1.0], [nan, nan, nan]]))
    assert holes.mean == pytest.approx(0.4) and holes.n == 5
    assert holes.stderr == pytest.approx(float(torch.tensor([0.5, 1 / 3]).std()) / math.sqrt(2))
    before = torch.tensor([[0.0, 0.0], [1.0, nan], [nan, nan]])
    after = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    mean, stderr = paired_change(before, after)  # prompts 0 and 1: changes 1 and -0.5
    assert mean == pytest.approx(0.25)
    assert stderr == pytest.approx(float(torch.tensor([1.0, -0.5]).std()) / math.sqrt(2))
    # a completion's ids run up to and including its first stop token, as TRL's do
    assert _until_stop([5, 7, 2, 9, 2], {2}) == [5, 7, 2] and _until_stop([5, 7], {2}) == [5, 7]


def test_the_dose_responses_error_bar_is_the_paired_standard_error(model_and_tokenizer):
    """Audit 117 I19: the report's error bars of a steering curve are paired_change's standard
    error of alpha 0 against alpha (the only test asked for > 0, which the mean change passes)."""
    model, tokenizer = model_and_tokenizer
    task = build_task("letters")
    d = vowel_direction(model, tokenizer, task)
    settings = dict(n_samples=2, max_new_tokens=8)
    curve = dose_response(model, tokenizer, task, d, alphas=[0.0, 5.0], n_prompts=6, **settings)
    prompts = eval_prompts(task, 6)
    base = score_rollouts(model, tokenizer, task, prompts, **settings)
    with add_direction(model, d, 5.0):
        moved = score_rollouts(model, tokenizer, task, prompts, **settings)
    mean, se = paired_change(base.rewards, moved.rewards)
    assert mean > 0 and curve.stderr_change_shard[1] == pytest.approx(se, abs=1e-12)


def test_an_ablations_error_bar_per_context_pairs_the_final_and_removed_policies(
        model_and_tokenizer):
    """Audit 117 I30: each context's standard error of the drop pairs the final policy's
    rollouts with the shard-removed policy's (the control's would look resolved when the drop
    is not)."""
    model, tokenizer = model_and_tokenizer
    task = build_task("multiskill")
    d = vowel_direction(model, tokenizer, build_task("letters"))
    theta0 = _snapshot(model)
    settings = dict(n_samples=2, max_new_tokens=8)
    with add_direction(model, d, 10.0):
        result = ablate(model, tokenizer, task, d, theta0, n_prompts=16, **settings)
        prompts = eval_prompts(task, 16)
        final = score_rollouts(model, tokenizer, task, prompts, **settings)
        with remove_direction(model, d, theta0):
            removed = score_rollouts(model, tokenizer, task, prompts, **settings)
    before, after = label_rewards(final, task), label_rewards(removed, task)
    for label in task.labels:
        assert result.stderr_change_removed_by_label[label] == pytest.approx(
            paired_change(before[label], after[label])[1], abs=1e-12), label


def test_a_task_of_two_contexts_gets_equal_shares_of_the_prompts():
    """Audit 117 I28: the prompts a dose-response or an ablation scores alternate between the
    contexts for two of them too, even when one has most of the rows."""
    from datasets import Dataset

    from sae_shards.analysis.reward_task import RewardTask

    rows = Dataset.from_dict({"prompt": [f"p{i}" for i in range(12)],
                              "kind": ["a"] * 10 + ["b"] * 2})
    task = RewardTask(rows, [lambda completions, **kwargs: [0.0] * len(completions)],
                      label_column="kind")
    assert sorted(eval_prompts(task, 4)["kind"]) == ["a", "a", "b", "b"]


def _recording_scorer(monkeypatch, names):
    """Replace interventions.score_rollouts by a fake that records the named parameters' values
    at each call and returns seeded random rewards (one call: one Scored)."""
    import sae_shards.analysis.interventions as iv

    seen, scored = [], []

    def fake(model, tokenizer, task, data, n_samples=iv.N_SAMPLES, **kwargs):
        params = dict(model.named_parameters())
        seen.append({n: params[n].detach().clone() for n in names})
        g = torch.Generator().manual_seed(len(seen))
        rewards = torch.rand(len(data), n_samples, generator=g, dtype=torch.float64)
        column = iv._label_column(task)
        labels = ([str(x) for x in data[column]] if column in data.column_names else None)
        scored.append(iv.Scored(rewards, labels))
        return scored[-1]

    monkeypatch.setattr(iv, "score_rollouts", fake)
    return seen, scored


def _direction(model, names, seed):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=g) for n in names}


def test_ablation_control_removes_c_times_the_norm_matched_draw(monkeypatch):
    """docs/analysis.md s.7: the ablation's control is the final weights minus c times a random
    direction of d's norm (control_seed), c being the shard's own coefficient."""
    from sae_shards.analysis.interventions import ablate, random_direction_like

    model, tok = tiny_model_and_tokenizer(seed=0)
    names = [BODY, O_PROJ]
    params = dict(model.named_parameters())
    theta0 = {n: params[n].detach().clone() for n in names}
    d = _direction(model, names, seed=1)
    with torch.no_grad():
        for n in names:  # the "run": theta_T = theta_0 + 0.5 d + noise
            params[n].add_(0.5 * d[n] + 0.01 * _direction(model, [n], seed=7)[n])
    theta_t = {n: params[n].detach().clone() for n in names}
    seen, _ = _recording_scorer(monkeypatch, names)
    ab = ablate(model, tok, build_task("letters"), d, theta0, control_seed=3, n_prompts=4,
                n_samples=2)
    c = ab.coefficient
    assert c == pytest.approx(0.5, rel=0.05)
    assert len(seen) == 4  # final, removed, overshoot, control
    r = random_direction_like(d, torch.Generator().manual_seed(3))
    for n in names:
        torch.testing.assert_close(seen[0][n], theta_t[n])
        torch.testing.assert_close(seen[1][n], theta_t[n] - c * d[n], rtol=0, atol=1e-5)
        # audit 142 F4: as far again along the shard, the policy's curvature near its optimum
        torch.testing.assert_close(seen[2][n], theta_t[n] + c * d[n], rtol=0, atol=1e-5)
        torch.testing.assert_close(seen[3][n], theta_t[n] - c * r[n], rtol=0, atol=1e-5)


def test_dose_response_steers_along_the_signed_alpha_and_pairs_against_alpha_zero(
        monkeypatch):
    """dose_response: the weights at alpha are theta + alpha * direction for negative alphas too
    (the report's default alphas start at -1), the control likewise along its norm-matched draw,
    and each point's paired standard error is taken against alpha 0 wherever it sits."""
    from sae_shards.analysis.interventions import (dose_response, paired_change,
                                                   random_direction_like)

    model, tok = tiny_model_and_tokenizer(seed=0)
    names = [BODY]
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    d = {n: 0.1 * t for n, t in _direction(model, names, seed=2).items()}
    seen, scored = _recording_scorer(monkeypatch, names)
    alphas = [-1.0, 0.0, 2.0]
    curve = dose_response(model, tok, build_task("letters"), d, alphas, control_seed=5,
                          n_prompts=6, n_samples=2)
    r = random_direction_like(d, torch.Generator().manual_seed(5))
    # calls: alpha -1 shard, control; alpha 0 once; alpha 2 shard, control
    assert len(seen) == 5
    expect = [theta[BODY] - d[BODY], theta[BODY] - r[BODY], theta[BODY],
              theta[BODY] + 2 * d[BODY], theta[BODY] + 2 * r[BODY]]
    for got, want in zip(seen, expect):
        torch.testing.assert_close(got[BODY], want, rtol=0, atol=1e-6)
    base = scored[2].rewards
    assert curve.stderr_change_shard == [paired_change(base, scored[0].rewards)[1], 0.0,
                                         paired_change(base, scored[3].rewards)[1]]
    assert curve.stderr_change_control == [paired_change(base, scored[1].rewards)[1], 0.0,
                                           paired_change(base, scored[4].rewards)[1]]


def test_ablation_per_context_error_bar_pairs_final_and_removed(monkeypatch):
    """Ablation.stderr_change_removed_by_label: each context's standard error of the change
    final -> removed, paired per prompt (paired_change), not the removed policy's own spread."""
    from sae_shards.analysis.interventions import ablate, label_rewards, paired_change

    model, tok = tiny_model_and_tokenizer(seed=0)
    names = [BODY]
    params = dict(model.named_parameters())
    theta0 = {BODY: params[BODY].detach().clone()}
    d = _direction(model, names, seed=1)
    task = build_task("multiskill")
    _, scored = _recording_scorer(monkeypatch, names)
    with torch.no_grad():
        params[BODY].add_(0.3 * d[BODY])
    ab = ablate(model, tok, task, d, theta0, n_prompts=16, n_samples=3)
    before, after = label_rewards(scored[0], task), label_rewards(scored[1], task)
    assert set(ab.stderr_change_removed_by_label) == set(task.labels)
    for label in task.labels:
        assert ab.stderr_change_removed_by_label[label] == pytest.approx(
            paired_change(before[label], after[label])[1], rel=1e-9), label
        assert ab.removed_by_label[label] == pytest.approx(float(after[label].mean()))


def test_a_shard_added_to_an_unmerged_adapter_says_to_merge_it(model_and_tokenizer):
    """Audit 134: a shard's base-model names on a peft model were refused as 'not a parameter'
    naming a base_model.model... example, without saying why: the adapter was not merged."""
    import copy

    from peft import LoraConfig, get_peft_model

    model, _ = model_and_tokenizer
    name, param = next((n, p) for n, p in model.named_parameters() if p.ndim == 2)
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"not a parameter of PeftModel.*an unmerged peft "
                                         r"adapter: merge it first, model.merge_and_unload\(\)"):
        with add_direction(wrapped, {name: torch.zeros_like(param)}, 1.0):
            pass
    with pytest.raises(ValueError, match="not a parameter of") as e:  # a plain model: no hint
        with add_direction(model, {"no.such.weight": torch.zeros(1)}, 1.0):
            pass
    assert "peft" not in str(e.value)
