"""core/metrics.py against its definitions, written out densely on small hand-made SAEs."""

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
