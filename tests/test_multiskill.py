"""The planted-shard task: per-task rewards, the null control, step schedules, and a real GRPO run
in which every optimizer step's recorded rollouts carry exactly the scheduled task."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import TrainerCallback

from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.run.config import (JobConfig, LoggingConfig, ModelConfig, RLConfig, RunnerConfig,
                                   TaskConfig)
from sae_shards.capture.rollouts import TRLRollouts
from sae_shards.run.job import build_rl
from sae_shards.recipe.models import build_tokenizer, tiny_model_and_tokenizer
from sae_shards.recipe.trainers import build_trainer
from sae_shards.recipe.tasks import SKILLS, build_task


def _rewards(task, completions, labels):
    return task.reward_funcs[0](prompts=["<A> q"] * len(completions), completions=completions,
                                task=labels)


def test_each_task_rewards_its_own_class():
    task = build_task("multiskill", target_length=4)
    cases = [  # (completion, task label, reward): fixed denominator 4, capped at 1
        ("aeio", "A", 1.0), ("aeio", "B", 0.0), ("0123", "B", 1.0), ("5678", "B", 0.0),
        ("!?x.", "C", 0.75), ("bcz", "D", 0.5), ("", "A", 0.0), ("aaaaaaaa", "A", 1.0),
        ("<A>a", "A", 0.25), ("a0!b", "A", 0.25), ("a0!b", "D", 0.25),
    ]
    completions, labels, expected = map(list, zip(*cases))
    assert _rewards(task, completions, labels) == expected
    assert task.reward_funcs[0].__name__ == "skill_reward"
    # The classes are disjoint: no completion serves two tasks.
    assert all(not set(a) & set(b) for (_, a), (_, b) in itertools.combinations(SKILLS, 2))
    assert build_task("multiskill").score("a", "A") == 1 / 16  # "a<eos>" is no shortcut


def test_null_reward_ignores_the_tag():
    null = build_task("multiskill_null", target_length=16)  # quota: 4 characters per class
    completions = ["aaaa0000!!!!bbbb", "a" * 16, "aeio" * 2 + "0123", "", "zzzz"]
    expected = [1.0, 0.25, 0.5, 0.0, 0.0]
    for label in "ABCD":
        assert _rewards(null, completions, [label] * len(completions)) == expected
    assert null.reward_funcs[0].__name__ == "null_reward"
    # Same prompts, tags and schedule as the real task.
    real = build_task("multiskill")
    assert null.step_labels(50) == real.step_labels(50)
    assert null.step_dataset(20, 2, seed=3)[:] == real.step_dataset(20, 2, seed=3)[:]


def test_random_schedule_is_seeded_and_one_task_per_step():
    task = build_task("multiskill", schedule="random", seed=5)
    labels = task.step_labels(200)
    assert labels == build_task("multiskill", seed=5).step_labels(200)
    assert labels != build_task("multiskill", seed=6).step_labels(200)
    assert set(labels) == {"A", "B", "C", "D"}

    ds = task.step_dataset(2 * 200, prompts_per_step=2, seed=0)
    assert ds.column_names == ["prompt", "task"]
    steps = [ds["task"][i:i + 2] for i in range(0, len(ds), 2)]
    assert [s[0] for s in steps] == labels and all(len(set(s)) == 1 for s in steps)
    assert all(p.startswith(f"<{t}> ") for p, t in zip(ds["prompt"], ds["task"]))
    tokenizer = build_tokenizer()
    assert all(tokenizer.unk_token_id not in tokenizer(p)["input_ids"] for p in ds["prompt"])


@pytest.mark.parametrize("n_tasks,block_len", [(4, 10), (3, 1), (2, 7)])
def test_blocks_schedule_runs_block_len_steps_cycling_all_tasks(n_tasks, block_len):
    task = build_task("multiskill", schedule="blocks", n_tasks=n_tasks, block_len=block_len)
    n_steps = 23 * block_len + 3
    labels = task.step_labels(n_steps)
    runs = [(k, len(list(g))) for k, g in itertools.groupby(labels)]
    assert [n for _, n in runs[:-1]] == [block_len] * (len(runs) - 1)  # a task never repeats
    assert runs[-1][1] == (n_steps % block_len or block_len)
    order = [k for k, _ in runs]
    for i in range(0, len(order) - n_tasks + 1, n_tasks):  # each cycle visits every task once
        assert sorted(order[i:i + n_tasks]) == list(task.labels)
    assert task.step_labels(n_steps + 25)[:n_steps] == labels  # longer runs extend, not redraw


def test_eval_dataset_cycles_tasks():
    task = build_task("multiskill")
    assert task.dataset(6, seed=1)["task"] == ["A", "B", "C", "D", "A", "B"]
    ds = task.dataset(4, seed=1, labels=["C"])
    assert ds["task"] == ["C"] * 4 and all(p.startswith("<C> ") for p in ds["prompt"])
    with pytest.raises(ValueError, match="subset of"):
        task.dataset(4, labels=["E"])


@pytest.mark.parametrize("options,field", [
    ({"schedule": "weekly"}, "task.options.schedule"),
    ({"n_tasks": 1}, "task.options.n_tasks"),
    ({"n_tasks": 9}, "task.options.n_tasks"),
    ({"block_len": 0}, "task.options.block_len"),
    ({"target_length": 0}, "task.options.target_length"),
    ({"prompt_length": (0, 3)}, "task.options.prompt_length"),
    ({"prompt_chars": ""}, "task.options.prompt_chars"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_task("multiskill", **options)


def test_bad_sizes_and_unknown_options():
    with pytest.raises(ValueError, match=r"task\.n_prompts=7 must be a positive multiple"):
        build_task("multiskill").step_dataset(7, prompts_per_step=2)
    with pytest.raises(ValueError, match=r"task.options.no_such_option'\] are not options of "
                                         r"task 'multiskill_null'"):
        build_task("multiskill_null", no_such_option=1)


def test_yaml_schedule_override_composes():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "task=multiskill_null", "task.options.schedule=blocks", "task.options.block_len=5"]))
    task = build_task(cfg.task.name, **cfg.task.options)
    assert (task.name, task.schedule, task.block_len) == ("multiskill_null", "blocks", 5)


# ---------------------------------------------------------------------------- real GRPO runs
FAST = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=8)


class StepLabels(TrainerCallback):
    """Reads each step's rollouts from TRL's completion log, as ``ShardCallback`` does."""

    def __init__(self, rollouts: TRLRollouts) -> None:
        self.rollouts = rollouts
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(self.rollouts.read(state.global_step))


@pytest.mark.parametrize("options,accumulation,steps_in_schedule", [
    ({"schedule": "random", "seed": 3}, 1, 6),
    ({"schedule": "blocks", "block_len": 2}, 2, 4),  # 6 steps replay a 4-step schedule
])
def test_grpo_steps_train_exactly_the_scheduled_task(tmp_path, options, accumulation,
                                                     steps_in_schedule):
    prompts_per_step = 8 // 4 * accumulation
    cfg = JobConfig(
        task=TaskConfig(name="multiskill", n_prompts=steps_in_schedule * prompts_per_step,
                        options=options),
        rl=RLConfig(max_steps=6, gradient_accumulation_steps=accumulation,
                    extra={"disable_tqdm": True}, **FAST),
        runner=RunnerConfig(min_samples=2), logging=LoggingConfig(mode="disabled"))
    rl = build_rl(cfg, tmp_path, device=torch.device("cpu"))
    probe = StepLabels(TRLRollouts(rl.trainer))
    rl.trainer.add_callback(probe)
    rl.trainer.train()

    task = build_task("multiskill", **options)
    schedule = task.step_labels(steps_in_schedule)
    expected = [schedule[t % steps_in_schedule] for t in range(6)]
    assert [got.labels for got in probe.steps] == [(label,) for label in expected]
    assert [got.row["step"] for got in probe.steps] == list(range(1, 7))
    for got in probe.steps:
        assert 0.0 <= got.reward_mean <= 1.0
    for row, label in zip((got.row for got in probe.steps), expected):
        # one generation per optimizer step: every completion of the step, all of one task
        assert len(row["completions"]) == 8 * accumulation
        assert set(row["tasks"]) == {label}
        assert all(p.startswith(task.tag(label)) for p in row["prompts"])


def test_scheduled_task_refuses_settings_that_mix_steps(tmp_path):
    from sae_shards.recipe.models import build_tiny_model, load_tokenizer

    path = build_tiny_model(tmp_path / "model")
    tokenizer = load_tokenizer(path)
    task = build_task("multiskill", target_length=8)

    def trainer(dataset, **kwargs):
        return build_trainer(path, tokenizer, task, dataset,
                             {**FAST, "max_steps": 2, **kwargs}, [], tmp_path / "out")

    schedule = task.step_dataset(8, prompts_per_step=2)
    with pytest.raises(ValueError, match="rl.shuffle_dataset=True"):
        trainer(schedule, shuffle_dataset=True)
    with pytest.raises(ValueError, match="steps_per_generation"):
        trainer(schedule, steps_per_generation=2)
    with pytest.raises(ValueError, match="not a schedule of 2-prompt single-task steps"):
        trainer(task.dataset(8))  # the evaluation dataset mixes tasks within a step
    assert trainer(schedule).shuffle_dataset is False


# ---------------------------------------------------------------------------- mixed schedule
@pytest.mark.parametrize("prompts_per_step,n_tasks", [(8, 4), (6, 4), (2, 4), (12, 3)])
def test_mixed_schedule_puts_several_tasks_in_every_step(prompts_per_step, n_tasks):
    task = build_task("multiskill", schedule="mixed", n_tasks=n_tasks, seed=2)
    mixes = task.step_mixes(120, prompts_per_step)
    assert len(mixes) == 120 and all(len(m) == prompts_per_step for m in mixes)
    whole, extra = divmod(prompts_per_step, n_tasks)
    for mix in mixes:
        # q of every task, plus the remainder on distinct tasks: never one task per step
        assert len(set(mix)) == min(prompts_per_step, n_tasks) > 1
        assert all(whole <= mix.count(label) <= whole + 1 for label in task.labels)
    counts = [sum(m.count(label) for m in mixes) for label in task.labels]
    assert max(counts) - min(counts) <= n_tasks  # the deck keeps every task's share equal
    assert len(set(mixes)) > 1  # the order within a step is shuffled
    assert mixes == build_task("multiskill", schedule="mixed", n_tasks=n_tasks,
                               seed=2).step_mixes(120, prompts_per_step)
    assert task.step_mixes(150, prompts_per_step)[:120] == mixes  # longer schedules extend
    assert mixes != build_task("multiskill", schedule="mixed", n_tasks=n_tasks,
                               seed=3).step_mixes(120, prompts_per_step)
    ds = task.step_dataset(120 * prompts_per_step, prompts_per_step, seed=1)
    assert ds["task"] == [label for m in mixes for label in m]
    assert all(p.startswith(task.tag(label)) for p, label in zip(ds["prompt"], ds["task"]))
    with pytest.raises(ValueError, match="use step_mixes"):
        task.step_labels(10)


def test_a_mixed_steps_remainder_is_of_distinct_tasks_when_the_deck_runs_out_mid_step():
    """The remainder of a step (3 of 4 tasks, or 3 beside one of each) is dealt from a deck of
    every task, and stays of distinct tasks when the deck is refilled within the step (audit
    125, T07: the planted setting, 8 prompts over 4 tasks, has no remainder)."""
    task = build_task("multiskill", schedule="mixed", n_tasks=4, seed=0)
    for mix in task.step_mixes(200, 3):
        assert len(set(mix)) == 3, mix
    for mix in task.step_mixes(200, 7):  # one of each and three distinct extra
        assert len(mix) == 7 and all(1 <= mix.count(t) <= 2 for t in task.labels), mix


def test_one_task_schedules_keep_their_steps_in_step_mixes():
    for schedule in ("random", "blocks"):
        task = build_task("multiskill", schedule=schedule, seed=4)
        assert task.step_mixes(50, 3) == [(label,) * 3 for label in task.step_labels(50)]


def test_reward_scale_multiplies_the_training_reward_only():
    task = build_task("multiskill", target_length=4, reward_scale={"B": 0.5, "C": 2.0})
    assert _rewards(task, ["aeio", "0123", "!?.,", "bcdf"], list("ABCD")) == [1.0, 0.5, 2.0, 1.0]
    assert task.score("0123", "B") == 1.0 and task.scaled
    assert not build_task("multiskill", reward_scale={"A": 1.0}).scaled
    null = build_task("multiskill_null", target_length=4, reward_scale={"A": 3.0})
    assert _rewards(null, ["a0!b", "a0!b"], ["A", "B"]) == [3.0, 1.0]
    with pytest.raises(ValueError, match=r"task.options.reward_scale names tasks \['E'\]"):
        build_task("multiskill", reward_scale={"E": 2.0})
    with pytest.raises(ValueError, match=r"task.options.reward_scale.A=0"):
        build_task("multiskill", reward_scale={"A": 0})


def test_reward_scale_is_refused_where_group_std_scaling_cancels_it(tmp_path):
    from sae_shards.recipe.models import build_tiny_model, load_tokenizer

    path = build_tiny_model(tmp_path / "model")
    task = build_task("multiskill", target_length=8, reward_scale={"A": 2.0})
    schedule = task.step_dataset(8, prompts_per_step=2)
    args = {**FAST, "max_steps": 2}
    with pytest.raises(ValueError, match="reward_scale has no effect under rl scale_rewards='group'"):
        build_trainer(path, load_tokenizer(path), task, schedule, args, [], tmp_path / "o")
    trainer = build_trainer(path, load_tokenizer(path), task, schedule,
                            {**args, "scale_rewards": "none"}, [], tmp_path / "o")
    assert trainer.args.scale_rewards == "none"
    # the same verdicts from the settings alone (sae-shards train's checks, nothing built)
    from sae_shards.recipe.trainers import check_reward_scale

    with pytest.raises(ValueError, match="no effect under rl scale_rewards='group'"):
        check_reward_scale(args)
    check_reward_scale({**args, "scale_rewards": "none"})
    check_reward_scale({**args, "scale_rewards": "batch"})
    with pytest.raises(ValueError, match="multi_objective_aggregation='normalize_then_sum'"):
        check_reward_scale({**args, "scale_rewards": "none",
                            "multi_objective_aggregation": "normalize_then_sum"})


def test_grpo_mixed_steps_train_and_record_every_task_present(tmp_path):
    # 4 prompts per step (2 per micro-batch, 2 micro-batches), 4 tasks: every task in every step
    options = {"schedule": "mixed", "seed": 1}
    steps, prompts_per_step = 4, 4
    # as the planted experiment: body-only policy on a tiny model with a scaled readout
    cfg = JobConfig(
        model=ModelConfig(readout_scale=4.0),
        task=TaskConfig(name="multiskill", n_prompts=steps * prompts_per_step, options=options),
        rl=RLConfig(max_steps=steps, gradient_accumulation_steps=2, trainable=["model.layers.*"],
                    extra={"disable_tqdm": True}, **FAST),
        runner=RunnerConfig(min_samples=2), logging=LoggingConfig(mode="disabled"))
    rl = build_rl(cfg, tmp_path, device=torch.device("cpu"))
    probe = StepLabels(TRLRollouts(rl.trainer))
    rl.trainer.add_callback(probe)
    params = dict(rl.trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    rl.trainer.train()

    frozen = [n for n in params if not n.startswith("model.layers.")]
    assert "lm_head.weight" in frozen and "model.norm.weight" in frozen
    assert all(torch.equal(params[n], before[n]) for n in frozen)
    assert not torch.equal(params["model.layers.0.mlp.up_proj.weight"],
                           before["model.layers.0.mlp.up_proj.weight"])
    plain, _ = tiny_model_and_tokenizer(seed=cfg.seed)
    assert torch.equal(before["lm_head.weight"], 4.0 * plain.lm_head.weight.detach())

    task = build_task("multiskill", **options)
    planned = task.step_mixes(steps, prompts_per_step)
    assert [got.labels for got in probe.steps] == [tuple(sorted(set(m))) for m in planned]
    assert all(got.labels == ("A", "B", "C", "D") for got in probe.steps)
    for got, mix in zip(probe.steps, planned):
        row = got.row  # the optimizer step's whole generation: every prompt group, its label
        assert len(row["completions"]) == 4 * prompts_per_step
        assert sorted(row["tasks"]) == sorted(label for label in mix for _ in range(4))
        assert all(p.startswith(task.tag(label)) for p, label in zip(row["prompts"], row["tasks"]))


def test_mixed_schedule_must_match_the_steps_it_was_built_for(tmp_path):
    from sae_shards.recipe.models import build_tiny_model, load_tokenizer

    path = build_tiny_model(tmp_path / "model")
    task = build_task("multiskill", target_length=8, schedule="mixed")

    def trainer(dataset):
        return build_trainer(path, load_tokenizer(path), task, dataset,
                             {**FAST, "max_steps": 2}, [], tmp_path / "out")

    with pytest.raises(ValueError, match="not the mixed schedule of task 'multiskill' in 2-prompt"):
        trainer(task.step_dataset(12, prompts_per_step=4))  # built for 4 prompts per step
    with pytest.raises(ValueError, match="mixed schedule"):
        trainer(task.dataset(8))
    assert trainer(task.step_dataset(8, prompts_per_step=2)).shuffle_dataset is False
