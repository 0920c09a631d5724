"""Built-in task rewards, datasets, the rollout recorder's drain semantics, and name errors."""

from __future__ import annotations

import threading

import pytest
from transformers import TrainerState

from sae_shards.recipe.models import build_tokenizer
from sae_shards.recipe.tasks import RolloutRecorder, Task, build_task


def test_reward_known_values():
    task = build_task("letters", target_chars="aeiou", target_length=4)
    completions = ["aeio", "bcdf", "ab", "xaxex", "aaaaaaaa", "", "<A>a"]
    expected = [1.0, 0.0, 0.25, 0.5, 1.0, 0.0, 0.25]  # fixed denominator, capped at 1
    rewards = task.reward_funcs[0](prompts=["<A> q"] * len(completions), completions=completions)
    assert rewards == expected


def test_short_completion_cannot_score_high():
    task = build_task("letters", target_length=16)
    assert task.score("a") == 1 / 16  # "a<eos>" is no shortcut to reward 1


def test_dataset_columns_tags_and_determinism():
    task = build_task("letters")
    ds = task.dataset(50, seed=1)
    assert ds.column_names == ["prompt", "task"] and len(ds) == 50
    assert set(ds["task"]) == {"letters"}
    assert all(p.startswith("<A> ") for p in ds["prompt"])
    assert ds["prompt"] == task.dataset(50, seed=1)["prompt"]
    assert ds["prompt"] != task.dataset(50, seed=2)["prompt"]
    tokenizer = build_tokenizer()
    assert all(tokenizer.unk_token_id not in tokenizer(p)["input_ids"] for p in ds["prompt"])


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match=r"task.name='chess' is unknown.*letters"):
        build_task("chess")


def test_bad_fields_are_named():
    with pytest.raises(ValueError, match="task.tag"):
        build_task("letters", tag="<Z>")
    with pytest.raises(ValueError, match="task.target_length"):
        build_task("letters", target_length=0)
    with pytest.raises(TypeError):
        build_task("letters", no_such_field=1)


def test_recorder_records_each_call_and_drain_clears():
    task = build_task("letters", target_length=2)
    recorder = RolloutRecorder()
    reward = recorder.wrap(task.reward_funcs[0])
    assert reward.__name__ == "char_class_reward"  # TRL logs rewards under this name
    assert recorder.drain() == []

    state = TrainerState()
    state.global_step = 7
    out = reward(prompts=["<A> x", "<A> y"], completions=["a", "zz"], task=["letters"] * 2,
                 trainer_state=state)
    assert out == [0.5, 0.0]
    reward(prompts=["<A> z"], completions=["ee"], task=["letters"])
    records = recorder.drain()
    assert [r["step"] for r in records] == [7, None]
    assert records[0] == {
        "step": 7,
        "reward_func": "char_class_reward",
        "prompts": ["<A> x", "<A> y"],
        "completions": ["a", "zz"],
        "rewards": [0.5, 0.0],
        "tasks": ["letters", "letters"],
    }
    assert records[1]["rewards"] == [1.0]
    assert recorder.drain() == []  # drained means gone


def test_recorder_is_thread_safe():
    recorder = RolloutRecorder()
    reward = recorder.wrap(Task(name="t", label="t").char_class_reward)
    drained: list[dict] = []

    def worker() -> None:
        for _ in range(200):
            reward(prompts=["p"], completions=["a"])

    def drainer() -> None:
        for _ in range(100):
            drained.extend(recorder.drain())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    threads.append(threading.Thread(target=drainer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drained.extend(recorder.drain())
    assert len(drained) == 800  # nothing lost, nothing duplicated
