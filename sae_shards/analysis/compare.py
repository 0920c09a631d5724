"""Do two SAEs find the same shards? Each shard of one set matched to its nearest in the other.

Two runs of the same RL setup under other seeds (or two SAEs trained on one run's updates)
should agree on the shards that are real: a direction RL reinforced in some context is there
to be found again. ``compare_shards`` matches each trained shard of ``a`` to the shard of ``b``
whose decoder direction is nearest (largest |cosine|, in factored form), and measures the same
match against a *chance* control made for it (``span_chance``): the 95th percentile, over 20
redraws, of the best |cosine| it reaches with as many random directions of the span of ``b``'s
trained shards as ``b`` has, each direction's block on every target cut to the SAE's rank (a
shard's shape). Every shard of an SAE lies close to the span of the updates it was trained on,
so two SAEs of one run agree far better than random directions of the whole parameter space
would (about 0.01 there); a pair is worth reading when it beats directions of ``b``'s own span
and shape, which asks whether ``b`` holds *this* direction as one shard and not only somewhere
in its span. Where ``a`` and ``b`` share nothing about 1 pair in 20 beats it. The cut matters:
a cosine between two low-rank directions has heavier tails than one with a dense sum, and
uncut random directions of the span were beaten by 82% of the pairs of two unrelated sets.

Left out of the count:
- shards that never fired, or fired on fewer than ``min_density`` of their SAE's samples;
- shards that never trained away from their initial direction (``ShardSet.initial_cosines`` >=
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
from sae_shards.analysis.shards import INIT_KEPT, ShardSet
from sae_shards.core import json_read
from sae_shards.core.checkpoint import SAE_FILE
from sae_shards.core.factored import cross_gram
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
    """``span_chance``: the 95th percentile over redraws of the largest |cosine| ``a``'s shard
    reaches with as many random directions of ``b``'s span (of a shard's shape) as the match
    had candidates; NaN for an always-on shard, or when ``b`` has one trained shard (no
    control: the threshold alone decides)."""
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


CHANCE_REDRAWS = 20
"""Sets of random directions ``span_chance`` draws, each as large as ``b``'s candidate set."""

CHANCE_QUANTILE = 0.95
"""The quantile over those sets of the best |cosine| a set gives: the chance a pair must beat.
Where ``a`` and ``b`` share nothing, a pair beats it about 1 time in 20."""


def span_chance(a: ShardSet, b: ShardSet, candidates: list[int], generator: torch.Generator,
                signed: bool = False, redraws: int = CHANCE_REDRAWS) -> Tensor:
    """``[n_a]``: for each shard of ``a``, the ``CHANCE_QUANTILE`` over ``redraws`` sets of the
    largest |cosine| (signed cosine with ``signed``) it reaches with a set of random
    directions of ``b``'s shape, as many as ``candidates`` (``b``'s shards a match is chosen
    from). Each random direction is a Gaussian combination of the candidates (a direction of
    their span) with its block on every target cut to the SAE's rank by its singular value
    decomposition, so that it is shaped as a shard is: a cosine between two low-rank
    directions has heavier tails than one with a dense sum, which a shard of an unrelated set
    beat for 4 in 5 of its shards. All in factored form: the cut is the SVD of a small
    ``[n r, n r]`` matrix per direction and target. NaN with fewer than two candidates (the
    span of one shard is that shard)."""
    n_a = len(a)
    if len(candidates) < 2:
        return torch.full((n_a,), math.nan)
    n = len(candidates)
    draws = n * redraws
    weights = torch.randn(draws, n, generator=generator, dtype=torch.float64)
    cross = torch.zeros(n_a, draws, dtype=torch.float64)
    square = torch.zeros(draws, dtype=torch.float64)
    with torch.no_grad():
        for mine, theirs in zip(a.sae.factors, b.sae.factors):
            drawn, norm2 = _span_draws(theirs.factors("decoder"), candidates, weights)
            cross += cross_gram(tuple(f.double() for f in mine.factors("decoder")), drawn)
            square += norm2
    own = a.target_norms().double().pow(2).sum(1).sqrt().clamp_min(1e-30)  # [n_a]
    cos = cross / own[:, None] / square.clamp_min(1e-30).sqrt()[None]  # [n_a, draws]
    best = (cos if signed else cos.abs()).view(n_a, redraws, n).max(2).values
    return torch.quantile(best, CHANCE_QUANTILE, dim=1).float()


def _span_draws(factors: tuple[Tensor, ...], candidates: list[int], weights: Tensor
                ) -> tuple[tuple[Tensor, ...], Tensor]:
    """One target's blocks of the random span directions: ``weights`` ``[draws, n]`` combine
    the ``candidates``' blocks; a matrix block is cut to the candidates' rank r. Returns the
    blocks' factors (``(U [draws, m, r], V [draws, k, r])``, or ``(d [draws, m],)``) and their
    squared Frobenius norms ``[draws]``."""
    if len(factors) == 1:  # a vector target: the combination itself
        d = weights @ factors[0][candidates].double()  # [draws, m]
        return (d,), d.pow(2).sum(1)
    U, V = (f[candidates].double() for f in factors)  # [n, m, r], [n, k, r]
    n, m, r = U.shape
    qu, ru = torch.linalg.qr(U.permute(1, 0, 2).reshape(m, n * r))  # [m, q], [q, n r]
    qv, rv = torch.linalg.qr(V.permute(1, 0, 2).reshape(V.shape[1], n * r))
    # sum_j w_j U_j V_j^T = qu (ru diag(w) rv^T) qv^T: the SVD of the small middle factor
    middle = (ru[None] * weights.repeat_interleave(r, dim=1)[:, None, :]) @ rv.T[None]
    left, sv, right_t = torch.linalg.svd(middle)  # [draws, q, q], [draws, q], [draws, q, q]
    keep = min(r, sv.shape[1])
    u_cut = qu @ (left[:, :, :keep] * sv[:, None, :keep])  # [draws, m, keep]
    v_cut = qv @ right_t[:, :keep, :].transpose(1, 2)  # [draws, k, keep]
    return (u_cut, v_cut), sv[:, :keep].pow(2).sum(1)


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
    # [n_a], [n_b]; NaN (a subset saved without its original's size: start unknown) is moved
    moved_a = ~(a.initial_cosines() >= INIT_KEPT)
    moved_b = ~(b.initial_cosines() >= INIT_KEPT)
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
    is not a ``.json`` file's, one under a file, one inside a folder a run writes itself
    (``rundir.inside_run_folder``), or an existing file other than an earlier comparison (a
    run's own ``config.json`` would be lost)."""
    if path.suffix != ".json" or path.is_dir():
        return f"--out {path} is not a .json file's path"
    inside = rundir.inside_run_folder(path.parent)
    if inside is not None:  # its checkpoints, which the run prunes and removes
        return (f"--out {path} is in {inside[1]}/ of the run in {inside[0]}, which the run "
                "itself writes; give a file outside the run's own folders")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"--out {path}: {above} is a file, not a directory"
    if path.exists():
        try:
            earlier = json_read.loads(path.read_text())
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
             f"above chance, at any |cos|: {len(result.above_chance)} (about "
             f"{(1 - CHANCE_QUANTILE) * len(result.pairs):.0f} where A and B share nothing); "
             f"median |cos| {figures['median_abs_cosine']:.3f}, chance median "
             f"{figures['chance_median_abs_cosine']:.3f} (chance: the "
             f"{100 * CHANCE_QUANTILE:g}th percentile over {CHANCE_REDRAWS} redraws of the best "
             "|cos| with as many random directions of the span of B's trained shards, each cut "
             "to the SAE's rank)"]
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
    if result.n_trained_b == 1:
        lines.append("note: B has one trained shard, so there is no chance control (the span "
                     "of one shard is that shard): the threshold alone decides")
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
