"""``sae-shards compare``: each shard of one SAE matched to its nearest in another, beside a
chance control. Two SAEs trained on one planted stream under other seeds find the same
directions; an SAE trained on noise (a broken pipeline) matches nothing above chance."""

import json
import shutil

import pytest
import torch

from sae_shards.analysis.compare import (chance_control, compare_shards,
                                         comparison_path_refusal, load_shards)
from sae_shards.analysis.shards import ShardSet
from sae_shards.cli import main
from sae_shards.core.metrics import match_directions
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.synthetic import PlantedConfig, PlantedStream
from sae_shards.core.trainer import SAETrainer


@pytest.fixture(scope="module")
def stream():
    return PlantedStream(PlantedConfig(n_directions=12, noise_frac=0.2, seed=0))


def _trained(stream, seed: int, noise: bool = False, steps: int = 300) -> ShardSet:
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=24, k=3, lr=3e-3, seed=seed))
    trainer = SAETrainer(sae)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        trainer.step(stream.noise_only(64, g) if noise else stream.sample(64, g).sample)
    return ShardSet(sae, {"meta": {"run_dir": f"run{seed}{'-noise' * noise}"}},
                    trainer.stats.as_tensors())


@pytest.fixture(scope="module")
def sets(stream):
    return _trained(stream, 0), _trained(stream, 1), _trained(stream, 1, noise=True)


def test_two_seeds_find_the_same_planted_shards_and_noise_finds_none(stream, sets):
    a, b, noise = sets
    found = compare_shards(a, b)
    # the control: random directions of B's structure reach nowhere near a match
    assert found.chance_max < 0.2, found.chance
    planted = match_directions(a.sae, stream.directions)  # A's latent for each planted one
    replicated = {p.shard for p in found.replicated}
    recovered = [int(i) for i, c in zip(planted.best_latent, planted.max_abs_cos) if c >= 0.95]
    assert len(recovered) >= 10, planted.max_abs_cos
    assert set(recovered) <= replicated  # every recovered planted direction is found again
    pairs = {p.shard: p for p in found.pairs}
    assert all(abs(pairs[i].cosine) >= 0.95 for i in recovered)
    assert [abs(p.cosine) for p in found.pairs] == sorted((abs(p.cosine) for p in found.pairs),
                                                          reverse=True)
    assert not found.same_init  # other seeds
    broken = compare_shards(a, noise)  # B trained on noise alone: a broken pipeline
    assert broken.replicated == []
    assert broken.to_dict()["median_abs_cosine"] < 0.15


def test_rare_and_always_on_shards_are_left_out_of_the_count(sets):
    a, b, _ = sets
    stats = {k: v.clone() for k, v in a.stats.items()}
    stats["stats.density"][:3] = torch.tensor([0.0, 0.99, 0.005])
    stats["stats.density"][3:] = torch.rand(len(a) - 3, generator=torch.Generator().manual_seed(0)
                                            ).clamp(0.02, 0.5)
    edited = ShardSet(a.sae, a.config, stats)
    found = compare_shards(edited, b)
    assert [p.shard for p in found.always_on] == [1]  # matched apart, never counted
    assert {p.shard for p in found.pairs} == set(range(3, len(a)))
    assert found.n_rare == 2 and len(found.chance) == len(found.pairs)
    every = compare_shards(edited, b, min_density=0)  # only the shard that never fired is out
    assert {p.shard for p in every.pairs} == {2, *range(3, len(a))} and every.n_rare == 1
    bare = compare_shards(ShardSet(a.sae, a.config, {}), b)  # saved without statistics
    assert len(bare.pairs) == len(a) and bare.always_on == [] and bare.n_rare == 0
    for bad in ({"threshold": 0}, {"threshold": float("nan")}, {"min_density": 0.9},
                {"min_density": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            compare_shards(a, b, **bad)


def test_the_chance_control_is_an_untrained_sae_of_another_seed(sets):
    a, b, _ = sets
    control = chance_control(b, (0, 1))
    assert control.sae.cfg.seed == 2 and control.sae.targets == b.sae.targets
    assert chance_control(b, (1, 1)).sae.cfg.seed == 0
    fresh = LowRankSAE(b.sae.targets, SAEConfig(n_latents=24, k=3, lr=3e-3, seed=2))
    assert torch.equal(control.sae.factors[0].U, fresh.factors[0].U)  # untrained


def test_two_runs_of_one_sae_seed_are_named(sets):
    a, b, _ = sets
    same = ShardSet(b.sae, {"meta": {"run_dir": "another"}}, b.stats)
    twin = LowRankSAE(a.sae.targets, SAEConfig(n_latents=24, k=3, lr=3e-3, seed=1))
    assert compare_shards(ShardSet(twin, {"meta": {"run_dir": "x"}}, {}), same).same_init
    assert not compare_shards(a, b).same_init


def test_compare_two_runs_from_the_command_line(short_run_dir, sets, tmp_path, capsys):
    """A run against a copy of itself: every shard that fired finds itself at |cos| 1; the JSON
    holds the same figures; bad paths and a --out that would overwrite a run's file are
    refused, naming them."""
    copy = tmp_path / "copy"
    shutil.copytree(short_run_dir, copy)
    out = tmp_path / "cmp.json"
    assert main(["compare", str(short_run_dir), str(copy), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["compared"] >= 1 and saved["replicated"] == saved["compared"]
    assert all(p["shard"] == p["match"] and abs(p["cosine"]) > 0.999 for p in saved["pairs"])
    assert (f"replicated (|cos| >= 0.7): {saved['compared']} of the {saved['compared']} other "
            "shards of A") in printed
    assert saved["other_initial_models"] is False  # one run: its own initial model
    assert main(["compare", str(short_run_dir), str(copy), "--out", str(out)]) == 0  # again
    for args, why in (
            ([str(tmp_path / "nowhere"), str(copy)], "is neither a run directory"),
            ([str(short_run_dir), str(copy), "--checkpoint-b", "step_000099"], "step_000099"),
            ([str(short_run_dir), str(copy), "--out", str(copy / "config.json")],
             "is not an earlier comparison; nothing was overwritten"),
            ([str(short_run_dir), str(copy), "--out", str(tmp_path / "cmp.txt")],
             "is not a .json file's path"),
            ([str(short_run_dir), str(sets[0].save(tmp_path / "synthetic"))],
             "cover other targets or shapes")):
        before = (copy / "config.json").read_bytes()
        assert main(["compare", *args]) == 2
        assert why in capsys.readouterr().err
        assert (copy / "config.json").read_bytes() == before
    config = json.loads((copy / "config.json").read_text())
    config["model"]["fingerprint"] = {"model.safetensors": "another model"}
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(short_run_dir), str(copy), "--top", "1"]) == 0
    printed = capsys.readouterr().out
    assert "note: A's and B's runs started from other initial weights" in printed
    # the header, 1 pair, the always-on ones, "... more pairs"
    assert printed.count("\n  ") == 3 + len(saved["always_on"])
    final = copy / "checkpoints" / "final"
    assert load_shards(final).path == load_shards(copy).path
    with pytest.raises(ValueError, match="is a checkpoint directory itself"):
        load_shards(final, "final")
    assert comparison_path_refusal(out) is None
