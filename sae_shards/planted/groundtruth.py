"""Sign-invariant ground truth for planted tasks, computed from labelled samples without the SAE.

Probes (design.md) found that a task's per-step component in the transformer body lies along a
task-specific direction whose *sign* flips nearly at random from step to step, so signed task
means cancel. Everything here is therefore sign-free:

- a task's **principal direction** is the top eigenvector of the uncentred second moment
  ``E[x x^T]`` of that task's samples (``principal_direction``), globally or per window of steps
  (``windowed_principal_directions``: directions drift during training);
- the **supervised reference** says how separable the tasks are at all: held-out samples scored
  by ``|cos|`` to each task's principal direction (AUROC per task), and a nearest-centroid
  classifier on per-row/column norms (``norm_features``), both sign-free;
- every figure has a **shuffled-label null**: the same computation with labels permuted.

Samples are flattened to ``[S, D]`` (all targets concatenated in a fixed order); principal
directions use the ``[S, S]`` Gram matrix, so D can be large while S stays in the thousands.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor


def flatten(samples: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """``{target: [S, *shape]}`` -> ``[S, D]`` fp32, targets in the order of ``names``."""
    return torch.cat([samples[n].flatten(1).float() for n in names], dim=1)


def unflatten(vectors: Tensor, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """``[K, D]`` -> ``{target: [K, *shape]}`` (inverse of :func:`flatten`, same order)."""
    out, start = {}, 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        out[name] = vectors[:, start:start + n].reshape(vectors.shape[0], *shape)
        start += n
    if start != vectors.shape[1]:
        raise ValueError(f"vectors have {vectors.shape[1]} entries, shapes account for {start}")
    return out


def principal_direction(x: Tensor) -> Tensor:
    """Top eigenvector ``[D]`` (unit norm, arbitrary sign) of ``x^T x`` for samples ``x [S, D]``.

    Computed from the ``[S, S]`` Gram matrix: if ``G w = l w`` then ``x^T w`` is the eigenvector.
    """
    if x.shape[0] == 0:
        raise ValueError("principal_direction needs at least one sample")
    x = x.double()
    _, vecs = torch.linalg.eigh(x @ x.T)  # ascending eigenvalues
    d = x.T @ vecs[:, -1]
    return (d / d.norm().clamp_min(1e-300)).float()


def task_directions(x: Tensor, labels: Sequence[str], tasks: Sequence[str]) -> Tensor:
    """``[K, D]`` principal direction of each task's samples (rows in the order of ``tasks``)."""
    rows = []
    for task in tasks:
        mask = torch.tensor([lab == task for lab in labels])
        if not mask.any():
            raise ValueError(f"task {task!r} has no samples; labels seen: {sorted(set(labels))}")
        rows.append(principal_direction(x[mask]))
    return torch.stack(rows)


def windowed_task_directions(x: Tensor, labels: Sequence[str], steps: Sequence[int],
                             tasks: Sequence[str], window: int) -> tuple[Tensor, list[tuple[int, str]]]:
    """Principal directions per (window of ``window`` RL steps, task) with at least 2 samples.

    Returns ``[W, D]`` and the ``(window start step, task)`` of each row.
    """
    steps_t = torch.as_tensor(list(steps))
    rows, keys = [], []
    for start in range(int(steps_t.min()), int(steps_t.max()) + 1, window):
        in_win = (steps_t >= start) & (steps_t < start + window)
        for task in tasks:
            mask = in_win & torch.tensor([lab == task for lab in labels])
            if int(mask.sum()) >= 2:
                rows.append(principal_direction(x[mask]))
                keys.append((start, task))
    return (torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])), keys


def abs_cosine(x: Tensor, directions: Tensor) -> Tensor:
    """``|cos|`` of every sample with every direction: ``[S, D] x [K, D] -> [S, K]``."""
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    dn = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (xn @ dn.T).abs()


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (ties count half).

    NaN when one class is empty.
    """
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    sorted_scores = scores[order]
    # average ranks over ties (1-based)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def norm_features(samples: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """Sign-free features ``[S, F]``: per-row and per-column norms of each matrix target (and
    absolute values of vector targets), each sample normalised to unit total norm first."""
    total = sum(samples[n].flatten(1).float().pow(2).sum(1) for n in names).sqrt().clamp_min(1e-30)
    feats = []
    for n in names:
        v = samples[n].float() / total.view(-1, *[1] * (samples[n].dim() - 1))
        if v.dim() == 3:
            feats += [v.norm(dim=2), v.norm(dim=1)]  # rows [S, m], columns [S, n]
        else:
            feats.append(v.abs())
    return torch.cat(feats, dim=1)


class SupervisedReference(NamedTuple):
    """How separable the tasks are with labels, sign-free, on held-out samples."""

    auroc_per_task: dict[str, float]  # |cos| to the task's train principal direction
    auroc_mean: float
    centroid_accuracy: float  # nearest centroid on norm features
    chance_accuracy: float  # 1 / n_tasks
    directions: Tensor  # [K, D] each task's principal direction on the training samples


def supervised_reference(x_train: Tensor, y_train: Sequence[str], x_test: Tensor,
                         y_test: Sequence[str], f_train: Tensor, f_test: Tensor,
                         tasks: Sequence[str]) -> SupervisedReference:
    """Principal directions and norm centroids from the training samples, scored on the test ones.

    ``x_*`` are flattened samples, ``f_*`` their :func:`norm_features`.
    """
    dirs = task_directions(x_train, y_train, tasks)
    scores = abs_cosine(x_test, dirs)  # [S_test, K]
    per_task = {t: auroc(scores[:, k], torch.tensor([y == t for y in y_test]))
                for k, t in enumerate(tasks)}
    centroids = torch.stack([f_train[torch.tensor([y == t for y in y_train])].mean(0) for t in tasks])
    pred = torch.cdist(f_test, centroids).argmin(1)
    truth = torch.tensor([list(tasks).index(y) for y in y_test])
    valid = [v for v in per_task.values() if v == v]
    return SupervisedReference(per_task, sum(valid) / max(len(valid), 1),
                               float((pred == truth).float().mean()), 1 / len(tasks), dirs)


def shuffled(labels: Sequence[str], generator: torch.Generator) -> list[str]:
    """The same labels in a random order (the shuffled-label null)."""
    perm = torch.randperm(len(labels), generator=generator).tolist()
    return [labels[i] for i in perm]
