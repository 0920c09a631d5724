"""A committed checkpoint (format version 1) still loads, with exactly the values it was saved with.

``tests/data/checkpoint_v1/`` is a known-good checkpoint directory written once by
``save_checkpoint``. If a change to the checkpoint format, the SAE's parameter names or shapes, or
the SAE config breaks reading checkpoints that users already have, these tests fail. Never
regenerate the fixture to make them pass: add a migration path to the loader instead (a new
format version gets a new fixture next to this one).

How the fixture was made (from the repo root, sae-shards at format version 1)::

    import torch
    from sae_shards.core.checkpoint import save_checkpoint
    from sae_shards.core.sae import LowRankSAE
    from sae_shards.core.sae_config import SAEConfig
    from sae_shards.core.targets import TargetSpec

    targets = [TargetSpec("model.layers.0.mlp.down_proj.weight", (6, 4), 2),
               TargetSpec("model.norm.weight", (5,))]
    sae = LowRankSAE(targets, SAEConfig(n_latents=3, rank=2, k=1, sparsity="batch_topk", seed=7))
    with torch.no_grad():  # decoder/encoder: the seeded initialisation; the rest: exact values
        sae.b_enc.copy_(torch.tensor([0.5, -0.25, 0.125]))
        sae.b_dec[0].copy_(torch.arange(24.0).reshape(6, 4) / 64)
        sae.b_dec[1].copy_(-torch.arange(5.0) / 8)
        sae.input_scale.fill_(0.75)
        sae.threshold.fill_(0.375)
    stats = {"stats.density": torch.tensor([0.5, 0.25, 0.0]),
             "stats.mean_abs_act": torch.tensor([1.5, 0.5, 0.0]),
             "stats.last_active_step": torch.tensor([9, 7, -1]),
             "stats.fire_count": torch.tensor([8, 4, 0]),
             "stats.samples_since_fired": torch.tensor([0, 3, 16])}
    meta = {"source": "update", "rl_step": 9, "model_id": "fixture"}
    save_checkpoint("tests/data/checkpoint_v1", sae, stats, meta)
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sae_shards.analysis.shards import ShardSet
from sae_shards.core.checkpoint import load_checkpoint, sae_tensors

FIXTURE = Path(__file__).parent / "data" / "checkpoint_v1"
W, B = "model.layers.0.mlp.down_proj.weight", "model.norm.weight"

SAE_CONFIG = {
    "n_latents": 3, "rank": 2, "k": 1, "sparsity": "batch_topk", "use_b_dec": True, "lr": 1e-3,
    "batch_size": 32, "aux_k": None, "aux_coef": 1 / 32, "dead_after": 4096, "scale_ema": 0.01,
    "threshold_ema": 0.01, "autocast_bf16": False, "encode_chunk_mib": 256, "seed": 7,
}
META = {"source": "update", "rl_step": 9, "model_id": "fixture"}

# {tensor: (shape, sum, sum of x * (1, 2, 3, ...) over the flattened tensor)}, from the fixture.
# The weighted sum catches a transposed or permuted tensor that keeps the plain sum.
CHECKSUMS = {
    f"decoder.{W}.U": ((3, 6, 2), -0.7090790569782257, -4.7402088195085526),
    f"decoder.{W}.V": ((3, 4, 2), -1.8348496593534946, -0.667146235704422),
    f"encoder.{W}.A": ((3, 6, 2), -0.7090790569782257, -4.7402088195085526),
    f"encoder.{W}.B": ((3, 4, 2), -1.8348496593534946, -0.667146235704422),
    f"b_dec.{W}": ((6, 4), 4.3125, 71.875),
    f"decoder.{B}.d": ((3, 5), -0.07291831821203232, 0.8992884457111359),
    f"encoder.{B}.d": ((3, 5), -0.07291831821203232, 0.8992884457111359),
    f"b_dec.{B}": ((5,), -1.25, -5.0),
    "b_enc": ((3,), 0.375, 0.375),
    "input_scale": ((), 0.75, 0.75),
    "threshold": ((), 0.375, 0.375),
}


def _checksum(t: torch.Tensor) -> tuple[float, float]:
    x = t.detach().double().flatten()
    return float(x.sum()), float((x * torch.arange(1, x.numel() + 1, dtype=torch.float64)).sum())


def test_fixture_files_are_the_committed_format_version_1():
    assert sorted(p.name for p in FIXTURE.iterdir()) == ["config.json", "sae.safetensors"]
    config = json.loads((FIXTURE / "config.json").read_text())
    assert config["format"] == "sae-shards" and config["format_version"] == 1
    with safe_open(FIXTURE / "sae.safetensors", "pt") as f:
        assert f.metadata() == {"format": "sae-shards", "format_version": "1"}


def test_load_checkpoint_reads_the_exact_stored_values():
    loaded = load_checkpoint(FIXTURE)
    sae = loaded.sae
    assert loaded.config["sae"] == SAE_CONFIG
    # fields added to SAEConfig later must default, so only the stored ones are compared
    assert {k: getattr(sae.cfg, k) for k in SAE_CONFIG} == SAE_CONFIG
    assert loaded.config["meta"] == META
    assert [(t.name, t.shape, t.rank) for t in sae.targets] == [(W, (6, 4), 2), (B, (5,), 1)]
    assert not sae.training

    tensors = sae_tensors(sae)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: s for k, (s, _, _) in CHECKSUMS.items()}
    for name, (_, total, weighted) in CHECKSUMS.items():
        assert tensors[name].dtype == torch.float32, name
        assert _checksum(tensors[name]) == pytest.approx((total, weighted), rel=1e-6, abs=1e-6), name

    # the values written as exact numbers
    assert torch.equal(sae.b_enc.detach(), torch.tensor([0.5, -0.25, 0.125]))
    assert torch.equal(tensors[f"b_dec.{W}"], torch.arange(24.0).reshape(6, 4) / 64)
    assert torch.equal(tensors[f"b_dec.{B}"], -torch.arange(5.0) / 8)
    assert float(sae.input_scale) == 0.75 and float(sae.threshold) == 0.375

    assert sorted(loaded.stats) == ["stats.density", "stats.fire_count", "stats.last_active_step",
                                    "stats.mean_abs_act", "stats.samples_since_fired"]
    assert torch.equal(loaded.stats["stats.density"], torch.tensor([0.5, 0.25, 0.0]))
    assert torch.equal(loaded.stats["stats.mean_abs_act"], torch.tensor([1.5, 0.5, 0.0]))
    assert torch.equal(loaded.stats["stats.last_active_step"], torch.tensor([9, 7, -1]))
    assert torch.equal(loaded.stats["stats.fire_count"], torch.tensor([8, 4, 0]))
    assert torch.equal(loaded.stats["stats.samples_since_fired"], torch.tensor([0, 3, 16]))


def test_shardset_loads_the_fixture():
    shards = ShardSet.load(FIXTURE)
    assert len(shards) == 3
    assert shards.target_names == [W, B]
    assert shards.meta == META
    # decoder directions were saved unit-norm: the per-target norms of each shard square-sum to 1
    norms = shards.target_norms()
    assert norms.shape == (3, 2)
    assert torch.allclose((norms ** 2).sum(1), torch.ones(3), atol=1e-5)
    assert shards[0].typical_coefficient() == 1.5 * 0.75
    assert shards[1].density == 0.25
    dense = shards[0].dense(scaled=False)
    assert {k: tuple(v.shape) for k, v in dense.items()} == {W: (6, 4), B: (5,)}
    mean = shards.decoder_bias()
    assert torch.equal(mean[B], -torch.arange(5.0) / 8 * 0.75)
