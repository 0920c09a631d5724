"""Do two SAEs find the same shards? Each shard of one set matched to its nearest in the other.

Two runs of the same RL setup under other seeds (or two SAEs trained on one run's updates)
should agree on the shards that are real: a direction RL reinforced in some context is there
to be found again. ``compare_shards`` matches each shard of ``a`` that fired to the shard of
``b`` whose decoder direction is nearest (largest |cosine|, in factored form), and measures
the same matching against a *chance* control: an untrained SAE of ``b``'s targets and config
under another ``sae.seed``, whose directions are random. A match is only worth reading above
what chance reaches.

Shards active on nearly every sample (``families.ALWAYS_ON_DENSITY``: the drift direction)
are matched apart and never counted; shards that fired on fewer than ``min_density`` of their
SAE's training samples are left out: a shard that barely trained keeps nearly its initial
direction, and two checkpoints of one run (or two runs of one ``sae.seed``) would match it to
itself by construction.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_shards.analysis.families import ALWAYS_ON_DENSITY
from sae_shards.analysis.shards import ShardSet
from sae_shards.core.checkpoint import SAE_FILE
from sae_shards.core.sae import LowRankSAE
from sae_shards.run import rundir

REPLICATED = 0.7
"""The default |cosine| at or above which a shard counts as found again in the other set
(``compare_shards``' ``threshold``): a convention of SAE feature-matching studies, not a figure
tuned on this project's runs."""

MIN_DENSITY = 0.01
"""The default share of its SAE's training samples a shard of ``a`` must have fired on to be
compared (``compare_shards``' ``min_density``)."""


@dataclass(frozen=True)
class ShardPair:
    """One shard of ``a`` and its nearest in ``b``."""

    shard: int
    """Its index in ``a``."""
    match: int
    """The index of its nearest shard in ``b``."""
    cosine: float
    """Their signed cosine (a sign flip is the same direction)."""
    density: float
    """How often ``a``'s shard fired over its SAE's training (its running statistics)."""
    match_density: float
    """The same for ``b``'s shard (0: it never fired, and kept its initial direction)."""


@dataclass(frozen=True)
class Comparison:
    """``compare_shards``' result: the pairs by |cosine|, highest first."""

    pairs: list[ShardPair]
    """``a``'s shards that fired and are not always on, each with its nearest in ``b``."""
    always_on: list[ShardPair]
    """``a``'s always-on shards (the drift direction), matched but never counted."""
    chance: list[float]
    """For each of ``pairs``, the largest |cosine| its shard reaches with the control's."""
    threshold: float
    """The |cosine| a pair needs to count as replicated."""
    same_init: bool
    """``a`` and ``b`` are two runs whose SAEs started from one initialisation (the same
    ``sae.seed``): a shard that trained little keeps its initial direction and matches its
    namesake by construction."""
    min_density: float
    """The share of its SAE's training samples a shard of ``a`` fired on to be compared."""
    n_rare: int
    """``a``'s shards that fired on fewer than ``min_density`` of them (or never), left out."""
    other_initial_models: bool | None
    """The two runs started from other initial weights (their ``config.json``'s
    ``model.fingerprint`` differ): their updates are taken around other points, and shards of
    two different models need not share a direction. None: unknown (a set not in a run's
    ``checkpoints/``, or a run that recorded none)."""

    @property
    def replicated(self) -> list[ShardPair]:
        return [p for p in self.pairs if abs(p.cosine) >= self.threshold]

    @property
    def chance_max(self) -> float:
        """The largest |cosine| any compared shard reaches with a random direction (NaN when
        none was compared)."""
        return max(self.chance, default=math.nan)

    def to_dict(self) -> dict[str, Any]:
        median = (float(torch.tensor([abs(p.cosine) for p in self.pairs]).median())
                  if self.pairs else math.nan)
        return {"threshold": self.threshold, "compared": len(self.pairs),
                "replicated": len(self.replicated), "median_abs_cosine": median,
                "chance_max_abs_cosine": self.chance_max,
                "chance_median_abs_cosine": (float(torch.tensor(self.chance).median())
                                             if self.chance else math.nan),
                "min_density": self.min_density, "left_out_rare": self.n_rare,
                "same_init": self.same_init,
                "other_initial_models": self.other_initial_models,
                "pairs": [dataclasses.asdict(p) for p in self.pairs],
                "always_on": [dataclasses.asdict(p) for p in self.always_on]}


def load_shards(path: str | Path, checkpoint: str | int | None = None) -> ShardSet:
    """The shards at ``path``: a run directory (its ``checkpoint``, by default the newest) or
    a checkpoint directory itself (``ShardSet.save``'s, or a run's ``checkpoints/final``)."""
    path = Path(path)
    if (path / SAE_FILE).is_file():
        if checkpoint is not None:
            raise ValueError(f"{path} is a checkpoint directory itself; a checkpoint "
                             f"({checkpoint}) can only be chosen in a run directory")
        return ShardSet.load(path)
    if (path / rundir.CHECKPOINTS).is_dir():
        return ShardSet.from_run(path, checkpoint)
    raise FileNotFoundError(f"{path} is neither a run directory (no {rundir.CHECKPOINTS}/) nor "
                            f"a checkpoint directory (no {SAE_FILE}); give a run_dir of "
                            "sae-shards train or ShardCallback, or a directory ShardSet.save "
                            "wrote")


def chance_control(like: ShardSet, avoid: tuple[int, ...]) -> ShardSet:
    """An untrained SAE of ``like``'s targets and config, under the smallest ``sae.seed``
    not in ``avoid``: random directions of the same low-rank structure."""
    seed = next(s for s in range(len(avoid) + 1) if s not in avoid)
    sae = LowRankSAE(like.sae.targets, dataclasses.replace(like.sae.cfg, seed=seed),
                     like.sae.sample_form)
    return ShardSet(sae, {}, {})


def compare_shards(a: ShardSet, b: ShardSet, threshold: float = REPLICATED,
                   min_density: float = MIN_DENSITY) -> Comparison:
    """Each shard of ``a`` that fired on at least ``min_density`` of its SAE's training
    samples, matched to its nearest in ``b`` and in a chance control (``chance_control``);
    ``a`` and ``b`` must cover the same targets and shapes (``ValueError`` otherwise). A set
    saved without running statistics has every shard compared."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: a |cosine| in (0, 1]")
    if not 0 <= min_density < ALWAYS_ON_DENSITY:
        raise ValueError(f"min_density={min_density!r}: a share of samples in "
                         f"[0, {ALWAYS_ON_DENSITY}) (at {ALWAYS_ON_DENSITY} a shard is always on)")
    density = _densities(a)
    other = _densities(b)
    cos = a.cosine_matrix(b)  # [n_a, n_b]
    best = cos.abs().argmax(1)
    control = a.cosine_matrix(chance_control(b, (a.sae.cfg.seed, b.sae.cfg.seed)))
    chance = control.abs().max(1).values  # [n_a]
    pairs, always_on, chances = [], [], []
    rare = [d == 0 or d < min_density for d in density]  # NaN: unknown, compared
    for i, j in enumerate(best.tolist()):
        if rare[i]:
            continue
        pair = ShardPair(i, j, float(cos[i, j]), density[i], other[j])
        if density[i] >= ALWAYS_ON_DENSITY:
            always_on.append(pair)
        else:
            pairs.append(pair)
            chances.append(float(chance[i]))
    order = sorted(range(len(pairs)), key=lambda k: -abs(pairs[k].cosine))
    prints = [initial_fingerprint(s) for s in (a, b)]
    return Comparison([pairs[k] for k in order], always_on, [chances[k] for k in order],
                      threshold, a.same_initialisation(b), min_density, sum(rare),
                      None if None in prints else prints[0] != prints[1])


def initial_fingerprint(shards: ShardSet) -> dict[str, str] | None:
    """The hashes of the initial model's weight files that the run holding ``shards`` (a
    checkpoint in its ``checkpoints/``) recorded; None when unknown."""
    if shards.path is None or Path(shards.path).parent.name != rundir.CHECKPOINTS:
        return None
    model = rundir.section(rundir.read_config(Path(shards.path).parent.parent), "model")
    printed = model.get("fingerprint")
    return printed if isinstance(printed, dict) and printed else None


def _densities(shards: ShardSet) -> list[float]:
    """Each shard's density over its SAE's training: NaN for a set saved without statistics
    (whether it fired is unknown: compared, never taken as always on)."""
    return [s.density for s in shards]


def comparison_path_refusal(path: Path) -> str | None:
    """Why ``sae-shards compare --out path`` is refused (None: it may be written): a path that
    is not a ``.json`` file's, or an existing file other than an earlier comparison (a run's
    own ``config.json`` would be lost)."""
    if path.suffix != ".json" or path.is_dir():
        return f"--out {path} is not a .json file's path"
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not (isinstance(earlier, dict) and {"pairs", "chance_max_abs_cosine"} <= set(earlier)):
            return (f"--out {path} exists and is not an earlier comparison; nothing was "
                    "overwritten: give a new path")
    return None


def comparison_lines(result: Comparison, a: ShardSet, b: ShardSet,
                     top: int | None = None) -> list[str]:
    """``sae-shards compare``'s printout: the figures, then one line per pair (the ``top``
    pairs by |cosine|, then the always-on ones; every pair for None)."""
    def fired(d: float) -> str:
        return ("     ?" if math.isnan(d) else "  <0.1%" if 0 < d < 1e-3
                else f"{100 * d:6.1f}%")

    figures = result.to_dict()
    lines = [f"A: {a.path} ({len(a)} shards; {result.n_rare} fired on less than "
             f"{100 * result.min_density:g}% of their SAE's samples, left out)",
             f"B: {b.path} ({len(b)} shards)",
             f"replicated (|cos| >= {result.threshold:g}): {len(result.replicated)} of the "
             f"{len(result.pairs)} other shards of A, always-on ones apart"]
    if result.pairs:
        lines.append(f"median |cos| {figures['median_abs_cosine']:.3f}; chance (an untrained "
                     f"SAE of B's config, another seed): median "
                     f"{figures['chance_median_abs_cosine']:.3f}, at most {result.chance_max:.3f}")
    if result.other_initial_models:
        lines.append("note: A's and B's runs started from other initial weights (their "
                     "config.json's model.fingerprint differ): their updates are taken around "
                     "other points in parameter space, where the same behaviour need not have "
                     "the same direction; compare runs of one initial model")
    if result.same_init:
        lines.append(f"note: A's and B's SAEs started from one initialisation (sae.seed="
                     f"{a.sae.cfg.seed}): a shard of B that fired little keeps its initial "
                     "direction and matches its namesake in A by construction; read the pairs "
                     "whose B shard fired, or compare runs of different sae.seed")
    lines.append("  shard    fired   match    fired   cosine")
    shown = result.pairs if top is None else result.pairs[:top]
    rows = [(p, "") for p in shown] + [(p, "  always on (drift)") for p in result.always_on]
    lines += [f"  {p.shard:5d}  {fired(p.density)}  {p.match:6d}  {fired(p.match_density)}  "
              f"{p.cosine:+7.3f}{tag}" for p, tag in rows]
    if len(shown) < len(result.pairs):
        lines.append(f"  ... {len(result.pairs) - len(shown)} more pairs, of lower |cos| "
                     "(--top 0 lists every pair; --out writes them)")
    return lines
