"""Why a planted run's best latent scores what it does: supervised diagnostics of its events.

    python -m scripts.planted_diagnostics runs/planted_sweep/multiskill-mixed-seed0/body-event

Needs a run evaluated by ``sae-shards evaluate`` (``runner.save_samples``, ``heldout_every``).
Prints, on the held-out samples (docs/results.md, "Third session"):

- ``sign_consistency``: per task, the share of its held-out samples whose cosine with the task's
  training principal direction has the majority sign (0.5: signs flip; 1: one sign);
- ``probe_rank1``: the ridge probe of ``groundtruth.separability`` truncated to rank 1 on every
  matrix target (what one low-rank encoder direction per task could reach);
- ``principal_abs_mean_removed``: the supervised reference after projecting the training
  samples' mean direction out of every sample;
- ``subspace3``: AUROC of the norm of each sample's projection on the task's top-3 principal
  subspace (how many directions a task spans);
- ``best_latent_pre_activation``: the best latent per task (chosen on training samples, drift
  latents excluded as ``evaluation.json`` lists them) scored by its ``|pre-activation|`` before
  the top-k, beside ``auroc_task`` from ``evaluation.json`` (after it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from sae_shards.analysis.shards import ShardSet
from sae_shards.core.checkpoint import CheckpointError
from sae_shards.planted.evaluate import EvalData, best_latents
from sae_shards.planted.groundtruth import (auroc, flatten, presence, ridge_probe,
                                            separability, task_directions, unflatten)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _mean_auroc(scores: Tensor, labels, tasks) -> float:
    return sum(auroc(scores[:, k], presence(labels, t)) for k, t in enumerate(tasks)) / len(tasks)


def _rank1(dirs: Tensor, shapes: dict[str, tuple[int, ...]]) -> Tensor:
    parts = []
    for name, d in unflatten(dirs, shapes).items():
        if d.ndim == 3:  # [K, m, n]: keep each direction's top singular pair on this target
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)
            d = S[:, :1, None] * U[:, :, :1] @ Vh[:, :1]
        parts.append(d.flatten(1))
    return torch.cat(parts, 1)


def read_evaluation(run_dir: Path, evaluation: Path | None = None) -> dict:
    """The run's ``evaluation.json`` (``evaluation``: one written elsewhere with ``evaluate
    --out``), read before any work: SystemExit saying what to run when it is missing."""
    path = evaluation or run_dir / "evaluation.json"
    if path.is_dir():
        path = path / "evaluation.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot be read ({e}); run `sae-shards evaluate {run_dir}` "
                         "first, or name the evaluation it wrote elsewhere with --evaluation "
                         "DIR/evaluation.json") from e


def diagnose(run_dir: Path, ridge: float = 0.1, evaluation: Path | None = None) -> dict:
    evaluated = read_evaluation(run_dir, evaluation)  # first: it needs `evaluate` run
    shards = ShardSet.from_run(run_dir)
    sae = shards.sae
    data = EvalData(run_dir, shards.target_names)
    x_tr, y_tr = data.split(False)
    x_te, y_te = data.split(True)
    tasks, names = data.tasks, data.names
    shapes = {t.name: t.shape for t in sae.targets}
    ftr, fte = _unit(flatten(x_tr, names)), _unit(flatten(x_te, names))  # [S, D]
    out: dict = {"separability": {k: v["mean"] for k, v in
                                  separability(ftr, y_tr, fte, y_te, tasks, ridge).items()}}

    principal = task_directions(ftr, y_tr, tasks)  # [K, D]
    cons = {}
    for k, t in enumerate(tasks):
        c = fte[presence(y_te, t)] @ principal[k]
        pos = float((c > 0).float().mean())
        cons[t] = max(pos, 1 - pos)
    out["sign_consistency"] = cons

    probe = ridge_probe(ftr, y_tr, tasks, ridge)  # [K, D]
    out["probe_rank1"] = _mean_auroc(fte @ _unit(_rank1(probe, shapes)).T, y_te, tasks)

    mean = _unit(ftr.mean(0, keepdim=True))[0]
    drop = lambda x: _unit(x - (x @ mean)[:, None] * mean)  # noqa: E731
    d = task_directions(drop(ftr), y_tr, tasks)
    out["principal_abs_mean_removed"] = _mean_auroc((drop(fte) @ d.T).abs(), y_te, tasks)

    sub = []
    for t in tasks:
        _, _, vh = torch.linalg.svd(ftr[presence(y_tr, t)].double(), full_matrices=False)
        sub.append((fte.double() @ vh[:3].T).norm(dim=1).float())
    out["subspace3"] = _mean_auroc(torch.stack(sub, 1), y_te, tasks)

    # the evaluation's own choice of latents: drift latents excluded, best on training samples
    drift = evaluated["drift"]["latents"]
    with torch.no_grad():
        pre_tr = sae.encode_pre(sae.to_scaled(x_tr))
        pre_te = sae.encode_pre(sae.to_scaled(x_te))
    best = best_latents(pre_tr, y_tr, tasks, drift)  # scored by |pre-activation|
    out["best_latent_pre_activation"] = sum(
        auroc(pre_te[:, j].abs(), presence(y_te, t)) for t, j in zip(tasks, best)) / len(tasks)
    out["auroc_task"] = evaluated["auroc_task"]  # the same, after the top-k (evaluation.json)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--ridge", type=float, default=0.1)
    parser.add_argument("--evaluation", type=Path, default=None, metavar="FILE",
                        help="the run's evaluation.json when `sae-shards evaluate --out` wrote it "
                             "elsewhere (default RUN_DIR/evaluation.json; one run only)")
    args = parser.parse_args()
    if args.evaluation and len(args.run_dirs) > 1:
        parser.error("--evaluation names one run's evaluation: give one run directory")
    torch.set_num_threads(1)
    for run in args.run_dirs:
        try:
            figures = diagnose(run, args.ridge, args.evaluation)
        except CheckpointError as e:  # not a run, or one saved without samples: say which
            raise SystemExit(f"planted_diagnostics: {e}") from e
        print(json.dumps({"run": str(run), **figures}, indent=1))


if __name__ == "__main__":
    main()
