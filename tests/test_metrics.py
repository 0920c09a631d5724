"""core/metrics.py against its definitions, written out densely on small hand-made SAEs."""

import pytest
import torch

from sae_shards.core.metrics import match_directions
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import make_targets

SHAPES = {"w": (5, 4), "b": (3,)}


def _sae_with_unnormalised_decoders(n_latents: int = 6) -> LowRankSAE:
    """Random rank-2 decoders of norms 0.5-3: a cosine that forgot to divide by them is off."""
    sae = LowRankSAE(make_targets(SHAPES, rank=2), SAEConfig(n_latents=n_latents, k=2))
    g = torch.Generator().manual_seed(0)
    scale = 0.5 + 2.5 * torch.rand(n_latents, generator=g)
    with torch.no_grad():
        for tf in sae.factors:
            for p in tf.factors("decoder"):
                p.copy_(torch.randn(p.shape, generator=g) * scale.view(-1, *[1] * (p.dim() - 1)))
    return sae


def _dense_decoders(sae: LowRankSAE) -> torch.Tensor:
    """``[N, D]``: each latent's decoder direction ``U V^T`` (vectors whole), targets in order."""
    parts = []
    for tf in sae.factors:
        if tf.spec.is_matrix:
            U, V = (f.detach().double() for f in tf.factors("decoder"))
            parts.append(torch.stack([U[i] @ V[i].T for i in range(sae.n_latents)]).flatten(1))
        else:
            parts.append(tf.d_dec.detach().double())
    return torch.cat(parts, 1)


def test_mmcs_is_the_mean_over_references_of_the_best_abs_cosine_with_any_decoder():
    """``match_directions`` (the mmcs of evaluation.json and every synthetic-stream check) equals
    its definition computed densely: per reference, the largest |cos| with a decoder direction,
    averaged over references. The references are chosen so each one's best latent has a negative
    cosine (a forgotten abs changes the figure) and the row maxima differ (a max over references
    instead of the mean does too)."""
    sae = _sae_with_unnormalised_decoders()
    dec = _dense_decoders(sae)  # [6, 23]
    unit = lambda v: v / v.norm(dim=1, keepdim=True)  # noqa: E731
    d = unit(dec)
    g = torch.Generator().manual_seed(1)
    refs = torch.stack([-3.0 * d[1] + 0.3 * d[4], -0.5 * d[3] + 0.2 * d[0],
                        torch.randn(dec.shape[1], generator=g, dtype=torch.float64)])
    flat_refs = {"w": refs[:, :20].reshape(3, 5, 4).float(), "b": refs[:, 20:].float()}
    cos = unit(refs) @ unit(dec).T  # [3 refs, 6 latents], signed
    want = cos.abs()
    m = match_directions(sae, flat_refs)
    torch.testing.assert_close(m.abs_cos.double(), want, rtol=0, atol=1e-6)
    assert m.best_latent.tolist() == want.argmax(1).tolist()
    assert m.best_latent.tolist()[:2] == [1, 3]
    assert (cos[[0, 1], [1, 3]] < 0).all()  # the best matches point the other way
    assert abs(m.mmcs - float(want.max(1).values.mean())) < 1e-6
    assert abs(m.mmcs - float(cos.max(1).values.mean())) > 0.1  # the signed figure is far off


# ---- found by mutation testing (audit 120): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

def _random_batch(targets, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(b, *t.shape, generator=g) for t in targets}


def _factored_sae():
    targets = make_targets({"w": (12, 7), "b": (6,)}, rank=2)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2, rank=2), "factored")
    sae.input_scale.fill_(0.5)
    return sae


def test_fvu_is_about_the_batch_mean_and_ml2r_a_norm_ratio():
    from sae_shards.core.metrics import fvu, ml2r
    g = torch.Generator().manual_seed(0)
    x = {"w": 3.0 + torch.randn(10, 4, 5, generator=g), "b": torch.randn(10, 6, generator=g)}
    mean = {k: v.mean(0, keepdim=True).expand_as(v) for k, v in x.items()}
    assert float(fvu(x, mean)) == pytest.approx(1.0, rel=1e-5)  # predicting the mean explains 0
    assert float(ml2r(x, {k: 2 * v for k, v in x.items()})) == pytest.approx(2.0, rel=1e-5)


def test_per_event_heldout_matches_materialised_definitions():
    from sae_shards.core import events
    from sae_shards.core.metrics import evaluate_heldout
    sae = _factored_sae()
    g = torch.Generator().manual_seed(0)
    batches = [{"w": torch.randn(b, 3, 19, generator=g), "b": torch.randn(b, 6, generator=g)}
               for b in (4, 7)]
    batches[0]["w"][0] *= 10  # samples of very different size: pooled != mean of ratios
    held = evaluate_heldout(sae, batches)
    rr, xx, ratios = 0.0, 0.0, []
    for batch in batches:
        xs = sae.to_scaled(batch)
        dense = events.materialize_all(xs, sae.targets)
        recon = sae.decode(sae.encode(xs), with_bias=False)
        for b in range(dense["w"].shape[0]):
            r = sum(float((dense[k][b] - recon[k][b]).pow(2).sum()) for k in dense)
            x2 = sum(float(dense[k][b].pow(2).sum()) for k in dense)
            h2 = sum(float(recon[k][b].pow(2).sum()) for k in dense)
            rr, xx = rr + r, xx + x2
            ratios.append((h2 / x2) ** 0.5)
    assert held.fvu == pytest.approx(rr / xx, rel=1e-4)
    assert held.ml2r == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)


def test_heldout_l0_counts_only_real_activations():
    from sae_shards.core.metrics import evaluate_heldout
    targets = make_targets({"w": (12, 7)}, rank=1)
    sae = LowRankSAE(targets, SAEConfig(n_latents=16, k=2, sparsity="batch_topk"))
    sae.input_scale.fill_(1.0)
    x = _random_batch(targets, 12)
    codes = sae.encode(sae.to_scaled(x))
    sae.threshold.fill_(float(codes.values.max()) / 2)  # rows now keep different counts
    codes = sae.encode(sae.to_scaled(x))
    want = codes.active().sum(1).float().mean().item()
    assert want < codes.values.shape[1]
    assert evaluate_heldout(sae, [x]).l0 == pytest.approx(want)
