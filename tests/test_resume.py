"""Runs that survive: kill -9 and resume gives the uninterrupted run's shards, SIGTERM stops with a
usable checkpoint, a checkpoint write that fails halfway loses nothing, overwrite leaves nothing
of the earlier run, and bad samples (NaN, outliers) are skipped and counted through the job."""

from __future__ import annotations

import errno
import json
import logging
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from sae_shards.analysis.shards import RunView, ShardSet
from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.cli import main as cli_main
from sae_shards.core import checkpoint as checkpoint_module
from sae_shards.core.checkpoint import CheckpointError, load_checkpoint
from sae_shards.run.job import run_job, start
from sae_shards.run.rundir import RunWriteError, leftovers, trl_finished

from helpers import tree_bytes

# 12 RL steps, checkpoints every 4 (TRL's and ours), the SAE from the 4th sample on.
ARGS = ["rl.max_steps=12", "runner.checkpoint_every=4", "runner.min_samples=4",
        "task.n_prompts=64", "logging=disabled", "seed=5"]


def _train(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sae_shards.cli", "train", *ARGS, *extra,
                             f"run_dir={run_dir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _finish(proc: subprocess.Popen, rc: int = 0) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == rc, err[-3000:]
    return out


def _kill_after_step_8(run: Path, proc: subprocess.Popen) -> None:
    """Kill ``proc`` once step 8's checkpoint is complete (TRL's, the shards', the resume file)."""
    _wait_for(run / "trl" / "checkpoint-8" / "trainer_state.json", proc)
    # the shards' side of step 8 is written in the background: kill once all three parts are
    # complete, so the run is read as of step 8 or later (killed earlier, it reads step 4)
    _wait_for(run / "checkpoints" / "step_000008" / "config.json", proc)
    _wait_for(run / "resume" / "step_000008.safetensors", proc)
    while not trl_finished(run / "trl", 8):  # written last, not atomically: whole first
        assert proc.poll() is None, "the run ended before step 8's checkpoint was whole"
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    assert not (run / "checkpoints" / "final").exists()


def _same_run(a: Path, b: Path) -> None:
    """Final shards, activation logs, rollouts and SAE figures identical, bit for bit."""
    for name in ("checkpoints/final/sae.safetensors", "activations.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:  # NaN (the unused batch_topk threshold) equals NaN here
            torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name}: {key}")
    assert (a / "rollouts.jsonl").read_text() == (b / "rollouts.jsonl").read_text()
    sae_rows = [[r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "sae"] for d in (a, b)]
    assert sae_rows[0] == sae_rows[1] and len(sae_rows[0]) == 9 * 4
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("rl_steps", "sae_steps", "captured", "reward_first", "reward_last", "fvu_last",
                "dead_frac"):
        assert sa[key] == sb[key], key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    _finish(_train(run))
    return run


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A run killed (-9) once its step 8's checkpoint was whole, never resumed. Tests resume or
    damage copies of it (a copy resumes as the run would): one killed run for the module, not
    one per test (each costs ~12 s of the default suite)."""
    run = tmp_path_factory.mktemp("killed") / "run"
    _kill_after_step_8(run, _train(run))
    return run


def test_a_view_of_an_earlier_checkpoint_holds_the_logs_up_to_it(uninterrupted):
    """Read at an earlier checkpoint, a run's logs stop at its step: the shards know nothing of
    the later rollouts (RunView.rollouts listed every step the run went on to)."""
    view = RunView(uninterrupted, 8)
    rl_step, sae_step = view.up_to
    assert rl_step == 8 and sae_step > 0
    assert sorted(view.rollouts) == list(range(1, 9))
    assert {r["rl_step"] for r in view.rl_metrics} == set(range(1, 9))
    assert view.sae_metrics and max(r["sae_step"] for r in view.sae_metrics) == sae_step
    final = RunView(uninterrupted)  # the whole run's
    assert final.up_to == (None, None) and sorted(final.rollouts) == list(range(1, 13))
    assert max(r["sae_step"] for r in final.sae_metrics) > sae_step


def test_sigkill_after_the_second_checkpoint_resumes_to_the_same_shards(uninterrupted, killed,
                                                                        tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    # before it is resumed, the killed run is read as of its newest checkpoint
    view = RunView(run)
    step = int(view.checkpoint.removeprefix("step_"))
    assert view.recovered == "killed" and step in (8, 12)
    assert not (run / "activations.safetensors").exists()
    done = RunView(uninterrupted).activations
    online = (done["online.rl_step"] <= step).nonzero().flatten()
    for key in ("rl_step", "indices", "values"):  # the log as it was at that step, bit for bit
        assert torch.equal(view.activations[f"online.{key}"], done[f"online.{key}"][online])
    steps, acts = view.timeline()  # the buffer re-encoded by that step's SAE
    assert steps.tolist() == list(range(1, step + 1))
    assert ((acts != 0).sum(1) == 4).all()  # sae.k = 4 active shards per sample
    assert cli_main(["analyze", str(run), "--no-dose"]) == 0
    assert "(the run was killed, or is still running" in capsys.readouterr().err
    html = (run / "report.html").read_text()
    assert "no activations file: the run was killed" in html
    # no summary.json yet: the steps are the checkpoint's, said so (was "None")
    assert f"<td>RL steps</td><td>{step} (as of the checkpoint" in html
    assert "<td>None</td>" not in html
    # its reward so far, from rollouts.jsonl (was "n/a → n/a")
    from sae_shards.analysis.plots import step_reward_means
    from sae_shards.capture.summary import first_last

    first, last = first_last(step_reward_means(view)[1], 5)  # the logs up to the step read
    from html import unescape

    assert f"{first:.3f} → {last:.3f} (up to the checkpoint's RL step {step}: from rollouts" in (
        unescape(html))
    # analysis.json gives the same figures as the table, as of the checkpoint (it gave nulls),
    # and they are the finished run's at the same checkpoint (there its summary's or recomputed)
    assert view.up_to == (step, view.shards.meta["sae_step"])  # the logs and curves stop there
    assert RunView(uninterrupted).up_to == (None, None)
    figures = json.loads((run / "analysis.json").read_text())["run"]
    assert figures["figures_from"] == "checkpoint" and figures["rl_steps"] == step
    assert (figures["reward_first"], figures["reward_last"]) == (first, last)
    assert figures["sae_steps"] == view.shards.meta["sae_step"] > 0
    fired = view.shards.stats["stats.fire_count"]
    assert figures["never_fired_frac"] == float((fired == 0).float().mean())
    assert cli_main(["analyze", str(uninterrupted), "--no-dose", "--checkpoint",
                     view.checkpoint, "--out", str(tmp_path / "done" / "report.html")]) == 0
    done_figures = json.loads((tmp_path / "done" / "analysis.json").read_text())["run"]
    for key in ("rl_steps", "sae_steps", "reward_first", "reward_last", "fvu_first", "fvu_last",
                "dead_frac", "never_fired_frac"):
        expected = done_figures[key]  # dead_frac: None before sae.dead_after samples
        assert figures[key] == (expected if expected is None else
                                pytest.approx(expected, rel=1e-12, nan_ok=True)), key
    # its interventions use the policy of that step, which TRL saved (no final_model/ yet)
    from sae_shards.analysis.shards import load_run_models, policy_dir

    assert load_run_models(run) is None
    assert policy_dir(run, view.checkpoint) == run / "trl" / f"checkpoint-{step}"
    saved = load_file(run / "trl" / f"checkpoint-{step}" / "model.safetensors")
    final = dict(load_run_models(run, view.checkpoint).final.named_parameters())
    assert saved and all(torch.equal(final[k], v) for k, v in saved.items() if k in final)
    # a later stop's checkpoint whose TRL side was torn by the kill (trainer_state.json half
    # written): passed over, said why, and removed with its resume file when the run resumes
    stray = step + 2
    shutil.copytree(run / "checkpoints" / f"step_{step:06d}", run / "checkpoints" / f"step_{stray:06d}")
    shutil.copy(run / "resume" / f"step_{step:06d}.safetensors",
                run / "resume" / f"step_{stray:06d}.safetensors")
    (run / "trl" / f"checkpoint-{stray}").mkdir()
    (run / "trl" / f"checkpoint-{stray}" / "trainer_state.json").write_text('{"global_st')
    # resumed under another TRL than it started with: recorded at the step it resumed from
    # (it said RL step 0: the trainer's state, not loaded yet when sae-shards train sets up)
    config = json.loads((run / "config.json").read_text())
    config["versions"]["trl"] = "0.0.1"
    (run / "config.json").write_text(json.dumps(config))
    # the bare command: resume=true reuses the run's own overrides (.hydra/overrides.yaml)
    bare = subprocess.Popen([sys.executable, "-m", "sae_shards.cli", "train", f"run_dir={run}",
                             "resume=true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = bare.communicate(timeout=600)
    assert bare.returncode == 0, err[-3000:]
    said = out + err  # Hydra's console log is stdout
    assert (f"RL step {stray}'s checkpoint is incomplete (trl/checkpoint-{stray}/trainer_state.json"
            " missing or torn") in said
    assert f"step_{stray:06d}: removed (written after RL step {step}" in said
    assert not (run / "checkpoints" / f"step_{stray:06d}").exists()
    assert not (run / "resume" / f"step_{stray:06d}.safetensors").exists()
    assert [r["rl_step"] for r in json.loads((run / "config.json").read_text())[
        "resumed_under"]] == [step]
    _same_run(uninterrupted, run)


@pytest.mark.slow  # three runs (~35 s); the inline runner's kill and resume stay in the default
def test_the_thread_runner_reruns_and_resumes_to_the_same_shards(tmp_path):
    """runner.concurrency=thread, on a ring small enough to wrap (RL may overwrite what a lagging
    worker has not drawn yet): an uninterrupted run and one killed after its second checkpoint,
    then resumed, end with the same shards bit for bit, although the worker lags RL differently
    in each (before, two uninterrupted thread runs already trained different SAEs)."""
    thread = ("runner.concurrency=thread", "runner.max_lag=2", "capture.capacity=8")
    done, run = tmp_path / "done", tmp_path / "run"
    _finish(_train(done, *thread))
    _kill_after_step_8(run, _train(run, *thread))
    _finish(subprocess.Popen([sys.executable, "-m", "sae_shards.cli", "train", f"run_dir={run}",
                              "resume=true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True))
    _same_run(done, run)


def test_sigterm_stops_with_a_usable_checkpoint_then_resumes(uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    proc = _train(run)
    _wait_for(run / "trl" / "checkpoint-4" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc, rc=128 + signal.SIGTERM)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["stop_signal"] == signal.SIGTERM
    stopped = summary["rl_steps"]
    assert 4 <= stopped < 12 and f"run_dir={run} resume=true" in out
    step = f"step_{stopped:06d}"
    assert summary["final_checkpoint"] == f"checkpoints/{step}"  # a moved run's still
    assert f"checkpointed at {run / 'checkpoints' / step}; continue it with" in out
    assert (run / "trl" / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
    assert not (run / "checkpoints" / "final").exists()
    view = RunView(run)  # an interrupted run is analysable: its newest checkpoint
    assert view.checkpoint == step and sorted(view.rollouts) == list(range(1, stopped + 1))
    capsys.readouterr()
    assert cli_main(["analyze", str(run), "--no-dose"]) == 0  # in this process: no second import
    err = capsys.readouterr().err
    assert (f"reading checkpoint {step} of {run} (the run was stopped before its end"
            in err) and (run / "report.html").is_file(), err[-2000:]
    # started again without resume=true: refused, pointing at resume=true; resumed with a
    # changed setting: refused before anything is built, naming it (in this process, one after
    # the other: two processes at once could each find the other holding the run directory's
    # lock, and be refused for that instead)
    rollouts = (run / "rollouts.jsonl").read_text()
    capsys.readouterr()
    for extra, want in (((), "continue it with resume=true"),
                        (("resume=true", "sae.k=8"), "sae.k: 4 in the run, 8 now")):
        assert cli_main(["train", *ARGS, *extra, f"run_dir={run}"]) == 2
        err = capsys.readouterr().err
        assert want in err, err[-3000:]
    assert (run / "rollouts.jsonl").read_text() == rollouts
    assert (run / "report.html").is_file()  # a refused attempt removes nothing
    _finish(_train(run, "resume=true"))
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["interrupted"] is False
    # wall_s is the whole run's: the first process's time up to its checkpoint, then this one's
    assert 0 < resumed["wall_s_resumed_from"] <= summary["wall_s"] + 1e-6
    assert resumed["wall_s"] > resumed["wall_s_resumed_from"]
    assert not (run / "report.html").exists()  # it described the interrupted run
    _same_run(uninterrupted, run)
    ends = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_runtime" in row]  # TRL's end-of-training row: the stopped one's is gone
    assert len(ends) == 1 and ends[0]["rl_step"] == 12
    # a finished run has nothing to resume: refused, and nothing of it changes
    summary = (run / "summary.json").read_text()
    err = _refused(run, capsys, "resume=true")
    assert "finished (12 RL steps" in err and "nothing to resume" in err, err
    assert (run / "summary.json").read_text() == summary
    _same_run(uninterrupted, run)


ENDING = ("summary.json", "activations.safetensors", "checkpoints/final", "final_model")
"""What a run writes after its last step's checkpoint: absent when it is killed in between."""


def _cut_before_its_end(done: Path, run: Path, written: tuple[str, ...] = ()) -> None:
    """``run``: the finished run ``done`` as it was when killed after the checkpoint of its last
    step (a periodic one: step ``max_steps``), with only ``written`` of its end written."""
    shutil.copytree(done, run)
    for name in set(ENDING) - set(written):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    config = json.loads((run / "config.json").read_text())
    config["run_dir"] = str(run)
    (run / "config.json").write_text(json.dumps(config))


def test_a_run_killed_after_its_last_checkpoint_resumes_to_its_end_without_a_step(
        uninterrupted, tmp_path, caplog):
    """Resumed from the checkpoint of step ``max_steps``, transformers' loop would train one
    more step before it checks; the run instead writes its end as of that step."""
    run = tmp_path / "run"
    _cut_before_its_end(uninterrupted, run, written=("checkpoints/final",))
    view = RunView(run)  # read as of the last step checkpoint: final/ has no buffer to encode
    assert view.checkpoint == "step_000012" and view.recovered == "killed"
    # what kills at other moments leave under temporary names: removed by the next writer
    torn = [run / "checkpoints" / ".step_000012.tmp-x1y2", run / ".model.abc123",
            run / "checkpoints" / ".final.old-4242", run / ".tmpKl6ioq",
            run / "resume" / ".step_000012.safetensors.tmp", run / ".summary.json.tmp"]
    for path in torn[:3]:
        path.mkdir()
        (path / "part").write_bytes(b"\0" * 10)
    for path in torn[3:]:
        path.write_bytes(b"\0" * 10)
    assert leftovers(run) == sorted(torn)
    with caplog.at_level(logging.INFO, logger="sae_shards.run.rundir"):
        summary = run_job(_job(run, "resume=true"), run)
    assert leftovers(run) == [] and (run / ".hydra").is_dir()
    # a half-written step checkpoint or resume file is said as a warning, the rest as info
    warned = {r.getMessage().split(":")[0] for r in caplog.records
              if r.levelno == logging.WARNING and "killed while writing" in r.getMessage()}
    assert warned == {str(torn[0]), str(torn[4])}
    assert summary["rl_steps"] == 12 and summary["interrupted"] is False
    _same_run(uninterrupted, run)
    assert not list(run.rglob("*13*"))  # no step 13: no checkpoint, no TRL checkpoint
    final, done = (load_file(d / "final_model" / "model.safetensors")
                   for d in (run, uninterrupted))
    assert final.keys() == done.keys() and all(torch.equal(final[k], done[k]) for k in done)
    assert json.loads((run / "checkpoints" / "final" / "config.json").read_text()
                      )["meta"]["rl_step"] == 12
    rows = [(d / "metrics.jsonl").read_text() for d in (run, uninterrupted)]
    assert rows[0] == rows[1]  # TRL's end-of-training row too: the run's own, kept


@pytest.mark.parametrize("damage, problem", [
    (lambda tensors, header: header.pop("info"), r"\(KeyError: 'info'\)"),
    (lambda tensors, header: tensors.update({"loop.generator": tensors["loop.generator"][:10]}),
     r"\(RuntimeError: .*RNG state"),
    (lambda tensors, header: header.update(format="sae-shards-activations"),
     r"header format 'sae-shards-activations', expected 'sae-shards-resume'"),
])
def test_a_damaged_resume_file_is_named_when_the_run_resumes(uninterrupted, tmp_path, damage,
                                                              problem, capsys):
    """The resume file of the checkpoint a killed run resumes from, damaged (its header's info
    or its generator state lost) or another kind of file: resume=true names it and exits 2,
    instead of a KeyError or torch's RNG error as a traceback from inside trainer.train()."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = tmp_path / "run"
    _cut_before_its_end(uninterrupted, run)
    file = run / "resume" / "step_000012.safetensors"
    with safe_open(file, "pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    original, whole = dict(header), dict(tensors)
    damage(tensors, header)
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata=header)
    err = _refused(run, capsys, "resume=true")
    assert f"sae-shards: cannot resume: {file}: " in err and "Traceback" not in err, err[-3000:]
    assert re.search(problem, err), err[-3000:]
    # the way on, in sae-shards train's words (audit 114 M33, M34: untested on this path)
    assert (f"To resume from RL step 8 instead, delete {file} and "
            f"{run / 'checkpoints' / 'step_000012'} (sae-shards train resume=true then resumes "
            "from it)") in err, err[-3000:]
    # another run's resume file (found before anything is built): said as a resume too (audit
    # 113: "cannot start", where the same refusal at load said "cannot resume")
    foreign = {**original, "info": json.dumps({**json.loads(original["info"]), "run_id": "0" * 32})}
    save_file({k: v.contiguous() for k, v in whole.items()}, file, metadata=foreign)
    err = _refused(run, capsys, "resume=true")
    assert "sae-shards: cannot resume: " in err and "holds parts of another run" in err, err[-3000:]


def test_the_way_past_a_damaged_checkpoint_is_the_newest_complete_step_before_it(tmp_path):
    """Audit 114 M29, M30: with several complete steps before the damaged one, the advice
    names the newest (the oldest would throw the steps between away), and in a script the
    TRL checkpoint of that step; a step TRL no longer holds is not offered."""
    from sae_shards.capture.resume import _resume_before

    run, trl = tmp_path / "run", tmp_path / "out"
    for step in (5, 10, 15, 20):
        (run / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (run / "resume").mkdir(exist_ok=True)
        (run / "resume" / f"step_{step:06d}.safetensors").write_bytes(b"")
        if step != 15:  # rotated away by TRL's save_total_limit
            (trl / f"checkpoint-{step}").mkdir(parents=True)
    damaged = (f"{run / 'resume' / 'step_000020.safetensors'} and "
               f"{run / 'checkpoints' / 'step_000020'}")
    assert _resume_before(run, 20, trl) == (
        f"To resume from RL step 10 instead, delete {damaged} (a script then passes "
        f"resume_from_checkpoint='{trl / 'checkpoint-10'}')")
    (run / "trl").mkdir()
    for step in (5, 10, 15):
        (run / "trl" / f"checkpoint-{step}").mkdir()
    assert _resume_before(run, 20, None) == (
        f"To resume from RL step 15 instead, delete {damaged} (sae-shards train resume=true "
        "then resumes from it)")


def test_a_trl_checkpoint_is_this_runs_when_one_entry_at_the_last_common_step_matches(
        tmp_path):
    """Audit 114 M20, M22: the TRL checkpoint's log is compared with metrics.jsonl's last rl
    row at the last RL step both logged. TRL may log twice at a step (training, then an
    evaluation): one entry holding the row's values is enough, and an entry without one of
    them is no match."""
    from sae_shards.capture.resume import _check_trl_log

    rows = [{"kind": "rl", "rl_step": 6, "loss": 0.1, "reward": 0.2},
            {"kind": "rl", "rl_step": 7, "loss": 0.3, "reward": 0.4},
            {"kind": "rl", "rl_step": 7, "eval_loss": 0.9},
            {"kind": "sae", "rl_step": 7, "fvu": 0.5},
            {"kind": "rl", "rl_step": 8, "loss": 0.7}]  # after the checkpoint: not compared
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, evaluation = {"step": 7, "loss": 0.3, "reward": 0.4}, {"step": 7, "eval_loss": 0.9}
    _check_trl_log(tmp_path, 7, [{"step": 6, "loss": 0.1, "reward": 0.2}, train, evaluation])
    _check_trl_log(tmp_path, 7, [train, {**evaluation, "epoch": 0.5}])
    _check_trl_log(tmp_path, 7, [{"step": 6, "loss": 0.1, "reward": 0.2}])  # compared at 6
    _check_trl_log(tmp_path, 7, [])  # nothing logged in common: not checked
    refused = r"logged other values at RL step {} than this run did \({}"
    with pytest.raises(CheckpointError, match=refused.format(7, "eval_loss 0.9 in metrics")):
        _check_trl_log(tmp_path, 7, [train, {"step": 7, "eval_loss": 0.8}])
    with pytest.raises(CheckpointError,
                       match=refused.format(7, "eval_loss in metrics.jsonl, none of them")):
        _check_trl_log(tmp_path, 7, [{"step": 7, "loss": 0.35, "reward": 0.4}])
    with pytest.raises(CheckpointError, match=refused.format(6, "loss 0.1 .* 0.15 in TRL")):
        _check_trl_log(tmp_path, 7, [{"step": 6, "loss": 0.15, "reward": 0.2}])


def test_a_killed_writers_leftovers_alone_are_no_run(tmp_path):
    """A directory holding nothing but what a killed start left under temporary names is free
    for a new run (not refused as "already holds a run"); the leftovers are removed."""
    from sae_shards.run.rundir import prepare_run_dir, release_run_dir

    run = tmp_path / "run"
    (run / "checkpoints" / ".step_000004.tmp-ab12").mkdir(parents=True)
    (run / ".model.x9").mkdir()
    prepare_run_dir(run, overwrite=False)
    release_run_dir(run)
    assert leftovers(run) == [] and list((run / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("made, why", [
    ((), "no run was started there; start it without resume=true"),
    (("config.json", "model/config.json"), "stopped before its first RL step ended .* start it again "
                                           "without resume=true"),
    (("config.json", "rollouts.jsonl"), "stopped before its first checkpoint; start it again "
                                        "with overwrite=true"),
])
def test_a_resume_with_nothing_to_resume_says_what_it_found(tmp_path, made, why):
    """``resume=true`` where no checkpoint was written names what the directory holds (nothing;
    a start killed while building its model; steps without a checkpoint) and what to run."""
    from sae_shards.run.rundir import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    for name in made:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        run_config = name == "config.json"  # a run's: its capture and sae settings
        (run / name).write_text('{"capture": {}, "sae": {}}\n' if run_config else "{}\n")
    with pytest.raises(FileNotFoundError, match=f"holds no resumable run .*: (it )?{why}"):
        prepare_run_dir(run, overwrite=False, resume=True)


def test_a_failed_starts_empty_logs_do_not_outlive_the_retry(tmp_path):
    """A start that failed before its first step leaves empty logs (here a per-event attempt's
    events.jsonl); the retry may use the directory, and they do not stay behind in it."""
    from sae_shards.run.rundir import prepare_run_dir, release_run_dir

    run = tmp_path / "run"
    run.mkdir()
    for name in ("events.jsonl", "metrics.jsonl"):
        (run / name).touch()
    (run / "rollouts.jsonl").write_text('{"step": 1}\n')  # not empty: an earlier run's
    (run / "config.json").write_text('{"capture": {}, "sae": {}}')  # (written first)
    with pytest.raises(FileExistsError, match="already holds a run"):
        prepare_run_dir(run, overwrite=False)
    assert (run / "events.jsonl").exists()  # a refusal removes nothing
    (run / "rollouts.jsonl").write_text("")
    (run / "config.json").unlink()
    prepare_run_dir(run, overwrite=False)
    release_run_dir(run)
    assert not any((run / n).exists() for n in ("events.jsonl", "rollouts.jsonl", "metrics.jsonl"))


def test_a_resume_of_a_directory_that_does_not_exist_creates_nothing(tmp_path):
    from sae_shards.run.rundir import prepare_run_dir

    with pytest.raises(FileNotFoundError, match="does not exist: no run was started there"):
        prepare_run_dir(tmp_path / "runs" / "typo", overwrite=False, resume=True)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("cli, script", [
    ("resume=true but run_dir=r holds no resumable run (resume/ is missing or empty): no run "
     "was started there; start it without resume=true",
     "resume=True but run_dir=r holds no resumable run (resume/ is missing or empty): no run "
     "was started there; start it without resume=True"),
    ("run_dir=r already holds a run (rollouts.jsonl); it was stopped before it finished: "
     "continue it with resume=true, choose a new run_dir=... or pass overwrite=true to replace "
     "it",
     "run_dir=r already holds a run (rollouts.jsonl); it was stopped before it finished: "
     "continue it with ShardCallback(..., resume=True) and "
     "trainer.train(resume_from_checkpoint=True), choose a new run_dir=... or pass "
     "overwrite=True to replace it"),
])
def test_refusals_in_a_script_speak_its_arguments(cli, script):
    """A script's refusal names ShardCallback's arguments, and tells how to resume only where
    resuming is the advice (never "start without resume=True (ShardCallback(resume=True)...)")."""
    from sae_shards.capture.trl_checkpoints import in_script_terms

    assert in_script_terms(cli) == script


def test_text_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """``write_text`` (reports, JSON): the old file survives a write that fails before the
    rename, no temporary file is left after a good one, and the file is as readable as a
    plain write makes it."""
    import os

    from sae_shards.run import rundir

    path = tmp_path / "report.html"
    rundir.write_text(path, "old")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.html"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~checkpoint_module.process_umask()

    def dies(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(rundir.os, "replace", dies)
    with pytest.raises(RunWriteError, match="report.html"):
        rundir.write_text(path, "new")
    assert path.read_text() == "old"


def _refused(run: Path, capsys, *extra: str) -> str:
    """``sae-shards train`` with ``_train``'s arguments refused with exit status 2; its stderr.
    In this process (``cli_main``, as ``sae-shards train`` calls it): a refusal needs no fresh
    interpreter, and an exception escaping it fails the test as a traceback would."""
    capsys.readouterr()
    assert cli_main(["train", *ARGS, *extra, f"run_dir={run}"]) == 2, capsys.readouterr().err[-3000:]
    return capsys.readouterr().err


def _job(run: Path, *extra: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return job_config_from_hydra(compose("config", overrides=[*ARGS, *extra,
                                                                  f"run_dir={run}"]))


def _disk_full(kind: str) -> Exception:
    """A full disk as Python reports it (``OSError``) and as safetensors does (its own error)."""
    if kind == "oserror":
        return OSError(errno.ENOSPC, "No space left on device")
    from safetensors import SafetensorError
    return SafetensorError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_checkpoint_write_failing_halfway_keeps_the_run_resumable(uninterrupted, tmp_path,
                                                                    monkeypatch, kind):
    run = tmp_path / "run"
    real_save = checkpoint_module.save_file
    calls = []

    def disk_full_at_step_8(tensors, path, metadata=None):
        calls.append(str(path))
        if "step_000008" in str(path):  # half a file, then the disk is full
            Path(path).write_bytes(b"\0" * 1000)
            raise _disk_full(kind)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full_at_step_8)
    with pytest.raises(RunWriteError, match=r"could not write .*step_000008.*No space left"):
        run_job(_job(run), run)
    monkeypatch.undo()
    assert not (run / "checkpoints" / "step_000008").exists()
    assert not list((run / "checkpoints").glob(".step_000008*"))  # no half-written leftovers
    assert not list((run / "resume").glob(".step_000008*"))
    assert load_checkpoint(run / "checkpoints" / "step_000004").config["meta"]["rl_step"] == 4
    run_job(_job(run, "resume=true"), run)
    _same_run(uninterrupted, run)


def test_a_slow_background_checkpoint_is_the_state_of_its_own_step(tmp_path, monkeypatch):
    """The step-8 checkpoint is written on a background thread, slowly, while RL goes on. With a
    4-slot ring the next step writes into slot 0, which that checkpoint holds (as a view): unless
    RL waits for the write, the resume file would hold step 9's sample. The step-12 write then
    fails; resuming from step 8 must give the uninterrupted run, bit for bit."""
    small = ("capture.capacity=4",)
    whole = tmp_path / "whole"
    run_job(_job(whole, *small), whole)
    run = tmp_path / "run"
    real_save = checkpoint_module.save_file

    def slow_at_8_failing_at_12(tensors, path, metadata=None):
        if "resume" in str(path) and "step_000008" in str(path):
            time.sleep(1.5)  # several RL steps long
        if "step_000012" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", slow_at_8_failing_at_12)
    with pytest.raises(RunWriteError, match=r"could not write .*step_000012"):
        run_job(_job(run, *small), run)
    monkeypatch.undo()
    run_job(_job(run, *small, "resume=true"), run)
    _same_run(whole, run)


def test_a_resumed_budget_run_reports_the_whole_run_s_budget(tmp_path, monkeypatch):
    """runner.sae_budget: summary.json's budget_paid_s / budget_rl_s are the whole run's, as its
    wall_s is, not only the resumed process's (before, a run stopped at step 8 of 12 and resumed
    reported the last 4 steps' RL time beside the 12 steps' wall_s and samples_per_slot)."""
    from sae_shards.capture import resume as resume_state

    budget = ("runner.concurrency=thread", "runner.sae_budget=0.3")
    run = tmp_path / "run"
    at_step_8 = {}
    real_snapshot, real_save = resume_state.snapshot_step, checkpoint_module.save_file

    def recorded(step, parts, *args, **kwargs):
        if step == 8:
            at_step_8.update(zip(("paid", "rl"), parts.loop.budget.totals()))
        return real_snapshot(step, parts, *args, **kwargs)

    def failing_at_12(tensors, path, metadata=None):
        if "step_000012" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(resume_state, "snapshot_step", recorded)
    monkeypatch.setattr(checkpoint_module, "save_file", failing_at_12)
    with pytest.raises(RunWriteError, match=r"could not write .*step_000012"):
        run_job(_job(run, *budget), run)
    monkeypatch.undo()
    assert at_step_8["rl"] > 0 and at_step_8["paid"] > 0
    summary = run_job(_job(run, *budget, "resume=true"), run)
    assert summary["wall_s_resumed_from"] > 0
    # the first process's figures up to step 8, then this one's steps 9-12
    assert summary["budget_rl_s"] > at_step_8["rl"]
    assert summary["budget_paid_s"] > at_step_8["paid"]
    assert summary["budget_used"] == pytest.approx(summary["budget_paid_s"]
                                                   / summary["budget_rl_s"])


def test_background_writer_runs_one_write_at_a_time_and_raises_its_error():
    from sae_shards.capture.background import BackgroundWriter

    writer, order = BackgroundWriter(), []

    def write(name: str, seconds: float) -> None:
        order.append(f"{name} start")
        time.sleep(seconds)
        order.append(f"{name} end")

    writer.submit(write, "a", 0.3)
    assert writer.busy
    writer.submit(write, "b", 0.0)  # waits for a
    writer.wait()
    assert order == ["a start", "a end", "b start", "b end"] and not writer.busy

    def fail() -> None:
        raise RunWriteError("could not write x")

    writer.submit(fail)
    with pytest.raises(RunWriteError, match="could not write x"):
        writer.wait()
    writer.wait()  # raised once, then clear


def test_overwrite_leaves_no_file_of_the_earlier_run(tmp_path, caplog):
    run = tmp_path / "run"
    run_job(_job(run, "runner.save_samples=true"), run)
    assert (run / "samples.safetensors").is_file() and (run / "resume").is_dir()
    with caplog.at_level(logging.WARNING, logger="sae_shards.run.rundir"):
        run_job(_job(run, "overwrite=true", "rl.max_steps=5", "runner.checkpoint_every=0"), run)
    said = [r.getMessage() for r in caplog.records if "removed the earlier run" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"removed the earlier run in {run} to start anew")
    assert all(name in said[0] for name in ("checkpoints", "samples.safetensors", "resume",
                                            "rollouts.jsonl", "final_model", "summary.json"))
    names = sorted(p.name for p in run.iterdir())
    assert "samples.safetensors" not in names and "resume" not in names
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final"]
    assert not list((run / "trl").glob("checkpoint-*"))
    rows = (run / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert ShardSet.from_run(run).meta["rl_step"] == 5


class _Corrupt(TrainerCallback):
    """After the optimizer step of one RL step, puts a NaN (step 3) or a huge change (step 7)
    into one target, and undoes it after the capture read it (it is added after the job's
    callback, so its on_step_end runs second): those samples reach the capture, not the policy."""

    def __init__(self, param: torch.nn.Parameter) -> None:
        self.param, self.saved = param, None

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 in (3, 7):
            self.saved = self.param.detach().clone()
            if state.global_step + 1 == 3:
                self.param[0, 0] = float("nan")
            else:
                self.param.add_(1.0)

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        if self.saved is not None:
            self.param.copy_(self.saved)
            self.saved = None


def test_nonfinite_and_outlier_samples_are_skipped_and_counted_by_the_job(tmp_path):
    run = tmp_path / "run"
    rl, callback, _ = start(_job(run, "runner.checkpoint_every=0"), run)
    rl.trainer.add_callback(_Corrupt(callback.parts.targets["model.layers.1.mlp.up_proj.weight"]))
    rl.trainer.train()
    summary = callback.summary
    assert summary["nonfinite_samples"] == 1 and summary["outlier_samples"] == 1
    assert summary["captured"] == 10 and summary["rl_steps"] == 12
    assert ("1 of 11 samples was skipped as outliers (a norm over capture.outlier_ratio=100 "
            "times") in summary["warning"]  # said, not only counted
    steps = load_file(run / "activations.safetensors")["online.rl_step"].tolist()
    assert 3 not in steps and 7 not in steps
    assert torch.isfinite(callback.parts.sae.input_scale)


def test_a_torn_trl_trainer_state_is_not_a_finished_checkpoint(tmp_path):
    """TRL writes trainer_state.json last and not atomically: a kill mid-write (seen under load)
    leaves a torn file, and resume must fall back to the step before instead of crashing."""
    from sae_shards.capture.resume import latest_complete, resume_file
    from sae_shards.run import rundir

    for step in (4, 8):
        resume_file(tmp_path, step).parent.mkdir(exist_ok=True)
        resume_file(tmp_path, step).write_bytes(b"")
        shards = tmp_path / rundir.CHECKPOINTS / rundir.step_name(step)
        shards.mkdir(parents=True)
        (shards / "config.json").write_text("{}")
        trl = tmp_path / rundir.TRL_OUTPUT / f"checkpoint-{step}"
        trl.mkdir(parents=True)
        (trl / "trainer_state.json").write_text(json.dumps({"global_step": step, "log": [1] * 50}))
    assert latest_complete(tmp_path) == 8
    state = tmp_path / rundir.TRL_OUTPUT / "checkpoint-8" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # the kill landed mid-write
    assert latest_complete(tmp_path) == 4


def test_a_resume_whose_step_logs_are_missing_or_short_is_refused(killed, tmp_path, capsys):
    """A copy without rollouts.jsonl or metrics.jsonl, or with one cut short, resumed and
    finished with a hole in its record of the steps (steps 1-8 missing) and first-reward or
    first-FVU figures taken from what was left. The checkpoint records how many rows each step
    log held; a resume that finds fewer is refused, naming the log, and nothing of the copy is
    changed. A complete log written again in another layout (jq -c) is not refused."""
    run = killed  # copied below, never changed
    texts = {log: (run / log).read_text().splitlines(keepends=True)
             for log in ("rollouts.jsonl", "metrics.jsonl")}
    rows = {log: sum(json.loads(line)["step" if log == "rollouts.jsonl" else "rl_step"] <= 8
                     for line in lines) for log, lines in texts.items()}
    for name, log, edit, held in (
            ("missing", "rollouts.jsonl", lambda p, lines: p.unlink(), 0),
            ("short", "rollouts.jsonl", lambda p, lines: p.write_text("".join(lines[2:])), -2),
            ("no_metrics", "metrics.jsonl", lambda p, lines: p.unlink(), 0)):
        copy = tmp_path / name
        shutil.copytree(run, copy)
        edit(copy / log, texts[log])
        before = tree_bytes(copy, skip=(".lock", "cli.log"))
        assert cli_main(["train", f"run_dir={copy}", "resume=true"]) == 2
        err = capsys.readouterr().err
        expected = held if held >= 0 else rows[log] + held
        found = re.search(rf"{log}: (\d+) rows up to RL step 8, where the run had written (\d+) "
                          "when that step's checkpoint was taken: this copy's log is missing or "
                          "cut short, and the resumed run would have a hole in it; copy "
                          rf"{log} again from the run", err)
        assert found and int(found[1]) == expected and expected < int(found[2]) <= rows[log]
        after = tree_bytes(copy, skip=(".lock", "cli.log"))
        assert after == before  # refused before anything of the resume is written
    compact = tmp_path / "compact"
    shutil.copytree(run, compact)
    (compact / "rollouts.jsonl").write_text("".join(
        json.dumps(json.loads(line), separators=(",", ":")) + "\n"
        for line in texts["rollouts.jsonl"]))
    assert cli_main(["train", f"run_dir={compact}", "resume=true"]) == 0


def test_a_run_whose_initial_model_moved_resumes_from_its_new_place(tmp_path, capsys):
    """A stopped model=hf_path run moved, with its model moved too: model.path=NEW was refused as
    a changed setting (a symlink at the old place too), though ShardCallback resumes so; the
    same weights at a new place (their fingerprint) are accepted, and config.json records the
    new place. Other weights there are still refused."""
    from sae_shards.recipe.models import build_tiny_model

    model, run = build_tiny_model(tmp_path / "model"), tmp_path / "run"
    args = ["model=hf_path", f"model.path={model}", "rl.max_steps=4", "runner.checkpoint_every=2",
            "runner.min_samples=2", "task.n_prompts=16", "logging=disabled"]
    assert cli_main(["train", *args, f"run_dir={run}"]) == 0
    (run / "summary.json").unlink()  # stopped at its last checkpoint: the resume writes the end
    shutil.rmtree(run / "checkpoints" / "final")
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    model.rename(moved)
    assert cli_main(["train", f"run_dir={run}", "resume=true", f"model.path={moved}"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["path"] == str(moved.resolve())
    other = build_tiny_model(tmp_path / "other", hidden_size=48)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "final")
    capsys.readouterr()
    assert cli_main(["train", f"run_dir={run}", "resume=true", f"model.path={other}"]) == 2
    assert "model.path:" in capsys.readouterr().err


def test_a_resume_refuses_a_tiny_model_edited_since_the_run_began(uninterrupted, tmp_path,
                                                                  capsys):
    """The run's own model/ (theta_0 of a tiny-model run, kept by a resume) edited in a copy:
    the resume went on and config.json recorded the edited weights' fingerprint, so analysis
    then took them for theta_0."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted, copy)
    (copy / "summary.json").unlink()  # a stopped run's copy
    recorded = json.loads((copy / "config.json").read_text())["model"]["fingerprint"]
    weights = copy / "model" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.05
    save_file(tensors, weights, metadata={"format": "pt"})
    assert cli_main(["train", f"run_dir={copy}", "resume=true"]) == 2
    assert "model.fingerprint.model.safetensors: " in capsys.readouterr().err
    assert json.loads((copy / "config.json").read_text())["model"]["fingerprint"] == recorded


def test_a_damaged_trl_checkpoint_is_named_when_the_resume_reads_it(killed, tmp_path, capsys):
    """A truncated model.safetensors in the TRL checkpoint a resume starts from ended it with a
    traceback whose safetensors error names no file."""
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    weights = run / "trl" / "checkpoint-8" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    assert cli_main(["train", f"run_dir={run}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume: {run / 'trl' / 'checkpoint-8'}: TRL could not load this checkpoint " \
        "(" in err and "delete this checkpoint to resume from the one before it" in err
    assert "Traceback" not in err
    # the random state, read by each process from its own file, is named (audit 113 F3: under
    # several processes the one damaged may be another rank's than rank 0's)
    weights.write_bytes(whole)
    (run / "trl" / "checkpoint-8" / "rng_state.pth").write_bytes(b"not a torch file")
    assert cli_main(["train", f"run_dir={run}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert ("TRL could not load this checkpoint's rng_state.pth (the random state of this "
            "process) (") in err, err
    # a pickle torch refuses to load as tensors: said in a line, without torch's advice to
    # load it with weights_only=False, which would run it (audit 147 F7)
    (run / "trl" / "checkpoint-8" / "rng_state.pth").write_bytes(pickle.dumps({"a": 1},
                                                                              protocol=4))
    assert cli_main(["train", f"run_dir={run}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "(UnpicklingError: not a file torch reads as plain tensors, damaged or" in err, err
    assert "weights_only=False" not in err and "Traceback" not in err


def test_a_copy_without_its_hydra_folder_is_told_where_the_overrides_went(uninterrupted,
                                                                          tmp_path, capsys):
    """cp -r run/* leaves .hydra/ behind: the resume composed the defaults, was refused for
    settings that differ, and was told the bare command reuses .hydra/overrides.yaml."""
    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted, copy)
    (copy / "summary.json").unlink()  # a stopped run's copy
    shutil.rmtree(copy / ".hydra")
    assert cli_main(["train", f"run_dir={copy}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "rl.max_steps: 12 in the run" in err
    assert ("This copy of the run has no .hydra/overrides.yaml, from which a resume takes the "
            "run's own overrides: copy that folder from the run") in err


def test_a_copy_missing_a_part_of_its_checkpoints_is_not_told_to_start_again(uninterrupted,
                                                                              tmp_path, capsys):
    """A copy trimmed of checkpoints/ was told it "was killed before its first checkpoint" and
    to start anew with overwrite=true, which would delete the copy's data: it is told which
    parts it holds and to copy the missing one; a directory with none keeps the old advice."""
    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted, copy)
    for part in ("summary.json", "checkpoints"):  # a trimmed copy of a stopped run
        (shutil.rmtree if (copy / part).is_dir() else Path.unlink)(copy / part)
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    assert cli_main(["train", f"run_dir={copy}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "has no step with all three parts of a checkpoint" in err
    assert "it holds resume/ step_000008, step_000012; checkpoints/ none; trl/ checkpoint-8, " \
           "checkpoint-12. A copy that left a part out: copy it from the run" in err
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before
    shutil.rmtree(copy / "resume")
    assert cli_main(["train", f"run_dir={copy}", "resume=true"]) == 2
    assert ("holds step checkpoints (trl/) without their resume files. A copy that left "
            "resume/ out: copy it from the run") in capsys.readouterr().err  # the folders there
    shutil.rmtree(copy / "trl")
    assert cli_main(["train", f"run_dir={copy}", "resume=true"]) == 2
    assert "it stopped before its first checkpoint; start it again with overwrite=true" in \
        capsys.readouterr().err


def test_a_resume_without_the_runs_config_json_is_refused_once_a_step_was_saved(tmp_path):
    """A copy that lost config.json (or an emptied one) resumed with any settings, sae.k=8 over
    a k=4 run, and recorded them as the run's. Before the run's first saved step (killed while
    it started) there is nothing to mix, and the resume goes on to its own refusal."""
    from sae_shards.run.rundir import check_resume_config

    run = tmp_path / "run"
    run.mkdir()
    check_resume_config(run, {"sae": {"k": 8}}, "")  # killed before anything was saved
    (run / "resume").mkdir()
    (run / "resume" / "step_000004.safetensors").write_bytes(b"")
    for config in (None, "", "[]"):
        if config is not None:
            (run / "config.json").write_text(config)
        with pytest.raises(ValueError, match=r"config.json is missing or damaged, so the "
                                             r"resume's settings cannot be checked.*copy "
                                             r"config.json again from the run"):
            check_resume_config(run, {"sae": {"k": 8}}, "")
    (run / "config.json").write_text('{"sae": {"k": 4}}')
    with pytest.raises(ValueError, match=r"sae.k: 4 in the run, 8 now"):
        check_resume_config(run, {"sae": {"k": 8}}, "")


def test_config_differences_names_changed_settings_and_allows_the_free_ones():
    from sae_shards.run.rundir import config_differences

    saved = {"sae": {"k": 4, "lr": 1e-3}, "capture": {"targets": ["a", "b"]}, "seed": 0,
             "device": "cpu", "logging": {"mode": "offline"}, "runner": {"torch_threads": 1},
             "only_saved": 1, "rl": {"extra": {}}}
    now = {"sae": {"k": 8, "lr": 1e-3}, "capture": {"targets": ("a", "b")}, "seed": 0,
           "device": "cuda", "logging": {"mode": "disabled"}, "runner": {"torch_threads": 4},
           "only_now": 2, "rl": {"extra": {"beta": 0.1}}}
    # targets as list or tuple are the same setting; device, logging and threads may change;
    # a setting only one side knows (another version of the config) is not compared
    assert config_differences(saved, now) == [
        "rl.extra: {} in the run, {'beta': 0.1} now", "sae.k: 4 in the run, 8 now"]
    assert config_differences(saved, saved) == []


@pytest.mark.slow  # a Hydra sweep of subprocesses, stopped and resumed (~30 s)
def test_a_signal_stops_the_whole_sweep_and_resume_true_completes_it(uninterrupted, tmp_path):
    """SIGTERM during a sweep's first job stops it with a checkpoint and starts no other job;
    the same command with resume=true resumes that job (to the uninterrupted run's shards) and
    starts the others."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "sae_shards.cli", "train", "-m", "sae.k=4,2",
                             *ARGS, f"run_dir={sweep}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # a job's directory is named after its overrides, run_dir and logging left out
    job = lambda k: sweep / ",".join(sorted([*(a for a in ARGS if not a.startswith("logging")),  # noqa: E731
                                             f"sae.k={k}"]))
    first = job(4)
    _wait_for(first / "trl" / "checkpoint-4" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert json.loads((first / "summary.json").read_text())["interrupted"] is True
    assert not (job(2) / "rollouts.jsonl").exists()  # Hydra made its directory; nothing ran
    assert "not started (the sweep was stopped)" in err, err[-3000:]
    done = subprocess.run([sys.executable, "-m", "sae_shards.cli", "train", "-m", "sae.k=4,2",
                           *ARGS, f"run_dir={sweep}", "resume=true"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_run(uninterrupted, first)
    assert load_checkpoint(job(2) / "checkpoints" / "final").sae.cfg.k == 2


def test_an_earlier_checkpoint_is_read_with_its_own_timeline(uninterrupted):
    """activations.safetensors is the final SAE's encoding: an earlier checkpoint's shards are
    paired with that checkpoint's own buffer, re-encoded from its resume file, or refused when
    it kept none (only the two newest are kept), never with another checkpoint's timeline."""
    assert RunView(uninterrupted).recovered is None
    view = RunView(uninterrupted, "step_000008")
    steps, acts = view.timeline()
    assert view.recovered == "older" and steps.tolist() == list(range(1, 9))
    assert ((acts != 0).sum(1) == 4).all()
    with pytest.raises(CheckpointError, match=r"is the encoding of checkpoint final, and "
                                              r"checkpoint step_000004 has no resume file.*"
                                              r"step_000008"):
        RunView(uninterrupted, "step_000004")
    # an older checkpoint keeps its shards and drops the optimizer state only a resume reads
    checkpoints = uninterrupted / "checkpoints"
    assert sorted(p.parent.name for p in checkpoints.glob("*/training_state.safetensors")) == [
        "step_000008", "step_000012"]
    assert load_checkpoint(checkpoints / "step_000004").sae.input_scale > 0


def test_keep_checkpoints_bounds_the_step_checkpoints_a_long_run_leaves(tmp_path):
    """runner.keep_checkpoints=N keeps the newest N step checkpoints (and final); the run still
    resumes from the newest (the SIGKILL test resumes one whose older checkpoints were pruned)."""
    run = tmp_path / "run"
    run_job(_job(run, "runner.checkpoint_every=2", "runner.keep_checkpoints=2"), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "final", "step_000010", "step_000012"]
    assert all((run / "checkpoints" / name / "training_state.safetensors").is_file()
               for name in ("step_000010", "step_000012"))


# ---- found by mutation testing (audit 121): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

def test_a_resume_removes_only_the_later_steps_checkpoints(tmp_path):
    """R06: ``_remove_later(run_dir, step)`` removes the shards checkpoints and resume files of the
    steps AFTER the one the run resumes from; that step's own (and earlier ones) stay: the
    resumed run's ``--checkpoint step_000008`` and the next resume need them."""
    from sae_shards.capture.resume import _remove_later, checkpoint_dir
    from sae_shards.run import rundir

    for step in (4, 8, 12):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
        (checkpoint_dir(tmp_path, step) / "config.json").write_text("{}")
        rundir.resume_file(tmp_path, step).parent.mkdir(exist_ok=True)
        rundir.resume_file(tmp_path, step).write_bytes(b"x")
    _remove_later(tmp_path, 8)
    assert rundir.saved_steps(tmp_path / rundir.CHECKPOINTS) == [4, 8]
    assert rundir.saved_steps(tmp_path / rundir.RESUME) == [4, 8]


def test_a_step_log_one_row_short_is_refused(tmp_path):
    """R11: ``_check_logs`` refuses a step log holding fewer rows up to the checkpoint's step than
    the run had written then: one row short too (a hole in the resumed run's record)."""
    import json

    from sae_shards.capture.resume import _check_logs
    from sae_shards.core.checkpoint import CheckpointError

    rows = [{"step": s, "prompts": [f"p{s}"]} for s in (1, 2, 3)]
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _check_logs(tmp_path, 4, {"rollouts.jsonl": 3})  # as recorded: fine
    with pytest.raises(CheckpointError, match="2 rows up to RL step 4, where the run had written 3"):
        (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
        _check_logs(tmp_path, 4, {"rollouts.jsonl": 3})


def test_later_rows_do_not_make_up_for_a_missing_earlier_one(tmp_path):
    """A copy of a step log that lost a row of step 2 but holds rows of steps after the
    checkpoint (a run killed after step 4's checkpoint wrote them) is short, and refused as
    short, with or without the recorded last-row digest: only rows up to the checkpoint's step
    are counted (audit 124, R12)."""
    import json

    from sae_shards.capture.resume import _check_logs
    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.run import rundir

    rows = [{"step": s, "prompts": [f"p{s}"]} for s in (1, 2, 3, 5, 6)]
    log = tmp_path / "rollouts.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _check_logs(tmp_path, 4, {"rollouts.jsonl": 3})  # as recorded (rows after 4 not counted)
    log.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] != 2))
    for digests in ({}, {"rollouts.jsonl": rundir.row_digest(rows[2])}):
        with pytest.raises(CheckpointError,
                           match="2 rows up to RL step 4, where the run had written 3"):
            _check_logs(tmp_path, 4, {"rollouts.jsonl": 3}, digests)


def test_a_resume_cuts_every_step_log_back_to_its_step(tmp_path):
    """Rollouts, events and metrics rows of the steps a resume replaces go (a per-event run
    killed after step 4's checkpoint had logged events of steps 5-8: audit 124, R03), and so
    does TRL's end-of-training row, unless the step is the run's last."""
    import json

    from sae_shards.capture.resume import END_OF_TRAINING, cut_logs

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def read(name):
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    def fill():
        write("rollouts.jsonl", [{"step": s} for s in range(1, 9)])
        write("events.jsonl", [{"step": s, "event": e} for s in range(1, 9) for e in range(2)])
        write("metrics.jsonl", [*({"kind": "rl", "rl_step": s} for s in range(1, 9)),
                                {"kind": "sae", "rl_step": 4, "sae_step": 10},
                                {"kind": "rl", "rl_step": 4, END_OF_TRAINING: 1.0}])

    fill()
    cut_logs(tmp_path, 4)
    assert [r["step"] for r in read("rollouts.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in read("events.jsonl")] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [r.get("sae_step") for r in read("metrics.jsonl")] == [None] * 4 + [10]
    fill()
    cut_logs(tmp_path, 4, last=True)  # the run's last step: its end-of-training row stays
    assert read("metrics.jsonl")[-1] == {"kind": "rl", "rl_step": 4, END_OF_TRAINING: 1.0}


def test_the_resume_file_of_trls_newest_finished_checkpoint_is_kept(tmp_path):
    """The resume files kept are the KEEP newest and the step of TRL's newest finished
    checkpoint (a torn trainer_state.json is not finished): a script's trainer may save more
    rarely than the callback checkpoints, and resume_from_checkpoint=True takes TRL's newest
    (audit 124, R05)."""
    from sae_shards.capture.resume import KEEP, kept_resume_steps
    from sae_shards.run import rundir

    for step in (2, 4, 5, 6, 8):
        rundir.resume_file(tmp_path, step).parent.mkdir(exist_ok=True)
        rundir.resume_file(tmp_path, step).write_bytes(b"x")
    trl = tmp_path / "trl"
    for step, state in ((2, "{}"), (5, "{}"), (8, '{"log_history": [')):  # 8: torn by a kill
        (trl / f"checkpoint-{step}").mkdir(parents=True)
        (trl / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert KEEP == 2 and kept_resume_steps(tmp_path, trl) == {5, 6, 8}


def test_a_resumes_own_free_settings_are_not_the_runs_later_ones(killed, tmp_path, capsys):
    """A setting a resume may change (device, logging.*, runner.torch_threads...) applies to
    that attempt: .hydra/ keeps the overrides the run started with. The resume's overrides
    replaced them, so the attempt's runner.torch_threads=1 (or logging=disabled for one attempt
    while W&B was down) stuck to every later resume and to the command that starts the run
    again (audit 132 F1)."""
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    hydra_before = tree_bytes(run / ".hydra")
    weights = run / "trl" / "checkpoint-8" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # refused once .hydra/ would be written
    assert cli_main(["train", f"run_dir={run}", "resume=true", "runner.torch_threads=1"]) == 2
    assert "TRL could not load this checkpoint" in capsys.readouterr().err
    assert tree_bytes(run / ".hydra") == hydra_before
    weights.write_bytes(whole)
    from sae_shards.cli.rerun import rerun_command, resume_args

    assert "torch_threads" not in rerun_command(run)
    assert not any("torch_threads" in a for a in resume_args([f"run_dir={run}", "resume=true"])[0])


def test_resume_auto_continues_a_killed_run_and_starts_a_new_one(uninterrupted, killed, tmp_path,
                                                                 capsys):
    """One command for a job a scheduler starts and requeues: resume=auto continues the run in
    run_dir when it has a checkpoint (ending as the uninterrupted run), and otherwise starts
    it; resume=true refused a new run_dir and a plain start a killed run."""
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    assert cli_main(["train", f"run_dir={run}", "resume=auto"]) == 0
    assert f"sae-shards: resume=auto: continuing the run in {run}" in capsys.readouterr().err
    _same_run(uninterrupted, run)
    assert cli_main(["train", f"run_dir={run}", "resume=auto"]) == 2  # finished: as resume=true
    err = capsys.readouterr().err
    assert (f"config error: resume=auto: the run in run_dir={run} finished (12 RL steps, "
            "summary.json): there is nothing to resume. Analyze it") in err
    assert "(to replace it, overwrite=true in place of resume=auto)" in err
    assert "continuing" not in err
    fresh = tmp_path / "fresh"
    assert cli_main(["train", *ARGS, "rl.max_steps=4", f"run_dir={fresh}", "resume=auto"]) == 0
    assert f"resume=auto: starting a new run in {fresh}" in capsys.readouterr().err
    assert json.loads((fresh / "summary.json").read_text())["rl_steps"] == 4


def test_resume_auto_replaces_only_a_run_with_nothing_to_resume(tmp_path):
    from sae_shards.cli.hydra_config import ConfigError
    from sae_shards.cli.rerun import auto_resume_args

    early = tmp_path / "early"  # what a run killed before its first checkpoint leaves
    early.mkdir()
    (early / "rollouts.jsonl").write_text('{"step": 1}\n')
    assert auto_resume_args(["resume=auto", f"run_dir={early}", "sae.k=2"]) == [
        f"run_dir={early}", "sae.k=2", "resume=false", "overwrite=true"]
    (early / "checkpoints" / "step_000004").mkdir(parents=True)  # shards-only: no training state
    assert auto_resume_args([f"run_dir={early}", "resume=auto"])[-2:] == ["resume=false",
                                                                          "overwrite=true"]
    (early / "checkpoints" / "step_000004" / "training_state.safetensors").write_bytes(b"x")
    assert auto_resume_args([f"run_dir={early}", "resume=auto"])[-1] == "resume=true"  # a copy
    assert auto_resume_args([f"run_dir={early}", "resume=auto", "resume=false"]) == [
        f"run_dir={early}", "resume=auto", "resume=false"]  # the last resume= is Hydra's
    for spelt in ("++resume=auto", "resume='auto'", "resume=AUTO"):  # Hydra's type error
        assert auto_resume_args([f"run_dir={early}", spelt]) == [f"run_dir={early}",
                                                                 "resume=true"]
    # audit 135 F7: an interpolated run_dir was checked as its text, so every requeue of
    # run_dir=.../r_${seed} started a new run (refused as 'already holds a run')
    interpolated = str(tmp_path / "r_${seed}")
    shutil.copytree(early, tmp_path / "r_3")  # a run there (a copy's: resumed, to be refused)
    assert auto_resume_args([f"run_dir={interpolated}", "seed=3", "resume=auto"])[-1] == \
        "resume=true"
    assert auto_resume_args([f"run_dir={interpolated}", "seed=4", "resume=auto"])[-1] == \
        "resume=false"  # r_4: a new run
    # with an override of a free-form mapping, as the run itself takes it (audit 136 F6: it was
    # refused as 'cannot be resolved')
    assert auto_resume_args([f"run_dir={interpolated}", "seed=3", "rl.extra.beta=0.1",
                             "task.options.target_length=4", "resume=auto"])[-1] == \
        "resume=true"
    with pytest.raises(ConfigError, match="resume=auto of a sweep needs a plain run_dir"):
        auto_resume_args(["-m", f"run_dir={interpolated}", "seed=1,2", "resume=auto"])
    # an override Hydra cannot parse is left to Hydra's own refusal, not parsed here (audit
    # 136 F1: resume="auto ended in a traceback)
    assert auto_resume_args(["run_dir=a/b=c,d"]) == ["run_dir=a/b=c,d"]
    assert auto_resume_args(["run_dir=x", 'resume="auto']) == ["run_dir=x", 'resume="auto']
    sweep = tmp_path / "sweep"
    assert auto_resume_args(["-m", "sae.k=2,4", f"run_dir={sweep}",
                             "resume=auto"])[-1] == "resume=false"
    sweep.mkdir()  # made by hand, or a sweep killed before Hydra wrote multirun.yaml: a new
    assert auto_resume_args(["-m", "sae.k=2,4", f"run_dir={sweep}",  # one (audit 133 F5)
                             "resume=auto"])[-1] == "resume=false"
    (sweep / "multirun.yaml").write_text("{}")
    assert auto_resume_args(["-m", "sae.k=2,4", f"run_dir={sweep}",
                             "resume=auto"])[-1] == "resume=true"
    for bad, why in ((["resume=auto", "overwrite=true"], "leave overwrite=true out"),
                     (["-m", "run_dir=a,b", "resume=auto"], "needs one run_dir")):
        with pytest.raises(ConfigError, match=why):
            auto_resume_args(bad)


def test_resume_auto_decides_on_a_complete_step(tmp_path):
    """A kill while the first checkpoint is written (the likeliest moment: the slowest part of
    a step) leaves the parts of one step, none whole: nothing resumes, so resume=auto starts
    the run again. It resumed on any part present, and the resume was refused on every requeue
    (audit 133 F4). Parts of several steps, or a shards checkpoint without the resume file
    written before it, are a copy's: resumed, so that they are refused naming the part."""
    from sae_shards.run.rundir import auto_resume

    def run_with(*parts: str) -> Path:
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        (run / "config.json").parent.mkdir(parents=True)
        (run / "rollouts.jsonl").write_text('{"step": 1}\n')
        for part in parts:
            (run / part).parent.mkdir(parents=True, exist_ok=True)
            if part.endswith("/"):
                (run / part).mkdir(exist_ok=True)
            else:
                (run / part).write_text("{}")
        return run

    resume4, state4 = "resume/step_000004.safetensors", "checkpoints/step_000004/training_state.safetensors"
    trl4 = "trl/checkpoint-4/trainer_state.json"
    torn = run_with(resume4, "checkpoints/.step_000004.tmp-x/sae.safetensors", "trl/checkpoint-4/")
    assert auto_resume(torn, with_trl=True) == (False, True)  # the audit's state: replaced
    assert auto_resume(run_with(resume4), with_trl=False) == (False, True)  # a script's
    assert auto_resume(run_with(resume4, state4, trl4), with_trl=True) == (True, False)
    assert auto_resume(run_with(resume4, state4), with_trl=False) == (True, False)
    assert auto_resume(run_with(resume4, state4), with_trl=True) == (False, True)  # TRL torn
    assert auto_resume(run_with(state4), with_trl=True) == (True, False)  # no resume/: a copy
    assert auto_resume(run_with(resume4, "resume/step_000008.safetensors"),
                       with_trl=True) == (True, False)  # parts of two steps: a copy
    # and the CLI starts the torn run again, removing what it wrote
    from sae_shards.cli.rerun import auto_resume_args

    assert auto_resume_args([f"run_dir={torn}", "resume=auto"])[-2:] == ["resume=false",
                                                                         "overwrite=true"]


@pytest.mark.parametrize("keep, kept", [(0, [2, 4, 6, 8, 10, 12]), (2, [10, 12]),
                                        (3, [8, 10, 12]), (5, [4, 6, 8, 10, 12])])
def test_keep_checkpoints_keeps_exactly_the_newest_n(tmp_path, keep, kept):
    """Audit 145 S1: runner.keep_checkpoints=N was tested at 2 only, where the two newest have
    resume files and stay whatever the rule says: keeping N - 1 went unseen. The newest N step
    checkpoints stay (those with a resume file always), and only those with a resume file keep
    their optimizer state."""
    from sae_shards.capture.resume import prune_checkpoints
    from sae_shards.core.checkpoint import STATE_FILE
    from sae_shards.run import rundir

    run = tmp_path / "run"
    for step in range(2, 13, 2):
        folder = run / rundir.CHECKPOINTS / rundir.step_name(step)
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_bytes(b"state")
    for step in (10, 12):
        rundir.resume_file(run, step).parent.mkdir(exist_ok=True)
        rundir.resume_file(run, step).write_bytes(b"resume")
    prune_checkpoints(run, keep)
    assert rundir.saved_steps(run / rundir.CHECKPOINTS) == kept
    with_state = [s for s in kept
                  if (run / rundir.CHECKPOINTS / rundir.step_name(s) / STATE_FILE).exists()]
    assert with_state == [10, 12]


def test_the_latest_checkpoint_is_final_only_once_the_runs_end_was_written(tmp_path):
    """Audit 145 S5: a run killed while writing its end has final/ but no activations: its
    newest step checkpoint (with a resume file to re-encode the buffer) is the one to read."""
    from sae_shards.run import rundir

    run = tmp_path / "run"
    for name in ("final", rundir.step_name(5), rundir.step_name(10)):
        (run / rundir.CHECKPOINTS / name).mkdir(parents=True)
    for step in (5, 10):
        rundir.resume_file(run, step).parent.mkdir(exist_ok=True)
        rundir.resume_file(run, step).write_bytes(b"resume")
    assert rundir.latest_checkpoint(run) == rundir.step_name(10)
    (run / rundir.ACTIVATIONS).write_bytes(b"written at the end")
    assert rundir.latest_checkpoint(run) == "final"
    (run / rundir.ACTIVATIONS).unlink()
    for step in (5, 10):
        shutil.rmtree(run / rundir.CHECKPOINTS / rundir.step_name(step))
    assert rundir.latest_checkpoint(run) == "final"  # nothing else to read
