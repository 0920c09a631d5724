"""The SAE on factored per-event samples ``[batch, T, m + n]`` (X = L^T R) against the dense
reference on the same samples materialised.

Parity (fp64, rtol 1e-9; the algebra is exact): pre-activations, codes, FVU and AuxK about zero
(dead latents forced), gradients of every SAE parameter, input-scale norms, for ranks 1 and 2
with a 1-D target and zero-padded rows; a dropped factor row breaks it
(``test_parity_fails_when_a_factor_row_is_dropped``). Learning: planted directions are recovered
(mmcs >= 0.99) from factored samples, and from the same samples materialised; a noise-only
stream is not (mmcs < 0.5).
"""

import json

import pytest
import torch

from sae_shards.core import events
from sae_shards.core.checkpoint import (CheckpointError, load_checkpoint, load_training_state,
                                        save_checkpoint)
from sae_shards.core.event_losses import dense_event_losses, event_losses
from sae_shards.core.metrics import match_directions, sample_sq_norms
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SPARSITY_MODES, SAEConfig
from sae_shards.core.synthetic import PlantedConfig, PlantedStream
from sae_shards.core.targets import make_targets
from sae_shards.core.trainer import SAETrainer

SHAPES = {"a.weight": (40, 30), "b.weight": (24, 50), "c.bias": (60,)}
N, K, AUX_K, BATCH, T, SCALE = 12, 3, 4, 16, 5, 2e-3


def _sae(rank, sparsity="signed_topk", dtype=torch.float64, seed=0):
    targets = make_targets(SHAPES, rank=rank)
    sae = LowRankSAE(targets, SAEConfig(n_latents=N, k=K, rank=rank, sparsity=sparsity,
                                        aux_k=AUX_K, seed=seed), sample_form="factored").to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tf in sae.factors:  # encoder = decoder + an untied perturbation
            for enc in tf.factors("encoder"):
                enc.add_(0.05 * torch.randn(enc.shape, generator=g, dtype=dtype))
        sae.b_enc.add_(0.01 * torch.randn(N, generator=g, dtype=dtype))
        sae.input_scale.fill_(SCALE)
    return sae


def _events(sae, seed=0):
    """Random factored batch in parameter units; sample b keeps ``T - b % 3`` rows (the rest are
    zero padding)."""
    g = torch.Generator().manual_seed(seed + 7)
    dt = sae.b_enc.dtype
    x = {}
    for t in sae.targets:
        if not t.is_matrix:
            x[t.name] = SCALE * torch.randn(BATCH, *t.shape, generator=g, dtype=dt)
            continue
        f = torch.randn(BATCH, T, sum(t.shape), generator=g, dtype=dt)
        f[..., t.shape[0]:] *= SCALE / T ** 0.5
        for b in range(BATCH):
            f[b, T - b % 3:] = 0
        x[t.name] = f
    return x


def _dead(seed=0):
    return torch.rand(N, generator=torch.Generator().manual_seed(seed)) < 0.5


def _both(sae, x, dead):
    """{path: (pre, codes, fvu, aux, {loss: {param: grad}})} for the factored and dense paths."""
    params = [(n, p) for n, p in sae.named_parameters() if p.requires_grad]
    out = {}
    for path in ("factored", "dense"):
        if path == "factored":
            res = event_losses(sae, x, dead, AUX_K, 1.0)
        else:
            dense = events.materialize_all(x, sae.targets)
            res = dense_event_losses(sae, {k: v / sae.input_scale for k, v in dense.items()},
                                     dead, AUX_K, 1.0)
        grads = {}
        for which, loss in (("fvu", res.fvu), ("aux", res.aux)):
            g = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True,
                                    allow_unused=True)
            grads[which] = {n: torch.zeros_like(p) if gi is None else gi
                            for (n, p), gi in zip(params, g)}
        out[path] = (res.pre_acts.detach(), res.codes, res.fvu.detach(), res.aux.detach(), grads)
    return out


def _check(out, rtol):
    fp, fc, ff, fa, fg = out["factored"]
    dp, dc, df, da, dg = out["dense"]
    torch.testing.assert_close(fp, dp, rtol=rtol, atol=1e-12)
    assert torch.equal(fc.indices, dc.indices)
    torch.testing.assert_close(fc.values, dc.values, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(ff, df, rtol=rtol, atol=0)
    torch.testing.assert_close(fa, da, rtol=rtol, atol=0)
    for which in ("fvu", "aux"):
        for n, b in dg[which].items():
            err = (fg[which][n] - b).norm()
            assert err <= rtol * b.norm() + 1e-15, (which, n, float(err), float(b.norm()))


@pytest.mark.parametrize("sparsity", SPARSITY_MODES)
@pytest.mark.parametrize("rank", [1, 2])
def test_parity_with_materialised_samples(rank, sparsity):
    sae = _sae(rank, sparsity)
    x = _events(sae)
    out = _both(sae, x, _dead())
    assert 0.3 < float(out["dense"][2]) < 2  # a real FVU, not a trivial one
    assert float(out["dense"][3]) > 0  # AuxK really ran
    grads = out["dense"][4]
    assert all(grads["fvu"][n].norm() > 0 for n in grads["fvu"] if not n.startswith("b_dec"))
    _check(out, rtol=1e-9)


def test_encode_and_norms_match_materialised():
    sae = _sae(2, dtype=torch.float32)
    x = _events(sae, seed=1)
    dense = events.materialize_all(x, sae.targets)
    torch.testing.assert_close(events.sq_norms(x, sae.targets), sample_sq_norms(dense),
                               rtol=1e-5, atol=0)
    xs, xd = sae.to_scaled(x), sae.to_scaled(dense)  # fp32, the SAE's working dtype
    torch.testing.assert_close(events.materialize_all(xs, sae.targets)["a.weight"],
                               xd["a.weight"], rtol=1e-5, atol=1e-6)
    pre_f = sae.encode_pre(xs)
    pre_d = sae.inner(xd, "encoder", form="dense") + sae.b_enc
    torch.testing.assert_close(pre_f, pre_d, rtol=1e-4, atol=1e-5)
    assert torch.equal(sae.encode(xs).indices, sae.select(pre_f, training=False)[0].indices)
    assert sae(xs).recon is None  # nothing dense unless asked for
    recon = sae(xs, with_recon=True).recon
    assert recon["a.weight"].shape == (BATCH, *SHAPES["a.weight"])


def test_small_encode_chunks_give_the_same_result():
    sae = _sae(2)
    x = _events(sae, seed=2)
    whole = sae.inner(x, "encoder")
    small = LowRankSAE(sae.targets, SAEConfig(n_latents=N, k=K, rank=2, aux_k=AUX_K,
                                              encode_chunk_mib=1), "factored").double()
    small.load_state_dict(sae.state_dict())
    # 1280 samples in chunks of 1092 and 188 (1 MiB over 4 B x 2 x T x N x rank; audit 120: this
    # test held 640 samples, one chunk, and never split its batch)
    big = {k: v.repeat(80, *([1] * (v.ndim - 1))) for k, v in x.items()}
    torch.testing.assert_close(small.inner(big, "encoder"), whole.repeat(80, 1))


def test_parity_fails_when_a_factor_row_is_dropped():
    """Guard: the parity check catches a factored input that lost one row of one sample."""
    sae = _sae(2)
    x = _events(sae)
    dense = events.materialize_all(x, sae.targets)
    broken = dict(x)
    broken["a.weight"] = x["a.weight"].clone()
    broken["a.weight"][0, 0] = 0  # sample 0 keeps T rows: row 0 was a real one
    res_f = event_losses(sae, broken, _dead(), AUX_K, 1.0)
    res_d = dense_event_losses(sae, {k: v / sae.input_scale for k, v in dense.items()},
                               _dead(), AUX_K, 1.0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(res_f.pre_acts, res_d.pre_acts, rtol=1e-9, atol=1e-12)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(res_f.fvu, res_d.fvu, rtol=1e-9, atol=0)


def test_trainer_factored_matches_materialised_steps():
    """Five optimiser steps (AuxK on, latents dead from step 2) end in the same parameters,
    with the factored loss and with the dense reference on the materialised events."""
    targets = make_targets(SHAPES, rank=2)
    cfg = SAEConfig(n_latents=N, k=K, rank=2, lr=1e-3, dead_after=16, aux_k=AUX_K)
    a, b = LowRankSAE(targets, cfg, "factored"), LowRankSAE(targets, cfg, "factored")
    with torch.no_grad():  # latents 6.. start with tiny encoders: they never win, so go dead
        for sae in (a, b):
            for tf in sae.factors:
                for f in tf.factors("encoder"):
                    f[6:] *= 1e-3
    ta, tb = SAETrainer(a), SAETrainer(b, dense_loss=True)
    aux_seen = 0.0
    for step in range(5):
        batch = _events(a, seed=10 + step)
        batch = {k: v.float() * (1e-2 if v.ndim == 2 else 1) for k, v in batch.items()}
        ma, mb = ta.step(batch), tb.step(batch)
        assert ma.fvu == pytest.approx(mb.fvu, rel=1e-4)
        assert ma.aux_loss == pytest.approx(mb.aux_loss, rel=1e-3, abs=1e-7)
        assert ma.input_scale == pytest.approx(mb.input_scale, rel=1e-6)
        aux_seen = max(aux_seen, ma.aux_loss)
    assert aux_seen > 0
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=n)
    assert a.b_dec is None and a.bias_sample() is None  # nothing allocated for an unused bias


def test_trainer_checks_factored_shapes_and_drops_bad_samples():
    targets = make_targets(SHAPES, rank=1)
    trainer = SAETrainer(LowRankSAE(targets, SAEConfig(n_latents=N, k=K), "factored"))
    good = {k: v.float() for k, v in _events(trainer.sae).items()}
    dense = events.materialize_all(good, targets)
    with pytest.raises(ValueError, match=r"'a.weight'.*\[batch, T, 70\]"):
        trainer.step(dense)
    bad = {k: v.clone() for k, v in good.items()}
    bad["a.weight"][1, 0, 0] = float("nan")
    for v in bad.values():
        v[2] = 0
    m = trainer.step(bad)
    assert m.n_samples == BATCH - 2
    assert (trainer.n_rejected_nonfinite, trainer.n_skipped_zero) == (1, 1)


@pytest.fixture(scope="module")
def stream():
    return PlantedStream(PlantedConfig(n_directions=12, noise_frac=0.2, seed=0))


def _learn(stream, form, source, steps=400):
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=24, k=3, lr=3e-3, seed=0), form)
    trainer = SAETrainer(sae)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        trainer.step(source(g))
    return match_directions(sae, stream.directions)


EVENT_ROWS = 8


def test_factored_stream_materialises_to_planted_combinations(stream):
    clean = PlantedStream(PlantedConfig(n_directions=12, noise_frac=0.0, seed=0))
    batch = clean.sample_factored(4, torch.Generator().manual_seed(0), EVENT_ROWS)
    dense = events.materialize_all(batch.sample, clean.targets)
    for t in clean.targets:
        want = clean.cfg.scale * torch.einsum("bk,k...->b...", batch.coefficients,
                                              clean.directions[t.name])
        torch.testing.assert_close(dense[t.name], want, rtol=1e-5, atol=1e-10)


def test_learns_planted_directions_from_factored_samples(stream):
    match = _learn(stream, "factored",
                   lambda g: stream.sample_factored(64, g, EVENT_ROWS).sample)
    assert match.mmcs >= 0.99, match.max_abs_cos
    assert len(set(match.best_latent.tolist())) == stream.cfg.n_directions


def test_learns_planted_directions_from_materialised_samples(stream):
    match = _learn(stream, "dense", lambda g: events.materialize_all(
        stream.sample_factored(64, g, EVENT_ROWS).sample, stream.targets))
    assert match.mmcs >= 0.99, match.max_abs_cos


def test_noise_only_events_and_an_untrained_sae_do_not_match(stream):
    match = _learn(stream, "factored",
                   lambda g: stream.noise_only_factored(64, g, EVENT_ROWS))
    assert match.mmcs < 0.5
    untrained = _learn(stream, "factored", lambda g: None, steps=0)  # random decoder
    assert untrained.mmcs < 0.5


def test_b_dec_with_factored_samples_is_an_error():
    targets = make_targets(SHAPES, rank=1)
    with pytest.raises(ValueError, match=r"sae.use_b_dec.*capture.granularity=group\|completion"):
        LowRankSAE(targets, SAEConfig(n_latents=N, k=K, use_b_dec=True), "factored")
    assert LowRankSAE(targets, SAEConfig(n_latents=N, k=K), "dense").uses_b_dec
    assert not LowRankSAE(targets, SAEConfig(n_latents=N, k=K), "factored").uses_b_dec
    assert not LowRankSAE(targets, SAEConfig(n_latents=N, k=K, use_b_dec=False)).uses_b_dec
    with pytest.raises(ValueError, match="sample_form"):
        LowRankSAE(targets, SAEConfig(n_latents=N, k=K), "events")


def test_checkpoint_keeps_sample_form(tmp_path):
    targets = make_targets(SHAPES, rank=2)
    sae = LowRankSAE(targets, SAEConfig(n_latents=N, k=K, rank=2), "factored")
    trainer = SAETrainer(sae)
    trainer.step({k: v.float() for k, v in _events(sae).items()})
    save_checkpoint(tmp_path / "ck", sae, trainer.stats.as_tensors(),
                    training_state=trainer.state_tensors())
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["sample_form"] == "factored"
    loaded = load_checkpoint(tmp_path / "ck").sae
    assert loaded.sample_form == "factored" and not loaded.uses_b_dec
    resumed = SAETrainer(loaded)
    resumed.load_state_tensors(load_training_state(tmp_path / "ck"))
    assert resumed.n_steps == 1
    # a checkpoint without the key (written before per-event samples) loads as dense
    save_checkpoint(tmp_path / "dense", LowRankSAE(targets, SAEConfig(n_latents=N, k=K, rank=2)))
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    del cfg["sample_form"]
    (tmp_path / "dense" / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(tmp_path / "dense").sae.sample_form == "dense"


@pytest.mark.parametrize("edit, message", [
    ({"sample_form": "sparse"}, r"sample_form = 'sparse' must be one of 'dense', 'factored'"),
    ({"sae.use_b_dec": True}, r"sae.use_b_dec=true is not supported with factored"),
])
def test_checkpoint_with_a_bad_sample_form_is_refused(tmp_path, edit, message):
    sae = LowRankSAE(make_targets(SHAPES, rank=1), SAEConfig(n_latents=N, k=K), "factored")
    save_checkpoint(tmp_path / "ck", sae)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    for key, value in edit.items():
        *outer, last = key.split(".")
        (cfg[outer[0]] if outer else cfg)[last] = value
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ck")


def test_targets_disagreeing_on_the_batch_size_are_refused():
    """A 1-sample target beside 16-sample ones would broadcast into every row's norm."""
    targets = make_targets(SHAPES, rank=1)
    trainer = SAETrainer(LowRankSAE(targets, SAEConfig(n_latents=N, k=K), "factored"))
    x = {k: v.float() for k, v in _events(trainer.sae).items()}
    x["c.bias"] = x["c.bias"][:1]
    with pytest.raises(ValueError, match=r"targets disagree on the batch size: \[1, 16\]"):
        trainer.step(x)


def test_auxk_of_relu_modes_takes_the_relu_of_the_dead_latents_activations():
    """AuxK with topk: the dead latents' activations pass through ReLU, as in the forward pass;
    a dead latent with a negative pre-activation contributes nothing. Reference computed here on
    the materialised samples (dense_event_losses shares aux_values with event_losses)."""
    from sae_shards.core.sparsity import SparseCodes

    sae = _sae(2, sparsity="topk")
    x = _events(sae)
    dead = torch.ones(N, dtype=torch.bool)
    dead[:2] = False
    aux_k = 8  # more than the dead latents with a positive pre-activation
    res = event_losses(sae, x, dead, aux_k, 1.0)
    with torch.no_grad():
        xs = {k: v / sae.input_scale for k, v in events.materialize_all(x, sae.targets).items()}
        pre = sae.inner(xs, "encoder", form="dense") + sae.b_enc
        codes = sae.select(pre, training=True)[0]
        recon = sae.decode(codes, with_bias=False)
        aidx = pre.relu().masked_fill(~dead, -1.0).topk(aux_k, dim=-1).indices
        assert (pre.gather(-1, aidx) < 0).any()  # negative activations are among them
        ehat = sae.decode(SparseCodes(aidx, pre.gather(-1, aidx).clamp_min(0)), with_bias=False)
        resid = {k: xs[k] - recon[k] for k in xs}
        want = (sum((resid[k] - ehat[k]).pow(2).sum() for k in xs)
                / sum(v.pow(2).sum() for v in resid.values()))
    torch.testing.assert_close(res.aux.detach(), want, rtol=1e-9, atol=0)


# ---- found by mutation testing (audit 120): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

def test_event_encode_really_chunked_matches_whole():
    # test_event_sae's chunking test never splits its batch (640 < the 1092 samples one chunk
    # holds at encode_chunk_mib=1 there); here T=64, N=64, r=4 -> chunks of 8 samples
    targets = make_targets({"w": (40, 30)}, rank=4)
    cfg = dict(n_latents=64, k=3, rank=4)
    whole = LowRankSAE(targets, SAEConfig(**cfg), "factored")
    small = LowRankSAE(targets, SAEConfig(**cfg, encode_chunk_mib=1), "factored")
    small.load_state_dict(whole.state_dict())
    x = {"w": torch.randn(20, 64, 70, generator=torch.Generator().manual_seed(0))}
    torch.testing.assert_close(small.inner(x, "encoder"), whole.inner(x, "encoder"))


def test_a_factored_batch_without_rows_is_refused():
    from sae_shards.core.events import check_event_batch
    targets = make_targets({"w": (12, 7)}, rank=1)
    with pytest.raises(ValueError, match="factored sample batch"):
        check_event_batch({"w": torch.zeros(4, 0, 19)}, targets)


def test_event_slots_never_hold_more_rows_than_the_matrix_rank():
    from sae_shards.core.events import slot_shape
    from sae_shards.core.targets import TargetSpec
    assert slot_shape(TargetSpec("w", (4, 6)), 16) == (4, 10)
