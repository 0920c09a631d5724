"""Built-in task rewards, datasets, the labels they log to TRL, and name errors."""

from __future__ import annotations

import pytest

from sae_shards.recipe.models import build_tokenizer
from sae_shards.recipe.tasks import build_task


def test_a_one_label_task_of_its_own_class_is_built_with_its_name_as_label(monkeypatch):
    """A new built-in task subclassing Task (docs/architecture.md, "Extending it") was built
    without its label: a bare TypeError from the dataclass."""
    import dataclasses

    from sae_shards.recipe import tasks

    @dataclasses.dataclass(frozen=True)
    class Contains(tasks.Task):
        pass

    monkeypatch.setitem(tasks.BUILT_IN_TASKS, "contains", Contains)
    task = tasks.build_task("contains", target_chars="q")
    assert type(task) is Contains and task.label == "contains" and task.target_chars == "q"


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
    with pytest.raises(ValueError, match="task.options.tag"):
        build_task("letters", tag="<Z>")
    with pytest.raises(ValueError, match="task.options.target_length"):
        build_task("letters", target_length=0)
    with pytest.raises(ValueError, match=r"\['task.options.no_such_field'\] are not options of "
                                         r"task 'letters'; it takes \[.*target_chars"):
        build_task("letters", no_such_field=1)
    with pytest.raises(ValueError, match=r"task.options.bogus"):
        build_task("multiskill", bogus=1)


@pytest.mark.parametrize("name", ["letters", "multiskill", "multiskill_null"])
def test_rewards_log_each_batch_labels_once(name):
    task = build_task(name, target_length=2)
    logged = []
    labels = ["letters"] * 2 if name == "letters" else ["A", "B"]
    out = task.reward_funcs[0](prompts=["<A> x", "<B> y"], completions=["a", "zz"], task=labels,
                               log_extra=lambda column, values: logged.append((column, values)))
    assert len(out) == 2 and all(0.0 <= r <= 1.0 for r in out)
    assert logged == [("task", labels)]  # TRL's completion log gets each batch's labels once
    # without TRL's log_extra (a direct call) the reward is the same
    assert task.reward_funcs[0](prompts=["<A> x", "<B> y"], completions=["a", "zz"],
                                task=labels) == out


def test_energy_shares_of_labelled_samples():
    import torch

    from sae_shards.recipe.balance import energy_shares, sample_energy

    # sample energies (sum over both targets of ||x||^2): 1+4=5, 9, 16, 0+1=1
    samples = {"w": torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]], [[4.0, 0.0]], [[0.0, 0.0]]]),
               "b": torch.tensor([[2.0], [0.0], [0.0], [1.0]])}
    assert sample_energy(samples).tolist() == [5.0, 9.0, 16.0, 1.0]
    shares = energy_shares(samples, ["A", "B", "A", ["C"]])
    assert shares == pytest.approx({"A": 21 / 31, "B": 9 / 31, "C": 1 / 31})
    assert list(shares) == ["A", "B", "C"]
    # a multi-task sample (a mixed step) counts under its joined labels
    assert energy_shares(samples, [["B", "A"], "B", "A", "C"]) == pytest.approx(
        {"A": 16 / 31, "A+B": 5 / 31, "B": 9 / 31, "C": 1 / 31})
    assert energy_shares({"w": torch.zeros(2, 3)}, ["A", "B"]) == {"A": 0.0, "B": 0.0}
    with pytest.raises(ValueError, match="3 labels for 4 samples"):
        energy_shares(samples, ["A", "B", "C"])
    with pytest.raises(ValueError, match="same number of samples"):
        energy_shares({"w": torch.zeros(2, 3), "b": torch.zeros(3)}, ["A", "B"])


def _word_tokenizer():
    """A whole-word tokenizer (every word, space and punctuation mark one token), like a real
    model's multi-character vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sae_shards.recipe.tasks import REFERENCE_TEXT

    words = sorted(set(REFERENCE_TEXT.replace(",", " , ").replace(".", " . ").split()))
    vocab = {w: i for i, w in enumerate(["<unk>", " ", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_target_length_is_the_completion_budget_in_characters():
    """Rewards count characters, TRL's budget counts tokens: the default target converts one
    into the other, exactly for the character tokenizer, ~5x for whole words."""
    from sae_shards.recipe.tasks import REFERENCE_TEXT, chars_per_token, default_target_length

    assert chars_per_token(build_tokenizer()) == 1.0
    assert default_target_length(16, build_tokenizer()) == 16
    words = _word_tokenizer()
    n_tokens = len(words(REFERENCE_TEXT, add_special_tokens=False)["input_ids"])
    assert chars_per_token(words) == len(REFERENCE_TEXT) / n_tokens > 3
    assert default_target_length(16, words) == round(16 * len(REFERENCE_TEXT) / n_tokens)


def test_the_built_in_tasks_are_the_task_configs_and_one_label_tasks_have_one_label():
    """``task.name`` is validated against ``TASK_NAMES`` (before anything is written); each has
    its ``configs/task/`` file, and ``ONE_LABEL_TASKS`` (which evaluate refuses) are exactly
    those whose prompts carry one label."""
    from sae_shards.cli import CONFIG_DIR
    from sae_shards.recipe.tasks import BUILT_IN_TASKS
    from sae_shards.run.config import ONE_LABEL_TASKS, TASK_NAMES

    assert sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml")) == sorted(TASK_NAMES)
    assert sorted(BUILT_IN_TASKS) == sorted(TASK_NAMES)  # one table of classes, one of names
    for name in TASK_NAMES:
        labels = set(build_task(name).dataset(64)["task"])
        assert (len(labels) == 1) == (name in ONE_LABEL_TASKS), name


def test_reward_characters_the_tokenizer_cannot_write_are_named(caplog):
    """The tiny tokenizer has no 'é': a letters task rewarding it alone can never be rewarded
    (the run once trained to its end on zero rewards); beside a writable one, a warning."""
    from sae_shards.recipe.tasks import check_writable

    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match=r"task.options.target_chars: the policy's tokenizer "
                                         r"writes none .* \('é'; encoded and decoded: 'é' -> "
                                         r"'<unk>'\)"):
        check_writable(build_task("letters", target_chars="é"), tokenizer)
    with caplog.at_level("WARNING", logger="sae_shards.recipe.tasks"):
        check_writable(build_task("letters", target_chars="aé"), tokenizer)
        check_writable(build_task("letters", target_chars="aé"), tokenizer)  # said once
    assert caplog.text.count("cannot write 1 of the characters that earn the reward") == 1
    caplog.clear()
    for name in ("letters", "multiskill", "multiskill_null"):  # the built-in classes: all written
        check_writable(build_task(name), tokenizer)
    assert not caplog.records


@pytest.mark.parametrize("name, options, message", [
    ("letters", {"target_length": "abc"},
     r"task.options.target_length: expected int, got str 'abc'"),
    ("letters", {"prompt_length": 5}, r"task.options.prompt_length: expected a list of 2 \(int, "
                                      r"int\), got 5"),
    ("letters", {"prompt_length": [2, "x"]}, r"task.options.prompt_length\[1\]: expected int"),
    ("multiskill", {"reward_scale": {"A": "big"}}, r"task.options.reward_scale.A: expected float"),
    ("multiskill", {"schedule": "sorted"}, r"task.options.schedule='sorted' is not one of"),
    ("multiskill_null", {"bogus": 1}, r"\['task.options.bogus'\] are not options of task"),
    ("letters", {"target_chars": 123}, r"task.options.target_chars: expected str, got int 123 "
                                       r"\(quote it to keep it text: "
                                       r"task.options.target_chars='123'"),
])
def test_a_task_option_of_the_wrong_type_names_the_option(name, options, message):
    """Each option is checked against its field's type before the task is built: a wrong one
    was a bare TypeError from inside the task ('<' not supported between 'str' and 'int')."""
    with pytest.raises(ValueError, match=message):
        build_task(name, **options)


def test_task_options_from_json_or_hydra_lists_build_the_same_task():
    """A saved config.json holds prompt_length as a list; it builds the task a tuple does."""
    assert build_task("letters", prompt_length=[2, 3]) == build_task("letters", prompt_length=(2, 3))
    assert build_task("multiskill", reward_scale={"A": 2}).reward_scale == {"A": 2.0}


def test_a_variable_length_tuple_field_is_checked_item_by_item():
    """``tuple[int, ...]`` takes any length (it raised AttributeError: no field uses it yet)."""
    import dataclasses

    from sae_shards.run.schema import coerce_fields

    @dataclasses.dataclass
    class Sizes:
        sizes: tuple[int, ...] = ()

    assert coerce_fields(Sizes, {"sizes": [1, 2, 3]}, "x.") == {"sizes": (1, 2, 3)}
    with pytest.raises(ValueError, match=r"x.sizes\[1\]: expected int, got str 'a'"):
        coerce_fields(Sizes, {"sizes": [1, "a"]}, "x.")
    for value in (3, "ab"):  # not a list at all
        with pytest.raises(ValueError, match=r"x.sizes: expected a list of int, got"):
            coerce_fields(Sizes, {"sizes": value}, "x.")


@pytest.mark.parametrize("name", ["letters", "multiskill"])
@pytest.mark.parametrize("options, message", [
    ({"prompt_chars": ""}, r"task.options.prompt_chars is empty"),
    ({"target_length": 0}, r"task.options.target_length=0 must be >= 1"),
    ({"prompt_length": (5, 2)}, r"task.options.prompt_length=\(5, 2\) must satisfy"),
])
def test_every_character_task_refuses_the_prompt_options_it_cannot_draw(name, options, message):
    """letters accepted an empty ``prompt_chars``: its dataset then failed inside random.choice
    (IndexError, 'Cannot choose from an empty sequence'). Both task classes check the options
    they share in one place."""
    with pytest.raises(ValueError, match=message):
        build_task(name, **options)
