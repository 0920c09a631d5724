"""Tasks: prompts plus programmatic rewards for GRPO, and a recorder of every scored rollout.

The built-in task ``letters`` asks for completions made of one character class (default: the
vowels ``aeiou``). Its reward is graded: the number of target characters in the completion over a
fixed ``target_length``, capped at 1. Dividing by a fixed length, not by the completion's own
length, means a short completion ("a<eos>") cannot score high, so the policy has to fill the whole
budget with target characters. A random tiny model over the ~80-token character vocabulary starts
near ``len(target_chars) / vocab`` (~0.06) and climbs steadily from there (rl.DEFAULT_GRPO records
what was measured).

Reward functions follow TRL's signature ``fn(prompts, completions, **kwargs) -> list[float]``;
TRL passes every dataset column (here ``task``) as a kwarg list aligned with the completions.
"""

from __future__ import annotations

import functools
import random
import string
import threading
from dataclasses import dataclass
from typing import Any, Callable

from datasets import Dataset

from sae_shards.models import TASK_TAGS

RewardFunc = Callable[..., list[float]]
"""TRL reward function: ``fn(prompts, completions, **kwargs) -> list[float]``."""

TASK_NAMES = ("letters",)
"""Tasks ``build_task`` knows."""


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
    """Characters that earn reward."""
    target_length: int = 16
    """Target characters needed for reward 1; set it to the run's max_completion_length."""
    prompt_chars: str = string.ascii_lowercase
    """Characters the random prompt bodies are drawn from."""
    prompt_length: tuple[int, int] = (4, 8)
    """Inclusive (min, max) length of a prompt's random body."""

    def __post_init__(self) -> None:
        if self.tag not in TASK_TAGS:
            raise ValueError(
                f"task.tag={self.tag!r} is not a tokenizer tag; use one of {list(TASK_TAGS)}"
            )
        if not self.target_chars:
            raise ValueError("task.target_chars is empty; give the characters that earn reward")
        if self.target_length < 1:
            raise ValueError(f"task.target_length={self.target_length} must be >= 1")
        lo, hi = self.prompt_length
        if not 1 <= lo <= hi:
            raise ValueError(
                f"task.prompt_length={self.prompt_length} must satisfy 1 <= min <= max"
            )

    def dataset(self, n_prompts: int, seed: int = 0) -> Dataset:
        """``n_prompts`` plain-text prompts ``"<tag> body"`` with a ``task`` label column."""
        if n_prompts < 1:
            raise ValueError(f"n_prompts={n_prompts} must be >= 1")
        rng = random.Random(seed)
        prompts = [f"{self.tag} {self._random_body(rng)}" for _ in range(n_prompts)]
        return Dataset.from_dict({"prompt": prompts, "task": [self.label] * n_prompts})

    def _random_body(self, rng: random.Random) -> str:
        n = rng.randint(*self.prompt_length)
        return "".join(rng.choice(self.prompt_chars) for _ in range(n))

    def score(self, completion: str) -> float:
        """Target characters in ``completion`` over ``target_length``, capped at 1."""
        hits = sum(ch in self.target_chars for ch in completion)
        return min(hits / self.target_length, 1.0)

    def char_class_reward(
        self, prompts: list[str], completions: list[str], **kwargs: Any
    ) -> list[float]:
        """TRL reward function: ``score`` of each completion (prompts and kwargs unused)."""
        return [self.score(c) for c in completions]

    @property
    def reward_funcs(self) -> list[RewardFunc]:
        return [self.char_class_reward]


def build_task(name: str, **kwargs: Any) -> Task:
    """Build a built-in task by name; ``kwargs`` override its ``Task`` fields."""
    match name:
        case "letters":
            return Task(name="letters", label="letters", **kwargs)
        case other:
            raise ValueError(f"task.name={other!r} is unknown; known tasks: {list(TASK_NAMES)}")


class RolloutRecorder:
    """Keeps every scored batch of rollouts until the capture callback drains it.

    ``wrap(fn)`` returns a reward function that calls ``fn`` and records one entry per call:
    ``{"step", "reward_func", "prompts", "completions", "rewards", "tasks"}``, where ``step`` is
    the trainer's global step when the batch was scored (the optimizer step it trains) and
    ``tasks`` the per-completion ``task`` labels (``None`` when the dataset has no such column).
    A lock guards the list because reward functions may run on TRL's async loop while the
    callback drains from the training thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []

    def wrap(self, fn: RewardFunc) -> RewardFunc:
        """A recording reward function with ``fn``'s name (TRL logs rewards under it)."""

        @functools.wraps(fn)
        def recorded(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
            rewards = [float(r) for r in fn(prompts, completions, **kwargs)]
            state = kwargs.get("trainer_state")
            self.record(
                step=state.global_step if state is not None else None,
                reward_func=getattr(fn, "__name__", type(fn).__name__),
                prompts=list(prompts),
                completions=list(completions),
                rewards=rewards,
                tasks=list(kwargs["task"]) if "task" in kwargs else None,
            )
            return rewards

        return recorded

    def record(self, **entry: Any) -> None:
        with self._lock:
            self._records.append(entry)

    def drain(self) -> list[dict[str, Any]]:
        """Return everything recorded since the last drain, oldest first, and forget it."""
        with self._lock:
            records, self._records = self._records, []
        return records
