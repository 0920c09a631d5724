"""The factored loss (no dense reconstruction) against the dense reference path.

Values and gradients w.r.t. every SAE parameter, for FVU and AuxK, on random SAEs with matrix and
1-D targets, rank 1 and 2, all sparsity modes, b_dec on and off.

Tolerances (stated): in fp64 the two paths agree to rtol 1e-9 (the algebra is exact). In fp32, on
batches built close to their reconstruction (FVU 1.3e-3 .. 2.9e-3, where
``||X-b||^2 - 2 z<X-b,D> + zGz`` cancels by ~1e3, with a decoder bias ~3x the signal's norm),
FVU and AuxK values agree to rtol 5e-4 and every gradient to 5e-4 of its norm (L2 norm of the
difference); measured: <= 5e-5 (values) and <= 6.5e-5 (gradients) against an fp64 reference,
while the dense fp32 path is within 1e-6 / 1e-5 of it. Dropping the Gram term (or the decoder-bias
term, or AuxK's cross term) changes the values by O(1): ``test_parity_fails_without_gram``.
"""

import pytest
import torch

from sae_shards.core.factored import cross_gram, dense_losses, factored_losses
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SPARSITY_MODES, SAEConfig
from sae_shards.core.targets import make_targets
from sae_shards.core.trainer import SAETrainer

SHAPES = {"a.weight": (40, 30), "b.weight": (24, 50), "c.bias": (60,)}
N, K, AUX_K, BATCH, SCALE = 12, 3, 4, 16, 2e-3


def _sae(rank, sparsity, use_b_dec, dtype=torch.float32, seed=0):
    targets = make_targets(SHAPES, rank=rank)
    sae = LowRankSAE(targets, SAEConfig(n_latents=N, k=K, rank=rank, sparsity=sparsity,
                                        use_b_dec=use_b_dec, aux_k=AUX_K, seed=seed)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tf in sae.factors:  # encoder = decoder + a small untied perturbation
            for enc in tf.factors("encoder"):
                enc.add_(0.02 * torch.randn(enc.shape, generator=g, dtype=dtype))
        sae.b_enc.add_(0.01 * torch.randn(N, generator=g, dtype=dtype))
        if use_b_dec:
            for bd in sae.b_dec:
                bd.add_(0.3 * torch.randn(bd.shape, generator=g, dtype=dtype))
        sae.input_scale.fill_(SCALE)
    return sae


def _batch(sae, noise, seed=0):
    """Parameter-unit batch ``SCALE * (b_dec + sum_{i in S_b} c_i D_i + noise)``: close to the
    SAE's own reconstruction (its encoder is nearly its decoder), FVU ~ 1e-3 for small noise."""
    g = torch.Generator().manual_seed(seed + 7)
    dt = sae.b_enc.dtype
    dirs = sae.dense_directions()
    signed = sae.cfg.sparsity == "signed_topk"
    x = {}
    coef = torch.zeros(BATCH, N, dtype=dt)
    for b in range(BATCH):
        S = torch.randperm(N, generator=g)[:K]
        c = 2 + torch.rand(K, generator=g, dtype=dt)
        if signed:
            c = c * (torch.randint(0, 2, (K,), generator=g) * 2 - 1).to(dt)
        coef[b, S] = c
    bias = sae.bias_sample(detach=True) or {}
    for t in sae.targets:
        clean = torch.einsum("bi,i...->b...", coef, dirs[t.name])
        clean = clean + bias[t.name][0] if t.name in bias else clean
        x[t.name] = SCALE * (clean + noise * torch.randn(clean.shape, generator=g, dtype=dt))
    return x


def _dead(seed=0):
    return torch.rand(N, generator=torch.Generator().manual_seed(seed)) < 0.5


def _both(sae, x, dead, aux_coef=1.0):
    """(values, grads) of (fvu, aux) for the factored and the dense path."""
    params = [(n, p) for n, p in sae.named_parameters() if p.requires_grad]
    out = {}
    for name in ("factored", "dense"):
        if name == "factored":
            res = factored_losses(sae, x, dead, AUX_K, aux_coef)
        else:
            xs = {k: v / sae.input_scale for k, v in x.items()}
            res = dense_losses(sae, xs, dead, AUX_K, aux_coef)
        grads = {}
        for which, loss in (("fvu", res.fvu), ("aux", res.aux)):
            if not loss.requires_grad:
                grads[which] = {n: torch.zeros_like(p) for n, p in params}
                continue
            g = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True,
                                    allow_unused=True)
            grads[which] = {n: torch.zeros_like(p) if gi is None else gi
                            for (n, p), gi in zip(params, g)}
        out[name] = (res.fvu.detach(), res.aux.detach(), grads, res.codes)
    return out


def _check(out, rtol, grad_rtol):
    ff, fa, fg, fc = out["factored"]
    df, da, dg, dc = out["dense"]
    assert torch.equal(fc.indices, dc.indices)  # same selection: same codes to compare
    torch.testing.assert_close(ff, df, rtol=rtol, atol=0)
    torch.testing.assert_close(fa, da, rtol=rtol, atol=1e-12)
    for which in ("fvu", "aux"):
        for n in dg[which]:
            a, b = fg[which][n], dg[which][n]
            err = (a - b).norm()
            scale = b.norm()
            assert err <= grad_rtol * scale + 1e-12, (which, n, float(err), float(b.norm()))


@pytest.mark.parametrize("use_b_dec", [True, False])
@pytest.mark.parametrize("sparsity", SPARSITY_MODES)
@pytest.mark.parametrize("rank", [1, 2])
def test_parity_fp32_at_small_fvu(rank, sparsity, use_b_dec):
    sae = _sae(rank, sparsity, use_b_dec)
    x = _batch(sae, noise=0.0015)
    out = _both(sae, x, _dead())
    fvu = float(out["dense"][0])
    assert 5e-4 < fvu < 5e-3, fvu  # the regime where the cancellation bites
    assert float(out["dense"][1]) > 0  # AuxK really ran
    _check(out, rtol=5e-4, grad_rtol=5e-4)


@pytest.mark.parametrize("use_b_dec", [True, False])
@pytest.mark.parametrize("sparsity", SPARSITY_MODES)
@pytest.mark.parametrize("rank", [1, 2])
def test_parity_fp64_random_batch(rank, sparsity, use_b_dec):
    sae = _sae(rank, sparsity, use_b_dec, dtype=torch.float64, seed=3)
    g = torch.Generator().manual_seed(5)
    x = {t.name: SCALE * torch.randn(BATCH, *t.shape, generator=g, dtype=torch.float64)
         for t in sae.targets}
    out = _both(sae, x, _dead(1))
    assert 0.3 < float(out["dense"][0]) < 2
    _check(out, rtol=1e-9, grad_rtol=1e-9)


def test_no_dead_latents_means_no_aux():
    sae = _sae(1, "signed_topk", True)
    x = _batch(sae, noise=0.01)
    out = _both(sae, x, torch.zeros(N, dtype=torch.bool))
    assert float(out["factored"][1]) == 0.0 == float(out["dense"][1])


def test_parity_fails_without_gram(monkeypatch):
    """Guard: the parity check must catch a dropped Gram term (here: Gram = identity)."""
    import sae_shards.core.factored as fac

    sae = _sae(2, "signed_topk", True)
    x = _batch(sae, noise=0.0015)
    eye = torch.eye(N)
    monkeypatch.setattr(type(sae), "decoder_gram", lambda self: eye)
    monkeypatch.setattr(fac, "decoder_gram_pair", lambda s, detach_left=False: eye)
    out = _both(sae, x, _dead())
    with pytest.raises(AssertionError):
        _check(out, rtol=5e-4, grad_rtol=5e-4)


def test_cross_gram_matches_dense():
    g = torch.Generator().manual_seed(0)
    for r in (1, 3):
        U1, V1, U2, V2 = (torch.randn(5, d, r, generator=g, dtype=torch.float64)
                          for d in (7, 4, 7, 4))
        dense1 = torch.einsum("imr,inr->imn", U1, V1).flatten(1)
        dense2 = torch.einsum("imr,inr->imn", U2, V2).flatten(1)
        torch.testing.assert_close(cross_gram((U1, V1), (U2, V2)), dense1 @ dense2.T)
    # two sets of other sizes and ranks (two checkpoints' decoders): [N1, N2]; a rank-1 set
    # beside a higher-rank one takes the general route, not the rank-1 shortcut
    for r1, r2 in ((2, 4), (1, 3), (3, 1)):
        U1, V1 = (torch.randn(5, d, r1, generator=g, dtype=torch.float64) for d in (7, 4))
        U2, V2 = (torch.randn(3, d, r2, generator=g, dtype=torch.float64) for d in (7, 4))
        dense1 = torch.einsum("imr,inr->imn", U1, V1).flatten(1)
        dense2 = torch.einsum("imr,inr->imn", U2, V2).flatten(1)
        torch.testing.assert_close(cross_gram((U1, V1), (U2, V2)), dense1 @ dense2.T)


@pytest.mark.parametrize("sparsity", ["signed_topk", "batch_topk"])
def test_trainer_factored_matches_dense_steps(sparsity):
    """A few optimiser steps (AuxK on, dead latents from step 2) end in the same parameters."""
    targets = make_targets(SHAPES, rank=2)
    cfg = SAEConfig(n_latents=N, k=K, rank=2, sparsity=sparsity, lr=1e-3, dead_after=16,
                    aux_k=AUX_K)
    a, b = LowRankSAE(targets, cfg), LowRankSAE(targets, cfg)
    ta, tb = SAETrainer(a), SAETrainer(b, dense_loss=True)
    g = torch.Generator().manual_seed(2)
    aux_seen = 0.0
    for _ in range(5):
        batch = {t.name: 1e-4 * torch.randn(BATCH, *t.shape, generator=g) for t in targets}
        ma, mb = ta.step(batch), tb.step(batch)
        assert ma.fvu == pytest.approx(mb.fvu, rel=1e-4)
        assert ma.aux_loss == pytest.approx(mb.aux_loss, rel=1e-3, abs=1e-7)
        aux_seen = max(aux_seen, ma.aux_loss)
    assert aux_seen > 0  # AuxK took part
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=n)


# ---- found by mutation testing (audit 120): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

def _random_batch(targets, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(b, *t.shape, generator=g) for t in targets}


def test_sq_dist_with_a_centre_is_chunk_independent():
    from sae_shards.core.factored import sq_dist
    g = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(4, 64, 32, generator=g)}
    c = {"w": torch.randn(64, 32, generator=g)}
    want = (x["w"] - c["w"]).double().pow(2).flatten(1).sum(1)
    tiny = 4 * 4 * 100 / (1 << 20)  # 100 columns a slice
    torch.testing.assert_close(sq_dist(x, c, chunk_mib=tiny), want, rtol=1e-6, atol=0)


def test_factored_fvu_matches_dense_when_the_bias_is_far_from_the_batch_mean():
    # b_dec (0) far from this batch's mean (1000): ||X - b||^2 - B ||mean - b||^2 cancels by ~1e6
    targets = make_targets({"w": (30, 20)}, rank=1)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2))
    sae.input_scale.fill_(1.0)
    g = torch.Generator().manual_seed(0)
    x = {"w": 1000 + torch.randn(16, 30, 20, generator=g)}
    dead = torch.zeros(8, dtype=torch.bool)
    f = factored_losses(sae, x, dead, 4, 0.0).fvu
    d = dense_losses(sae, sae.to_scaled(x), dead, 4, 0.0).fvu
    torch.testing.assert_close(f, d, rtol=1e-3, atol=0)


def test_aux_is_zero_when_aux_coef_is_zero():
    targets = make_targets({"w": (30, 20)}, rank=1)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2))
    sae.input_scale.fill_(1.0)
    x = _random_batch(targets, 8)
    dead = torch.ones(8, dtype=torch.bool)
    assert float(factored_losses(sae, x, dead, 4, 0.0).aux) == 0.0
