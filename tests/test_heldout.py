"""Held-out steps: never trained on, kept for evaluation, saved with their labels."""

import json

import torch
from safetensors import safe_open

from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.core.targets import make_targets


def test_heldout_slots_are_never_sampled():
    buf = DeltaRingBuffer(make_targets({"w": (2, 3)}), capacity=8, device="cpu")
    for step in range(1, 9):
        buf.push({"w": torch.full((2, 3), float(step))}, StepMeta(step, heldout=step % 3 == 0))
    assert len(buf) == 8 and buf.n_trainable == 6
    drawn = buf.sample(400, torch.Generator().manual_seed(0))
    values = set(drawn.batch["w"][:, 0, 0].tolist())
    assert values == {1.0, 2.0, 4.0, 5.0, 7.0, 8.0}  # 3 and 6 held out


def test_job_holds_out_and_saves_samples(tmp_path):
    from hydra import compose, initialize_config_dir

    from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
    from sae_shards.run.job import run_job

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "rl.max_steps=12", "runner.min_samples=4", "runner.sae_steps_per_rl_step=2",
            "task.n_prompts=64", "logging=disabled", "runner.heldout_every=3",
            "runner.save_samples=true"]))
    summary = run_job(cfg, tmp_path)
    # trainable steps 1,2,4,5 reach min_samples=4 at step 5; every push from then on (5..12,
    # held-out ones included) runs 2 SAE steps on trainable slots only
    assert summary["sae_steps"] == 8 * 2
    assert summary["heldout_samples"] == 4 and 0 < summary["fvu_heldout"] < 10
    with safe_open(tmp_path / "samples.safetensors", "pt") as f:
        assert f.get_tensor("rl_step").tolist() == list(range(1, 13))
        assert f.get_tensor("heldout").tolist() == [s % 3 == 0 for s in range(1, 13)]
        assert json.loads(f.metadata()["task_labels"])[0] == ["letters"]
        w = f.get_tensor("sample.model.layers.0.self_attn.q_proj.weight")
        assert w.shape == (12, 64, 64) and w.abs().sum() > 0
