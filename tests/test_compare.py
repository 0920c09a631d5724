"""``sae-shards compare``: each trained shard of one SAE matched to its nearest in another,
beside a chance control (random directions in the span of the other's trained shards). Two SAEs
trained on one planted stream under other seeds find the same directions; an SAE whose shards
are random directions (a broken pipeline: it learnt nothing of the stream) matches none of them,
and no more of them beat chance than chance allows."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch

from sae_shards.analysis.compare import (compare_shards, comparison_lines, comparison_path_refusal,
                                         load_shards, span_chance)
from sae_shards.analysis.shards import ShardSet
from sae_shards.cli import main
from sae_shards.core.metrics import match_directions
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.synthetic import PlantedConfig, PlantedStream
from sae_shards.core.trainer import SAETrainer

CFG = {"n_latents": 24, "k": 3, "lr": 3e-3}


@pytest.fixture(scope="module")
def stream():
    return PlantedStream(PlantedConfig(n_directions=12, noise_frac=0.2, seed=0))


def _trained(stream, seed: int, noise: bool = False, steps: int = 150) -> ShardSet:
    sae = LowRankSAE(stream.targets, SAEConfig(**CFG, seed=seed))
    trainer = SAETrainer(sae)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        trainer.step(stream.noise_only(64, g) if noise else stream.sample(64, g).sample)
    return ShardSet(sae, {"meta": {"run_dir": f"run{seed}{'-noise' * noise}"}},
                    trainer.stats.as_tensors())


@pytest.fixture(scope="module")
def sets(stream):
    """Two SAEs trained on the stream under other seeds, and one whose shards are random
    directions, each away from its own start (a broken pipeline; an SAE trained on noise alone
    for as long barely leaves its start, so it would have no trained shard to match)."""
    broken = ShardSet(_moved_sae(stream.targets, 1, 7), {"meta": {"run_dir": "random"}},
                      {"stats.density": torch.full((CFG["n_latents"],), 0.2)})
    return _trained(stream, 0), _trained(stream, 1), broken


def test_two_seeds_find_the_same_planted_shards_and_noise_finds_none(stream, sets):
    a, b, noise = sets
    found = compare_shards(a, b)
    planted = match_directions(a.sae, stream.directions)  # A's latent for each planted one
    recovered = [int(i) for i, c in zip(planted.best_latent, planted.max_abs_cos) if c >= 0.95]
    assert len(recovered) >= 10, planted.max_abs_cos
    pairs = {p.shard: p for p in found.pairs}
    assert set(recovered) <= {p.shard for p in found.replicated}  # each one found again,
    assert all(abs(pairs[i].cosine) >= 0.95 and pairs[i].mutual for i in recovered)  # 1:1
    # a random direction of B's span, cut to rank 1, leans to one of its few (12) planted
    # directions, so the chance is high here; each recovered pair still beats it
    assert all(abs(pairs[i].cosine) > pairs[i].chance for i in recovered)
    assert max(pairs[i].chance for i in recovered) < 0.95
    assert [abs(p.cosine) for p in found.pairs] == sorted((abs(p.cosine) for p in found.pairs),
                                                          reverse=True)
    assert not found.same_init  # other seeds
    broken = compare_shards(a, noise)  # B's shards random directions: a broken pipeline
    assert broken.replicated == [] and broken.to_dict()["median_abs_cosine"] < 0.15
    assert len(broken.above_chance) <= len(broken.pairs) // 4  # 1 in 20, by chance


def test_mutual_marks_the_nearest_of_a_s_compared_shards(sets):
    a, _, noise = sets
    found = compare_shards(a, noise)
    cos = a.cosine_matrix(noise).abs()
    compared = [p.shard for p in found.pairs + found.always_on]
    for p in found.pairs:
        assert p.match == int(cos[p.shard].argmax())
        assert p.mutual == (compared[int(cos[compared, p.match].argmax())] == p.shard)
    assert not all(p.mutual for p in found.pairs)  # random: several of A's share a nearest


def _dense(factors_per_target) -> torch.Tensor:
    """``[N, D]``: directions from their factors, every target's block flattened in turn."""
    blocks = []
    for factors in factors_per_target:
        if len(factors) == 1:
            blocks.append(factors[0])
        else:
            U, V = factors
            blocks.append(torch.einsum("imr,inr->imn", U, V).flatten(1))
    return torch.cat(blocks, 1).double()


def _dense_chance(a, b, candidates, seed, signed=False, redraws=20):
    """span_chance's figure, computed densely from its definition: Gaussian combinations of
    the candidates, each matrix block cut to the candidates' rank by a dense SVD; the 95th
    percentile over the redraws of the best |cosine| of each set of len(candidates)."""
    g = torch.Generator().manual_seed(seed)
    n = len(candidates)
    weights = torch.randn(n * redraws, n, generator=g, dtype=torch.float64)
    blocks = []
    for t in b.sae.factors:
        factors = tuple(f[candidates].double() for f in t.factors("decoder"))
        if len(factors) == 1:
            blocks.append(weights @ factors[0])
            continue
        U, V = factors
        dense = torch.einsum("dj,jmr,jkr->dmk", weights, U, V)  # [draws, m, k]
        left, sv, right_t = torch.linalg.svd(dense, full_matrices=False)
        r = U.shape[-1]
        blocks.append(torch.einsum("dmr,dr,drk->dmk", left[:, :, :r], sv[:, :r],
                                   right_t[:, :r]).flatten(1))
    rows = torch.nn.functional.normalize(_dense([t.factors("decoder") for t in a.sae.factors]),
                                         dim=1)
    dirs = torch.nn.functional.normalize(torch.cat(blocks, 1), dim=1)
    cos = rows @ dirs.T
    best = (cos if signed else cos.abs()).view(len(rows), redraws, n).max(2).values
    return torch.quantile(best, 0.95, dim=1)


@pytest.mark.parametrize("signed", [False, True])
def test_span_chance_is_the_dense_cosine_with_random_shard_shaped_directions(stream, signed):
    """The chance control, checked densely: the 95th percentile over 20 redraws of the
    largest |cosine| (signed cosine for SAEs with non-negative codes, where d and -d are other
    shards) with as many random directions of the candidates' span as candidates, each block
    cut to the SAE's rank. With one candidate there is none (its span is that shard)."""
    a = ShardSet(_moved_sae(stream.targets, 0, 10), {}, {})
    b = ShardSet(_moved_sae(stream.targets, 1, 11), {}, {})
    candidates = [1, 4, 5, 9, 20]
    got = span_chance(a, b, candidates, torch.Generator().manual_seed(3), signed)
    want = _dense_chance(a, b, candidates, 3, signed)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    if signed:
        assert not torch.equal(got, span_chance(a, b, candidates,
                                                torch.Generator().manual_seed(3)))
    assert torch.isnan(span_chance(a, b, [], torch.Generator())).all()
    assert torch.isnan(span_chance(a, b, [4], torch.Generator())).all()  # audit 136 F3


def test_the_chance_control_is_calibrated_on_unrelated_sets(stream):
    """Two sets of random shards share nothing: about 1 pair in 20 may beat its chance (the
    95th percentile). The first control (random directions of the span, dense sums of every
    candidate, best of one set) was beaten by 82% of such pairs, since a low-rank shard's
    cosines have heavier tails than a dense sum's; the second (best of one set of shard-shaped
    directions) by half, a coin flip per pair (audit 136 F2)."""
    density = {"stats.density": torch.full((CFG["n_latents"],), 0.2)}
    shares = []
    for seed in range(8):
        a = ShardSet(_moved_sae(stream.targets, 100 + seed, 200 + seed), {}, density)
        b = ShardSet(_moved_sae(stream.targets, 300 + seed, 400 + seed), {}, density)
        found = compare_shards(a, b)
        shares.append(len(found.above_chance) / len(found.pairs))
    assert 0.01 < sum(shares) / len(shares) < 0.12, shares


def test_rare_untrained_and_always_on_shards_are_left_out_of_the_count(sets, tmp_path):
    a, b, _ = sets
    stats = {k: v.clone() for k, v in a.stats.items()}
    stats["stats.density"][:3] = torch.tensor([0.0, 0.99, 0.005])
    stats["stats.density"][3:] = torch.rand(len(a) - 3, generator=torch.Generator().manual_seed(0)
                                            ).clamp(0.02, 0.5)
    sae = copy.deepcopy(a.sae)  # shard 3 back at its initial direction: fires, never trained
    start = LowRankSAE(sae.targets, sae.cfg)
    with torch.no_grad():
        for mine, first in zip(sae.factors, start.factors):
            for f, f0 in zip(mine.factors("decoder"), first.factors("decoder")):
                f[3] = f0[3]
    edited = ShardSet(sae, a.config, stats)
    kept = edited.initial_cosines()  # [n]
    assert float(kept[3]) > 0.999
    untrained = {i for i in range(len(a)) if kept[i] >= 0.5}  # a few that barely moved
    assert {0, 1, 2} & untrained == set() and len(untrained) <= 6
    found = compare_shards(edited, b)
    assert [p.shard for p in found.always_on] == [1]  # matched apart, never counted
    assert {p.shard for p in found.pairs} == set(range(3, len(a))) - untrained
    assert found.n_rare == 2 and found.n_untrained == len(untrained)
    every = compare_shards(edited, b, min_density=0)  # only the shard that never fired is rare
    assert {p.shard for p in every.pairs} == {2, *range(3, len(a))} - untrained
    assert every.n_rare == 1
    # a saved subset's starts are its original's (its own size and seed would draw others);
    # one saved before subsets recorded the original's size is not judged: NaN, counted moved
    part = ShardSet.load(edited.subset([3, 7, 0]).save(tmp_path / "part"))
    torch.testing.assert_close(part.initial_cosines(), kept[[3, 7, 0]])
    assert torch.equal(part.subset([0]).initial_cosines(), part.initial_cosines()[:1])
    del part.meta["subset_of"]["n_latents"]
    assert part.initial_cosines().isnan().all()
    bare = compare_shards(ShardSet(a.sae, a.config, {}), b)  # saved without statistics
    # every shard of the unedited set that trained (shard 3 did there)
    assert len(bare.pairs) == len(a) - len(untrained - {3}) and bare.always_on == []
    assert bare.n_rare == 0
    for bad in ({"threshold": 0}, {"threshold": float("nan")}, {"min_density": 0.9},
                {"min_density": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            compare_shards(a, b, **bad)


def test_two_runs_of_one_sae_seed_are_named(sets, tmp_path):
    a, b, _ = sets
    same = ShardSet(b.sae, {"meta": {"run_dir": "another"}}, b.stats)
    twin = LowRankSAE(a.sae.targets, SAEConfig(**CFG, seed=1))
    assert compare_shards(ShardSet(twin, {"meta": {"run_dir": "x"}}, {}), same).same_init
    assert not compare_shards(a, b).same_init
    # audit 122: two runs' shards saved side by side in one folder are still two runs (their
    # run_id), and two checkpoints of one run are one, wherever they are kept
    one, other = ({"meta": {"run_id": r, "run_dir": "x"}} for r in ("run-1", "run-2"))
    first = ShardSet(b.sae, one, b.stats).save(tmp_path / "kept" / "first")
    second = ShardSet(b.sae, other, b.stats).save(tmp_path / "kept" / "second")
    assert ShardSet.load(first).same_initialisation(ShardSet.load(second))
    again = ShardSet(b.sae, one, b.stats).save(tmp_path / "elsewhere")
    assert not ShardSet.load(first).same_initialisation(ShardSet.load(again))


def test_non_negative_codes_match_by_the_signed_cosine(sets):
    """An SAE whose codes are relu'd (``topk``) gives shard d and shard -d to opposite updates:
    matched by |cosine|, -d would replicate d."""
    a = sets[0]
    sae = copy.deepcopy(a.sae)
    sae.cfg = dataclasses.replace(sae.cfg, sparsity="topk")  # its codes read as non-negative
    flipped = copy.deepcopy(sae)
    with torch.no_grad():  # every decoder direction negated: U -> -U (V kept), d -> -d
        for tf in flipped.factors:
            tf.factors("decoder")[0].neg_()
    mine, negated = ShardSet(sae, {}, a.stats), ShardSet(flipped, {}, a.stats)
    itself = compare_shards(mine, mine)
    assert itself.signed and len(itself.replicated) == len(itself.pairs) >= 10
    found = compare_shards(mine, negated)  # no shard matches its own negative
    assert found.signed and len(found.pairs) == len(itself.pairs)
    assert all(p.match != p.shard and p.cosine < 0.9 for p in found.pairs)
    assert len(found.replicated) <= len(found.pairs) // 3  # only near-duplicate latents
    unsigned = compare_shards(a, ShardSet(flipped, {}, a.stats))  # a's codes keep their sign
    assert not unsigned.signed
    assert all(p.match == p.shard and p.cosine < -0.999 for p in unsigned.pairs)


def test_compare_from_the_command_line(short_run_dir, sets, tmp_path, capsys):
    """Two SAEs' checkpoint directories (the planted sets, saved): the printout and the JSON
    say the same; bad paths, bad numbers and a --out that would overwrite a run's file are
    refused, naming them; a --out that cannot be written keeps the printout. A run against a
    copy of itself reads each run's checkpoint and its initial model's record."""
    a, b = (s.save(tmp_path / name) for s, name in zip(sets, ("a", "b")))
    out = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--out", str(out), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["replicated"] >= 10 and saved["replicated_mutual"] >= 10
    assert (f"replicated (|cos| >= 0.7 and above chance): {saved['replicated']} of the "
            f"{saved['compared']} compared shards of A ({saved['replicated_mutual']} of them "
            "mutual nearest)") in printed
    top = saved["pairs"][0]
    assert f"  {top['shard']:5d}" in printed and f"{top['cosine']:+7.3f}  {top['chance']:7.3f}" \
        in printed
    assert f"... {saved['compared'] - 3} more pairs" in printed
    assert saved["other_initial_models"] is None  # saved sets: no run's record
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0  # an earlier comparison
    assert main(["compare", str(a), str(a), "--top", "1"]) == 0
    assert "note: A and B are the same checkpoint" in capsys.readouterr().out
    run, copy_ = short_run_dir, tmp_path / "copy"
    shutil.copytree(run, copy_)
    (tmp_path / "a_file").write_text("x")
    for args, why in (
            ([str(tmp_path / "nowhere"), str(copy_)], "is neither a run directory"),
            ([str(run), str(copy_), "--checkpoint-b", "step_000099"], "step_000099"),
            ([str(a), str(b), "--out", str(copy_ / "config.json")],
             "is not an earlier comparison; nothing was overwritten"),
            ([str(a), str(b), "--out", str(tmp_path / "cmp.txt")], "is not a .json file's path"),
            ([str(a), str(b), "--out", str(tmp_path / "a_file" / "c.json")],
             "a_file is a file, not a directory"),
            ([str(run), str(a)], "cover other targets or shapes (layers.0.mlp.down_proj."
                                 "weight: absent against [64, 48];")):
        before = (copy_ / "config.json").read_bytes()
        assert main(["compare", *args]) == 2
        err = capsys.readouterr().err
        assert why in err and "cosine_matrix:" not in err  # audit 134: the function's name
        assert (copy_ / "config.json").read_bytes() == before
    for flag, value, why in (("--threshold", "1.5", "1.5: a |cosine| in (0, 1]"),
                             ("--threshold", "abc", "'abc' is not a number"),
                             ("--min-density", "0.9", "0.9: a share of samples")):
        with pytest.raises(SystemExit) as stopped:  # argparse: before any checkpoint is read
            main(["compare", str(a), str(b), flag, value])
        assert stopped.value.code == 2
        assert f"argument {flag}: {why}" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--out", "/proc/cmp.json"]) == 2
    said = capsys.readouterr()
    assert "replicated" in said.out and "was not written to /proc/cmp.json" in said.err
    assert main(["compare", str(run), str(copy_), "--out", str(out)]) == 0
    itself = json.loads(out.read_text())
    assert itself["other_initial_models"] is False  # one run: its own initial model
    assert all(p["shard"] == p["match"] and abs(p["cosine"]) > 0.999
               for p in itself["pairs"] + itself["always_on"])
    n = len(ShardSet.from_run(run))
    assert (itself["compared"] + len(itself["always_on"]) + itself["left_out_rare"]
            + itself["left_out_untrained"]) == n
    config = json.loads((copy_ / "config.json").read_text())
    config["model"]["fingerprint"] = {"model.safetensors": "another model"}
    (copy_ / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["compare", str(run), str(copy_)]) == 0
    assert "note: A's and B's runs started from other initial weights" in capsys.readouterr().out
    final = copy_ / "checkpoints" / "final"
    assert load_shards(final).path == load_shards(copy_).path
    with pytest.raises(ValueError, match="is a checkpoint directory itself"):
        load_shards(final, "final")
    assert comparison_path_refusal(out) is None
    inside = final / "cmp.json"  # a run's own checkpoint: its resume prunes it (audit 147 F9)
    assert comparison_path_refusal(inside).startswith(
        f"--out {inside} is in checkpoints/ of the run in {copy_.resolve()}")


def test_a_saved_subset_is_listed_with_its_original_indices(sets, tmp_path, capsys):
    """A subset of chosen shards, saved and compared with its whole SAE: each shard is found
    again as the original it was chosen as, and the printout and JSON map the subset's own
    indices to those."""
    a = sets[0]
    picked = [p.shard for p in compare_shards(a, sets[1]).replicated[:3]][::-1]
    whole = a.save(tmp_path / "whole")
    sub = ShardSet.load(whole).subset(picked).save(tmp_path / "sub")
    out = tmp_path / "sub.json"
    assert main(["compare", str(sub), str(whole), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    mapping = ", ".join(f"{i}->{j}" for i, j in enumerate(picked))
    assert f"note: A holds shards chosen from {whole}, listed by their indices here; " \
           f"there they are {mapping}" in printed
    saved = json.loads(out.read_text())
    assert saved["subset_of"] == {"a": {"path": str(whole), "indices": picked}}
    assert {p["shard"]: p["match"] for p in saved["pairs"]} == dict(enumerate(picked))
    assert main(["compare", str(whole), str(sub)]) == 0
    assert "note: B holds shards chosen from" in capsys.readouterr().out


def _moved_sae(targets, seed, decoder_seed, n=24):
    """An SAE of ``seed`` whose decoder is that of a fresh SAE of ``decoder_seed`` (so every
    shard left its initial direction)."""
    from sae_shards.core.sae import LowRankSAE
    from sae_shards.core.sae_config import SAEConfig

    cfg = dict(n_latents=n, k=3, lr=3e-3)
    sae = LowRankSAE(targets, SAEConfig(**cfg, seed=seed))
    other = LowRankSAE(targets, SAEConfig(**cfg, seed=decoder_seed))
    with torch.no_grad():
        for mine, theirs in zip(sae.factors, other.factors):
            for f, g in zip(mine.factors("decoder"), theirs.factors("decoder")):
                f.copy_(g)
    return sae


def test_compare_counts_figures_by_abs_cosine_and_a_negated_start_as_untrained():
    """compare_shards on two sets of moved random shards: the summary's median |cos| is the
    median of the pairs' |cosine| (signed codes: a shard and its negative are one), and a shard
    sitting on the negative of its initial direction never left it (initial |cos| = 1)."""
    import statistics

    from sae_shards.analysis.compare import compare_shards
    from sae_shards.analysis.shards import ShardSet
    from sae_shards.core.sae import LowRankSAE
    from sae_shards.core.synthetic import PlantedConfig, PlantedStream

    targets = PlantedStream(PlantedConfig(n_directions=12, noise_frac=0.2, seed=0)).targets
    a_sae, b_sae = _moved_sae(targets, 0, 10), _moved_sae(targets, 1, 11)
    start = LowRankSAE(targets, a_sae.cfg)
    with torch.no_grad():  # shard 0 of A: its initial direction, negated
        for mine, first in zip(a_sae.factors, start.factors):
            mine.factors("decoder")[0][0] = -first.factors("decoder")[0][0]
            for f, f0 in zip(mine.factors("decoder")[1:], first.factors("decoder")[1:]):
                f[0] = f0[0]
    stats = {"stats.density": torch.full((24,), 0.2)}
    a, b = ShardSet(a_sae, {}, stats), ShardSet(b_sae, {}, stats)
    assert float(a.initial_cosines()[0]) > 0.999
    found = compare_shards(a, b)
    assert not found.signed
    assert 0 not in {p.shard for p in found.pairs} and found.n_untrained >= 1
    cosines = [p.cosine for p in found.pairs]
    assert any(c < 0 for c in cosines) and any(c > 0 for c in cosines)
    assert found.to_dict()["median_abs_cosine"] == pytest.approx(
        statistics.median(abs(c) for c in cosines))
    low = compare_shards(a, b, threshold=0.01)  # every pair passes the threshold...
    beaten = [p for p in low.pairs if abs(p.cosine) <= p.chance]
    assert beaten  # ...and some do not beat their chance control: not replicated
    assert [p.shard for p in low.replicated] == [p.shard for p in low.pairs
                                                 if abs(p.cosine) > p.chance]
    assert low.to_dict()["replicated"] == len(low.pairs) - len(beaten)


def test_compare_chance_spans_only_bs_shards_that_fired():
    """The chance control is random directions in the span of B's *trained* shards: moved away
    from their start and fired at least once; a B shard that never fired adds nothing to it."""
    from sae_shards.analysis.compare import CHANCE_SEED, compare_shards, span_chance
    from sae_shards.analysis.shards import ShardSet
    from sae_shards.core.synthetic import PlantedConfig, PlantedStream

    targets = PlantedStream(PlantedConfig(n_directions=12, noise_frac=0.2, seed=0)).targets
    a = ShardSet(_moved_sae(targets, 0, 10), {}, {"stats.density": torch.full((24,), 0.2)})
    density_b = torch.full((24,), 0.2)
    density_b[::2] = 0.0  # half of B's shards never fired
    b = ShardSet(_moved_sae(targets, 1, 11), {}, {"stats.density": density_b})
    found = compare_shards(a, b)
    fired = list(range(1, 24, 2))
    want = span_chance(a, b, fired, torch.Generator().manual_seed(CHANCE_SEED))
    assert found.pairs and all(p.chance == pytest.approx(float(want[p.shard]))
                               for p in found.pairs)
    assert all(p.match in fired for p in found.pairs) and found.n_trained_b == len(fired)


def test_an_untrained_shard_of_b_is_no_candidate(stream, sets):
    """Audit 134 F2: each shard of A was matched among all of B's shards, untrained ones too
    (their random starts: directions of the whole space, not of the span the chance is drawn
    in), so two runs that share nothing had 19 of 23 shards 'above chance', 9 of them on an
    untrained shard of B. Matches are now among B's trained shards, against as many random
    directions of their span. Here B (random directions, a broken pipeline) has half its
    shards put back on their initial directions: none is matched, and few of A's
    beat chance (1 in 20 on average over unrelated sets: the calibration test)."""
    a, _, noise = sets
    start = LowRankSAE(noise.sae.targets, noise.sae.cfg)  # B's initial directions
    sae = copy.deepcopy(noise.sae)
    reset = list(range(0, len(noise), 2))
    with torch.no_grad():
        for mine, first in zip(sae.factors, start.factors):
            for f, f0 in zip(mine.factors("decoder"), first.factors("decoder")):
                f[reset] = f0[reset]
    b = ShardSet(sae, noise.config, {**noise.stats, "stats.density": torch.full((len(noise),),
                                                                              0.2)})
    found = compare_shards(a, b)
    assert found.n_trained_b == len(noise) - len(reset)
    assert found.pairs and not {p.match for p in found.pairs} & set(reset)
    assert len(found.above_chance) <= len(found.pairs) // 4  # 1 in 20, by chance
    lines = comparison_lines(found, a, b)
    assert lines[1].endswith(f"({len(b)} shards, {len(b) - len(reset)} of them trained: the "
                             "candidates)")
    assert lines[3].startswith(f"above chance, at any |cos|: {len(found.above_chance)} (about "
                               f"{0.05 * len(found.pairs):.0f} where A and B share nothing)")
    one = ShardSet(sae, noise.config, {"stats.density": torch.tensor(
        [0.2 if i == 1 else 0.0 for i in range(len(noise))])})  # one trained shard of B
    alone = compare_shards(a, one)
    assert alone.n_trained_b == 1 and all(p.match == 1 for p in alone.pairs)
    assert all(p.chance != p.chance for p in alone.pairs)  # NaN: no control (audit 136 F3)
    assert "note: B has one trained shard, so there is no chance control" in "\n".join(
        comparison_lines(alone, a, one))
    bare = ShardSet(start, noise.config, b.stats)  # B not trained at all: nothing to match
    lines = comparison_lines(compare_shards(a, bare), a, bare)
    assert lines[2].startswith("no shard of B trained (all 24 never fired or never left")
    assert not any("nan" in line for line in lines)


def test_compare_hands_each_side_its_checkpoint_and_the_figures_asked_for(short_run_dir, sets,
                                                                          tmp_path, capsys):
    """Audit 129: --threshold and --min-density reach the comparison, --top 0 lists every pair
    (a mutant listing none, or refusing 0, went unseen), and --checkpoint-a is read from A and
    --checkpoint-b from B."""
    a, b = (s.save(tmp_path / name) for s, name in zip(sets, ("a", "b")))
    out = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--threshold", "0.5", "--min-density", "0.02",
                 "--top", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert (saved["threshold"], saved["min_density"]) == (0.5, 0.02)
    assert len(saved["pairs"]) > 3 and "more pairs" not in printed
    assert all(f"  {pair['shard']:5d}" in printed for pair in saved["pairs"])
    copy_ = tmp_path / "copy"
    shutil.copytree(short_run_dir, copy_)
    assert (copy_ / "checkpoints" / "step_000012").is_dir()  # its last step's, beside final
    assert main(["compare", str(short_run_dir), str(copy_), "--checkpoint-a", "final",
                 "--checkpoint-b", "12", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["a"] == str(short_run_dir / "checkpoints" / "final")
    assert saved["b"] == str(copy_ / "checkpoints" / "step_000012")


def test_a_side_with_no_shard_to_compare_is_told_so_not_given_nan(stream, sets):
    """An early checkpoint, whose shards never left their initial directions or rarely
    fired, has no shard to compare: the printout gave median |cos| nan and an empty table
    (audit 131 F1); it now says why and what to compare instead."""
    a, b, _ = sets
    early = ShardSet(LowRankSAE(stream.targets, SAEConfig(**CFG, seed=1)), a.config,
                     {**a.stats, "stats.density": torch.full((len(a),), 0.3)})
    found = compare_shards(early, b)
    assert not found.pairs and not found.always_on and found.n_untrained == len(a)
    lines = comparison_lines(found, early, b)
    assert lines[2] == (f"no shard of A was compared: all {len(a)} are left out above (an SAE "
                        "early in its training has few trained shards): compare a later "
                        "checkpoint")
    assert lines[-1].startswith("note: A's and B's SAEs started from one")  # notes still said
    assert not any("nan" in line for line in lines)
    rare = {**a.stats, "stats.density": torch.full((len(a),), 0.001)}
    lines = comparison_lines(compare_shards(ShardSet(a.sae, a.config, rare), b),
                             ShardSet(a.sae, a.config, rare), b)
    assert lines[2].endswith("compare a later checkpoint, or lower --min-density")
