"""Shard families: latents that split one context, grouped by when they fire, without labels.

An SAE with more latents than the run has contexts splits a context over several latents
(feature splitting): each covers part of the context's samples, and siblings fire together. A
*family* is a set of latents whose ``|activation|`` profiles over samples are alike (correlation
of the columns, :func:`coactivation`), grouped by average-linkage agglomeration that stops below a
similarity ``threshold`` (:func:`group_latents`). A latent alike to no other is a family of one.
A merged latent's own direction is no longer scored on its own: the per-latent figures remain
the finer view, families the coarser one.

A family acts on a sample through its members' summed contribution to the reconstruction,
``v = sum_j a_j d_j`` (``d_j`` the decoder directions). Its *strength* on a sample is ``|v|``,
and its *direction* is the principal direction of those contributions over the samples where it
fires: a unit vector ``D^T w`` in the span of its members' decoders, given by its latent-space
weights ``w``. Everything is computed from the decoder Gram matrix ``G = D D^T`` (``[N, N]``), so a
family's direction stays a weighted sum of factored shards and nothing is materialised here.

Grouping uses activations only (no task labels): it may be run on any run's samples. All of it
runs on the CPU in fp64 (the ``[N, N]`` work is small), whatever device the SAE is on.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor


FAMILY_THRESHOLD = 0.3
"""Default co-activation correlation above which latents join one family (set before looking at
the planted benchmark's development seeds 0-1, kept after them, then evaluated once on fresh
seeds; docs/results.md)."""

MIN_JOINT = 5
"""Two latents are linked only if they fired together on at least this many samples: two rare
latents sharing one or two firings can correlate above the threshold by chance."""

ALWAYS_ON_DENSITY = 0.8
"""Latents active on at least this fraction of samples are left out of families by default: they
carry what every sample shares (the drift direction), not a context."""


def is_always_on(density: float) -> bool:
    """Whether a latent active on ``density`` of the samples is always on (at least
    ``ALWAYS_ON_DENSITY``): the drift direction, told apart from the shards of contexts wherever
    shards are listed, tagged or compared. An unknown density (NaN) is not."""
    return float(density) >= ALWAYS_ON_DENSITY


class Families(NamedTuple):
    members: list[list[int]]
    """Latent indices of each family (ascending), families ordered by their smallest member."""
    weights: list[Tensor]
    """Per family ``w [len(members)]``: its direction is ``sum_j w_j d_j`` (unit norm)."""
    threshold: float


def coactivation(acts: Tensor) -> Tensor:
    """``[N, N]`` correlation between the latents' ``|activation|`` columns of ``acts [S, N]``
    (0 for a latent that never or always fired the same). Centred, so latents that fire
    independently score about 0 whatever their density; siblings score high, latents of
    contexts that exclude each other score below 0."""
    a = acts.detach().abs().double().cpu()
    a = a - a.mean(0, keepdim=True)
    norms = a.norm(dim=0).clamp_min(1e-30)  # [N]
    return (a.T @ a) / norms[:, None] / norms[None]


def joint_firings(acts: Tensor) -> Tensor:
    """``[N, N]``: on how many samples each pair of latents was active together."""
    on = (acts.detach() != 0).double().cpu()
    return on.T @ on


def group_latents(similarity: Tensor, threshold: float,
                  exclude: Sequence[int] = ()) -> list[list[int]]:
    """Average-linkage agglomeration of the latents not in ``exclude``: the two groups with the
    highest mean pairwise ``similarity`` merge while that mean is ``>= threshold``.

    Two groups can only merge if some pair across them is ``>= threshold`` (a mean is at most
    its largest term), so the agglomeration runs within each connected component of that graph
    apart; inside one, the groups' mean similarities are kept in a matrix updated on each merge
    (size-weighted means of the parts'). Thousands of latents take about a second.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"family threshold must be in (0, 1], got {threshold}")
    skip = set(exclude)
    kept = [j for j in range(similarity.shape[0]) if j not in skip]
    if not kept:
        return []
    idx = torch.tensor(kept)
    sim = similarity.double().cpu()[idx][:, idx]  # [n, n]
    out: list[list[int]] = []
    for comp in _components(sim >= threshold):
        members = _agglomerate(sim[comp][:, comp], threshold)
        out += [sorted(kept[int(comp[i])] for i in m) for m in members]
    return sorted(out)


def _components(adjacent: Tensor) -> list[Tensor]:
    """Connected components (index tensors) of the graph with boolean adjacency ``[n, n]``."""
    n = adjacent.shape[0]
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.triu(adjacent, diagonal=1).nonzero().tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    labels = torch.tensor([root(i) for i in range(n)])
    return [(labels == r).nonzero().flatten() for r in labels.unique()]


def _agglomerate(sim: Tensor, threshold: float) -> list[list[int]]:
    """Average linkage on one component (local indices), merging while the best mean is
    ``>= threshold``."""
    sim = sim.clone()
    sim.fill_diagonal_(-torch.inf)
    groups: list[list[int] | None] = [[i] for i in range(sim.shape[0])]
    size = torch.ones(sim.shape[0], dtype=torch.float64)
    while sim.shape[0] > 1:
        a, b = divmod(int(sim.argmax()), sim.shape[1])
        if not float(sim[a, b]) >= threshold:  # also stops on -inf (one group left) and NaN
            break
        a, b = min(a, b), max(a, b)
        merged = (size[a] * sim[a] + size[b] * sim[b]) / (size[a] + size[b])
        sim[a], sim[:, a] = merged, merged
        sim[b], sim[:, b] = -torch.inf, -torch.inf
        sim[a, a] = -torch.inf
        size[a] += size[b]
        groups[a] = groups[a] + groups[b]
        groups[b] = None
    return [g for g in groups if g is not None]


def _sqrt_gram(gram: Tensor, eps: float = 1e-10) -> tuple[Tensor, Tensor]:
    """``G^(1/2)`` and ``G^(-1/2)`` (pseudo-inverse on the numerically non-zero spectrum)."""
    vals, vecs = torch.linalg.eigh(gram.double())
    keep = vals > eps * vals.max().clamp_min(1e-300)
    root = torch.where(keep, vals.clamp_min(0).sqrt(), torch.zeros_like(vals))
    inv = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(vals))
    return (vecs * root) @ vecs.T, (vecs * inv) @ vecs.T


def family_weights(acts: Tensor, gram: Tensor, members: Sequence[int]) -> Tensor:
    """``w [m]`` such that ``D^T w`` is the unit principal direction of the family's contributions
    ``D^T a_s`` over the samples ``acts [S, N]`` (sign: positive mean projection)."""
    idx = torch.tensor(list(members))
    a = acts.detach()[:, idx].double().cpu()  # [S, m]
    gram = gram.detach().double().cpu()
    root, inv_root = _sqrt_gram(gram[idx][:, idx])
    coords = a @ root  # [S, m]: contributions in an orthonormal basis of the family's span
    if not coords.abs().sum():  # a family that never fired: its first member's direction
        w = torch.zeros(len(idx), dtype=torch.float64)
        sq_norm = float(gram[idx[0], idx[0]])
        w[0] = sq_norm ** -0.5 if sq_norm > 0 else 1.0
        return w
    _, vecs = torch.linalg.eigh(coords.T @ coords)
    e = vecs[:, -1]
    if float((coords @ e).sum()) < 0:
        e = -e
    return inv_root @ e


def find_families(acts: Tensor, gram: Tensor, threshold: float,
                  exclude: Sequence[int] = (), min_joint: int = MIN_JOINT) -> Families:
    """Families of the latents (``exclude``: e.g. drift latents, left out) from the activations
    ``acts [S, N]`` of samples and the decoder Gram ``gram [N, N]``; pairs that fired together
    on fewer than ``min_joint`` samples are not linked."""
    similarity = coactivation(acts)
    similarity[joint_firings(acts) < min_joint] = 0.0
    members = group_latents(similarity, threshold, exclude)
    return Families(members, [family_weights(acts, gram, m) for m in members], threshold)


def strengths(acts: Tensor, gram: Tensor, families: Families) -> Tensor:
    """``[S, F]``: the norm of each family's contribution ``|sum_j a_j d_j|`` on each sample."""
    cols = []
    acts, gram = acts.detach().double().cpu(), gram.detach().double().cpu()
    for m in families.members:
        idx = torch.tensor(m)
        a = acts[:, idx]
        sq = ((a @ gram[idx][:, idx]) * a).sum(1)
        cols.append(sq.clamp_min(0).sqrt())
    return torch.stack(cols, 1) if cols else torch.zeros(acts.shape[0], 0, dtype=torch.float64)


def weight_matrix(families: Families, n_latents: int) -> Tensor:
    """``W [F, N]``: row f holds family f's weights on its members (zeros elsewhere); family
    directions are ``W D`` and their inner products with references ``dots [K, N] @ W.T``."""
    W = torch.zeros(len(families.members), n_latents, dtype=torch.float64)
    for f, (m, w) in enumerate(zip(families.members, families.weights)):
        W[f, torch.tensor(m)] = w
    return W
