"""Shard families: grouping by co-activation, and each family's strength and direction, checked
against the same quantities built densely."""

import pytest
import torch

from sae_shards.analysis.families import (coactivation, find_families, group_latents, strengths,
                                          weight_matrix)
from sae_shards.planted.groundtruth import principal_direction

from helpers import average_linkage_by_definition


def _split_contexts(n_ctx=3, per_ctx=3, samples=300, dim=40, seed=0):
    """Samples of ``n_ctx`` contexts; each context's latents (``per_ctx`` siblings) fire together
    on its samples, each sibling on a random ~70% of them; returns acts, dense decoders, truth."""
    g = torch.Generator().manual_seed(seed)
    n = n_ctx * per_ctx
    D = torch.randn(n, dim, generator=g, dtype=torch.float64)
    D = D / D.norm(dim=1, keepdim=True)
    ctx = torch.randint(0, n_ctx, (samples,), generator=g)
    acts = torch.zeros(samples, n, dtype=torch.float64)
    for s in range(samples):
        c = int(ctx[s])
        on = torch.rand(per_ctx, generator=g) < 0.7
        on[torch.randint(0, per_ctx, (1,), generator=g)] = True  # never an empty sample
        vals = (0.5 + torch.rand(per_ctx, generator=g, dtype=torch.float64)) * on
        acts[s, c * per_ctx:(c + 1) * per_ctx] = vals * torch.where(
            torch.rand(per_ctx, generator=g) < 0.2, -1.0, 1.0).double()
    truth = [list(range(c * per_ctx, (c + 1) * per_ctx)) for c in range(n_ctx)]
    return acts, D, truth


def test_siblings_that_fire_together_form_one_family_each():
    acts, D, truth = _split_contexts()
    fams = find_families(acts, D @ D.T, threshold=0.3)
    assert fams.members == truth


def test_latents_that_fire_independently_stay_apart():
    """Control: the same marginals with every column permuted on its own (no co-firing beyond
    chance) leaves every latent a family of its own."""
    acts, D, _ = _split_contexts()
    g = torch.Generator().manual_seed(1)
    shuffled = torch.stack([acts[torch.randperm(acts.shape[0], generator=g), j]
                            for j in range(acts.shape[1])], 1)
    fams = find_families(shuffled, D @ D.T, threshold=0.3)
    assert fams.members == [[j] for j in range(acts.shape[1])]


def test_excluded_latents_join_no_family():
    acts, D, _ = _split_contexts()
    members = group_latents(coactivation(acts), 0.3, exclude=[0, 4])
    flat = sorted(j for m in members for j in m)
    assert flat == [j for j in range(acts.shape[1]) if j not in (0, 4)]
    assert [1, 2] in members and [3, 5] in members


def test_strength_and_direction_match_the_dense_contributions():
    acts, D, truth = _split_contexts(seed=3)
    gram = D @ D.T
    fams = find_families(acts, gram, threshold=0.3)
    contrib = [acts[:, m] @ D[m] for m in fams.members]  # [S, dim] each
    dense_strength = torch.stack([c.norm(dim=1) for c in contrib], 1)
    assert torch.allclose(strengths(acts, gram, fams), dense_strength, atol=1e-10)
    W = weight_matrix(fams, acts.shape[1])
    dirs = W @ D  # [F, dim]
    assert torch.allclose(dirs.norm(dim=1), torch.ones(len(fams.members), dtype=torch.float64))
    for f, c in enumerate(contrib):
        ref = principal_direction(c.float()).double()
        assert abs(float(dirs[f] @ ref)) > 1 - 1e-5
        assert float((c @ dirs[f]).sum()) > 0  # oriented along the mean contribution


def test_a_family_of_one_is_its_latent():
    acts, D, _ = _split_contexts(per_ctx=1)
    gram = 4.0 * (D @ D.T)  # decoders of norm 2: the direction is still unit norm
    fams = find_families(acts, gram, threshold=0.3)
    assert fams.members == [[0], [1], [2]]
    W = weight_matrix(fams, 3)
    assert torch.allclose((W @ (2 * D)).abs(), D.abs(), atol=1e-12)
    assert torch.allclose(strengths(acts, gram, fams), 2 * acts.abs(), atol=1e-12)


def test_a_similarity_exactly_at_the_threshold_merges():
    """Groups merge while their mean similarity is >= threshold (1.0 is a valid threshold:
    latents that always fire alike)."""
    sim = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert group_latents(sim, 1.0) == [[0, 1], [2]]
    assert group_latents(torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64),
                         0.5) == [[0, 1]]


def test_grouping_matches_average_linkage_by_definition():
    """The fast grouping (components, then merges on a matrix of group means) gives the same
    families as the definition on correlated columns with chains and nested groups."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        x = torch.randn(200, 14, generator=g, dtype=torch.float64)
        x[:, 1] += x[:, 0]
        x[:, 5] += x[:, 4] + x[:, 3]
        x[:, 9] += 0.5 * x[:, 5]
        sim = torch.corrcoef(x.T)
        for threshold in (0.05, 0.2, 0.4):
            assert group_latents(sim, threshold, exclude=[7]) == \
                average_linkage_by_definition(sim, threshold, exclude=[7]), (trial, threshold)


def test_rare_latents_need_enough_joint_firings():
    """Two latents that fire together on 3 of 400 samples (and never otherwise) correlate
    perfectly, but 3 joint firings are too few to call them one context."""
    acts = torch.zeros(400, 3, dtype=torch.float64)
    acts[:3, 0] = acts[:3, 1] = 1.0
    acts[:, 2] = torch.rand(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram = torch.eye(3, dtype=torch.float64)
    assert find_families(acts, gram, 0.3).members == [[0], [1], [2]]
    assert find_families(acts, gram, 0.3, min_joint=3).members == [[0, 1], [2]]


def test_threshold_out_of_range_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        group_latents(torch.eye(3), 0.0)


def test_always_on_starts_at_its_density_and_an_unknown_density_is_not():
    """One rule for the report's listing and tags, compare's pairs and the families: a latent
    active on at least ALWAYS_ON_DENSITY of the samples is the drift direction's."""
    import math

    from sae_shards.analysis.families import ALWAYS_ON_DENSITY, is_always_on

    assert is_always_on(ALWAYS_ON_DENSITY) and is_always_on(1.0)
    assert not is_always_on(ALWAYS_ON_DENSITY - 1e-6) and not is_always_on(math.nan)
