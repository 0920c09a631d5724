"""Sign-invariant ground truth for planted tasks, computed from labelled samples without the SAE.

Probes (the team's shared/design.md) found that a task's per-step component in the transformer
body lies along a task-specific direction whose *sign* flips nearly at random from step to step,
so signed task means cancel. Everything here is therefore sign-free:

- a task's **principal direction** is the top eigenvector of the uncentred second moment
  ``E[x x^T]`` of that task's samples (``principal_direction``), globally or per window of steps
  (``windowed_principal_directions``: directions drift during training);
- the **supervised reference** says how separable the tasks are at all: held-out samples scored
  by ``|cos|`` to each task's principal direction (AUROC per task), and a nearest-centroid
  classifier on per-row/column norms (``norm_features``), both sign-free;
- every figure has a **shuffled-label null**: the same computation with labels permuted;
- **labels**: one task per sample (per-event samples: a prompt group has one task), or a set of
  tasks per sample (per-step samples of the ``mixed`` schedule). "Task k present" is then the
  positive class of every AUROC, and a task's principal direction comes from its one-task samples
  where it has at least two, else from every sample it is present in
  (``task_directions_with_source`` says which);
- ``separability``: the supervised ladder beside it, from the sign-free principal direction
  through signed and class-mean directions to a linear probe: how far one direction per task
  can go with labels, so an SAE's best latent can be read against it;
- ``energy_shares``: each task's share of the samples' squared norm (balanced tasks keep every
  share well under 1/2; one dominant task pulls shuffled-label directions to itself and lifts
  the mmcs null).

Samples are flattened to ``[S, D]`` (all targets concatenated in a fixed order); principal
directions use the ``[S, S]`` Gram matrix, so D can be large while S stays in the thousands.
"""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Sequence

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


def rank_ceiling(directions: Mapping[str, Tensor], rank: int) -> Tensor:
    """Per direction, the largest |cosine| any direction with at most ``rank`` per matrix target
    can have with it: ``sqrt(sum_p sum_{i <= rank} s_i(T_p)^2 / ||T||^2)`` over the targets'
    singular values (1-D targets count whole). ``directions``: ``{target: [K, *shape]}``; ``[K]``.

    An SAE of ``sae.rank`` decoder rows per target cannot match a ground truth more closely than
    this, however well it learns."""
    kept, total = None, None
    for d in directions.values():
        sq = d.double().flatten(1).pow(2).sum(1)  # [K]
        if d.ndim == 3:
            s = torch.linalg.svdvals(d.double())  # [K, min(m, n)], descending
            part = s[:, :rank].pow(2).sum(1)
        else:
            part = sq
        kept = part if kept is None else kept + part
        total = sq if total is None else total + sq
    return (kept / total.clamp_min(1e-300)).sqrt().float()


Labels = Sequence[str] | Sequence[Iterable[str]]
"""One label per sample (a string), or each sample's set of tasks (per-step samples of a
``mixed`` schedule hold several); both forms are accepted everywhere below."""


def label_sets(labels: Labels) -> list[frozenset[str]]:
    """Each sample's tasks as a frozenset (a plain string is a one-task sample)."""
    return [frozenset([lab]) if isinstance(lab, str) else frozenset(lab) for lab in labels]


def presence(labels: Labels, task: str) -> Tensor:
    """``[S]`` bool: task ``task`` is present in the sample (multi-label positives for AUROC)."""
    return torch.tensor([task in s for s in label_sets(labels)], dtype=torch.bool)


def task_directions_with_source(x: Tensor, labels: Labels, tasks: Sequence[str],
                                min_single: int = 2) -> tuple[Tensor, dict[str, str]]:
    """``[K, D]`` principal direction of each task, and where each came from.

    A task's direction is taken from the samples that hold exactly that one task (``"single"``:
    every per-event sample, and one-task steps) when there are at least ``min_single`` of them,
    else from every sample the task is present in (``"present"``: e.g. per-step samples of the
    ``mixed`` schedule, where a step blends several tasks and the direction is then the task's
    share of a blend). Raises when a task has no sample at all.
    """
    sets = label_sets(labels)
    rows, source = [], {}
    for task in tasks:
        single = torch.tensor([s == {task} for s in sets], dtype=torch.bool)
        present = torch.tensor([task in s for s in sets], dtype=torch.bool)
        if not present.any():
            seen = sorted(set().union(*sets)) if sets else []
            raise ValueError(f"task {task!r} has no samples; labels seen: {seen}")
        n_single = int(single.sum())
        use_single = n_single >= min_single or n_single == int(present.sum())
        mask = single if use_single else present
        source[task] = "single" if use_single else "present"
        rows.append(principal_direction(x[mask]))
    return torch.stack(rows), source


def task_directions(x: Tensor, labels: Labels, tasks: Sequence[str]) -> Tensor:
    """``[K, D]`` principal direction of each task's samples (rows in the order of ``tasks``);
    see :func:`task_directions_with_source` for samples with several tasks."""
    return task_directions_with_source(x, labels, tasks)[0]


def class_means(x: Tensor, labels: Labels, tasks: Sequence[str]) -> Tensor:
    """``[K, D]`` mean of the samples each task is present in (rows in the order of ``tasks``):
    a signed task direction. Per-event gradients keep their sign, so their class mean is the
    task's direction; per-step updates flip sign from step to step and average towards zero."""
    rows = []
    for task in tasks:
        pos = presence(labels, task)
        if not pos.any():
            raise ValueError(f"task {task!r} has no samples")
        rows.append(x[pos].mean(0))
    return torch.stack(rows)


def energy_shares(x: Tensor, labels: Labels, tasks: Sequence[str]) -> dict[str, float]:
    """Each task's share of the samples' gradient energy: ``sum ||x||^2`` over its samples over
    the total. A sample holding several tasks (a ``mixed`` step) gives each an equal part of its
    energy, so the shares always sum to 1 (over samples with at least one listed task)."""
    sq = x.double().pow(2).sum(1)
    per = {t: 0.0 for t in tasks}
    for e, s in zip(sq.tolist(), label_sets(labels)):
        mine = [t for t in tasks if t in s]
        for t in mine:
            per[t] += e / len(mine)
    total = sum(per.values())
    return {t: (v / total if total > 0 else float("nan")) for t, v in per.items()}



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


def mean_defined(values: Iterable[float]) -> float:
    """The mean of the values that are not NaN (an AUROC of a task with an empty class is NaN:
    undefined, left out), NaN when none is."""
    defined = [v for v in values if v == v]
    return sum(defined) / len(defined) if defined else float("nan")


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


def supervised_reference(x_train: Tensor, y_train: Labels, x_test: Tensor,
                         y_test: Labels, f_train: Tensor, f_test: Tensor,
                         tasks: Sequence[str]) -> SupervisedReference:
    """Principal directions and norm centroids from the training samples, scored on the test ones.

    ``x_*`` are flattened samples, ``f_*`` their :func:`norm_features`. Labels may be label sets
    (several tasks per sample): AUROC then scores "task k present"; directions come from
    :func:`task_directions`; the nearest-centroid accuracy uses one-task samples only (centroids
    from one-task training samples where a task has any, else from all its samples; NaN when no
    test sample has exactly one task).
    """
    dirs = task_directions(x_train, y_train, tasks)
    scores = abs_cosine(x_test, dirs)  # [S_test, K]
    per_task = {t: auroc(scores[:, k], presence(y_test, t)) for k, t in enumerate(tasks)}
    tr_sets, te_sets = label_sets(y_train), label_sets(y_test)
    centroids = []
    for t in tasks:
        single = torch.tensor([s == {t} for s in tr_sets], dtype=torch.bool)
        centroids.append(f_train[single if single.any() else presence(tr_sets, t)].mean(0))
    one = [i for i, s in enumerate(te_sets) if len(s) == 1 and next(iter(s)) in tasks]
    if one:
        pred = torch.cdist(f_test[one], torch.stack(centroids)).argmin(1)
        truth = torch.tensor([list(tasks).index(next(iter(te_sets[i]))) for i in one])
        accuracy = float((pred == truth).float().mean())
    else:
        accuracy = float("nan")
    return SupervisedReference(per_task, mean_defined(per_task.values()), accuracy,
                               1 / len(tasks), dirs)


def ridge_probe(x: Tensor, labels: Labels, tasks: Sequence[str], ridge: float) -> Tensor:
    """One-vs-rest ridge regression of "task k present" (+-1) on samples ``x [S, D]``: the weight
    vectors ``[K, D]``, solved in sample space (``ridge`` times the identity added to the
    ``[S, S]`` Gram matrix), so D can be large."""
    gram = (x @ x.T).double()  # [S, S]; no fp64 copy of the [S, D] samples
    gram.diagonal().add_(ridge)
    targets = torch.stack([presence(labels, t).double() * 2 - 1 for t in tasks], 1)  # [S, K]
    return (x.T @ torch.linalg.solve(gram, targets).float()).T


def separability(x_train: Tensor, y_train: Labels, x_test: Tensor, y_test: Labels,
                 tasks: Sequence[str], ridge: float = 0.1) -> dict[str, dict[str, float]]:
    """How well ONE labelled direction per task separates the held-out samples, from the
    sign-free reference up to a linear probe: ``{figure: {"mean": ..., task: AUROC}}``.

    Samples are compared by cosine (rows scaled to unit norm). Every direction comes from the
    training samples; "task k present" is the positive class.

    - ``principal_abs``: ``|cos|`` to the task's principal direction (the supervised reference);
    - ``principal_signed``: ``cos`` to it, oriented so the task's training samples project
      positively on average. Above ``principal_abs`` when samples have a consistent sign and
      other tasks' samples point against the direction (per-event gradients; per-step updates,
      whose sign flips from step to step, gain nothing);
    - ``class_mean``: ``cos`` to the mean of the task's training samples;
    - ``linear_probe``: one-vs-rest ridge regression on +-1 targets (``ridge`` times the identity
      added to the ``[S, S]`` Gram matrix), its weight vector as the direction. What a single
      linear direction can reach with labels: an SAE latent's encoder is one such direction,
      learned without them.

    A shuffled-label or null-control run should stay near 0.5 on every figure; a linear probe
    over many dimensions sits somewhat above it (it finds what tells prompts apart).
    """
    if not ridge > 0:
        raise ValueError(f"separability: ridge={ridge} must be > 0")
    unit = lambda v: v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)  # noqa: E731
    xtr, xte = unit(x_train.float()), unit(x_test.float())
    principal = task_directions(xtr, y_train, tasks)  # [K, D]
    pos_tr = [presence(y_train, t) for t in tasks]
    orient = torch.stack([torch.sign((xtr[p] @ d).sum()) for p, d in zip(pos_tr, principal)])
    means = class_means(xtr, y_train, tasks)  # [K, D]
    probe = ridge_probe(xtr, y_train, tasks, ridge)  # [K, D]
    out = {}
    for name, dirs, signed in (("principal_abs", principal, False),
                               ("principal_signed", principal * orient[:, None], True),
                               ("class_mean", means, True), ("linear_probe", probe, True)):
        scores = xte @ unit(dirs).T  # [S_test, K]
        if not signed:
            scores = scores.abs()
        per = {t: auroc(scores[:, k], presence(y_test, t)) for k, t in enumerate(tasks)}
        out[name] = {"mean": mean_defined(per.values()), **per}
    return out


def shuffled(labels: Sequence, generator: torch.Generator) -> list:
    """The same labels (strings or label sets) in a random order (the shuffled-label null)."""
    perm = torch.randperm(len(labels), generator=generator).tolist()
    return [labels[i] for i in perm]
