"""Do two SAEs find the same shards? Each shard of one set matched to its nearest in the other.

Two runs of the same RL setup under other seeds (or two SAEs trained on one run's updates)
should agree on the shards that are real: a direction RL reinforced in some context is there
to be found again. ``compare_shards`` matches each trained shard of ``a`` to the shard of ``b``
whose decoder direction is nearest (largest |cosine|, in factored form), and measures the same
match against a *chance* control made for it (``span_chance``): as many random shard-shaped
directions as ``b`` has candidates, each a trained shard of ``b`` whose block on every target is
turned to a random direction of the same norm within ``b``'s factor spans (the spans of its
shards' ``U``, ``V`` factors). Every shard of an SAE lies close to the spans of the updates it
was trained on, so two SAEs of one run agree far better than random directions of the whole
parameter space would (about 0.01 there); a pair is worth reading when it beats directions of
``b``'s own shape and spaces, which asks whether ``b`` holds *this* direction as one shard.
The control has the candidates' rank and share per target because a cosine between low-rank
directions is heavier-tailed than one with a dense sum: random directions of the span were
beaten by 82% of the pairs of two unrelated sets; this control by half of them.

Left out of the count:
- shards that never fired, or fired on fewer than ``min_density`` of their SAE's samples;
- shards that never trained away from their initial direction (``initial_cosines`` >=
  ``INIT_KEPT``): a shard that fires with tiny coefficients keeps its random start, which
  matches itself in another checkpoint of the run, or in a run of the same ``sae.seed``;
- shards active on nearly every sample (``families.ALWAYS_ON_DENSITY``: the drift direction),
  matched and listed apart.

Matching is nearest-neighbour among ``b``'s trained shards (fired, and left their initial
direction), not one-to-one: two shards of ``a`` may match one of ``b``. An untrained shard of
``b`` is its random start, a direction of the whole space and not of the span the chance is
drawn in: it would beat its chance for free, and it is no shard of ``b``'s.
A pair is *mutual* when ``a``'s shard is also the nearest to its match among ``a``'s compared
shards. Nearest is by |cosine| when either SAE keeps its codes' sign (``SAEConfig.signed``, the
default ``signed_topk``: a shard and its negative are one), by the signed cosine when both
SAEs' codes are non-negative (shard d and shard -d then fire on opposite updates).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_shards.analysis.families import ALWAYS_ON_DENSITY, is_always_on
from sae_shards.analysis.shards import ShardSet
from sae_shards.core.checkpoint import SAE_FILE
from sae_shards.core.factored import cross_gram
from sae_shards.core.sae import LowRankSAE
from sae_shards.run import rundir

REPLICATED = 0.7
"""The default |cosine| at or above which a shard counts as found again in the other set
(``compare_shards``' ``threshold``), when it also beats its chance control: a convention of
SAE feature-matching studies, not a figure tuned on this project's runs."""

MIN_DENSITY = 0.01
"""The default share of its SAE's training samples a shard of ``a`` must have fired on to be
compared (``compare_shards``' ``min_density``). A shard that fires on fewer is as good as dead;
its direction may still move (AuxK trains dead latents on what the others leave unexplained),
but it describes no context of the run."""

INIT_KEPT = 0.5
"""A shard whose direction keeps |cosine| >= this with its own initial direction never
trained away from it. On three default runs the figure is bimodal: at most 0.33 for the shards
that trained (0.03 for those firing on 1% of samples or more), 0.94 to 0.99 for those that did
not (one firing on 5% of samples, with tiny coefficients), and one shard at 0.72."""

CHANCE_SEED = 0
"""The seed of ``span_chance``'s random directions (a comparison is reproducible)."""


@dataclass(frozen=True)
class ShardPair:
    """One shard of ``a`` and its nearest in ``b``."""

    shard: int
    """Its index in ``a``."""
    match: int
    """The index of its nearest shard in ``b``, among ``b``'s trained shards (fired, and left
    their initial direction: ``INIT_KEPT``)."""
    cosine: float
    """Their signed cosine (a sign flip is the same direction)."""
    chance: float
    """The largest |cosine| ``a``'s shard reaches with ``span_chance``'s random shard-shaped
    directions of ``b``, one per candidate: the best of as many chance candidates as the match
    had; NaN for an always-on shard."""
    mutual: bool
    """``a``'s shard is also the nearest to ``match`` among ``a``'s compared shards."""
    density: float
    """How often ``a``'s shard fired over its SAE's training (its running statistics)."""
    match_density: float
    """The same for ``b``'s shard."""


@dataclass(frozen=True)
class Comparison:
    """``compare_shards``' result: the pairs by |cosine|, highest first."""

    pairs: list[ShardPair]
    """``a``'s compared shards (trained, fired at ``min_density``, not always on)."""
    always_on: list[ShardPair]
    """``a``'s trained always-on shards (the drift direction), matched but never counted."""
    threshold: float
    """The |cosine| a pair needs, beside beating its chance, to count as replicated."""
    min_density: float
    """The share of its SAE's training samples a shard of ``a`` fired on to be compared."""
    n_rare: int
    """``a``'s shards left out for firing on fewer than ``min_density`` of them, or never."""
    n_untrained: int
    """``a``'s shards that fired but never left their initial direction, left out."""
    same_init: bool
    """``a`` and ``b`` are two runs whose SAEs started from one initialisation (the same
    ``sae.seed``)."""
    signed: bool
    """Matched by the signed cosine (both SAEs' codes non-negative); else by |cosine|."""
    other_initial_models: bool | None
    """The two runs started from other initial weights (their ``config.json``'s
    ``model.fingerprint`` differ): their updates are taken around other points, and shards of
    two different models need not share a direction. None: unknown (a set not in a run's
    ``checkpoints/``, or a run that recorded none)."""
    other_samples: list[str]
    """What differs between the samples the two SAEs learnt from (capture source, sample form:
    parameter updates against gradients, per step against per event); [] when nothing does."""
    n_trained_b: int
    """``b``'s trained shards, the candidates every match is drawn from (0: nothing compared)."""

    def _score(self, p: ShardPair) -> float:
        return p.cosine if self.signed else abs(p.cosine)

    @property
    def replicated(self) -> list[ShardPair]:
        """The pairs at ``|cosine| >= threshold`` (the signed cosine when ``signed``) that
        also beat their chance control."""
        return [p for p in self.pairs
                if self._score(p) >= self.threshold and not self._score(p) <= p.chance]

    @property
    def above_chance(self) -> list[ShardPair]:
        """The pairs whose |cosine| beats their chance control, whatever the threshold."""
        return [p for p in self.pairs if self._score(p) > p.chance]

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "min_density": self.min_density,
                "compared": len(self.pairs), "replicated": len(self.replicated),
                "replicated_mutual": sum(p.mutual for p in self.replicated),
                "above_chance": len(self.above_chance),
                "median_abs_cosine": _median([abs(p.cosine) for p in self.pairs]),
                "chance_median_abs_cosine": _median([p.chance for p in self.pairs]),
                "left_out_rare": self.n_rare, "left_out_untrained": self.n_untrained,
                "same_init": self.same_init, "signed": self.signed,
                "other_initial_models": self.other_initial_models,
                "other_samples": self.other_samples, "trained_b": self.n_trained_b,
                "pairs": [dataclasses.asdict(p) for p in self.pairs],
                "always_on": [dataclasses.asdict(p) for p in self.always_on]}


def _median(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


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


def initial_cosines(shards: ShardSet) -> Tensor:
    """``[n_shards]``: each shard's |cosine| with its own initial direction (an untrained SAE
    of its config, seed and targets; factored, never dense)."""
    start = LowRankSAE(shards.sae.targets, shards.sae.cfg, shards.sae.sample_form)
    return shards.cosine_matrix(ShardSet(start, {}, {})).diagonal().abs()


def span_chance(a: ShardSet, b: ShardSet, candidates: list[int], generator: torch.Generator,
                signed: bool = False) -> Tensor:
    """``[n_a]``: for each shard of ``a``, the largest |cosine| (signed cosine with ``signed``)
    it reaches with random *shard-shaped* directions of ``b``, one per candidate (``b``'s
    shards a match is chosen from): candidate i with each target's block replaced by a random
    one of the same norm, whose decoder factors (``U`` and ``V`` of a matrix, ``d`` of a
    vector) are Gaussian combinations of the candidates' same factors. Each keeps a
    candidate's rank and its share on every target, and lies in ``b``'s factor spans, as a shard
    of ``b`` does; only which direction it takes within them is chance. A dense combination of
    the candidates (a random direction of their span) has the lighter-tailed cosines of a sum
    of many terms, which a shard of an unrelated set beat for 4 in 5 of its shards, and so
    does a combination whose share per target is an average of the candidates'. NaN when there
    is no candidate."""
    if not candidates:
        return torch.full((len(a),), math.nan)
    n = len(candidates)
    weights = [torch.randn(n, n, generator=generator) for _ in range(2)]  # [draws, n] per factor
    shares = b.target_norms()[candidates]  # [n, n_targets]: each candidate's norm per target
    cross = torch.zeros(len(a), n)
    with torch.no_grad():
        for t, (mine, theirs) in enumerate(zip(a.sae.factors, b.sae.factors)):
            drawn = tuple(torch.einsum("dj,j...->d...", w, f[candidates].float())
                          for w, f in zip(weights, theirs.factors("decoder")))
            norm = cross_gram(drawn, drawn).diagonal().clamp_min(0).sqrt()  # [draws]
            cross += cross_gram(mine.factors("decoder"), drawn) * (
                shares[:, t] / norm.clamp_min(1e-30))[None]
    own = a.target_norms().pow(2).sum(1).sqrt().clamp_min(1e-30)  # [n_a]
    total = shares.pow(2).sum(1).sqrt().clamp_min(1e-30)  # [draws]: each candidate's norm
    cos = cross / own[:, None] / total[None]  # [n_a, draws]
    return (cos if signed else cos.abs()).max(1).values


def compare_shards(a: ShardSet, b: ShardSet, threshold: float = REPLICATED,
                   min_density: float = MIN_DENSITY) -> Comparison:
    """Each trained shard of ``a`` that fired on at least ``min_density`` of its SAE's
    training samples, matched to its nearest in ``b`` and against its chance control
    (``span_chance``); ``a`` and ``b`` must cover the same targets and shapes (``ValueError``
    otherwise). A set saved without running statistics has every trained shard compared."""
    check_threshold(threshold)
    check_min_density(min_density)
    density, other = _densities(a), _densities(b)
    cos = a.cosine_matrix(b)  # [n_a, n_b]
    signed = not (a.sae.cfg.signed or b.sae.cfg.signed)
    score = cos if signed else cos.abs()  # what "nearest" maximises
    moved_a = initial_cosines(a) < INIT_KEPT  # [n_a]
    moved_b = initial_cosines(b) < INIT_KEPT  # [n_b]
    rare = [d == 0 or d < min_density for d in density]  # NaN: unknown, compared
    compared = [i for i in range(len(a)) if not rare[i] and bool(moved_a[i])]
    counted = [i for i in compared if not is_always_on(density[i])]
    # B's candidates are its trained shards, as A's compared ones are: an untrained shard is
    # its random start, a direction of the whole space, which beats the span's chance for free
    trained_b = [j for j in range(len(b)) if bool(moved_b[j]) and other[j] != 0]
    chance = span_chance(a, b, trained_b, torch.Generator().manual_seed(CHANCE_SEED),
                         signed)  # [n_a]: as many random shard-shaped directions as candidates
    if not trained_b:
        compared = counted = []  # nothing of B's to match: said by comparison_lines
    best = [trained_b[k] for k in score[:, trained_b].argmax(1).tolist()] if trained_b else []
    nearest_in_a = {trained_b[j]: compared[k] for j, k in
                    enumerate(score[compared][:, trained_b].argmax(0).tolist())
                    } if compared else {}

    def pair(i: int, always_on: bool) -> ShardPair:
        j = best[i]
        return ShardPair(i, j, float(cos[i, j]), math.nan if always_on else float(chance[i]),
                         nearest_in_a.get(j) == i, density[i], other[j])

    pairs = sorted((pair(i, False) for i in counted),
                   key=lambda p: -(p.cosine if signed else abs(p.cosine)))
    always = [pair(i, True) for i in compared if is_always_on(density[i])]
    prints = [initial_fingerprint(s) for s in (a, b)]
    return Comparison(pairs, always, threshold, min_density, sum(rare),
                      sum(not rare[i] and not bool(moved_a[i]) for i in range(len(a))),
                      a.same_initialisation(b), signed,
                      None if None in prints else prints[0] != prints[1], _other_samples(a, b),
                      len(trained_b))


def check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: a |cosine| in (0, 1]")


def check_min_density(min_density: float) -> None:
    if not 0 <= min_density < ALWAYS_ON_DENSITY:
        raise ValueError(f"min_density={min_density!r}: a share of samples in "
                         f"[0, {ALWAYS_ON_DENSITY}) (at {ALWAYS_ON_DENSITY} a shard is always on)")


def initial_fingerprint(shards: ShardSet) -> dict[str, str] | None:
    """The hashes of the initial model's weight files that the run holding ``shards`` (a
    checkpoint in its ``checkpoints/``) recorded; None when unknown."""
    if shards.path is None or Path(shards.path).parent.name != rundir.CHECKPOINTS:
        return None
    model = rundir.section(rundir.read_config(Path(shards.path).parent.parent), "model")
    printed = model.get("fingerprint")
    return printed if isinstance(printed, dict) and printed else None


def _other_samples(a: ShardSet, b: ShardSet) -> list[str]:
    """What differs between the two SAEs' samples: the capture source and the sample form."""
    differ = []
    if a.meta.get("source") != b.meta.get("source"):
        differ.append(f"source {a.meta.get('source')} vs {b.meta.get('source')}")
    if a.sae.sample_form != b.sae.sample_form:
        differ.append(f"samples {a.sae.sample_form} vs {b.sae.sample_form} (per step vs per "
                      "event)" if "factored" in (a.sae.sample_form, b.sae.sample_form) else
                      f"samples {a.sae.sample_form} vs {b.sae.sample_form}")
    return differ


def _densities(shards: ShardSet) -> list[float]:
    """Each shard's density over its SAE's training: NaN for a set saved without statistics
    (whether it fired is unknown: compared, never taken as always on)."""
    return [s.density for s in shards]


def comparison_path_refusal(path: Path) -> str | None:
    """Why ``sae-shards compare --out path`` is refused (None: it may be written): a path that
    is not a ``.json`` file's, one under a file, or an existing file other than an earlier
    comparison (a run's own ``config.json`` would be lost)."""
    if path.suffix != ".json" or path.is_dir():
        return f"--out {path} is not a .json file's path"
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"--out {path}: {above} is a file, not a directory"
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not (isinstance(earlier, dict) and {"pairs", "above_chance"} <= set(earlier)):
            return (f"--out {path} exists and is not an earlier comparison; nothing was "
                    "overwritten: give a new path")
    return None


def _index_map(indices: list[int], shown: int = 12) -> str:
    """``0->13, 1->2, ...``: a subset's indices beside the original ones."""
    pairs = ", ".join(f"{i}->{j}" for i, j in enumerate(indices[:shown]))
    return pairs + (f", ... ({len(indices) - shown} more)" if len(indices) > shown else "")


def comparison_lines(result: Comparison, a: ShardSet, b: ShardSet,
                     top: int | None = None) -> list[str]:
    """``sae-shards compare``'s printout: the figures, then one line per pair (the ``top``
    pairs by |cosine|, then the always-on ones; every pair for None)."""
    def fired(d: float) -> str:
        return ("     ?" if math.isnan(d) else "  <0.1%" if 0 < d < 1e-3
                else f"{100 * d:6.1f}%")

    figures = result.to_dict()
    rare = ("never fired" if result.min_density == 0 else
            f"fired on less than {100 * result.min_density:g}% of their SAE's samples")
    lines = [f"A: {a.path} ({len(a)} shards; left out: {result.n_rare} {rare}, "
             f"{result.n_untrained} never left their initial direction)",
             f"B: {b.path} ({len(b)} shards, {result.n_trained_b} of them trained: the "
             "candidates)",
             f"replicated (|cos| >= {result.threshold:g} and above chance): "
             f"{len(result.replicated)} of the {len(result.pairs)} compared shards of A "
             f"({figures['replicated_mutual']} of them mutual nearest), always-on ones apart",
             f"above chance, at any |cos|: {len(result.above_chance)}; median |cos| "
             f"{figures['median_abs_cosine']:.3f}, chance median "
             f"{figures['chance_median_abs_cosine']:.3f} (chance: B's trained shards, each "
             "with its blocks turned to random ones within B's factor spans)"]
    none = not result.pairs and not result.always_on  # no median, no row: said why instead
    if none and not result.n_trained_b:
        lines[2:] = [f"no shard of B trained (all {len(b)} never fired or never left their "
                     "initial direction, as in an SAE early in its training): nothing to match "
                     "A's shards to; compare a later checkpoint of B"]
    elif none:
        lower = (", or lower --min-density" if result.n_rare and result.min_density > 0
                 else "")
        lines[2:] = [f"no shard of A was compared: all {len(a)} are left out above (an SAE "
                     "early in its training has few trained shards): compare a later "
                     f"checkpoint{lower}"]
    if result.other_initial_models:
        lines.append("note: A's and B's runs started from other initial weights (their "
                     "config.json's model.fingerprint differ): their updates are taken around "
                     "other points in parameter space, where the same behaviour need not have "
                     "the same direction; compare runs of one initial model")
    if result.other_samples:
        lines.append(f"note: the two SAEs learnt from other samples ({'; '.join(result.other_samples)}): "
                     "their shards describe other quantities")
    if a.path is not None and b.path is not None and \
            Path(a.path).resolve() == Path(b.path).resolve():
        lines.append("note: A and B are the same checkpoint: every shard matches itself")
    for side, shards in (("A", a), ("B", b)):
        subset = shards.subset_origin()
        if subset is not None:
            lines.append(f"note: {side} holds shards chosen from "
                         f"{subset[0] or 'an unsaved checkpoint'}, listed by their indices "
                         f"here; there they are {_index_map(subset[1])}")
    if result.signed:
        lines.append("note: both SAEs' codes are non-negative, so a shard and its negative are "
                     "other shards: matched by the signed cosine")
    if result.same_init:
        lines.append(f"note: A's and B's SAEs started from one initialisation (sae.seed="
                     f"{a.sae.cfg.seed}); shards that never left it are left out, but compare "
                     "runs of different sae.seed where you can")
    if none:
        return lines
    lines.append("  shard    fired   match    fired   cosine   chance   (fired: on the share of "
                 "its SAE's training samples; the report's timeline is the buffer at the run's "
                 "end)")
    shown = result.pairs if top is None else result.pairs[:top]

    def row(p: ShardPair, tag: str) -> str:
        marks = "" if p.mutual else "  not mutual"
        chance = "      -" if math.isnan(p.chance) else f"{p.chance:7.3f}"
        return (f"  {p.shard:5d}  {fired(p.density)}  {p.match:6d}  {fired(p.match_density)}  "
                f"{p.cosine:+7.3f}  {chance}{tag}{marks}")

    lines += [row(p, "") for p in shown]
    lines += [row(p, "  always on (drift)") for p in result.always_on]
    if len(shown) < len(result.pairs):
        lines.append(f"  ... {len(result.pairs) - len(shown)} more pairs, of lower |cos| "
                     "(--top 0 lists every pair; --out writes them)")
    return lines
