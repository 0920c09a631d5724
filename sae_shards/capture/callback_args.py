"""Checks and builders of ``ShardCallback``'s arguments (``capture/callback.py``): each refuses a
value the run could not do its job with, before anything is trained, naming the argument or
the trainer setting and what would fix it; ``build_config`` / ``with_shortcuts`` make the
``capture=`` / ``runner=`` / ``sae=`` configs from what a script passed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from sae_shards.capture import distributed
from sae_shards.capture.selection import few_names
from sae_shards.capture.step_rules import unwrap_optimizer
from sae_shards.core import json_read
from sae_shards.run import rundir
from sae_shards.run.config import CaptureConfig
from sae_shards.run.schema import build_dataclass


def check_argument_types(**given: tuple[Any, type | tuple[type, ...], str]) -> None:
    """``ValueError`` naming each of ShardCallback's plain arguments whose value is not of its
    type (``name=(value, types, what it should be)``); bool is not taken for an int."""
    wrong = [f"{name}={value!r} (expected {what})" for name, (value, types, what) in given.items()
             if not isinstance(value, types) or (types is int and isinstance(value, bool))]
    if wrong:
        raise ValueError(f"ShardCallback: {', '.join(wrong)}; nothing was written")


def check_same_output(output: Path | None) -> None:
    """``distributed.check_same`` of the trainer's ``output_dir``: rank 0 saves the TRL
    checkpoints there, and every rank resumes from them."""
    distributed.check_same("the trainer's output_dir", str(output and output.absolute()),
                           "give every process the same TRL output_dir: rank 0 saves the "
                           "checkpoints every rank resumes from")


def check_output_dir(output: Path | None, run_dir: Path) -> None:
    """Refuse a trainer ``output_dir`` that is ``run_dir`` itself or one of the folders the run
    writes (``checkpoints/``, ``resume/``, ``model/``...): TRL's ``checkpoint-N/`` and
    ``trainer.save_model()``'s files (a model's ``config.json`` among them) would mix with the
    run's own, and the run would no longer be told from another tool's directory. ``run_dir/trl``
    (where ``sae-shards train`` keeps them) or any directory outside is fine."""
    if output is None:
        return
    where, run = output.resolve(), Path(run_dir).resolve()
    inside = [name for name in rundir.OWNED if name != rundir.TRL_OUTPUT
              and (where == run / name or (run / name) in where.parents)]
    if where == run or inside:
        named = "run_dir itself" if where == run else f"inside run_dir/{inside[0]}"
        raise ValueError(
            f"the trainer's output_dir={str(output)!r} is {named} ({run}): TRL's checkpoint-N/ "
            "and trainer.save_model()'s files (a model's config.json among them) would mix with "
            f"the run's own. Give the trainer output_dir={str(run / rundir.TRL_OUTPUT)!r} (as "
            "sae-shards train does) or a directory outside the run; nothing was trained")


def check_learning_rate(optimizer: Any, args: Any) -> None:
    """Refuse a trainer whose ``learning_rate`` is 0 and whose optimizer's param groups all have
    0 for theirs (the schedule's base, ``initial_lr``): no weight moves, every captured update
    is zero and the SAE has nothing to learn (audit 143: the run trained every step, then said
    so at its end). A group whose rate is not a number, or an optimizer that sets its own step
    size (Adafactor's ``relative_step``, which leaves ``lr`` 0 in its groups), is not judged."""
    groups = getattr(unwrap_optimizer(optimizer), "param_groups", None) or []

    def zero(group: Mapping[str, Any]) -> bool:
        rate = group.get("initial_lr", group.get("lr"))
        return (isinstance(rate, (int, float)) and rate == 0
                and not group.get("relative_step", False))

    if getattr(args, "learning_rate", None) == 0 and groups and all(map(zero, groups)):
        raise ValueError(
            f"the trainer's learning rate is 0 (learning_rate={getattr(args, 'learning_rate', 0)!r}"
            "; every param group of its optimizer): no weight would move, every captured update "
            "would be zero and the SAE would have nothing to learn. Set learning_rate; nothing "
            "was trained")


RESERVED_META = ("source", "model_id", "run_dir", "lora", "run_id", "rl_step", "sae_step",
                 "sae_samples", "subset_of")
"""Checkpoint metadata keys sae-shards writes itself, which analysis reads (the samples'
source, the model, the run, the steps): a script's ``meta`` may not set them."""


def check_meta(meta: Mapping[str, Any] | None) -> None:
    """``ValueError`` for a ``meta`` a checkpoint cannot hold as it is: a key sae-shards writes
    itself (``RESERVED_META``), a key that is not a string, or a value that is not strict JSON
    (a ``Path``, a tensor, a set, NaN), which would otherwise fail the run at its first
    checkpoint."""
    if meta is None:
        return
    wrong = [f"{k!r} is sae-shards' own (the checkpoint's {k}; name yours otherwise)"
             for k in meta if k in RESERVED_META]
    wrong += [f"{k!r} is not a string key" for k in meta if not isinstance(k, str)]
    for k, v in meta.items():
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            wrong.append(f"{k!r} holds a {type(v).__name__}, which JSON cannot hold exactly "
                         "(pass str(...), a number, or lists and dicts of them)")
    if wrong:
        raise ValueError(f"ShardCallback: meta (extra checkpoint metadata, written as JSON): "
                         f"{'; '.join(wrong)}; nothing was written")


def oversized_rank_text(rank: int, oversized: Mapping[str, int], n_targets: int) -> str:
    """The warning for ``targets.oversized_ranks``' targets at ``sae.rank=rank``: the rank that
    saves memory on all of them, or, where none does (a matrix of one row, such as a gate of
    one output), that they could be left out."""
    lower = min(oversized.values())
    advice = (f"lower sae.rank to {lower} or less" if lower < rank else
              "no rank does on matrices this narrow (one row or column, such as a gate of one "
              "output): leave them out of capture.targets if memory matters")
    return (f"sae.rank={rank} gives {len(oversized)} of {n_targets} targets a factored direction "
            f"at least as large as the matrix itself ({few_names(list(oversized), 3)}): the "
            f"low-rank SAE saves no memory on them and costs more time than a dense one would; "
            f"{advice}")


def build_config(cls: type, value: Any, prefix: str) -> Any:
    """A config dataclass from an instance, a dict of its fields, or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return build_dataclass(cls, dict(value), prefix + ".")


def given_fields(value: Any, kind: type, **shortcuts: Any) -> dict[str, Any]:
    """The fields of a ``capture=`` / ``runner=`` argument the user set (a dict's keys, or a
    config's fields that are not the default), with the shortcut arguments that were given."""
    if isinstance(value, Mapping):
        given = dict(value)
    elif value is None:
        given = {}
    else:
        defaults = kind()
        given = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                 if getattr(value, f.name) != getattr(defaults, f.name)}
    return {**given, **{k: v for k, v in shortcuts.items() if v is not None}}


def with_shortcuts(cfg: Any, value: Any, **shortcuts: Any) -> Any:
    """``cfg`` with the shortcut arguments that were given (re-validated). A shortcut that
    contradicts the same field set in ``value`` (the ``capture=`` / ``runner=`` argument ``cfg``
    was built from: a dict naming it, or a config whose field is not the default) is refused
    rather than one of the two silently winning."""
    given = {k: v for k, v in shortcuts.items() if v is not None}
    if not given:
        return cfg
    prefix = "capture." if isinstance(cfg, CaptureConfig) else "runner."
    merged = build_dataclass(type(cfg), {**dataclasses.asdict(cfg), **given}, prefix)
    named = given_fields(value, type(cfg))
    for name in given:
        if name in named and getattr(merged, name) != getattr(cfg, name):
            raise ValueError(
                f"ShardCallback({name}={given[name]!r}, {prefix[:-1]}=...) sets {prefix}{name} "
                f"twice, to {given[name]!r} and to {getattr(cfg, name)!r}: give it in one place")
    return merged


def check_same_world(run_dir: Path, trainer: Any | None = None) -> None:
    """A resumed run must have as many processes as it had: TRL's per-device batch is per
    rank, so another count changes every later step's batch under the same run directory. With
    ``trainer``, it must also train under the same distribution (DDP, FSDP, a DeepSpeed ZeRO
    stage: ``distributed.distribution``), whose format TRL's checkpoint is in."""
    path = run_dir / rundir.CONFIG
    if not path.is_file():
        return
    try:
        saved = json_read.loads(path.read_text())
    except ValueError:
        return  # a torn config.json is rewritten below
    n_processes = distributed.world_size()
    why = distributed.world_mismatch(run_dir, saved, n_processes) or (
        distributed.distribution_mismatch(
            run_dir, saved, distributed.distribution(trainer, n_processes))
        if trainer is not None else None)
    if why:
        raise ValueError(why)
