"""A user's own reward, handed back for analysis (``RewardTask``): called as TRL calls it,
per-context estimates, bad input refused early, and ``--task`` resolving a script's object."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from sae_shards.analysis.interventions import mean_reward, score_rollouts, task_rewards
from sae_shards.analysis.reward_task import RewardTask, load_task_spec
from sae_shards.recipe.models import tiny_model_and_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "trl_script.py"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model_and_tokenizer(seed=0)


def _prompts(n=12):
    return Dataset.from_dict({"prompt": [f"<A> p{i}" for i in range(n)],
                              "answer": [str(i % 10) for i in range(n)],
                              "kind": ["even" if i % 2 == 0 else "odd" for i in range(n)]})


class Recorder:
    """A reward function that records what it was given and scores len(completion)."""

    def __init__(self):
        self.calls = []
        self.__name__ = "recorder"

    def __call__(self, prompts, completions, answer, **kwargs):
        self.calls.append({"prompts": prompts, "completions": completions, "answer": answer,
                           **kwargs})
        return [float(len(c)) for c in completions]


def test_reward_functions_are_called_as_trl_calls_them(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rec = Recorder()
    task = RewardTask(_prompts(), [rec])
    data = task.dataset(6, seed=1)
    scored = score_rollouts(model, tokenizer, task, data, n_samples=3, max_new_tokens=8, seed=2)
    (call,) = rec.calls
    assert set(call) == {"prompts", "completions", "answer", "kind", "completion_ids",
                         "trainer_state", "log_extra", "log_metric"}
    n = 6 * 3
    assert all(len(call[k]) == n for k in ("prompts", "completions", "answer", "kind",
                                           "completion_ids"))
    # every column repeated per completion, aligned with its prompt
    assert call["prompts"][::3] == list(data["prompt"])
    assert call["answer"][::3] == list(data["answer"]) == call["answer"][2::3]
    for ids, text in zip(call["completion_ids"], call["completions"]):
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert 1 <= len(ids) <= 8
    call["log_extra"]("x", [1])  # no-ops outside a trainer
    assert call["trainer_state"].global_step == 0
    expected = torch.tensor([len(c) for c in call["completions"]], dtype=torch.float64)
    assert torch.equal(scored.rewards, expected.view(6, 3))
    assert scored.labels is None
    est = mean_reward(model, tokenizer, task, n_prompts=6, n_samples=3, max_new_tokens=8,
                      seed=1)
    assert est.n == 18 and est.mean == pytest.approx(
        float(sum(len(c) for c in rec.calls[-1]["completions"])) / 18)


def test_weights_sum_the_functions_and_none_counts_as_missing(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer

    def one(completions, **kwargs):
        return [1.0] * len(completions)

    def some_missing(prompts, completions, **kwargs):
        return [None if i % 2 else 4.0 for i in range(len(completions))]

    task = RewardTask(_prompts(), [one, some_missing], reward_weights=[2, 0.5])
    scored = score_rollouts(model, tokenizer, task, task.dataset(4), n_samples=2,
                            max_new_tokens=4)
    assert scored.rewards.flatten().tolist() == [4.0, 2.0] * 4  # 2*1 + 0.5*4, and 2*1 + nan


def test_per_context_rewards_from_the_label_column(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = RewardTask(_prompts(), Recorder(), label_column="kind")
    assert task.labels == ("even", "odd")
    data = task.dataset(8, seed=0, labels=["odd", "even"])
    assert list(data["kind"]) == ["odd", "even"] * 4
    assert len(set(data["prompt"])) == 8  # drawn without replacement while there are enough
    per = task_rewards(model, tokenizer, task, ["odd", "even"], n_prompts=4, n_samples=2,
                       max_new_tokens=6, seed=5)
    assert list(per) == ["odd", "even"] and all(e.n == 8 for e in per.values())
    pooled = mean_reward(model, tokenizer, task, n_prompts=8, n_samples=2, max_new_tokens=6,
                         seed=5)
    assert math.isfinite(pooled.mean)
    with pytest.raises(ValueError, match=r"subset of this task's contexts \['even', 'odd'\]"):
        task.dataset(4, labels=["odd", "prime"])
    with pytest.raises(ValueError, match="label_column=None"):
        RewardTask(_prompts(), Recorder()).dataset(4, labels=["odd"])


def test_conversational_prompts_go_through_the_chat_template():
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    seen = {}

    def reward(prompts, completions, **kwargs):
        seen["completions"] = completions
        return [float(len(c[0]["content"])) for c in completions]

    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"<B> q{i}"}]
                                         for i in range(3)]})
    task = RewardTask(chat, reward)
    with pytest.raises(ValueError, match="no chat template"):
        score_rollouts(model, tokenizer, task, task.dataset(3), n_samples=1, max_new_tokens=4)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}=> {% endif %}")
    scored = score_rollouts(model, tokenizer, task, task.dataset(3), n_samples=2,
                            max_new_tokens=4)
    assert scored.rewards.shape == (3, 2)
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
               for c in seen["completions"])


def test_bad_reward_tasks_are_refused_with_the_field_named(model_and_tokenizer):
    with pytest.raises(ValueError, match="'prompt' column"):
        RewardTask(Dataset.from_dict({"text": ["a"]}), Recorder())
    with pytest.raises(ValueError, match="'prompt' column"):
        RewardTask([], Recorder())
    with pytest.raises(ValueError, match="reward models .* are not supported"):
        RewardTask(_prompts(), "some-org/reward-model")
    with pytest.raises(ValueError, match="reward models .* are not supported"):
        RewardTask(_prompts(), [torch.nn.Linear(2, 1)])
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2"):
        RewardTask(_prompts(), [Recorder(), Recorder()], reward_weights=[1.0])
    with pytest.raises(ValueError, match=r"label_column='task' is not a column"):
        RewardTask(_prompts(), Recorder(), label_column="task")
    model, tokenizer = model_and_tokenizer
    short = RewardTask(_prompts(), lambda prompts, completions, **kw: [0.0])
    with pytest.raises(ValueError, match="returned 1 rewards for 4 completions"):
        mean_reward(model, tokenizer, short, n_prompts=2, n_samples=2, max_new_tokens=2)
    # a list of row dicts works as well as a Dataset
    rows = RewardTask([{"prompt": "<A> x", "kind": "a"}], Recorder(), label_column="kind")
    assert rows.labels == ("a",) and len(rows.dataset(3)) == 3


def test_task_spec_resolves_a_scripts_function_and_refuses_the_rest(tmp_path):
    task = load_task_spec(f"{EXAMPLE}:reward_task")  # importing it does not train
    assert isinstance(task, RewardTask) and task.labels == ("digits", "vowels")
    module = tmp_path / "my_rewards.py"
    module.write_text("from sae_shards.analysis.reward_task import RewardTask\n"
                      "TASK = RewardTask([{'prompt': 'a'}], lambda prompts, completions, **k: "
                      "[0.0] * len(completions))\n"
                      "NOT_A_TASK = 3\n")
    assert load_task_spec(f"{module}:TASK").name == "user"
    with pytest.raises(ValueError, match="is of type int, not a RewardTask"):
        load_task_spec(f"{module}:NOT_A_TASK")
    with pytest.raises(ValueError, match="has no 'MISSING'"):
        load_task_spec(f"{module}:MISSING")
    with pytest.raises(ValueError, match="no file"):
        load_task_spec(f"{tmp_path}/absent.py:TASK")
    with pytest.raises(ValueError, match="give MODULE:NAME or FILE.py:NAME"):
        load_task_spec("just_a_name")
    with pytest.raises(ValueError, match="cannot import"):
        load_task_spec("no_such_module_here:TASK")
