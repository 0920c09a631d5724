"""A user's own reward, handed back for analysis (``RewardTask``): called as TRL calls it,
per-context estimates, bad input refused early, and ``--task`` resolving a script's object."""

from __future__ import annotations

import asyncio
import html
import math
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from sae_shards.analysis.interventions import (dose_response, mean_reward, score_rollouts,
                                               task_rewards)
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
    assert call["trainer_state"].global_step == 0  # no training_steps given
    score_rollouts(model, tokenizer, task, data, n_samples=1, max_new_tokens=2,
                   training_steps=12)
    state = rec.calls[-1]["trainer_state"]
    assert state.global_step == state.max_steps == 12  # the end of the run's training
    expected = torch.tensor([len(c) for c in call["completions"]], dtype=torch.float64)
    assert torch.equal(scored.rewards, expected.view(6, 3))
    rec.calls.clear()
    assert scored.labels is None
    est = mean_reward(model, tokenizer, task, n_prompts=6, n_samples=3, max_new_tokens=8,
                      seed=1)
    assert est.n == 18 and est.mean == pytest.approx(
        float(sum(len(c) for c in rec.calls[-1]["completions"])) / 18)
    score_rollouts(model, tokenizer, task, data, n_samples=3, max_new_tokens=8, seed=2)
    assert rec.calls[-1]["completions"] == call["completions"]  # same prompts and seed


def test_reward_functions_get_the_runs_batches_of_whole_prompt_groups(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    whole, batched = Recorder(), Recorder()
    data = RewardTask(_prompts(), [whole]).dataset(6, seed=1)
    one = score_rollouts(model, tokenizer, RewardTask(_prompts(), [whole]), data, n_samples=3,
                         max_new_tokens=8, seed=2)
    # TRL's per-process generation batch of 8 completions: whole groups of 3, so 6 per call
    parts = score_rollouts(model, tokenizer, RewardTask(_prompts(), [batched]), data,
                           n_samples=3, max_new_tokens=8, seed=2, reward_batch=8)
    assert [len(c["completions"]) for c in batched.calls] == [6, 6, 6]
    (call,) = whole.calls
    for key in ("prompts", "completions", "answer", "kind", "completion_ids"):
        assert [x for c in batched.calls for x in c[key]] == call[key]  # sliced together
    assert torch.equal(parts.rewards, one.rewards)
    batched.calls.clear()  # a batch smaller than a group still holds one whole group
    score_rollouts(model, tokenizer, RewardTask(_prompts(), [batched]), data, n_samples=3,
                   max_new_tokens=2, seed=2, reward_batch=2)
    assert [len(c["completions"]) for c in batched.calls] == [3] * 6
    with pytest.raises(ValueError, match="reward_batch=0"):
        score_rollouts(model, tokenizer, RewardTask(_prompts(), [batched]), data, reward_batch=0)


def test_the_reports_first_try_of_the_reward_gives_it_whole_prompt_groups(model_and_tokenizer):
    """analyze tries the reward on two prompts before its estimates; it gave them one
    completion each, so a reward that normalises within a prompt's group saw groups of one."""
    from sae_shards.analysis.interventions import N_SAMPLES
    from sae_shards.analysis.report import _check_scorer
    from sae_shards.analysis.shards import RunModels

    model, tokenizer = model_and_tokenizer
    recorder = Recorder()
    task = RewardTask(_prompts(), [recorder])
    _check_scorer(RunModels(model, model, tokenizer, None), task, [], {})
    (call,) = recorder.calls
    assert len(set(call["prompts"])) == 2 and len(call["completions"]) == 2 * N_SAMPLES
    assert all(call["prompts"].count(p) == N_SAMPLES for p in call["prompts"])


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
    # a completion no function scores is unscorable: left out of the means, as TRL does
    alone = RewardTask(_prompts(), [some_missing])
    rewards = score_rollouts(model, tokenizer, alone, alone.dataset(4), n_samples=2,
                             max_new_tokens=4).rewards
    assert rewards[:, 0].tolist() == [4.0] * 4 and rewards[:, 1].isnan().all()
    est = mean_reward(model, tokenizer, alone, n_prompts=4, n_samples=2, max_new_tokens=4)
    assert est.mean == 4.0 and est.n == 4 and est.stderr == 0.0
    both = RewardTask(_prompts(), [some_missing, some_missing])
    assert score_rollouts(model, tokenizer, both, both.dataset(2), n_samples=2,
                          max_new_tokens=4).rewards[:, 1].isnan().all()


def test_async_reward_functions_are_awaited_and_failures_name_the_function(
        model_and_tokenizer):
    from sae_shards.analysis.interventions import RewardFunctionError

    model, tokenizer = model_and_tokenizer

    async def later(prompts, completions, **kwargs):
        return [2.0] * len(completions)

    task = RewardTask(_prompts(), later)
    assert mean_reward(model, tokenizer, task, n_prompts=2, n_samples=2,
                       max_new_tokens=3).mean == 2.0

    async def in_a_notebook():  # a running event loop, as in Jupyter
        return mean_reward(model, tokenizer, task, n_prompts=2, n_samples=1, max_new_tokens=2)

    assert asyncio.run(in_a_notebook()).mean == 2.0

    def needs_a_column(prompts, completions, solution, **kwargs):
        return [0.0] * len(completions)

    broken = RewardTask(_prompts(), needs_a_column)
    with pytest.raises(RewardFunctionError, match=r"'needs_a_column' failed when called as TRL "
                                                  r"calls it, with keyword arguments \['answer', "
                                                  r".*TypeError: .*'solution' \(a column "
                                                  r"it reads missing"):
        mean_reward(model, tokenizer, broken, n_prompts=2, n_samples=1, max_new_tokens=2)

    # audit 106 F5: the hint fits the error (it was "a column missing?" for every one of them)
    def no_kwargs(prompts, completions):
        return [0.0] * len(completions)

    def unknown_context(prompts, completions, kind, **kwargs):
        return [{"even": 1.0}[k] for k in kind]

    for fn, hint in ((no_kwargs, r"unexpected keyword argument .* give it \*\*kwargs\)"),
                     (unknown_context, r"KeyError: 'odd' \(a key it looks up is not there")):
        with pytest.raises(RewardFunctionError, match=hint):
            mean_reward(model, tokenizer, RewardTask(_prompts(), fn), n_prompts=2, n_samples=1,
                        max_new_tokens=2)


def test_the_runs_sampling_settings_are_used(model_and_tokenizer):
    """max_new_tokens bounds the completions the reward sees; top_k=1 samples greedily, so
    every sample of a prompt is the same; generation_kwargs override the rest, as in TRL; the
    model's own sampling defaults do not leak in (TRL's repetition_penalty=1.0 is 1.0)."""
    model, tokenizer = model_and_tokenizer
    rec = Recorder()
    task = RewardTask(_prompts(), rec)
    score_rollouts(model, tokenizer, task, task.dataset(3), n_samples=4, max_new_tokens=5,
                   top_k=1)
    call = rec.calls[-1]
    assert all(len(ids) <= 5 for ids in call["completion_ids"])
    for i in range(3):
        assert len(set(call["completions"][4 * i: 4 * i + 4])) == 1
    score_rollouts(model, tokenizer, task, task.dataset(3), n_samples=2, max_new_tokens=9,
                   generation_kwargs={"max_new_tokens": 2})
    assert all(len(ids) <= 2 for ids in rec.calls[-1]["completion_ids"])

    def completions(**kwargs):
        score_rollouts(model, tokenizer, task, task.dataset(4), n_samples=4, max_new_tokens=12,
                       top_k=3, **kwargs)
        return rec.calls[-1]["completions"]

    plain = completions()
    previous = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 5.0  # a checkpoint's own default
    try:
        assert completions(repetition_penalty=1.0) == plain
        assert completions(repetition_penalty=5.0) != plain  # the setting does act
    finally:
        model.generation_config.repetition_penalty = previous


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


def test_mean_reward_scores_the_prompts_the_report_scores(model_and_tokenizer):
    """The notebook's mean_reward is the report's alpha-0 reward for the same settings: the
    same prompts, one context after another (a dataset of 10 "even" prompts and 2 "odd" ones,
    where the first 4 of a shuffle would hold "even" ones alone)."""
    model, tokenizer = model_and_tokenizer
    data = Dataset.from_dict({"prompt": [f"<A> p{i}" for i in range(12)],
                              "answer": [str(i % 10) for i in range(12)],
                              "kind": ["odd" if i in (3, 7) else "even" for i in range(12)]})
    def by_prompt(prompts, completions, answer, **kwargs):  # each prompt its own reward
        return [float(a) for a in answer]

    task = RewardTask(data, by_prompt, label_column="kind")
    settings = dict(n_prompts=4, n_samples=2, max_new_tokens=6, seed=1)
    pooled = mean_reward(model, tokenizer, task, **settings)
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()
            if n.endswith("q_proj.weight")}
    curve = dose_response(model, tokenizer, task, zero, alphas=[0.0], **settings)
    assert sorted(curve.shard_by_label) == ["even", "odd"]
    assert (pooled.mean, pooled.stderr, pooled.n) == (
        curve.reward_shard[0], curve.stderr_shard[0], curve.n)


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


def test_a_script_that_trains_on_import_is_stopped_before_it_writes(tmp_path):
    """A script whose training is not under ``if __name__ == "__main__":`` starts a run when
    --task imports it: ShardCallback refuses, before the run directory is touched."""
    from sae_shards import ShardCallback

    script = tmp_path / "unguarded.py"
    run = tmp_path / "run"
    script.write_text("from sae_shards import ShardCallback\n"
                      f"callback = ShardCallback(run_dir={str(run)!r}, overwrite=True)\n"
                      "TASK = None\n")
    with pytest.raises(ValueError, match=r"keep the script's training under `if __name__ == "
                                         r"\"__main__\":`.*Nothing was trained or written"):
        load_task_spec(f"{script}:TASK")
    assert not run.exists()
    ShardCallback(run_dir=tmp_path / "later")  # outside the import: as usual


def test_task_spec_imports_scripts_as_python_would_and_names_their_failures(tmp_path):
    script = tmp_path / "typed.py"  # dataclasses with postponed annotations need sys.modules
    script.write_text("from __future__ import annotations\n"
                      "from dataclasses import dataclass\n"
                      "from sae_shards.analysis.reward_task import RewardTask\n"
                      "@dataclass\nclass Scorer:\n    scale: float = 1.0\n"
                      "    def __call__(self, prompts, completions, **kw):\n"
                      "        return [self.scale] * len(completions)\n"
                      "def task():\n    return RewardTask([{'prompt': 'a'}], Scorer(2.0))\n")
    loaded = load_task_spec(f"{script}:task")
    assert loaded.reward_funcs[0].scale == 2.0
    assert loaded.name == f"{script}:task"  # reports name it as given (audit 138 F12: 'user')
    named = tmp_path / "named.py"
    named.write_text("from sae_shards.analysis.reward_task import RewardTask\n"
                     "TASK = RewardTask([{'prompt': 'a'}], lambda completions, **kw: [0.0], "
                     "name='vowels')\n")
    assert load_task_spec(f"{named}:TASK").name == "vowels"  # its own name kept
    raising = tmp_path / "raising.py"
    raising.write_text("import argparse\nargparse.ArgumentParser().parse_args(['--nope'])\n")
    with pytest.raises(ValueError, match=r"importing .*raising.py failed: SystemExit: 2 \(the "
                                         r"script runs as a module"):
        load_task_spec(f"{raising}:TASK")
    factory = tmp_path / "factory.py"
    factory.write_text("def task():\n    raise RuntimeError('no data here')\n")
    with pytest.raises(ValueError, match=r"task\(\) failed: RuntimeError: no data here"):
        load_task_spec(f"{factory}:task")


def test_task_spec_resolves_a_scripts_function_and_refuses_the_rest(tmp_path, monkeypatch):
    task = load_task_spec(f"{EXAMPLE}:reward_task")  # importing it does not train
    assert isinstance(task, RewardTask) and task.labels == ("digits", "vowels")
    module = tmp_path / "my_rewards.py"
    module.write_text("from sae_shards.analysis.reward_task import RewardTask\n"
                      "TASK = RewardTask([{'prompt': 'a'}], lambda prompts, completions, **k: "
                      "[0.0] * len(completions))\n"
                      "NOT_A_TASK = 3\n")
    assert load_task_spec(f"{module}:TASK").name == f"{module}:TASK"  # named as given
    with pytest.raises(ValueError, match="is of type int, not a RewardTask"):
        load_task_spec(f"{module}:NOT_A_TASK")
    with pytest.raises(ValueError, match="has no 'MISSING'; its RewardTasks and functions of "
                                         "no arguments: TASK$"):
        load_task_spec(f"{module}:MISSING")
    with open(module, "a") as f:  # a typo of a task function's name: the closest is offered
        f.write("def reward_task():\n    return TASK\n"
                "def helper(x):\n    return x\n")
    with pytest.raises(ValueError, match="has no 'reward_tsk'; did you mean 'reward_task'\\? "
                                         "its RewardTasks and functions of no arguments: TASK, "
                                         "reward_task$"):
        load_task_spec(f"{module}:reward_tsk")
    empty = tmp_path / "no_tasks.py"
    empty.write_text("from os.path import join\nX = 1\n")
    with pytest.raises(ValueError, match="it defines no RewardTask and no function of no "
                                         "arguments"):
        load_task_spec(f"{empty}:reward_task")
    with pytest.raises(ValueError, match="no file"):
        load_task_spec(f"{tmp_path}/absent.py:TASK")
    with pytest.raises(ValueError, match="give MODULE:NAME or FILE.py:NAME"):
        load_task_spec("just_a_name")
    with pytest.raises(ValueError, match=r"cannot import 'no_such_module_here' .*; for a "
                                         r"script give its file: --task "
                                         r"path/to/no_such_module_here.py:TASK"):
        load_task_spec("no_such_module_here:TASK")
    monkeypatch.chdir(tmp_path)  # MODULE:NAME from the script's own directory, as python -m
    assert load_task_spec("my_rewards:TASK").name == "my_rewards:TASK"  # as given
    functions = tmp_path / "functions.py"
    functions.write_text("from datasets import Dataset\n"
                         "def reward(prompts, completions, **kw):\n    return [0.0]\n"
                         "def make_data():\n    return Dataset.from_dict({'prompt': ['a']})\n")
    with pytest.raises(ValueError, match=r"reward is a function that takes arguments"):
        load_task_spec(f"{functions}:reward")
    with pytest.raises(ValueError, match=r"make_data\(\) returned a Dataset, not a RewardTask"):
        load_task_spec(f"{functions}:make_data")


def _length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def _vowels(prompts, completions, **kwargs):
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]


def _first_prompt_unscored(prompts, completions, **kwargs):
    return [None if p == prompts[0] else 1.0 for p in prompts]


def _nothing(prompts, completions, **kwargs):
    return [None] * len(completions)


def test_a_reward_task_unlike_the_runs_is_noted(model_and_tokenizer, short_run_dir):
    """Audit 106 F7, F17, F6: a task whose functions were the run's in another order (each weight
    then on another function), other functions, prompts of the other form (a chat-trained
    policy sampled on text), or a reward that scores nothing (a report of NaN told to raise
    --n-prompts) was taken without a word. Checked against rollouts.jsonl's first row; a run
    analysed with its own built-in task gets no note."""
    import functools
    import json
    from types import SimpleNamespace

    from sae_shards.analysis.report import _check_scorer, _unlike_the_run, together_line
    from sae_shards.analysis.shards import load_run_models

    recorded = {"reward_funcs": {"_length": [1.0], "_vowels": [0.0]}, "prompts": ["<A> p0"]}
    assert _unlike_the_run(RewardTask(_prompts(), [_length, _vowels]), recorded) == []
    assert _unlike_the_run(RewardTask(_prompts(), [functools.partial(_length), _vowels]),
                           recorded) == []  # TRL's name of a partial: its function's
    swapped, = _unlike_the_run(RewardTask(_prompts(), [_vowels, _length]), recorded)
    assert "the same names in another order, so each weight may apply to another" in swapped
    other, = _unlike_the_run(RewardTask(_prompts(), [_length, _nothing]), recorded)
    assert other.endswith("['_length', '_nothing']: unless they are the same rewards under "
                          "other names (a wrapper, a renamed function), the rewards below are "
                          "not the run's")
    # audit 107 F4: TRL logs functions of one name as one column: the run's own two partials
    one_name = {"reward_funcs": {"_length": [1.0]}, "prompts": ["<A> p0"]}
    assert _unlike_the_run(RewardTask(_prompts(), [functools.partial(_length, scale=1),
                                                   functools.partial(_length, scale=2)]),
                           one_name) == []
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": "p0"}]]})
    to_text, = _unlike_the_run(RewardTask(_prompts(), [_length, _vowels]),
                               {**recorded, "prompts": [[{"role": "user", "content": "p0"}]]})
    assert to_text.startswith("the run trained on conversational prompts (message lists), the "
                              "reward task gives plain-text prompts") and "chat template" in to_text
    to_chat, = _unlike_the_run(RewardTask(chat, [_length, _vowels]), recorded)
    assert to_chat.startswith("the run trained on plain-text prompts")

    model, tokenizer = model_and_tokenizer
    models = SimpleNamespace(initial=model, tokenizer=tokenizer)
    note = _check_scorer(models, RewardTask(_prompts(), [_nothing]), [], {"max_new_tokens": 2})
    assert "scored none of the 8 completions of its first two prompts" in note
    # audit 110 F12-F14: a reward leaving one prompt's completions unscored scored some; a first
    # row without reward_funcs (an earlier version's) and a run of one context get no note
    assert _check_scorer(models, RewardTask(_prompts(), [_first_prompt_unscored]), [],
                         {"max_new_tokens": 2}) == ""
    assert _unlike_the_run(RewardTask(_prompts(), [_length]), {"prompts": ["<A> p0"]}) == []
    assert _check_scorer(models, RewardTask(_prompts(), [_length]), [["even"], ["even"]],
                         {"max_new_tokens": 2}) == ""
    # F21: a run with contexts, a task without label_column: figures per context were possible
    run_labels = [["even"], ["odd"]]
    note = _check_scorer(models, RewardTask(_prompts(), [_length]), run_labels,
                         {"max_new_tokens": 2})
    assert "the run's rollouts carry contexts ['even', 'odd'], the reward task none" in (
        html.unescape(note))
    assert _check_scorer(models, RewardTask(_prompts(), [_length], label_column="kind"),
                         run_labels, {"max_new_tokens": 2}) == ""

    own = load_run_models(short_run_dir)  # a run of the built-in task, with its own reward
    first = json.loads((short_run_dir / "rollouts.jsonl").open().readline())
    assert _unlike_the_run(own.task, first) == []
    assert _check_scorer(own, own.task, [], {"max_new_tokens": 2}, None, first) == ""

    line = together_line({"together": {"shards": [3], "shares": {
        k: [None, None] for k in ("removed", "kept", "removed_whole")},
        "changes": {"run": [None, None]}}})
    assert "no prompt had completions scored under both the initial and the final" in line
    assert "--n-prompts" not in line


def test_an_error_of_the_task_functions_own_making_names_the_task_spec(tmp_path):
    """Audit 106 F4: a RewardTask refusing a field, or a ValueError of the user's own code, in the
    function --task names was printed without saying which --task it came from."""
    own = tmp_path / "own_errors.py"
    own.write_text("from sae_shards.analysis.reward_task import RewardTask\n"
                   "def bad_column():\n"
                   "    return RewardTask([{'prompt': 'a'}], [len], label_column='context')\n"
                   "def own_error():\n"
                   "    raise ValueError('bad config in my own code')\n")
    for name, said in (("bad_column", "RewardTask.label_column='context'"),
                       ("own_error", "ValueError: bad config in my own code")):
        with pytest.raises(ValueError, match=rf"^--task '{re.escape(str(own))}:{name}': "
                                             rf"{name}\(\) failed: .*{re.escape(said)}"):
            load_task_spec(f"{own}:{name}")


def test_a_reward_tasks_prompts_are_drawn_in_its_seeds_shuffled_order():
    """RewardTask.dataset: n rows drawn without replacement in a seed-shuffled order (cycling
    after every row was drawn once), not the first n rows of the file: a dataset sorted by
    difficulty or context would otherwise give the report's dose-response a biased sample."""
    import random

    from sae_shards.analysis.reward_task import RewardTask

    rows = [{"prompt": f"p{i}", "k": i} for i in range(10)]
    task = RewardTask(rows, [lambda completions, **kw: [0.0] * len(completions)])
    order = list(range(10))
    random.Random(4).shuffle(order)
    got = task.dataset(13, seed=4)["k"]
    assert got == [order[i % 10] for i in range(13)]
    assert sorted(got[:10]) == list(range(10))  # without replacement
    assert task.dataset(5, seed=4)["k"] != task.dataset(5, seed=5)["k"]
