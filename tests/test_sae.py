"""The low-rank SAE: factored math against dense references, normalisation, sparsity modes."""

import pytest
import torch

from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SPARSITY_MODES, SAEConfig
from sae_shards.core.sparsity import SparseCodes, aux_latents, relu_topk
from sae_shards.core.targets import TargetSpec, make_targets
from sae_shards.core.trainer import SAETrainer

SHAPES = {"a.weight": (12, 7), "b.weight": (5, 9), "c.bias": (6,)}


def _random_batch(targets, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(b, *t.shape, generator=g) for t in targets}


def _dense_inner(x, dirs):
    """Reference: <x_b, W_i>_F summed over targets with materialised directions."""
    return sum(torch.einsum("bk,ik->bi", x[k].flatten(1), dirs[k].flatten(1)) for k in x)


def _perturb(sae, seed=1):
    """Make encoder and decoder differ so parity tests cannot pass by symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_factored_inner_matches_dense(rank, which):
    targets = make_targets(SHAPES, rank=rank)
    sae = LowRankSAE(targets, SAEConfig(n_latents=10, k=3, rank=rank))
    _perturb(sae)
    x = _random_batch(targets, 5)
    got = sae.inner(x, which)
    want = _dense_inner(x, sae.dense_directions(which))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_encode_chunking_changes_nothing():
    targets = make_targets({"w": (64, 40)}, rank=2)
    cfg = SAEConfig(n_latents=16, k=2, encode_chunk_mib=1)
    small = LowRankSAE(targets, cfg)
    x = _random_batch(targets, 300)  # 300 * 40 * 32 * 4 B = 1.5 MiB -> two chunks
    chunked = small.inner(x)
    big = LowRankSAE(targets, SAEConfig(n_latents=16, k=2, encode_chunk_mib=1024))
    big.load_state_dict(small.state_dict())
    torch.testing.assert_close(chunked, big.inner(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 3])
def test_decode_matches_dense_sum(rank):
    targets = make_targets(SHAPES, rank=rank)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=3))
    _perturb(sae)
    codes = SparseCodes(torch.tensor([[0, 5, 7], [2, 2, 1]]), torch.tensor([[1.5, -2.0, 0.0], [0.5, 1.0, -1.0]]))
    got = sae.decode(codes)
    dirs = sae.dense_directions()
    z = codes.dense(8)  # [b, N]
    for t, bd in zip(targets, sae.b_dec, strict=True):
        want = torch.einsum("bi,i...->b...", z, dirs[t.name]) + bd
        torch.testing.assert_close(got[t.name], want, rtol=1e-5, atol=1e-5)


def test_decoder_gram_and_norms_match_dense():
    targets = make_targets(SHAPES, rank=2)
    sae = LowRankSAE(targets, SAEConfig(n_latents=6, k=2))
    _perturb(sae)
    flat = torch.cat([d.flatten(1) for d in sae.dense_directions().values()], 1)
    torch.testing.assert_close(sae.decoder_gram(), flat @ flat.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.decoder_sq_norms(), flat.pow(2).sum(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sparsity", SPARSITY_MODES)
def test_unit_norm_after_training_step(sparsity):
    targets = make_targets(SHAPES, rank=2)
    sae = LowRankSAE(targets, SAEConfig(n_latents=16, k=3, sparsity=sparsity, lr=0.05))
    trainer = SAETrainer(sae)
    for seed in range(3):
        assert trainer.step(_random_batch(targets, 8, seed)) is not None
    flat = torch.cat([d.flatten(1) for d in sae.dense_directions().values()], 1)
    norms = flat.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), norms
    # the step really moved the decoder (else the check above is vacuous)
    fresh = LowRankSAE(targets, sae.cfg)
    assert not torch.allclose(fresh.dense_directions()["a.weight"], sae.dense_directions()["a.weight"])


@pytest.mark.parametrize("sparsity", SPARSITY_MODES)
def test_signed_says_whether_a_modes_codes_keep_their_sign(sparsity):
    """``SAEConfig.signed`` is the one test of a signed mode (AuxK's choice and activations of
    dead latents ask it): it must agree with what the mode's selection does, so a new signed
    mode left out of ``SIGNED_MODES`` fails here instead of ReLU-ing its aux codes in silence."""
    from sae_shards.core.sparsity import aux_latents, aux_values

    targets = make_targets(SHAPES)
    sae = LowRankSAE(targets, SAEConfig(n_latents=12, k=3, sparsity=sparsity))
    pre = sae.encode_pre(_random_batch(targets, 16))
    codes, _ = sae.select(pre, training=True)
    assert sae.cfg.signed == bool((codes.values < 0).any())
    dead = torch.zeros(12, dtype=torch.bool)
    dead[::2] = True
    aidx = aux_latents(pre, dead, 3, sae.cfg.signed)
    assert dead[aidx].all()  # only dead latents
    a = aux_values(pre, aidx, sae.cfg.signed)
    assert bool((a < 0).any()) == sae.cfg.signed  # a signed mode revives negative directions too


def test_sparsity_modes_semantics():
    targets = make_targets(SHAPES)
    x = _random_batch(targets, 16)
    signed = LowRankSAE(targets, SAEConfig(n_latents=12, k=3, sparsity="signed_topk"))
    pre = signed.encode_pre(x)
    codes = signed.encode(x)
    assert (codes.values < 0).any() and (codes.values > 0).any()  # signs kept
    want = pre.abs().topk(3, dim=1).values.sort(1).values
    torch.testing.assert_close(codes.values.abs().sort(1).values, want)

    relu = LowRankSAE(targets, SAEConfig(n_latents=12, k=3, sparsity="topk"))
    assert (relu.encode(x).values >= 0).all()

    bt = LowRankSAE(targets, SAEConfig(n_latents=12, k=3, sparsity="batch_topk"))
    out = bt(x, training=True)
    assert int(out.codes.active().sum()) == 3 * 16  # k * batch over the batch
    assert torch.isnan(bt.threshold)
    trainer = SAETrainer(bt)
    trainer.step(x)
    assert bt.threshold > 0  # inference threshold learnt from the batch
    inf = bt.encode(bt.to_scaled(x))
    assert (inf.values[inf.active()] > bt.threshold).all()


def test_rank_larger_than_matrix_is_an_error():
    with pytest.raises(ValueError, match=r"target 'w'.*rank 6.*min\(5, 9\) = 5"):
        TargetSpec("w", (5, 9), rank=6)
    with pytest.raises(ValueError, match="not supported"):
        TargetSpec("conv", (3, 3, 3, 3))  # 3-D is a stack of experts (tests/test_experts.py)


def test_param_counts():
    targets = make_targets({"w": (100, 50), "b": (10,)}, rank=2)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2))
    assert sae.factored_param_count() == 2 * 8 * ((100 + 50) * 2 + 10)
    assert sae.dense_param_count() == 2 * 8 * (100 * 50 + 10)
    n_dir = sum(p.numel() for n, p in sae.named_parameters() if n.startswith("factors"))
    assert n_dir == sae.factored_param_count()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"sae.k=9 .*sae.n_latents=4"):
        SAEConfig(n_latents=4, k=9)
    with pytest.raises(ValueError, match=r"sae.sparsity='relu'"):
        SAEConfig(sparsity="relu")
    with pytest.raises(ValueError, match=r"unknown SAE config keys \['klatents'\]"):
        SAEConfig.from_dict({"klatents": 3})


def test_batch_topk_before_any_threshold_keeps_the_batch_top_k():
    """An untrained batch_topk SAE (threshold NaN) still encodes: batch top-k over the batch,
    not a comparison with NaN that drops every latent."""
    targets = make_targets(SHAPES)
    sae = LowRankSAE(targets, SAEConfig(n_latents=12, k=3, sparsity="batch_topk"))
    assert torch.isnan(sae.threshold)
    codes = sae.encode(_random_batch(targets, 8))
    assert int(codes.active().sum()) == 3 * 8


def test_scaling_samples_before_the_input_scale_is_known_is_refused():
    """input_scale is 0 until the trainer sees data: dividing by it would give inf samples."""
    targets = make_targets(SHAPES)
    sae = LowRankSAE(targets, SAEConfig(n_latents=4, k=1))
    with pytest.raises(RuntimeError, match="input_scale is not set yet"):
        sae.to_scaled(_random_batch(targets, 2))


# ---- found by mutation testing (audit 120): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

def test_relu_topk_never_keeps_a_negative_activation():
    # topk mode is "ReLU, then the k largest": a sample with fewer than k positive
    # pre-activations keeps zeros (padding), never a negative code
    pre = torch.tensor([[3.0, -1.0, -2.0, -0.5, -4.0]])
    codes = relu_topk(pre, 3)
    assert (codes.values >= 0).all()
    assert codes.active().sum().item() == 1


def test_aux_latents_are_only_dead_ones_when_fewer_dead_than_aux_k():
    pre = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[2, 7]] = True
    for signed in (True, False):
        idx = aux_latents(pre, dead, aux_k=4, signed=signed)
        assert idx.shape == (6, 2)
        assert dead[idx].all()


def test_signed_aux_latents_score_by_magnitude():
    # signed_topk codes act by |c|: the dead latent with the most negative pre-activation is the
    # one AuxK should pick, not the one with the largest ReLU
    pre = torch.tensor([[-5.0, 0.1, 0.2, 3.0]])
    dead = torch.tensor([True, True, True, False])
    assert aux_latents(pre, dead, aux_k=1, signed=True).tolist() == [[0]]
    assert aux_latents(pre, dead, aux_k=1, signed=False).tolist() == [[2]]


def test_active_counts_negative_signed_codes():
    codes = SparseCodes(torch.tensor([[0, 1, 2]]), torch.tensor([[-1.0, 2.0, 0.0]]))
    assert codes.active().tolist() == [[True, True, False]]


def test_normalize_decoder_balances_u_and_v_per_latent():
    targets = make_targets({"w": (12, 7)}, rank=2)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2, rank=2))
    tf = sae.factors[0]
    with torch.no_grad():
        tf.U.mul_(3.0)  # unbalance: U three times larger
        tf.V.div_(1.5)
        sae.normalize_decoder_()
    nu = tf.U.detach().flatten(1).norm(dim=1)
    nv = tf.V.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(nu, nv)


def test_batch_topk_inference_uses_the_threshold_not_the_batch():
    targets = make_targets({"w": (12, 7)}, rank=1)
    sae = LowRankSAE(targets, SAEConfig(n_latents=16, k=2, sparsity="batch_topk"))
    sae.threshold.fill_(0.0)  # every positive pre-activation passes at inference
    pre = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    codes, _ = sae.select(pre, training=False)
    assert codes.active().sum().item() == (pre > 0).sum().item()


def test_a_batch_of_one_sample_is_refused_by_the_config():
    with pytest.raises(ValueError, match="batch_size"):
        SAEConfig(batch_size=1)


def test_a_negative_aux_coef_is_refused():
    """A negative AuxK weight would act as 0 (every use of it tests > 0): refused by name."""
    with pytest.raises(ValueError, match=r"sae.aux_coef=-0.5 must be >= 0"):
        SAEConfig(aux_coef=-0.5)
    assert SAEConfig(aux_coef=0).aux_coef == 0


def test_targets_with_different_batch_sizes_are_refused():
    """A batch whose targets hold different numbers of samples is refused naming the target
    and both sizes: a batch of 1 on one target would otherwise broadcast against the others
    and train a normal-looking step (audit 123, J06)."""
    w, b = "layers.0.mlp.down_proj.weight", "layers.0.norm.weight"
    sae = LowRankSAE([TargetSpec(w, (6, 4), 1), TargetSpec(b, (5,))],
                     SAEConfig(n_latents=3, rank=1, k=1, batch_size=8))
    trainer = SAETrainer(sae)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=rf"target '{b}': batch size 1 differs from 8"):
        trainer.step({w: torch.randn(8, 6, 4, generator=g), b: torch.randn(1, 5, generator=g)})
    assert trainer.n_steps == 0


def test_default_aux_k_is_four_times_k_capped_at_n_latents():
    assert SAEConfig(n_latents=64, k=3).effective_aux_k == 12
    assert SAEConfig(n_latents=8, k=3).effective_aux_k == 8


def test_default_decoder_bias_is_off_for_factored_samples():
    assert SAEConfig().uses_b_dec("factored") is False
    assert SAEConfig().uses_b_dec("dense") is True


def test_an_ema_rate_of_zero_is_refused():
    for name in ("scale_ema", "threshold_ema"):
        with pytest.raises(ValueError, match=name):
            SAEConfig(**{name: 0.0})
