"""A reduced planted experiment (real GRPO on multiskill, body targets, `grad` source): the
trained SAE's shards predict the held-out task above the shuffled-label null, and two broken
pipelines — a random decoder, and labels shuffled before evaluation — fail the same threshold."""

import json
import re
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir

from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.planted.evaluate import evaluate_run
from sae_shards.planted.benchmark import GROUPS, run_planted
from sae_shards.analysis.shards import RunView, load_run_models

from helpers import random_decoder_copy, shuffled_labels_copy

# Measured at these settings (seed 0): auroc_task 0.66 vs null 0.53. The threshold keeps half the
# margin; broken pipelines sit at the null.
MIN_AUROC, MIN_MARGIN = 0.6, 0.07


def _passes(r):
    return r["auroc_task"] >= MIN_AUROC and r["auroc_task"] - r["auroc_null"] >= MIN_MARGIN


@pytest.fixture(scope="module")
def grad_run(tmp_path_factory):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "experiment=planted", "rl.max_steps=120", "seed=0",
            # smaller than the benchmark's settings, to stay well under 3 minutes on 2 cores: the
            # v1 setting (one task per step, per-step samples, the whole policy at lr 5e-4), whose
            # reduced run learns within 120 steps (the v2 body-only build needs hundreds)
            "rl.trainable=null", "model.readout_scale=1.0", "rl.learning_rate=5e-4",
            "task.options.schedule=random", "capture.granularity=step", "capture.normalize=none",
            "capture.precondition=none",
            "rl.per_device_train_batch_size=16", "task.n_prompts=1024", "capture.capacity=120",
            "runner.heldout_every=4", "runner.sae_start_step=0", "runner.sae_steps_per_rl_step=2"]))
    dirs = run_planted(cfg, tmp_path_factory.mktemp("planted"), sources=("grad",), groups=("body",))
    return dirs["body-grad"]


def test_trained_shards_beat_the_null(grad_run):
    r = evaluate_run(grad_run, steering=False)
    assert _passes(r), {k: r[k] for k in ("auroc_task", "auroc_null", "mmcs", "mmcs_null")}


def test_random_decoder_fails(grad_run, tmp_path):
    broken = random_decoder_copy(grad_run, tmp_path / "random_decoder")
    assert not _passes(evaluate_run(broken, steering=False))


def test_shuffled_labels_fail(grad_run, tmp_path):
    broken = shuffled_labels_copy(grad_run, tmp_path / "shuffled")
    assert not _passes(evaluate_run(broken, steering=False))


def test_sub_run_is_a_standard_run_dir(grad_run):
    config = json.loads((grad_run / "config.json").read_text())
    assert config["capture"]["source"] == "grad"
    assert config["capture"]["targets"] == GROUPS["body"]
    view = RunView(grad_run)
    assert sorted(view.rollouts) == list(range(1, 121))
    assert all(len(set(row["tasks"])) == 1 for row in view.rollouts.values())  # one task a step
    summary = json.loads((grad_run / "summary.json").read_text())
    assert summary["captured"] == 120 and summary["sae_steps"] > 0


def test_run_dirs_stay_loadable_when_moved(grad_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(grad_run.parent, moved, symlinks=True)  # links copied as links
    models = load_run_models(moved / grad_run.name)
    assert models is not None  # final_model resolves inside the moved run
    w0, w1 = (dict(m.named_parameters())["model.layers.0.mlp.up_proj.weight"]
              for m in (models.initial, models.final))
    assert not torch.equal(w0, w1)  # the initial and the RL-trained policy


def _planted_job(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return job_config_from_hydra(compose("config", overrides=["experiment=planted",
                                                                  *overrides]))


def test_every_planted_capture_holds_the_same_window_of_rl_steps():
    """A per-event capture's capture.capacity counts events, a per-step one's steps: each
    holds the last capacity // prompt groups per step RL steps (planted: 2400 // 8 = 300, the
    second half of the run), whatever the batch's split into gradient accumulation (audit 125,
    B03 and B05: the whole run's 600 steps, or 150, without a word)."""
    from sae_shards.planted.benchmark import capture_config

    job = _planted_job()
    assert job.capture.granularity == "group" and job.capture.capacity == 2400
    accumulated = _planted_job("rl.per_device_train_batch_size=32",
                               "rl.gradient_accumulation_steps=2")
    for cfg in (job, accumulated):
        assert capture_config(cfg, "body", "event").capture.capacity == 2400  # 300 steps
        assert capture_config(cfg, "body", "grad").capture.capacity == 300
    assert capture_config(job, "body", "event").runner.sae_steps_per_rl_step == \
        capture_config(accumulated, "body", "event").runner.sae_steps_per_rl_step


def test_a_readout_capture_targets_the_readout_and_never_per_event():
    """``readout-<source>`` captures lm_head and the final norm, not the body; per-event
    capture of the readout is refused (TRL's fused LM head bypasses lm_head's hooks; audit
    125, B06 and B07)."""
    from sae_shards.planted.benchmark import capture_config

    job = _planted_job()
    for kind in ("grad", "update"):
        assert capture_config(job, "readout", kind).capture.targets == GROUPS["readout"]
        assert capture_config(job, "body", kind).capture.targets == GROUPS["body"]
    assert GROUPS["readout"] != GROUPS["body"]
    with pytest.raises(ValueError, match="readout-event"):
        capture_config(job, "readout", "event")


def test_null_points_run_only_the_captures_with_an_auroc_to_control():
    from scripts.planted_sweep import null_captures

    both = ("body-event", "body-grad")
    assert null_captures(both, "mixed") == ("body-event",)  # every mixed step holds every task
    assert null_captures(both, "random") == both
    assert null_captures(("body-grad",), "mixed") == ()


def test_the_sweeps_headline_is_the_mean_over_seeds_and_names_a_seed_without_a_figure():
    """``headline.json`` and the report (docs/results.md's tables): the chosen setting's mean
    over seeds, the null control's AUROC from the null task's runs, and a seed whose figure is
    NaN left out of that mean and named, not silently averaged over fewer seeds."""
    from scripts.planted_sweep import _cell, _without, headline

    def row(task, schedule, capture, seed, **figures):
        return {"task": task, "schedule": schedule, "capture": capture, "seed": seed,
                "source": "grad-adam-unit" if capture == "body-event" else "grad", **figures}

    rows = [row("multiskill", "mixed", "body-event", 1, auroc_task=0.9, mmcs_margin=0.10),
            row("multiskill", "mixed", "body-event", 2, auroc_task=0.8, mmcs_margin=0.20),
            row("multiskill", "mixed", "body-event", 3, auroc_task=1.0,
                mmcs_margin=float("nan")),
            row("multiskill", "random", "body-event", 1, auroc_task=0.1, mmcs_margin=0.9),
            row("multiskill", "mixed", "body-grad", 1, auroc_task=0.2, mmcs_margin=0.9),
            row("multiskill_null", "mixed", "body-event", 1, auroc_task=0.5),
            row("multiskill_null", "mixed", "body-event", 2, auroc_task=0.6)]
    head = headline(rows, "mixed", "body-event")
    assert head["auroc_task"] == pytest.approx(0.9)
    assert head["mmcs_margin"] == pytest.approx(0.15)  # seeds 1 and 2
    assert head["auroc_null_control"] == pytest.approx(0.55)
    assert head["seeds"] == [1, 2, 3]
    assert head["seeds_without"]["mmcs_margin"] == [3]
    assert "auroc_task" not in head["seeds_without"]
    assert head["seeds_without"]["auroc_null_control_family"] == [1, 2]
    assert head["auroc_null_control_family"] is None
    # the source as each run's evaluation.json names it, not the capture's short name
    assert (head["granularity"], head["source"], head["group"]) == ("group", "grad-adam-unit",
                                                                     "body")
    assert _without(head, "mmcs_margin") == " (without seed 3)" and _without(head, "auroc_task") == ""
    mixed = rows[:3]
    assert _cell(mixed, "mmcs_margin") == "0.150 ± 0.071 (2 of 3 seeds)"
    assert _cell(mixed, "auroc_task") == "0.900 ± 0.100"


@pytest.mark.parametrize("args, message", [
    (["--seeds", "x"], r"--seeds 'x': give comma-separated integers"),
    (["--captures", "body-bogus"], r"--captures: 'body-bogus' is not <group>-<kind>"),
    (["--schedules", "bogus"], r"--schedules: 'bogus' is not one of \['random', 'blocks', "
                               r"'mixed'\]"),
    (["--captures", "body-event", "--headline", "mixed:body-grad"],
     r"--headline 'mixed:body-grad': give <schedule>:<capture> among the sweep's"),
    (["--headline", "mixed"], r"--headline 'mixed': give <schedule>:<capture>"),
    (["rl.max_stepz=3"], r"the overrides rl.max_stepz=3: 'rl.max_stepz' is not a config field; "
                         r"did you mean rl.max_steps\?"),
])
def test_the_sweep_refuses_bad_arguments_before_any_run(tmp_path, capsys, args, message):
    """A typo in --captures, --schedules or --seeds was a worker's traceback after the first
    runs (their directories left behind); a --headline naming no capture gave an all-null
    headline.json, exit 0, after the whole sweep."""
    from scripts.planted_sweep import main

    with pytest.raises(SystemExit) as e:
        main([*args, "--runs", str(tmp_path / "runs")])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
