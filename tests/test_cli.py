"""The ``sae-shards train`` command as a user meets it: config errors before anything runs, the
closing report, strict JSON, the earlier run left alone, W&B names and groups in a sweep."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_shards.capture.memory import check_buffer_memory
from sae_shards.capture.summary import worse_than_mean
from sae_shards.cli import main
from sae_shards.core.checkpoint import save_checkpoint
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import make_targets
from sae_shards.run.config import CaptureConfig, JobConfig, LoggingConfig, RLConfig, RunnerConfig
from sae_shards.run.config import TaskConfig
from sae_shards.run.job import run_job
from sae_shards.run.tracking import artifact_name

from helpers import offline_run

TINY = ["rl.max_steps=6", "runner.min_samples=2", "runner.sae_steps_per_rl_step=1",
        "task.n_prompts=32", "logging=disabled"]


def _no_nan(text: str) -> dict:
    def refuse(token):
        raise AssertionError(f"summary.json holds {token}, which is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_model_hf_path_without_a_path_is_a_config_error(tmp_path, capsys):
    assert main(["train", "model=hf_path", f"run_dir={tmp_path / 'r'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "config error: model.path has no value" in err
    assert not (tmp_path / "r" / "model").exists()  # the tiny model was not built instead
    # refused inside the job in run_dir=a/b/r, none of which existed: every directory Hydra
    # made for it is removed, not only r (an empty a/b/ would be listed among the user's runs)
    assert main(["train", "model=hf_path", f"run_dir={tmp_path / 'a' / 'b' / 'r'}", *TINY]) == 2
    assert "config error: model.path has no value" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("override", ["model.hidden_size=32", "model.arch=llama",
                                      "model.readout_scale=4.0"])
def test_a_tiny_model_field_with_hf_path_is_named_for_what_it_is(tmp_path, capsys, override):
    """configs/model/hf_path.yaml holds no tiny-model field: Hydra refused one, advising
    '+model.hidden_size=32', which was then refused for what it is. Said at once."""
    assert main(["train", "model=hf_path", "model.path=/any/model", override,
                 f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert (f"sae-shards: config error: {override.split('=')[0]}: these shape the built-in tiny "
            "model only (model=tiny), and model=hf_path uses model.path as saved; drop them"
            in err), err
    assert not (tmp_path / "r").exists()
    assert main(["train", "experiment=planted", "model=hf_path", "model.path=/any/model",
                 override, f"run_dir={tmp_path / 'r'}"]) == 2
    assert (f"drop them; one the experiment sets is dropped with '~{override.split('=')[0]}'"
            in capsys.readouterr().err)


@pytest.mark.parametrize("override,hint", [
    ("max_steps=10", "did you mean rl.max_steps?"),
    ("rl.max_step=10", "did you mean rl.max_steps?"),
    ("sae.n_latent=8", "did you mean sae.n_latents?"),
    ("sae.K=8", "did you mean sae.k?"),  # case
    # a field of another section, misplaced: its name there (was: the section's field list)
    ("rl.checkpoint_every=10", "did you mean runner.checkpoint_every?"),
    ("sae.capacity=4", "did you mean capture.capacity?"),
])
def test_typo_override_names_the_closest_field(tmp_path, capsys, override, hint):
    assert main(["train", override, f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "sae-shards: config error:" in err and hint in err
    assert "+" + override.split("=")[0] not in err  # not Hydra's "append with +" advice
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("both", [["runner.sae_budget=0.05", "runner.sae_steps_per_rl_step=8"],
                                  ["runner.sae_steps_per_rl_step=8", "+runner.sae_budget=0.1"]])
def test_a_budget_and_a_fixed_step_count_on_one_command_line_are_refused(tmp_path, capsys, both):
    """A budget sets the SAE's steps, so a fixed count beside it was silently ignored: the two
    on one command line are a config error, before anything is written. A budget of 0 (the fixed
    count is used) or a swept budget (some jobs use the count) beside a count are taken."""
    assert main(["train", *both, f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert ("config error: runner.sae_budget=" in err and "runner.sae_steps_per_rl_step=8 are "
            "both set on the command line" in err and "drop one" in err)
    assert not (tmp_path / "r").exists()
    from sae_shards.cli import check_overrides

    check_overrides(["runner.sae_budget=0", "runner.sae_steps_per_rl_step=8"])
    check_overrides(["runner.sae_budget=0,0.05", "runner.sae_steps_per_rl_step=8", "-m"])
    check_overrides(["runner.sae_budget=0.05", "experiment=planted"])  # the experiment's count


@pytest.mark.parametrize("override,message", [
    ("run_dir=null", "config error: run_dir=null: give the run a directory of its own"),
    # a sweep job's directory pasted unquoted
    ("run_dir=runs/sweep/rl.max_steps=10,sae.k=2", "is quoted: \"run_dir='runs/sweep/sae.k=2'\""),
    # a glob's character class in a list (audit 137 F12: the hint named none of '[')
    ("capture.targets=[model.layers.[0].mlp.*]", "A glob's character class inside a list is "
                                                 "quoted too: \"capture.targets=['model.layers."),
])
def test_run_dir_values_hydra_cannot_take_are_config_errors(tmp_path, capsys, override, message):
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_finished_run_reports_and_a_refused_rerun_keeps_its_files(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", f"run_dir={run}", "seed=3", *TINY]) == 0
    out = capsys.readouterr().out
    assert "dead latents" in out and f"next: sae-shards analyze {run}" in out
    assert "(mean over the first -> last fifth of the RL steps)" in out  # what the figures are
    assert "activations.safetensors" in out and "checkpoints/" in out
    summary = _no_nan((run / "summary.json").read_text())  # fvu_heldout is null, not NaN
    assert summary["fvu_heldout"] is None and summary["rl_steps"] == 6
    hydra_cfg = (run / ".hydra" / "config.yaml").read_text()
    assert "seed: 3" in hydra_cfg
    # Hydra's job log is cli.log (hydra.job.name; by default the entry point's module name)
    assert [p.name for p in run.glob("*.log")] == ["cli.log"]
    assert "[sae_shards." in (run / "cli.log").read_text()

    assert main(["train", f"run_dir={run}", "seed=4", *TINY]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err  # the way to start it again is said to delete it
    assert "(to start it again with its own settings, deleting what it holds: " in err
    assert "seed=3" in err.split("deleting what it holds: ")[1]
    assert (run / ".hydra" / "config.yaml").read_text() == hydra_cfg  # the earlier run's own


def _short_job(run_dir: Path, **runner) -> JobConfig:
    return JobConfig(run_dir=str(run_dir), task=TaskConfig(n_prompts=32),
                     rl=RLConfig(max_steps=6), logging=LoggingConfig(mode="disabled"),
                     runner=RunnerConfig(**{"sae_steps_per_rl_step": 1, **runner}))


def test_console_reward_is_the_named_steps(tmp_path, caplog):
    run = tmp_path / "r"
    with caplog.at_level(logging.INFO, logger="sae_shards"):
        run_job(_short_job(run, min_samples=2), run)
    rows = {r["step"]: r for r in map(json.loads, (run / "rollouts.jsonl").read_text().splitlines())}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("RL step ")]
    assert len(lines) == 6
    for line in lines:
        step = int(line.split()[2].split("/")[0])
        reward = float(line.split("reward ")[1].split()[0])
        assert reward == pytest.approx(sum(rows[step]["rewards"]) / len(rows[step]["rewards"]),
                                       abs=1e-3)  # printed with 3 decimals


def test_run_shorter_than_the_warm_up_says_so(tmp_path):
    """The job refuses up front a run whose steps can never give runner.min_samples: per step
    one sample each, per event at most the step's prompt groups."""
    with pytest.raises(ValueError, match=r"rl.max_steps=6 gives 6 trainable per-step samples.*"
                                         r"fewer than runner.min_samples=8"):
        _short_job(tmp_path / "refused", min_samples=8)
    with pytest.raises(ValueError, match=r"rl.max_steps=6 gives 12 trainable events at most \(2 "
                                         r"per RL step with capture.granularity=group\), fewer "
                                         r"than runner.min_samples=20"):
        dataclasses.replace(_short_job(tmp_path / "r", min_samples=2),
                            capture=CaptureConfig(granularity="group"),
                            runner=RunnerConfig(sae_steps_per_rl_step=1, min_samples=20))


def test_an_sae_that_ends_worse_than_the_mean_is_warned_about(tmp_path):
    """An SAE whose last FVU is above 1 reconstructs its samples worse than their mean; above 10
    (here: sae.lr=1 diverges) it diverged: summary.json and the report say so."""
    run = tmp_path / "r"
    cfg = dataclasses.replace(_short_job(run, min_samples=2), sae=SAEConfig(lr=1.0))
    summary = run_job(cfg, run)
    # audit 143 F9: a diverged SAE (FVU 5.5e9 here) was told to train longer, its FVU printed
    # with 10 digits; it is told to lower sae.lr
    assert summary["fvu_last"] > 10 and summary["warning"].startswith(
        "the SAE diverged: its FVU over its last tenth of steps is ")
    assert summary["warning"].endswith("training longer makes it worse. Lower sae.lr, now 1")
    assert main(["analyze", str(run), "--no-dose"]) == 0
    assert "the SAE diverged" in (run / "report.html").read_text()
    # above 1 and not diverged: not trained enough yet
    assert worse_than_mean(1.3, 52, 1.0, 1e-3) == (
        "the SAE reconstructs its samples worse than their mean does (FVU over its last tenth "
        "of steps 1.3 > 1, after 52 SAE steps): its shards do not describe the updates yet")
    assert worse_than_mean(0.9, 52) is None and worse_than_mean(math.nan, 5) is None
    assert _no_nan((run / "summary.json").read_text())["warning"] == summary["warning"]


def test_analyze_names_a_missing_run_dir_and_the_checkpoints_there_are(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope"), "--no-dose"]) == 2
    assert f"{tmp_path / 'nope'}: no such run directory" in capsys.readouterr().err
    run = tmp_path / "r"
    run_job(_short_job(run, min_samples=2), run)
    assert main(["analyze", str(run), "--no-dose", "--checkpoint", "step_5"]) == 2
    err = capsys.readouterr().err
    assert "step_5: no such checkpoint directory" in err and "holds final" in err, err
    # a run's name mistyped: the run directories beside it are offered (the close ones, or all
    # of a few)
    (tmp_path / "rr" / "checkpoints").mkdir(parents=True)
    (tmp_path / "notes").mkdir()  # not a run directory: never offered, nor is a model's
    (tmp_path / "a_model").mkdir()  # folder (audit 147 F3)
    (tmp_path / "a_model" / "config.json").write_text('{"model_type": "qwen2"}')
    assert main(["analyze", str(tmp_path / "nope"), "--no-dose"]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"no such run directory; run directories in {tmp_path}: "
                                 f"{tmp_path / 'r'}, {tmp_path / 'rr'}"), err
    assert main(["analyze", str(tmp_path / "rx"), "--no-dose"]) == 2  # only the close ones
    assert capsys.readouterr().err.rstrip().endswith(f"run directories in {tmp_path}: "
                                                     f"{tmp_path / 'r'}")
    for inside in (run / "config.json", run / "checkpoints" / "final" / "sae.safetensors"):
        assert main(["analyze", str(inside), "--no-dose"]) == 2  # a run's file
        assert capsys.readouterr().err.rstrip().endswith(
            f"{inside}: a file, not a run directory; give the run's directory (the run "
            f"directory {run}?)")
    assert main(["analyze", str(run), "--no-dose", "--checkpoint", "5"]) == 2  # an RL step
    err = capsys.readouterr().err
    assert "step_000005: no such checkpoint directory" in err
    assert "reading checkpoint" not in err  # audit 134: it said it read what was not there
    assert main(["evaluate", str(run), "--null-run", str(tmp_path / "gone")]) == 2
    assert (f"cannot evaluate {run}: --null-run {tmp_path / 'gone'}: no such run directory"
            in capsys.readouterr().err)  # it named the path alone, not the option


def test_buffer_error_suggests_a_value_the_config_accepts():
    specs = make_targets({"w": (64, 64)}, rank=1)
    with pytest.raises(ValueError) as e:
        check_buffer_memory(specs, 100, torch.float32, budget_bytes=1_000_000)
    suggested = [ln for ln in str(e.value).splitlines() if "storage_dtype=" in ln]
    assert suggested
    value = suggested[0].split("storage_dtype=")[1].split(":")[0]
    assert CaptureConfig(storage_dtype=value).storage_dtype == "bfloat16"


def test_shard_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        sae = LowRankSAE(make_targets({"w": (4, 3)}, rank=1), SAEConfig(n_latents=2, k=1))
        path = save_checkpoint(tmp_path / "ckpt", sae)
    finally:
        os.umask(old)
    for f in [path, *path.iterdir()]:
        assert f.stat().st_mode & 0o044 == 0o044, (f, oct(f.stat().st_mode))


def test_a_runs_policies_are_readable_by_others(tmp_path):
    """Every file sae-shards writes into a run directory, the policies too, takes the umask's
    mode: save_pretrained writes weights through safetensors, which creates them 0600, so a
    colleague analysing a shared run could read its shards but not the policies the report's
    interventions load (audit 131 F2). TRL's own checkpoints (trl/) are TRL's files."""
    run = tmp_path / "r"
    old = os.umask(0o022)
    try:
        run_job(_short_job(run, min_samples=2, checkpoint_every=0), run)
    finally:
        os.umask(old)
    files = [f for f in run.rglob("*") if f.is_file() and "trl" not in f.relative_to(run).parts]
    assert {"model", "final_model"} <= {f.relative_to(run).parts[0] for f in files}
    private = [str(f.relative_to(run)) for f in files if f.stat().st_mode & 0o044 != 0o044]
    assert not private


def test_artifact_names_are_valid():
    assert artifact_name("shards-sae.k=2,sae.rank=1") == "shards-sae.k-2-sae.rank-1"
    assert artifact_name("shards-run") == "shards-run"


def test_multirun_jobs_share_a_wandb_group(tmp_path):
    sweep = tmp_path / "k_sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "sae_shards.cli", "train", "-m", "sae.k=1,2", f"run_dir={sweep}",
         *[o for o in TINY if not o.startswith("logging")], "logging=offline",
         "logging.name=exp"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [next(sweep.glob(f"*sae.k={k}*")) for k in (1, 2)]  # named after their overrides
    runs = [offline_run(job) for job in jobs]
    assert [r["group"] for r in runs] == ["k_sweep", "k_sweep"]
    assert [r["name"] for r in runs] == [f"exp-{job.name}" for job in jobs]  # one name each
    for job, run in zip(jobs, runs):
        (name,) = run["artifacts"]
        assert "=" in job.name and name == artifact_name(f"shards-{job.name}")


def test_a_failed_sweep_job_ends_its_own_wandb_run_and_the_others_run(tmp_path):
    """A job that raises an error sae-shards did not foresee (TRL refusing a loss type) ends its
    W&B run as failed: left open, the next job's wandb.init returned it, and the next job's
    figures were logged into the failed job's run. Every job is listed at the end, the failure
    named with where its traceback is, and the command exits 1."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "sae_shards.cli", "train", "-m", "rl.extra.loss_type=bogus,grpo",
         f"run_dir={sweep}", *[o for o in TINY if not o.startswith("logging")],
         "logging=offline"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed, ok = (next(sweep.glob(f"*loss_type={t}*")) for t in ("bogus", "grpo"))
    bad, good = offline_run(failed, ("exit",)), offline_run(ok)
    assert bad["exit_code"] == 1 and bad["history_rows"] == 0 and bad["artifacts"] == []
    assert good["exit_code"] == 0 and good["history_rows"] > 0
    assert good["artifacts"] == [artifact_name(f"shards-{ok.name}")]
    assert f"sweep of 2 jobs in {sweep}:" in proc.stdout
    assert f"  {failed.name}: not run to its end by this command (see below)" in proc.stdout
    assert f"  {ok.name}: finished, 6 RL steps" in proc.stdout
    assert (f"{failed.name}: failed: ValueError: Unknown loss type: bogus (the traceback is in "
            f"{failed / 'cli.log'})") in proc.stderr
    assert "Traceback" in (failed / "cli.log").read_text()


@pytest.mark.parametrize("group", ["hydra/launcher=joblib", "hydra/job_logging=disabled",
                                   "hydra/sweeper=optuna"])
def test_hydras_own_config_groups_are_refused_saying_why(tmp_path, capsys, group):
    """hydra/launcher=joblib was refused as "not a config field", as if a misspelt sae-shards
    field; it is refused for what it is, before anything is written."""
    assert main(["train", "-m", "sae.k=1,2", group, f"run_dir={tmp_path / 's'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert f"{group}: sae-shards runs a sweep's jobs one after another" in err
    assert "is not a config field" not in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags", [["--config-path", "/x/.hydra", "--config-name", "config"],
                                   ["-cn", "other"], ["--config-path=/x/.hydra"],
                                   ["--config-name=other"]])
def test_another_primary_config_is_refused_before_hydra_writes(tmp_path, monkeypatch, capsys,
                                                              flags):
    """A run's saved .hydra/config.yaml given as the primary config (Hydra's re-run idiom) ran
    into ./outputs/<date>/<time>/, run_dir= ignored, and a refused one left .hydra/ there."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", *flags, f"run_dir={tmp_path / 'r'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "sae-shards train composes its own configs/config.yaml" in err
    assert "with a new run_dir" in err and not list(tmp_path.iterdir())


def test_the_default_config_named_either_way_is_the_default():
    from sae_shards.cli.hydra_config import refuse_other_primary_config

    for flags in (["--config-name", "config"], ["--config-name=config"], ["-cn", "config"]):
        refuse_other_primary_config([*flags, "sae.k=2"])  # no error


def test_a_sweep_too_large_to_check_first_says_so_and_leaves_no_empty_job_directory(
        tmp_path, monkeypatch, capsys):
    """Over MAX_CHECKED_JOBS the up-front check was skipped without a word, and every job
    refused at its turn (or never started) left an empty directory that analyze then listed
    among the sweep's runs."""
    import sae_shards.cli.train_checks as train_checks

    monkeypatch.setattr(train_checks, "MAX_CHECKED_JOBS", 1)
    sweep = tmp_path / "sweep"
    assert main(["train", "-m", "sae.k=2,100", f"run_dir={sweep}", *TINY]) == 2
    captured = capsys.readouterr()
    assert "a sweep of 2 jobs, more than 1: each job's config is checked when its turn comes" \
        in captured.err and "sae.k=100 must be between 1 and" in captured.err
    assert sorted(p.name for p in sweep.iterdir()) == [
        "multirun.yaml", "rl.max_steps=6,runner.min_samples=2,runner.sae_steps_per_rl_step=1,"
        "sae.k=2,task.n_prompts=32"]
    # a sweep of exactly MAX_CHECKED_JOBS jobs is still checked job by job before any runs
    from sae_shards.cli import ConfigError, check_sweep_jobs

    monkeypatch.setattr(train_checks, "MAX_CHECKED_JOBS", 2)
    with pytest.raises(ConfigError, match=r"the sweep's job sae.k=100: .*\(no job was started\)"):
        check_sweep_jobs(["-m", "sae.k=2,100", f"run_dir={tmp_path / 'other'}", *TINY])


def test_sweep_jobs_that_would_share_a_directory_are_refused_before_any_job(tmp_path, capsys):
    """A job's directory is named without the settings a resume may change (threads, device,
    logging): two jobs differing only in those would write one directory, the second refused
    after the first ran, or with overwrite=true deleting it."""
    sweep = tmp_path / "sweep"
    assert main(["train", "-m", "runner.torch_threads=1,2", f"run_dir={sweep}", *TINY]) == 2
    err = capsys.readouterr().err
    assert ("the sweep's jobs runner.torch_threads=1 and runner.torch_threads=2 would write one "
            "directory") in err and "(no job was started)" in err
    assert not sweep.exists()
    assert main(["train", "-m", "sae.k=1,2", "logging.group=a,b", f"run_dir={sweep}",
                 *TINY]) == 2
    assert "sae.k=1 logging.group=a and sae.k=1 logging.group=b" in capsys.readouterr().err
    # directories of the user's own naming (numbered): Hydra keeps them apart, not refused
    from sae_shards.cli import check_sweep_jobs

    check_sweep_jobs(["-m", "runner.torch_threads=1,2", "hydra.sweep.subdir=${hydra.job.num}",
                      f"run_dir={sweep}", *TINY])


def test_a_sweeps_resume_skips_only_a_finished_job_of_its_own_settings(tmp_path, capsys):
    """With job directories numbered (hydra.sweep.subdir=${hydra.job.num}), a sweep resumed
    with other values found job 0's finished run (sae.k=2) and skipped job 0 (now sae.k=4) as
    finished: it never trained, and the sweep exited 0."""
    sweep = tmp_path / "sweep"
    numbered = ["hydra.sweep.subdir=${hydra.job.num}", f"run_dir={sweep}", *TINY]
    assert main(["train", "-m", "sae.k=2", *numbered]) == 0
    before = (sweep / "0" / "summary.json").read_text()
    capsys.readouterr()
    assert main(["train", "-m", "sae.k=2", "resume=true", *numbered]) == 0
    assert f"{sweep / '0'} finished (6 RL steps) earlier: skipped" in capsys.readouterr().out
    assert main(["train", "-m", "sae.k=4,2", "resume=true", *numbered]) == 2
    out, err = capsys.readouterr()
    # the table says what this command did, not the figures of the k=2 run in directory 0
    assert "  0: not run to its end by this command (see below)" in out
    assert "  1: finished, 6 RL steps" in out
    assert "sae.k=4,task.n_prompts=32: not skipped: resuming" in err
    assert "sae.k: 2 in the run, 4 now" in err
    assert (sweep / "0" / "summary.json").read_text() == before


def test_a_sweep_job_resumed_alone_keeps_the_sweeps_wandb_group(tmp_path, monkeypatch, capsys):
    """The command a stopped sweep job prints resumes it alone, outside the sweep: its W&B run
    stays in the group the run started in (config.json), unless logging.group is given."""
    import sae_shards.run.job as job_module

    run = tmp_path / "sweep" / "sae.k=2"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"logging": {"group": "sweep"}, "capture": {},
                                                 "sae": {}}))
    seen = []

    def started(job, run_dir, hydra_files=None):
        seen.append(job.logging.group)
        raise job_module.JobSetupError("stopped here")

    monkeypatch.setattr(job_module, "run_job", started)
    for given, group in (([], "sweep"), (["logging.group=mine"], "mine")):
        assert main(["train", f"run_dir='{run}'", "resume=true", *TINY,
                     *given]) == 2
        assert seen.pop() == group
    capsys.readouterr()


def test_an_unforeseen_failure_ends_a_multi_process_sweep(tmp_path, monkeypatch, capsys):
    """Under a multi-process launch a job that raised on one rank went on to the next job while
    the other ranks waited in the failed job's collectives: the sweep hung until killed. The
    process now ends (exit 1), so the launcher ends the others; the next job does not start."""
    import sae_shards.cli.train as cli_train

    monkeypatch.setattr(cli_train, "several_processes", lambda: True)
    sweep = tmp_path / "sweep"
    with pytest.raises(SystemExit) as ended:
        main(["train", "-m", "rl.extra.loss_type=bogus,grpo", f"run_dir={sweep}", *TINY])
    assert ended.value.code == 1
    assert not list(sweep.glob("*loss_type=grpo*/summary.json"))  # the next job never ran


def test_a_multi_process_sweep_goes_on_only_past_a_failure_every_process_knew(
        tmp_path, monkeypatch, capsys):
    """Audit 113 F9: under a launch, rank 0 refused a job's checkpoint as it resumed, went on to
    the next job and waited in its setup broadcast while rank 1 waited inside the refused job's
    first generation: the sweep hung (gloo's timeout: 30 minutes). A refusal every process
    learnt of (``begin_together``) lets the sweep go on; a failure of one process alone (a full
    disk on rank 0) ends it after that job, so that the launcher ends the others."""
    import sae_shards.cli.train as cli_train
    import sae_shards.run.job as job_module
    from sae_shards.capture.distributed import begin_together, told_every_rank
    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.run.rundir import RunWriteError

    monkeypatch.setattr(cli_train, "several_processes", lambda: True)
    ran = []

    def run_job(job, run_dir, hydra_files=None):
        ran.append(job.seed)
        if job.seed == 1:  # refused while resuming, every rank told (as in on_train_begin)
            error = CheckpointError("sae.safetensors: cannot be read")
            begin_together(error)
            raise error
        if job.seed == 2:  # rank 0's setup refusal, broadcast (_main_process_first), said as
            told = ValueError("the buffer does not fit")  # the job's (raised from it)
            told_every_rank(told)
            raise job_module.JobSetupError(str(told)) from told
        raise RunWriteError("could not write metrics.jsonl: No space left on device")

    monkeypatch.setattr(job_module, "run_job", run_job)
    sweep = tmp_path / "sweep"
    assert main(["train", "-m", "seed=1,2,3,4", f"run_dir={sweep}", *TINY]) == 2
    assert ran == [1, 2, 3]  # past refusals every process knew; not past one it may not know
    err = capsys.readouterr().err
    assert "seed=1,task.n_prompts=32: cannot resume: sae.safetensors: cannot be read" in err
    assert "seed=2,task.n_prompts=32: cannot start: the buffer does not fit" in err
    assert "seed=3,task.n_prompts=32: stopped: could not write metrics.jsonl" in err
    assert ("seed=4,task.n_prompts=32: not started (a job failed on this process in a way the "
            "launch's other processes may not have learnt of, and they may still be inside "
            "it); continue the sweep with the same command and resume=true") in err


def test_a_bad_value_in_one_sweep_element_stops_the_sweep_before_any_job(tmp_path, capsys):
    """sae.k=2,100: the second job's config is invalid; said at once, naming that job, and no
    job runs (the sweep's directory is not even created)."""
    sweep = tmp_path / "sweep"
    assert main(["train", "-m", "sae.k=2,100", f"run_dir={sweep}", *TINY]) == 2
    err = capsys.readouterr().err
    assert ("config error: the sweep's job sae.k=100: sae.k=100 must be between 1 and "
            "sae.n_latents=64 (no job was started)") in err
    assert not sweep.exists()
    # a key below task.options is named as written (it read ++task.options.target_charz=a)
    assert main(["train", "-m", "task.options.target_charz=a,b", f"run_dir={sweep}",
                 *TINY]) == 2
    assert ("config error: the sweep's job task.options.target_charz=a: task.options "
            "['task.options.target_charz'] are not options") in capsys.readouterr().err


def test_a_sweep_is_checked_against_its_run_dir_as_resolved(tmp_path, capsys):
    """A sweep's run_dir is resolved per job before Hydra writes anything: one that differs
    between jobs (swept, or interpolated from a swept key) and one that resolves to a run are
    refused; resume=true needs a sweep to continue. Nothing is written to the run there."""
    run = tmp_path / "x_0"
    run.mkdir()
    (run / "summary.json").write_text('{"rl_steps": 6}')
    before = sorted(p.name for p in run.iterdir())

    def refused(*args: str) -> str:
        assert main(["train", "-m", *args, *TINY]) == 2
        err = capsys.readouterr().err
        assert "config error" in err and "Traceback" not in err
        return err

    assert "run_dir differs between its jobs" in refused("seed=0,5", f"run_dir={tmp_path}/x_${{seed}}")
    assert "run_dir differs between its jobs" in refused(f"run_dir={tmp_path}/a,{tmp_path}/b")
    assert f"run_dir={run} holds a run" in refused("sae.k=1,2", f"run_dir={tmp_path}/x_${{seed}}")
    assert "holds no sweep" in refused("sae.k=1,2", f"run_dir={tmp_path}/typo", "resume=true")
    assert "cannot be combined with --cfg" in refused("sae.k=1,2", "--cfg", "job")
    assert sorted(p.name for p in run.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_0"]


def test_flags_between_overrides_and_a_group_given_a_number(tmp_path, capsys):
    assert main(["train", "seed=3", "--cfg", "job", "-p", "seed", "rl.max_steps=10"]) == 0
    assert capsys.readouterr().out.strip().endswith("3")
    assert main(["train", "rl=3", f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "config error: rl=3 is not one of the rl configs: grpo, rloo" in err
    assert "Traceback" not in err
    assert main(["train", "hydra.job.chdir=true", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "config error: hydra.job.chdir=True: sae-shards writes" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_hydra_flags_are_not_taken_for_overrides():
    from sae_shards.cli.hydra_config import override_args

    assert override_args(["--cfg", "job", "-m", "sae.k=1,2", "-cn", "config", "seed=1"]) == [
        "sae.k=1,2", "seed=1"]


def test_resume_reuses_the_runs_overrides_and_keeps_their_plus(tmp_path, capsys):
    from sae_shards.cli import with_saved_overrides

    run = tmp_path / "r"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "- sae.k=8\n- +rl.extra.repetition_penalty=1.1\n- seed=3\n- run_dir=" + str(run) + "\n")
    given = [f"run_dir={run}", "resume=true"]
    assert with_saved_overrides(given) == [
        "sae.k=8", "+rl.extra.repetition_penalty=1.1", "seed=3", *given]
    assert "resuming with the run's own overrides" in capsys.readouterr().err
    # a setting given again replaces the saved one (the job then refuses a changed value);
    # a key the run added, given again without +, keeps being an addition
    assert with_saved_overrides([*given, "seed=4", "rl.extra.repetition_penalty=1.1"]) == [
        "sae.k=8", *given, "seed=4", "++rl.extra.repetition_penalty=1.1"]
    # a deletion applies on top of the saved override (then refused as a changed setting)
    assert with_saved_overrides([*given, "~rl.extra.repetition_penalty"]) == [
        "sae.k=8", "+rl.extra.repetition_penalty=1.1", "seed=3", *given,
        "~rl.extra.repetition_penalty"]
    # a run_dir that does not exist: said at once (and not created by Hydra for its log)
    assert main(["train", f"run_dir={tmp_path / 'nope'}", "resume=true"]) == 2
    assert "resume=true but run_dir=" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
    # no resume, a sweep, or a run without .hydra/: unchanged
    for args in ([f"run_dir={run}"], ["-m", *given], [f"run_dir={tmp_path}", "resume=true"]):
        assert with_saved_overrides(args) == args
    # a run started with overwrite=true (over an earlier one): its resume takes the settings,
    # not overwrite=true, which beside resume=true is a config error (the printed resume
    # command would never work) and names how the run started, not what it is
    (run / ".hydra" / "overrides.yaml").write_text("- seed=3\n- overwrite=true\n")
    assert with_saved_overrides(given) == ["seed=3", *given]
    # only a saved model.trust_remote_code=true is refused on resume: false is taken
    (run / ".hydra" / "overrides.yaml").write_text(
        "- model=hf_path\n- model.path=/m\n- model.trust_remote_code=false\n")
    assert with_saved_overrides(given) == [
        "model=hf_path", "model.path=/m", "model.trust_remote_code=false", *given]


def test_resume_with_an_override_that_does_not_compose_names_it(tmp_path, capsys):
    """A short run resumed with ``experiment=planted``: the composed config is invalid before
    the changed-setting check can run; the error says which overrides were new."""
    from sae_shards.cli import open_map_args, resume_changes

    run = tmp_path / "r"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- rl.max_steps=6\n")
    args = ["train", f"run_dir={run}", "resume=true", "experiment=planted"]
    assert resume_changes(args[1:]) == ["experiment=planted"]
    # the run's own overrides given again, hydra.*, and the run keys are not changes
    assert resume_changes([*args[1:], "rl.max_steps=6", "hydra.verbose=true", "overwrite=false"]
                          ) == ["experiment=planted"]
    (run / ".hydra" / "overrides.yaml").write_text("- rl.max_steps=6\n- overwrite=true\n")
    assert resume_changes(args[1:]) == ["experiment=planted"]  # the run's overwrite: no change
    (run / ".hydra" / "overrides.yaml").write_text("- rl.max_steps=6\n")
    assert resume_changes([f"run_dir={run}", "experiment=planted"]) == []  # not resuming
    assert resume_changes([*args[1:], "resume=false"]) == []  # the last resume= counts
    assert resume_changes(["-m", *args[1:]]) == []  # a sweep: each job's own overrides
    # a key the run added with + (or, from the command line, ++) given again plainly is no change
    (run / ".hydra" / "overrides.yaml").write_text("- rl.max_steps=6\n- +rl.extra.top_k=5\n")
    assert resume_changes(open_map_args([*args[1:3], "rl.extra.top_k=5"])) == []
    assert resume_changes(open_map_args([*args[1:3], "rl.extra.top_k=6"])) == [
        "++rl.extra.top_k=6"]
    (run / ".hydra" / "overrides.yaml").write_text("- rl.max_steps=6\n")
    bare = tmp_path / "bare"  # no .hydra/overrides.yaml: nothing was composed with it
    bare.mkdir()
    assert resume_changes([f"run_dir={bare}", "resume=true", "experiment=planted"]) == []
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sae-shards: config error: " in err and "Traceback" not in err
    assert ("resume=true composed the run's own overrides with experiment=planted; a resumed "
            "run keeps the settings it started with") in err
    assert sorted(p.name for p in run.iterdir() if p.name != "cli.log") == [".hydra"]


def test_printed_commands_parse_back_to_the_run_dir(tmp_path):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sae_shards.cli import rerun_command, resume_command

    parse = OverridesParser.create().parse_overrides
    for run in (tmp_path / "plain", tmp_path / "sweep" / "rl.max_steps=20,sae.k=2"):
        words = shlex.split(resume_command(run))
        parsed = {o.key_or_group: o.value() for o in parse(words[2:])}
        assert parsed == {"run_dir": str(run), "resume": True}, words
    run = tmp_path / "sweep" / "sae.k=2"
    assert rerun_command(run) is None  # its overrides are not known
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- sae.k=2\n- run_dir=" + str(run.parent) + "\n")
    words = shlex.split(rerun_command(run))
    parsed = {o.key_or_group: o.value() for o in parse(words[2:])}
    assert parsed == {"sae.k": 2, "run_dir": str(run), "overwrite": True}, words
    # a sweep's job run again alone stays in the sweep's W&B group (config.json's)
    (run / "config.json").write_text(json.dumps({"logging": {"group": "sweep"}, "capture": {},
                                                 "sae": {}}))
    parsed = {o.key_or_group: o.value() for o in parse(shlex.split(rerun_command(run))[2:])}
    assert parsed == {"sae.k": 2, "logging.group": "sweep", "run_dir": str(run),
                      "overwrite": True}


def test_closing_lines_name_evaluate_for_a_labelled_run(tmp_path):
    """A run with saved samples of a multi-task run is pointed at evaluate as well; the default
    task is not (evaluate refuses it)."""
    from sae_shards.cli.train import closing_lines

    summary = {"rl_steps": 3, "sae_steps": 6, "wall_s": 1.0}
    (tmp_path / "samples.safetensors").write_bytes(b"")
    for task, every, named in (("multiskill", 2, True), ("letters", 2, False),
                               ("multiskill", 0, False)):
        (tmp_path / "config.json").write_text(json.dumps({"task": {"name": task},
                                                          "runner": {"heldout_every": every}}))
        last = closing_lines(summary, tmp_path)[-1]
        assert last.startswith(f"  next: sae-shards analyze {tmp_path}")
        assert (f"sae-shards evaluate {tmp_path}" in last) is named


def test_analysis_knows_the_initial_weights_it_started_from(tmp_path, caplog, capsys):
    """config.json records a fingerprint of model.path's weights: edited since, the report's
    interventions are withheld with the reason (never measured against other weights); moved,
    --initial-model finds them again."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sae_shards.recipe.models import build_tiny_model
    from sae_shards.run.config import ModelConfig

    model = build_tiny_model(tmp_path / "model")
    run = tmp_path / "r"
    cfg = dataclasses.replace(_short_job(run, min_samples=2), model=ModelConfig(path=str(model)))
    run_job(cfg, run)
    recorded = json.loads((run / "config.json").read_text())["model"]["fingerprint"]
    assert list(recorded) == ["model.safetensors"]
    capsys.readouterr()
    assert main(["analyze", str(run), "--shards", "1", "--n-prompts", "4"]) == 0
    assert '"dose_response"' in (run / "analysis.json").read_text()
    from sae_shards.analysis.report import together_line

    line = together_line(json.loads((run / "analysis.json").read_text()))
    assert line and line in capsys.readouterr().out.splitlines()  # the span's line, printed

    shutil.copytree(model, tmp_path / "moved")
    weights = load_file(model / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="sae_shards"):
        assert main(["analyze", str(run), "--shards", "1", "--n-prompts", "4"]) == 0
    assert "are not the ones the run started from (model.safetensors differ" in caplog.text
    assert "not the ones the run started from" in (run / "report.html").read_text()
    assert '"dose_response"' not in (run / "analysis.json").read_text()
    assert main(["analyze", str(run), "--shards", "1", "--n-prompts", "4",
                 "--initial-model", str(tmp_path / "moved")]) == 0
    assert '"dose_response"' in (run / "analysis.json").read_text()

    # other weights (or no model) named on purpose: refused before anything is written, rather
    # than a report whose interventions are left out with exit status 0
    capsys.readouterr()
    report = (run / "analysis.json").read_text()
    for named, said in ((model, f"--initial-model {model} holds other weights than the run "
                                "started from (model.safetensors differ"),
                        (tmp_path / "nowhere", "no saved model there (no config.json)"),
                        # the run directory itself: it was told of other weights in
                        # activations.safetensors
                        (run, f"--initial-model {run} is a sae-shards run directory, not a "
                              f"saved model; a run of the built-in tiny model keeps its initial "
                              f"weights in {run / 'model'}")):
        assert main(["analyze", str(run), "--shards", "1", "--n-prompts", "4",
                     "--initial-model", str(named)]) == 2
        assert f"cannot analyze {run}: " in (err := capsys.readouterr().err) and said in err
    assert (run / "analysis.json").read_text() == report  # the last report is kept


def test_a_sweep_jobs_directory_is_named_by_its_overrides_as_given():
    """``open_map_args`` passes ``rl.extra.x=1`` to Hydra as ``++rl.extra.x=1``: the job's
    directory (and W&B name) is the user's spelling, the same whether ``+``/``++`` was given."""
    from sae_shards.cli import job_dirname

    assert (job_dirname("++rl.extra.scale_rewards=none,+sae.foo=1,rl.max_steps=10")
            == "rl.extra.scale_rewards=none,sae.foo=1,rl.max_steps=10")
    assert job_dirname("capture.targets=[a,b],sae.k=2") == "capture.targets=[a,b],sae.k=2"

    # a swept path is one directory named by the whole path: two models' jobs whose paths end
    # alike were nested five levels deep and shared a W&B name and artifact
    a, b = (job_dirname(f"model.path=/runs/{x}/model,model=hf_path") for x in ("base", "other"))
    assert a == "model.path=%2Fruns%2Fbase%2Fmodel,model=hf_path" and "/" not in b
    assert artifact_name(f"shards-{a}") != artifact_name(f"shards-{b}")
    # a name too long for a directory (255 bytes) or an artifact (128 characters) is cut,
    # with a hash of the whole, so names that differ past the cut stay apart
    long = ",".join(f"rl.extra.setting_{i}=1" for i in range(20))
    cut = {job_dirname(f"{long},seed={s}") for s in (1, 2)}
    assert len(cut) == 2 and all(len(c.encode()) <= 200 for c in cut)
    names = {artifact_name(f"shards-{c}") for c in cut}
    assert len(names) == 2 and all(len(n) <= 128 for n in names)


def test_a_sweep_is_refused_inside_a_run_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "rollouts.jsonl").write_text('{"step": 1}\n')
    (run / "config.json").write_text('{"capture": {}, "sae": {}}')  # (a run writes it first)
    assert main(["train", "-m", f"run_dir={run}", "sae.k=2,3"]) == 2
    err = capsys.readouterr().err
    assert f"run_dir={run} holds a run (rollouts.jsonl), and a sweep (-m) writes" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "rollouts.jsonl"]  # no
    # multirun.yaml


def test_a_hung_sae_worker_stops_the_run_with_a_message_not_an_abort(tmp_path):
    """The thread runner's timeout (here far below one SAE step) stops RL with a one-line
    reason and how to continue; the worker is let finish its step, so the process exits 2
    rather than aborting on a thread left inside torch."""
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "sae_shards.cli", "train", f"run_dir={run}", "rl.max_steps=10",
         "runner.concurrency=thread", "runner.worker_timeout_s=0.001",
         "runner.sae_steps_per_rl_step=20", "logging=disabled", "runner.torch_threads=1"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "sae-shards: stopped: the SAE worker has been on one captured delta" in done.stderr
    assert "start it again with: sae-shards train" in done.stderr  # no checkpoint yet
    assert "Traceback" not in done.stderr and "terminate called" not in done.stderr


@pytest.mark.parametrize("name", ["rún_ü_日本", "a~b", "a#b", "a&b;c", "a!b", "it's", 'a"b',
                                  "x y", "a?b"])
def test_printed_commands_quote_names_hydra_or_the_shell_would_misread(tmp_path, name):
    """A run_dir with a non-ASCII letter or a character Hydra's grammar refuses unquoted: the
    printed resume command must run as printed (it was `run_dir=/…/rún`, refused by Hydra);
    the closing `next: sae-shards analyze DIR` quotes a directory with spaces."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sae_shards.cli import resume_command
    from sae_shards.cli.train import closing_lines

    run = tmp_path / name
    words = shlex.split(resume_command(run))
    parsed = {o.key_or_group: o.value()
              for o in OverridesParser.create().parse_overrides(words[2:])}
    assert parsed == {"run_dir": str(run), "resume": True}, words
    run.mkdir()  # the closing lines' next command: the directory as one shell word
    last = closing_lines({"rl_steps": 3, "sae_steps": 6, "wall_s": 1.0}, run)[-1]
    assert shlex.split(last.split("next: ")[1]) == ["sae-shards", "analyze", str(run)], last


def test_a_model_with_its_own_code_trains_and_is_analysed_only_with_the_opt_in(
        tmp_path, monkeypatch, capsys):
    """A researcher's model that needs its own code (auto_map): refused until they say
    model.trust_remote_code=true (train) and --trust-remote-code (analyze); the run's own record
    of the first never stands in for the second. The code's import writes a marker."""
    from helpers import own_code_cache, plant_own_code

    from sae_shards.recipe.models import build_tiny_model
    from sae_shards.run.config import ModelConfig
    from sae_shards.run.job import JobSetupError

    model = build_tiny_model(tmp_path / "model")
    marker = tmp_path / "ran"
    code = plant_own_code(model, marker)
    own_code_cache(monkeypatch, tmp_path / "modules")
    refused = tmp_path / "refused"
    cfg = dataclasses.replace(_short_job(refused, min_samples=2), model=ModelConfig(path=str(model)))
    with pytest.raises(JobSetupError, match=f"auto_map names {code}, which sae-shards never runs "
                                            r"unless you opt in.*model.trust_remote_code=true"):
        run_job(cfg, refused)
    assert not marker.exists()

    run = tmp_path / "r"
    run_job(dataclasses.replace(cfg, run_dir=str(run), model=ModelConfig(
        path=str(model), trust_remote_code=True)), run)
    assert marker.exists()
    assert json.loads((run / "config.json").read_text())["model"]["trust_remote_code"] is True
    marker.unlink()
    capsys.readouterr()
    args = ["analyze", str(run), "--shards", "1", "--n-prompts", "1"]
    assert main(args) == 0  # the report without what needs the models, saying why
    assert not marker.exists()
    assert "--trust-remote-code (sae-shards analyze / evaluate)" in (run / "report.html").read_text()
    assert '"logit_lens"' not in (run / "analysis.json").read_text()
    assert main([*args, "--trust-remote-code"]) == 0
    assert marker.exists()
    shard = next(iter(json.loads((run / "analysis.json").read_text())["shards"].values()))
    assert shard["logit_lens"] and shard["dose_response"]


def test_evaluate_passes_trust_remote_code_only_when_given(short_run_dir, tmp_path, monkeypatch,
                                                           capsys):
    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.planted import evaluate

    seen = []

    def record(run_dir, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise CheckpointError("stopped after the arguments")

    monkeypatch.setattr(evaluate, "evaluate_run", record)
    args = ["evaluate", str(short_run_dir), "--out", str(tmp_path)]
    assert main(args) == 2 and main([*args, "--trust-remote-code"]) == 2
    assert seen == [False, True]


def test_evaluates_causal_tests_load_the_models_as_asked(monkeypatch, tmp_path):
    """evaluate_run's causal tests hand trust_remote_code (and the initial model a reader
    named) on to loading the run's models."""
    from sae_shards.planted import evaluate

    asked = []
    monkeypatch.setattr(evaluate, "load_run_models",
                        lambda run, checkpoint, **kw: asked.append(("load", kw)))
    monkeypatch.setattr(evaluate, "run_models_missing",
                        lambda run, checkpoint, **kw: asked.append(("why", kw)) or "refused")
    for trust in (False, True):
        assert evaluate._causal(tmp_path, None, *[None] * 12, initial_model=tmp_path / "m",
                                trust_remote_code=trust) == (None, "refused")
    assert asked == [(step, {"initial": tmp_path / "m", "trust_remote_code": trust})
                     for trust in (False, True) for step in ("load", "why")]


def test_a_resume_never_takes_trust_remote_code_from_the_run(tmp_path, capsys):
    """The run's saved overrides turning model.trust_remote_code on are refused on resume until
    the command gives it again."""
    from sae_shards.cli import ConfigError, with_saved_overrides

    run = tmp_path / "r"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "- model=hf_path\n- model.path=/m\n- model.trust_remote_code=true\n")
    given = [f"run_dir={run}", "resume=true"]
    with pytest.raises(ConfigError, match=r"started with model.trust_remote_code=true \(.*"
                                          r"overrides.yaml\), which runs model.path's own Python "
                                          r"code; a resume never takes that from the run "
                                          r"directory: add model.trust_remote_code=true"):
        with_saved_overrides(given)
    assert with_saved_overrides([*given, "model.trust_remote_code=true"]) == [
        "model=hf_path", "model.path=/m", *given, "model.trust_remote_code=true"]
    assert main(["train", *given]) == 2
    assert "a resume never takes that from the run directory" in capsys.readouterr().err


def test_under_a_launcher_each_rank_says_its_config_error_labelled(tmp_path, capsys,
                                                                   monkeypatch):
    """A config error found inside the job may be one rank's alone (a model.path missing on one
    node), so every rank says its own; another rank's is labelled with its rank. One found
    before Hydra, from the overrides alone, is every rank's: rank 0 alone says it."""
    from sae_shards.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, label in (("1", "sae-shards (rank 1): config error:"),
                        ("0", "sae-shards: config error:")):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "sae.k=abc", "logging=disabled",
                     f"run_dir={tmp_path / rank}"]) == 2
        assert label in capsys.readouterr().err
        assert main(["train", "-m", "--cfg", "job", "seed=1,2"]) == 2
        assert ("config error:" in capsys.readouterr().err) == (rank == "0")


def test_a_long_artifact_name_fits_wandbs_limit_and_stays_apart():
    from sae_shards.run.tracking import ARTIFACT_NAME_MAX, artifact_name

    a, b = artifact_name("shards-" + "x" * 300 + "a"), artifact_name("shards-" + "x" * 300 + "b")
    assert len(a.encode()) <= ARTIFACT_NAME_MAX and len(b.encode()) <= ARTIFACT_NAME_MAX
    assert a != b and a.startswith("shards-xxx")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_setup_is_said_and_leaves_a_run_that_starts_again(tmp_path, capfd,
                                                                          monkeypatch, sig):
    """A scheduler's SIGTERM while the policy loads (minutes for a real model) ended the job
    without a word (SIGTERM's default: exit 143), and Ctrl-C there was called 'a second
    signal'. It now says it stopped before training and how to go on, with the shell's
    status for the signal; the run directory is left free and the same command starts."""
    import signal

    import sae_shards.run.job as job

    building = job.prepare_model

    def signalled(*args, **kwargs):
        path = building(*args, **kwargs)
        os.kill(os.getpid(), getattr(signal, sig))  # a real signal, mid-setup
        return path

    monkeypatch.setattr(job, "prepare_model", signalled)
    run = tmp_path / "r"
    assert main(["train", f"run_dir={run}", *TINY]) == 128 + getattr(signal, sig)
    err = capfd.readouterr().err
    assert (f"stopped by {sig} before training began; no step of the run was trained: run "
            "the same command again") in err
    assert "second signal" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the process's own again
    monkeypatch.setattr(job, "prepare_model", building)
    assert main(["train", f"run_dir={run}", *TINY]) == 0  # the same command
    assert len((run / "rollouts.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("where", ["before", "setup"])
def test_a_signal_while_the_command_starts_is_said_and_the_same_command_runs(tmp_path, where):
    """SIGTERM while Python and Hydra start, or while a job is set up before run_job's own
    guard (torch, transformers and TRL are imported there: ~12 s on this machine), ended the
    command without a word (exit 143). It is now said, with what to do next. A real signal in
    a real process: the command ends at once (os._exit), as it must mid-import."""
    import signal

    patched = {"before": "new_run_dir", "setup": "job_config_from_hydra"}[where]
    run = tmp_path / "r"
    script = (
        "import os, signal, sys\n"
        "import sae_shards.cli.train as t\n"
        f"real = t.{patched}\n"
        "def signalled(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*a, **k)\n"
        f"t.{patched} = signalled\n"
        "from sae_shards.cli import main\n"
        f"sys.exit(main(['train', 'run_dir={run}', *{TINY!r}]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    said = {"before": "sae-shards: stopped by SIGTERM before the run began: this command "
                      "trained nothing; run the same command again",
            "setup": "sae-shards: stopped by SIGTERM before training began; no step of the run "
                     "was trained: run the same command again"}[where]
    assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (run / "config.json").exists()
    assert main(["train", f"run_dir={run}", *TINY]) == 0  # the same command


@pytest.mark.parametrize("after", [1.0, 2.5])
def test_sigterm_while_python_and_hydra_start_is_said(tmp_path, after):
    """The real window: ``sae-shards train`` signalled 1 or 2.5 s after it started is still
    importing torch, transformers and TRL, or composing its config (training begins after 6 s
    on this machine). A KeyboardInterrupt raised there surfaced as transformers' "Could not
    import module" traceback (exit 1); at 1 s torch was still being imported before the guard
    was armed (audit 140), and SIGTERM's default ended it without a word."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "sae_shards.cli", "train",
                             f"run_dir={run}", *TINY], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "sae-shards: stopped by SIGTERM before" in err, (out, err)
    assert "Traceback" not in err
    assert not run.exists() or any(run.iterdir())  # no empty directory left (audit 140)


def test_the_startup_guard_ends_the_process_even_when_it_cannot_say_so(tmp_path):
    """Audit 140: EndAtOnce wrote its message with os.write; with stderr closed (or a pipe the
    same Ctrl-C ended) the OSError escaped the handler and the process went on."""
    import signal

    code = ("import os, signal, time\n"
            "from sae_shards.capture.signals import EndAtOnce\n"
            "guard = EndAtOnce('stopped by {signal}')\n"
            "guard.arm()\n"
            "os.close(2)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n"
            "print('still running', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 128 + signal.SIGTERM and "still running" not in done.stdout


def test_overwrite_keeps_a_model_path_that_lies_inside_the_run(tmp_path, capsys):
    """Audit 151 F9: model.path naming an earlier run's final_model/, with overwrite=true on
    that run's directory, was removed with the earlier run, then not found: the policy that was
    the input was lost. Refused before anything is removed."""
    from sae_shards.recipe.models import build_tiny_model

    run = tmp_path / "run"
    model = build_tiny_model(run / "final_model")
    (run / "config.json").write_text('{"capture": {}, "sae": {}}')
    before = sorted(p.name for p in model.iterdir())
    assert main(["train", "model=hf_path", f"model.path={model}", f"run_dir={run}",
                 "overwrite=true", *TINY]) == 2
    err = capsys.readouterr().err
    assert f"model.path={model} lies inside run_dir={run}, which overwrite=true empties" in err
    assert sorted(p.name for p in model.iterdir()) == before
    assert (run / "config.json").is_file()


def test_a_run_inside_another_runs_own_folders_is_refused(tmp_path):
    """Audit 151 F7: a run_dir inside another run's checkpoints/ (or trl/, final_model/...) was
    accepted, and removed without a word by that run's overwrite=true or pruning."""
    from sae_shards.run import rundir

    outer = tmp_path / "outer"
    (outer / "checkpoints").mkdir(parents=True)
    (outer / "config.json").write_text('{"capture": {}, "sae": {}}')
    nested = outer / "checkpoints" / "nested"
    with pytest.raises(FileExistsError, match=rf"run_dir={nested} lies inside "
                                              rf"{outer / 'checkpoints'}, a folder of the run"):
        rundir.prepare_run_dir(nested, overwrite=False)
    assert not nested.exists()
    assert main(["train", f"run_dir={outer / 'trl' / 'x'}", *TINY]) == 2
    assert not (outer / "trl").exists()
    beside = tmp_path / "outer_2"  # beside the run: fine
    rundir.prepare_run_dir(beside, overwrite=False)
    rundir.release_run_dir(beside)


@pytest.mark.parametrize("override,said", [
    ("+rl.extra.generation_batch_size=5",
     "trl.GRPOConfig refused the settings (rl.<name> or rl.extra.<name>): generation_batch_size "
     "(5) must be divisible by the global batch size (16)"),
    ("+rl.extra.eval_strategy=steps",
     "rl.extra.eval_strategy='steps': sae-shards train gives the trainer no eval dataset"),
])
def test_trls_own_refusals_come_before_anything_is_written(tmp_path, capsys, override, said):
    """Audit 151 F5: TRL's config refused these only once the tiny model was written into the
    run directory, in TRL's words (no rl.extra. name; "pass an eval_dataset", which the CLI
    cannot). The config TRL would build is built with the checks, writing nothing."""
    run = tmp_path / "r"
    assert main(["train", override, f"run_dir={run}", *TINY]) == 2
    assert f"sae-shards: config error: {said}" in capsys.readouterr().err
    assert not run.exists()
