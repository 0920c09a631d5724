"""Shards loaded back for analysis: ``ShardSet`` over a checkpoint, ``RunView`` over a run dir.

A *shard* is one SAE latent's decoder direction: unit norm across all targets in the SAE's
scaled units (the same direction in parameter units). ``Shard.dense()`` materialises it per
parameter name; ``scaled=True`` multiplies by the shard's typical coefficient in parameter units
(``mean |activation| * input_scale``), i.e. "one typical RL update's worth" of that shard.

Everything is read from safetensors and JSON: loading never runs code from a file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import operator
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch
from torch import Tensor

from sae_shards.analysis.families import (ALWAYS_ON_DENSITY, FAMILY_THRESHOLD, Families,
                                          find_families)
from sae_shards.capture.rollouts import scored_mean
from sae_shards.core import json_read
from sae_shards.core.checkpoint import (CONFIG_FILE, FORMAT, SAE_FILE, STATE_FILE,
                                        CheckpointError, load_checkpoint, read_safetensors,
                                        save_checkpoint)
from sae_shards.core.factored import cross_gram, paired_inner
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.targets import split_stacked, stack_slices, stack_targets
from sae_shards.run import rundir
from sae_shards.run.jsonl_index import JsonlIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One latent of a :class:`ShardSet`."""

    shards: "ShardSet"
    index: int

    def __repr__(self) -> str:
        return f"Shard({self.index} of {len(self.shards)})"

    def factors(self) -> dict[str, tuple[Tensor, ...]]:
        """``{target: (U [m, r], V [n, r])}`` or ``{target: (d [m],)}`` (unit-norm direction)."""
        return {tf.spec.name: tuple(f[self.index].detach() for f in tf.factors("decoder"))
                for tf in self.shards.sae.factors}

    def dense(self, scaled: bool = True) -> dict[str, Tensor]:
        """``{param_name: tensor}``: the shard's unit direction (``scaled=False``), or that times
        ``typical_coefficient`` (its mean |activation| when active, in parameter units: about
        one typical sample's size, unsigned, 0 for a shard that never fired). Its sign is the
        decoder's; a shard whose activations are negative pushes the other way (see
        ``RunView.attribution`` for its summed, signed contribution). A mixture of experts'
        stacked parameter comes whole, ``[experts, m, n]`` (``targets.stack_slices``), so the
        result applies to the model as it is (``interventions``)."""
        dirs = self.shards.sae.dense_directions(latents=torch.tensor([self.index]))
        scale = self.typical_coefficient() if scaled else 1.0
        return stack_slices({name: d[0] * scale for name, d in dirs.items()})

    def typical_coefficient(self) -> float:
        """Mean |activation| when active over the SAE's training (its running statistics) times
        the checkpoint's ``input_scale``: parameter units for a run whose samples are its
        updates (0 if it never fired). Approximate: the statistics add activations taken
        while ``input_scale`` moved; ``RunView.typical_coefficient`` is the consistent figure,
        over the final timeline encoded by this one checkpoint."""
        mean_abs = self.shards.stats.get("stats.mean_abs_act")
        if mean_abs is None:
            return 0.0
        return float(mean_abs[self.index]) * float(self.shards.sae.input_scale)

    def target_norms(self) -> dict[str, float]:
        """Share of the unit direction on each target (Frobenius norms; squares sum to 1)."""
        row = self.shards.target_norms()[self.index]
        return dict(zip(self.shards.target_names, row.tolist()))

    @property
    def density(self) -> float:
        """How often the shard fired over the SAE's training (its running statistics; NaN for a
        checkpoint saved without them). ``RunView.density`` counts the final timeline instead,
        which the report uses."""
        d = self.shards.stats.get("stats.density")
        return float(d[self.index]) if d is not None else float("nan")


INIT_KEPT = 0.5
"""A shard whose direction keeps |cosine| >= this with its own initial direction never
trained away from it (``ShardSet.initial_cosines``). On three default runs the figure is
bimodal: at most 0.33 for the shards that trained (0.03 for those firing on 1% of samples or
more), 0.94 to 0.99 for those that did not (one firing on 5% of samples, with tiny
coefficients), and one shard at 0.72."""


class ShardSet:
    """The shards of one checkpoint directory (``sae.safetensors`` + ``config.json``)."""

    def __init__(self, sae: LowRankSAE, config: dict[str, Any], stats: dict[str, Tensor],
                 path: Path | None = None) -> None:
        self.sae = sae.eval()
        self.config = config
        self.stats = stats
        self.path = path

    def __repr__(self) -> str:
        return (f"ShardSet({len(self)} shards over {len(self.target_names)} targets"
                + (f", {self.path}" if self.path else "") + ")")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "ShardSet":
        """Load and validate a checkpoint directory (errors name the file and the problem)."""
        loaded = load_checkpoint(path, device)
        return cls(loaded.sae, loaded.config, loaded.stats, loaded.path)

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str | int | None = None) -> "ShardSet":
        """The shards of a run's checkpoint: ``final``, ``step_XXXXXX`` (or its RL step as an
        int), or None for the newest (``final`` when the run finished, its last step checkpoint
        when it was interrupted)."""
        run_dir = Path(run_dir)
        return cls.load(run_dir / rundir.CHECKPOINTS / checkpoint_name(run_dir, checkpoint))

    # ---- container protocol
    def __len__(self) -> int:
        return self.sae.n_latents

    def __getitem__(self, i: int | Shard | slice) -> Shard | list[Shard]:
        if isinstance(i, slice):
            return [Shard(self, j) for j in range(len(self))[i]]
        return Shard(self, self.check_index(i))

    def check_index(self, i: Any) -> int:
        """A shard's index as a plain int in ``[0, len)`` (negative ones count from the end; a
        ``Shard`` of this set, or of one loaded from the same checkpoint, gives its own), or a
        clear ``IndexError`` / ``TypeError`` / ``ValueError``."""
        if isinstance(i, Shard):
            if not self._same_set(i.shards):
                raise ValueError(
                    f"{i!r} is a shard of {i.shards!r}, not of {self!r}: its index would name "
                    "another direction here; pass a shard of this set, or its index")
            i = i.index
        if isinstance(i, bool):
            raise TypeError(f"a shard is given by its index (an int) or a Shard, not bool ({i})")
        try:
            i = operator.index(i)  # int, numpy and 0-d tensor integers
        except TypeError:
            raise TypeError(f"a shard is given by its index (an int) or a Shard, not "
                            f"{type(i).__name__}") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"shard index {i} out of range for {len(self)} shards")
        return i % len(self)

    def _same_set(self, other: "ShardSet") -> bool:
        """``other`` is this set, or another load of the same checkpoint directory."""
        return other is self or (self.path is not None and other.path is not None
                                 and Path(self.path).resolve() == Path(other.path).resolve())

    def __iter__(self) -> Iterator[Shard]:
        return (Shard(self, i) for i in range(len(self)))

    # ---- geometry, all in factored form
    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.sae.targets]

    @property
    def meta(self) -> dict[str, Any]:
        return self.config.get("meta", {})

    def target_norms(self) -> Tensor:
        """``[n_shards, n_targets]`` Frobenius norm of each shard on each target."""
        with torch.no_grad():
            return torch.stack([paired_inner(tf.factors("decoder"), tf.factors("decoder"))
                                .clamp_min(0).sqrt() for tf in self.sae.factors], 1)

    def initial_cosines(self) -> Tensor:
        """``[n_shards]``: each shard's |cosine| with its own initial direction, the one an
        untrained SAE of its config, seed and targets starts from (factored, never dense). A
        shard that keeps ``INIT_KEPT`` or more of it never trained away from its random start:
        its direction says nothing of the run. A ``subset``'s shards started as the original
        SAE's did, rebuilt from the size ``meta["subset_of"]["n_latents"]`` records (NaN for a
        subset saved without it)."""
        cfg, rows = self.sae.cfg, None  # rows: the shards' indices in the original
        if self.meta.get("subset_of") is not None:
            origin, n = self.subset_origin(), self.meta["subset_of"].get("n_latents")
            if origin is None or type(n) is not int or not all(0 <= i < n for i in origin[1]):
                return torch.full((len(self),), math.nan)
            cfg, rows = dataclasses.replace(cfg, n_latents=n), torch.tensor(origin[1])
        # on the CPU, one target at a time on the trained side: no second SAE on the device
        start = ShardSet(LowRankSAE(self.sae.targets, cfg, self.sae.sample_form), {}, {})
        if rows is not None:
            start = start.subset(rows.tolist())
        with torch.no_grad():
            inner = sum(paired_inner(tuple(f.cpu() for f in a.factors("decoder")),
                                     b.factors("decoder"))
                        for a, b in zip(self.sae.factors, start.sae.factors))
        norms = [s.target_norms().cpu().pow(2).sum(1).sqrt().clamp_min(1e-30)
                 for s in (self, start)]
        return (inner / norms[0] / norms[1]).abs()

    def cosine_matrix(self, other: ShardSet | None = None) -> Tensor:
        """``[n_shards, n_other]`` cosine similarity of the shards with ``other``'s (another
        checkpoint of the run, or another run over the same targets), or with each other
        (``[n_shards, n_shards]``); in factored form, never building a dense direction."""
        if other is None:
            other = self
        mine = {t.name: tuple(t.shape) for t in self.sae.targets}
        theirs = {t.name: tuple(t.shape) for t in other.sae.targets}
        if mine != theirs:
            differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            shown = "; ".join(f"{k}: {list(mine[k]) if k in mine else 'absent'} against "
                              f"{list(theirs[k]) if k in theirs else 'absent'}"
                              for k in differ[:3])
            more = f"; ... ({len(differ) - 3} more)" if len(differ) > 3 else ""
            raise ValueError(f"the two shard sets cover other targets or shapes ({shown}{more}): "
                             "shards compare only over the same weights (runs of one model "
                             "architecture with the same capture targets)")
        with torch.no_grad():
            cross = sum(cross_gram(a.factors("decoder"), b.factors("decoder"))
                        for a, b in zip(self.sae.factors, other.sae.factors))
        own, their = (s.target_norms().pow(2).sum(1).sqrt().clamp_min(1e-30)
                      for s in (self, other))
        return cross / own[:, None] / their[None]

    def same_initialisation(self, other: ShardSet) -> bool:
        """Whether these are two runs' shards whose SAEs started from one initialisation (the
        same ``sae.seed``), not two checkpoints of one run: the same ``run_id`` in their
        metadata (every checkpoint of a run records it, a saved subset keeps it), else the
        same run's ``run_dir`` recorded or the ``checkpoints/`` of one run."""
        if self.sae.cfg.seed != other.sae.cfg.seed:
            return False
        ids = (self.meta.get("run_id"), other.meta.get("run_id"))
        if None not in ids:
            return ids[0] != ids[1]
        folders = [Path(s.path).resolve().parent if s.path is not None else None
                   for s in (self, other)]
        one_run_now = (folders[0] is not None and folders[0] == folders[1]
                       and folders[0].name == rundir.CHECKPOINTS)
        return (self.meta.get("run_dir") is not None and not one_run_now
                and self.meta.get("run_dir") != other.meta.get("run_dir"))

    def match(self, other: ShardSet) -> list[ShardMatch]:
        """For each shard, ``other``'s shard whose direction is nearest (largest |cosine|; its
        signed cosine kept): a shard followed to another checkpoint, or another run over the
        same targets. Shard indices do not carry over between checkpoints; this does. Several
        shards may match the same one (it is not a one-to-one assignment). Two runs whose
        SAEs share ``sae.seed`` start from the same decoder: a shard that trained little keeps
        its initial direction and matches its namesake by construction (warned about)."""
        if self.same_initialisation(other):
            log.warning("match: the two runs' SAEs started from the same initialisation "
                        "(sae.seed=%d), so a shard that trained little keeps its initial "
                        "direction and matches its namesake in the other run by construction; "
                        "compare runs of different sae.seed, or only shards that fired "
                        "(Shard.density)", self.sae.cfg.seed)
        cos = self.cosine_matrix(other)  # [n_shards, n_other]
        best = cos.abs().argmax(1)
        return [ShardMatch(int(j), float(cos[i, j])) for i, j in enumerate(best.tolist())]

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write these shards (SAE, statistics, metadata) as a checkpoint directory that
        ``ShardSet.load`` reads (safetensors and JSON, written atomically). ``path`` must be
        new or empty, or, with ``overwrite=True``, shards saved earlier; anything else there
        (a run, a run's own checkpoint, other files) is refused with ``FileExistsError``,
        since the directory is replaced whole."""
        path = Path(path)
        refused = _save_refusal(path, overwrite)
        if refused:
            raise FileExistsError(refused)
        return save_checkpoint(path, self.sae, self.stats, self.meta)

    def subset(self, shards: Any) -> "ShardSet":
        """A ShardSet of the chosen shards alone (indices, ``Shard``s, or a slice), in that
        order: their factors, encoder biases and statistics, this SAE's ``input_scale``,
        ``threshold`` and decoder bias. ``.save`` it to keep or share chosen directions. Its
        ``sae.k`` and ``sae.aux_k`` are capped at its size; encoding with it picks among these
        shards only, so its activations are not the full SAE's. ``meta["subset_of"]`` records
        the checkpoint the shards came from, their indices there (through a subset of a
        subset, in the original) and its ``n_latents``."""
        picked = (list(range(len(self)))[shards] if isinstance(shards, slice)
                  else [self.check_index(i) for i in shards])
        if not picked:
            raise ValueError("subset: choose at least one shard")
        if len(set(picked)) != len(picked):
            raise ValueError(f"subset: shards repeated in {picked}; each shard once")
        n, cfg = len(picked), self.sae.cfg
        new_cfg = dataclasses.replace(cfg, n_latents=n, k=min(cfg.k, n),
                                      aux_k=None if cfg.aux_k is None else min(cfg.aux_k, n))
        sae = LowRankSAE(self.sae.targets, new_cfg, self.sae.sample_form)
        rows = torch.tensor(picked)
        with torch.no_grad():
            for mine, theirs in zip(self.sae.factors, sae.factors):
                for which in ("encoder", "decoder"):
                    for src, dst in zip(mine.factors(which), theirs.factors(which)):
                        dst.copy_(src.detach().cpu()[rows])
            sae.b_enc.copy_(self.sae.b_enc.detach().cpu()[rows])
            if self.sae.b_dec is not None:
                for src, dst in zip(self.sae.b_dec, sae.b_dec):
                    dst.copy_(src.detach())
            sae.input_scale.copy_(self.sae.input_scale)
            sae.threshold.copy_(self.sae.threshold)
        stats = {k: v[rows] if v.ndim and v.shape[0] == len(self) else v
                 for k, v in self.stats.items()}
        earlier = self.subset_origin()  # a subset of a subset: indices in the original
        origin = ({"path": earlier[0], "indices": [earlier[1][i] for i in picked]} if earlier
                  else {"path": str(self.path) if self.path else None, "indices": picked})
        n_original = (self.meta["subset_of"].get("n_latents") if earlier else len(self))
        if n_original is not None:  # its size: the original's initial directions (a subset's
            origin["n_latents"] = n_original  # own seed and size would draw others)
        config = {**self.config, "sae": new_cfg.to_dict(),
                  "meta": {**self.meta, "subset_of": origin}}
        return ShardSet(sae.to(self.sae.device), config, stats, None)

    def subset_origin(self) -> tuple[str | None, list[int]] | None:
        """``(checkpoint, indices there)`` when these shards are a ``subset`` (shard ``i`` is
        shard ``indices[i]`` of that checkpoint; None for one never saved); None for a whole
        SAE, or a ``meta["subset_of"]`` that does not map every shard."""
        origin = self.meta.get("subset_of")
        indices = origin.get("indices") if isinstance(origin, dict) else None
        if not (isinstance(indices, list) and len(indices) == len(self)
                and all(type(i) is int for i in indices)):
            return None
        path = origin.get("path")
        return (path if isinstance(path, str) else None), indices

    def decoder_bias(self) -> dict[str, Tensor]:
        """``b_dec`` in parameter units (under parameter names, a stacked expert tensor whole,
        as ``Shard.dense()``): the part of every sample's reconstruction that no shard carries.
        It starts as the first batch's mean update and is learned from there, so it is not the
        updates' mean: with signed activations an always-on shard takes part of that mean
        (docs/analysis.md, section 7); the bias plus each shard's mean contribution is the
        reconstructions' mean."""
        bias = self.sae.bias_sample(detach=True)
        if bias is None:
            raise ValueError(
                f"this SAE learns no decoder bias (sample_form {self.sae.sample_form!r}, "
                f"sae.use_b_dec={self.sae.cfg.use_b_dec!r}), so it has none; per-event "
                "SAEs never do, and a per-step run keeps one unless sae.use_b_dec=false")
        return stack_slices({k: v[0] * self.sae.input_scale for k, v in bias.items()})

    def mean_update(self) -> dict[str, Tensor]:
        """The earlier name of :meth:`decoder_bias`, which is not the updates' mean."""
        warnings.warn("ShardSet.mean_update() is decoder_bias(): the SAE's learned decoder "
                      "bias, not the updates' mean", DeprecationWarning, stacklevel=2)
        return self.decoder_bias()

    @property
    def input_scale(self) -> float:
        """The factor from the SAE's scaled units to parameter units: an activation times it is
        the coefficient of its shard's unit direction in the sample."""
        return float(self.sae.input_scale)

    def encode(self, sample: dict[str, Tensor]):
        """Active shards of parameter-unit samples ``{target: [batch, *shape]}`` (values in the
        SAE's scaled units: times ``input_scale`` for parameter units). A stacked expert tensor
        may come whole, ``[batch, experts, m, n]`` under its parameter name (as
        ``Shard.dense()`` gives it), or one expert at a time under the SAE's names."""
        captured = stack_targets(self.sae.targets)
        if all(t.name in sample for t in captured if t.is_stacked):
            sample = split_stacked(sample, captured)
        return self.sae.encode(self.sae.to_scaled(sample))


def _labels(tasks: list[Any] | None) -> tuple[str, ...]:
    return tuple(sorted(set(map(str, tasks or []))))


STEP_BRIEF = {"labels": lambda row: _labels(row.get("tasks")),
              "mean_reward": lambda row: scored_mean(row.get("rewards") or [])}
"""What ``RunView`` keeps of every step's rollouts (``JsonlIndex.derived``): its sorted context
labels and its mean reward over the scored completions (NaN when none was scored)."""


_LOG_FIELDS = {
    rundir.ROLLOUTS: {"step": int, "prompts": list, "completions": list, "rewards": list,
                      "advantages": list, "tasks": list},
    rundir.EVENTS: {"step": int, "event": int, "rows": list, "tasks": list},
    rundir.METRICS: {"rl_step": int, "sae_step": int, "fvu": float, "l0": float,
                     "dead_frac": float}}
"""The fields of the run's JSON-lines logs that ``RunView`` reads, and their type; each may be
null or absent, but an event's ``step`` and ``event``. ``rewards`` holds numbers or nulls, an
event's ``rows`` indices into its step's completions."""


def _log_row_problem(log_name: str) -> Callable[[dict[str, Any]], str | None]:
    """What is wrong with a row of ``log_name`` (``_LOG_FIELDS``) and what would fix it, or None:
    for ``JsonlIndex(check=...)`` and ``_read_log``."""
    def what(row: dict[str, Any]) -> str | None:
        for key, want in _LOG_FIELDS[log_name].items():
            value = row.get(key)
            if value is None and log_name == rundir.EVENTS and key in ("step", "event"):
                return f"an event without {key!r}"
            if (found := wrong_type(key, value, want)) is not None:
                return found
        for value in row.get("rewards") or []:
            if value is not None and not _is(value, float):
                return f"rewards holds {value!r:.60}, neither a number nor null"
        for value in row.get("rows") or []:
            if not _is(value, int) or value < 0:
                return f"rows holds {value!r:.60}, not a completion's index (an integer >= 0)"
        return None

    def problem(row: dict[str, Any]) -> str | None:
        found = what(row)
        return None if found is None else (
            f"{found}; the log was edited or is not this sae-shards run's: copy it again from "
            "the run")
    return problem


def _is(value: Any, want: type) -> bool:
    """``value`` is a ``want`` (``float``: any number), a bool never a number."""
    number = (int, float) if want is float else want
    return isinstance(value, number) and not (isinstance(value, bool) and want is not bool)


_TYPE_WORDS = {int: "an integer", float: "a number", list: "a list", dict: "an object",
               str: "a string", bool: "true or false"}


def wrong_type(key: str, value: Any, want: type) -> str | None:
    """``"KEY is TYPE VALUE, expected WORD"`` when the JSON entry ``key`` holds a ``value`` that
    is no ``want`` (``_is``), None when it is one or null: the checks of the run's JSON files."""
    if value is None or _is(value, want):
        return None
    return f"{key} is {type(value).__name__} {value!r:.60}, expected {_TYPE_WORDS[want]}"


def _read_log(path: Path) -> list[dict[str, Any]]:
    """``rundir.read_jsonl`` of one of the logs ``_LOG_FIELDS`` names, each row checked: a row
    of another shape is a ``CheckpointError`` naming the file and line, instead of an error from
    deep inside ``RunView``."""
    problem, out = _log_row_problem(path.name), []
    for n, (_, _, row) in enumerate(rundir.iter_jsonl(path), 1):
        if (found := problem(row)) is not None:
            raise CheckpointError(f"{path}:{n}: {found}")
        out.append(row)
    return out


class RunView:
    """A run, finished, interrupted or killed (read as of its newest checkpoint, or
    ``checkpoint``): its shards plus which RL steps and rollouts activated each of them. Methods
    taking a ``shard`` accept its index or the ``Shard`` itself."""

    def __repr__(self) -> str:
        return (f"RunView({str(self.run_dir)!r}, checkpoint={self.checkpoint!r}: "
                f"{self.activations['final.rl_step'].numel()} samples"
                + (", per event" if self.per_event else "") + ")")

    def __init__(self, run_dir: str | Path, checkpoint: str | int | None = None) -> None:
        self.run_dir = Path(run_dir)
        # "final/" (tab completion) and "checkpoints/final" name the checkpoint "final"
        self.checkpoint = checkpoint_name(self.run_dir, checkpoint)
        """The checkpoint read: ``final``, or the newest step of an interrupted run."""
        self.shards = ShardSet.from_run(self.run_dir, self.checkpoint)
        if (self.run_dir / rundir.CONFIG).exists():  # read strictly: the report's readings
            _read_config(self.run_dir)  # (units, task, sampling) come from it
        acts_file = self.run_dir / rundir.ACTIVATIONS
        self.recovered: str | None = None
        """Why the timeline was re-encoded from the checkpoint's resume file
        (``analysis.recovered``) instead of read from ``activations.safetensors``: ``"killed"``
        (no such file: the run was killed, is still running, or is a copy without it) or
        ``"older"`` (the file is the encoding of another checkpoint than the one read); None
        when read from the file."""
        written_for = None
        if acts_file.is_file():
            self.activations, header = read_safetensors(
                acts_file, expect_version=True, advice=(
                    f"delete it: analysis then rebuilds the newest checkpoint's timeline from "
                    f"its resume file ({rundir.RESUME}/), or restore it from a copy of the run"))
            written_for = header.get("checkpoint")  # absent in files of older versions
            if written_for is not None and written_for != self.checkpoint:
                self.recovered = "older"
        else:
            self.recovered = "killed"
        if self.recovered:
            self.activations = self._recover(acts_file, written_for)
        for key in ("final.rl_step", "final.indices", "final.values"):
            if key not in self.activations:
                raise CheckpointError(f"{acts_file}: missing tensor {key!r}")
        self._check_activations_fit(acts_file)
        meta = self.shards.meta
        self.up_to: tuple[int | None, int | None] = (
            (None, None) if self.checkpoint == "final"
            else (meta.get("rl_step"), meta.get("sae_step")))
        """The RL and SAE step the checkpoint was written at, (None, None) for ``final``. The
        logs below stop there: a killed run's, or a finished run's read at an earlier
        checkpoint, go on past what these shards were trained on."""
        rl_up_to, sae_up_to = self.up_to
        by_rl = lambda step: rl_up_to is None or step is None or step <= rl_up_to  # noqa: E731
        self.rollouts = JsonlIndex(self.run_dir / rundir.ROLLOUTS, "step", derive=STEP_BRIEF,
                                   keep=by_rl, check=_log_row_problem(rundir.ROLLOUTS))
        """``rl_step -> rollouts.jsonl`` record (prompts, completions, rewards, advantages,
        labels), read from the file when asked for; ``rollouts.derived(step)`` holds the step's
        ``labels`` and ``mean_reward`` (``STEP_BRIEF``) without a read."""
        logged, trained = max(self.rollouts, default=None), meta.get("rl_step")
        if logged is not None and isinstance(trained, int) and logged < trained:
            log.warning("%s stops at RL step %d, before this checkpoint's step %d (a copy "
                        "taken while the run was writing, or one cut short): the rewards and "
                        "rollouts shown cover steps up to %d only; copy %s again from the run",
                        self.run_dir / rundir.ROLLOUTS, logged, trained, logged, rundir.ROLLOUTS)
        events = self.run_dir / rundir.EVENTS
        self.events = {(r["step"], r["event"]): r
                       for r in (_read_log(events) if events.is_file() else [])
                       if by_rl(r["step"])}
        """Per-event runs: ``(rl_step, event) -> events.jsonl`` record; empty otherwise."""
        self.lacks_events = not events.is_file() and rundir.section(
            rundir.read_config(self.run_dir), "capture").get("granularity") not in (None, "step")
        """A per-event run copied without its ``events.jsonl``: its samples are then read per
        RL step (which contexts and completions each event held is in that file only)."""
        if self.lacks_events:
            log.warning("%s: this per-event run lacks %s, which says which completions and "
                        "contexts each event held; its shards' top events and context shares "
                        "are shown per RL step instead (copy %s from the run)", self.run_dir,
                        rundir.EVENTS, rundir.EVENTS)
        metrics_file = self.run_dir / rundir.METRICS  # only the report's SAE curves need it
        metrics = _read_log(metrics_file) if metrics_file.is_file() else []
        self.rl_metrics = [r for r in metrics if r.get("kind") == "rl" and by_rl(r.get("rl_step"))]
        self.sae_metrics = [r for r in metrics if r.get("kind") == "sae"
                            and (sae_up_to is None or r.get("sae_step", 0) <= sae_up_to)]

    def _check_activations_fit(self, acts_file: Path) -> None:
        """The activation log must be one this checkpoint's SAE could have written: latent
        indices below its ``n_latents``, and ``k`` of them per final row where its sparsity
        fixes the width (a checkpoint copied in from another run fails here, instead of deep
        inside an index operation)."""
        cfg = self.shards.sae.cfg
        n, k, width = len(self.shards), cfg.k, cfg.codes_per_sample
        for which in ("final", "online"):
            self._check_activation_shapes(acts_file, which)
            idx = self.activations.get(f"{which}.indices")
            if idx is None or not idx.numel():
                continue
            top = int(idx.max())
            wrong_width = which == "final" and width is not None and idx.shape[1] != width
            if top >= n or int(idx.min()) < 0 or wrong_width:
                raise CheckpointError(
                    f"{acts_file}: its {which} activations name latents up to {top}, {idx.shape[1]}"
                    f" per sample, but checkpoint {self.checkpoint} has {n} latents with "
                    f"sae.k={k}: the checkpoint is not the one this run's activations were "
                    "written with (copied in from another run?); restore the run's own "
                    "checkpoint, or load the shards alone with ShardSet.from_run")

    def _check_activation_shapes(self, acts_file: Path, which: str) -> None:
        """``which``'s activation tensors agree with each other: ``rl_step`` (and ``event``,
        ``sae_step``) integer ``[S]``, ``indices`` integer and ``values`` float32 ``[S, W]``,
        every value finite (a damaged or hand-made file fails here, instead of deep inside
        torch, or with NaN figures in the report)."""
        acts = self.activations
        names = sorted((name for name in acts if name.startswith(f"{which}.")),
                       key=lambda name: name != f"{which}.indices")  # values are checked by it
        if not names:
            return
        missing = [f"{which}.{p}" for p in ("rl_step", "indices", "values")
                   if f"{which}.{p}" not in acts]
        problem = f"missing tensors {missing}" if missing else None
        steps = acts.get(f"{which}.rl_step")
        idx, val = acts.get(f"{which}.indices"), acts.get(f"{which}.values")
        integer = lambda t: not t.dtype.is_floating_point and t.dtype != torch.bool  # noqa: E731
        if problem is None and not (integer(steps) and steps.dim() == 1):
            problem = (f"{which}.rl_step is {str(steps.dtype).removeprefix('torch.')} "
                       f"{list(steps.shape)}, expected integer [S] (one RL step per sample)")
        if problem is None:
            rows = steps.shape[0]
            for name in names:
                t, part = acts[name], name.split(".", 1)[1]
                if part in ("indices", "values"):
                    want = "float32" if part == "values" else "integer"
                    ok = (t.dtype == torch.float32) if part == "values" else integer(t)
                    ok = ok and t.dim() == 2 and t.shape[0] == rows and t.shape == idx.shape
                    shape = (f"[{rows}, W]" if part == "indices"
                             else f"{list(idx.shape)}, as {which}.indices")
                else:
                    want, shape = "integer", f"[{rows}]"
                    ok = integer(t) and list(t.shape) == [rows]
                if not ok:
                    problem = (f"{name} is {str(t.dtype).removeprefix('torch.')} "
                               f"{list(t.shape)}, expected {want} {shape} "
                               f"(one row per sample of {which}.rl_step)")
                    break
        if problem is None and not bool(torch.isfinite(val).all()):
            problem = f"{which}.values holds NaN or infinite activations"
        if problem is not None:
            raise CheckpointError(
                f"{acts_file}: {problem}; the file is damaged or was not written by sae-shards: "
                "copy it again from the run")

    def _recover(self, acts_file: Path, written_for: str | None) -> dict[str, Tensor]:
        from sae_shards.analysis.recovered import activations_from_resume, resume_file_of

        resume = resume_file_of(self.run_dir, self.checkpoint)
        if resume is None or not resume.is_file():
            have = [rundir.step_name(s) for s in rundir.saved_steps(self.run_dir / rundir.RESUME)]
            what = _why_no_activations(self.run_dir, written_for)
            others = ", ".join(have) or "none"
            # the checkpoint the activations were written for, when this copy holds it
            there = written_for if written_for and (
                self.run_dir / rundir.CHECKPOINTS / written_for).is_dir() else None
            raise CheckpointError(
                f"{acts_file} {what}, and checkpoint {self.checkpoint} has no resume file to "
                f"re-encode its buffer from; analyse {there or 'a checkpoint'} instead "
                f"(checkpoints with a resume file: {others})"
                + ("" if there else ", finish the run" if not written_for else
                   f", copy {rundir.CHECKPOINTS}/{written_for}/ from the run")
                + ", or load the shards alone "
                f"with ShardSet.from_run({str(self.run_dir)!r}, {self.checkpoint!r})")
        return activations_from_resume(self.run_dir, self.checkpoint, self.shards.sae,
                                       int(self.shards.meta.get("sae_step", 0)))

    def timeline(self, which: str = "final") -> tuple[Tensor, Tensor]:
        """(rl_steps [S], activations [S, n_shards]) with zeros where a shard was inactive.

        ``which="final"``: the samples still in the ring buffer at the end, encoded by the final
        SAE (consistent); ``"online"``: every sample as encoded when captured (the SAE was still
        training, early rows are less meaningful). Activations are in the SAE's scaled units:
        times ``shards.input_scale``, the coefficient of the shard's unit direction in
        parameter units (for samples that are parameter updates).
        """
        if which not in ("final", "online"):
            raise ValueError(f"which={which!r}: 'final' (the buffer at the end, encoded by the "
                             "final SAE) or 'online' (every sample as encoded when captured)")
        steps = self.activations[f"{which}.rl_step"]
        idx, val = self.activations[f"{which}.indices"], self.activations[f"{which}.values"]
        dense = torch.zeros(steps.numel(), len(self.shards)).scatter_add_(1, idx, val)
        return steps, dense

    def sample_events(self, which: str = "final") -> Tensor:
        """The event id of each timeline sample, ``[S]`` (-1: a per-step sample)."""
        steps = self.activations[f"{which}.rl_step"]
        return self.activations.get(f"{which}.event", torch.full_like(steps, -1))

    @property
    def per_event(self) -> bool:
        """True when the run's samples are reinforcement events (capture.granularity)."""
        return bool(self.events)

    def density(self, which: str = "final") -> Tensor:
        """Fraction of the timeline's samples on which each shard was active, [n_shards] (the
        report's density; ``Shard.density`` is the SAE's training statistic)."""
        _, acts = self.timeline(which)
        return (acts != 0).float().mean(0) if acts.shape[0] else torch.zeros(len(self.shards))

    def families(self, threshold: float = FAMILY_THRESHOLD, which: str = "final",
                 always_on: float = ALWAYS_ON_DENSITY) -> Families:
        """Shard families (``analysis.families``): the shards that fire together on the
        timeline's samples, grouped without labels; shards active on at least ``always_on`` of
        the samples (the drift direction) and shards that never fired are left out."""
        _, acts = self.timeline(which)
        density = (acts != 0).double().mean(0) if acts.shape[0] else torch.zeros(acts.shape[1])
        exclude = ((density >= always_on) | (density == 0)).nonzero().flatten().tolist()
        gram = self.shards.sae.decoder_gram().detach().double()
        return find_families(acts, gram, threshold, exclude)

    def sample_labels(self, which: str = "final") -> list[tuple[str, ...]]:
        """Each timeline sample's context labels (sorted; empty when the run logged none): an
        event's from ``events.jsonl``, a per-step sample's every label of its step's rollouts."""
        steps, events = self.activations[f"{which}.rl_step"], self.sample_events(which)
        out = []
        for step, event in zip(steps.tolist(), events.tolist()):
            if event >= 0:
                out.append(_labels(self.events.get((step, event), {}).get("tasks")))
            else:
                out.append(self.rollouts.derived(step)["labels"] if step in self.rollouts
                           else ())
        return out

    def attribution(self, shard: int | Shard, which: str = "final") -> Attribution | None:
        """The SAE's own account of a shard's part of the run's update: the sum over the
        timeline's samples of its activation times the SAE's ``input_scale``, the coefficient of
        its unit direction in parameter units (compare ``interventions.update_coefficient``,
        the projection of the whole update on that direction, which also holds the decoder
        bias's part and every overlapping shard's part). None where the samples are not
        the run's parameter updates (per-event or gradient samples, preconditioned or
        normalised ones): their activations are in other units."""
        if not self.samples_are_updates:
            return None
        steps, acts = self.timeline(which)
        a = acts[:, self.shards.check_index(shard)].double()
        scale = self.shards.input_scale
        return Attribution(float(a.sum()) * scale, int(steps.numel()),
                           int(steps.min()) if steps.numel() else 0,
                           int(steps.max()) if steps.numel() else 0)

    @functools.cached_property
    def samples_are_updates(self) -> bool:
        """True when the SAE's samples are the run's parameter updates, so an activation times
        ``input_scale`` is in parameter units; False for per-event or gradient samples and
        preconditioned or normalised ones."""
        capture = rundir.section(rundir.read_config(self.run_dir), "capture")
        return not (self.per_event or self.shards.meta.get("source", "update") != "update"
                    or capture.get("precondition", "none") != "none"
                    or capture.get("normalize", "none") != "none")

    def typical_coefficient(self, shard: int | Shard, which: str = "final") -> float:
        """A shard's mean |activation| over the timeline's samples where it is active, times
        ``input_scale``: one typical sample's coefficient on its unit direction (parameter
        units when ``samples_are_updates``, else the samples' own units; 0 if never active).
        Consistent, unlike ``Shard.typical_coefficient``: every sample encoded by the one
        checkpoint at its one scale."""
        _, acts = self.timeline(which)
        a = acts[:, self.shards.check_index(shard)].abs()
        active = a[a != 0]
        return float(active.mean()) * self.shards.input_scale if active.numel() else 0.0

    def task_mix(self, shard: int | Shard, which: str = "final",
                 labels: list[tuple[str, ...]] | None = None) -> dict[str, float]:
        """Each context label's share of ``shard``'s total |activation| over the timeline (a
        sample of several labels gives each an equal part), largest first; {} when the run
        logged no labels or the shard never fired. ``labels``: ``sample_labels(which)``, when
        the caller already has them (several shards)."""
        _, acts = self.timeline(which)
        if labels is None:
            labels = self.sample_labels(which)
        mass: dict[str, float] = {}
        for a, sample in zip(acts[:, self.shards.check_index(shard)].abs().tolist(), labels):
            for label in sample:
                mass[label] = mass.get(label, 0.0) + a / len(sample)
        total = sum(mass.values())
        return ({k: v / total for k, v in sorted(mass.items(), key=lambda kv: -kv[1])}
                if total > 0 else {})

    def top_steps(self, shard: int | Shard, k: int = 5,
                  which: str = "final") -> list[dict[str, Any]]:
        """The k distinct RL steps with the largest |activation| of ``shard`` (scaled units, as
        ``timeline``), joined with their rollouts; fewer when fewer steps activated it.
        Per-event runs: a step's activation is that of its event with the largest |activation|
        (``"event"`` names it; ``top_events`` lists the events themselves)."""
        _check_k(k)
        steps, acts = self.timeline(which)
        events = self.sample_events(which)
        a = acts[:, self.shards.check_index(shard)]
        out, seen = [], set()
        for i in a.abs().argsort(descending=True, stable=True).tolist():
            if len(out) == k or a[i] == 0:
                break
            step = int(steps[i])
            if step in seen:
                continue
            seen.add(step)
            row = {"rl_step": step, "activation": float(a[i]), "rollout": self.rollouts.get(step)}
            if int(events[i]) >= 0:
                row["event"] = int(events[i])
            out.append(row)
        return out

    def top_events(self, shard: int | Shard, k: int = 5, which: str = "final") -> list[dict[str, Any]]:
        """The k events with the largest |activation| of ``shard``, each with its prompt, its
        completions (with their rewards and advantages) and its ``events.jsonl`` record
        (advantage, norm, kept energy). Per-step runs: the top steps, as ``top_steps``."""
        if not self.per_event:
            return self.top_steps(shard, k, which)
        _check_k(k)
        steps, acts = self.timeline(which)
        events = self.sample_events(which)
        a = acts[:, self.shards.check_index(shard)]
        out = []
        for i in a.abs().argsort(descending=True)[:k].tolist():
            if a[i] == 0:
                break
            step, event = int(steps[i]), int(events[i])
            record = self.events.get((step, event), {})
            rollout = self.rollouts.get(step) or {}
            rows = record.get("rows", [])
            logged = [len(rollout[key]) for key in ("prompts", "completions", "rewards",
                                                    "advantages", "tasks") if rollout.get(key)]
            if rows and logged and max(rows) >= min(logged):
                raise CheckpointError(
                    f"{self.run_dir / rundir.EVENTS}: event {event} of RL step {step} names "
                    f"completion {max(rows)}, but {rundir.ROLLOUTS} logs {min(logged)} for that "
                    "step: the two logs are not of the same run; copy both again from the run")
            pick = lambda key: [rollout[key][r] for r in rows] if rollout.get(key) else []  # noqa: E731
            out.append({
                "rl_step": step, "event": event, "activation": float(a[i]),
                "advantage": record.get("advantage"),
                "abs_advantage": record.get("abs_advantage"), "norm": record.get("norm"),
                "kept_energy": record.get("kept_energy"), "rows": rows,
                "prompt": rollout["prompts"][rows[0]] if rows and rollout.get("prompts") else None,
                "completions": pick("completions"), "rewards": pick("rewards"),
                "advantages": pick("advantages"), "tasks": pick("tasks")})
        return out


def _why_no_activations(run_dir: Path, written_for: str | None) -> str:
    """Why ``activations.safetensors`` has no timeline of the checkpoint read, as a clause: it
    encodes another checkpoint (one this copy of the run may lack), or it is missing."""
    if written_for and not (run_dir / rundir.CHECKPOINTS / written_for).is_dir():
        return (f"is the encoding of checkpoint {written_for}, which this copy of the run lacks "
                f"(copy {rundir.CHECKPOINTS}/{written_for}/ from the run)")
    if written_for:
        return f"is the encoding of checkpoint {written_for}"
    if rundir.finished_steps(run_dir) is not None:
        return ("is missing, though the run finished (a copy of the run without it: copy "
                f"{rundir.ACTIVATIONS} from the run)")
    return "is missing (the run was killed, or is still running)"


def checkpoint_name(run_dir: Path, checkpoint: str | int | None) -> str:
    """The checkpoint a reader asked for, by its name (``final/`` from tab completion and a path
    to one of this run's checkpoints are ``final``) or its RL step (``100``: ``step_000100``),
    or the run's newest
    (``rundir.latest_checkpoint``). A path into another directory is refused: it would
    silently read this run's checkpoint of the same name."""
    if checkpoint is None or checkpoint == "":
        return rundir.latest_checkpoint(run_dir)
    if isinstance(checkpoint, str) and checkpoint.isascii() and checkpoint.isdigit():
        checkpoint = int(checkpoint)  # "--checkpoint 100": an RL step, as RunView(run, 100)
    if not isinstance(checkpoint, (str, os.PathLike)):
        try:  # an RL step: RunView(run, 100) reads checkpoints/step_000100
            step = None if isinstance(checkpoint, bool) else operator.index(checkpoint)
        except TypeError:
            step = None
        if step is None or step < 0:
            raise TypeError(f"checkpoint={checkpoint!r}: a checkpoint's name (final, "
                            "step_XXXXXX), its path, or its RL step as an int >= 0")
        return rundir.step_name(step)
    path = Path(checkpoint)
    if len(path.parts) > 1 and not (
            path.parent.resolve() == (Path(run_dir) / rundir.CHECKPOINTS).resolve()
            or path.parent == Path(rundir.CHECKPOINTS)):
        raise CheckpointError(
            f"checkpoint {checkpoint} is not one of {run_dir}'s checkpoints "
            f"({Path(run_dir) / rundir.CHECKPOINTS}); give its name (final, step_XXXXXX), or "
            "read the run that holds it")
    if path.name in ("", ".", ".."):  # checkpoints/ itself, or the run directory
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} names no checkpoint of {run_dir}: "
                              "give its name (final, step_XXXXXX) or its RL step")
    return path.name


def _check_k(k: Any) -> None:
    try:
        ok = not isinstance(k, bool) and operator.index(k) >= 0  # numpy / torch ints too
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"k={k!r}: how many to list, an int >= 0")


class ShardMatch(NamedTuple):
    """``ShardSet.match``: the nearest shard of the other set."""

    index: int
    """Its index in the other set."""
    cosine: float
    """The signed cosine of the two directions (a sign flip is the same direction)."""


class Attribution(NamedTuple):
    """``RunView.attribution``: a shard's summed contribution to the captured updates."""

    total: float
    """Sum of activation x input_scale over the samples: the coefficient of the shard's unit
    direction in the updates the SAE reconstructs with it (parameter units)."""
    samples: int
    """Samples summed over (the timeline's: the ring buffer at the end of the run)."""
    first_step: int
    last_step: int
    """The RL steps they cover."""


class RunModels(NamedTuple):
    initial: Any  # transformers model with the run's initial weights (eval mode)
    final: Any  # the policy after RL
    tokenizer: Any  # the one training used: final_model's when saved there, else the initial's
    task: Any  # the run's task, rebuilt from its config


def policy_dir(run_dir: str | Path, checkpoint: str | int | None = None) -> Path:
    """Where the policy paired with ``checkpoint``'s shards is: ``final_model/`` for the final
    checkpoint (or None); for ``step_N``, TRL's own checkpoint of that step when it holds the
    policy (the job's ``trl/checkpoint-N``, or ``checkpoint-N`` under the user trainer's
    ``output_dir``, which ``ShardCallback`` records), else ``final_model/``."""
    run_dir = Path(run_dir)
    final = run_dir / rundir.FINAL_MODEL
    step = rundir.step_of(checkpoint_name(run_dir, checkpoint)) if checkpoint is not None else None
    if step is None:
        return final
    cfg = rundir.read_config(run_dir)
    saved = "adapter_config.json" if _is_lora(cfg) else "config.json"
    for root in rundir.trl_roots(run_dir):
        folder = root / f"checkpoint-{step}"
        if (folder / saved).is_file() and (root == run_dir / rundir.TRL_OUTPUT
                                           or foreign_trl_checkpoint(run_dir, folder) is None):
            return folder
    return final


def _refused_trl_policy(run_dir: Path, step: int) -> str:
    """Why the trainer's own ``checkpoint-{step}`` outside the run (``rl.output_dir``) was not
    paired with the step's shards, as a clause (``""`` when there is none to refuse)."""
    out = rundir.section(rundir.read_config(run_dir), "rl").get("output_dir")
    folder = Path(out) / f"checkpoint-{step}" if out else None
    inside = run_dir / rundir.TRL_OUTPUT
    if folder is not None and not folder.is_dir() and Path(out).resolve() != inside.resolve():
        if Path(out).is_dir():  # there, without this step's: the trainer removed it
            return (f" (nor at the trainer's output_dir, {out}, which config.json's "
                    f"rl.output_dir records and which no longer holds checkpoint-{step}/: the "
                    "trainer's save_total_limit, or a cleanup, removed it; analyze a step whose "
                    "TRL checkpoint is kept to pair its own policy)")
        return (f" (nor at the trainer's output_dir, {out}, which config.json's rl.output_dir "
                f"records: the run was moved away from it? copy its checkpoint-{step}/ into "
                f"{inside}/)")
    why = foreign_trl_checkpoint(run_dir, folder) if folder and folder.is_dir() else None
    return f" ({why})" if why else ""


TIMING_LOGS = ("time", "runtime", "per_second")
"""Parts of the names of TRL's logged figures that measure time, which two runs of the same
trajectory do not share (``step_time``, ``train_runtime``...): not compared."""


def foreign_trl_checkpoint(run_dir: Path, folder: Path) -> str | None:
    """Why TRL's checkpoint ``folder`` outside the run directory (under the trainer's
    ``output_dir``, an absolute path ``config.json`` recorded) is not this run's, or None when
    it is: its ``trainer_state.json`` log history must agree with the run's ``metrics.jsonl``
    (TRL's logs, recorded by ``ShardCallback``) on every figure of every step both logged, and
    share one step. A run moved or copied away from its trainer's ``output_dir`` would
    otherwise be paired with whatever is at that path now, another run's policy among them."""
    try:
        history = json_read.loads((folder / "trainer_state.json").read_text())["log_history"]
    except (OSError, ValueError, TypeError, KeyError):
        return f"{folder} has no readable trainer_state.json to tell whose checkpoint it is"
    mine: dict[int, dict[str, Any]] = {}
    for _, _, row in (rundir.iter_jsonl(run_dir / rundir.METRICS)
                      if (run_dir / rundir.METRICS).is_file() else ()):
        if row.get("kind") == "rl" and isinstance(row.get("rl_step"), int):
            mine.setdefault(row["rl_step"], {}).update(row)
    compared = 0
    for theirs in history if isinstance(history, list) else ():
        ours = mine.get(theirs.get("step")) if isinstance(theirs, dict) else None
        for key in (ours.keys() & theirs.keys()) - {"step"} if ours else ():
            a, b = ours[key], theirs[key]
            if (any(t in key for t in TIMING_LOGS) or not isinstance(a, (int, float))
                    or not isinstance(b, (int, float))):
                continue
            if not math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0):
                return (f"{folder} is another run's: its trainer_state.json logged {key}={b} at "
                        f"step {theirs['step']}, this run's {rundir.METRICS} {a} (the run moved "
                        "or was copied away from its trainer's output_dir, and another run "
                        "wrote there since)")
            compared += 1
    if not compared:
        return (f"{folder} cannot be told to be this run's: its trainer_state.json and the "
                f"run's {rundir.METRICS} share no logged step (the trainer logged none by that "
                f"step: its logging_steps; or a copy of the run without its {rundir.METRICS})")
    return None


def load_run_models(run_dir: str | Path, checkpoint: str | int | None = None,
                    initial: str | Path | None = None,
                    trust_remote_code: bool = False) -> RunModels | None:
    """The run's initial and final model, tokenizer and task; None when a model directory is
    missing (``run_models_missing`` says which). With ``checkpoint`` (``step_N``) the "final"
    policy is that step's when TRL saved it (``policy_dir``), so a killed run or an earlier
    checkpoint is paired with its own weights. A LoRA run's final policy is its base model
    with the saved adapter merged in (the effective weights ``W0 + s B A`` the shards live in),
    and its initial policy the base, with ``run_dir/initial_adapter`` merged in when the adapter
    did not start at zero.
    ``task`` is None for a run of a user's own TRL script (``ShardCallback``): its rewards are
    not known to sae-shards. ``trust_remote_code``: a policy that needs its own code
    (``config.json``'s ``auto_map``) is loaded by running the Python files beside it, in the
    initial model's directory and the run's alike; off (the default), such a run has no models
    (``run_models_missing`` says so). Only the caller turns it on: nothing in the run does."""
    from sae_shards.recipe.models import load_tokenizer
    from sae_shards.recipe.tasks import build_task

    run_dir = Path(run_dir)
    if checkpoint is not None:  # "final/", a path to it, or an RL step: its name
        checkpoint = checkpoint_name(run_dir, checkpoint)
    if checkpoint is not None and not (run_dir / rundir.CHECKPOINTS / checkpoint).is_dir():
        folder = run_dir / rundir.CHECKPOINTS
        have = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        raise CheckpointError(f"{run_dir}: no checkpoint {checkpoint!r} (it has {have or 'none'})")
    if run_models_missing(run_dir, checkpoint, initial, trust_remote_code) is not None:
        return None
    cfg = _read_config(run_dir)
    named, initial = initial is not None, initial_model_dir(run_dir, cfg, initial)
    trusted, hint = _initial_pickles(run_dir, initial, named)
    init = _load_safe(initial, not trusted, hint=hint, trust_remote_code=trust_remote_code)
    started_with = run_dir / rundir.INITIAL_ADAPTER
    if _is_lora(cfg) and (started_with / "adapter_config.json").is_file():
        # the adapter did not start at zero: theta_0 is the base with it merged in
        init = init._replace(model=_merged(init.model, started_with))
    final = policy_dir(run_dir, checkpoint)
    if checkpoint not in (None, "final") and final.name == rundir.FINAL_MODEL:
        log.warning("TRL kept no policy of %s's step in %s%s: the final policy is paired with "
                    "its shards", checkpoint, run_dir,
                    _refused_trl_policy(run_dir, rundir.step_of(checkpoint)))
    if _is_lora(cfg):
        fin = _load_safe(initial, not trusted, hint=hint, trust_remote_code=trust_remote_code)
        fin = fin._replace(model=_merged(fin.model, final))
    else:  # a trainer without a processing_class saved no tokenizer with the policy
        fin = _load_safe(final, tokenizer_dir=None if rundir.has_tokenizer(final) else initial,
                         trust_remote_code=trust_remote_code)
    task = None
    if cfg.get("task"):
        # the target the job resolved (runs of earlier versions: max_completion_length)
        target_length = cfg["task"].get("target_length") or cfg["rl"]["max_completion_length"]
        options = {"target_length": target_length, **cfg["task"]["options"]}
        try:
            task = build_task(cfg["task"]["name"], **options)
        except ValueError as e:  # a run of another sae-shards version, or an edited config
            raise CheckpointError(f"{run_dir / rundir.CONFIG}: its task cannot be rebuilt "
                                  f"({e}); analyse the run with the sae-shards version that "
                                  "made it (config.json's versions)") from None
    # the tokenizer training used: the trainer's processing class, saved with the final policy
    # (a chat template or pad token set in the script lives there, not in the initial directory)
    tokenizer = (load_tokenizer(final, model_dir=False, trust_remote_code=trust_remote_code)
                 if rundir.has_tokenizer(final) else init.tokenizer)
    return RunModels(init.model.eval(), fin.model.eval(), tokenizer, task)


def _initial_pickles(run_dir: Path, initial: Path, named: bool) -> tuple[bool, str]:
    """Whether the initial model's ``pytorch_model.bin`` may be read, and else what to add to
    the refusal. Weights come from safetensors only, but for a model directory outside the
    run that the reader named (``initial=``, ``--initial-model``), whose pickle transformers
    reads with its weights-only unpickler: a shared run's config.json may name any folder of
    pickles as model.path. A folder inside the run is the run's, wherever a symlink there
    points."""
    inside = any(Path(os.path.abspath(p)).is_relative_to(os.path.abspath(run_dir))
                 for p in (initial, initial.resolve()))
    trusted = named and not inside
    return trusted, ("" if trusted or inside else "; or, when you trust the pickle, name the "
                     f"directory: --initial-model {initial} (initial= in Python)")


def _load_safe(folder: Path, safetensors_only: bool = True, tokenizer_dir: Path | None = None,
               hint: str = "", trust_remote_code: bool = False):
    """``load_model_and_tokenizer`` of a policy directory, by default its weights read from
    safetensors only (a ``pytorch_model.bin`` found in a run directory is a pickle nobody
    there wrote: never loaded); ``tokenizer_dir`` when its tokenizer is elsewhere; ``hint``
    added to the error when it has no weights to read. Its files were checked whole by
    ``run_models_missing`` (``check_model_files``), which ``load_run_models`` asks first."""
    from sae_shards.recipe.models import load_model_and_tokenizer

    try:
        return load_model_and_tokenizer(folder, safetensors_only=safetensors_only,
                                        tokenizer_dir=tokenizer_dir,
                                        trust_remote_code=trust_remote_code)
    except FileNotFoundError as e:
        raise CheckpointError(f"{e}{hint}") from None


def _save_refusal(path: Path, overwrite: bool) -> str | None:
    """Why ``ShardSet.save`` may not write or replace ``path``, or None (see ``save``)."""
    if not isinstance(overwrite, bool):  # overwrite="no" would replace
        return f"ShardSet.save: overwrite={overwrite!r}; give True or False"
    inside = rundir.inside_run_folder(path)
    if inside is not None:
        run, name = inside
        return (f"ShardSet.save: {path} is in {name}/ of the run in {run}, which the run itself "
                "writes: its resume reads and prunes its checkpoints, and overwrite=true "
                "removes them with the run; save the shards outside the run's own folders")
    if not path.exists():
        return None
    if not path.is_dir():
        return f"ShardSet.save: {path} is a file; give a directory for the checkpoint"
    held = sorted(p.name for p in path.iterdir())
    if not held:
        return None
    if set(held) <= {CONFIG_FILE, SAE_FILE, STATE_FILE} and _is_checkpoint_config(path):
        if overwrite:  # what save_checkpoint writes, a config.json of its format included
            return None
        return (f"ShardSet.save: {path} already holds shards; pass overwrite=True to replace "
                "them, or save elsewhere")
    what = ("a run directory" if (path / rundir.CHECKPOINTS).is_dir()
            and (path / rundir.CONFIG).is_file() else "other files")
    return (f"ShardSet.save: {path} holds {what} ({', '.join(held[:5])}"
            f"{', ...' if len(held) > 5 else ''}), which saving would replace; save the shards "
            "to a new or empty directory")


def _is_checkpoint_config(folder: Path) -> bool:
    """Whether ``folder``'s ``config.json`` is a shards checkpoint's (its ``format``), not a
    model's or the user's own under the same name; True when there is none."""
    if not (folder / CONFIG_FILE).exists():
        return True
    try:
        config = json_read.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


AGAIN = "again from the run"


def check_model_files(folder: Path) -> None:
    """``models.check_model_files`` on a run's policy directory: advice to copy it again."""
    from sae_shards.recipe.models import check_model_files as check

    check(folder, f"an interrupted copy? copy it {AGAIN}")


def _merged(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """``model`` with the LoRA adapter saved in ``adapter`` merged in (its safetensors only)."""
    from peft import PeftModel

    if not (adapter / "adapter_model.safetensors").is_file():
        raise CheckpointError(
            f"{adapter} has no adapter_model.safetensors (an adapter saved as a pickle, "
            "adapter_model.bin, is never loaded): save it again with save_pretrained(DIR), "
            "whose default is safetensors")
    check_model_files(adapter)
    return PeftModel.from_pretrained(model, str(adapter), use_safetensors=True).merge_and_unload()


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "chat_template_kwargs", "generation_kwargs")
"""``score_rollouts`` settings a run's ``config.json`` may record (``rl``, or the job's
``rl.extra`` passed on to TRL), beside ``max_completion_length``."""


def run_sampling(run_dir: str | Path) -> dict[str, Any]:
    """How the run sampled its completions, as ``interventions.score_rollouts`` takes it:
    ``max_new_tokens`` (TRL's ``max_completion_length``, or the online DPO trainers'
    ``max_new_tokens``), whichever of ``SAMPLING_KEYS`` the
    run recorded, ``training_steps`` (``rl.max_steps``, resolved for an epoch-based run; for one
    recorded as TRL's -1 by an earlier version, ``summary.json``'s ``rl_steps``: the reward
    functions' ``trainer_state`` is the end of training) and ``reward_batch`` (``rl.reward_batch``: the
    completions per reward call); what it does not record keeps
    ``score_rollouts``' default (a run of an earlier version of ``ShardCallback`` recorded
    only ``max_steps``)."""
    rl = rundir.section(rundir.read_config(Path(run_dir)), "rl")
    extra = rundir.section(rl, "extra")
    out: dict[str, Any] = {}
    length_key = "max_completion_length" if rl.get("max_completion_length") else "max_new_tokens"
    length = rl.get(length_key)  # max_new_tokens: the online DPO trainers' name
    if length:
        out["max_new_tokens"] = length  # checked below, as every other setting
    steps = rl.get("max_steps")
    if not (isinstance(steps, int) and steps > 0):  # an epoch-based run before it was resolved
        steps = rundir.read_summary(Path(run_dir)).get("rl_steps")
    if isinstance(steps, int) and steps > 0:
        out["training_steps"] = steps
    if rl.get("reward_batch"):  # ShardCallback's runs: TRL's per-process generation batch
        out["reward_batch"] = rl["reward_batch"]
    for key in SAMPLING_KEYS:
        value = rl.get(key, extra.get(key))
        if value is not None:
            out[key] = value
    for key, value in out.items():  # a hand-edited config.json: named, not torch's error
        if (problem := _sampling_problem(key, value)) is not None:
            where = f"rl.{length_key if key == 'max_new_tokens' else key}"
            raise CheckpointError(
                f"{Path(run_dir) / rundir.CONFIG}: {where}={value!r} {problem}; the file was "
                "edited or is not a sae-shards run's config.json: copy it again from the run")
    return out


def _sampling_problem(key: str, value: Any) -> str | None:
    """What is wrong with one of ``run_sampling``'s settings as ``score_rollouts`` takes it, or
    None."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in ("chat_template_kwargs", "generation_kwargs"):
        return None if isinstance(value, dict) else "is not a mapping"
    if key in ("max_new_tokens", "training_steps", "reward_batch", "top_k"):
        least = 0 if key == "top_k" else 1
        whole = isinstance(value, int) and not isinstance(value, bool)
        return None if whole and value >= least else f"is not an int >= {least}"
    if key in ("temperature", "repetition_penalty"):
        return None if number and value > 0 else "is not a number > 0"
    if key in ("top_p", "min_p"):
        return None if number and 0 <= value <= 1 else "is not a number in [0, 1]"
    return None


def initial_model_dir(run_dir: Path, cfg: Mapping[str, Any],
                      initial: str | Path | None = None) -> Path:
    """Where the run's initial weights are: ``initial`` when given (the directory moved), else
    ``model.path`` when it names a local directory, else ``run_dir/model`` (the tiny model
    ``sae-shards train`` built, or the copy ``ShardCallback`` saved of a policy that was not
    loaded from a local directory)."""
    if initial is not None:
        return Path(initial)
    model = cfg.get("model") or {}
    return Path(model["path"]) if model.get("path") else run_dir / "model"


def run_models_missing(run_dir: str | Path, checkpoint: str | int | None = None,
                       initial: str | Path | None = None,
                       trust_remote_code: bool = False) -> str | None:
    """Why :func:`load_run_models` has no models for this run and checkpoint (a sentence for
    the report), or None when it has them. ``initial``: the initial model's directory, when it
    is no longer where ``config.json`` says (checked against the run's ``model.fingerprint``).
    ``trust_remote_code``: as ``load_run_models`` (on, a policy's own code runs here, when its
    config is read)."""
    run_dir = Path(run_dir)
    cfg = _read_config(run_dir)
    named, initial = initial is not None, initial_model_dir(run_dir, cfg, initial)
    if (not (initial / "config.json").is_file() and initial == run_dir / rundir.MODEL
            and cfg.get("task") is not None):  # sae-shards train built it there, first
        return (f"no initial model at {initial}: sae-shards train built the run's tiny model "
                f"there before its first step, so this copy of the run lacks its "
                f"{rundir.MODEL}/ folder; copy it from the run")
    if not (initial / "config.json").is_file():
        return (f"no initial model at {initial} (ShardCallback with save_model=False or under "
                "FSDP2 / ZeRO-3, a run of an earlier version whose policy was not loaded from a "
                "local directory, or the model directory moved: give its new place with "
                "--initial-model DIR)")
    if not rundir.has_tokenizer(initial):
        return (f"no tokenizer in {initial} (the trainer had no processing_class to save "
                "with the policy)")
    if ((cfg.get("model") or {}).get("initial_adapter")
            and not (run_dir / rundir.INITIAL_ADAPTER / "adapter_config.json").is_file()):
        return (f"no {run_dir / rundir.INITIAL_ADAPTER}: the run started from a LoRA adapter "
                "that was not zero (config.json's model.initial_adapter), saved there, and "
                "without it theta_0 would be the bare base; restore the directory from the run")
    saved = "adapter_config.json" if _is_lora(cfg) else "config.json"
    final = policy_dir(run_dir, checkpoint)
    if not (final / saved).is_file():
        step = (rundir.step_of(checkpoint_name(run_dir, checkpoint)) if checkpoint is not None
                else None)
        trl = (f" nor a TRL checkpoint-{step} holding it{_refused_trl_policy(run_dir, step)}"
               if step is not None else "")
        paired = [rundir.step_name(s) for s in rundir.saved_steps(run_dir / rundir.CHECKPOINTS)
                  if _whole_weights(policy_dir(run_dir, rundir.step_name(s)), cfg)]
        return (f"no final {'adapter' if _is_lora(cfg) else 'policy'} at {final}{trl} "
                "(save_model=False, an interrupted run, a crash between the two sides' "
                "checkpoints, a FSDP2 / ZeRO-3 run by an earlier sae-shards, which did not "
                "gather it, or a copy of the run "
                f"without its {rundir.FINAL_MODEL}/ folder)"
                + (f"; the newest checkpoint whose policy TRL saved is {paired[-1]}: analyse it "
                   f"with --checkpoint {paired[-1]}" if paired and paired[-1] != checkpoint
                   else ""))
    from sae_shards.recipe.models import check_causal_lm

    for folder in (initial, final):
        check_model_files(folder)
    trusted, hint = _initial_pickles(run_dir, initial, named)
    for folder, pickles_read in ((initial, trusted), (final, False)):
        weights = ("adapter_model.safetensors" if folder == final and _is_lora(cfg)
                   else "*.safetensors")
        if not pickles_read and not any(folder.glob(weights)) and _zero_partitions(folder):
            return (f"no whole weights in {folder}: it holds DeepSpeed ZeRO-3 partitions "
                    f"({_zero_partitions(folder)}/), which analysis does not read; DeepSpeed's "
                    "zero_to_fp32.py in that folder consolidates them into whole weights")
        if not pickles_read and not any(folder.glob(weights)):
            return (f"no safetensors weights in {folder}: weights saved as a pickle "
                    "(pytorch_model.bin) are never loaded from a run; save the model there "
                    "again with save_pretrained(DIR), whose default is safetensors"
                    + (hint if folder == initial else ""))
    saved_final = rundir.read_summary(run_dir).get("final_model_fingerprint")
    if final == run_dir / rundir.FINAL_MODEL and isinstance(saved_final, dict) and saved_final:
        from sae_shards.capture.initial_model import fingerprint

        if fingerprint(final) != saved_final:
            return (f"the final policy at {final} is not the one the run saved (its weight files "
                    "differ from summary.json's final_model_fingerprint: another run's, or "
                    "re-saved since), so the update and every intervention would be measured "
                    "on other weights; copy final_model/ again from the run")
    differ = _other_initial_weights(initial, cfg)
    if differ:
        return differ
    for folder in (initial, final) if not _is_lora(cfg) else (initial,):
        try:  # a reward model's run (trl.RewardTrainer): no LM head to steer or read
            check_causal_lm(folder, trust_remote_code)
        except ValueError as e:
            return (f"the policy is not a causal language model ({e}); the logit lens, the "
                    "dose-response and the ablation read and sample a causal LM")
    return None


def _changed_weight_files(initial: Path, cfg: Mapping[str, Any]) -> list[str]:
    """The weight files at ``initial`` whose hash differs from ``config.json``'s
    ``model.fingerprint`` (or that only one side has); none when nothing is recorded."""
    recorded = (cfg.get("model") or {}).get("fingerprint")
    if not recorded:
        return []
    from sae_shards.capture.initial_model import fingerprint

    now = fingerprint(initial)
    return sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))


def _other_initial_weights(initial: Path, cfg: Mapping[str, Any]) -> str | None:
    """Why the weights at ``initial`` are not the ones the run started from (their files differ
    from ``config.json``'s ``model.fingerprint``), or None: the same, or nothing recorded."""
    changed = _changed_weight_files(initial, cfg)
    if not changed:
        return None
    return (f"the initial weights at {initial} are not the ones the run started from "
            f"({', '.join(changed)} differ from config.json's model.fingerprint: "
            "re-saved or edited since), so the update, the logit lens and every "
            "intervention would be measured against other weights; restore them, or "
            "give the directory holding them with --initial-model DIR")


def named_initial_refusal(run_dir: str | Path, initial: str | Path) -> str | None:
    """Why the directory a reader named as the run's initial model (``--initial-model DIR``)
    cannot be it, or None. Asked before the analysis starts: a wrong directory named on purpose
    is the reader's mistake to hear about, not a report whose interventions are left out."""
    initial = Path(initial)
    if rundir.earlier_results(initial):  # its config.json is the run's, not a model's
        return (f"--initial-model {initial} is a sae-shards run directory, not a saved model; "
                f"a run of the built-in tiny model keeps its initial weights in "
                f"{initial / 'model'}, any other was loaded from its config.json's model.path")
    if not (initial / "config.json").is_file():
        return (f"--initial-model {initial}: no saved model there (no config.json); name the "
                "directory the run's policy was loaded from, or its copy")
    changed = _changed_weight_files(initial, _read_config(Path(run_dir)))
    if not changed:
        return None
    return (f"--initial-model {initial} holds other weights than the run started from "
            f"({', '.join(changed)} differ from config.json's model.fingerprint); name the "
            "directory the run's policy was loaded from, or an unchanged copy of it")


def _whole_weights(folder: Path, cfg: Mapping[str, Any]) -> bool:
    """Whether ``folder`` holds a policy analysis can load: its config (an adapter's, with LoRA)
    and safetensors weights, not a ZeRO-3 checkpoint's partitions alone."""
    if _is_lora(cfg):
        return (folder / "adapter_config.json").is_file() and (
            folder / "adapter_model.safetensors").is_file()
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _zero_partitions(folder: Path) -> str | None:
    """The ``global_stepN`` folder of DeepSpeed ZeRO partitions in a TRL checkpoint, if any."""
    found = sorted(p.name for p in folder.glob("global_step*") if p.is_dir())
    return found[-1] if found else None


def _is_lora(cfg: Mapping[str, Any]) -> bool:
    return bool(((cfg.get("model") or {}).get("lora") or {}).get("enabled"))


_CONFIG_TYPES = {"model": dict, "model.path": str, "model.lora": dict, "model.fingerprint": dict,
                 "task": dict, "task.name": str, "task.options": dict, "rl": dict,
                 "rl.output_dir": str}
"""The entries of a run's ``config.json`` that loading its models (and ``policy_dir``) indexes,
and their type (each may also be null or absent)."""


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.json`` (``read_json_object``), with the entries ``_CONFIG_TYPES``
    names checked for their type: a hand-edited or foreign file fails here naming the entry,
    instead of with an AttributeError from deep inside loading the models."""
    path = Path(run_dir) / rundir.CONFIG
    try:
        cfg = read_json_object(path)
    except CheckpointError as e:
        if not path.exists():
            raise
        raise CheckpointError(f"{e}; the file was edited or damaged: copy it {AGAIN}") from None
    for key, want in _CONFIG_TYPES.items():
        parent, _, leaf = key.rpartition(".")
        value = (cfg.get(parent) or {}).get(leaf) if parent else cfg.get(key)
        if (found := wrong_type(key, value, want)) is not None:
            raise CheckpointError(
                f"{path}: {found} or null; the file was edited or is not a sae-shards run's "
                "config.json: copy it again from the run")
    return cfg


def read_json_object(path: Path) -> dict[str, Any]:
    """A run's JSON file that holds an object; missing, not JSON or not an object is a
    ``CheckpointError`` naming it."""
    try:
        value = json_read.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing; is this a sae-shards run directory?") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
