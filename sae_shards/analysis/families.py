"""Shard families: latents that split one context, grouped by when they fire, without labels.

An SAE with more latents than the run has contexts splits a context over several latents
(feature splitting): each covers part of the context's samples, and siblings fire together. A
*family* is a set of latents whose ``|activation|`` profiles over samples are alike (correlation
of the columns, :func:`coactivation`), grouped by average-linkage agglomeration that stops below a
similarity ``threshold`` (:func:`group_latents`). A latent alike to no other is a family of one,
so families never lose what single latents show.

A family acts on a sample through its members' summed contribution to the reconstruction,
``v = sum_j a_j d_j`` (``d_j`` the decoder directions). Its *strength* on a sample is ``|v|``,
and its *direction* is the principal direction of those contributions over the samples where it
fires: a unit vector ``D^T w`` in the span of its members' decoders, given by its latent-space
weights ``w``. Everything is computed from the decoder Gram matrix ``G = D D^T`` (``[N, N]``), so a
family's direction stays a weighted sum of factored shards and nothing is materialised here.

Grouping uses activations only (no task labels): it may be run on any run's samples.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor


FAMILY_THRESHOLD = 0.3
"""Default co-activation correlation above which latents join one family (chosen on the planted
benchmark's development seeds 0-1 before any evaluation seed; docs/results.md)."""

ALWAYS_ON_DENSITY = 0.8
"""Latents active on at least this fraction of samples are left out of families by default: they
carry what every sample shares (the drift direction), not a context."""


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
    a = acts.abs().double()
    a = a - a.mean(0, keepdim=True)
    norms = a.norm(dim=0).clamp_min(1e-30)  # [N]
    return (a.T @ a) / norms[:, None] / norms[None]


def group_latents(similarity: Tensor, threshold: float,
                  exclude: Sequence[int] = ()) -> list[list[int]]:
    """Average-linkage agglomeration of the latents not in ``exclude``: the two groups with the
    highest mean pairwise ``similarity`` merge while that mean is ``>= threshold``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"family threshold must be in (0, 1], got {threshold}")
    n = similarity.shape[0]
    groups = [[j] for j in range(n) if j not in set(exclude)]
    sim = similarity.double()
    while len(groups) > 1:
        best, pair = -1.0, None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                s = float(sim[groups[a]][:, groups[b]].mean())
                if s > best:
                    best, pair = s, (a, b)
        if best < threshold:
            break
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups)


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
    a = acts[:, idx].double()  # [S, m]
    root, inv_root = _sqrt_gram(gram[idx][:, idx])
    coords = a @ root  # [S, m]: contributions in an orthonormal basis of the family's span
    if not coords.abs().sum():  # a family that never fired: its first member's direction
        w = torch.zeros(len(idx), dtype=torch.float64)
        w[0] = float(gram[idx[0], idx[0]]).__abs__() ** -0.5 if float(gram[idx[0], idx[0]]) else 1.0
        return w
    _, vecs = torch.linalg.eigh(coords.T @ coords)
    e = vecs[:, -1]
    if float((coords @ e).sum()) < 0:
        e = -e
    return inv_root @ e


def find_families(acts: Tensor, gram: Tensor, threshold: float,
                  exclude: Sequence[int] = ()) -> Families:
    """Families of the latents (``exclude``: e.g. drift latents, left out) from the activations
    ``acts [S, N]`` of samples and the decoder Gram ``gram [N, N]``."""
    members = group_latents(coactivation(acts), threshold, exclude)
    return Families(members, [family_weights(acts, gram, m) for m in members], threshold)


def strengths(acts: Tensor, gram: Tensor, families: Families) -> Tensor:
    """``[S, F]``: the norm of each family's contribution ``|sum_j a_j d_j|`` on each sample."""
    cols = []
    for m in families.members:
        idx = torch.tensor(m)
        a = acts[:, idx].double()
        sq = ((a @ gram[idx][:, idx].double()) * a).sum(1)
        cols.append(sq.clamp_min(0).sqrt())
    return torch.stack(cols, 1) if cols else torch.zeros(acts.shape[0], 0, dtype=torch.float64)


def weight_matrix(families: Families, n_latents: int) -> Tensor:
    """``W [F, N]``: row f holds family f's weights on its members (zeros elsewhere); family
    directions are ``W D`` and their inner products with references ``dots [K, N] @ W.T``."""
    W = torch.zeros(len(families.members), n_latents, dtype=torch.float64)
    for f, (m, w) in enumerate(zip(families.members, families.weights)):
        W[f, torch.tensor(m)] = w
    return W
