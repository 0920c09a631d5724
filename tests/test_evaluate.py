"""`sae-shards evaluate` on a short real multiskill run: figures present, and a broken SAE scores
worse than the trained one."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from sae_shards.core.checkpoint import load_checkpoint, save_checkpoint
from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.planted.evaluate import evaluate_run
from sae_shards.run.job import run_job


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "task=multiskill", "rl.max_steps=80", "rl.learning_rate=5e-4", "capture.source=precond",
            "runner.heldout_every=4", "runner.save_samples=true", "runner.sae_steps_per_rl_step=2",
            "sae.n_latents=16", "logging=disabled"]))
    run_job(cfg, out)
    return out


def test_evaluate_reports_every_figure(planted_run):
    r = evaluate_run(planted_run, n_null=3, n_prompts=4)
    assert r["tasks"] == ["A", "B", "C", "D"] and r["n_heldout"] >= 15
    for key in ("mmcs", "mmcs_null", "mmcs_supervised", "mmcs_supervised_null", "auroc_task",
                "auroc_null", "supervised_auroc", "fvu_heldout", "l0"):
        assert r[key] == r[key], key  # not NaN
    assert 0 <= r["mmcs_null"] <= 1 and 0 <= r["auroc_task"] <= 1
    assert set(r["per_task"]) == {"A", "B", "C", "D"}
    on_disk = json.loads((planted_run / "evaluation.json").read_text())
    assert on_disk["mmcs"] == r["mmcs"]
    assert "| mmcs |" in (planted_run / "evaluation.md").read_text()
    st = r["steering"]
    assert set(st["per_task"]) == {"A", "B", "C", "D"}
    for e in st["per_task"].values():
        assert set(e["shard_plus"]) == {"A", "B", "C", "D"} and e["coefficient"] == e["coefficient"]
    assert "mean selectivity" in (planted_run / "evaluation.md").read_text()


def test_random_decoder_scores_lower(planted_run, tmp_path):
    trained = evaluate_run(planted_run, n_null=3, steering=False)
    broken = tmp_path / "broken"
    shutil.copytree(planted_run, broken)
    loaded = load_checkpoint(broken / "checkpoints" / "final")
    with torch.no_grad():  # random decoder and encoder: a pipeline that learnt nothing
        g = torch.Generator().manual_seed(0)
        for p in loaded.sae.factors.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        loaded.sae.normalize_decoder_()
    save_checkpoint(broken / "checkpoints" / "final", loaded.sae, loaded.stats, loaded.config["meta"])
    r = evaluate_run(broken, n_null=3, steering=False)
    # random directions in ~80k dimensions have |cos| ~ 1/sqrt(D) with anything: near zero
    assert r["mmcs"] < 0.05 and r["mmcs"] < trained["mmcs"] / 3, (r["mmcs"], trained["mmcs"])
    assert r["fvu_heldout"] > trained["fvu_heldout"]
    # the supervised reference does not depend on the SAE: the same ground truth, the same figure
    assert (r["mmcs_supervised"], r["mmcs_supervised_null"]) == \
        (trained["mmcs_supervised"], trained["mmcs_supervised_null"])
    assert 0 < r["mmcs_supervised"] <= 1


def test_evaluate_cli_needs_saved_samples(short_run_dir):
    proc = subprocess.run([sys.executable, "-m", "sae_shards.cli", "evaluate", str(short_run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "samples.safetensors: missing; run the job with runner.save_samples=true" in proc.stderr


def test_from_step_restricts_the_window(planted_run):
    full = evaluate_run(planted_run, n_null=2, steering=False)
    late = evaluate_run(planted_run, n_null=2, steering=False, from_step=11)
    assert late["from_step"] == 11
    assert late["n_train"] + late["n_heldout"] <= 70  # steps 11..80 only
    assert full["n_train"] + full["n_heldout"] > 70
    with pytest.raises(Exception, match="fewer than 2 non-zero"):
        evaluate_run(planted_run, n_null=2, steering=False, from_step=78)


def test_samples_without_task_labels_get_a_clear_error(planted_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sae_shards.core.checkpoint import CheckpointError

    broken = tmp_path / "no_labels"
    shutil.copytree(planted_run, broken)
    samples = broken / "samples.safetensors"
    with safe_open(samples, "pt") as f:
        header = {k: v for k, v in f.metadata().items() if k != "task_labels"}
    save_file(load_file(samples), samples, metadata=header)
    with pytest.raises(CheckpointError, match=r"samples\.safetensors: no task_labels in the header"):
        evaluate_run(broken, n_null=2, steering=False)
