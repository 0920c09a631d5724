"""A reduced planted experiment on per-event samples (real GRPO on multiskill, ``mixed`` steps:
every step holds a prompt group of every task, so a per-step sample has no single task): the
SAE's shards predict the held-out events' tasks above the shuffled-label null, and two broken
pipelines fail the same threshold: a random decoder, and event labels shuffled before
evaluation. (A capture that drops prompt positions is caught earlier, by the exactness test in
tests/test_event_capture.py: it no longer sums to the step's gradient.)

The reduced run trains the whole policy at the v1 learning rate with 4 prompt groups per step
(one per task), 300 steps (~1 minute); the benchmark's body-only build is slower to learn
(docs/results.md)."""


import pytest
from hydra import compose, initialize_config_dir

from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.planted.benchmark import run_planted
from sae_shards.planted.evaluate import evaluate_run

from helpers import random_decoder_copy, shuffled_labels_copy

# Measured at these settings (seed 0): auroc_task 0.913 vs its shuffled-label null 0.445
# (supervised 0.942); re-measured 2026-12-01 (fourth session): 0.950 vs 0.456, shard families
# 0.997 vs 0.590; random decoder 0.666 / 0.666 (nulls 0.48 / 0.52); shuffled labels 0.487 /
# 0.482. The thresholds keep under half the margin. Shuffled labels sit at the null; a random
# decoder does not (random projections of per-event samples separate the tasks somewhat: +0.17
# over its null in audit 146), so it is caught by the 0.75 bar and by the trained run's lead over
# it (0.949 vs 0.666, families 0.981, in audit 146), which must be at least MIN_MARGIN.
# (120 steps at batch 32 gave 0.58 vs 0.50: too early for the policy to be tag-conditioned.)
MIN_AUROC, MIN_MARGIN = 0.75, 0.15
pytestmark = pytest.mark.slow  # a 300-step run (~60 s): `python -m pytest -q -m slow`, and CI


def _passes(r):
    return r["auroc_task"] >= MIN_AUROC and r["auroc_task"] - r["auroc_null"] >= MIN_MARGIN


def _families_pass(r):
    """The same thresholds for shard families (latents grouped by co-activation, no labels)."""
    f = r["families"]
    return f["auroc_task"] >= MIN_AUROC and f["auroc_task"] - f["auroc_null"] >= MIN_MARGIN


@pytest.fixture(scope="module")
def event_run(tmp_path_factory):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "experiment=planted", "rl.max_steps=300", "seed=0",
            "rl.trainable=null", "model.readout_scale=1.0", "rl.learning_rate=5e-4",
            "rl.per_device_train_batch_size=32", "task.n_prompts=2048", "capture.capacity=800",
            "runner.heldout_every=4", "runner.sae_start_step=0", "runner.sae_steps_per_rl_step=2"]))
    dirs = run_planted(cfg, tmp_path_factory.mktemp("planted_events"), captures=("body-event",))
    return dirs["body-event"]


@pytest.fixture(scope="module")
def evaluated(event_run):
    return evaluate_run(event_run, steering=False)


def test_event_shards_beat_the_null(evaluated):
    r = evaluated
    assert r["sample_unit"] == "event" and r["headline"]["schedule"] == "mixed"
    assert _passes(r), {k: r[k] for k in ("auroc_task", "auroc_null", "mmcs", "mmcs_null")}
    assert _families_pass(r), r["families"]


def test_random_decoder_fails(event_run, evaluated, tmp_path):
    broken = evaluate_run(random_decoder_copy(event_run, tmp_path / "random_decoder"),
                          steering=False)
    assert not _passes(broken) and not _families_pass(broken), broken["families"]
    # the SAE, not random projections of the samples, earns the AUROC
    assert evaluated["auroc_task"] - broken["auroc_task"] >= MIN_MARGIN
    assert (evaluated["families"]["auroc_task"] - broken["families"]["auroc_task"]
            >= MIN_MARGIN)


def test_shuffled_event_labels_fail(event_run, tmp_path):
    broken = evaluate_run(shuffled_labels_copy(event_run, tmp_path / "shuffled"), steering=False)
    assert not _passes(broken) and not _families_pass(broken), broken["families"]
