"""SAETrainer behaviour: planted-direction recovery, the noise null, AuxK, bad input, resume."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_shards.core.metrics import evaluate_heldout, match_directions
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.synthetic import PlantedConfig, PlantedStream
from sae_shards.core.targets import make_targets
from sae_shards.core.trainer import SAETrainer

BATCH = 64


@pytest.fixture(scope="module")
def stream():
    # 12 rank-1 directions over 3 matrices of different shapes and one vector, 20% noise.
    return PlantedStream(PlantedConfig(n_directions=12, noise_frac=0.2, seed=0))


def _train(sae, source, steps):
    trainer = SAETrainer(sae)
    for _ in range(steps):
        trainer.step(source())
    return trainer


def test_recovers_planted_directions(stream):
    assert len(stream.targets) >= 3 and stream.cfg.n_directions >= 12
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=24, k=3, lr=3e-3, seed=0))
    g = torch.Generator().manual_seed(1)
    _train(sae, lambda: stream.sample(BATCH, g).sample, steps=400)
    match = match_directions(sae, stream.directions)
    held = evaluate_heldout(sae, [stream.sample(256, torch.Generator().manual_seed(99)).sample])
    assert match.mmcs >= 0.95, match.max_abs_cos
    assert held.fvu <= 0.2, held
    # distinct latents for distinct directions: recovery is not one latent matching everything
    assert len(set(match.best_latent.tolist())) == stream.cfg.n_directions


def test_noise_null_is_not_explained(stream):
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=24, k=3, lr=3e-3, seed=0))
    g = torch.Generator().manual_seed(1)
    _train(sae, lambda: stream.noise_only(BATCH, g), steps=400)
    held = evaluate_heldout(sae, [stream.noise_only(256, torch.Generator().manual_seed(99))])
    assert held.fvu >= 0.8, held
    assert match_directions(sae, stream.directions).mmcs < 0.5


@pytest.mark.parametrize("aux_coef", [1 / 32, 0.0])
def test_auxk_revives_dead_latents(stream, aux_coef):
    cfg = SAEConfig(n_latents=24, k=3, lr=3e-3, dead_after=320, aux_coef=aux_coef)
    sae = LowRankSAE(stream.targets, cfg)
    with torch.no_grad():  # 20 of 24 latents start with tiny encoders: they never win top-k
        for tf in sae.factors:
            for f in tf.factors("encoder"):
                f[4:] *= 1e-3
    g = torch.Generator().manual_seed(1)
    trainer = SAETrainer(sae)
    dead = [trainer.step(stream.sample(32, g).sample).dead_frac for _ in range(400)]
    # unknown (None, not 0) until dead_after = 320 samples = 10 steps of 32 were seen
    assert all(d is None for d in dead[:9]) and dead[9] is not None
    early = max(dead[10:40])  # dead as soon as dead_after samples have passed
    late = sum(dead[-50:]) / 50
    assert early >= 0.8
    if aux_coef > 0:
        assert late <= 0.4, (early, late)
    else:
        assert late >= 0.8, (early, late)


def test_mismatched_sample_names_target_and_shapes(stream):
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=8, k=2))
    trainer = SAETrainer(sae)
    batch = stream.sample(4, torch.Generator().manual_seed(0)).sample
    bad = dict(batch)
    bad["layers.0.mlp.down_proj.weight"] = torch.zeros(4, 48, 64)
    with pytest.raises(ValueError, match=r"'layers.0.mlp.down_proj.weight'.*\(48, 64\).*\(64, 48\)"):
        trainer.step(bad)
    missing = {k: v for k, v in batch.items() if k != "layers.1.input_layernorm.weight"}
    with pytest.raises(ValueError, match="missing.*layers.1.input_layernorm.weight"):
        trainer.step(missing)


def test_non_finite_samples_rejected_and_counted(stream):
    batch = stream.sample(8, torch.Generator().manual_seed(0)).sample
    poisoned = {k: v.clone() for k, v in batch.items()}
    poisoned["layers.1.mlp.up_proj.weight"][2, 0, 0] = float("nan")
    poisoned["layers.1.input_layernorm.weight"][5, 3] = float("inf")
    keep = torch.tensor([i not in (2, 5) for i in range(8)])
    clean = {k: v[keep] for k, v in batch.items()}

    cfg = SAEConfig(n_latents=8, k=2)
    a, b = LowRankSAE(stream.targets, cfg), LowRankSAE(stream.targets, cfg)
    ta, tb = SAETrainer(a), SAETrainer(b)
    ma = ta.step(poisoned)
    tb.step(clean)
    assert ta.n_rejected_nonfinite == 2 and ma.n_samples == 6
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n  # trained exactly as if the bad samples never came
    before = {n: p.clone() for n, p in a.named_parameters()}
    all_bad = {k: torch.full_like(v, float("nan")) for k, v in batch.items()}
    assert ta.step(all_bad) is None and ta.n_rejected_nonfinite == 10
    assert all(torch.equal(before[n], p) for n, p in a.named_parameters())


def test_all_zero_samples_skipped(stream):
    batch = stream.sample(6, torch.Generator().manual_seed(0)).sample
    for v in batch.values():
        v[1] = 0
    trainer = SAETrainer(LowRankSAE(stream.targets, SAEConfig(n_latents=8, k=2)))
    assert trainer.step(batch).n_samples == 5 and trainer.n_skipped_zero == 1


def test_resume_matches_uninterrupted_run(stream, tmp_path):
    cfg = SAEConfig(n_latents=12, k=3, lr=3e-3, dead_after=64)
    g = torch.Generator().manual_seed(3)
    batches = [stream.sample(16, g).sample for _ in range(30)]
    ref = LowRankSAE(stream.targets, cfg)
    ref_tr = _train(ref, iter(batches).__next__, 30)

    first = LowRankSAE(stream.targets, cfg)
    first_tr = _train(first, iter(batches[:20]).__next__, 20)
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, tmp_path / "sae.safetensors")
    save_file(first_tr.state_tensors(), tmp_path / "state.safetensors")

    resumed = LowRankSAE(stream.targets, SAEConfig(**{**cfg.to_dict(), "seed": 123}))
    resumed.load_state_dict(load_file(tmp_path / "sae.safetensors"))
    tr = SAETrainer(resumed)
    tr.load_state_tensors(load_file(tmp_path / "state.safetensors"))
    for b in batches[20:]:
        tr.step(b)
    for (n, p), q in zip(ref.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    assert tr.n_steps == ref_tr.n_steps
    assert torch.equal(tr.stats.fire_count, ref_tr.stats.fire_count)


def test_no_latent_is_called_dead_before_dead_after_samples():
    """``dead_fraction``: None (unknown), not 0, while fewer than ``dead_after`` samples were
    seen; a checkpoint without the sample count bounds it by the longest silence."""
    from sae_shards.core.trainer import LatentStats, dead_fraction

    silent = torch.tensor([0, 5, 10, 10])
    assert dead_fraction(silent, 8, n_samples=10) == 0.5
    assert dead_fraction(silent, 16, n_samples=10) is None
    assert dead_fraction(silent, 8) == 0.5 and dead_fraction(silent, 16) is None
    stats = LatentStats(4, torch.device("cpu"))
    stats.update((torch.tensor([[0], [1], [0]]), torch.tensor([[1.0], [2.0], [0.5]])), step=1)
    assert stats.dead_frac(3) == 0.5 and stats.dead_frac(4) is None


def test_the_dead_set_auxk_trains_is_the_one_dead_frac_counts_at_the_boundary():
    """A latent silent for exactly dead_after samples is dead for AuxK and for the summary."""
    from sae_shards.core.trainer import LatentStats

    stats = LatentStats(4, torch.device("cpu"))
    for step in range(2):  # 2 x 32 samples in which only latent 0 fires
        stats.update((torch.zeros(32, 1, dtype=torch.long), torch.ones(32, 1)), step=step)
    assert stats.dead_mask(64).tolist() == [False, True, True, True]
    assert stats.dead_frac(64) == 0.75 == float(stats.dead_mask(64).float().mean())
    assert not stats.dead_mask(65).any()


def test_mean_abs_act_is_the_mean_over_the_samples_where_the_latent_fired():
    """Shard.dense()'s scale: the mean |activation| when firing, not over every sample."""
    from sae_shards.core.trainer import LatentStats

    stats = LatentStats(3, torch.device("cpu"))
    # latent 1 fires on 2 of 4 samples (|-1| and 3), latent 0 on all 4 (2 each); padding (0) is
    # not a firing
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 2]])
    val = torch.tensor([[2.0, -1.0], [2.0, 3.0], [2.0, 0.0], [-2.0, 0.0]])
    stats.update((idx, val), step=1)
    assert stats.fire_count.tolist() == [4, 2, 0]
    assert stats.mean_abs_act().tolist() == [2.0, 2.0, 0.0]
    assert stats.density().tolist() == [1.0, 0.5, 0.0]


def test_a_batch_of_one_distinct_sample_is_skipped_not_trained_on(stream):
    """Copies of one sample (one slot drawn every time, the other rows all zero) have no spread
    about their mean: the FVU's denominator is 0, and one step at ~1e30 put inf into Adam's
    moments for good. Such a batch is skipped and counted; the SAE trains on after it."""
    g = torch.Generator().manual_seed(0)
    trainer = SAETrainer(LowRankSAE(stream.targets, SAEConfig(n_latents=16, k=2, seed=0)))
    one = stream.sample(1, g).sample
    copies = {n: v.expand(3, *v.shape[1:]).clone() for n, v in one.items()}
    with_zero = {n: torch.cat([v, torch.zeros_like(v)]) for n, v in one.items()}
    assert trainer.step(copies) is None and trainer.step(with_zero) is None
    # copies beside a dropped row, zero or non-finite (audit 114 M48: the kept rows' norms
    # were compared with the dropped row's, and the step trained at an FVU of ~1e15)
    nan = {n: torch.full_like(v, float("nan")) for n, v in one.items()}
    for dropped in (with_zero, nan):
        batch = {n: torch.cat([copies[n], dropped[n][-1:]]) for n in copies}
        assert trainer.step(batch) is None
    assert trainer.n_skipped_degenerate == 4 and trainer.n_steps == 0
    assert trainer.step(stream.sample(8, g).sample) is not None
    assert all(torch.isfinite(s["exp_avg_sq"]).all() for s in trainer.optimizer.state.values())
    assert trainer.state_tensors()["trainer.n_skipped_degenerate"] == 4
    with pytest.raises(ValueError, match=r"sae.batch_size=1 must be at least 2"):
        SAEConfig(batch_size=1)


def test_rejection_counters_survive_a_resume_each_under_its_own_name(stream):
    """summary.json reports sae_rejected_nonfinite and sae_skipped_zero from these counters: a
    resumed trainer must give each back as it was, not swapped."""
    batch = stream.sample(8, torch.Generator().manual_seed(0)).sample
    for v in batch.values():
        v[1] = 0  # one all-zero sample
    batch["layers.1.mlp.up_proj.weight"][2, 0, 0] = float("nan")
    batch["layers.1.mlp.up_proj.weight"][4, 0, 0] = float("nan")  # two non-finite ones
    cfg = SAEConfig(n_latents=8, k=2)
    trainer = SAETrainer(LowRankSAE(stream.targets, cfg))
    trainer.step(batch)
    assert (trainer.n_rejected_nonfinite, trainer.n_skipped_zero) == (2, 1)
    resumed = SAETrainer(LowRankSAE(stream.targets, cfg))
    resumed.load_state_tensors(trainer.state_tensors())
    assert (resumed.n_rejected_nonfinite, resumed.n_skipped_zero) == (2, 1)
    assert (resumed.n_steps, resumed.stats.n_samples) == (1, 5)


def test_batch_topk_threshold_is_an_ema_of_the_batch_floors(stream, monkeypatch):
    """The inference threshold starts at the first batch's smallest kept activation and then
    moves by threshold_ema towards each new floor (not jumping to the last one)."""
    cfg = SAEConfig(n_latents=12, k=3, sparsity="batch_topk", threshold_ema=0.1)
    trainer = SAETrainer(LowRankSAE(stream.targets, cfg))
    floors = []
    update = trainer._update_threshold
    monkeypatch.setattr(trainer, "_update_threshold",
                        lambda floor: (floors.append(float(floor)), update(floor))[1])
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        trainer.step(stream.sample(16, g).sample)
    assert len(floors) == 4 and len(set(floors)) == 4
    want = floors[0]
    for f in floors[1:]:
        want = 0.9 * want + 0.1 * f
    assert float(trainer.sae.threshold) == pytest.approx(want, rel=1e-5)
    assert float(trainer.sae.threshold) != pytest.approx(floors[-1], rel=1e-3)


def test_heldout_ml2r_is_the_mean_ratio_of_norms_not_of_squared_norms(stream):
    """evaluate_heldout's ML2R (evaluation.json's ml2r_heldout): mean over samples of
    ||xhat|| / ||x||, in the SAE's scaled units, b_dec included in xhat."""
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=12, k=2, seed=0))
    g = torch.Generator().manual_seed(5)
    _train(sae, lambda: stream.sample(32, g).sample, steps=20)
    batch = stream.sample(64, torch.Generator().manual_seed(6)).sample
    held = evaluate_heldout(sae, [batch])
    with torch.no_grad():
        x = sae.to_scaled(batch)
        rec = sae(x).recon
    norm = lambda d: sum(v.flatten(1).pow(2).sum(1) for v in d.values()).sqrt()  # noqa: E731
    ratio = norm(rec) / norm(x)
    assert held.ml2r == pytest.approx(float(ratio.mean()), rel=1e-5)
    assert not float(ratio.pow(2).mean()) == pytest.approx(float(ratio.mean()), rel=1e-2)


def test_a_steps_figures_and_scale_follow_their_definitions(stream):
    """Audit 114 M51, M52, M54, M55, M58: the step's figures are read in one sync, and the input
    scale's EMA is a ``where`` (no branch): each is pinned to its definition. The scale starts
    at the first batch's RMS sample norm, then moves by ``scale_ema`` towards each batch's
    mean square; the loss is fvu + aux_coef * aux_loss; L0 is the active latents per sample
    (k); a latent's last active step is the step it last fired in."""
    cfg = SAEConfig(n_latents=16, k=3, seed=0, dead_after=8, aux_coef=0.5)
    trainer = SAETrainer(LowRankSAE(stream.targets, cfg))
    g = torch.Generator().manual_seed(0)

    def mean_square(batch):  # [batch] squared norms of whole samples, averaged
        return float(sum(v.flatten(1).double().pow(2).sum(1) for v in batch.values()).mean())

    scale, aux = None, []
    for step in range(4):
        batch = stream.sample(8, g).sample
        m = trainer.step(batch)
        ms = mean_square(batch)
        scale = ms ** 0.5 if scale is None else ((1 - cfg.scale_ema) * scale ** 2
                                                 + cfg.scale_ema * ms) ** 0.5
        assert m.input_scale == pytest.approx(scale, rel=1e-5), step
        assert m.loss == pytest.approx(m.fvu + cfg.aux_coef * m.aux_loss, rel=1e-6), step
        assert m.l0 == cfg.k and m.n_samples == 8
        aux.append(m.aux_loss)
        fired = trainer.stats.last_active_step == step
        assert fired.any() and bool((trainer.stats.last_active_step <= step).all())
    assert aux[0] == 0 and aux[-1] > 0  # dead latents once 8 samples passed: AuxK ran


# ---- found by mutation testing (audit 120): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

def _random_batch(targets, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(b, *t.shape, generator=g) for t in targets}


def test_signed_step_l0_counts_negative_codes():
    targets = make_targets({"w": (8, 6)}, rank=1)
    sae = LowRankSAE(targets, SAEConfig(n_latents=16, k=4, sparsity="signed_topk"))
    m = SAETrainer(sae).step(_random_batch(targets, 8))
    assert m.l0 == pytest.approx(4.0)


def test_first_step_initialises_b_dec_to_the_batch_mean_in_scaled_units():
    targets = make_targets({"w": (12, 7), "b": (6,)}, rank=1)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2))
    g = torch.Generator().manual_seed(0)
    x = {t.name: 5.0 + torch.randn(16, *t.shape, generator=g) for t in targets}
    SAETrainer(sae).step(x)
    s = float(sae.input_scale)
    for t, bd in zip(sae.targets, sae.b_dec):
        # one Adam step (lr 1e-3) moves b_dec by at most ~1e-3 from its initial value
        torch.testing.assert_close(bd.detach(), x[t.name].mean(0) / s, rtol=0, atol=2e-3)


def test_distinct_samples_of_equal_norm_are_trained_on():
    # unit-norm samples (one-hot rows in different places): equal norms, different samples
    targets = make_targets({"w": (4, 4)}, rank=1)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2))
    x = {"w": torch.eye(16)[:8].reshape(8, 4, 4)}
    tr = SAETrainer(sae)
    assert tr.step(x) is not None
    assert tr.n_skipped_degenerate == 0


def test_resume_restores_mean_abs_act():
    targets = make_targets({"w": (12, 7)}, rank=1)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2))
    tr = SAETrainer(sae)
    for seed in range(3):
        tr.step(_random_batch(targets, 8, seed))
    again = SAETrainer(sae)
    again.load_state_tensors(tr.state_tensors())
    torch.testing.assert_close(again.stats.mean_abs_act(), tr.stats.mean_abs_act())
    torch.testing.assert_close(again.stats.density(), tr.stats.density())


def test_dead_fraction_is_known_after_exactly_dead_after_samples():
    from sae_shards.core.trainer import dead_fraction
    assert dead_fraction(torch.tensor([4, 0]), 4, n_samples=4) == 0.5
    assert dead_fraction(torch.tensor([3, 0]), 4, n_samples=3) is None


def test_bf16_autocast_uses_the_dense_loss(monkeypatch):
    import sae_shards.core.trainer as trainer_mod

    def refuse(*a, **k):
        raise AssertionError("factored loss under bf16 autocast")
    monkeypatch.setattr(trainer_mod, "factored_losses", refuse)
    targets = make_targets({"w": (12, 7)}, rank=1)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2, autocast_bf16=True))
    assert SAETrainer(sae).step(_random_batch(targets, 8)) is not None
