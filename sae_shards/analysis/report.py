"""``sae-shards analyze RUN_DIR``: one self-contained HTML report of a finished run.

Sections (each an ``<section id=...>``): summary, SAE training curves, reward curve, shard
timeline, shard families (shards that fire together, ``analysis.families``), per-target norms,
top rollouts per shard, logit lens, dose-response, ablation. Plots are
matplotlib PNGs embedded as base64 (``plots``), so the file opens anywhere with no other files.

The dose-response adds ``alpha * c * shard`` to the *initial* weights, where ``c = <Delta, d>`` is
the shard's coefficient in the run's cumulative update ``Delta = theta_final - theta_initial``:
alpha = 1 adds the run's update along the shard (its projection, which holds the decoder bias's
and overlapping shards' parts too: no share of the shard's own). A norm-matched random direction
is the control. It needs the run's ``model/`` (or ``model.path``) and ``final_model/`` (a LoRA
run's adapter, merged into that base), and a reward: a built-in task's, or, for a run of the
user's own TRL script, theirs handed back as ``analyze(..., task=RewardTask(...))``
(``reward_task``). When the prompts carry several contexts each one's curve is drawn too.
The ablation removes the same ``c * shard`` from the *final* weights (``interventions.ablate``),
beside ``c`` times a random direction of the shard's norm. The last section takes the detailed
shards together (``span``): the run's update projected onto their span, removed from the final
weights and added alone to the initial ones, and the share of the run's reward change each undoes
or recovers.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import html
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sae_shards.analysis.families import ALWAYS_ON_DENSITY, MIN_JOINT, is_always_on
from sae_shards.analysis.interventions import (CONTROL_SEED, N_SAMPLES, ROLLOUT_SEED, ablate,
                                               dose_response, eval_prompts, score_rollouts,
                                               update_coefficient)
from sae_shards.analysis.logit_lens import FinalNormNotFound
from sae_shards.analysis.plots import (plot_dose, plot_norms, plot_reward,
                                       plot_sae_curves, plot_timeline, step_reward_means)
from sae_shards.analysis.reward_task import RewardTask, is_conversational
from sae_shards.analysis.resolution import (RESOLVED_LEVEL, holm_first_bound, resolved_bound,
                                            resolved_together, within_noise)
from sae_shards.analysis.span import SpanEffect, combine, span_effect, span_weights, update_share
from sae_shards.analysis.shards import (INIT_KEPT, RunView, initial_model_dir, load_run_models,
                                        policy_dir, read_json_object, run_models_missing,
                                        run_sampling, wrong_type)
from sae_shards.core import json_read
from sae_shards.core.checkpoint import CheckpointError
from sae_shards.core.targets import parse_slice
from sae_shards.run import rundir
from sae_shards.run.config import ALGORITHM_TRAINERS, REUSED, generation_use, reused_generations
from sae_shards.run.versions import version_line

SECTIONS = ("summary", "sae-curves", "reward", "timeline", "families", "norms", "rollouts", "logit-lens",
            "dose-response", "ablation", "together")
"""The report's section anchors in order, as ``analyze`` appends them for a per-step run (a
per-event run has ``events`` in place of ``rollouts``); ``tests/test_report.py`` checks a real
report against it."""
DEFAULT_ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0)

log = logging.getLogger(__name__)

RUN_FIGURES = ("rl_steps", "sae_steps", "reward_first", "reward_last", "fvu_first", "fvu_last",
               "fvu_heldout", "dead_frac", "never_fired_frac", "interrupted", "warning")
"""The run's figures ``analysis.json`` gives under ``run``, as of the checkpoint read
(``checkpoint_figures``: ``summary.json``'s when it describes that checkpoint)."""


_CURVES_NOTE = (
    "<p>Per SAE step, on its training batch: fvu, the squared error of the reconstruction over "
    "the samples' squared distance from their mean (1: no better than the mean); l0, the active "
    "shards per sample (top-k sparsity holds it at k); dead_frac, the shards silent for the last "
    "sae.dead_after samples (unknown, not plotted, before that many samples).</p>")
_LENS_NOTE = (
    "<p>Each row is one component of the shard on one residual-stream writer: the shard's "
    "matrix there is a sum of rank-1 terms σ u v<sup>T</sup>, σ its singular value (the "
    "component's size; the shard has unit norm over all its targets). The tokens are those "
    "whose unembedding has the largest (promotes) and smallest (suppresses) dot product with "
    "+u after the final norm. The sign of u is arbitrary (u v<sup>T</sup> = (-u)(-v)<sup>T"
    "</sup>): read a row as one axis with two ends. Which end an update writes towards depends "
    "on the shard's activation (often negative) and on the sign of v·x for the layer's "
    "inputs x, which the lens does not see. A mixture of experts' down projection is read one "
    "expert at a time (name[e]), for the experts the shard is largest on.</p>")


def top_shards(view: RunView, n: int) -> list[int]:
    """The shards to detail, by total |activation| over the run's final timeline: every
    always-on shard (active on >= ``ALWAYS_ON_DENSITY`` of the samples: a drift direction, at
    most ``k / ALWAYS_ON_DENSITY`` of them), then the ``n`` largest of the others, which fire
    in some contexts and not others (so drift never takes their place)."""
    _, acts = view.timeline("final")
    mass = acts.abs().sum(0)
    density = (acts != 0).float().mean(0)
    fired = [i for i in mass.argsort(descending=True).tolist() if mass[i] > 0]
    always = [i for i in fired if is_always_on(density[i])]
    return always + [i for i in fired if not is_always_on(density[i])][:n]


def _reward_html(view: RunView) -> str:
    """The reward curve, or why there is none."""
    if not view.rollouts:
        return ("<p>No reward curve: rollouts.jsonl is empty, the run recorded no rollouts "
                "(<code>ShardCallback(record_rollouts=False)</code>).</p>")
    if not step_reward_means(view)[0]:
        return "<p>No reward curve: no completion of any step was scored.</p>"
    return plot_reward(view)


# ---------------------------------------------------------------------------- model-side sections
def lens_rows(model, tokenizer, shard, top_k: int) -> list[dict[str, Any]]:
    """Logit-lens rows of a shard's components on the model's residual-stream writers.

    Writers (attention and MLP output projections, and their biases) are found by module type
    (``logit_lens.writer_targets``), and each is read on the write side of its layer type. Of a
    stacked writer's experts, the ``LENS_EXPERTS`` the shard is largest on.
    """
    from sae_shards.analysis.logit_lens import logit_lens, writer_targets

    writers = writer_targets(model)
    comps = {n: f if len(f) == 2 else f[0] for n, f in shard.factors().items() if n in writers}
    comps = {n: comps[n] for n in _strongest_experts(list(comps), shard.target_norms())}
    if not comps:
        return []
    results = logit_lens(model, tokenizer, comps, top_k=top_k, writers=writers)
    return [{"target": r.target, "sigma": r.singular_value,
             "promoted": [t for t, _ in r.promoted], "suppressed": [t for t, _ in r.suppressed],
             "promoted_ids": list(r.promoted_ids), "suppressed_ids": list(r.suppressed_ids)}
            for r in results]


def _targets_line(names: list[str]) -> str | int:
    """How many parameters the shards span; with stacked experts, also how many matrices the
    SAE factors (each expert one)."""
    params = {parse_slice(n)[0] for n in names}
    if len(params) == len(names):
        return len(names)
    return f"{len(params)} parameters ({len(names)} matrices: each expert of a stacked one)"


LENS_EXPERTS = 4
"""The logit lens reads this many experts of each stacked writer per shard: those the shard's
direction is largest on (a 128-expert model would give 128 rows per layer)."""


def _strongest_experts(names: list[str], norms: dict[str, float]) -> list[str]:
    """``names`` (writers) with each stacked writer's experts (``name[e]``) cut to the
    ``LENS_EXPERTS`` the shard's ``norms`` (``Shard.target_norms``) are largest on, in order."""
    experts: dict[str, list[tuple[float, str]]] = {}
    for name in names:
        base, expert = parse_slice(name)
        if expert is not None:
            experts.setdefault(base, []).append((norms[name], name))
    keep = {n for group in experts.values() for _, n in sorted(group, reverse=True)[:LENS_EXPERTS]}
    return [n for n in names if parse_slice(n)[1] is None or n in keep]


# ---------------------------------------------------------------------------- the report
def analyze(run_dir: str | Path, out: str | Path | None = None,
            n_shards: int | Sequence[int] = 4, checkpoint: str | None = None,
            top_k: int = 5, dose: bool = True, alphas=DEFAULT_ALPHAS,
            n_prompts: int = 32, task: RewardTask | Any | None = None,
            initial_model: str | Path | None = None, trust_remote_code: bool = False) -> Path:
    """Write the HTML report of a run (default ``run_dir/report.html``) and ``analysis.json``.

    ``n_shards``: how many shards to detail beside the always-on ones (``top_shards``), or the
    indices of the shards to detail, in that order (``[13, 30]``).
    ``task``: the prompts and reward functions to score the dose-response with (a run of your
    own TRL script records none; ``reward_task``); by default a built-in task's own.
    ``initial_model``: the directory of the run's initial weights when it moved from where
    ``config.json`` says (checked against the run's record of them).
    ``trust_remote_code``: load a policy that needs its own code (``auto_map``) by running the
    Python files of its directories (``load_run_models``); off, such a run's report has no
    logit lens, dose-response or ablation, and says why. An ``out`` that is a directory, or
    an existing file other than an earlier report, is refused (``FileExistsError``) before the
    work."""
    refused = report_path_refusal(Path(out), Path(run_dir)) if out else None
    if refused:
        raise FileExistsError(refused)
    if task is not None and not dose:
        raise ValueError("a reward task (--task) scores the dose-response and the ablation, "
                         "which --no-dose skips; drop one of them")
    asked = _Asked(top_k, dose, tuple(alphas), n_prompts, task, initial_model, trust_remote_code)
    view = RunView(run_dir, checkpoint)
    out = Path(out) if out else view.run_dir / "report.html"
    sel = _select(view, n_shards)
    summary_file = view.run_dir / rundir.SUMMARY
    summary = _read_summary(summary_file) if summary_file.is_file() else {}
    figures, own = checkpoint_figures(view, summary)
    models = (load_run_models(view.run_dir, view.checkpoint, initial_model, trust_remote_code)
              if dose else None)
    sampling = run_sampling(view.run_dir)  # the run's own max_new_tokens, temperature, top_p...
    config = rundir.read_config(view.run_dir)
    analysis: dict[str, Any] = {
        "run": {"run_dir": str(view.run_dir.resolve()),  # as analysed: a copy says where
                "checkpoint": view.checkpoint, "n_shards": len(sel.density),
                # samples of several contexts: a per-step sample of a mixed batch blends them
                "blended_samples": sel.blended, "n_samples": len(sel.labels),
                "never_fired": int((sel.density == 0).sum()), "always_on": sel.always_on,
                **figures, "figures_from": "summary" if own else "checkpoint",
                # which software made the run, and the resumes under other versions
                "versions": config.get("versions"),
                "resumed_under": config.get("resumed_under") or []},
        "config": config,  # the run's settings (config.json): which sweep point this was
        "draws": draws(n_prompts, sampling), "top_shards": sel.shards,
        "shards": {}}  # filled below, after the families (the file's order)
    untrained = _untrained_html(view, sel, summary)
    parts = _run_sections(view, sel, asked, summary, figures, own, untrained, analysis)
    parts += _model_sections(view, sel, asked, models, sampling, config, untrained, analysis)
    page = _page(f"{REPORT_TITLE}: {view.run_dir.name}", "".join(parts))
    out.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_text(out, page)
    rundir.write_text(analysis_path(out),
                      json.dumps(rundir.strict_json(analysis), indent=2, default=float))
    return out


class _Asked(NamedTuple):
    """What the caller of ``analyze`` asked for beyond the run and its checkpoint."""
    top_k: int  # top rollouts/events per shard, logit-lens tokens per component
    dose: bool  # score the dose-response, the ablation and the span (False: --no-dose)
    alphas: tuple[float, ...]  # the dose-response's steps along each shard
    n_prompts: int  # prompts each scoring draws
    task: Any  # the reward handed back (RewardTask), or None: a built-in task's own
    initial_model: str | Path | None  # where a moved run's initial weights are now
    trust_remote_code: bool  # load a policy that needs its own code


class _Selection(NamedTuple):
    """The shards a report details, and what it reads once of every shard's samples."""
    shards: list[int]  # detailed, in order: the always-on ones and the top (or chosen) others
    chosen: bool  # named by the caller (--shards 13,30), not the top ones
    density: torch.Tensor  # [n_shards] the share of the timeline's samples each fired on
    always_on: list[int]  # density >= ALWAYS_ON_DENSITY: a drift direction, not a context
    tags: dict[int, str]  # shard -> the tag its title carries in every section
    labels: list  # each sample's contexts
    mixes: dict[int, dict[str, float]]  # detailed shard -> its share of each context
    several: bool  # the samples carry two contexts or more (the mixes are worth showing)
    blended: int  # samples of several contexts: a per-step sample of a mixed batch
    initial_cos: torch.Tensor  # [n_shards] |cos| with its initial direction (NaN: unknown)

    @property
    def which(self) -> str:
        return "chosen" if self.chosen else "top"


def _select(view: RunView, n_shards: int | Sequence[int]) -> _Selection:
    """The shards to detail (``analyze``'s ``n_shards``) and each one's contexts."""
    chosen = isinstance(n_shards, Sequence)
    shards = (list(dict.fromkeys(view.shards.check_index(i) for i in n_shards)) if chosen
              else top_shards(view, n_shards))
    density = view.density()  # [n_shards]
    always_on = [i for i in range(len(density)) if is_always_on(density[i])]
    labels = view.sample_labels()  # each sample's contexts, read once for every shard's mix
    initial_cos = view.shards.initial_cosines()  # [n_shards]
    tags = {i: ["always on: a common drift direction, not a context"] for i in always_on}
    for i in shards:  # a direction that is still mostly the SAE's random start: said
        if initial_cos[i] >= INIT_KEPT:
            tags.setdefault(i, []).append(
                f"never left its random start: |cos| {float(initial_cos[i]):.2f} with its "
                "initial direction")
    return _Selection(
        shards, chosen, density, always_on,
        tags={i: "; ".join(parts) for i, parts in tags.items()},
        labels=labels, mixes={s: view.task_mix(s, labels=labels) for s in shards},
        several=len({label for sample in labels for label in sample}) >= 2,
        blended=sum(len(set(sample)) > 1 for sample in labels), initial_cos=initial_cos)


def _untrained_html(view: RunView, sel: _Selection, summary: dict) -> str:
    """What a section about the detailed shards says when there are none to show."""
    if not sel.shards and bool(sel.density.abs().sum() > 0):
        return "<p>No shards selected (<code>--shards 0</code> and no always-on shard).</p>"
    return ("<p>No activations: the SAE never trained"
            + (" (see the run's summary)" if summary else
               f" by {_sae_of(view)} (no summary.json: the run was killed, or is still "
               "running)") + ".</p>")


def _run_sections(view: RunView, sel: _Selection, asked: _Asked, summary: dict,
                  figures: dict, own: bool, untrained: str,
                  analysis: dict[str, Any]) -> list[str]:
    """The sections read from the run directory alone: summary, SAE curves, reward, timeline,
    families (added to ``analysis``), norms, and the top events or rollouts per shard."""
    shards, which = sel.shards, sel.which
    mixes = sel.mixes if sel.several else {}
    parts = [_section("summary", "Run", _summary_html(
        view, summary, figures, own, shards, sel.density, sel.tags, asked.initial_model,
        sel.chosen, sel.initial_cos))]
    parts.append(_section("sae-curves", "SAE training", plot_sae_curves(view) + _CURVES_NOTE))
    parts.append(_section("reward", "Reward", _reward_html(view)))
    parts.append(_section("timeline", f"Shard timeline ({which} shards, {_sae_of(view)})",
                          plot_timeline(view, shards) if shards else untrained))
    families = view.families()
    analysis["families"] = _family_rows(view, families)
    parts.append(_section("families", "Shard families (shards that fire together; a context "
                          "split over several shards shows as one family)",
                          _families_html(analysis["families"])
                          + f"<p>Shards whose |activation| correlates at >= {families.threshold} "
                            "over the timeline's samples and that fired together on at least "
                            f"{MIN_JOINT} of them, grouped by average linkage; shards "
                            "active on nearly every sample (the drift direction) and shards that "
                            "never fired are left out. <code>sae-shards evaluate</code> groups "
                            "its training samples only (held-out steps left out), so its "
                            "memberships can differ at the margin.</p>"))
    stacked = any(parse_slice(n)[1] is not None for n in view.shards.target_names)
    parts.append(_section("norms", f"Per-target norms of the {which} shards"
                          + (" (each stacked expert tensor's experts combined)" if stacked else ""),
                          plot_norms(view, shards) if shards else untrained))
    if view.per_event:
        parts.append(_section("events", "Top events per shard (the reinforcement events whose "
                              "gradients activate it most)",
                              _events_html(view, shards, asked.top_k, sel.tags, mixes)))
    else:
        parts.append(_section("rollouts", "Top rollouts per shard",
                              _reused_note(view.run_dir)
                              + _blended_note(sel.blended, len(sel.labels))
                              + _rollouts_html(view, shards, asked.top_k, sel.tags, mixes)))
    return parts


def _model_sections(view: RunView, sel: _Selection, asked: _Asked, models,
                    sampling: dict[str, Any], config: dict[str, Any], untrained: str,
                    analysis: dict[str, Any]) -> list[str]:
    """The sections that load the run's initial and final policy (``models``; None under
    --no-dose or when they did not load): logit lens, dose-response, ablation and the shards
    together, each shard's figures added to ``analysis``, or why a section is empty."""
    shards, task, tags = sel.shards, asked.task, sel.tags
    final_dir = policy_dir(view.run_dir, view.checkpoint)
    scorer = None  # scorer None: a user's own TRL run, analysed without its reward (``task``)
    scorer_note = ""
    if models is not None:
        scorer = task if task is not None else models.task
    if scorer is not None:
        trained = rundir.section(config, "rl").get("reward_weights")
        first = min(view.rollouts, default=None)  # the run's first recorded step
        scorer_note = _check_scorer(models, scorer, sel.labels, sampling, trained,
                                    None if first is None else view.rollouts[first])
    detail = _detail_shards(view, shards, sel.density, tags, sel.mixes, asked.top_k,
                            models, scorer, asked.alphas, asked.n_prompts, sampling)
    analysis["shards"] = detail.entries
    for s in shards:  # NaN (a subset's start is not known here): null
        detail.entries[s]["initial_cosine"] = float(sel.initial_cos[s])
    # why the models did not load (asked again only then: it reads every file of both)
    why = (run_models_missing(view.run_dir, view.checkpoint, asked.initial_model,
                              asked.trust_remote_code)
           if asked.dose and models is None else None)
    if why:
        log.warning("no logit lens, dose-response or ablation: %s", why)
    # analysis.json says why these sections are empty, as the report does
    analysis["models_skipped"] = ("not asked for (--no-dose)" if not asked.dose else why)
    missing = ("<p>Skipped (--no-dose).</p>" if not asked.dose else
               f"<p>Needs the run's initial and final model: {html.escape(why)}.</p>" if why
               else untrained)
    no_task = ("<p>Needs the run's reward: this run's rewards came from its own TRL script. "
               "Hand them back with <code>sae-shards analyze RUN --task FILE.py:NAME</code> or "
               "<code>analyze(run, task=RewardTask(prompts, reward_funcs))</code> "
               "(docs/analysis.md).</p>")
    unscored = (no_task if models is not None and models.task is None and task is None
                else missing)  # why the dose-response and the ablation are empty
    parts = [_section("logit-lens", "Logit lens (write directions of the blocks' output "
                      "projections)",
                      _LENS_NOTE + "".join(detail.lens_html) if detail.lens_html else missing)]
    parts.append(_section("dose-response", "Dose-response: reward vs alpha * shard",
                          _dose_section(detail.dose, analysis, tags, task, sampling, scorer_note,
                                        view.checkpoint, final_dir)
                          if detail.dose else unscored))
    policy = _policy_text(view.checkpoint, final_dir)
    parts.append(_section("ablation", "Ablation: the policy without the shard's part of the "
                          "update",
                          (_ablation_html(detail.ablations, tags, policy, analysis["shards"])
                           if detail.ablations else unscored)))
    together = None
    if models is not None and shards:
        analysis["together"], together = _together(view, models, shards, analysis["shards"],
                                                   scorer, asked.n_prompts, detail.baselines,
                                                   sampling)
    parts.append(_section("together", "Shards together: how much of the run's reward change "
                          "goes through their span",
                          _together_html(analysis["together"], together, tags, policy)
                          if "together" in analysis else
                          (unscored if models is None or not shards else untrained)))
    return parts


def analysis_path(report: Path) -> Path:
    """Where ``analyze`` writes the figures of the report at ``report``: ``analysis.json``
    beside a ``report.html``, else the report's name with ``.analysis.json``
    (``cmp/k2.html``: ``cmp/k2.analysis.json``), so reports of several runs gathered in one
    folder keep their figures apart."""
    report = Path(report)
    if report.name == rundir.REPORT:
        return report.with_name(rundir.ANALYSIS)
    return report.with_name(report.stem + ".analysis.json")


class _Detailed(NamedTuple):
    """The per-shard part of a report (``_detail_shards``)."""

    entries: dict[int, dict[str, Any]]  # analysis.json's "shards"
    lens_html: list[str]  # each shard's logit-lens block
    dose: dict[int, Any]  # each shard's dose-response (scored runs only)
    ablations: dict[int, Any]  # each shard's ablation (scored runs only)
    baselines: Any  # each policy's reward as it is, shared by every shard (None: not scored)


def _detail_shards(view: RunView, shards: list[int], density: torch.Tensor,
                   tags: dict[int, str], mixes: dict[int, Any], top_k: int, models: Any,
                   scorer: Any, alphas, n_prompts: int, sampling: dict[str, Any]) -> _Detailed:
    """Each detailed shard's figures: its density, context mix, top steps and events, the SAE's
    attribution; with the run's models, its logit lens and update coefficient c; with a reward
    (``scorer``), its dose-response and ablation."""
    detail = _Detailed({}, [], {}, {}, None)
    if models is not None:
        theta0, theta_t = (dict(m.named_parameters()) for m in (models.initial, models.final))
    baselines = None
    lens_why = None  # why shards have no logit-lens row (asked of the model once)
    for s in shards:
        entry: dict[str, Any] = {"density": float(density[s]),
                                 "always_on": is_always_on(float(density[s])),
                                 "task_mix": mixes[s],
                                 "top_steps": [t["rl_step"] for t in view.top_steps(s, top_k)]}
        attribution = view.attribution(s)  # the SAE's own account, beside c below
        if attribution is not None:
            entry["attributed_update"] = attribution.total
            entry["attributed_steps"] = [attribution.first_step, attribution.last_step]
        if view.per_event:
            entry["top_events"] = [{k: t[k] for k in ("rl_step", "event", "activation",
                                                      "advantage", "abs_advantage", "rows",
                                                      "tasks")}
                                   for t in view.top_events(s, top_k)]
        if models is not None:
            try:
                rows = lens_rows(models.initial, models.tokenizer, view.shards[s], top_k)
            except FinalNormNotFound as e:  # an architecture the lens cannot read: said
                rows, lens_why = [], lens_why or str(e)
            entry["logit_lens"] = rows
            if not rows and lens_why is None:
                lens_why = lens_gap(models.initial)
            if not rows:  # analysis.json says why too, not only an empty list
                entry["logit_lens_none"] = lens_why
            detail.lens_html.append(_lens_html(s, rows, tags, lens_why or ""))
            direction = view.shards[s].dense(scaled=False)  # {name: unit direction}
            c = update_coefficient(theta_t, theta0, direction)
            entry["update_coefficient"] = c
            if scorer is not None:
                t0 = time.perf_counter()
                if baselines is None:  # each policy as it is: one estimate serves every shard
                    _say_scoring(len(shards), alphas, n_prompts, sampling)
                    baselines = _baselines(models, scorer, alphas, n_prompts, sampling)
                detail.dose[s], detail.ablations[s] = _steer_and_ablate(
                    models, scorer, direction, c, theta0, alphas, n_prompts, baselines,
                    sampling)
                log.info("shard %d scored (%d of %d) in %.0f s", s, len(detail.dose),
                         len(shards), time.perf_counter() - t0)
                entry["dose_response"] = _dose_entry(detail.dose[s])
                entry["ablation"] = dataclasses.asdict(detail.ablations[s])
            del direction  # the next shard's is built without this one still held
        detail.entries[s] = entry
    for s, apart in _told_apart(detail.ablations).items():  # judged together: Holm
        detail.entries[s]["ablation"]["told_apart"] = apart
    return detail._replace(baselines=baselines)


def _say_scoring(n_shards: int, alphas, n_prompts: int, sampling: dict[str, Any]) -> None:
    """What the dose-response and the ablation are about to sample, which on a larger model or
    with long completions takes minutes, before the first estimate."""
    length = sampling.get("max_new_tokens")
    log.info("scoring the dose-response (alphas %s, beside a random control) and the ablation "
             "of %d shard(s), then the shards together: each estimate samples %d prompts x %d "
             "completions%s with the run's own settings (--n-prompts samples fewer, --no-dose "
             "none)", ", ".join(f"{a:g}" for a in alphas), n_shards, n_prompts,
             sampling.get("n_samples", N_SAMPLES),
             f" of up to {length} tokens" if length else "")


def _dose_section(dose_results: dict[int, Any], analysis: dict[str, Any], tags: dict[int, str],
                  task: Any, sampling: dict[str, Any], scorer_note: str, checkpoint: str,
                  final_dir: Path) -> str:
    """The dose-response section: the plot, the table, and how to read them."""
    matched = final_dir.name != rundir.FINAL_MODEL  # TRL's checkpoint of the shards' step
    return (plot_dose(dose_results) + _dose_table(dose_results, analysis, tags)
            + _dose_source(task, sampling)
            + scorer_note
            + "<p>alpha = 1 adds the run's update along the shard to "
              "the initial weights: <code>c * shard</code>, where c is the "
              "projection of the update (the analysed policy's weights minus the "
              "initial ones) on the "
              "shard's unit direction, in parameter units: not the SAE's own "
              "attribution to the shard (the ablation table gives both, where the "
              "run's buffer holds the updates to attribute). "
              + _against_attribution(analysis, "their curves measure")
              + "The control adds a "
              "random direction of equal norm (one Gaussian draw for every shard). "
              "Error bars (± in the table): each "
              "point's change from alpha 0, paired per "
              "prompt (the points share prompts and rollout seed), its standard "
              "error over prompts. Dotted: each context's reward along the shard, from the same "
              "rollouts (when the prompts carry several; a built-in task's "
              "per-context reward is its plain 0..1 score, the pooled one the "
              "training reward, reward_scale included).</p>"
            + (f"<p>The shards are checkpoint {checkpoint}'s; c is the update along "
               f"them up to "
               f"{'that step' if matched else 'the end of the run'} "
               f"({final_dir}).</p>" if checkpoint != "final" else ""))


def _policy_text(checkpoint: str, final_dir: Path) -> str:
    """Which policy the ablation and the together sections start from."""
    if final_dir.name != rundir.FINAL_MODEL:  # TRL's checkpoint of the shards' step
        return f"policy at the shards' step ({final_dir})"
    if checkpoint == "final":
        return "final policy (final_model/, the end of the run)"
    return (f"final policy (final_model/, the end of the run: TRL kept no policy of "
            f"the step of checkpoint {checkpoint}, whose shards these are; the "
            "weights and the update c are the end's)")


def draws(n_prompts: int, sampling: dict[str, Any]) -> dict[str, int]:
    """``analysis.json``'s ``draws``: what the dose-response, ablation and together sections
    draw their prompts, rollouts and random control directions with, so a reader can draw the
    same again: ``seed`` (the prompts, ``eval_prompts``, and the sampled completions,
    ``score_rollouts``), ``control_seed`` (the norm-matched random directions), ``n_prompts``
    and ``n_samples`` (completions per prompt). The report is deterministic given these."""
    return {"seed": sampling.get("seed", ROLLOUT_SEED), "control_seed": CONTROL_SEED,
            "n_prompts": n_prompts, "n_samples": sampling.get("n_samples", N_SAMPLES)}


def _together(view: RunView, models, shards: list[int], entries: dict[int, dict[str, Any]],
              scorer, n_prompts: int, baselines: tuple[Any, Any] | None,
              sampling: dict[str, Any]) -> tuple[dict[str, Any], SpanEffect | None]:
    """The detailed shards together (``span``): ``analysis.json``'s ``together`` (each shard's
    weight in the update's least-squares projection onto their span, the share of the update's
    squared norm there, and, with a reward, the ``SpanEffect``) and the effect itself (None
    without a reward). One dense direction is built at a time besides the projection."""
    gram = view.shards.subset(shards).cosine_matrix()  # [k, k], in factored form
    coefficients = torch.tensor([entries[s]["update_coefficient"] for s in shards])
    weights = span_weights(gram, coefficients)
    theta0, theta_t = (dict(m.named_parameters()) for m in (models.initial, models.final))
    projected = combine((view.shards[s].dense(scaled=False) for s in shards), weights.tolist())
    out: dict[str, Any] = {"shards": list(shards), "weights": weights.tolist(),
                           "update_share": update_share(projected, theta_t, theta0)}
    effect = None
    if scorer is not None:
        t0 = time.perf_counter()
        effect = span_effect(models.initial, models.final, models.tokenizer, scorer, projected,
                             n_prompts=n_prompts, baselines=baselines or (None, None),
                             **sampling)
        log.info("the %d shards scored together in %.0f s", len(shards), time.perf_counter() - t0)
        out.update(dataclasses.asdict(effect))
    return out, effect


def _together_html(entry: dict[str, Any], effect: SpanEffect | None, tags: dict[int, str],
                   policy: str) -> str:
    """The span's share of the update and, with a reward, the six policies' rewards, their
    paired changes and the shares of the run's change; each context's changes when several."""
    shards = entry["shards"]
    named = ", ".join(_label(s, tags) for s in shards)
    text = (f"<p>P is the run's update (theta_T, the {html.escape(policy)}, minus the initial "
            f"weights theta_0) projected onto the span of shards {named} (least squares, so "
            f"overlapping shards are not counted twice). It holds "
            f"{100 * entry['update_share']:.1f}% of the update's squared norm on the shards' "
            "targets.</p>")
    if effect is None:
        return text + ("<p>No reward to score it with (see the dose-response section).</p>")

    def change(key: str) -> str:
        value, stderr = effect.changes[key]
        return f"{value:+.4f} ± {stderr:.4f}"

    def share(key: str) -> str:
        return _share(*effect.shares[key], effect.n_prompts)

    def same_as(policy: str) -> str:
        return (f" (= {policy}: the shards' parameters are all the run changed)"
                if effect.whole_is_run else "")

    r = effect.rewards
    rows = [["initial weights (theta_0)", f"{r['initial']:.4f}", "", ""],
            ["the policy (theta_T)", f"{r['final']:.4f}", change("run") + " (from theta_0)",
             "100% (the run's change)"],
            ["theta_T - P: without the shards' span", f"{r['removed']:.4f}",
             change("removed") + " (from theta_T)", share("removed") + " undone"],
            ["theta_T - random of P's norm", f"{r['removed_control']:.4f}",
             change("removed_control") + " (from theta_T)", share("removed_control") + " undone"],
            *([["theta_T + P: as far again past the policy (the overshoot)",
                f"{r['overshoot']:.4f}", change("overshoot") + " (from theta_T)",
                share("overshoot") + " lost"]] if "overshoot" in r else []),
            ["theta_0 + P: the shards' span alone", f"{r['kept']:.4f}",
             change("kept") + " (from theta_0)", share("kept") + " recovered"],
            ["theta_0 + random of P's norm", f"{r['kept_control']:.4f}",
             change("kept_control") + " (from theta_0)", share("kept_control") + " recovered"],
            ["theta_T with the shards' parameters at theta_0: the whole update on them removed"
             + same_as("theta_0"),
             f"{r['removed_whole']:.4f}", change("removed_whole") + " (from theta_T)",
             share("removed_whole") + " undone"],
            ["theta_0 with the shards' parameters at theta_T: the whole update on them alone"
             + same_as("theta_T"),
             f"{r['kept_whole']:.4f}", change("kept_whole") + " (from theta_0)",
             share("kept_whole") + " recovered"]]
    out = text + _table(["weights", "reward", "change, paired per prompt",
                         "share of the run's change"], rows)
    if effect.by_label:
        out += _table(["context", "the run's change", "without the span (from theta_T)",
                       "without the whole update on its parameters",
                       "the span alone (from theta_0)", "the whole update on them alone"],
                      [[html.escape(label), *(f"{c[k][0]:+.4f} ± {c[k][1]:.4f}" for k in
                                              ("run", "removed", "removed_whole", "kept",
                                               "kept_whole"))]
                       for label, c in effect.by_label.items()])
    run, run_se = effect.changes["run"]
    if effect.resolved:
        out += (f"<p>Removing the shards' span undoes {share('removed')} of the run's reward "
                f"change ({run:+.4f}); adding it alone to the initial weights recovers "
                f"{share('kept')}. " + _span_against_control(effect.changes, effect.n_prompts)
                + _span_overshoot(effect) + (
                    "The shards' parameters are all the parameters the run changed, so the "
                    "whole update on them is the run's own: those two rows are theta_0 and "
                    "theta_T again, their 100% holds by construction, and the span's shares "
                    "compare with the run's whole change. " if effect.whole_is_run else
                    f"The whole update on the same parameters undoes "
                    f"{share('removed_whole')} and recovers {share('kept_whole')}: what those "
                    "parameters carry at all, the reference for the span's shares (the rest of "
                    "the change is carried by the weights the shards are not on). "))
    else:
        out += (f"<p>The run's own reward change ({run:+.4f} ± {run_se:.4f}) is within "
                f"{resolved_bound(effect.n_prompts):.2f} standard errors of 0 on these "
                f"{effect.n_prompts} prompts (Student's t at {RESOLVED_LEVEL:.2%}), so no share "
                "of it is given (<code>--n-prompts</code> raises the resolution). ")
    return out + (f"{effect.n} completions per estimate, the same prompts and rollout seed for "
                  "each; ± is the standard error over prompts (for a share, the delta method's). "
                  "The reward is not linear in the weights: the two shares need not agree nor "
                  "stay within 0-100%. The random rows remove or add a Gaussian direction of "
                  "P's norm.</p>")


def _span_overshoot(effect: SpanEffect) -> str:
    """The overshoot beside the removal: near a reward optimum moving as far again past the
    policy costs reward too, and a removal that costs no more than that does not show what the
    span carries (as ``_overshoot_note`` says of one shard)."""
    if "overshoot" not in effect.shares:
        return ""
    text = (f"Moving as far again past theta_T along the span (the overshoot) loses "
            f"{_share(*effect.shares['overshoot'], effect.n_prompts)}: near a reward optimum "
            "any move that far along directions the updates vary in costs reward, so the "
            "removal is read beside it. ")
    if _curvature_only(effect.changes["removed"][0], effect.changes["overshoot"][0]):
        text += ("Here it costs at least as much as the removal: the removal's share is the "
                 "policy's curvature, not shown to be what the span carries. ")
    return text


def _span_against_control(changes: dict[str, Any], n_prompts: int) -> str:
    """Whether removing and adding the span are told apart from doing the same with a random
    direction of its norm (``changes``' paired ``*_beyond_control`` over ``n_prompts``), said
    for the report."""
    faint = [what for what, key in (("removing it", "removed_beyond_control"),
                                    ("adding it", "kept_beyond_control"))
             if key in changes and _not_beyond(*changes[key], n_prompts)]
    bound = f"{resolved_bound(n_prompts):.2f} standard errors"
    if not faint:
        return (f"Both differ from the random direction's by more than {bound} (the span's "
                "reward minus the random direction's, paired per prompt). ")
    return (f"On these rollouts {' and '.join(faint)} is not told apart from doing the same "
            "with a random direction of P's norm (the span's reward minus the random "
            f"direction's, paired per prompt, is within {bound} of 0): that share does not "
            "show that the span matters more than any direction of its size. ")


def _not_beyond(value: float | None, stderr: float | None, n_prompts: int) -> bool:
    """Whether a paired difference from a control over ``n_prompts`` is not resolved (NaN or
    None: unknown)."""
    if value is None or stderr is None or math.isnan(value) or math.isnan(stderr):
        return True
    return within_noise(value, stderr, n_prompts)


def _share(value: float, stderr: float, n_prompts: int) -> str:
    """A share with its error; exactly 0 with no error is said to be that: the scored rewards
    did not change on any prompt (e.g. no sampled token changed), not a 0 measured to 0.1%; a
    share within noise of 0 over ``n_prompts`` (``resolution.within_noise``) is marked not
    resolved."""
    if math.isnan(value):
        return "n/a"
    if value == 0 and stderr == 0:
        return "0% (no prompt's reward changed)"
    faint = (" (not resolved from 0)" if within_noise(value, stderr, n_prompts)
             else "")  # as the run's own
    return f"{100 * value:.1f}% ± {100 * stderr:.1f}%{faint}"


def together_line(analysis: dict[str, Any]) -> str | None:
    """One line on the detailed shards together, from ``analysis.json``'s ``together`` (None
    when the report scored no span: no model, no reward, or no shard)."""
    entry = analysis.get("together") or {}
    if "shares" not in entry:
        return None
    one = len(entry["shards"]) == 1
    # the prompts the errors are over (an analysis.json of an earlier version: its draws')
    n = entry.get("n_prompts") or (analysis.get("draws") or {}).get("n_prompts") or 0
    shares = {k: [math.nan if v is None else v for v in entry["shares"].get(k, (None, None))]
              for k in ("removed", "kept", "removed_whole", "removed_control", "kept_control",
                        "overshoot")}
    shards = (f"shard {entry['shards'][0]}" if one
              else f"shards {', '.join(map(str, entry['shards']))} together")
    run, run_se = (math.nan if v is None else v for v in entry["changes"]["run"])
    if math.isnan(run):
        return (f"{shards}: no prompt had completions scored under both the initial and the "
                "final policy (the reward functions returned None or NaN for the others), so "
                "the run's reward change, and any share of it, is not given: check the reward "
                "task")
    if math.isnan(shares["removed"][0]):
        return (f"{shards}: the run's reward change ({run:+.4f} ± {run_se:.4f}) is not "
                "resolved by these rollouts, so no share of it is given (--n-prompts)")
    span = "the update along it" if one else "their span"
    reference = ("their parameters are all the run changed" if entry.get("whole_is_run") else
                 f"the whole update on the same parameters {_share(*shares['removed_whole'], n)}")

    def control(kind: str) -> str:
        """The random direction's share beside the span's, and whether the two are told apart
        (an analysis.json of an earlier version has neither)."""
        apart = entry["changes"].get(f"{kind}_beyond_control")
        if f"{kind}_control" not in entry["shares"]:
            return ""
        return (f" (a random direction of its norm: {_share(*shares[kind + '_control'], n)}"
                + ("; not told apart from it" if apart is not None and _not_beyond(*apart, n)
                   else "") + ")")

    # an analysis.json of an earlier version scored no overshoot
    over = ("" if "overshoot" not in entry["shares"] else
            f", and moving as far again past the policy loses {_share(*shares['overshoot'], n)}")
    return (f"{shards}: removing {span} undoes {_share(*shares['removed'], n)} of the run's "
            f"reward change ({run:+.4f}){control('removed')}, {reference}{over}; {span} alone "
            f"recovers {_share(*shares['kept'], n)}{control('kept')} (report: 'Shards "
            "together')")


def _baselines(models, scorer, alphas: Sequence[float], n_prompts: int,
               sampling: dict[str, Any]) -> tuple[Any, Any]:
    """``(initial, final)``: each policy's ``Scored`` on the prompts every dose-response and
    ablation scores, unchanged (the dose-response's alpha 0, the ablation's reference), once per
    report; the initial one None when no alpha is 0."""
    data = eval_prompts(scorer, n_prompts, sampling.get("seed", ROLLOUT_SEED))
    initial = (score_rollouts(models.initial, models.tokenizer, scorer, data, **sampling)
               if any(a == 0 for a in alphas) else None)
    return initial, score_rollouts(models.final, models.tokenizer, scorer, data, **sampling)


def _steer_and_ablate(models, scorer, direction: dict[str, Any], c: float, theta0,
                      alphas: Sequence[float], n_prompts: int, baselines: tuple[Any, Any],
                      sampling: dict[str, Any]) -> tuple[Any, Any]:
    """One shard's dose-response (``alpha * c * shard`` added to the initial weights) and
    ablation (``c * shard`` removed from the final ones), from its unit ``direction``
    (``{name: tensor}``, every target's full size), which this consumes: the ablation reads it
    first, then it is scaled by ``c`` in place for the dose-response (the same bits as
    ``d * c``), so one copy of it is held, not two."""
    ablation = ablate(models.final, models.tokenizer, scorer, direction, theta0,
                      n_prompts=n_prompts, baseline=baselines[1], **sampling)
    for d in direction.values():
        d.mul_(c)
    dr = dose_response(models.initial, models.tokenizer, scorer, direction, alphas,
                       n_prompts=n_prompts, baseline=baselines[0], **sampling)
    return dr, ablation


def _dose_entry(dr) -> dict[str, Any]:
    """``analysis.json``'s figures of one shard's dose-response."""
    return {"alphas": list(dr.alphas), "shard": list(dr.reward_shard),
            "control": list(dr.reward_control), "n": dr.n,
            "stderr_shard": list(dr.stderr_shard), "stderr_control": list(dr.stderr_control),
            "stderr_change_shard": list(dr.stderr_change_shard),
            "stderr_change_control": list(dr.stderr_change_control),
            "shard_by_label": dr.shard_by_label, "control_by_label": dr.control_by_label}


def _dose_table(results: dict[int, Any], analysis: dict[str, Any], tags: dict[int, str]) -> str:
    """The plotted figures: each shard's c and mean reward at every alpha (± the error bar
    drawn), and the control's at the largest."""
    first = next(iter(results.values()))
    top = max(range(len(first.alphas)), key=lambda i: first.alphas[i])
    header = (["shard", "c (parameter units)"] + [f"alpha {a:g}" for a in first.alphas]
              + [f"control at {first.alphas[top]:g}"])

    def cells(means: list[float], paired: list[float], plain: list[float]) -> list[str]:
        errs = paired or plain  # paired: alpha 0 is the reference, with no error of its own
        return [f"{m:.4f}" + ("" if paired and a == 0 else f" ± {e:.4f}")
                for m, e, a in zip(means, errs, first.alphas)]

    rows = [[_label(s, tags),
             f"{analysis['shards'][s]['update_coefficient']:+.4f}"]
            + cells(dr.reward_shard, dr.stderr_change_shard, dr.stderr_shard)
            + cells(dr.reward_control, dr.stderr_change_control, dr.stderr_control)[top:top + 1]
            for s, dr in results.items()]
    return _table(header, rows) + _unmoved_note(results)


def _unmoved_note(results: dict[int, Any]) -> str:
    """Name the shards whose steering moved no prompt's mean reward at any alpha (each alpha's
    mean the same as alpha 0's, the paired change without spread): flat at ± 0.0000, which
    reads as an effect measured to be exactly zero rather than as no score having moved."""
    flat = [s for s, dr in results.items()
            if dr.stderr_change_shard and len(set(dr.reward_shard)) == 1
            and not any(dr.stderr_change_shard)]
    if not flat:
        return ""
    return (f"<p>Shard{'s' if len(flat) > 1 else ''} {', '.join(map(str, flat))}: at every alpha "
            "each prompt's mean reward was exactly its mean at alpha 0, so the direction, at "
            "these alphas times c, moved no prompt's score (a short run's c is small: larger "
            "alphas, or <code>dose_response</code> with alphas of your own, probe "
            "further).</p>")


def _ablation_html(ablations: dict[int, Any], tags: dict[int, str], policy: str,
                   entries: dict[int, dict[str, Any]]) -> str:
    """One row per shard: the final reward, and its change (± its paired standard error over
    prompts) without the shard's part of the update, with as much added again (the
    overshoot), and without a norm-matched random direction; each context's change when
    several; the SAE's own attribution beside c."""
    first = ablations[next(iter(ablations))]
    n = first.n_prompts
    labels = sorted({label for ab in ablations.values() for label in ab.removed_by_label})
    # the SAE's own account (RunView.attribution): every shard's or none (it depends on the run)
    shown = "attributed_update" in entries[next(iter(ablations))]
    header = (["shard", "c (the update along the shard, parameter units)"]
              + (["the SAE's attribution (activations summed x input_scale)"] if shown else [])
              + ["the policy's reward", "without the shard: change",
                 "pushed as far again (+ c * shard): change",
                 "without random (same norm): change",
                 "without the shard minus without random"]
              + [f"{label}: change without the shard (n={first.n_by_label.get(label, '?')})"
                 for label in labels])

    def change(value: float, stderr: float) -> str:
        return f"{value:+.4f} ± {stderr:.4f}"

    apart = _told_apart(ablations)
    rows = []
    for s, ab in ablations.items():
        rows.append([_label(s, tags), f"{ab.coefficient:+.4f}"]
                    + ([f"{entries[s]['attributed_update']:+.4f}"] if shown else [])
                    + [f"{ab.reward_final:.4f} ± {ab.stderr_final:.4f}",
                     change(ab.change_removed, ab.stderr_change_removed),
                     change(ab.change_overshoot, ab.stderr_change_overshoot),
                     change(ab.change_control, ab.stderr_change_control),
                     change(ab.beyond_control, ab.stderr_beyond_control)
                     + ("" if apart[s] else " (not told apart)")]
                    + [change(ab.removed_by_label[label] - ab.final_by_label[label],
                              ab.stderr_change_removed_by_label.get(label, math.nan))
                       if label in ab.removed_by_label else "" for label in labels])
    return (_table(header, rows)
            + f"<p>The {html.escape(policy)} minus <code>c * shard</code>, the run's update "
              f"along the shard up to that policy (c: its coefficient, as alpha = 1 of the "
              f"dose-response), against "
              f"the same weights minus <code>c</code> times a random direction of the shard's "
              f"norm (one Gaussian draw, the same for every shard, scaled to each one's norm); "
              f"{first.n} completions per estimate ({len(first.n_by_label) or 1} context(s)) "
              f"from {n} prompts, the same prompts and rollout seed for each, so a change is "
              f"paired per prompt and ± is its standard error over prompts. A change within "
              f"{resolved_bound(n):.2f} of those (Student's t over {n} prompts, at "
              f"{RESOLVED_LEVEL:.2%}) is not resolved by this many rollouts "
              f"(<code>--n-prompts</code> raises it). The last column is the shard's removal "
              f"against the random direction's, paired per prompt: where it is not told apart "
              f"from 0, removing the shard is not shown to matter more than removing that "
              f"random direction at its norm. "
              + (f"Told apart means beyond {resolved_bound(n):.2f} standard errors for one "
                 f"shard; for the {len(ablations)} shards here together (Holm's correction, so "
                 f"that {len(ablations)} shards that do nothing are not, by chance, one of them "
                 f"told apart more than {RESOLVED_LEVEL:.2%} of the time) the first must pass "
                 f"{holm_first_bound(len(ablations), n):.2f}.</p>"
                 if len(ablations) > 1 else
                 f"Told apart means beyond {resolved_bound(n):.2f} standard errors.</p>")
            + _controls_note(ablations) + _overshoot_note(ablations)
            + (_attribution_note(ablations, entries) if shown else ""))


def _told_apart(ablations: dict[int, Any]) -> dict[int, bool]:
    """Per shard: whether its removal is told apart from its random direction's, the shards
    of the table together (``resolution.resolved_together``: Holm's correction, Student's t
    over the prompts scored)."""
    return dict(zip(ablations, resolved_together(
        [ab.beyond_control for ab in ablations.values()],
        [ab.stderr_beyond_control for ab in ablations.values()],
        _prompts_of(ablations))))


def _prompts_of(ablations: dict[int, Any]) -> int:
    """The prompts the ablations were scored on (one draw serves them all; 0 for none)."""
    return next((ab.n_prompts for ab in ablations.values()), 0)


def _controls_note(ablations: dict[int, Any]) -> str:
    """Name the shards whose removal is not told apart from the random direction's."""
    apart = _told_apart(ablations)
    faint = [s for s in ablations if not apart[s]]
    if not faint:
        return ""
    if len(faint) == len(ablations):
        return ("<p>For no shard is the removal told apart from its random direction's on "
                "these rollouts.</p>")
    return (f"<p>Not told apart from the random direction's: shard{'s' if len(faint) > 1 else ''}"
            f" {', '.join(map(str, faint))}.</p>")


def _curvature_only(removed: float, overshoot: float) -> bool:
    """Whether a removal's cost (its paired change ``removed``) is no more than the overshoot's
    (``overshoot``, as far again past the policy): the policy's curvature near an optimum, not
    shown to be what the direction carries. A removal that cost nothing is no such case."""
    return removed < 0 and overshoot <= removed


def _overshoot_note(ablations: dict[int, Any]) -> str:
    """How to read the overshoot column, naming the shards whose removal cost no more than
    pushing the policy as far again along the shard (their removal shows the policy's
    curvature near its optimum, not what the shard carries)."""
    note = ("<p>The overshoot adds <code>c * shard</code> to the analysed policy instead: near a "
            "reward optimum, moving the weights that far along any direction the updates vary "
            "in costs reward either way, so a removal is read beside it. ")
    both_cost = [s for s, ab in ablations.items()
                 if _curvature_only(ab.change_removed, ab.change_overshoot)]
    if both_cost:
        note += (f"For shard{'s' if len(both_cost) > 1 else ''} "
                 f"{', '.join(map(str, both_cost))} pushing further costs at least as much as "
                 "removing: that removal's cost is the policy's curvature, not shown to be "
                 "what the shard carries. ")
    return note + "</p>"


def _attribution_note(ablations: dict[int, Any], entries: dict[int, dict[str, Any]]) -> str:
    """What c is and is not: the projection of the whole update, which the SAE's attribution
    (its activations summed) can contradict; the shards where the two disagree in sign."""
    against = _sign_against(entries)
    steps = entries[next(iter(ablations))]["attributed_steps"]
    note = ("<p>c is the projection of the run's update (up to the analysed policy) on the "
            "shard's direction; it also "
            "holds the SAE's decoder bias's part and every overlapping shard's part. "
            "The SAE's attribution is its own account: the shard's activations over the "
            f"captured updates of RL steps {steps[0]}-{steps[1]} (those still in the buffer at "
            "the end), summed, in the same units.")
    if against:
        note += (f" For shard(s) {', '.join(map(str, against))} the two disagree in sign: the "
                 "update along that direction is mostly not the shard's own, so removing it "
                 "measures the direction, not what the SAE attributes to the shard.")
    return note + "</p>"


def _sign_against(entries: dict[int, dict[str, Any]]) -> list[int]:
    """The detailed shards whose c (``update_coefficient``) and SAE attribution disagree in
    sign: the update along such a direction is mostly not the shard's own."""
    return [s for s, e in entries.items() if "attributed_update" in e
            and "update_coefficient" in e and e["attributed_update"] * e["update_coefficient"] < 0]


def _against_attribution(analysis: dict[str, Any], what: str) -> str:
    """A sentence naming the detailed shards whose c and SAE attribution disagree in sign
    (``what`` they measure then is the update along the direction), or ``""``."""
    against = _sign_against(analysis["shards"])
    if not against:
        return ""
    return (f"For shard(s) {', '.join(map(str, against))} c and the SAE's attribution disagree "
            f"in sign: {what} the update along that direction, not what the SAE attributes to "
            "the shard. ")


def _dose_source(task: RewardTask | Any | None, sampling: dict[str, Any]) -> str:
    """Which reward scored the rollouts (a given task's functions and weights) and how they
    were sampled."""
    how = (", ".join(f"{k}={v}" for k, v in sampling.items()
                     if k not in ("training_steps", "reward_batch"))
           or "score_rollouts' defaults")
    out = f"<p>Rollouts sampled as the run recorded: {html.escape(how)}.</p>"
    if task is None:
        return out
    if sampling.get("reward_batch"):
        out += (f"<p>Each reward function is called on batches of whole prompts, up to "
                f"{sampling['reward_batch']} completions (at least one prompt's), as TRL called "
                "it on the run's generation batch.</p>")
    weights = getattr(task, "reward_weights", None) or [1.0] * len(task.reward_funcs)
    names = ", ".join(f"{getattr(fn, '__name__', type(fn).__name__)} x {w:g}"
                      for fn, w in zip(task.reward_funcs, weights))
    name = getattr(task, "name", type(task).__name__)
    return out + (f"<p>Scored with the given reward task {html.escape(str(name))!r}: "
                  f"{html.escape(names)}.</p>")


def _check_scorer(models, task, run_labels: list, sampling: dict[str, Any],
                  trained_weights: list[float] | None = None,
                  recorded: dict[str, Any] | None = None) -> str:
    """Try the reward on two prompts, in whole groups of the estimates' completions per prompt
    (a reward that normalises within its group sees what it will see), before the report's
    many estimates (a broken reward function fails here, in seconds, naming itself); notes
    when it scored none of those completions, when the task's contexts are not the run's, its
    reward weights not the ones the run trained with (``trained_weights``, TRL's
    ``reward_weights`` as ``config.json`` records them), or, against the run's first
    ``rollouts.jsonl`` row (``recorded``), its reward functions not the run's (by TRL's names,
    in order) or its prompts of the other form (text, conversational)."""
    trial = score_rollouts(models.initial, models.tokenizer, task, task.dataset(2, 0),
                           **{**sampling,
                              "max_new_tokens": min(4, sampling.get("max_new_tokens", 4))})
    notes = []
    if bool(torch.isnan(trial.rewards).all()):
        notes.append(f"the reward task scored none of the {trial.rewards.numel()} completions "
                     "of its first two prompts (every reward function returned None or NaN): "
                     "if it scores no others either, every reward figure below is NaN")
    if recorded:
        notes += _unlike_the_run(task, recorded)
    ours = set(getattr(task, "labels", ()) or ())
    theirs = {label for sample in run_labels for label in sample}
    if ours and theirs and not ours & theirs:
        notes.append(f"the reward task's contexts {sorted(ours)} are none of the run's "
                     f"{sorted(theirs)}: check its label_column")
    elif not ours and len(theirs) > 1 and isinstance(task, RewardTask):
        notes.append(f"the run's rollouts carry contexts {sorted(theirs)}, the reward task none: "
                     "give it label_column (the prompts' column naming each one's context) "
                     "for figures per context")
    weights = getattr(task, "reward_weights", None) or [1.0] * len(task.reward_funcs)
    if trained_weights is not None and [float(w) for w in weights] != trained_weights:
        notes.append(f"the run trained with reward_weights {trained_weights}, the reward task "
                     f"scores with {list(weights)}: the rewards below are not the run's (give "
                     f"the task reward_weights={trained_weights})")
    for note in notes:
        log.warning(note)
    return "".join(f"<p><b>Note:</b> {html.escape(note)}.</p>" for note in notes)


def reward_func_name(func: Any) -> str:
    """The name TRL gives a reward function in its completion log (and so in
    ``rollouts.jsonl``'s ``reward_funcs``): a partial's function's, a function's ``__name__``,
    a callable object's class name (a ``RewardTask`` holds no reward model)."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def _unlike_the_run(task: Any, recorded: dict[str, Any]) -> list[str]:
    """How a reward task differs from what the run's first ``rollouts.jsonl`` row recorded:
    other reward functions, or the same in another order (their weights would then apply to
    other functions), and prompts of the other form (a chat-trained policy sampled on plain
    text, never through its chat template)."""
    notes = []
    theirs = list(recorded.get("reward_funcs") or {})
    # TRL's log keeps one column per name: functions of one name are one key there
    ours = list(dict.fromkeys(reward_func_name(fn) for fn in task.reward_funcs))
    if theirs and ours != theirs:
        order = sorted(ours) == sorted(theirs)
        notes.append(f"the run's reward functions were named {theirs} (rollouts.jsonl), the "
                     f"reward task's are named {ours}"
                     + (": the same names in another order, so each weight may apply to "
                        "another function; give them in the run's order" if order else
                        ": unless they are the same rewards under other names (a wrapper, a "
                        "renamed function), the rewards below are not the run's"))
    prompts = recorded.get("prompts") or []
    if prompts:
        trained_chat = is_conversational(prompts[0])
        task_chat = is_conversational(task.dataset(1, 0)["prompt"][0])
        if trained_chat != task_chat:
            kinds = ("conversational prompts (message lists)", "plain-text prompts")
            run_kind, task_kind = (kinds if trained_chat else kinds[::-1])
            notes.append(f"the run trained on {run_kind}, the reward task gives {task_kind}: "
                         "the policy is sampled on prompts in a form it did not train on"
                         + (" (without its chat template)" if trained_chat else ""))
    return notes


def _families_html(rows: list[dict[str, Any]]) -> str:
    """Families of several shards, largest share of activation mass first; single shards
    counted (a large SAE has thousands)."""
    if not rows:
        return "<p>No families: every shard that fired was active on nearly every sample.</p>"
    multi = sorted((r for r in rows if len(r["shards"]) > 1), key=lambda r: -r["mass_share"])
    table = _table(["shards", "density", "share of activation mass"],
                   [[", ".join(map(str, r["shards"])), f"{r['density']:.2f}",
                     f"{r['mass_share']:.2f}"] for r in multi]) if multi else ""
    single = len(rows) - len(multi)
    alone = ("" if not single else
             "; 1 shard is a family of one" if single == 1 else
             f"; {single} shards are families of one")
    return table + (f"<p>{len(multi)} famil{'y' if len(multi) == 1 else 'ies'} of several "
                    f"shards{alone} (all families are in analysis.json; rare shards of a short "
                    f"run may fire together fewer than {MIN_JOINT} times, too few to link). "
                    "Density: the fraction of the timeline's samples on which any of the "
                    "family's shards is active; share of activation mass: its shards' summed "
                    "|activation| over the timeline's, all shards'.</p>")


def _family_rows(view: RunView, families) -> list[dict[str, Any]]:
    """Per family: its shards, the fraction of samples where any of them fires, and its share of
    the timeline's total |activation|."""
    _, acts = view.timeline("final")
    total = float(acts.abs().sum()) or 1.0
    rows = []
    for members in families.members:
        a = acts[:, members]
        rows.append({"shards": members,
                     "density": float((a != 0).any(1).float().mean()) if a.shape[0] else 0.0,
                     "mass_share": float(a.abs().sum()) / total})
    return rows


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>\n'


def _label(s: int, tags: dict[int, str]) -> str:
    """A shard's id in a table or list, with the short form of its tags ("always on", "never
    left its random start")."""
    if s not in tags:
        return str(s)
    return f"{s} ({', '.join(part.split(':')[0] for part in tags[s].split('; '))})"


def _shard_title(s: int, tags: dict[int, str]) -> str:
    return f"<h3>shard {s}" + (f" ({html.escape(tags[s])})" if s in tags else "") + "</h3>"


def _summary_html(view: RunView, summary: dict, figures: dict, own: bool, shards: list[int],
                  density, tags, initial_model: str | Path | None = None,
                  chosen: bool = False, initial_cos: torch.Tensor | None = None) -> str:
    meta = view.shards.meta
    config = rundir.read_config(view.run_dir)
    rewardless = rundir.rewardless_trainer(config)  # a script's SFT/DPO-like trainer
    task, rl = rundir.section(config, "task"), rundir.section(config, "rl")
    theta0 = initial_model_dir(view.run_dir, config, initial_model)
    saved = (theta0 == view.run_dir / rundir.MODEL
             and rundir.section(config, "model").get("name_or_path") is not None)
    dead = int((density == 0).sum())
    always = [i for i in range(len(density)) if is_always_on(density[i])]
    no_file = (f"this copy of the finished run lacks {rundir.ACTIVATIONS}"  # copied without it
               if rundir.finished_steps(view.run_dir) is not None
               else "the run was killed, or is still running")
    rows = {
        "run dir": str(view.run_dir),
        "model": model_shown(meta, view.run_dir) + (" (a LoRA adapter is trained; the shards are "
                                              "updates of the effective weights)"
                                              if meta.get("lora") else ""),
        "initial weights": str(theta0) + (" (saved when the run started: the policy held no "
                                          "local directory's weights exactly)" if saved else "")
        + (f", with the LoRA adapter it started from merged in ({rundir.INITIAL_ADAPTER}/)"
           if (view.run_dir / rundir.INITIAL_ADAPTER).is_dir() else ""),
        "RL algorithm": algorithm_name(rl.get("algorithm")),
        "software and device (as the run started)": version_line(config.get("versions")) + "".join(
            f"; resumed at RL step {r.get('rl_step')} under "
            + ", ".join(f"{k} {v or 'none'}" for k, v in r.items() if k != "rl_step")
            for r in config.get("resumed_under") or [] if isinstance(r, dict)),
        "task": task.get("name") or (
            f"none: the trainer ({rewardless}) had no reward functions" if rewardless
            else "the script's own reward functions"),
        "samples": _samples_row(view, summary, meta),
        "checkpoint": view.checkpoint + {
            "killed": f" (no activations file: {no_file}; the timeline is this checkpoint's "
                      "buffer, re-encoded from its resume file)",
            "older": " (the timeline is this checkpoint's buffer, re-encoded from its resume "
                     "file)"}.get(view.recovered or "", " (the run was interrupted)"
                                  if summary.get("interrupted") else ""),
        **_steps_rows(figures, own, summary, view.checkpoint == "final"),
        **_curve_ends(figures, own),
        **({"SAE's held-out FVU (the buffered held-out samples, at the end)":
            f"{figures['fvu_heldout']:.3f}"}
           if isinstance(figures.get("fvu_heldout"), float)
           and math.isfinite(figures["fvu_heldout"]) else {}),
        **({"warning": figures["warning"]} if figures.get("warning") else {}),
        "latents / k / sparsity": f"{len(view.shards)} / {view.shards.sae.cfg.k} / "
                                  f"{view.shards.sae.cfg.sparsity}",
        "targets": _targets_line(view.shards.target_names),
        "SAE weights (factored / dense)": f"{view.shards.sae.factored_param_count()} / "
                                          f"{view.shards.sae.dense_param_count()}",
        ("detailed shards (chosen: --shards, in that order)" if chosen else
         "detailed shards (by activation mass: the always-on ones, then the largest others)"):
            ", ".join(
            _label(s, tags) for s in shards),
        f"shards that never left their random start (|cos| >= {INIT_KEPT} with their initial "
        "direction)": _unmoved_row(shards, density, initial_cos),
        "is a shard real?": (
            "the interventions below set each shard against a random direction of its norm; "
            "whether it is more than one SAE's choice is a second SAE's question: train the "
            "run's SAE again under another sae.seed (or the run under another seed of one "
            "initial model) and compare the two runs (sae-shards compare RUN OTHER_RUN), "
            "which finds each shard again beside a chance control (docs/analysis.md, \"Two "
            "runs, the same shards?\")"),
        f"always-on shards (active on >= {ALWAYS_ON_DENSITY:.0%} of the samples)":
            (", ".join(map(str, always)) + ": the direction most updates share (e.g. "
             "momentum or drift), not a context; the families below leave them out")
            if always else "none",
        f"shards never active on the timeline (the buffer at the end, {_sae_of(view)})":
            f"{dead} of {len(density)}",
        "dead shards at the end (silent for the last sae.dead_after training samples)"
        + ("" if own else ", as of the checkpoint"): (
            "n/a (no summary.json)" if own and not summary else
            "n/a (the SAE saw fewer than sae.dead_after samples)"
            if figures.get("dead_frac") is None else
            f"{round(figures['dead_frac'] * len(density))} of {len(density)}"),
        "shards that never fired during SAE training" + ("" if own else ", up to the checkpoint"):
            ("n/a (no summary.json)" if figures.get("never_fired_frac") is None else
             f"{round(figures['never_fired_frac'] * len(density))} of {len(density)}"),
        "SAE input_scale (activation x input_scale = coefficient of the unit shard direction"
        + (", parameter units)" if view.samples_are_updates else
           ", in the units of the samples)"): f"{view.shards.input_scale:.4g}",
    }
    return _table(None, [[k, v] for k, v in rows.items()])


def _unmoved_row(shards: list[int], density, initial_cos: torch.Tensor | None) -> str:
    """How many of the detailed shards, and of those that fired, are still mostly the SAE's
    random initialisation (audit 138 F5: a report detailed them as shards, while ``compare``
    leaves them out as untrained)."""
    if initial_cos is None or bool(initial_cos.isnan().any()):
        return "unknown (a subset of a checkpoint's shards: their start is the original SAE's)"
    kept = initial_cos >= INIT_KEPT  # [n_shards]
    detailed = [s for s in shards if kept[s]]
    fired = density > 0
    n_kept = int((kept & fired).sum())
    return (f"{len(detailed)} of the {len(shards)} detailed"
            + (f" ({', '.join(map(str, detailed))})" if detailed else "")
            + f"; {n_kept} of the {int(fired.sum())} that fired"
            + (": their directions are still mostly the SAE's random initialisation, not "
               "something RL changed (sae-shards compare leaves such shards out); the SAE needs "
               "more training (more RL steps, or runner.sae_steps_per_rl_step)"
               if detailed or n_kept else ""))


def _samples_row(view: RunView, summary: dict, meta: dict[str, Any]) -> str:
    """What the SAE's samples are: per optimizer step, or per event with their counts."""
    if view.lacks_events:  # a per-event run copied without events.jsonl (RunView warns)
        return (f"per event ({summary.get('granularity') or 'see config.json'}), but this copy "
                f"of the run lacks {rundir.EVENTS}, which says which completions and contexts "
                "each event held: the shards' top samples and context shares are shown per RL "
                f"step (copy {rundir.EVENTS} from the run)")
    if not view.per_event:
        return f"per optimizer step (source {meta.get('source')})"
    if summary.get("events") is None:
        return "per event (their counts are in summary.json, which the run has not written)"
    return (f"per event ({summary['granularity']}): {summary['events']} events, "
            f"{summary.get('zero_advantage_events')} with zero advantage skipped"
            + (f", {summary['zero_samples']} with a zero gradient (e.g. every token masked) "
               "dropped" if summary.get("zero_samples") else ""))


def model_shown(meta: dict[str, Any], run_dir: Path) -> str:
    """The checkpoint's ``model_id`` as the report shows it: a model directory inside the run
    (``model/``, the tiny model ``sae-shards train`` built) at the run's place now, not the
    path it had when the run wrote it (a moved or copied run named its old place)."""
    model, written_in = meta.get("model_id"), meta.get("run_dir")
    if not (model and written_in):
        return str(model)
    try:
        inside = Path(model).relative_to(written_in)
    except ValueError:  # a model outside the run (a hub id, the user's directory)
        return str(model)
    return str(run_dir / inside)


def algorithm_name(recorded: str | None) -> str:
    """The RL algorithm as the report names it, whichever way the run recorded it:
    ``GRPO (trl.GRPOTrainer)`` for ``grpo`` and ``GRPOTrainer`` alike, a script's other trainer
    by its class (``OnlineDPOTrainer``)."""
    if not recorded:
        return "n/a"
    # config.json's rl.algorithm: sae-shards train records the recipe's choice, ShardCallback
    # the trainer's class (a script may use any TRL trainer); one name for both
    trainer = ALGORITHM_TRAINERS.get(recorded, recorded)
    if trainer in ALGORITHM_TRAINERS.values():
        return f"{trainer.removesuffix('Trainer')} (trl.{trainer})"
    return trainer


def _steps_rows(figures: dict, own: bool, summary: dict, finished: bool) -> dict[str, Any]:
    """The RL and SAE steps of the figures (``checkpoint_figures``), saying so when they are the
    checkpoint's rather than the run's (``finished``: read at the final checkpoint, which only
    a run's end writes)."""
    if own:
        return {"RL steps": _or_na(figures["rl_steps"]), "SAE steps": _or_na(figures["sae_steps"])}
    def at(key: str) -> str:
        if summary.get("rl_steps") is None and finished:
            return "this copy of the finished run lacks summary.json: recomputed from its logs"
        if summary.get("rl_steps") is None:
            return "as of the checkpoint; the run wrote no summary.json (killed, or still running)"
        return f"as of the checkpoint; the run went on to {_or_na(summary.get(key))}"

    return {"RL steps": f"{_or_na(figures['rl_steps'])} ({at('rl_steps')})",
            "SAE steps": f"{_or_na(figures['sae_steps'])} ({at('sae_steps')})"}


def _or_na(value: Any) -> Any:
    return "n/a" if value is None else value


def _sae_of(view: RunView) -> str:
    """Which SAE encoded the timeline: "final SAE", or the step checkpoint's."""
    return "final SAE" if view.checkpoint == "final" else f"the SAE of {view.checkpoint}"


def _read_summary(path: Path) -> dict[str, Any]:
    """``summary.json``, strictly: a JSON object whose ``RUN_FIGURES`` are numbers (``warning``
    a string, ``interrupted`` a bool) or null; a damaged or edited file is a ``CheckpointError``
    naming it, instead of an error from formatting the report."""
    fix = ("copy it again from the run, or delete it (the figures are then recomputed from the "
           "run's logs)")
    try:
        summary = read_json_object(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {fix}") from None
    for key in RUN_FIGURES:
        want = {"warning": str, "interrupted": bool}.get(key, float)  # float: any number
        if (found := wrong_type(key, summary.get(key), want)) is not None:
            raise CheckpointError(f"{path}: {found} or null; {fix}")
    return summary


def checkpoint_figures(view: RunView, summary: dict) -> tuple[dict[str, Any], bool]:
    """The run's figures (``RUN_FIGURES``) as of the checkpoint read, and whether they are
    ``summary.json``'s own. They are when the summary describes that checkpoint (the final one,
    or the step a stopped run ended on). Otherwise (a killed run, an earlier checkpoint of
    a finished one, or a copy of the run without its summary) they are recomputed from the
    logs ``RunView`` holds, which stop at the checkpoint's RL and SAE step (``RunView.up_to``):
    reward from ``rollouts.jsonl``, FVU from ``metrics.jsonl``, dead and never-fired shards
    from the checkpoint's latent statistics; the held-out FVU, measured at the end only, is
    None, and ``interrupted`` stays the run's."""
    meta = view.shards.meta
    steps = summary.get("rl_steps")
    if (view.checkpoint == "final" and isinstance(steps, int)
            and meta.get("rl_step") in (None, steps)) or (
            steps is not None and steps == meta.get("rl_step")
            and summary.get("sae_steps") == meta.get("sae_step")):
        return {k: summary.get(k) for k in RUN_FIGURES}, True
    # (a summary holding none of the figures, {"steps": "many"}, is no description of final
    # either: audit 147 F5 had its n/a's taken as the run's figures)
    from sae_shards.capture.summary import first_last, worse_than_mean
    from sae_shards.core.trainer import dead_fraction

    rewards = first_last(step_reward_means(view)[1], 5)
    fvu = first_last([r["fvu"] for r in view.sae_metrics if r.get("fvu") is not None], 10)
    stats = view.shards.stats
    since, fired = stats.get("stats.samples_since_fired"), stats.get("stats.fire_count")
    dead = (None if since is None else
            dead_fraction(since, view.shards.sae.cfg.dead_after, meta.get("sae_samples")))
    return {"rl_steps": meta.get("rl_step"), "sae_steps": meta.get("sae_step"),
            "reward_first": rewards[0], "reward_last": rewards[1],
            "fvu_first": fvu[0], "fvu_last": fvu[1], "fvu_heldout": None, "dead_frac": dead,
            "never_fired_frac": None if fired is None else float((fired == 0).float().mean()),
            "interrupted": summary.get("interrupted"),
            "warning": worse_than_mean(fvu[1], meta.get("sae_step"), fvu[0],
                                       view.shards.sae.cfg.lr)}, False


def _curve_ends(figures: dict, own: bool) -> dict[str, str]:
    """Reward and FVU, first → last, of the figures (``checkpoint_figures``)."""
    so_far = ("" if own else " (up to the checkpoint's RL step "
              f"{_or_na(figures['rl_steps'])}: from rollouts.jsonl and metrics.jsonl)")
    return {"reward first/last 20% of the steps":
            _pair(figures, "reward_first", "reward_last") + so_far,
            "SAE's FVU first/last 10% of its steps":
            _pair(figures, "fvu_first", "fvu_last") + so_far}


def _pair(d: dict, a: str, b: str) -> str:
    """``first → last`` of two figures; n/a for a figure that is missing or null (e.g. the FVU
    of an SAE that never trained)."""
    fig = lambda key: "n/a" if d.get(key) is None or d[key] != d[key] else f"{d[key]:.3f}"  # noqa: E731
    return f"{fig(a)} → {fig(b)}"


def _events_html(view: RunView, shards: list[int], top_k: int, tags: dict[int, str],
                 mixes: dict[int, dict[str, float]]) -> str:
    out = []
    for s in shards:
        rows = []
        for t in view.top_events(s, top_k):
            fig = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
            completions = " | ".join(
                f"{_text(c)} (r={fig(r)}, adv={fig(a)})"
                for c, r, a in zip(t["completions"][:4], t["rewards"], t["advantages"]))
            spread = [abs(a) for a in t["advantages"] if a is not None]
            rows.append([t["rl_step"], t["event"], f"{t['activation']:+.3f}",
                         f"{sum(spread) / len(spread):.3f}" if spread else "n/a",
                         ", ".join(sorted(set(map(str, t["tasks"])))) or "-",
                         _text(t["prompt"]), completions])
        out.append(_shard_title(s, tags) + _mix_html(mixes.get(s)) + (_table(
            ["RL step", "event", "activation", "mean |advantage|", "tasks", "prompt",
             "completions (first 4: reward, advantage)"], rows) if rows else _inactive(view)))
    return "".join(out) or "<p>No active shards.</p>"


def _blended_note(blended: int, n_samples: int) -> str:
    """A per-step run's note when ``blended`` of its ``n_samples`` samples blend contexts: an
    optimizer step whose batch holds rollouts of several contexts is one sample, so the
    contexts' shares of a shard's activation mostly repeat the batches' mix, whatever the shard
    does in each context."""
    if not blended:
        return ""
    return (f"<p>{blended} of {n_samples} samples (optimizer steps) hold rollouts of more "
            "than one context, and a per-step sample is their whole batch's update: the "
            "shares of a shard's |activation| by context below then mostly repeat the "
            "batches' mix and cannot tell which context the shard belongs to. "
            "<code>capture.granularity=group</code> gives one sample per prompt group, one "
            "context each (docs/usage.md, \"Per-event samples\").</p>")


def _reused_note(run_dir: Path) -> str:
    """A note when the run trained each generation over several optimizer steps (TRL's
    ``num_iterations``, ``steps_per_generation``, as ``config.json`` records them): each step's
    rollouts are then its whole generation batch, the same for the steps that share it."""
    rl = rundir.section(rundir.read_config(run_dir), "rl")
    extra = rundir.section(rl, "extra")
    get = lambda key: rl.get(key, extra.get(key))  # noqa: E731
    settings = (get("num_iterations") or 1, get("steps_per_generation"),
                get("gradient_accumulation_steps") or 1)
    reused = reused_generations(*settings)
    if generation_use(*settings) != REUSED:  # one generation a step, or all of a step's
        return ""
    said = ", ".join(f"{k}={v}" for k, v in reused.items())
    return (f"<p><b>Note:</b> the run trained each generation over several optimizer steps "
            f"({html.escape(said)}): a step's rollouts are the whole generation batch its step "
            "came from, the same for the steps that share it, not the completions that step "
            "alone trained on.</p>")


def _rollouts_html(view: RunView, shards: list[int], top_k: int, tags: dict[int, str],
                   mixes: dict[int, dict[str, float]]) -> str:
    out = []
    for s in shards:
        rows = []
        for t in view.top_steps(s, top_k):
            r = t["rollout"] or {}
            scored = [x for x in (r.get("rewards") or []) if x is not None]
            mean = f"{sum(scored) / len(scored):.3f}" if scored else "n/a"
            rows.append([t["rl_step"], f"{t['activation']:+.3f}", mean, _contexts(r),
                         " | ".join(_group_samples(r))])
        out.append(_shard_title(s, tags) + _mix_html(mixes.get(s)) + (_table(
            ["RL step", "activation", "mean reward", "contexts (completions)",
             "prompt → a completion (reward; first 3 prompts)"], rows) if rows
            else _inactive(view)))
    return "".join(out) or "<p>No active shards.</p>"


def _inactive(view: RunView) -> str:
    """The line in place of a chosen shard's empty table."""
    return (f"<p>Active on no sample of the timeline (the buffer at the end, {_sae_of(view)}): "
            "nothing to list.</p>")


def _contexts(row: dict[str, Any]) -> str:
    """A step's rollouts by context label, ``"A 8, B 8"`` ("-" without labels)."""
    counts = collections.Counter(row.get("tasks") or [])
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "-"


def _text(x: Any) -> str:
    """A prompt or completion as the report shows it: text as its repr, a conversation (TRL's
    chat format, a list of ``{"role", "content"}`` messages) as ``role: 'content'`` turns."""
    if isinstance(x, list) and x and all(isinstance(m, dict) and "content" in m for m in x):
        return " / ".join(f"{m.get('role', '?')}: {m['content']!r}" for m in x)
    return repr(x)


def _group_samples(row: dict[str, Any], n: int = 3) -> list[str]:
    """One completion of each of a step's first ``n`` prompts (its groups, not one group's
    members), with its reward."""
    seen: set[str] = set()
    out = []
    for p, c, x in zip(row.get("prompts") or [], row.get("completions") or [],
                       row.get("rewards") or []):
        key = repr(p)
        if key in seen:
            continue
        seen.add(key)
        out.append(f"{_text(p)} → {_text(c)} (r={'n/a' if x is None else f'{x:.2f}'})")
        if len(out) == n:
            break
    return out


def _mix_html(mix: dict[str, float] | None) -> str:
    """A shard's |activation| by context label (none given: the run logged fewer than two)."""
    if not mix:
        return ""
    return ("<p>|activation| by context: "
            + ", ".join(f"{html.escape(k)} {v:.0%}" for k, v in mix.items()) + "</p>")


def _lens_html(shard: int, rows: list[dict], tags: dict[int, str], why: str) -> str:
    """A shard's logit-lens table, or ``why`` it has no row."""
    body = [[r["target"], f"{r['sigma']:.3f}", " ".join(repr(t) for t in r["promoted"]),
             " ".join(repr(t) for t in r["suppressed"])] for r in rows]
    return _shard_title(shard, tags) + (_table(["target", "σ", "+u promotes", "+u suppresses"], body)
                                         if body else f"<p>No logit lens: {html.escape(why)}.</p>")


def lens_gap(model) -> str:
    """Why a shard has no logit-lens row: the model's writers cannot be read through the
    unembedding (``logit_lens.no_writers_reason``), or the shard has no part on a writer."""
    from sae_shards.analysis.logit_lens import no_writers_reason

    return no_writers_reason(model) or (
        "no part of this shard is on a residual-stream writer (an attention or MLP output "
        "projection) among the captured targets")


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    head = ("<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            + "</tr></thead>") if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


REPORT_TITLE = "sae-shards report"
"""How every report's ``<title>`` starts (``report_path_refusal`` knows an earlier one by it)."""


def report_path_refusal(out: Path, run_dir: Path | None = None) -> str | None:
    """Why ``analyze`` may not write its report to ``out``, or None: a directory, an existing
    file that is not an earlier report (a run's ``rollouts.jsonl``, say, which the report
    would replace), a file in another run's directory than ``run_dir``'s (whose own report
    and figures it would replace), or one inside a folder a run writes itself
    (``rundir.inside_run_folder``: its checkpoints, which it prunes and removes)."""
    inside = rundir.inside_run_folder(out.parent)
    if inside is not None:
        run, name = inside
        return (f"--out {out} is in {name}/ of the run in {run}, which the run itself writes "
                "(its resume prunes its checkpoints, and overwrite=true removes them with the "
                "run); give a file outside the run's own folders")
    other = out.parent
    if (run_dir is not None and rundir.earlier_results(other)
            and other.resolve() != Path(run_dir).resolve()):
        return (f"--out {out} is in the directory of another run ({other}): a report of "
                f"{run_dir} does not belong there (and {other.name}'s own report.html and "
                "analysis.json would be replaced by it); give a file outside it")
    if out.is_dir():
        return f"--out {out} is a directory; give the report's file, e.g. {out / 'report.html'}"
    if out.exists():
        try:
            with open(out, "rb") as f:
                head = f.read(512)
        except OSError as e:
            return f"--out {out} cannot be read ({e.strerror}); give a new file"
        if f"<title>{REPORT_TITLE}".encode() not in head:
            return (f"--out {out} exists and is not a sae-shards report: the report would "
                    "replace it; give a new file, e.g. DIR/report.html")
    figures = analysis_path(out)
    if figures.exists() and not _is_analysis(figures):
        return (f"--out {out}: its figures would be written to {figures}, which exists and is "
                "not a sae-shards analysis; give the report another name")
    return None


def _is_analysis(path: Path) -> bool:
    """Whether ``path`` is an ``analysis.json`` that ``analyze`` wrote (a JSON object with its
    ``run`` and ``shards``)."""
    try:
        data = json_read.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"run", "shards"} <= set(data)


def _page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:2px 6px;font-size:13px;text-align:left}img{max-width:100%}"
             "section{margin-bottom:2em}")
    present = re.findall(r'<section id="([^"]+)"', body)  # per-event runs: events, not rollouts
    nav = " · ".join(f'<a href="#{s}">{s}</a>' for s in present)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><p>{nav}</p>"
            f"{body}</body></html>")
