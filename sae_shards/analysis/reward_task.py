"""Your own run's reward, handed back for analysis: prompts plus TRL reward functions.

A run of your own TRL script (``ShardCallback``) records its rollouts but not its reward: reward
functions are code, and sae-shards never stores or unpickles code. To measure what a shard does
to the reward (the report's dose-response, ``interventions.mean_reward`` / ``task_rewards`` /
``dose_response``), give the prompts and reward functions back as a :class:`RewardTask`::

    task = RewardTask(train_dataset, [my_reward], label_column="task")
    analyze("runs/mine", task=task)    # or: sae-shards analyze runs/mine --task FILE.py:NAME

The interventions call the functions as TRL's GRPO trainer does: keyword arguments ``prompts``,
``completions`` (strings, or ``[{"role": "assistant", "content": ...}]`` for conversational
prompts), ``completion_ids``, every other dataset column repeated per completion, and
``trainer_state`` / ``log_extra`` / ``log_metric`` (a fresh ``TrainerState`` and no-ops);
``async`` functions are awaited, and each call gets the run's generation batch of completions
(``rl.reward_batch``). Rewards are weighted by ``reward_weights`` and summed over the
functions, a ``None`` left out; a completion no function scored is unscorable and left out of
every mean, as in TRL. Completions are sampled as the run sampled them (``max_completion_length``,
``temperature``, ``top_p``... which ``ShardCallback`` records in ``config.json``). Model-based
rewards (a reward model given to the trainer) are not supported: wrap one in a function that
scores the completions.

``load_task_spec("pkg.module:name")`` or ``load_task_spec("path/to/script.py:name")`` resolves the
command line's ``--task``: ``name`` is a ``RewardTask`` or a function of no arguments returning
one. A script is imported as a module, so its training must sit under
``if __name__ == "__main__":``; a ``ShardCallback`` created while it is imported (``IMPORTING``)
refuses to start, so an unguarded script cannot train, or overwrite the run being analysed.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from datasets import Dataset

RewardFunc = Callable[..., Sequence[float | None]]
"""A TRL reward function: ``fn(prompts=..., completions=..., **columns) -> one reward each``."""


def is_conversational(prompt: Any) -> bool:
    """Whether a ``prompt`` value is a chat (a list of ``{"role", "content"}`` messages)."""
    return (isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], Mapping)
            and "role" in prompt[0])


DEFAULT_NAME = "user"
"""``RewardTask.name`` when none is given."""


@dataclass
class RewardTask:
    """A user's RL task, as the interventions need it: prompts and reward functions.

    Checked at construction; a bad field raises ``ValueError`` naming it."""

    prompts: Dataset | Sequence[Mapping[str, Any]]
    """The prompts, with a ``prompt`` column (text, or a list of chat messages) and any columns
    the reward functions read: typically the ``train_dataset`` given to the trainer."""
    reward_funcs: RewardFunc | Sequence[RewardFunc]
    """The trainer's reward function(s), called as TRL calls them (module docstring)."""
    reward_weights: Sequence[float] | None = None
    """One weight per reward function, as ``GRPOConfig.reward_weights`` (default: 1 each)."""
    label_column: str | None = None
    """A column naming each prompt's context (as ``ShardCallback(label_column=...)``): enables
    per-context rewards (``task_rewards``, the report's per-context dose curves)."""
    name: str = DEFAULT_NAME
    """A name for reports (``--task FILE.py:NAME`` names one left at the default so)."""
    _data: Dataset = field(init=False, repr=False)

    def __post_init__(self) -> None:
        data = self.prompts
        if not isinstance(data, Dataset):
            try:
                data = Dataset.from_list([dict(row) for row in data])
            except Exception as e:  # noqa: BLE001 - any malformed input gets one clear error
                raise ValueError(f"RewardTask.prompts: give a datasets.Dataset or a list of row "
                                 f"dicts with a 'prompt' key ({type(e).__name__}: {e})") from e
        if len(data) == 0 or "prompt" not in data.column_names:
            raise ValueError(f"RewardTask.prompts needs at least one row and a 'prompt' column; "
                             f"got {len(data)} rows with columns {data.column_names}")
        one = callable(self.reward_funcs) or isinstance(self.reward_funcs, str)
        funcs = [self.reward_funcs] if one else list(self.reward_funcs)
        if not funcs:
            raise ValueError("RewardTask.reward_funcs is empty; give the trainer's reward "
                             "functions")
        for fn in funcs:
            if isinstance(fn, str) or not callable(fn) or _is_module(fn):
                raise ValueError(
                    f"RewardTask.reward_funcs: {fn!r} is not a reward function; reward models "
                    "(a model or its id) are not supported: wrap one in a function "
                    "fn(prompts, completions, **kwargs) that returns one score per completion")
        self.reward_funcs = funcs
        if self.reward_weights is not None:
            weights = [float(w) for w in self.reward_weights]
            if len(weights) != len(funcs):
                raise ValueError(f"RewardTask.reward_weights has {len(weights)} entries for "
                                 f"{len(funcs)} reward functions; give one per function")
            self.reward_weights = weights
        if self.label_column is not None and self.label_column not in data.column_names:
            raise ValueError(f"RewardTask.label_column={self.label_column!r} is not a column of "
                             f"the prompts ({data.column_names})")
        self._data = data

    @property
    def labels(self) -> tuple[str, ...]:
        """The contexts of ``label_column`` (sorted), or ``()`` without one."""
        if self.label_column is None:
            return ()
        return tuple(sorted({str(v) for v in self._data[self.label_column]}))

    def dataset(self, n_prompts: int, seed: int = 0,
                labels: Sequence[str] | None = None) -> Dataset:
        """``n_prompts`` rows drawn without replacement in a ``seed``-shuffled order (cycling
        when more are asked than there are). With ``labels``, prompts cycle through those
        contexts (``label_column`` needed), as the built-in ``multiskill`` task's do."""
        if n_prompts < 1:
            raise ValueError(f"n_prompts={n_prompts} must be >= 1")
        order = list(range(len(self._data)))
        random.Random(seed).shuffle(order)
        if labels is None:
            return self._data.select([order[i % len(order)] for i in range(n_prompts)])
        labels = [str(x) for x in labels]
        unknown = sorted(set(labels) - set(self.labels))
        if not labels or unknown:
            raise ValueError(f"labels={labels} must be a non-empty subset of this task's "
                             f"contexts {list(self.labels)} (RewardTask.label_column="
                             f"{self.label_column!r})")
        column = [str(v) for v in self._data[self.label_column]]
        pools = {label: [i for i in order if column[i] == label] for label in labels}
        taken = {label: 0 for label in labels}
        rows = []
        for i in range(n_prompts):
            label = labels[i % len(labels)]
            rows.append(pools[label][taken[label] % len(pools[label])])
            taken[label] += 1
        return self._data.select(rows)


def _is_module(fn: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(fn, torch.nn.Module)


IMPORTING: str | None = None
"""The file or module ``load_task_spec`` is importing, while it does: ``ShardCallback`` refuses
to start then, so a script whose training is not under ``if __name__ == "__main__":`` cannot
train (or overwrite the run being analysed) because analysis imported it."""


def _offers(module: Any, name: str) -> str:
    """What a ``--task`` naming something ``module`` lacks adds: the names it could have meant,
    the module's RewardTasks and its own functions that take no arguments, the closest first."""
    def fits(obj: Any) -> bool:
        if isinstance(obj, RewardTask):
            return True
        if not inspect.isfunction(obj) or obj.__module__ != module.__name__:
            return False
        try:
            inspect.signature(obj).bind()
        except TypeError:
            return False
        return True

    names = sorted(n for n, obj in vars(module).items() if not n.startswith("_") and fits(obj))
    if not names:
        return ("; it defines no RewardTask and no function of no arguments (name one that "
                "returns sae_shards.RewardTask(...))")
    close = difflib.get_close_matches(name, names, n=1)
    return ((f"; did you mean {close[0]!r}?" if close else ";")
            + f" its RewardTasks and functions of no arguments: {', '.join(names)}")


def load_task_spec(spec: str) -> RewardTask:
    """The :class:`RewardTask` that ``"module:name"`` or ``"path/to/file.py:name"`` names (a
    ``RewardTask``, or a function of no arguments returning one). Raises ``ValueError``."""
    global IMPORTING
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"--task {spec!r}: give MODULE:NAME or FILE.py:NAME, where NAME is a "
                         "RewardTask or a function returning one")
    as_file = where.endswith(".py") or "/" in where
    path = Path(where).resolve()
    if as_file and not path.is_file():
        raise ValueError(f"--task {spec!r}: no file {path}")
    search = str(path.parent) if as_file else os.getcwd()  # as `python FILE` / `python -m` do
    sys.path.insert(0, search)
    IMPORTING = str(path) if as_file else where
    module_name = f"_sae_shards_task_{abs(hash(str(path)))}"
    try:
        if as_file:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # as an import does (dataclasses look it up)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ModuleNotFoundError as e:
        sys.modules.pop(module_name, None)
        if not as_file and e.name == where.split(".")[0]:
            raise ValueError(f"--task {spec!r}: cannot import {where!r} ({e}); for a script "
                             f"give its file: --task path/to/{where.replace('.', '/')}.py:"
                             f"{name}") from e
        raise ValueError(f"--task {spec!r}: importing {where} failed: {e}") from e
    except ValueError:  # a refused ShardCallback, or the script's own: its message as it is
        sys.modules.pop(module_name, None)
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's script, whatever it raised
        sys.modules.pop(module_name, None)
        raise ValueError(f"--task {spec!r}: importing {where} failed: {type(e).__name__}: {e} "
                         "(the script runs as a module: anything outside `if __name__ == "
                         "\"__main__\":` runs too, command-line parsing included)") from e
    finally:
        IMPORTING = None
        sys.path.remove(search)
    if not hasattr(module, name):
        raise ValueError(f"--task {spec!r}: {where} has no {name!r}{_offers(module, name)}")
    obj = getattr(module, name)
    if callable(obj) and not isinstance(obj, RewardTask):
        try:
            inspect.signature(obj).bind()
        except TypeError as e:
            raise ValueError(f"--task {spec!r}: {name} is a function that takes arguments "
                             f"({e}); name a RewardTask, or a function of none returning one"
                             ) from e
        except ValueError:  # no signature to inspect (a builtin): just call it
            pass
        try:  # a RewardTask refusing its fields too: its message names them, this says where
            returned = obj()
        except Exception as e:  # noqa: BLE001 - the user's function
            raise ValueError(f"--task {spec!r}: {name}() failed: {type(e).__name__}: {e}") from e
        if not isinstance(returned, RewardTask):
            raise ValueError(f"--task {spec!r}: {name}() returned a "
                             f"{type(returned).__name__}, not a RewardTask (from "
                             "sae_shards.analysis.reward_task import RewardTask)")
        return _named(returned, spec)
    if not isinstance(obj, RewardTask):
        raise ValueError(f"--task {spec!r}: {name} is of type {type(obj).__name__}, not a "
                         "RewardTask (from sae_shards.analysis.reward_task import RewardTask)")
    return _named(obj, spec)


def _named(task: RewardTask, spec: str) -> RewardTask:
    """A task left with the default name is named in reports as it was given (``--task
    grpo.py:reward_task``), not "user"."""
    if task.name == DEFAULT_NAME:
        task.name = spec
    return task
