"""``sae-shards evaluate RUN_DIR``: are the shards real? Scores against sign-free ground truth.

Needs a run made with ``runner.save_samples=true`` and ``runner.heldout_every=k`` on a task that
labels its steps (``multiskill``). Steps held out from SAE training give the ground truth and
every held-out score; the rest choose what needs choosing (e.g. each task's best latent).

Figures (``evaluation.json`` and ``evaluation.md`` in the run directory):

- ``mmcs``: mean over tasks of the max ``|cos|`` between a task's principal direction (held-out
  steps) and any shard, beside ``mmcs_null`` (the same with the held-out labels shuffled,
  averaged over ``n_null`` shuffles) and ``mmcs_margin``; beside the same figures for the
  supervised directions (``mmcs_supervised``: each task's principal direction on the training
  steps in place of the shards): what any direction estimated from the training steps reaches
  against this ground truth, the ceiling the margin can be read against;
- ``auroc_task``: per task, the latent whose ``|activation|`` best predicts "task k active" on the
  training steps, scored on the held-out steps; beside ``auroc_null`` (latent chosen with shuffled
  training labels) and the supervised reference (``groundtruth.supervised_reference``);
- ``purity`` / ``coverage`` of each task's best latent, ``fvu_heldout``, ``l0``, ``dead_frac``;
- ``steering``: per task, the reward change on every task when its best latent's shard (scaled by
  its share of the run's update, times ``alpha``, both signs) is added to the initial weights,
  against a norm-matched random direction; selectivity = change on the task minus the mean change
  on the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from sae_shards.core.checkpoint import CheckpointError, read_safetensors
from sae_shards.planted.groundtruth import (abs_cosine, auroc, flatten, norm_features, shuffled,
                                    supervised_reference, task_directions, unflatten)
from sae_shards.analysis.interventions import add_direction, mean_reward, random_direction_like, update_coefficient
from sae_shards.core.metrics import evaluate_heldout, match_directions
from sae_shards.analysis.shards import ShardSet, load_run_models


class EvalData:
    """A run's saved samples split into training and held-out steps, with one label per step."""

    def __init__(self, run_dir: Path, names: Sequence[str], from_step: int = 0) -> None:
        path = run_dir / "samples.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; run the job with runner.save_samples=true "
                                  "and runner.heldout_every=k to evaluate it")
        tensors, header = read_safetensors(path)
        if "task_labels" not in header:
            raise CheckpointError(f"{path}: no task_labels in the header; re-save the samples "
                                  "with sae_shards.job.save_samples")
        labels = json.loads(header["task_labels"])
        if any(len(lab) != 1 for lab in labels):
            raise CheckpointError(f"{path}: every step needs exactly one task label to evaluate "
                                  "(use a scheduled task such as multiskill)")
        self.labels = [lab[0] for lab in labels]
        self.heldout = tensors["heldout"]
        self.steps = tensors["rl_step"]
        self.samples = {n: tensors[f"sample.{n}"] for n in names}
        self.names = list(names)
        if int(self.heldout.sum()) < 2 or int((~self.heldout).sum()) < 2:
            raise CheckpointError(f"{path}: needs >= 2 held-out and >= 2 training steps "
                                  "(set runner.heldout_every)")
        nonzero = flatten(self.samples, self.names).norm(dim=1) > 0  # all-zero steps say nothing
        # Task directions drift: from_step restricts ground truth and scores to a late window.
        self.keep = nonzero & (self.steps >= from_step)
        self.tasks = sorted(set(self.labels))
        for heldout in (False, True):
            _, labels = self.split(heldout)
            short = [t for t in self.tasks if labels.count(t) < 2]
            if short:
                raise CheckpointError(
                    f"{path}: tasks {short} have fewer than 2 non-zero "
                    f"{'held-out' if heldout else 'training'} steps; run more RL steps or change "
                    "runner.heldout_every")

    def split(self, heldout: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
        mask = (self.heldout == heldout) & self.keep
        idx = mask.nonzero().flatten().tolist()
        return {n: v[mask] for n, v in self.samples.items()}, [self.labels[i] for i in idx]


def _best_latents(acts: torch.Tensor, labels: Sequence[str], tasks: Sequence[str]) -> list[int]:
    """Per task, the latent whose |activation| has the highest AUROC for that task."""
    best = []
    for t in tasks:
        pos = torch.tensor([y == t for y in labels])
        scores = [auroc(acts[:, j].abs(), pos) for j in range(acts.shape[1])]
        scores = [s if s == s else 0.0 for s in scores]
        best.append(int(torch.tensor(scores).argmax()))
    return best


class _OneLabel:
    """A multi-task task seen through one label's prompts (per-task rewards)."""

    def __init__(self, task: Any, label: str) -> None:
        self.task, self.label = task, label

    def dataset(self, n_prompts: int, seed: int = 0):
        return self.task.dataset(n_prompts, seed, labels=[self.label])

    @property
    def reward_funcs(self):
        return self.task.reward_funcs


def steering_selectivity(run_dir: Path, shards: ShardSet, best: dict[str, int], alpha: float,
                         n_prompts: int, seed: int = 0) -> dict[str, Any] | None:
    """Per task k: the reward change on every task when ``+-alpha * c * shard`` (c: the shard's
    share of the run's update) is added to the initial weights, for k's best latent and for a
    norm-matched random direction. ``selectivity`` = change on k minus mean change on the others,
    taken at the sign that raises task k's reward. None when the run's models are not available."""
    models = load_run_models(run_dir)
    if models is None:
        return None
    init, final, tok, task = models
    tasks = list(best)
    views = {t: _OneLabel(task, t) for t in tasks}
    reward = lambda: {t: mean_reward(init, tok, views[t], n_prompts=n_prompts, seed=seed).mean  # noqa: E731
                      for t in tasks}
    base = reward()
    p0, p1 = dict(init.named_parameters()), dict(final.named_parameters())
    out = {"alpha": alpha, "base": base, "per_task": {}}
    for t, j in best.items():
        unit = shards[j].dense(scaled=False)
        c = update_coefficient(p1, p0, unit)
        direction = {n: d * c for n, d in unit.items()}
        control = random_direction_like(direction, torch.Generator().manual_seed(seed))
        entry = {"latent": j, "coefficient": c}
        for name, d in (("shard", direction), ("control", control)):
            best_sel = None
            for sign in (1.0, -1.0):
                with add_direction(init, d, sign * alpha):
                    r = reward()
                delta = {u: r[u] - base[u] for u in tasks}
                others = [delta[u] for u in tasks if u != t]
                sel = delta[t] - sum(others) / len(others)
                entry[f"{name}_{'plus' if sign > 0 else 'minus'}"] = delta
                if best_sel is None or delta[t] > best_sel[0]:
                    best_sel = (delta[t], sel)
            entry[f"{name}_selectivity"] = best_sel[1]
        out["per_task"][t] = entry
    out["selectivity"] = sum(e["shard_selectivity"] for e in out["per_task"].values()) / len(best)
    out["control_selectivity"] = sum(e["control_selectivity"] for e in out["per_task"].values()) / len(best)
    return out


def evaluate_run(run_dir: str | Path, n_null: int = 5, seed: int = 0, steering: bool = True,
                 checkpoint: str | None = None,
                 alpha: float = 2.0, n_prompts: int = 32, from_step: int = 0) -> dict[str, Any]:
    """All figures of one run (see the module docstring); also writes evaluation.json/.md.

    ``from_step`` keeps only RL steps >= it (training and held-out alike): the task directions
    drift, and early steps, before the policy is tag-conditioned, blur a global direction.
    """
    run_dir = Path(run_dir)
    shards = ShardSet.from_run(run_dir, checkpoint)
    sae = shards.sae
    data = EvalData(run_dir, shards.target_names, from_step)
    tasks = data.tasks
    x_tr, y_tr = data.split(False)
    x_te, y_te = data.split(True)
    shapes = {t.name: t.shape for t in sae.targets}
    g = torch.Generator().manual_seed(seed)

    # ground truth on held-out steps, and shard matching against it
    flat_te, flat_tr = flatten(x_te, data.names), flatten(x_tr, data.names)
    truth = task_directions(flat_te, y_te, tasks)
    match = match_directions(sae, unflatten(truth, shapes))
    null_truths = [task_directions(flat_te, shuffled(y_te, g), tasks) for _ in range(n_null)]
    null_mmcs = [match_directions(sae, unflatten(t, shapes)).mmcs for t in null_truths]
    ref = supervised_reference(flat_tr, y_tr, flat_te, y_te, norm_features(x_tr, data.names),
                               norm_features(x_te, data.names), tasks)
    # the same metric for the supervised "shards": the training steps' principal directions
    sup_mmcs = lambda t: float(abs_cosine(t, ref.directions).max(1).values.mean())  # noqa: E731

    # best latent per task chosen on training steps, scored on held-out steps
    acts_tr = sae.encode(sae.to_scaled(x_tr)).dense(sae.n_latents)
    acts_te = sae.encode(sae.to_scaled(x_te)).dense(sae.n_latents)
    best = _best_latents(acts_tr, y_tr, tasks)
    auroc_task = {t: auroc(acts_te[:, j].abs(), torch.tensor([y == t for y in y_te]))
                  for t, j in zip(tasks, best)}
    null_auroc = []
    for _ in range(n_null):
        nb = _best_latents(acts_tr, shuffled(y_tr, g), tasks)
        null_auroc.append(sum(auroc(acts_te[:, j].abs(), torch.tensor([y == t for y in y_te]))
                              for t, j in zip(tasks, nb)) / len(tasks))

    fires = acts_te != 0
    per_task = {}
    for t, j in zip(tasks, best):
        is_t = torch.tensor([y == t for y in y_te])
        n_fire = int(fires[:, j].sum())
        per_task[t] = {
            "best_latent": j, "auroc": auroc_task[t],
            "purity": float((fires[:, j] & is_t).sum()) / n_fire if n_fire else 0.0,
            "coverage": float((fires[:, j] & is_t).sum()) / max(int(is_t.sum()), 1),
            "max_abs_cos_to_truth": float(match.max_abs_cos[tasks.index(t)]),
            "supervised_auroc": ref.auroc_per_task[t],
        }
    held = evaluate_heldout(sae, [x_te])
    dead = shards.stats.get("stats.samples_since_fired")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    result = {
        "run_dir": str(run_dir), "tasks": tasks, "n_train": len(y_tr), "n_heldout": len(y_te),
        "from_step": from_step,
        "mmcs": match.mmcs, "mmcs_null": mean(null_mmcs), "mmcs_margin": match.mmcs - mean(null_mmcs),
        "mmcs_supervised": sup_mmcs(truth),
        "mmcs_supervised_null": mean([sup_mmcs(t) for t in null_truths]),
        "auroc_task": mean(list(auroc_task.values())), "auroc_null": mean(null_auroc),
        "auroc_margin": mean(list(auroc_task.values())) - mean(null_auroc),
        "supervised_auroc": ref.auroc_mean, "supervised_centroid_accuracy": ref.centroid_accuracy,
        "chance_accuracy": ref.chance_accuracy,
        "fvu_heldout": held.fvu, "l0": held.l0,
        "dead_frac": float((dead >= sae.cfg.dead_after).float().mean()) if dead is not None else None,
        "per_task": per_task,
        "steering": (steering_selectivity(run_dir, shards, dict(zip(tasks, best)), alpha, n_prompts,
                                          seed) if steering else None),
    }
    (run_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    (run_dir / "evaluation.md").write_text(to_markdown(result))
    return result


def to_markdown(r: dict[str, Any]) -> str:
    lines = [f"# Evaluation of {r['run_dir']}", "",
             f"{r['n_train']} training steps, {r['n_heldout']} held-out steps (RL steps >= "
             f"{r['from_step']}), tasks {r['tasks']}.", "",
             "| figure | value | null / reference |", "|---|---|---|",
             f"| mmcs | {r['mmcs']:.3f} | shuffled-label null {r['mmcs_null']:.3f} (margin {r['mmcs_margin']:+.3f}) |",
             f"| mmcs of the supervised directions | {r['mmcs_supervised']:.3f} | shuffled-label null {r['mmcs_supervised_null']:.3f} (margin {r['mmcs_supervised'] - r['mmcs_supervised_null']:+.3f}) |",
             f"| auroc_task (held-out, best latent) | {r['auroc_task']:.3f} | shuffled-label null {r['auroc_null']:.3f} |",
             f"| supervised reference AUROC | {r['supervised_auroc']:.3f} | nearest-centroid accuracy {r['supervised_centroid_accuracy']:.3f} (chance {r['chance_accuracy']:.3f}) |",
             f"| fvu_heldout | {r['fvu_heldout']:.3f} | |", f"| l0 | {r['l0']:.2f} | |",
             f"| dead_frac | {r['dead_frac']} | |", "",
             "| task | best latent | AUROC | purity | coverage | max \\|cos\\| to truth | supervised AUROC |",
             "|---|---|---|---|---|---|---|"]
    for t, v in r["per_task"].items():
        lines.append(f"| {t} | {v['best_latent']} | {v['auroc']:.3f} | {v['purity']:.2f} | "
                     f"{v['coverage']:.2f} | {v['max_abs_cos_to_truth']:.3f} | {v['supervised_auroc']:.3f} |")
    st = r.get("steering")
    if st:
        lines += ["", f"Steering (alpha = {st['alpha']} x the shard's share of the run's update, "
                  "added to the initial weights; better sign per task):", "",
                  f"mean selectivity {st['selectivity']:+.3f}, norm-matched random control "
                  f"{st['control_selectivity']:+.3f}", "",
                  "| task | latent | reward change on task (+ / -) | selectivity | control |",
                  "|---|---|---|---|---|"]
        for t, e in st["per_task"].items():
            lines.append(f"| {t} | {e['latent']} | {e['shard_plus'][t]:+.3f} / {e['shard_minus'][t]:+.3f} "
                         f"| {e['shard_selectivity']:+.3f} | {e['control_selectivity']:+.3f} |")
    return "\n".join(lines) + "\n"
