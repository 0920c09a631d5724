"""Tasks: prompts plus programmatic rewards for GRPO/RLOO, with each completion's label logged.

The built-in task ``letters`` asks for completions made of one character class (default: the
vowels ``aeiou``). Its reward is graded: the number of target characters in the completion over a
fixed ``target_length``, capped at 1. Dividing by a fixed length, not by the completion's own
length, means a short completion ("a<eos>") cannot score high, so the policy has to fill the whole
budget with target characters. A random tiny model over the ~80-token character vocabulary starts
near ``len(target_chars) / vocab`` (~0.06) and climbs steadily from there
(``trainers.DEFAULT_GRPO`` records what was measured).

The planted-shard task ``multiskill`` (``MultiSkillTask``) tags each prompt with one of several
tasks (``<A>``, ``<B>``, ...), each rewarding a different character class, and orders its dataset
as a schedule of optimizer steps: each step training on one task (``random``, ``blocks``) or on
prompt groups of every task at once (``mixed``); ``multiskill_null`` keeps the prompts, tags and
schedule but rewards every prompt alike. ``balance.energy_shares`` reports each task's share of
the gradient energy of labelled samples.

Reward functions follow TRL's signature ``fn(prompts, completions, **kwargs) -> list[float]``;
TRL passes every dataset column (here ``task``) as a kwarg list aligned with the completions, and
a ``log_extra(column, values)`` that adds a column to its completion log. Every built-in reward
function logs the ``task`` labels there (``log_labels``), which is how ``rollouts.jsonl`` and each
captured sample learn their task.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import string
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence, get_args

from datasets import Dataset

from sae_shards.recipe.models import TASK_TAGS
from sae_shards.run.config import TASK_NAMES
from sae_shards.run.schema import coerce_fields

log = logging.getLogger(__name__)

LABEL_COLUMN = "task"
"""Dataset column (and TRL completion-log column) holding each prompt's task label."""

RewardFunc = Callable[..., list[float]]
"""TRL reward function: ``fn(prompts, completions, **kwargs) -> list[float]``."""


def class_score(completion: str, chars: str, target_length: int) -> float:
    """The characters of ``completion`` in ``chars`` over ``target_length``, capped at 1 (graded,
    and a short completion cannot score high)."""
    return min(sum(ch in chars for ch in completion) / target_length, 1.0)


def random_body(rng: random.Random, chars: str, length: tuple[int, int]) -> str:
    """A prompt's random body: ``length`` (inclusive min, max) characters drawn from ``chars``."""
    n = rng.randint(*length)
    return "".join(rng.choice(chars) for _ in range(n))


def check_prompt_options(target_length: int, prompt_chars: str,
                         prompt_length: tuple[int, int]) -> None:
    """The options every character task shares, each refused naming its ``task.options`` field."""
    if target_length < 1:
        raise ValueError(f"task.options.target_length={target_length} must be >= 1")
    if not prompt_chars:
        raise ValueError("task.options.prompt_chars is empty; give the prompt characters")
    lo, hi = prompt_length
    if not 1 <= lo <= hi:
        raise ValueError(
            f"task.options.prompt_length={prompt_length} must satisfy 1 <= min <= max")



@dataclass(frozen=True)
class Task:
    """A character-class task: reward completions for consisting of ``target_chars``."""

    name: str
    """Task name, as given to ``build_task``."""
    label: str
    """Per-prompt task label (the dataset's ``task`` column; one label per skill)."""
    tag: str = "<A>"
    """Tag token that opens every prompt (one of ``models.TASK_TAGS``)."""
    target_chars: str = "aeiou"
    """Characters that earn reward. The policy's tokenizer must write them (``check_writable``:
    none of them is a config error, some a warning)."""
    target_length: int = 16
    """Target characters needed for reward 1 (``sae-shards train`` sets it to the completion
    budget in characters, ``rl.max_completion_length`` times the tokenizer's characters per token
    (``default_target_length``), unless given; in your own script, match your completion length)."""
    prompt_chars: str = string.ascii_lowercase
    """Characters the random prompt bodies are drawn from."""
    prompt_length: tuple[int, int] = (4, 8)
    """Inclusive (min, max) length of a prompt's random body."""

    scheduled: ClassVar[bool] = False
    """Whether the training dataset is a step schedule that GRPO must consume in order."""

    def __post_init__(self) -> None:
        if self.tag not in TASK_TAGS:
            raise ValueError(f"task.options.tag={self.tag!r} is not a tokenizer tag; use one of "
                             f"{list(TASK_TAGS)}")
        if not self.target_chars:
            raise ValueError("task.options.target_chars is empty; give the characters that earn "
                             "reward")
        check_prompt_options(self.target_length, self.prompt_chars, self.prompt_length)

    def dataset(self, n_prompts: int, seed: int = 0) -> Dataset:
        """``n_prompts`` plain-text prompts ``"<tag> body"`` with a ``task`` label column."""
        if n_prompts < 1:
            raise ValueError(f"n_prompts={n_prompts} must be >= 1")
        rng = random.Random(seed)
        prompts = [f"{self.tag} {random_body(rng, self.prompt_chars, self.prompt_length)}"
                   for _ in range(n_prompts)]
        return Dataset.from_dict({"prompt": prompts, "task": [self.label] * n_prompts})

    def score(self, completion: str) -> float:
        """Target characters in ``completion`` over ``target_length``, capped at 1."""
        return class_score(completion, self.target_chars, self.target_length)

    def char_class_reward(
        self, prompts: list[str], completions: list[str], **kwargs: Any
    ) -> list[float]:
        """TRL reward function: ``score`` of each completion (prompts unused)."""
        log_labels(kwargs)
        return [self.score(c) for c in completions]

    @property
    def reward_funcs(self) -> list[RewardFunc]:
        return [self.char_class_reward]


SKILLS: tuple[tuple[str, str], ...] = (
    ("vowels", "aeiou"),
    ("low digits", "01234"),
    ("punctuation", "!?.,;"),
    ("consonants", "bcdfg"),
    ("high digits", "56789"),
    ("more consonants", "hjklm"),
    ("symbols", "#$%&*"),
    ("late consonants", "npqrs"),
)
"""``(name, characters)`` rewarded by multiskill task k (tag ``TASK_TAGS[k]``, label
``"ABCDEFGH"[k]``).

Disjoint classes of five characters each, so every task starts from the same reward (~5/82 of
the characters a random tiny model emits) and a completion cannot serve two tasks at once."""

Schedule = Literal["random", "blocks", "mixed"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
"""Multiskill step schedules: one task drawn per step, contiguous blocks of one task, or every
step a mix of all tasks' prompt groups."""


@dataclass(frozen=True)
class MultiSkillTask:
    """Planted shards: prompts tagged with one of ``n_tasks`` tasks, one task per optimizer step.

    Task k opens its prompts with tag ``TASK_TAGS[k]`` (``<A>``, ``<B>``, ...), is labelled
    ``"ABCDEFGH"[k]`` in the dataset's ``task`` column (hence in rollouts.jsonl and
    ``StepMeta.task_labels``) and rewards the character class ``SKILLS[k][1]``: the number of the
    completion's characters in that class over ``target_length``, capped at 1, as ``letters``
    does (graded, and a short completion cannot score high). The policy has to read the tag to
    know which class pays, so the reinforced behaviour differs by task.

    ``multiskill_null`` is the null control: the same prompts, tags, labels and schedule, but
    every completion, whatever its tag, gets ``null_score``: the characters of all ``n_tasks``
    classes, each class counted up to ``target_length / n_tasks``, over ``target_length`` (1 for
    equal shares of every class). Reinforcement is then the same for all tags, so any tag
    separability in its deltas comes from the prompts themselves (a tag's embedding row only gets
    gradient in the steps whose prompts carry it), not from task-specific reward. Why not one
    fixed class: the null trains it on every step, four times as often as each real task trains
    its own, and saturated (all group rewards 1, so zero GRPO advantage and zero gradients) by
    ~step 150 of 300 at lr 5e-4; the quota mix plateaus at ~0.8 with a still-random policy, so
    its groups keep reward spread and its steps keep non-zero updates all run long.

    Measured (tiny qwen2, 1 torch thread, DEFAULT_GRPO but max_steps=300, schedule random, seed
    0; per-task mean reward, first -> last 20% of that task's steps; ~15 s of RL):
    lr 3e-4: A 0.07->0.29, B 0.07->0.17, C 0.07->0.23, D 0.06->0.17;
    lr 5e-4: A 0.08->0.75, B 0.07->0.32, C 0.07->0.45, D 0.06->0.27 (tag-conditioned: on tag-k
    prompts class k scores 0.4-0.8, other classes <= 0.11); null at lr 5e-4: 0.31-0.38 -> 0.81.

    The training dataset (``step_dataset``) is a schedule: consecutive runs of
    ``prompts_per_step`` prompts, each run one optimizer step; ``rl`` makes GRPO consume it in
    order (``scheduled``). Under ``random`` and ``blocks`` a step's prompts all carry one task;
    under ``mixed`` every step holds prompts of several tasks (``step_mixes``): with
    ``prompts_per_step = q * n_tasks + r``, q prompts of every task plus r of distinct tasks dealt
    from a shuffled deck (so over steps every task gets the same share), in a shuffled order. The
    step's rollouts then carry every task present (rollouts.jsonl's per-completion ``tasks``, the
    step's ``StepMeta.task_labels``), and per-event capture (``capture.granularity=group``) gives
    each prompt group its own sample with its own task.

    The planted experiment v2 (``configs/experiment/planted.yaml``: ``mixed``, a body-only
    policy on a tiny model with its readout scaled x4, lr 3e-5, 600 steps) has every task still
    rising over steps 301-600 on seeds 0 and 1 (e.g. seed 0: A 0.28->0.68, B 0.13->0.47,
    C 0.14->0.45, D 0.42->0.70; docs/usage.md has the table).

    ``reward_scale`` multiplies task k's reward by ``reward_scale[label]`` (default 1) in the
    training reward function (``skill_reward``; ``score`` stays unscaled, while rollouts.jsonl
    and anything scoring through ``reward_funcs`` see the scaled reward). Under GRPO's default
    ``scale_rewards=group`` each group's advantages are divided by their own std, which cancels
    any per-task factor, so a scale takes effect only with ``rl.extra.scale_rewards`` ``none``
    (advantage = reward - group mean, so it multiplies that task's gradient) or ``batch``;
    ``trainers.build_trainer`` refuses the combination that would silently ignore it.
    """

    name: str = "multiskill"
    """``multiskill`` (task-specific rewards) or ``multiskill_null`` (null control)."""
    n_tasks: int = 4
    """Number of tasks (2 to ``len(SKILLS)``); task k uses tag ``TASK_TAGS[k]``."""
    schedule: Schedule = "random"
    """``random``: each step's task drawn uniformly at random; ``blocks``: runs of ``block_len``
    steps of one task, cycling through all tasks in a fresh random order per cycle (a task never
    follows itself, so every run but possibly the last is exactly ``block_len`` steps);
    ``mixed``: every step holds prompts of several tasks, equally many of each as far as
    ``prompts_per_step`` allows (all tasks in every step once ``prompts_per_step >= n_tasks``),
    in a shuffled order (``step_mixes``)."""
    block_len: int = 10
    """Steps per block of the ``blocks`` schedule (unused by ``random``)."""
    seed: int = 0
    """Seed of the step schedule (prompt bodies use the job seed), so runs with different job
    seeds can share one schedule."""
    target_length: int = 16
    """Class characters needed for reward 1 (``sae-shards train`` sets it to the completion
    budget in characters, ``default_target_length``, unless given)."""
    prompt_chars: str = string.ascii_lowercase
    """Characters the random prompt bodies are drawn from."""
    prompt_length: tuple[int, int] = (4, 8)
    """Inclusive (min, max) length of a prompt's random body."""
    reward_scale: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-task reward multiplier ``{label: factor}`` (labels not named: 1), applied by the
    training reward function (``skill_reward``, or ``null_reward`` by prompt label) to balance
    the tasks' gradient energy. Effective only with ``rl.extra.scale_rewards`` ``none`` or
    ``batch`` (GRPO's default per-group std scaling cancels it; see the class docstring)."""

    scheduled: ClassVar[bool] = True
    """Whether the training dataset is a step schedule that GRPO must consume in order."""

    def __post_init__(self) -> None:
        if self.name not in ("multiskill", "multiskill_null"):
            raise ValueError(f"task.name={self.name!r}; use multiskill or multiskill_null")
        if not 2 <= self.n_tasks <= len(SKILLS):
            raise ValueError(
                f"task.options.n_tasks={self.n_tasks} must be between 2 and {len(SKILLS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"task.options.schedule={self.schedule!r} is unknown; use one of {list(SCHEDULES)}"
            )
        if self.block_len < 1:
            raise ValueError(f"task.options.block_len={self.block_len} must be >= 1")
        check_prompt_options(self.target_length, self.prompt_chars, self.prompt_length)
        unknown = sorted(set(self.reward_scale) - set(self.labels))
        if unknown:
            raise ValueError(f"task.options.reward_scale names tasks {unknown}; the labels are "
                             f"{list(self.labels)}")
        for label, factor in self.reward_scale.items():
            if not (isinstance(factor, (int, float)) and factor > 0):
                raise ValueError(f"task.options.reward_scale.{label}={factor!r} must be a "
                                 "positive number")

    @property
    def null(self) -> bool:
        """Whether this is the null control (``multiskill_null``)."""
        return self.name == "multiskill_null"

    @property
    def labels(self) -> tuple[str, ...]:
        """Task labels in tag order: ``("A", "B", ...)``."""
        return tuple("ABCDEFGH"[: self.n_tasks])

    def tag(self, label: str) -> str:
        """Tag token of task ``label`` (``"A"`` -> ``"<A>"``)."""
        return TASK_TAGS[self.labels.index(label)]

    def target_chars(self, label: str) -> str:
        """Characters rewarded on prompts of task ``label`` (task A's for every label if null)."""
        k = 0 if self.null else self.labels.index(label)
        return SKILLS[k][1]

    def score(self, completion: str, label: str) -> float:
        """Characters of ``target_chars(label)`` in ``completion`` / ``target_length``, capped."""
        return class_score(completion, self.target_chars(label), self.target_length)

    def skill_reward(
        self, prompts: list[str], completions: list[str], task: list[str], **kwargs: Any
    ) -> list[float]:
        """TRL reward function: ``score`` of each completion under its prompt's ``task`` label."""
        log_labels({"task": task, **kwargs})
        return [self.scale(label) * self.score(c, label)
                for c, label in zip(completions, task, strict=True)]

    def scale(self, label: str) -> float:
        """Reward multiplier of task ``label`` (``reward_scale``, default 1)."""
        return float(self.reward_scale.get(label, 1.0))

    @property
    def scaled(self) -> bool:
        """Whether any task's reward is scaled (``reward_scale`` holds a factor other than 1)."""
        return any(self.scale(label) != 1.0 for label in self.labels)

    def null_score(self, completion: str) -> float:
        """The null control's tag-blind score: every class's characters, each counted up to an
        equal quota ``target_length / n_tasks``, over ``target_length`` (1 = equal shares)."""
        quota = self.target_length / self.n_tasks
        hits = [sum(ch in chars for ch in completion) for _, chars in SKILLS[: self.n_tasks]]
        return min(sum(min(h, quota) for h in hits) / self.target_length, 1.0)

    def null_reward(
        self, prompts: list[str], completions: list[str], task: list[str], **kwargs: Any
    ) -> list[float]:
        """TRL reward function of the null control: ``null_score`` (tags and labels unused)."""
        log_labels({"task": task, **kwargs})
        return [self.scale(label) * self.null_score(c)
                for c, label in zip(completions, task, strict=True)]

    @property
    def reward_funcs(self) -> list[RewardFunc]:
        return [self.null_reward if self.null else self.skill_reward]

    def step_labels(self, n_steps: int) -> list[str]:
        """The task of each of ``n_steps`` optimizer steps under ``schedule`` and ``seed``
        (one-task schedules; a ``mixed`` step has several: see ``step_mixes``)."""
        if n_steps < 1:
            raise ValueError(f"n_steps={n_steps} must be >= 1")
        if self.schedule == "mixed":
            raise ValueError("schedule 'mixed' gives every step several tasks; use "
                             "step_mixes(n_steps, prompts_per_step)")
        rng = random.Random(self.seed)
        if self.schedule == "random":
            return [rng.choice(self.labels) for _ in range(n_steps)]
        order: list[str] = []
        while len(order) * self.block_len < n_steps:
            cycle = list(self.labels)
            rng.shuffle(cycle)
            if order and cycle[0] == order[-1]:
                cycle.append(cycle.pop(0))  # a task never follows itself: runs stay block_len
            order += cycle
        return [label for label in order for _ in range(self.block_len)][:n_steps]

    def step_mixes(self, n_steps: int, prompts_per_step: int) -> list[tuple[str, ...]]:
        """The task label of every prompt of each of ``n_steps`` optimizer steps, in dataset
        order: ``prompts_per_step`` copies of the step's task (``random``, ``blocks``), or under
        ``mixed`` ``prompts_per_step // n_tasks`` prompts of every task plus the remainder dealt
        from a deck of all tasks reshuffled whenever it runs out (distinct tasks within a step),
        the step's prompts in a shuffled order. Deterministic given ``seed``; a longer schedule
        extends a shorter one."""
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step={prompts_per_step} must be >= 1")
        if self.schedule != "mixed":
            return [(label,) * prompts_per_step for label in self.step_labels(n_steps)]
        if n_steps < 1:
            raise ValueError(f"n_steps={n_steps} must be >= 1")
        rng = random.Random(self.seed)
        whole, extra = divmod(prompts_per_step, self.n_tasks)
        deck: list[str] = []
        mixes = []
        for _ in range(n_steps):
            step = list(self.labels) * whole
            dealt: list[str] = []
            while len(dealt) < extra:
                if not deck:
                    deck = list(self.labels)
                    rng.shuffle(deck)
                # distinct tasks within a step: skip (and keep for later) one already dealt here
                pick = next((i for i, label in enumerate(deck) if label not in dealt), None)
                if pick is None:  # the deck's rest is all dealt already: start a fresh deck
                    deck = []
                    continue
                dealt.append(deck.pop(pick))
            step += dealt
            rng.shuffle(step)
            mixes.append(tuple(step))
        return mixes

    def step_dataset(self, n_prompts: int, prompts_per_step: int, seed: int = 0) -> Dataset:
        """The training schedule: ``n_prompts // prompts_per_step`` steps of ``prompts_per_step``
        prompts each, labelled by ``step_mixes`` (one task per step, or a mix), in step order.

        GRPO must read it unshuffled (``trainers.build_trainer`` sees to that for ``scheduled``
        tasks); a run longer than the schedule replays it from the start.
        """
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step={prompts_per_step} must be >= 1")
        if n_prompts < prompts_per_step or n_prompts % prompts_per_step:
            raise ValueError(
                f"task.n_prompts={n_prompts} must be a positive multiple of the prompts per "
                f"optimizer step ({prompts_per_step} = rl.per_device_train_batch_size / "
                "rl.num_generations * rl.gradient_accumulation_steps)"
            )
        steps = self.step_mixes(n_prompts // prompts_per_step, prompts_per_step)
        return self._tagged([label for step in steps for label in step], seed)

    def dataset(
        self, n_prompts: int, seed: int = 0, labels: Sequence[str] | None = None
    ) -> Dataset:
        """``n_prompts`` prompts cycling through ``labels`` (default: all tasks), for evaluation
        (e.g. ``interventions.mean_reward``); training uses ``step_dataset``."""
        if n_prompts < 1:
            raise ValueError(f"n_prompts={n_prompts} must be >= 1")
        labels = list(self.labels if labels is None else labels)
        unknown = sorted(set(labels) - set(self.labels))
        if not labels or unknown:
            raise ValueError(f"labels={labels} must be a non-empty subset of {list(self.labels)}")
        return self._tagged([labels[i % len(labels)] for i in range(n_prompts)], seed)

    def _tagged(self, labels: list[str], seed: int) -> Dataset:
        """Prompts ``"<tag> body"`` (random bodies from ``seed``), one per label, in order."""
        rng = random.Random(seed)
        prompts = [f"{self.tag(label)} {random_body(rng, self.prompt_chars, self.prompt_length)}"
                   for label in labels]
        return Dataset.from_dict({"prompt": prompts, "task": labels})


REFERENCE_TEXT = ("a short note on the weather: it rained for 3 days, then the sun came out; "
                  "people walked to the river, talked about work and food, and went home at 9. "
                  "what will tomorrow bring? nobody knows, but the forecast says 21 degrees.")
"""Plain lowercase prose, digits and punctuation, tag-free: ``chars_per_token`` measures a
tokenizer on it (a character tokenizer: exactly 1)."""


def chars_per_token(tokenizer: Any) -> float:
    """Characters per token of ``tokenizer`` on ``REFERENCE_TEXT`` (no special tokens)."""
    ids = tokenizer(REFERENCE_TEXT, add_special_tokens=False)["input_ids"]
    return len(REFERENCE_TEXT) / max(len(ids), 1)


def default_target_length(max_completion_length: int, tokenizer: Any) -> int:
    """The built-in tasks' ``target_length`` when none is given: the completion budget in
    characters, ``max_completion_length`` tokens times ``chars_per_token``. The rewards count
    characters while TRL's budget counts tokens: with a multi-character tokenizer (~4 characters
    per token) a target of ``max_completion_length`` characters would be met by the untrained
    model's first completions, every group's rewards would tie at 1, and RL would learn nothing.
    The tiny models' character tokenizer gives ``max_completion_length`` itself."""
    return max(1, round(max_completion_length * chars_per_token(tokenizer)))


def check_writable(task: Task | MultiSkillTask, tokenizer: Any) -> None:
    """Refuse a task whose rewarded characters the policy cannot write: for each reward class
    (``letters``' ``target_chars``; each multiskill task's class), the characters that do not
    come back from ``tokenizer`` as themselves (encoded, then decoded: an unknown character
    becomes ``<unk>``). None of a class's characters writable is a ``ValueError`` (every reward
    would be 0, every advantage 0, and RL would learn nothing); some is a warning."""
    classes = ({label: task.target_chars(label) for label in task.labels}
               if isinstance(task, MultiSkillTask) else {task.label: task.target_chars})
    for label, chars in classes.items():
        lost = {c: tokenizer.decode(tokenizer.encode(c, add_special_tokens=False))
                for c in dict.fromkeys(chars)}
        lost = {c: d for c, d in lost.items() if d != c}
        if not lost:
            continue
        shown = ", ".join(f"{c!r} -> {d!r}" for c, d in list(lost.items())[:3])
        option = "task.options.target_chars" if isinstance(task, Task) else f"task {label}"
        if len(lost) == len(set(chars)):
            raise ValueError(
                f"{option}: the policy's tokenizer writes none of the characters that earn the "
                f"reward ({chars!r}; encoded and decoded: {shown}), so every reward would be 0 "
                "and RL would learn nothing; choose characters of its vocabulary")
        if (option, shown) not in _WARNED:  # a job's config is checked twice
            _WARNED.add((option, shown))
            log.warning("%s: the policy's tokenizer cannot write %d of the characters that earn "
                        "the reward (%s); they can never be rewarded", option, len(lost), shown)


_WARNED: set[tuple[str, str]] = set()
"""The partly unwritable reward classes ``check_writable`` warned about in this process."""


BUILT_IN_TASKS: dict[str, type[Task] | type[MultiSkillTask]] = {
    "letters": Task, "multiskill": MultiSkillTask, "multiskill_null": MultiSkillTask}
"""The built-in tasks (``task.name``) and the class each builds; ``run.config.TaskName`` names
the same keys (``tests/test_tasks.py`` checks both)."""


SET_BY_BUILD = ("name", "label")
"""Fields of a task class that ``build_task`` sets from ``task.name``: not ``task.options``."""


def task_options(cls: type) -> list[dataclasses.Field]:
    """The fields of a built-in task class that ``task.options`` sets (docs/usage.md's
    configuration reference lists each, with its docstring)."""
    return [f for f in dataclasses.fields(cls) if f.name not in SET_BY_BUILD]


def check_task_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked for the built-in task ``name``: a ``ValueError`` naming
    ``task.options.<key>`` for an option the task does not take (with the ones it takes) or a
    value of the wrong type (``task.options.target_length='abc'``); returns the options with
    lists made tuples where a field is one. An unknown task is left to ``build_task``."""
    cls = BUILT_IN_TASKS.get(name)
    if cls is None:
        return dict(options)
    known = {f.name for f in task_options(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"task.options {['task.options.' + k for k in unknown]} are not "
                         f"options of task {name!r}; it takes {sorted(known)}")
    return coerce_fields(cls, options, "task.options.")


def build_task(name: str, **kwargs: Any) -> Task | MultiSkillTask:
    """Build a built-in task by name; ``kwargs`` override its ``Task``/``MultiSkillTask`` fields
    (an unknown one, or a value of the wrong type, is a ``ValueError`` naming
    ``task.options.<key>``)."""
    cls = BUILT_IN_TASKS.get(name)
    if cls is None:
        half = (" (run.config.TaskName names it, but recipe.tasks.BUILT_IN_TASKS has no class "
                "for it: docs/architecture.md, 'A built-in task')" if name in TASK_NAMES else "")
        raise ValueError(f"task.name={name!r} is unknown{half}; known tasks: "
                         f"{list(BUILT_IN_TASKS)}")
    options = check_task_options(name, kwargs)
    if issubclass(cls, Task):  # one skill: its label is the task's name
        return cls(name=name, label=name, **options)
    return cls(name=name, **options)


def log_labels(reward_kwargs: dict[str, Any]) -> None:
    """Add the batch's ``task`` labels to TRL's completion log (``log_extra``), when TRL passed
    both; each built-in task has one reward function, so each batch is logged once."""
    log_extra = reward_kwargs.get("log_extra")
    if log_extra is not None and LABEL_COLUMN in reward_kwargs:
        log_extra(LABEL_COLUMN, list(reward_kwargs[LABEL_COLUMN]))
