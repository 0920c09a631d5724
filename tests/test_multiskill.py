"""The planted-shard task: per-task rewards, the null control, step schedules, and a real GRPO run
in which every optimizer step's recorded rollouts carry exactly the scheduled task."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import TrainerCallback

from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.run.config import JobConfig, LoggingConfig, RLConfig, TaskConfig
from sae_shards.capture.rollouts import TRLRollouts
from sae_shards.run.job import build_rl
from sae_shards.recipe.models import build_tokenizer
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
        logging=LoggingConfig(mode="disabled"))
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
