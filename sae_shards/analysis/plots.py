"""The report's plots (``sae-shards analyze``): matplotlib figures returned as inline base64
PNGs, so the HTML opens anywhere with no other files. Each takes a ``RunView`` (or the
dose-response results) and draws up to the checkpoint read (``RunView.up_to``: its logs stop there). matplotlib is
imported only when a figure is drawn.
"""

from __future__ import annotations

import base64
import io
import itertools
from typing import Any

import torch
from torch import Tensor

from sae_shards.analysis.shards import RunView
from sae_shards.core.targets import parse_slice


def png(fig) -> str:
    """A matplotlib figure as an inline base64 PNG ``<img>``; closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def figure(w: float = 7, h: float = 3):
    """A new figure and axes of ``w`` x ``h`` inches on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


def plot_sae_curves(view: RunView) -> str:
    fig, axes = figure(10, 3)
    fig.clf()
    rows = view.sae_metrics  # up to the checkpoint's SAE step (RunView.up_to)
    steps = [r["sae_step"] for r in rows]
    for i, key in enumerate(("fvu", "l0", "dead_frac")):
        ax = fig.add_subplot(1, 3, i + 1)
        values = [r.get(key) for r in rows]
        ax.plot(steps, [float("nan") if v is None else v for v in values], lw=1)
        ax.set_xlabel("SAE step")
        # dead_frac is unknown (None) until the SAE has seen sae.dead_after samples
        why = "too few samples" if rows else "the run has no metrics.jsonl"
        ax.set_title(key if any(v is not None for v in values) else f"{key}: n/a ({why})")
    fig.tight_layout()
    return png(fig)


def step_reward_means(view: RunView) -> tuple[list[int], list[float]]:
    """Each RL step's mean reward over its scored completions (``rollouts.scored_mean``; a step
    with none scored is left out), up to the checkpoint's RL step (``RunView.up_to``)."""
    steps, means = [], []
    for step in sorted(view.rollouts):
        mean = view.rollouts.derived(step)["mean_reward"]
        if mean == mean:  # not NaN
            steps.append(step)
            means.append(mean)
    return steps, means


def plot_reward(view: RunView) -> str:
    """Each RL step's mean reward, up to the checkpoint read (``RunView.up_to``)."""
    fig, ax = figure()
    steps, means = step_reward_means(view)
    ax.plot(steps, means, lw=1, label="mean reward per step")
    if len(means) >= 10:
        w = max(2, len(means) // 15)
        total = [0.0, *itertools.accumulate(means)]  # prefix sums: linear in the run's steps
        smooth = [(total[i + 1] - total[max(0, i - w)]) / (i + 1 - max(0, i - w))
                  for i in range(len(means))]
        ax.plot(steps, smooth, lw=2, label=f"running mean ({w + 1} steps)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.legend()
    return png(fig)


def plot_timeline(view: RunView, shards: list[int]) -> str:
    steps, acts = view.timeline("final")
    fig, ax = figure(10, 0.5 + 0.35 * max(len(shards), 1))
    data = acts[:, shards].T.numpy() if shards else acts.T.numpy()
    lim = float(abs(data).max()) if data.size else 1.0
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest",
                   extent=(float(steps.min()) - 0.5, float(steps.max()) + 0.5, len(shards) - 0.5, -0.5))
    ax.set_yticks(range(len(shards)), [f"shard {i}" for i in shards])
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # per event: several columns a step
    ax.set_xlabel("RL step")
    fig.colorbar(im, ax=ax, label="activation (scaled units)")
    return png(fig)


def per_parameter_norms(names: list[str], norms: Tensor) -> tuple[list[str], Tensor]:
    """Shard norms ``[n_shards, n_targets]`` per parameter: a stacked expert tensor's experts
    (``name[e]``) combined into one column, ``sqrt(sum_e norm_e^2)`` (its share of the unit
    direction), in the order of each parameter's first target."""
    columns: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        columns.setdefault(parse_slice(name)[0], []).append(i)
    merged = torch.stack([norms[:, idx].pow(2).sum(1).sqrt() for idx in columns.values()], 1)
    return list(columns), merged


def plot_norms(view: RunView, shards: list[int]) -> str:
    names, norms = per_parameter_norms(view.shards.target_names, view.shards.target_norms())
    short = [n.replace("model.layers.", "L").replace(".weight", "") for n in names]
    fig, ax = figure(10, 3.2)
    width = 0.8 / max(len(shards), 1)
    for j, s in enumerate(shards):
        xs = [i + j * width for i in range(len(names))]
        ax.bar(xs, norms[s].tolist(), width=width, label=f"shard {s}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], short, rotation=60, ha="right",
                  fontsize=7)
    ax.set_ylabel("norm on target")
    ax.legend(fontsize=7)
    return png(fig)


def plot_dose(results: dict[int, Any]) -> str:
    """One panel per shard, three to a row, on one reward scale (so a flat curve looks flat)."""
    cols = min(3, max(len(results), 1))
    n_rows = -(-max(len(results), 1) // cols)
    fig, _ = figure(4 * cols, 3 * n_rows)
    fig.clf()
    first = None
    for i, (shard, dr) in enumerate(results.items()):
        ax = fig.add_subplot(n_rows, cols, i + 1, sharey=first)
        first = first or ax
        # paired error bars (each point's change from alpha 0, prompt by prompt) when there is
        # an alpha 0: the points share prompts and rollout seed, so that is their resolution
        shard_err = dr.stderr_change_shard or dr.stderr_shard
        control_err = dr.stderr_change_control or dr.stderr_control
        ax.errorbar(dr.alphas, dr.reward_shard, yerr=shard_err, label="shard", marker="o")
        ax.errorbar(dr.alphas, dr.reward_control, yerr=control_err,
                    label="random (norm-matched)", marker="x")
        for label, curve in dr.shard_by_label.items():  # each context's reward, same rollouts
            ax.plot(dr.alphas, curve, linestyle=":", linewidth=1, label=f"shard: {label}")
        ax.set_title(f"shard {shard}")
        ax.set_xlabel("alpha (x c: the run's update along the shard)")
        ax.set_ylabel("mean reward")
        ax.legend(fontsize=6 if dr.shard_by_label else 7)
    fig.tight_layout()
    return png(fig)
