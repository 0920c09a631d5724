"""``sae-shards evaluate RUN_DIR``: are the shards real? Scores against sign-free ground truth.

Needs a run made with ``runner.save_samples=true`` and ``runner.heldout_every=k`` on a task that
labels its samples (``multiskill``). Samples held out from SAE training give the ground truth and
every held-out score; the rest choose what needs choosing (e.g. each task's best latent).

A sample is one RL step (``capture.granularity=step``) or one reinforcement event (``group`` /
``completion``: a prompt group has exactly one task). Per-step samples of the ``mixed`` schedule
hold several tasks: "task k present" is then the positive class of every AUROC, and a task's
principal direction comes from its one-task samples where it has at least two, else from every
sample it is present in (``truth_from`` says which, per task; ``groundtruth``).

``evaluation.json`` (and ``evaluation.md``) in the run directory opens with ``"headline"``:

- ``auroc_task``: per task, the latent whose ``|activation|`` best predicts "task k present" on
  the training samples, scored on the held-out samples; mean over tasks (every AUROC mean is
  over the tasks that have one: a task in every held-out sample has none, and is named in
  ``auroc_unscored``);
  ``auroc_null_control``: the same figure on a null-control run (``multiskill_null``), given as
  ``null_run`` (None when not given: the sweep fills it); ``auroc_supervised``: the supervised
  reference (|cos| to each task's training principal direction, held-out AUROC);
- ``mmcs``: mean over tasks of the max ``|cos|`` between a task's principal direction (held-out
  samples) and any shard (drift latents excluded), ``mmcs_null`` (held-out labels shuffled, mean
  of ``n_null`` shuffles), ``mmcs_margin``; ``mmcs_margin_supervised``: the same margin for the
  training samples' principal directions in place of the shards (what any direction estimated
  from the training samples reaches against this ground truth); below the headline,
  ``mmcs_margin_oracle`` is the margin of the held-out directions themselves (shards equal to
  the ground truth: mmcs 1 against the same null), a reference for a perfect answer (not a bound:
  shards that leave out the direction every task shares can score above it); and
  ``mmcs_class_mean``, a diagnostic: the same margins against each task's held-out class mean
  (signed; its shuffled null is the events' grand mean, while the principal-direction null
  above is the most coherent task's own direction);
- ``steering_selectivity`` / ``ablation_selectivity`` of each task's best latent and the
  ``..._random`` norm-matched random control (``causal``: median over tasks), plus the
  shuffled-label control (``..._shuffled``), the supervised directions' ablation selectivity
  (``ablation_selectivity_supervised``) and the rate at which ablating a task's shard breaks its
  own task first (``ablation_own_first``, beside ``ablation_own_first_shuffled``; chance is
  1 / n_tasks); ``steering_floored`` / ``ablation_floored`` (``..._family`` for families): the
  share of tasks whose selectivity divided by the floor, because the other tasks moved less
  than it (there the figure is a size, not a ratio; ``causal.floored``);
- ``granularity``, ``source`` (per-step: ``capture.source``; per-event: ``grad`` with
  ``-adam``/``-kfac`` for the preconditioner and ``-unit`` for unit-normalised events),
  ``schedule`` (``task.options.schedule``), ``group`` (``body`` / ``readout`` from the run's meta,
  else inferred from its targets).

**Shard families** (``families``; headline keys containing ``_family``, and ``n_families``). An
SAE with more latents than the run has contexts splits a context over several latents, each
firing on part of its samples. ``analysis.families`` groups the latents (drift latents and
latents that never fired left out) by the correlation of their ``|activation|`` over the
*training* samples, without labels (``family_threshold``, default ``FAMILY_THRESHOLD``; pairs
that fired together fewer than ``MIN_JOINT`` times are not linked); a family's strength on a
sample is the norm
of its members' summed contribution to the reconstruction, its direction the principal direction
of those contributions. Each task's best family is chosen and scored as a latent is
(``auroc_task_family``, beside a shuffled-label null and the null-control run's figure), its
direction matched to the ground truth (``mmcs_margin_family``) and steered and ablated (causal
kind ``shard_family``, against its own norm-matched random control ``random_shard_family``:
``..._family_random``). A latent that joins no group is a family of one; the per-latent
figures above remain the finer view. The nulls of latents and families use the same label
shuffles.

Below the headline, everything else: the shuffled nulls, per-task AUROC, purity, coverage
(and ``latent_aurocs_top3``: a task split over several latents shows close runners-up),
``separability`` (``groundtruth.separability``: what one labelled direction per task reaches,
sign-free, signed, class mean and linear probe, beside the best latent's ``auroc_task``),
``energy_share`` (each task's share of the held-out samples' squared norm; a sample of several
tasks gives each an equal part; ``energy_share_by_label_set`` keeps such samples under their
joined label set, as ``recipe.balance.energy_shares`` does), ``drift`` (below),
``fvu_heldout``, ``l0``, ``dead_frac`` (null until the SAE saw ``sae.dead_after`` samples), and
the causal tests in full (``causal``; a compact ``steering`` and ``ablation`` view per task;
``causal_skipped`` says why they are null: not asked for, a model directory missing, or a run
of a user's script evaluated without its reward, ``task``).

**Drift latents.** RL updates share a dominant common direction, and an SAE often spends one
latent on it, active on nearly every sample. A latent active on at least ``drift_density`` of the
training samples (default 0.8; with k of n latents active the mean density is k/n, 0.25 at the
planted settings) is a drift latent: it is never chosen as a task's latent nor counted in the
mmcs matching (``drift``: its index, density, and |cos| with the training samples' mean and top
principal direction; ``mmcs_with_drift`` keeps it, for comparison; ``top_direction_latent``: the
latent nearest that common direction and its density, flagged or not). Removing the running mean
direction from the samples before the SAE (the other remedy) is a capture-side change and is not
measured here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from sae_shards.core import json_read
from sae_shards.core.checkpoint import CheckpointError, SizeLimit, read_safetensors
from sae_shards.core.metrics import evaluate_heldout, match_directions, sample_sq_norms
from sae_shards.core.trainer import dead_fraction
from sae_shards.analysis.families import (ALWAYS_ON_DENSITY, FAMILY_THRESHOLD, Families,
                                          find_families, strengths, weight_matrix)
from sae_shards.analysis.shards import (ShardSet, load_run_models, run_models_missing,
                                        run_sampling)
from sae_shards.planted.causal import CausalSettings, causal_tests
from sae_shards.run import rundir
from sae_shards.planted.groundtruth import (abs_cosine, auroc, class_means, energy_shares,
                                            flatten, label_sets, mean_defined, norm_features,
                                            presence,
                                            principal_direction, rank_ceiling, separability,
                                            shuffled, supervised_reference,
                                            task_directions, task_directions_with_source,
                                            unflatten)
from sae_shards.run.config import ONE_LABEL_TASKS, sample_source

HEADLINE_KEYS = ("auroc_task", "auroc_null_control", "auroc_supervised", "mmcs", "mmcs_null",
                 "mmcs_margin", "mmcs_margin_supervised", "steering_selectivity",
                 "steering_selectivity_random", "ablation_selectivity",
                 "ablation_selectivity_random", "steering_selectivity_shuffled",
                 "ablation_selectivity_shuffled", "ablation_selectivity_supervised",
                 "ablation_own_first", "ablation_own_first_shuffled",
                 "auroc_task_family", "auroc_null_control_family", "mmcs_margin_family",
                 "steering_selectivity_family", "ablation_selectivity_family",
                 "steering_selectivity_family_random", "ablation_selectivity_family_random",
                 "n_families", "steering_floored", "ablation_floored",
                 "steering_floored_family", "ablation_floored_family",
                 "granularity", "source", "schedule", "group")
"""The keys of ``evaluation.json``'s ``"headline"`` (issue 12's list, then the causal controls the
design asks for beside the random direction, then the same figures for shard families, then how
often a selectivity's denominator was the floor)."""

_SEL = ("the shard's effect on its own task / mean |effect| on the others (or the floor); higher "
        "is better, median over tasks")
_NO_TASK = ("{}: it has no task of its own, so it stays small (within about +-3 over these "
            "few rollouts); read the shard's value against it")
_FLOORED = ("the share of tasks whose {} divides by the floor (the other tasks moved less than "
            "it): there the figure is the own effect in units of the floor, not a ratio")
HEADLINE_READ = {
    "auroc_task": "held-out AUROC of each task's best latent (0.5: chance, 1: perfect); "
                  "compare auroc_null_control",
    "auroc_null_control": "the same on the null-control run (a reward blind to the task): "
                          "should stay near 0.5",
    "auroc_supervised": "the same with each task's training principal direction (a labelled "
                        "reference, not a bound)",
    "mmcs": "mean over tasks of the best |cos| between a shard and the task's held-out "
            "principal direction (1: found exactly)",
    "mmcs_null": "the same against shuffled-label directions: what any answer gets",
    "mmcs_margin": "mmcs - mmcs_null; compare mmcs_margin_supervised",
    "mmcs_margin_supervised": "the margin of the training principal directions: what a "
                              "labelled estimate reaches",
    "steering_selectivity": f"adding alpha x the run's update along the shard to the initial "
                            f"weights (+ sign; both signs below): {_SEL}",
    "steering_selectivity_random": _NO_TASK.format("a norm-matched random direction"),
    "ablation_selectivity": f"removing the run's update along the shard from the final "
                            f"weights (drop in reward): {_SEL}",
    "ablation_selectivity_random": _NO_TASK.format("a norm-matched random direction"),
    "steering_selectivity_shuffled": _NO_TASK.format("steering along shuffled-label directions"),
    "ablation_selectivity_shuffled": _NO_TASK.format("ablating shuffled-label directions"),
    "ablation_selectivity_supervised": "ablating the training principal directions: a "
                                       "labelled reference",
    "ablation_own_first": "how often ablating a task's shard hurts its own task most; "
                          "compare ablation_own_first_shuffled and chance 1/tasks",
    "ablation_own_first_shuffled": "the same for shuffled-label directions",
    "auroc_task_family": "auroc_task for shard families (co-firing latents) instead of "
                         "single latents",
    "auroc_null_control_family": "the same on the null-control run: near 0.5",
    "mmcs_margin_family": "mmcs_margin of the families' directions",
    "steering_selectivity_family": "steering_selectivity of the families",
    "ablation_selectivity_family": "ablation_selectivity of the families",
    "steering_selectivity_family_random": _NO_TASK.format("a random direction of the family's norm"),
    "ablation_selectivity_family_random": _NO_TASK.format("a random direction of the family's norm"),
    "n_families": "families found (single latents included)",
    "steering_floored": _FLOORED.format("steering_selectivity"),
    "ablation_floored": _FLOORED.format("ablation_selectivity"),
    "steering_floored_family": _FLOORED.format("steering_selectivity_family"),
    "ablation_floored_family": _FLOORED.format("ablation_selectivity_family"),
}
"""How to read each headline figure (``evaluation.md``'s third column)."""


def _why_missing(key: str, r: Mapping[str, Any]) -> str:
    """Why a headline figure is null, for ``evaluation.md``."""
    if "null_control" in key:
        return "n/a: no null-control run given (--null-run DIR; the sweep gives one)"
    if "selectivity" in key or "own_first" in key or "floored" in key:
        return f"n/a: no causal tests: {r.get('causal_skipped') or 'see below'}"
    return "n/a"


class EvalData:
    """A run's saved samples split into training and held-out samples, each with its task set."""

    def __init__(self, run_dir: Path, names: Sequence[str], from_step: int = 0,
                 shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        """``names``: the SAE's targets; ``shapes``: their shapes, when known, which each
        sample's must match."""
        path = run_dir / "samples.safetensors"
        _check_labelled_task(run_dir)
        finished = rundir.finished_steps(run_dir)
        if not path.is_file() and _saves_samples(run_dir) and finished is not None:
            raise CheckpointError(
                f"{path}: missing, though the run finished ({rundir.SUMMARY}: {finished} RL "
                "steps): a copy of the run without it; copy samples.safetensors from the run")
        writer = rundir.live_writer(run_dir) if not path.is_file() else None
        if writer and _saves_samples(run_dir):  # audit 134 F7: not 'resume' a live run
            raise CheckpointError(
                f"{path}: not written yet: the run is still training ({writer}) and writes "
                "its samples at its end; evaluate it once it has finished")
        if not path.is_file() and _saves_samples(run_dir):
            raise CheckpointError(
                f"{path}: missing: the run ended before writing it (killed, or stopped at once by a "
                "second signal); "
                "samples are written at the end of a run: finish it (sae-shards train "
                f"run_dir={run_dir} resume=true; in a script, ShardCallback(..., resume=True) "
                "and trainer.train(resume_from_checkpoint=True))")
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; evaluate needs the run's samples and held-out steps "
                "(runner.save_samples=true runner.heldout_every=k; in a script, "
                "ShardCallback(..., runner={'save_samples': True, 'heldout_every': k})) on a task "
                "with several labels (sae-shards train experiment=planted sets all of it)")
        tensors, header = read_safetensors(
            path, limit=_samples_limit(run_dir, shapes or {}),
            advice="restore it from a copy of the run (a run writes it once, at its end)")
        if "task_labels" not in header:
            raise CheckpointError(f"{path}: no task_labels in the header; re-save the samples "
                                  "with sae_shards.job.save_samples")
        _check_samples(path, tensors, header["task_labels"], names, shapes or {})
        self.labels = label_sets(json_read.loads(header["task_labels"]))
        if any(not lab for lab in self.labels):
            raise CheckpointError(f"{path}: every sample needs at least one task label to "
                                  "evaluate (use a scheduled task such as multiskill)")
        self.heldout = tensors["heldout"]
        self.steps = tensors["rl_step"]
        self.samples = {n: tensors[f"sample.{n}"] for n in names}
        self.names = list(names)
        if int(self.heldout.sum()) < 2 or int((~self.heldout).sum()) < 2:
            raise CheckpointError(f"{path}: needs >= 2 held-out and >= 2 training samples "
                                  "(set runner.heldout_every)")
        sq = sum(torch.linalg.vector_norm(v.flatten(1).float(), dim=1).pow(2)
                 for v in self.samples.values())
        nonzero = sq > 0  # all-zero samples say nothing
        # Task directions drift: from_step restricts ground truth and scores to a late window.
        self.keep = nonzero & (self.steps >= from_step)
        self.tasks = sorted(set().union(*self.labels))
        if len(self.tasks) < 2:
            raise CheckpointError(f"{path}: the samples carry one task label ({self.tasks}); "
                                  "evaluating shards against tasks needs several (a run of "
                                  "task=multiskill)")
        self.multi_label = any(len(lab) > 1 for lab in self.labels)
        for heldout in (False, True):
            _, labels = self.split(heldout)
            short = [t for t in self.tasks if sum(t in lab for lab in labels) < 2]
            if short:
                last = int(self.steps.max()) if self.steps.numel() else 0
                raise CheckpointError(
                    f"{path}: tasks {short} have fewer than 2 non-zero "
                    f"{'held-out' if heldout else 'training'} samples"
                    + (f" from RL step {from_step} on (--from-step; the samples end at step "
                       f"{last}): lower it" if from_step else
                       "; run more RL steps or change runner.heldout_every"))

    def split(self, heldout: bool) -> tuple[dict[str, Tensor], list[frozenset[str]]]:
        mask = (self.heldout == heldout) & self.keep
        idx = mask.nonzero().flatten().tolist()
        return {n: v[mask] for n, v in self.samples.items()}, [self.labels[i] for i in idx]


def _samples_limit(run_dir: Path, shapes: Mapping[str, Sequence[int]]) -> SizeLimit | None:
    """The largest tensor ``samples.safetensors`` holds: a row per buffer slot
    (``capture.capacity`` in the run's ``config.json``) of the largest target; None when either
    is not known (the file is then held to this machine's memory only)."""
    capacity = rundir.section(rundir.read_config(run_dir), "capture").get("capacity")
    if not shapes or type(capacity) is not int or capacity < 1:
        return None
    largest = max(math.prod(shape) for shape in shapes.values())
    return SizeLimit(capacity * largest, f"capture.capacity={capacity} samples of its largest "
                                         f"target ({largest:,} numbers each)")


def _check_samples(path: Path, tensors: Mapping[str, Tensor], task_labels: str,
                   names: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> None:
    """``samples.safetensors`` as ``rundir.save_samples`` writes it: ``heldout`` bool ``[S]``,
    ``rl_step`` integer ``[S]``, ``sample.<target>`` floating ``[S, *shape]`` and finite for each
    target, and ``task_labels`` a JSON list of S labels (each a string or a list of strings). A
    damaged or foreign file is a ``CheckpointError`` naming it and what is wrong, instead of an error
    from inside torch, or labels paired with other samples than theirs."""
    problem, fix = None, "the file is damaged or not this run's: copy it again from the run"
    try:
        labels = json_read.loads(task_labels)
    except ValueError as e:
        labels, problem = None, f"task_labels in the header is not valid JSON ({e})"
    missing = [name for name in ("heldout", "rl_step", *(f"sample.{n}" for n in names))
               if name not in tensors]
    if problem is None and missing:
        problem = f"missing tensors {missing}"
    if problem is None:
        steps = tensors["rl_step"]
        rows = steps.shape[0] if steps.dim() == 1 else None
        is_int = not steps.dtype.is_floating_point and steps.dtype != torch.bool
        if rows is None or not is_int:
            problem = f"rl_step is {steps.dtype} {list(steps.shape)}, expected integer [S]"
        elif tensors["heldout"].dtype != torch.bool or list(tensors["heldout"].shape) != [rows]:
            held = tensors["heldout"]
            problem = f"heldout is {held.dtype} {list(held.shape)}, expected bool [{rows}]"
        elif not isinstance(labels, list) or len(labels) != rows:
            what = (f"{len(labels)} labels" if isinstance(labels, list)
                    else f"a {type(labels).__name__}")
            problem = (f"task_labels in the header is {what}, expected a list of {rows} (one per "
                       "sample: a task name or a list of them)")
        else:
            bad = [lab for lab in labels if not (isinstance(lab, str) or (
                isinstance(lab, list) and all(isinstance(t, str) for t in lab)))]
            if bad:
                problem = (f"task_labels in the header holds {bad[0]!r:.60}, expected a task "
                           "name or a list of them")
        for n in names:
            t = tensors[f"sample.{n}"]
            want = [rows, *shapes[n]] if n in shapes else None
            if problem is None and (not t.dtype.is_floating_point or t.dim() < 1
                                    or t.shape[0] != rows
                                    or (want is not None and list(t.shape) != want)):
                problem = (f"sample.{n} is {t.dtype} {list(t.shape)}, expected floating "
                           + (f"{want}" if want else f"[{rows}, ...]")
                           + " (one row per sample of rl_step)")
    if problem is None:
        _check_finite(path, {n: tensors[f"sample.{n}"] for n in names})
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}; {fix}")


def _check_finite(path: Path, samples: Mapping[str, Tensor]) -> None:
    """Every saved sample is finite: the capture skips an update with a NaN or Inf entry before
    it is buffered, so one here is damage (counted as an all-zero sample it would leave a task
    "fewer than 2 non-zero samples", or shift the figures)."""
    for name, t in samples.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise CheckpointError(
                f"{path}: tensor 'sample.{name}' has {bad:,} non-finite entries (NaN or Inf) of "
                f"{t.numel():,}; the run never saves one (the capture skips such an update), so "
                "the file is damaged or was edited: copy it again from the run, or rerun the run "
                "(runner.save_samples=true); do not edit it")


def latent_aurocs(acts: Tensor, labels: Sequence, tasks: Sequence[str],
                  exclude: Sequence[int] = ()) -> Tensor:
    """``[K, N]``: the AUROC of each latent's |activation| for "task k present" (``-1`` for the
    latents in ``exclude``, 0 where undefined)."""
    rows = []
    for t in tasks:
        pos = presence(labels, t)
        scores = [auroc(acts[:, j].abs(), pos) if j not in exclude else -1.0
                  for j in range(acts.shape[1])]
        rows.append([s if s == s else 0.0 for s in scores])
    return torch.tensor(rows, dtype=torch.float64)


def best_latents(acts: Tensor, labels: Sequence, tasks: Sequence[str],
                 exclude: Sequence[int] = ()) -> list[int]:
    """Per task, the latent (not in ``exclude``) whose |activation| has the highest AUROC for
    "task present"."""
    return latent_aurocs(acts, labels, tasks, exclude).argmax(1).tolist()


def _choose_and_score(scores_tr: Tensor, scores_te: Tensor, y_tr: Sequence, y_te: Sequence,
                      tasks: Sequence[str], null_labels: Sequence[Sequence],
                      exclude: Sequence[int] = ()
                      ) -> tuple[Tensor, list[int], dict[str, float], list[float]]:
    """Per task, the column (latent or family) of ``scores [S, C]`` whose |score| best predicts
    the task on the training samples, and its held-out AUROC; the same choice made with each of
    ``null_labels`` (shuffled training labels) gives the null. Returns the training AUROCs
    ``[K, C]``, the chosen columns, the held-out AUROC per task and the null's mean per shuffle."""
    held = lambda cols: {t: auroc(scores_te[:, c].abs(), presence(y_te, t))  # noqa: E731
                         for t, c in zip(tasks, cols)}
    train = latent_aurocs(scores_tr, y_tr, tasks, exclude)
    best = train.argmax(1).tolist()
    null = [mean_defined(held(best_latents(scores_tr, y, tasks, exclude)).values())
            for y in null_labels]
    return train, best, held(best), null


def _mmcs_margin(cos_of: Callable[[Tensor], Tensor], truth: Tensor,
                 null_truths: Sequence[Tensor]) -> dict[str, float]:
    """mmcs of a set of directions against ``truth [K, D]``, its null (the mean over
    ``null_truths``, each ``[K, D]``) and the margin. ``cos_of(refs [K, D]) -> [K, M]``: the
    |cos| of each reference with each of the M directions (shards, families, supervised, ...).
    No direction (M = 0: no shard family) gives None for all three."""
    cos = cos_of(truth)
    if cos.shape[1] == 0:
        return {"mmcs": None, "mmcs_null": None, "mmcs_margin": None}
    mmcs = float(cos.max(1).values.mean())
    null = sum(float(cos_of(t).max(1).values.mean()) for t in null_truths) / len(null_truths)
    return {"mmcs": mmcs, "mmcs_null": null, "mmcs_margin": mmcs - null}


def _class_mean_mmcs(flat_tr: Tensor, y_tr: list, flat_te: Tensor, y_te: list,
                     null_te: Sequence[list], tasks: list[str],
                     lat_cos: Callable[[Tensor], Tensor],
                     fam_cos: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """The mmcs margin against *signed* ground truth: each task's held-out class mean
    (``groundtruth.class_means``), its null the class means of the same shuffled held-out
    labellings. A diagnostic, not the headline's criterion.

    The headline's principal-direction null collapses: the principal direction of a random
    quarter of the events is the most coherent task's own direction, so a good answer scores
    nearly as high on the null as on the truth (``mmcs_margin_oracle``). The class mean of a
    random quarter is the events' grand mean instead. Meaningful for per-event samples, which
    keep their sign; per-step updates flip sign and their class means shrink towards zero."""
    truth = class_means(flat_te, y_te, tasks)
    nulls = [class_means(flat_te, y, tasks) for y in null_te]
    sup = class_means(flat_tr, y_tr, tasks)
    return {
        "latents": _mmcs_margin(lat_cos, truth, nulls),
        "families": _mmcs_margin(fam_cos, truth, nulls),
        "supervised": _mmcs_margin(lambda t: abs_cosine(t, sup), truth, nulls),
        "oracle": _mmcs_margin(lambda t: abs_cosine(t, truth), truth, nulls),
    }


@torch.no_grad()
def _heldout_figures(sae, x: Mapping[str, Tensor], chunk: int = 64) -> dict[str, float]:
    """Held-out FVU, ML2R and L0 of dense (materialised) samples on any SAE. Dense-sample SAEs
    use ``metrics.evaluate_heldout``; a per-event SAE (``sample_form="factored"``, no decoder
    bias) is scored as it is trained: FVU about zero, ``sum ||X - Xhat||^2 / sum ||X||^2``."""
    if getattr(sae, "sample_form", "dense") != "factored":
        held = evaluate_heldout(sae, [x])
        return {"fvu": held.fvu, "ml2r": held.ml2r, "l0": held.l0}
    n = next(iter(x.values())).shape[0]
    resid, total, ratios, l0 = 0.0, 0.0, [], []
    for i in range(0, n, chunk):
        xs = sae.to_scaled({k: v[i:i + chunk] for k, v in x.items()})
        codes = sae.encode(xs)
        rec = sae.decode(codes, with_bias=False)
        r = sum((xs[k] - rec[k]).double().flatten(1).pow(2).sum(1) for k in xs)
        xx = sum(xs[k].double().flatten(1).pow(2).sum(1) for k in xs)
        hh = sum(rec[k].double().flatten(1).pow(2).sum(1) for k in xs)
        resid += float(r.sum())
        total += float(xx.sum())
        ratios.append(hh.sqrt() / xx.sqrt().clamp_min(1e-30))
        l0.append(codes.active().sum(1).float())
    return {"fvu": resid / max(total, 1e-30), "ml2r": float(torch.cat(ratios).mean()),
            "l0": float(torch.cat(l0).mean())}


def run_settings(run_dir: Path, shards: ShardSet) -> dict[str, Any]:
    """``granularity``, ``source``, ``schedule``, ``group`` of a run (module docstring)."""
    cfg = rundir.read_config(run_dir)
    capture = rundir.section(cfg, "capture")
    granularity = capture.get("granularity", "step")
    source = sample_source(granularity, capture.get("source"),
                           capture.get("precondition", "none"), capture.get("normalize", "none"))
    task = cfg.get("task") or {}
    group = shards.meta.get("group")
    if group is None:
        names = shards.target_names
        if names and all(".layers." in n for n in names):
            group = "body"
        elif names and all(".layers." not in n for n in names):
            group = "readout"
        else:
            group = "mixed" if names else None
    return {"granularity": granularity, "source": source,
            "schedule": (task.get("options") or {}).get("schedule"), "group": group}


def evaluate_run(run_dir: str | Path, n_null: int = 5, seed: int | None = None,
                 steering: bool = True, checkpoint: str | None = None, alpha: float = 2.0,
                 n_prompts: int = 8,
                 from_step: int = 0, null_run: str | Path | Mapping[str, Any] | None = None,
                 drift_density: float = ALWAYS_ON_DENSITY, n_shuffled: int = 2,
                 n_samples: int = 4, floor: float = 0.005,
                 family_threshold: float = FAMILY_THRESHOLD, task: Any | None = None,
                 out: str | Path | None = None, initial_model: str | Path | None = None,
                 trust_remote_code: bool = False) -> dict[str, Any]:
    """All figures of one run (see the module docstring); also writes evaluation.json/.md to
    ``out`` (a directory, created if needed; default the run directory, which is otherwise only
    read).

    ``seed``: of the shuffled-label nulls and the causal controls; default the run's own seed
    (``config.json``), as ``sae-shards evaluate`` and ``scripts.planted_sweep`` use it.
    ``from_step`` keeps only RL steps >= it (training and held-out alike): the task directions
    drift, and early steps, before the policy is tag-conditioned, blur a global direction.
    ``steering`` runs the causal tests (steering and ablation; ``causal.causal_tests`` with
    ``alpha``, ``n_prompts`` prompts per task, ``n_samples`` completions each, ``n_shuffled``
    shuffled-label controls and ``floor``). ``null_run``: a null-control run directory (evaluated
    here without causal tests) or its evaluation dict; its ``auroc_task`` is the headline's
    ``auroc_null_control``. ``drift_density``: see the module docstring. ``family_threshold``:
    the co-activation correlation above which latents join one shard family
    (``analysis.families``). ``task``: the prompts and reward functions of a run of a user's own
    TRL script (a ``RewardTask`` with a ``label_column``), which the causal tests need and the run
    directory does not hold; a run of ``sae-shards train`` rebuilds its own. Without them the
    causal figures are null and ``causal_skipped`` says why. A ``null_run`` directory's own
    evaluation is written to it, or with ``out`` to ``out/null_control/``.
    ``initial_model``: the directory of the run's initial weights for the causal tests, when it
    moved from where ``config.json`` says (checked against the run's ``model.fingerprint``).
    ``trust_remote_code``: the causal tests load a policy that needs its own code (``auto_map``)
    by running the Python files of its directories (``shards.load_run_models``); off, they are
    skipped for such a run and ``causal_skipped`` says why.
    """
    run_dir = Path(run_dir)
    seed = rundir.run_seed(run_dir) if seed is None else seed
    shards = ShardSet.from_run(run_dir, checkpoint)
    sae = shards.sae
    s = _split(run_dir, shards, from_step)
    g = torch.Generator().manual_seed(seed)  # the label shuffles, then the causal tests
    settings = run_settings(run_dir, shards)
    lat = _latents(sae, s.x_tr, s.x_te, drift_density)
    fam = _shard_families(sae, lat, family_threshold)

    # ground truth on held-out samples, and the shards' and supervised directions' match to it
    truth, truth_from = task_directions_with_source(s.flat_te, s.y_te, s.tasks)
    match = match_directions(sae, unflatten(truth, s.shapes))
    null_te = [shuffled(s.y_te, g) for _ in range(n_null)]  # the mmcs nulls' held-out labellings
    null_truths = [task_directions(s.flat_te, y, s.tasks) for y in null_te]
    lat_cos = lambda t: match_directions(  # noqa: E731
        sae, unflatten(t, s.shapes)).abs_cos[:, lat.keep]
    lat_mmcs = _mmcs_margin(lat_cos, truth, null_truths)
    ref = supervised_reference(s.flat_tr, s.y_tr, s.flat_te, s.y_te,
                               norm_features(s.x_tr, s.names), norm_features(s.x_te, s.names),
                               s.tasks)
    # the same metric for the supervised "shards": the training samples' principal directions
    sup = _mmcs_margin(lambda t: abs_cosine(t, ref.directions), truth, null_truths)

    # best latent per task chosen on training samples, scored on held-out samples
    null_labels = [shuffled(s.y_tr, g) for _ in range(n_null)]  # latents and families alike
    train_aurocs, best, auroc_task, null_auroc = _choose_and_score(
        lat.acts_tr, lat.acts_te, s.y_tr, s.y_te, s.tasks, null_labels, lat.drift)
    families = {**_family_figures(sae, fam.fams, fam.w, fam.tr, fam.te, s.y_tr, s.y_te, s.tasks,
                                  truth, null_truths, null_labels, s.shapes),
                "left_out": fam.left_out}  # drift latents and latents that never fired

    causal, causal_skipped = None, "not asked for (--no-steering)"
    if steering:
        fam_dirs = {t: _family_dense(sae, fam.fams, f)
                    for t, f in zip(s.tasks, families["best_family"] or ())}
        causal, causal_skipped = _causal(
            run_dir, checkpoint, shards, s.tasks, dict(zip(s.tasks, best)), ref.directions,
            s.flat_tr, s.y_tr, s.shapes, g, fam_dirs,
            CausalSettings(alpha=alpha, n_prompts=n_prompts, n_samples=n_samples, floor=floor,
                           seed=seed), n_shuffled, task, initial_model=initial_model,
            trust_remote_code=trust_remote_code)
    null_control = _null_control(null_run, n_null=n_null, seed=seed, from_step=from_step,
                                 drift_density=drift_density, family_threshold=family_threshold,
                                 out=None if out is None else Path(out) / NULL_CONTROL_DIR)

    mean = mean_defined  # over the tasks with an AUROC (auroc_unscored: those without)
    shares = energy_shares(s.flat_te, s.y_te, s.tasks)
    result = {
        "headline": _headline(mean(list(auroc_task.values())), ref.auroc_mean, lat_mmcs,
                              sup["mmcs_margin"], families, len(fam.fams.members), causal,
                              null_control, settings),
        "run_dir": str(run_dir), "checkpoint": shards.path.name,  # the SAE scored
        "tasks": s.tasks, "n_train": len(s.y_tr), "n_heldout": len(s.y_te),
        # a run of the null-control task: its figures are what a task-blind reward gives
        "null_control_run": _task_name(run_dir) == NULL_TASK,
        "sample_unit": "step" if settings["granularity"] == "step" else "event",
        "multi_label": s.multi_label, "from_step": from_step,
        # samples holding several tasks (per-step samples of mixed batches): each counts as
        # present for every task it holds, which blurs every task figure (audit 134 F5)
        "n_multi_label": sum(len(lab) > 1 for lab in [*s.y_tr, *s.y_te]),
        # what the shuffled-label nulls were drawn with (they move the nulls and margins)
        "n_null": n_null, "seed": seed,
        # the RL steps the evaluated samples come from (the buffer's window, after --from-step)
        "first_step": s.first_step, "last_step": s.last_step,
        **lat_mmcs, "mmcs_supervised": sup["mmcs"], "mmcs_supervised_null": sup["mmcs_null"],
        **_reference_mmcs(sae, s, truth, null_te, null_truths, lat_cos, fam),
        "auroc_task": mean(list(auroc_task.values())), "auroc_null": mean(null_auroc),
        "auroc_margin": mean(list(auroc_task.values())) - mean(null_auroc),
        # tasks in every held-out sample: "task present" has no negative, so no AUROC
        "auroc_unscored": [t for t in s.tasks if auroc_task[t] != auroc_task[t]],
        "supervised_auroc": ref.auroc_mean, "supervised_centroid_accuracy": ref.centroid_accuracy,
        "chance_accuracy": ref.chance_accuracy,
        "separability": separability(s.flat_tr, s.y_tr, s.flat_te, s.y_te, s.tasks),
        "energy_share": shares, "energy_share_max": max(shares.values()),
        "energy_share_by_label_set":
            _shares_by_label_set(s.x_te, s.y_te) if s.multi_label else None,
        "drift": _drift_figures(sae, s.flat_tr, s.shapes, lat, drift_density, match.mmcs),
        **_sae_figures(shards, s.x_te),
        "per_task": _per_task_figures(sae, s.tasks, best, lat, s.y_tr, s.y_te, match,
                                      train_aurocs, auroc_task, ref.auroc_per_task, shares,
                                      truth_from),
        "families": families,
        "null_control": null_control,
        "steering": _steering_view(causal, best, s.tasks) if causal else None,
        "ablation": _ablation_view(causal, best, s.tasks) if causal else None,
        "causal": causal,
        "causal_skipped": causal_skipped,
    }
    _write_evaluation(run_dir if out is None else Path(out), result)
    return result


class _Latents(NamedTuple):
    """The SAE's latents on the evaluated samples, and which of them count as shards."""

    acts_tr: Tensor  # [n_train, N] activations of the training samples
    acts_te: Tensor  # [n_heldout, N] activations of the held-out samples
    density: Tensor  # [N] each latent's firing rate on the training samples
    drift: list[int]  # drift (always-on) latents: firing on >= drift_density of them
    keep: Tensor  # [N] bool: the latents matched and chosen as shards (drift ones left out)


def _latents(sae, x_tr: Mapping[str, Tensor], x_te: Mapping[str, Tensor],
             drift_density: float) -> _Latents:
    """Encode both splits; the drift latents are chosen on the training samples."""
    acts_tr = sae.encode(sae.to_scaled(x_tr)).dense(sae.n_latents)
    acts_te = sae.encode(sae.to_scaled(x_te)).dense(sae.n_latents)
    density = (acts_tr != 0).float().mean(0)
    drift = [j for j in range(sae.n_latents) if float(density[j]) >= drift_density]
    keep = torch.ones(sae.n_latents, dtype=torch.bool)
    keep[drift] = False
    if not keep.any():  # cannot happen with k < n * drift_density; keep every latent then
        keep[:] = True
    return _Latents(acts_tr, acts_te, density, drift, keep)


class _Split(NamedTuple):
    """A run's evaluated samples: training and held-out, per target and flattened."""

    tasks: list[str]
    names: list[str]  # the SAE's targets
    shapes: dict[str, Sequence[int]]
    x_tr: dict[str, Tensor]  # per target [n_train, *shape]
    y_tr: list[frozenset[str]]  # each training sample's tasks
    x_te: dict[str, Tensor]  # per target [n_heldout, *shape]
    y_te: list[frozenset[str]]
    flat_tr: Tensor  # [n_train, D]
    flat_te: Tensor  # [n_heldout, D]
    multi_label: bool  # some sample holds several tasks (per-step samples of ``mixed``)
    first_step: int | None  # the RL steps the samples come from (after ``from_step``)
    last_step: int | None


def _split(run_dir: Path, shards: ShardSet, from_step: int) -> _Split:
    """Read the run's samples (``EvalData``) and split them; the file's tensors are freed."""
    shapes = {t.name: t.shape for t in shards.sae.targets}
    data = EvalData(run_dir, shards.target_names, from_step, shapes)
    x_tr, y_tr = data.split(False)
    x_te, y_te = data.split(True)
    data.samples = {}  # the splits are copies: free the file's tensors (large per-event runs)
    steps = data.steps[data.keep]
    return _Split(data.tasks, data.names, shapes, x_tr, y_tr, x_te, y_te,
                  flatten(x_tr, data.names), flatten(x_te, data.names), data.multi_label,
                  int(steps.min()) if steps.numel() else None,
                  int(steps.max()) if steps.numel() else None)


class _ShardFamilies(NamedTuple):
    """Latents grouped by co-activation on the training samples (``analysis.families``)."""

    fams: Families
    w: Tensor  # [F, N] each family's weights over the latents
    tr: Tensor  # [n_train, F] each family's strength on the training samples
    te: Tensor  # [n_heldout, F] and on the held-out ones
    left_out: list[int]  # drift latents and latents that never fired: in no family


def _shard_families(sae, lat: _Latents, threshold: float) -> _ShardFamilies:
    """Group the latents by co-activation on the training samples, without labels."""
    gram = sae.decoder_gram().detach().double()  # [N, N]
    left_out = ((~lat.keep) | (lat.density == 0)).nonzero().flatten().tolist()
    fams = find_families(lat.acts_tr, gram, threshold, exclude=left_out)
    return _ShardFamilies(fams, weight_matrix(fams, sae.n_latents),
                          strengths(lat.acts_tr, gram, fams), strengths(lat.acts_te, gram, fams),
                          left_out)


def _reference_mmcs(sae, s: _Split, truth: Tensor, null_te: list[list],
                    null_truths: list[Tensor], lat_cos: Callable[[Tensor], Tensor],
                    fam: _ShardFamilies) -> dict[str, Any]:
    """The references beside the shards' mmcs: what the SAE's rank allows at best, the margin
    of the ground truth itself, and the class-mean diagnostic (module docstring)."""
    rank = sae.cfg.rank
    return {
        # what the SAE's rank per target allows at best (per task, and on shuffled labels)
        "mmcs_rank_ceiling": float(rank_ceiling(unflatten(truth, s.shapes), rank).mean()),
        "mmcs_rank_ceiling_null": mean_defined(
            [float(rank_ceiling(unflatten(t, s.shapes), rank).mean()) for t in null_truths]),
        # the margin that shards equal to the held-out ground truth itself would reach (mmcs 1):
        # a reference for a perfect answer, not a bound
        "mmcs_margin_oracle": _mmcs_margin(lambda t: abs_cosine(t, truth), truth,
                                           null_truths)["mmcs_margin"],
        "mmcs_class_mean": _class_mean_mmcs(
            s.flat_tr, s.y_tr, s.flat_te, s.y_te, null_te, s.tasks, lat_cos,
            lambda t: _family_cos(sae, t, s.shapes, fam.w)),
    }


def _sae_figures(shards: ShardSet, x_te: Mapping[str, Tensor]) -> dict[str, Any]:
    """The SAE's own figures: reconstruction of the held-out samples, L0, dead latents."""
    sae = shards.sae
    held = _heldout_figures(sae, x_te)
    silent = shards.stats.get("stats.samples_since_fired")
    return {"fvu_heldout": held["fvu"], "ml2r_heldout": held["ml2r"], "l0": held["l0"],
            "dead_frac": (dead_fraction(silent, sae.cfg.dead_after, shards.meta.get("sae_samples"))
                          if silent is not None else None)}


def _drift_figures(sae, flat_tr: Tensor, shapes: Mapping[str, Sequence[int]], lat: _Latents,
                   drift_density: float, mmcs_with_drift: float) -> dict[str, Any]:
    """``drift``: the drift latents against the training samples' common direction (their mean
    and their top principal direction), and the latent nearest that direction."""
    mean_dir = flat_tr.mean(0, keepdim=True)
    common = principal_direction(flat_tr)[None]
    common_cos = match_directions(sae, unflatten(torch.cat([mean_dir, common]), shapes)).abs_cos
    nearest = int(common_cos[1].argmax())
    return {
        "threshold": drift_density, "latents": lat.drift,
        "density": {j: float(lat.density[j]) for j in lat.drift},
        "abs_cos_to_mean_sample": {j: float(common_cos[0, j]) for j in lat.drift},
        "abs_cos_to_top_direction": {j: float(common_cos[1, j]) for j in lat.drift},
        "max_density": float(lat.density.max()), "max_density_latent": int(lat.density.argmax()),
        # the latent nearest the samples' common (top principal) direction, whatever its density
        "top_direction_latent": nearest,
        "top_direction_abs_cos": float(common_cos[1].max()),
        "top_direction_latent_density": float(lat.density[nearest]),
        "mmcs_with_drift": mmcs_with_drift,
    }


def _per_task_figures(sae, tasks: list[str], best: list[int], lat: _Latents, y_tr: list,
                      y_te: list, match, train_aurocs: Tensor, auroc_task: dict[str, float],
                      supervised_auroc: dict[str, float], shares: dict[str, float],
                      truth_from: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``per_task``: each task's best latent (chosen on the training samples) on the held-out
    samples: its AUROC, purity, coverage and match to the task's ground truth."""
    fires = lat.acts_te != 0  # [n_heldout, N]
    per_task = {}
    for k, (t, j) in enumerate(zip(tasks, best)):
        is_t = presence(y_te, t)
        n_fire = int(fires[:, j].sum())
        per_task[t] = {
            "best_latent": j, "auroc": auroc_task[t],
            "purity": float((fires[:, j] & is_t).sum()) / n_fire if n_fire else 0.0,
            "coverage": float((fires[:, j] & is_t).sum()) / max(int(is_t.sum()), 1),
            "max_abs_cos_to_truth": float(match.abs_cos[k, lat.keep].max()),
            "best_latent_abs_cos_to_truth": float(match.abs_cos[k, j]),
            "supervised_auroc": supervised_auroc[t],
            # training AUROC of the task's three best latents: a task split over several
            # latents (feature splitting) shows as close runners-up
            "latent_aurocs_top3":
                train_aurocs[k].topk(min(3, sae.n_latents - len(lat.drift))).values.tolist(),
            "energy_share": shares[t], "truth_from": truth_from[t],
            "n_heldout": int(is_t.sum()), "n_train": int(presence(y_tr, t).sum()),
        }
    return per_task


def _headline(auroc_task: float, auroc_supervised: float, lat_mmcs: dict[str, float],
              mmcs_margin_supervised: float, families: dict[str, Any], n_families: int,
              causal: dict[str, Any] | None, null_control: dict[str, Any] | None,
              settings: dict[str, Any]) -> dict[str, Any]:
    """``headline``: the issue's figures (``HEADLINE_KEYS``) and their controls, the family
    figures beside them, and the run's setting (``run_settings``)."""
    by_kind = (causal or {}).get("families", {})  # causal summaries pooled per kind family

    def pick(kind: str, key: str) -> float | None:
        return by_kind[kind][key] if kind in by_kind else None

    return {
        "auroc_task": auroc_task,
        "auroc_null_control": null_control["auroc_task"] if null_control else None,
        "auroc_supervised": auroc_supervised,
        **lat_mmcs, "mmcs_margin_supervised": mmcs_margin_supervised,
        "steering_selectivity": pick("shard", "steering_selectivity"),
        "steering_selectivity_random": pick("random", "steering_selectivity"),
        "ablation_selectivity": pick("shard", "ablation_selectivity"),
        "ablation_selectivity_random": pick("random", "ablation_selectivity"),
        "steering_selectivity_shuffled": pick("shuffled", "steering_selectivity"),
        "ablation_selectivity_shuffled": pick("shuffled", "ablation_selectivity"),
        "ablation_selectivity_supervised": pick("supervised", "ablation_selectivity"),
        "ablation_own_first": pick("shard", "own_first_rate"),
        "ablation_own_first_shuffled": pick("shuffled", "own_first_rate"),
        "auroc_task_family": families["auroc_task"],
        "auroc_null_control_family": null_control["auroc_task_family"] if null_control else None,
        "mmcs_margin_family": families["mmcs_margin"],
        "steering_selectivity_family": pick("shard_family", "steering_selectivity"),
        "ablation_selectivity_family": pick("shard_family", "ablation_selectivity"),
        "steering_selectivity_family_random": pick("random_shard_family", "steering_selectivity"),
        "ablation_selectivity_family_random": pick("random_shard_family", "ablation_selectivity"),
        "n_families": n_families,
        "steering_floored": pick("shard", "steering_floored_rate"),
        "ablation_floored": pick("shard", "ablation_floored_rate"),
        "steering_floored_family": pick("shard_family", "steering_floored_rate"),
        "ablation_floored_family": pick("shard_family", "ablation_floored_rate"),
        **settings,
    }


def _write_evaluation(out: Path, result: dict[str, Any]) -> None:
    """``evaluation.json`` (strict JSON: NaN as null) and ``evaluation.md`` in ``out``, each
    written atomically; a directory that cannot be made is a ``RunWriteError``, as a full disk."""
    with rundir.writing(out):
        out.mkdir(parents=True, exist_ok=True)
    json_name, md_name = rundir.EVALUATION
    rundir.write_json(out / json_name, result)
    rundir.write_text(out / md_name, to_markdown(result))


def _causal(run_dir: Path, checkpoint: str | None, shards: ShardSet, tasks: list[str],
            best: dict[str, int], supervised: Tensor, flat_tr: Tensor, y_tr: list, shapes: dict,
            g: torch.Generator, family_dirs: dict[str, dict[str, Tensor]],
            settings: CausalSettings, n_shuffled: int, task: Any | None, *,
            initial_model: str | Path | None = None, trust_remote_code: bool = False
            ) -> tuple[dict[str, Any] | None, str | None]:
    """Steering and ablation of each task's best latent, its best shard family, its supervised
    direction, a random and ``n_shuffled`` shuffled-label controls (the policy of
    ``checkpoint``); ``(None, why)`` when the run's models or its task are not available."""
    models = load_run_models(run_dir, checkpoint, initial=initial_model,
                             trust_remote_code=trust_remote_code)
    if models is None:
        return None, run_models_missing(run_dir, checkpoint, initial=initial_model,
                                        trust_remote_code=trust_remote_code)
    init, final, tok, own = models
    task = task if task is not None else own
    if task is None:
        return None, ("the run used its script's own reward functions, which a run directory "
                      "does not hold; hand them back with --task FILE.py:NAME (evaluate_run(..., "
                      "task=...); docs/analysis.md, 'Your own reward')")
    if len(getattr(task, "labels", ()) or ()) < 2:
        return None, (f"the task {getattr(task, 'name', type(task).__name__)!r} has no contexts "
                      "to score apart (a RewardTask needs a label_column)")
    # sampled as the run sampled (its temperature, top_p...), as analyze's rollouts are
    sampling = run_sampling(run_dir)
    settings = dataclasses.replace(
        settings, max_new_tokens=int(sampling.pop("max_new_tokens", settings.max_new_tokens)),
        sampling=sampling)
    dense = lambda vec: {n: v[0] for n, v in unflatten(vec[None], shapes).items()}  # noqa: E731
    directions: dict[str, dict[str, dict[str, Tensor]]] = {
        "shard": {t: shards[j].dense(scaled=False) for t, j in best.items()},
        "shard_family": family_dirs,
        "supervised": {t: dense(supervised[k]) for k, t in enumerate(tasks)},
    }
    for i in range(n_shuffled):
        dirs = task_directions(flat_tr, shuffled(y_tr, g), tasks)
        directions[f"shuffled_{i}"] = {t: dense(dirs[k]) for k, t in enumerate(tasks)}
    if not family_dirs:  # no shard family to test
        del directions["shard_family"]
    return causal_tests(init, final, tok, task, tasks, directions, settings,
                        random_for=("shard_family",) if family_dirs else ()), None


def _family_cos(sae, refs: Tensor, shapes: dict, fam_w: Tensor) -> Tensor:
    """``[K, F]``: |cos| of flat references ``[K, D]`` with each family's unit direction
    ``fam_w D`` (in factored form, as ``metrics.match_directions``)."""
    r = {n: v.to(sae.device, torch.float32) for n, v in unflatten(refs, shapes).items()}
    with torch.no_grad():
        dots = sae.inner(r, "decoder").double()  # [K, N]
    norms = sample_sq_norms(r).sqrt().double().clamp_min(1e-30)
    return (dots @ fam_w.T.to(dots) / norms[:, None]).abs()


def _family_figures(sae, fams: Families, fam_w: Tensor, fam_tr: Tensor, fam_te: Tensor,
                    y_tr: list, y_te: list, tasks: list[str], truth: Tensor,
                    null_truths: list[Tensor], null_labels: list[list],
                    shapes: dict) -> dict[str, Any]:
    """The latent figures for shard families: per task the family whose strength best predicts
    the task on the training samples, its held-out AUROC (and a shuffled-label null), and the
    mmcs of the families' directions against the held-out ground truth (and its null). With no
    family (every latent a drift latent or silent) the figures are None and ``skipped`` says
    why."""
    if not fams.members:
        return {"threshold": fams.threshold, "members": [], "n": 0, "best_family": None,
                "auroc_task": None, "auroc_null": None, "mmcs": None, "mmcs_null": None,
                "mmcs_margin": None, "per_task": {},
                "skipped": "no shard family: every latent is a drift latent or never fired on "
                           "the samples"}
    _, best, held, null_auroc = _choose_and_score(fam_tr, fam_te, y_tr, y_te, tasks, null_labels)
    cos = _family_cos(sae, truth, shapes, fam_w)  # [K, F]
    return {
        "threshold": fams.threshold, "members": fams.members, "n": len(fams.members),
        "best_family": best,
        "auroc_task": mean_defined(held.values()), "auroc_null": mean_defined(null_auroc),
        **_mmcs_margin(lambda t: _family_cos(sae, t, shapes, fam_w), truth, null_truths),
        "per_task": {t: {"family": f, "members": fams.members[f], "auroc": held[t],
                         "abs_cos_to_truth": float(cos[k, f]),
                         "max_abs_cos_to_truth": float(cos[k].max())}
                     for k, (t, f) in enumerate(zip(tasks, best))},
    }


def _family_dense(sae, fams: Families, f: int) -> dict[str, Tensor]:
    """Family ``f``'s unit direction per parameter name (``sum_j w_j d_j``, materialised)."""
    out: dict[str, Tensor] = {}
    for j, w in zip(fams.members[f], fams.weights[f].tolist()):  # one member at a time
        for n, d in sae.dense_directions(latents=torch.tensor([j], device=sae.device)).items():
            out[n] = out[n] + w * d[0].detach() if n in out else w * d[0].detach()
    return out


def _shares_by_label_set(x: Mapping[str, Tensor], labels: list) -> dict[str, float] | None:
    """``recipe.balance.energy_shares``: a multi-task sample's energy under its joined label set
    (``"A+B"``) rather than split between its tasks (None when that module is absent)."""
    try:
        from sae_shards.recipe.balance import energy_shares as by_key
    except ImportError:
        return None
    return by_key(x, [sorted(lab) for lab in labels])


def _check_labelled_task(run_dir: Path) -> None:
    """Refuse a run of a built-in task with one label (``letters``) before anything else: its
    shards cannot be scored against tasks however its samples were saved. A user's own script
    (``task`` null) may log several labels, and its samples decide."""
    # a missing or damaged config.json ({}) is reported by ShardSet.from_run
    task = rundir.section(rundir.read_config(run_dir), "task").get("name")
    if task in ONE_LABEL_TASKS:
        raise CheckpointError(
            f"{run_dir} is a task={task} run (one task): evaluate scores shards against several "
            "labelled tasks; run the planted benchmark (sae-shards train experiment=planted "
            "run_dir=runs/planted) or a script whose reward functions log a label column")


def _saves_samples(run_dir: Path) -> bool:
    """Whether the run's config.json keeps samples and held-out steps (so a missing samples
    file means the run has not reached its end)."""
    runner = rundir.section(rundir.read_config(run_dir), "runner")
    return bool(runner.get("save_samples")) and bool(runner.get("heldout_every"))


NULL_TASK = "multiskill_null"
"""The null-control task: ``multiskill``'s prompts and tags, a reward that ignores the tag."""


def _task_name(path: Path) -> str | None:
    """The run's task (config.json's ``task.name``); None when unreadable (evaluating the run
    reports what is wrong with it)."""
    return rundir.section(rundir.read_config(path), "task").get("name")


def _check_null_run(path: Path) -> None:
    """A null-control run is one of ``task=multiskill_null``: refuse a run whose config.json
    names another task (its AUROC would pass for the null's)."""
    task = _task_name(path)
    if task is not None and task != NULL_TASK:
        raise CheckpointError(f"null_run={path} is a task={task} run; the null control is a "
                              "run of task=multiskill_null (the same prompts and tags, a reward "
                              "that ignores the tag)")


NULL_CONTROL_DIR = "null_control"
"""Where, under ``evaluate_run``'s ``out``, the null-control run's own evaluation is written."""


def _null_control(null_run, **kwargs) -> dict[str, Any] | None:
    if null_run is None:
        return None
    if isinstance(null_run, Mapping):
        r = null_run
        where = r.get("run_dir")
    else:
        _check_null_run(Path(null_run))
        r = evaluate_run(null_run, steering=False, **kwargs)
        where = str(null_run)
    return {"run_dir": where, "auroc_task": r["auroc_task"], "auroc_null": r.get("auroc_null"),
            "auroc_task_family": (r.get("families") or {}).get("auroc_task"),
            "supervised_auroc": r.get("supervised_auroc"), "mmcs_margin": r.get("mmcs_margin")}


def _steering_view(causal: dict[str, Any], best: list[int], tasks: list[str]) -> dict[str, Any]:
    """Per task: the reward change on every task with ``+-alpha`` x the shard's component added
    to the initial weights, beside the random control (``control_*``)."""
    kinds, fam = causal["kinds"], causal["families"]
    per_task = {}
    for t, j in zip(tasks, best):
        s, c = kinds["shard"]["per_task"][t], kinds["random"]["per_task"][t]
        per_task[t] = {"latent": j, "coefficient": s["coefficient"],
                       "shard_plus": s["steer_plus"], "shard_minus": s["steer_minus"],
                       "control_plus": c["steer_plus"], "control_minus": c["steer_minus"],
                       "shard_selectivity": s["steering_selectivity"],
                       "floored": s["steering_floored"],
                       "control_selectivity": c["steering_selectivity"]}
    settings = causal["settings"]
    return {"alpha": settings["alpha"], "n_prompts": settings["n_prompts"],
            "n_samples": settings["n_samples"], "floor": settings["floor"],
            "sampling": settings.get("sampling") or {},
            "base": causal["base_initial"],
            "selectivity": fam["shard"]["steering_selectivity"],
            "control_selectivity": fam["random"]["steering_selectivity"],
            "shuffled_selectivity": fam.get("shuffled", {}).get("steering_selectivity"),
            "per_task": per_task}


def _ablation_view(causal: dict[str, Any], best: list[int], tasks: list[str]) -> dict[str, Any]:
    """Per task: the reward drop on every task when the run's update along the shard is removed
    from the final weights; the task that drops most; beside the random control."""
    kinds, fam = causal["kinds"], causal["families"]
    per_task = {}
    for t, j in zip(tasks, best):
        s, c = kinds["shard"]["per_task"][t], kinds["random"]["per_task"][t]
        per_task[t] = {"latent": j, "coefficient": s["coefficient"], "drop": s["ablate_drop"],
                       "broken_task": s["broken_task"], "own_first": s["own_first"],
                       "drop_ratio": s["drop_ratio"], "selectivity": s["ablation_selectivity"],
                       "floored": s["ablation_floored"],
                       "control_drop": c["ablate_drop"],
                       "control_selectivity": c["ablation_selectivity"]}
    return {"base": causal["base_final"], "selectivity": fam["shard"]["ablation_selectivity"],
            "control_selectivity": fam["random"]["ablation_selectivity"],
            "shuffled_selectivity": fam.get("shuffled", {}).get("ablation_selectivity"),
            "own_first_rate": fam["shard"]["own_first_rate"],
            "own_first_rate_shuffled": fam.get("shuffled", {}).get("own_first_rate"),
            "per_task": per_task}


def _sampling_text(sampling: Mapping[str, Any] | None) -> str:
    """The causal tests' sampling settings (``CausalSettings.sampling``) as evaluation.md says
    them; those the run did not record are the defaults (temperature 1)."""
    shown = {k: v for k, v in (sampling or {}).items()
             if k not in ("training_steps", "reward_batch")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "temperature 1, the defaults"


def _all_unresolved(r: dict[str, Any], kind: str) -> bool:
    """Whether every task's own effect in the ``kind`` ("steering", "ablation") causal test is
    below the floor: its headline selectivity is then 0 for want of any resolved effect, not
    a measured absence of selectivity (audit 138 F11: "0.000" beside a resolved reference)."""
    test, floor = r.get(kind), (r.get("steering") or {}).get("floor")
    if not test or floor is None or not test.get("per_task"):
        return False
    if kind == "steering":
        return all(max(abs(e["shard_plus"][t]), abs(e["shard_minus"][t])) < floor
                   for t, e in test["per_task"].items())
    return all(abs(e["drop"][t]) < floor for t, e in test["per_task"].items())


def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None or x != x else format(x, fmt)


def to_markdown(r: dict[str, Any]) -> str:
    h = r["headline"]
    lines = [f"# Evaluation of {r['run_dir']}", "",
             f"The SAE of checkpoint {r.get('checkpoint', 'final')}; {r['n_train']} training "
             f"and {r['n_heldout']} held-out {r['sample_unit']}s (RL "
             f"steps {_f(r.get('first_step'), 'd')}-{_f(r.get('last_step'), 'd')}"
             f"{'; --from-step ' + str(r['from_step']) if r['from_step'] else ''}), tasks "
             f"{r['tasks']}; granularity {h['granularity']}, "
             f"source {h['source']}, schedule {h['schedule'] or 'none (not a scheduled task)'}, "
             f"group {h['group']}.", "",
             "## Headline", "", "| figure | value | how to read it |", "|---|---|---|"]
    notes: list[str] = []  # said above the headline table, never inside it
    if r.get("null_control_run"):
        notes += [f"**This run is a null control** (task={NULL_TASK}: the tags of "
                        "multiskill, a reward that ignores them), so every task figure below "
                        "should be at chance (AUROC near 0.5, margins near 0); it is the "
                        "reference for a multiskill run's figures (`--null-run`).", ""]
    faint = {key for kind, keys in (("steering", ("steering_selectivity",)),
                                    ("ablation", ("ablation_selectivity", "ablation_own_first")))
             if _all_unresolved(r, kind) for key in keys}
    for key in HEADLINE_KEYS[:-4]:
        missing = h[key] is None or h[key] != h[key]
        lines.append(f"| {key} | {_f(h[key], 'd' if key == 'n_families' else '.3f')}"
                     f"{' (unresolved: no task effect reached the floor)' if key in faint else ''}"
                     f" | {_why_missing(key, r) if missing else HEADLINE_READ[key]} |")
    if r.get("n_multi_label"):
        notes += [
            f"**{r['n_multi_label']} of the {r['n_train'] + r['n_heldout']} {r['sample_unit']}s "
            "hold several tasks** (a per-step sample of a batch that mixes contexts): each "
            "counts as holding every task it holds, and a shard active on it cannot be told to "
            "belong to one of them, which blurs every task figure below. "
            "`capture.granularity=group` gives one sample per prompt group, each of one task "
            "(docs/usage.md, \"Per-event samples\").", ""]
    at = lines.index("## Headline") + 2
    lines[at:at] = notes
    unscored = r.get("auroc_unscored") or []
    if unscored:
        lines += ["", f"Task{'s' if len(unscored) > 1 else ''} {', '.join(unscored)} "
                  f"{'are' if len(unscored) > 1 else 'is'} in every held-out {r['sample_unit']}: "
                  "\"present\" has no negative there, so no AUROC; every AUROC figure is the "
                  "mean over the other tasks (capture per event, or hold out more steps, to "
                  "score it)."]
    lines += ["", "## Details", "",
              "| figure | value | null / reference |", "|---|---|---|",
              f"| mmcs | {r['mmcs']:.3f} | shuffled-label null {r['mmcs_null']:.3f} (margin {r['mmcs_margin']:+.3f}) |",
              f"| mmcs of the supervised directions | {r['mmcs_supervised']:.3f} | shuffled-label null {r['mmcs_supervised_null']:.3f} (margin {r['mmcs_supervised'] - r['mmcs_supervised_null']:+.3f}) |",
              f"| mmcs margin of the ground truth itself | {r['mmcs_margin_oracle']:+.3f} | shards equal to the held-out task directions (mmcs 1) against the same null |",
              "| mmcs margin against signed truth (class means; diagnostic) | "
              + ", ".join(f"{k} {_f(v['mmcs_margin'], '+.3f')}"
                          for k, v in r["mmcs_class_mean"].items())
              + " | null: class means of the same shuffled labels (the events' grand mean) |",
              f"| auroc_task (held-out, best latent) | {r['auroc_task']:.3f} | shuffled-label null {r['auroc_null']:.3f} |",
              f"| supervised reference AUROC | {r['supervised_auroc']:.3f} | nearest-centroid accuracy {_f(r['supervised_centroid_accuracy'])} (chance {r['chance_accuracy']:.3f}) |",
              "| separability with labels (one direction per task, held-out AUROC) | "
              + ", ".join(f"{k} {_f(v['mean'])}" for k, v in r["separability"].items())
              + " | the best latent's auroc_task above is the unsupervised counterpart |",
              f"| fvu_heldout | {r['fvu_heldout']:.3f} | |", f"| l0 | {r['l0']:.2f} | |",
              f"| dead_frac | {_f(r['dead_frac'])} | "
              + ("n/a: the SAE saw fewer than sae.dead_after samples |" if r["dead_frac"] is None
                 else "|"),
              f"| largest task energy share | {r['energy_share_max']:.3f} | {', '.join(f'{t} {v:.2f}' for t, v in r['energy_share'].items())} |"]
    d = r["drift"]
    lines.append(f"| drift latents (density >= {d['threshold']}) | {d['latents'] or 'none'} | "
                 f"densest latent {d['max_density_latent']} at {d['max_density']:.2f}; mmcs with "
                 f"drift latents {d['mmcs_with_drift']:.3f} |")
    fm = r.get("families")
    if fm and fm.get("skipped"):
        lines += ["", f"Shard families: none ({fm['skipped']})."]
    elif fm:
        multi = [m for m in fm["members"] if len(m) > 1]
        several = (f"{len(multi)} of several latents: {multi}, the rest single latents" if multi
                   else "every one a single latent")
        lines += ["", f"Shard families (latents with co-activation correlation >= {fm['threshold']}, "
                  f"average linkage; {fm['n']} families, {several}): held-out AUROC "
                  f"{fm['auroc_task']:.3f} (shuffled-label null {fm['auroc_null']:.3f}), mmcs "
                  f"{fm['mmcs']:.3f} (null {fm['mmcs_null']:.3f}, margin {fm['mmcs_margin']:+.3f}); "
                  "per task: " + "; ".join(f"{t} {v['members']} {_f(v['auroc'])}"
                                          for t, v in fm["per_task"].items()) + "."]
    lines += ["", "| task | best latent | AUROC | purity | coverage | max \\|cos\\| to truth | supervised AUROC | best 3 latents' training AUROC | energy share | truth from |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t, v in r["per_task"].items():
        lines.append(f"| {t} | {v['best_latent']} | {_f(v['auroc'])} | {v['purity']:.2f} | "
                     f"{v['coverage']:.2f} | {v['max_abs_cos_to_truth']:.3f} | {_f(v['supervised_auroc'])} "
                     f"| {', '.join(f'{a:.2f}' for a in v['latent_aurocs_top3'])} "
                     f"| {v['energy_share']:.2f} | {v['truth_from']} |")
    st = r.get("steering")
    if st:
        lines += ["", f"Steering (alpha = {st['alpha']} x the run's own update along the shard, "
                  "added to the initial weights; + and - signs):", "",
                  f"Each reward is the mean of {st['n_prompts']} prompts x {st['n_samples']} "
                  f"completions per task, the same rollout seed at every point, sampled as the "
                  f"run sampled ({_sampling_text(st.get('sampling'))}). A selectivity "
                  f"divides the effect on the shard's task by the others' mean |effect| or "
                  f"{st['floor']} (the floor), whichever is larger, so a change below the floor "
                  f"is not resolved: such rows are marked. Where the others' mean |effect| is "
                  f"below the floor (marked floored), the selectivity is the own effect in units "
                  f"of the floor, a size rather than a ratio.", "",
                  f"selectivity (median over tasks, + sign) {st['selectivity']:+.3f}, "
                  f"norm-matched random control {st['control_selectivity']:+.3f}, shuffled-label "
                  f"control {_f(st['shuffled_selectivity'], '+.3f')}", "",
                  "| task | latent | reward change on task (+ / -) | selectivity | random direction's selectivity |",
                  "|---|---|---|---|---|"]
        for t, e in st["per_task"].items():
            faint = (max(abs(e['shard_plus'][t]), abs(e['shard_minus'][t])) < st['floor'])
            lines.append(f"| {t} | {e['latent']} | {e['shard_plus'][t]:+.3f} / {e['shard_minus'][t]:+.3f} "
                         f"| {e['shard_selectivity']:+.3f}{' (unresolved)' if faint else ''}"
                         f"{' (floored)' if e.get('floored') else ''} "
                         f"| {e['control_selectivity']:+.3f} |")
    if not st and r.get("causal_skipped"):
        lines += ["", f"No steering or ablation: {r['causal_skipped']}."]
    ab = r.get("ablation")
    if ab:
        lines += ["", "Ablation (the run's update along the shard removed from the final weights; "
                  "a drop on the shard's task below the floor is not resolved, and a "
                  "selectivity whose others' mean |drop| is below it is a size, floored: such "
                  "rows are marked):", "", f"selectivity (median over tasks) {ab['selectivity']:+.3f}, "
                  "random control "
                  f"{ab['control_selectivity']:+.3f}, shuffled-label control "
                  f"{_f(ab['shuffled_selectivity'], '+.3f')}; own task breaks first in "
                  f"{ab['own_first_rate']:.2f} of tasks (shuffled-label directions: "
                  f"{_f(ab['own_first_rate_shuffled'], '.2f')}, chance {1 / len(r['tasks']):.2f})", "",
                  "| task | latent | drop on task | largest drop (task) | selectivity | random direction's selectivity |",
                  "|---|---|---|---|---|---|"]
        floor = st["floor"] if st else None
        for t, e in ab["per_task"].items():
            top = e["broken_task"]
            largest = (f"{e['drop'][top]:+.3f} ({top})" if top else
                       f"none (no drop reached {floor if floor else 'the floor'}, or a tie)")
            faint = floor is not None and abs(e["drop"][t]) < floor  # as steering's rows
            lines.append(f"| {t} | {e['latent']} | {e['drop'][t]:+.3f} | {largest} | "
                         f"{e['selectivity']:+.3f}{' (unresolved)' if faint else ''}"
                         f"{' (floored)' if e.get('floored') else ''} | "
                         f"{e['control_selectivity']:+.3f} |")
    return "\n".join(lines) + "\n"
