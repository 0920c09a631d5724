"""ShardCallback in a plain TRL script: one added line gives a run directory that ShardSet,
RunView and ``sae-shards analyze`` read (GRPO and RLOO), and its arguments are validated early."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from sae_shards import CheckpointError, RunView, ShardCallback, ShardSet
from sae_shards.capture import resume as resume_state
from sae_shards.cli import main as cli_main
from sae_shards.core.checkpoint import STATE_FILE
from sae_shards.recipe.models import build_tiny_model
from sae_shards.run import rundir
from sae_shards.run.versions import run_versions

from helpers import tree_bytes

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "trl_script.py"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def test_example_adds_exactly_one_sae_shards_line():
    lines = [ln for ln in EXAMPLE.read_text().splitlines() if "ShardCallback" in ln
             and not ln.lstrip().startswith(("#", '"'))]
    imports = [ln for ln in lines if ln.startswith("from sae_shards")]
    uses = [ln for ln in lines if not ln.startswith("from sae_shards")]
    assert len(imports) == 1 and len(uses) == 1
    assert uses[0].strip().startswith("trainer.add_callback(ShardCallback(run_dir=")


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_plain_trl_script_run_is_analysable(tiny_model, tmp_path, algorithm, capsys):
    run = tmp_path / f"run_{algorithm}"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", str(tiny_model), "--run-dir", str(run),
         "--algorithm", algorithm, "--steps", "12"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["rl_steps"] == 12 and summary["captured"] == 12
    assert summary["final_checkpoint"] == "checkpoints/final"  # relative: a moved run's too
    assert summary["sae_steps"] == (12 - 8 + 1) * 4  # min_samples 8, 4 SAE steps per RL step
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["path"] == str(tiny_model) and config["task"] is None
    assert config["rl"]["algorithm"] == ("GRPOTrainer" if algorithm == "grpo" else "RLOOTrainer")
    assert (config["world_size"], config["launch"], config["distribution"]) == (
        1, "", "one process")  # what a resume must match

    shards = ShardSet.from_run(run)
    assert len(shards) == 64 and len(shards.target_names) == 14  # every block matrix
    view = RunView(run)
    assert sorted(view.rollouts) == list(range(1, 13))
    row = view.rollouts[5]
    assert len(row["prompts"]) == len(row["completions"]) == len(row["advantages"]) == 8
    # the reward function's log_extra("task", ...) reached the rollouts
    assert set(row["tasks"]) <= {"vowels", "digits"} and len(row["tasks"]) == 8
    assert all(p.startswith(t[0]) for p, t in zip(row["prompts"], row["tasks"]))
    busiest = int(view.density().argmax())
    top = view.top_steps(busiest, k=3)
    assert top and all(t["rollout"]["step"] == t["rl_step"] for t in top)
    assert [r["rl_step"] for r in view.rl_metrics if "reward" in r] == list(range(1, 13))

    capsys.readouterr()
    assert cli_main(["analyze", str(run), "--shards", "2"]) == 0
    html = (run / "report.html").read_text()
    assert 'id="logit-lens"' in html and "<img" in html
    assert "--task FILE.py:NAME" in html  # no reward to score the dose-response with
    assert f"<td>initial weights</td><td>{tiny_model}</td>" in html  # read from its directory
    assert "hand them back with --task FILE.py:NAME" in capsys.readouterr().err  # said there too
    analysis = json.loads((run / "analysis.json").read_text())
    assert not any("dose_response" in e for e in analysis["shards"].values())
    if algorithm == "rloo":
        return
    # the reward handed back: every detailed shard's dose-response, per context
    assert cli_main(["analyze", str(run), "--shards", "2",
                     "--task", f"{EXAMPLE}:reward_task"]) == 0
    analysis = json.loads((run / "analysis.json").read_text())
    doses = [e["dose_response"] for e in analysis["shards"].values()]
    assert len(doses) == len(analysis["shards"]) >= 2
    for entry in analysis["shards"].values():
        assert sorted(entry["ablation"]["removed_by_label"]) == ["digits", "vowels"]
        assert entry["ablation"]["n_by_label"] == {"digits": 64, "vowels": 64}  # balanced
        assert entry["ablation"]["coefficient"] == entry["update_coefficient"]
    for dose in doses:
        assert sorted(dose["shard_by_label"]) == ["digits", "vowels"]
        assert dose["shard"][2] == dose["control"][2]  # alpha 0: the same weights and seed
        assert all(0.0 <= r <= 1.0 for r in dose["shard"] + dose["control"])
    html = (run / "report.html").read_text()
    assert "reward_vowels_or_digits x 1" in html and "--task FILE.py:NAME" not in html
    assert "<b>Note:</b>" not in html  # the script's own reward task: nothing unlike the run
    # sampled as the run did: TRL's settings, recorded by the callback
    from sae_shards.analysis.shards import run_sampling

    assert run_sampling(run) == {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0,
                                 "top_k": 0, "repetition_penalty": 1.0, "training_steps": 12,
                                 "reward_batch": 8}  # TRL's generation batch: 8 per call
    assert "max_new_tokens=8, temperature=1.0" in html
    assert "batches of whole prompts, up to 8 completions" in html
    # a broken reward fails in seconds, named; a task with other contexts is noted
    bad = tmp_path / "bad_task.py"
    bad.write_text("from sae_shards.analysis.reward_task import RewardTask\n"
                   "def broken(prompts, completions, **kw):\n    return [0.0]\n"
                   "BROKEN = RewardTask([{'prompt': 'v 1'}], broken)\n"
                   "def const(prompts, completions, **kw):\n    return [0.5] * len(completions)\n"
                   "OTHER = RewardTask([{'prompt': 'v 1', 'kind': 'X'}], const, "
                   "label_column='kind')\n"
                   "HEAVY = RewardTask([{'prompt': 'v 1'}], const, reward_weights=[2.0])\n")
    capsys.readouterr()
    assert cli_main(["analyze", str(run), "--task", f"{bad}:BROKEN"]) == 2
    # the first try: two prompts, a whole group of 4 completions each
    assert "reward function 'broken' returned 1 rewards for 8 completions" in \
        capsys.readouterr().err
    assert cli_main(["analyze", str(run), "--no-dose", "--task", f"{bad}:OTHER"]) == 2
    assert "--no-dose skips" in capsys.readouterr().err
    assert cli_main(["analyze", str(run), "--shards", "0", "--task", f"{bad}:OTHER"]) == 0
    assert "contexts [&#x27;X&#x27;] are none of the run" in (run / "report.html").read_text()
    # the run's reward weights are recorded, and a task scoring with others is noted
    trained = json.loads((run / "config.json").read_text())["rl"]
    assert trained["reward_weights"] == [1.0] and trained["loss_type"] is not None
    assert "reward_weights" not in (run / "report.html").read_text()
    assert cli_main(["analyze", str(run), "--shards", "0", "--task", f"{bad}:HEAVY"]) == 0
    assert ("the run trained with reward_weights [1.0], the reward task scores with [2.0]"
            in (run / "report.html").read_text())


def test_bad_arguments_fail_at_construction(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"capture.source='gradient' is not one of"):
        ShardCallback(run_dir=tmp_path / "a", source="gradient")
    with pytest.raises(ValueError, match=r"sae.k=9 must be between 1 and sae.n_latents=8"):
        ShardCallback(run_dir=tmp_path / "b", sae={"n_latents": 8, "k": 9})
    with pytest.raises(ValueError, match=r"sae.k=8 equals sae.n_latents: every latent would be"):
        ShardCallback(run_dir=tmp_path / "b", sae={"n_latents": 8, "k": 8})  # dense
    with pytest.raises(ValueError, match=r"unknown config keys \['sae.n_latent \(did you mean "
                                         r"sae.n_latents\?\)'\]"):
        ShardCallback(run_dir=tmp_path / "c", sae={"n_latent": 8})
    with pytest.raises(ValueError, match=r"capture.targets: expected a list, got '\*.weight'; a "
                                         r"list of one is written \['\*.weight'\]"):
        ShardCallback(run_dir=tmp_path / "c", targets="*.weight")  # the Python form, first
    with pytest.raises(ValueError, match=r"runner.min_samples=8 exceeds .* capture.capacity=4"):
        ShardCallback(run_dir=tmp_path / "d", capacity=4)
    with pytest.raises(ValueError, match=r"sae.use_b_dec=true is not supported with factored"):
        ShardCallback(run_dir=tmp_path / "a", capture={"granularity": "group"},
                      sae={"use_b_dec": True})
    with pytest.raises(ValueError, match=r"sae.autocast_bf16=true is not supported with fact"):
        ShardCallback(run_dir=tmp_path / "a", capture={"granularity": "group"},
                      sae={"autocast_bf16": True})
    with pytest.raises(ValueError, match=r"resume=True, overwrite=True\) contradict"):
        ShardCallback(run_dir=tmp_path / "a", resume=True, overwrite=True)
    # plain arguments of the wrong type (label_column=3 was taken, and no label ever matched)
    with pytest.raises(ValueError, match=r"label_column=3 \(expected a column name or None\), "
                                         r"resume='yes' \(expected True, False or \"auto\"\)"):
        ShardCallback(run_dir=tmp_path / "a", label_column=3, resume="yes")
    with pytest.raises(ValueError, match=r"seed=True \(expected an int\)"):
        ShardCallback(run_dir=tmp_path / "a", seed=True)
    # audit 143: these raised dict()'s, pathlib's or dataclasses' own errors, naming no argument
    with pytest.raises(ValueError, match=r"run_dir=None \(expected a directory path: a str or "
                                         r"a Path\), sae='big' \(expected SAEConfig\(...\), a "
                                         r"dict of its fields, or None\), capture='group' "
                                         r"\(expected CaptureConfig.*runner='thread' \(expected "
                                         r"RunnerConfig"):
        ShardCallback(run_dir=None, sae="big", capture="group", runner="thread")
    with pytest.raises(ValueError, match=r"label_column='' names no column; give the dataset's "
                                         r"context column, or None"):  # it recorded no context
        ShardCallback(run_dir=tmp_path / "a", label_column="")
    for seed in (-1, 2**32):  # as sae-shards train's
        with pytest.raises(ValueError, match=rf"seed={seed} must be between 0 and 2\*\*32 - 1"):
            ShardCallback(run_dir=tmp_path / "a", seed=seed)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # "~" as TrainingArguments takes it
    home = ShardCallback(run_dir="~/runs/x")
    assert home.run_dir == tmp_path / "home" / "runs" / "x" and not Path("~").exists()
    home.close()
    # a meta a checkpoint cannot hold failed the run at its first checkpoint, after its steps
    # (a Path: a raw TypeError from the background writer, nothing resumable), and one naming
    # sae-shards' own keys replaced them: compare then said two runs of one source learnt from
    # other samples (audit 131 F7, F8)
    with pytest.raises(ValueError, match=r"meta .*'data' holds a PosixPath, which JSON cannot "
                                         r"hold exactly .*'x' holds a float"):
        ShardCallback(run_dir=tmp_path / "a", meta={"data": Path("/data/x"), "x": math.nan})
    with pytest.raises(ValueError, match=r"'source' is sae-shards' own \(the checkpoint's "
                                         r"source; name yours otherwise\); 1 is not a string key"):
        ShardCallback(run_dir=tmp_path / "a", meta={"source": "gsm8k", 1: "x"})
    callback = ShardCallback(run_dir=tmp_path / "e")
    for bad in (-1, True, 15.0, "SIGTERM"):  # -1 would be lost in the ranks' stop vote
        with pytest.raises(ValueError, match=rf"request_stop\(signum={bad!r}\): give a signal"):
            callback.request_stop(bad)
    assert callback.stop_signal is None
    callback.request_stop(15)
    assert callback.stop_signal == 15
    callback.request_stop(signal.SIGINT)  # a signal.Signals, as a script would name it
    assert callback.stop_signal == signal.SIGINT
    callback.close()
    assert not (tmp_path / "a").exists()  # nothing written for a refused callback


def test_a_shortcut_that_contradicts_capture_or_runner_is_refused(tmp_path):
    """ShardCallback(concurrency="inline", runner={"concurrency": "thread"}) used to train
    inline without a word (the shortcut won): a field set twice to different values is refused
    at construction, naming both; set once, or twice alike, it is taken."""
    from sae_shards import CaptureConfig, RunnerConfig

    with pytest.raises(ValueError, match=r"ShardCallback\(concurrency='inline', runner=\.\.\.\) "
                                         r"sets runner.concurrency twice, to 'inline' and to "
                                         r"'thread': give it in one place"):
        ShardCallback(run_dir=tmp_path / "a", concurrency="inline",
                      runner={"concurrency": "thread"})
    with pytest.raises(ValueError, match=r"sets capture.capacity twice, to 64 and to 512"):
        ShardCallback(run_dir=tmp_path / "b", capacity=64, capture={"capacity": 512})
    with pytest.raises(ValueError, match=r"sets runner.checkpoint_every twice, to 10 and to 5"):
        ShardCallback(run_dir=tmp_path / "c", checkpoint_every=10,
                      runner=RunnerConfig(checkpoint_every=5))
    assert not (tmp_path / "a").exists()  # refused before the run directory is made
    agree = ShardCallback(run_dir=tmp_path / "d", concurrency="thread",
                          runner={"concurrency": "thread", "max_lag": 2},
                          capacity=64, capture=CaptureConfig(source="grad"))
    assert (agree.runner_cfg.concurrency, agree.runner_cfg.max_lag) == ("thread", 2)
    assert (agree.capture_cfg.capacity, agree.capture_cfg.source) == (64, "grad")
    agree.close()


def test_a_budget_beside_a_fixed_step_count_is_refused(tmp_path):
    """ShardCallback(sae_steps_per_rl_step=8, runner={"sae_budget": 0.05}) ran the budget's
    steps and ignored the 8 without a word: a budget and a fixed count given together are
    refused at construction, however they are given; either alone, or a budget of 0, is taken."""
    from sae_shards import RunnerConfig

    for kwargs in [{"sae_steps_per_rl_step": 8, "runner": {"sae_budget": 0.05}},
                   {"runner": {"sae_budget": 0.05, "sae_steps_per_rl_step": 8}},
                   {"sae_steps_per_rl_step": 8, "runner": RunnerConfig(sae_budget=0.05)}]:
        with pytest.raises(ValueError, match=r"runner.sae_budget=0.05 and runner.sae_steps_per_"
                                             r"rl_step=8 are both set in ShardCallback's "
                                             r"arguments: .*drop one"):
            ShardCallback(run_dir=tmp_path / "a", **kwargs)
    assert not (tmp_path / "a").exists()
    for kwargs in [{"sae_steps_per_rl_step": 8, "runner": {"sae_budget": 0}},
                   {"runner": RunnerConfig(sae_budget=0.05)}]:
        ShardCallback(run_dir=tmp_path / "b", overwrite=True, **kwargs).close()


def test_one_callback_trains_one_run(tiny_model, tmp_path):
    """A second trainer.train() with the same callback is refused before it writes anything: it
    would put its RL steps into the same run again (rollouts 1..N twice, the buffer and SAE
    mixed) after the first run let go of the directory's lock."""
    callback = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2})
    trainer = _user_trainer(tiny_model, tmp_path / "trl", [callback], max_steps=3)
    trainer.train()
    written = tree_bytes(tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"already trained into .* "
                                           r"ShardCallback\(run_dir=\.\.\., resume=True\)"):
        trainer.train()
    assert tree_bytes(tmp_path / "run") == written


def test_one_run_dir_has_one_writer_per_trainer(tiny_model, tmp_path):
    """The same callback added twice (transformers warns, then calls it twice per event) or two
    callbacks on one run_dir are refused at train begin, before any RL step or run file; two
    callbacks with directories of their own train side by side."""
    callback = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2})
    trainer = _user_trainer(tiny_model, tmp_path / "trl", [callback], max_steps=2)
    trainer.add_callback(callback)
    with pytest.raises(ValueError, match=r"2 writers of run_dir=.*run \(the same "
                                         r"ShardCallback is added twice\).*remove_callback"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert [p.name for p in (tmp_path / "run").iterdir()] == [rundir.LOCK]
    callback.close()

    first = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2})
    second = ShardCallback(run_dir=tmp_path / "sub" / ".." / "run", runner={"min_samples": 2})
    trainer = _user_trainer(tiny_model, tmp_path / "trl", [first, second], max_steps=2)
    with pytest.raises(ValueError, match=r"\(2 ShardCallbacks were made with this run_dir\)"):
        trainer.train()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [rundir.LOCK]
    first.close(), second.close()

    first = ShardCallback(run_dir=tmp_path / "a", runner={"min_samples": 2})
    second = ShardCallback(run_dir=tmp_path / "b", runner={"min_samples": 2})
    _user_trainer(tiny_model, tmp_path / "trl", [first, second], max_steps=2).train()
    assert first.summary["rl_steps"] == second.summary["rl_steps"] == 2


def test_sae_figures_join_the_trainers_wandb_run(tiny_model, tmp_path, monkeypatch):
    """With ``report_to="wandb"`` the SAE's figures and the shards artifact go to the run TRL's
    own W&B callback opened, which stays the trainer's (the callback does not finish it)."""
    import glob

    import wandb
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from helpers import finished_records
    from sae_shards.recipe.tasks import build_task

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # W&B's process-wide settings read the environment once: read it again
    task = build_task("letters", target_length=8)
    config = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=6, learning_rate=3e-4,
                        per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=8, use_cpu=True, bf16=False, report_to=["wandb"],
                        save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = GRPOTrainer(model=str(tiny_model), reward_funcs=task.reward_funcs, args=config,
                          train_dataset=Dataset.from_dict(task.dataset(32).to_dict()))
    callback = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2})
    trainer.add_callback(callback)
    trainer.train()
    assert wandb.run is not None  # still the trainer's: the callback did not finish it
    wandb.finish()
    (file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = finished_records(file, ("exit", "artifact"))
    keys = {it.key or "/".join(it.nested_key)
            for rec in records if rec.WhichOneof("record_type") == "history"
            for it in rec.history.item}
    artifacts = [rec.artifact.name for rec in records if rec.WhichOneof("record_type") == "artifact"]
    assert {"sae/fvu", "sae/step", "sae/rl_step", "train/reward"} <= keys
    assert artifacts == ["shards-run"]
    assert not (tmp_path / "run" / "wandb").exists()  # no second W&B run of its own


def test_reading_a_wandb_file_mid_write_gives_its_complete_records(tmp_path, monkeypatch):
    """W&B's service process appends to the run file while a test reads it: a cut at any byte
    must give a prefix of the finished file's records, never a parse error."""
    import glob

    import wandb

    from helpers import read_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    run = wandb.init(project="read-records")
    for i in range(40):
        run.log({"x": i, "text": "y" * (i * 97)})  # records of many lengths, some over a block
    run.finish()
    (file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(file).read_bytes()
    whole = [rec.SerializeToString() for rec in read_records(file)]
    assert len(whole) > 40 and len(data) > 32768  # every history record, across a block boundary
    cut = tmp_path / "cut.wandb"
    seen = set()
    for end in range(8, len(data), 61):
        cut.write_bytes(data[:end])
        part = [rec.SerializeToString() for rec in read_records(cut)]
        assert part == whole[:len(part)]
        seen.add(len(part))
    assert len(seen) > 40  # the cuts did stop at many different records


class _StopAt(TrainerCallback):
    """Asks the ShardCallback to stop after RL step ``step`` (as a SIGTERM handler would)."""

    def __init__(self, shards: ShardCallback, step: int) -> None:
        self.shards, self.step = shards, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.shards.request_stop()


def _user_trainer(tiny_model, out_dir, callbacks, max_steps=10, n_prompts=64, peft_config=None,
                  model=None, dataset=None, reward_funcs=None, **overrides):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from sae_shards.recipe.tasks import build_task

    task = build_task("letters", target_length=8)
    settings = dict(output_dir=str(out_dir), max_steps=max_steps, learning_rate=3e-4, seed=3,
                    per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                    use_cpu=True, bf16=False, report_to="none", save_strategy="steps",
                    save_steps=5, logging_steps=1, disable_tqdm=True)
    config = GRPOConfig(**{**settings, **overrides})
    return GRPOTrainer(model=str(tiny_model) if model is None else model,
                       reward_funcs=reward_funcs or task.reward_funcs, args=config,
                       train_dataset=dataset if dataset is not None else Dataset.from_dict(
                           task.dataset(n_prompts).to_dict()),
                       callbacks=callbacks, peft_config=peft_config)


def _assert_same_ending(whole: Path, cut: Path) -> None:
    """The two runs had the same rollouts and end with the same shards, bit for bit."""
    assert (whole / "rollouts.jsonl").read_text() == (cut / "rollouts.jsonl").read_text()
    a, b = (load_file(run / "checkpoints" / "final" / "sae.safetensors") for run in (whole, cut))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)


def _seeded_run(tiny_model, tmp_path, name: str, stop_at: int | None = None) -> ShardCallback:
    """``_user_trainer``'s run into ``tmp_path/name`` (TRL's into ``trl_name``) from seed 0,
    asked to stop after RL step ``stop_at`` when given; its callback."""
    torch.manual_seed(0)
    callback = ShardCallback(run_dir=tmp_path / name, runner={"min_samples": 2})
    stop = [_StopAt(callback, stop_at)] if stop_at is not None else []
    _user_trainer(tiny_model, tmp_path / f"trl_{name}", [callback, *stop]).train()
    return callback


@pytest.fixture(scope="module")
def whole(tiny_model, tmp_path_factory) -> Path:
    """``_seeded_run``'s uninterrupted run, which tests compare their stopped and resumed runs
    with (read only: one for the module, not one per test)."""
    where = tmp_path_factory.mktemp("seeded")
    _seeded_run(tiny_model, where, "whole")
    return where / "whole"


def _refused_resume(tiny_model, run, out, match: str, resume_from: str | bool = True) -> None:
    """A script's resume of ``run`` (TRL's side in ``out``; from ``resume_from``) refused with a
    CheckpointError matching ``match``, before its first step."""
    again = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume=True)
    with pytest.raises(CheckpointError, match=match):
        _user_trainer(tiny_model, out, [again]).train(resume_from_checkpoint=resume_from)


def test_a_damaged_resume_file_says_how_to_resume_from_the_step_before(tiny_model, whole,
                                                                        tmp_path, capsys):
    """Audit 111: a truncated resume file stopped the resume naming the file, with advice for
    analyze (--checkpoint); the way on at 3 a.m. is to delete that step's sae-shards files and
    resume from the step before, which the refusal now says, with TRL's checkpoint to pass,
    and which ends as the uninterrupted run. A script's run given to `sae-shards train
    resume=true` is told to resume from its script (it was told of seven changed settings and
    a missing .hydra/)."""
    run, out = tmp_path / "cut", tmp_path / "trl_cut"
    _seeded_run(tiny_model, tmp_path, "cut", stop_at=7)
    capsys.readouterr()
    assert cli_main(["train", f"run_dir={run}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert ("was written by a script's ShardCallback, not by sae-shards train" in err
            and "trainer.train(resume_from_checkpoint=True)" in err), err
    damaged = run / "resume" / "step_000007.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:200])
    _refused_resume(tiny_model, run, out, (
        f"{damaged}: cannot be read as safetensors .* damaged — restore the file from a copy "
        f"of the run\\. To resume from RL step 5 instead, "
        f"delete {damaged} and {run / 'checkpoints' / 'step_000007'} \\(a script then passes "
        f"resume_from_checkpoint='{out / 'checkpoint-5'}'\\)"))
    # the step before must have TRL's checkpoint too (audit 112 F1: rotated away by TRL)
    from sae_shards.capture.resume import _resume_before

    assert _resume_before(run, 7, tmp_path / "no_trl") == (
        "No checkpoint before RL step 7 is complete: restore the file, or start anew")
    damaged.unlink()
    shutil.rmtree(run / "checkpoints" / "step_000007")
    torch.manual_seed(0)
    again = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume=True)
    _user_trainer(tiny_model, out, [again]).train(resume_from_checkpoint=str(out / "checkpoint-5"))
    assert again.summary["rl_steps"] == 10
    _assert_same_ending(whole, run)


def test_a_part_copied_in_from_another_run_is_refused_on_resume(tiny_model, tmp_path, caplog):
    """Audit 111: a resume took trl/, resume/, checkpoints/ or rollouts.jsonl copied from
    another run of the same settings (another seed) without a word, mixing two runs under one
    record (the policy went on from the other run's weights). The shards checkpoint and the
    resume file record the run's id (config.json's run_id), each log the digest of its last
    row; TRL's checkpoint is checked by what it logged; a foreign part is refused, naming it."""
    run, out = tmp_path / "cut", tmp_path / "trl_cut"
    _seeded_run(tiny_model, tmp_path, "cut", stop_at=7)
    other = ShardCallback(run_dir=tmp_path / "other", runner={"min_samples": 2})
    _user_trainer(tiny_model, tmp_path / "trl_other", [other, _StopAt(other, 7)], seed=4).train()
    run_id = json.loads((run / "config.json").read_text())["run_id"]
    parts = {"resume": ("resume/step_000007.safetensors", "resume/step_000007.safetensors"),
             "shards": ("checkpoints/step_000007", "checkpoints/step_000007")}
    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}_kept", symlinks=True)
    kept = tmp_path.parent / f"{tmp_path.name}_kept"
    for name, (theirs, ours) in parts.items():
        target = run / ours
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        copy = shutil.copytree if (tmp_path / "other" / theirs).is_dir() else shutil.copy
        copy(tmp_path / "other" / theirs, target)
        foreign = (f"RL step 7's checkpoint holds parts of another run than this one "
                   f"\\(config.json's run_id {run_id}\\): {re.escape(str(target))} "
                   f"\\(run [0-9a-f]{{32}}\\)")
        _refused_resume(tiny_model, run, out, foreign)
        if name == "resume":  # sae-shards train's check before it writes: the file, not a log
            with pytest.raises(CheckpointError, match=foreign):
                resume_state.check_step_logs(run, 7)
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        copy(kept / "cut" / ours, target)
    # TRL's checkpoint of the other run, given by path: what it logged is not what this run did
    _refused_resume(tiny_model, run, out, r"the TRL checkpoint the trainer resumed from \(RL "
                    r"step 7\) logged other values at RL step 7 than this run did \(.* in "
                    r"metrics.jsonl, .* in TRL's\): its policy and optimizer are another run's",
                    resume_from=str(tmp_path / "trl_other" / "checkpoint-7"))
    shutil.copy(tmp_path / "other" / "rollouts.jsonl", run / "rollouts.jsonl")  # as many rows
    _refused_resume(tiny_model, run, out, r"rollouts.jsonl: row 7 of those up to RL step 7 is "
                                          r"not the row the run had written there")
    with pytest.raises(CheckpointError, match="is not the row the run had written there"):
        resume_state.check_step_logs(run, 7)  # sae-shards train's check (audit 114 M14)
    shutil.copy(kept / "cut" / "rollouts.jsonl", run / "rollouts.jsonl")
    # config.json without run_id, as a resume by an earlier version rewrites it (audit 112 F7:
    # a new id was drawn and every part of the run's own was refused): the resume file's again
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                 if k != "run_id"}))
    # ... resumed by path from a copy of its TRL checkpoint without the RNG state (audit 113
    # F4: transformers goes on without it, saying so at INFO only, and the run is not the
    # uninterrupted one): the copy given by path is the one checked, and named
    copied = tmp_path / "copied" / "checkpoint-7"
    shutil.copytree(out / "checkpoint-7", copied)
    (copied / "rng_state.pth").unlink()
    again = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume=True)
    with caplog.at_level("WARNING", logger="sae_shards.capture.callback"):
        _user_trainer(tiny_model, out, [again]).train(resume_from_checkpoint=str(copied))
    assert again.summary["rl_steps"] == 10  # its own: goes on
    assert f"{copied} holds no rng_state.pth, the random state of process 0" in caplog.text
    assert json.loads((run / "config.json").read_text())["run_id"] == run_id
    # ... and so do the parts written after it (audit 114 M09: they recorded none, and a later
    # resume could not tell them from another run's)
    assert resume_state._resume_info(run, 10)["run_id"] == run_id
    final = json.loads((run / "checkpoints" / "final" / "config.json").read_text())
    assert final["meta"]["run_id"] == run_id
    shutil.rmtree(kept)


def test_resume_from_passes_over_a_trl_checkpoint_a_kill_left_torn(tiny_model, whole,
                                                                     tmp_path, caplog):
    """A kill while TRL wrote checkpoint-7 leaves it without trainer_state.json (TRL writes it
    last): resume_from_checkpoint=True picks it and transformers stops with its own
    FileNotFoundError. callback.resume_from(trainer) names checkpoint-5, warns about 7, and the
    run resumed from it ends as the uninterrupted one."""
    run, out = tmp_path / "cut", tmp_path / "trl_cut"
    _seeded_run(tiny_model, tmp_path, "cut", stop_at=7)
    state = out / "checkpoint-7" / "trainer_state.json"
    # a reader of the killed run (its end never written) reads the step a resume continues
    # from: 7 while TRL's checkpoint-7 is whole, 5 once the kill tore it (it read 7, which the
    # resume then removed, and had no TRL policy of 7 to pair with)
    import shutil

    from sae_shards.run.rundir import latest_checkpoint

    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    for name in ("activations.safetensors", "summary.json"):
        (killed / name).unlink()
    assert latest_checkpoint(killed) == "step_000007"
    state.unlink()  # as the kill leaves it
    assert latest_checkpoint(killed) == "step_000005"
    callback = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume=True)
    trainer = _user_trainer(tiny_model, out, [callback])
    with caplog.at_level("WARNING", logger="sae_shards.capture.callback"):
        path = callback.resume_from(trainer)
    assert path == str(out / "checkpoint-5")
    assert "holds checkpoints that are not complete on both sides (checkpoint-7" in caplog.text
    trainer.train(resume_from_checkpoint=path)
    assert callback.summary["rl_steps"] == 10 and not callback.summary["interrupted"]
    _assert_same_ending(whole, run)
    fresh = ShardCallback(run_dir=tmp_path / "new", runner={"min_samples": 2})
    assert fresh.resume_from(_user_trainer(tiny_model, tmp_path / "trl_new", [fresh])) is None


def test_resume_from_a_run_whose_trl_checkpoints_are_gone_says_so(tiny_model, tmp_path):
    """Audit 135 F3: a stopped script run whose TRL output_dir was wiped (job-local scratch)
    was said to be continued under resume="auto", then refused at its first step with advice to
    pass resume_from_checkpoint=True, on every requeue alike. resume_from now says what is
    missing and the ways on, before anything trains; the run directory is left free."""
    import shutil

    run, out = tmp_path / "wiped", tmp_path / "trl_wiped"
    _seeded_run(tiny_model, tmp_path, "wiped", stop_at=5)
    shutil.rmtree(out)
    for resume in (True, "auto"):
        callback = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume=resume)
        trainer = _user_trainer(tiny_model, out, [callback])
        with pytest.raises(CheckpointError) as e:
            callback.resume_from(trainer)
        said = str(e.value)
        assert said.startswith(f"{run}: the run is resumed, but no step of it is complete on "
                               "both sides (resume/ step_000005")
        assert f"the trainer's output_dir {out} holds no TRL checkpoint-N" in said
        assert "ShardCallback(..., resume=False, overwrite=True)" in said
        assert "resume_from_checkpoint=True" not in said
    fresh = ShardCallback(run_dir=tmp_path / "fresh", runner={"min_samples": 2}, resume="auto")
    assert fresh.resume_from(_user_trainer(tiny_model, tmp_path / "trl_fresh", [fresh])) is None


def test_another_ranks_summary_counts_the_steps_rank_0_counts(tmp_path):
    """Audit 135 F6: a run resumed at its last checkpoint trains no step, but transformers
    counts one past max_steps; rank 0 left it out and every other rank's summary said 11 of
    10 steps."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    callback = ShardCallback(run_dir=tmp_path / "r", runner={"min_samples": 2})
    state = TrainerState(global_step=11, max_steps=10, is_world_process_zero=False)
    callback._end(TrainingArguments(output_dir=str(tmp_path / "trl"), report_to=[]), state,
                  TrainerControl(), model=None, processing_class=None)
    assert callback.summary["rl_steps"] == 10 and callback.summary["interrupted"] is False
    callback.close()


def test_a_trl_checkpoint_without_its_shards_side_is_refused_naming_where_to_resume(
        tiny_model, tmp_path):
    """TRL's checkpoint-7 is complete but sae-shards' side of it is not (its write hit a full
    disk, or an earlier run in output_dir left it): resume_from_checkpoint=True picks it and is
    refused, naming it and the path of the newest checkpoint both sides have, which resumes."""
    from sae_shards.capture.resume import resume_file

    run, out = tmp_path / "cut", tmp_path / "trl_cut"
    _seeded_run(tiny_model, tmp_path, "cut", stop_at=7)
    resume_file(run, 7).unlink()  # as a failed write leaves it
    callback = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume=True)
    with pytest.raises(CheckpointError) as e:
        _user_trainer(tiny_model, out, [callback]).train(resume_from_checkpoint=True)
    callback.close()
    assert f"TRL's {out / 'checkpoint-7'} has no sae-shards side" in str(e.value)
    assert (f"the newest step with both sides is 5: trainer.train(resume_from_checkpoint="
            f"'{out / 'checkpoint-5'}')") in str(e.value)
    callback = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume=True)
    _user_trainer(tiny_model, out, [callback]).train(
        resume_from_checkpoint=str(out / "checkpoint-5"))
    assert callback.summary["rl_steps"] == 10 and not callback.summary["interrupted"]


def test_model_only_checkpoints_are_said_to_resume_inexactly(tiny_model, tmp_path, caplog):
    """save_only_model=True: TRL's checkpoints hold no optimizer, scheduler or RNG state, and
    transformers resumes one with a fresh AdamW and schedule without a word. Said when the run
    starts and again when it resumes; a trainer that saves everything hears neither."""
    run, out = tmp_path / "run", tmp_path / "trl"
    first = ShardCallback(run_dir=run, runner={"min_samples": 2})
    with caplog.at_level("WARNING", logger="sae_shards.capture.trl_checkpoints"):
        _user_trainer(tiny_model, out, [first, _StopAt(first, 5)], save_only_model=True).train()
        assert "saves its checkpoints with save_only_model=True" in caplog.text
        assert not (out / "checkpoint-5" / "optimizer.pt").exists()  # what it leaves out
        caplog.clear()
        again = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume=True)
        _user_trainer(tiny_model, out, [again], save_only_model=True).train(
            resume_from_checkpoint=True)
        assert "resuming from a checkpoint saved with save_only_model=True" in caplog.text
        caplog.clear()
        whole = ShardCallback(run_dir=tmp_path / "whole", runner={"min_samples": 2})
        _user_trainer(tiny_model, tmp_path / "trl_whole", [whole], max_steps=2).train()
        assert "save_only_model" not in caplog.text


def test_an_epoch_based_script_run_records_its_resolved_steps(tiny_model, tmp_path):
    """TRL's max_steps=-1 with num_train_epochs: config.json records the steps transformers
    resolved (16 prompts, 2 a step: 8), so analysis scores rewards at the end of training and a
    resume over more epochs (a longer run) is refused like a larger max_steps; a run recorded
    with -1 by an earlier version still resumes, and analysis falls back to its summary."""
    from sae_shards.analysis.shards import run_sampling

    run, out = tmp_path / "run", tmp_path / "trl"
    epochs = dict(max_steps=-1, num_train_epochs=1, n_prompts=16)
    torch.manual_seed(0)
    first = ShardCallback(run_dir=run, runner={"min_samples": 2})
    _user_trainer(tiny_model, out, [first, _StopAt(first, 5)], **epochs).train()
    assert json.loads((run / "config.json").read_text())["rl"]["max_steps"] == 8
    assert run_sampling(run)["training_steps"] == 8
    more = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume=True)
    with pytest.raises(ValueError, match=r"rl.max_steps: 8 in the run, 16 now") as e:
        _user_trainer(tiny_model, out, [more], **{**epochs, "num_train_epochs": 2}).train(
            resume_from_checkpoint=True)
    assert "rl.num_train_epochs: 1 in the run, 2 now" in str(e.value)  # the field the user set
    more.close()
    config = json.loads((run / "config.json").read_text())
    config["rl"]["max_steps"] = -1  # as an earlier version recorded it
    (run / "config.json").write_text(json.dumps(config))
    assert run_sampling(run)["training_steps"] == 5  # summary.json's: the steps it ran
    again = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume=True)
    _user_trainer(tiny_model, out, [again], **epochs).train(resume_from_checkpoint=True)
    assert again.summary["rl_steps"] == 8
    assert json.loads((run / "config.json").read_text())["rl"]["max_steps"] == 8
    config["rl"]["max_steps"] = -1
    (run / "config.json").write_text(json.dumps(config))
    assert run_sampling(run)["training_steps"] == 8  # summary.json's rl_steps


@pytest.mark.parametrize("runner, said", [
    ({}, "the trainer's max_steps=4 gives 4 trainable per-step samples .* fewer than "
         "runner.min_samples=8"),
    ({"min_samples": 2, "sae_start_step": 4}, r"runner.sae_start_step=4 is not before the last "
                                              r"RL step \(the trainer's max_steps=4\)"),
    ({"min_samples": 9, "capture": "group"}, r"the trainer's max_steps=4 gives 8 trainable events "
                                             r"at most \(2 per RL step with capture.granularity="
                                             r"group\)"),
    ({"min_samples": 3, "source": "deconv", "warmup_steps": 1},
     r"the trainer's max_steps=4 gives 2 trainable per-step samples \(one per RL step; "
     r"capture.source='deconv' cannot invert the first 2 steps: the learning rate's warmup "
     r"starts at 0\), fewer than runner.min_samples=3"),
    ({"concurrency": "thread", "capture": "completion", "capacity": 75},
     r"capture.granularity=completion gives up to 8 events per RL step, but capture.capacity=75 "
     r"can take at most 1 per step .*; raise capture.capacity to at least 135"),
])
def test_a_script_run_whose_sae_cannot_train_is_refused_before_its_first_step(
        tiny_model, tmp_path, runner, said):
    """A trainer too short for the SAE to take a step is refused when training begins, naming
    the trainer's max_steps, not after every RL step ran with a warning at the end."""
    runner = dict(runner)
    capture = {"granularity": runner.pop("capture", "step"),
               **{k: runner.pop(k) for k in ("capacity", "source") if k in runner}}
    trainer_args = {k: runner.pop(k) for k in ("warmup_steps",) if k in runner}
    callback = ShardCallback(run_dir=tmp_path / "run", runner=runner, capture=capture)
    trainer = _user_trainer(tiny_model, tmp_path / "trl", [callback], max_steps=4,
                            gradient_checkpointing=False, **trainer_args)
    with pytest.raises(ValueError, match=said):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "run" / "rollouts.jsonl").exists()


@pytest.mark.parametrize("inside", ["", "checkpoints"])
def test_a_trainer_output_dir_among_the_runs_own_folders_is_refused(tiny_model, tmp_path,
                                                                    inside):
    """Audit 143 F5: output_dir=run_dir (or run_dir/checkpoints) was taken without a word: TRL's
    checkpoint-N/ landed among the run's step checkpoints, and trainer.save_model() would write a
    model's config.json over the run's. Refused as training begins; run_dir/trl is fine."""
    run = tmp_path / "run"
    callback = ShardCallback(run_dir=run, runner={"min_samples": 2})
    trainer = _user_trainer(tiny_model, run / inside, [callback], max_steps=4,
                            gradient_checkpointing=False)
    named = "run_dir itself" if not inside else "inside run_dir/checkpoints"
    with pytest.raises(ValueError, match=rf"the trainer's output_dir=.* is {named} .*Give the "
                                         rf"trainer output_dir='{run / 'trl'}'"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (run / "rollouts.jsonl").exists()


def _train_two_prompts(model_dir, tmp_path, callback, reward, max_steps: int,
                       learning_rate: float = 3e-4) -> None:
    """A user's script: GRPO on two prompts in groups of 4, 8 completions a step, with
    ``callback`` the one line added."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=max_steps,
                        learning_rate=learning_rate, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=8, use_cpu=True, bf16=False,
                        report_to="none", save_strategy="no", disable_tqdm=True,
                        gradient_checkpointing=False)
    GRPOTrainer(model=str(model_dir), reward_funcs=[reward], args=config,
                train_dataset=Dataset.from_dict({"prompt": ["a b", "c d"] * 8}),
                callbacks=[callback]).train()


def _length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def _tied_reward(prompts, completions, **kwargs):
    """Every completion alike: every prompt group ties, no event has an advantage."""
    return [1.0] * len(completions)


def test_a_script_run_whose_updates_are_all_zero_says_so(tiny_model, tmp_path):
    """No weight moved (every reward tied, so every advantage is 0 here; on a GPU, every step
    skipped by fp16 loss scaling): the summary says the samples were zeros, not that there were
    too few. A learning rate of 0 is refused before the first step (audit 143: it trained every
    step, then said so at the end)."""
    refused = ShardCallback(run_dir=tmp_path / "refused", runner={"min_samples": 2})
    with pytest.raises(ValueError, match=r"the trainer's learning rate is 0 \(learning_rate=0.0; "
                                         r"every param group of its optimizer\): no weight "
                                         r"would move"):
        _train_two_prompts(tiny_model, tmp_path, refused, _length_reward, 3, learning_rate=0.0)
    assert not (tmp_path / "refused" / "rollouts.jsonl").exists()
    # an optimizer that sets its own step size leaves lr 0 in its groups, and trains (audit 144)
    from types import SimpleNamespace

    from transformers.optimization import Adafactor, AdafactorSchedule

    from sae_shards.capture.callback_args import check_learning_rate

    own = Adafactor(torch.nn.Linear(2, 2).parameters(), relative_step=True, warmup_init=True,
                    lr=None)
    AdafactorSchedule(own)
    for rate in (5e-5, 0.0):
        check_learning_rate(own, SimpleNamespace(learning_rate=rate))  # not refused
    callback = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2})
    _train_two_prompts(tiny_model, tmp_path, callback, _tied_reward, 3)
    summary = callback.summary
    assert summary["captured"] == summary["zero_samples"] == 3 and summary["sae_steps"] == 0
    assert summary["warning"].startswith(
        "the SAE never trained: every one of the 3 captured samples was all zeros, nothing to "
        "train on (no target weight changed: every prompt group's completions rewarded alike")
    assert "a learning rate of 0" in summary["warning"]


def test_a_script_run_whose_events_never_fill_the_warm_up_says_so(tiny_model, tmp_path):
    """Per event a step gives at most its prompt groups, and fewer when groups tie (no
    advantage, no event): a run whose bound is met but whose SAE never trained says so in its
    summary, and analyze still reads it."""
    run = tmp_path / "run"
    callback = ShardCallback(run_dir=run, capture={"granularity": "group"},
                             runner={"min_samples": 8})  # 4 steps x 2 groups: reachable
    _train_two_prompts(tiny_model, tmp_path, callback, _tied_reward, 4)
    summary = callback.summary
    assert summary["sae_steps"] == 0 and "the SAE never trained" in summary["warning"]
    # the steps were trained although none gave an event (was 0: the last step with samples)
    assert summary["rl_steps"] == 4 and summary["skipped_steps"] is None
    assert summary["warning"].startswith("the SAE never trained: no event was captured (8 had "
                                         "every advantage 0: all completions of their prompt "
                                         "rewarded alike; 0 a zero gradient): no prompt group's "
                                         "completions were rewarded differently")
    assert "run more RL steps" not in summary["warning"]  # more steps would tie alike
    stored = json.loads((run / "summary.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert stored["fvu_first"] is None and stored["warning"] == summary["warning"]
    assert cli_main(["analyze", str(run), "--no-dose"]) == 0  # n/a where the FVU is null


@pytest.mark.parametrize("skipped, zero, says", [
    (0, 300, "had no gradient on the targets"),  # all 300 zero: a target used outside its module
    (5, 3, "had no gradient on the targets"),
    (8, 0, "no prompt group's completions were rewarded differently"),
])
def test_an_untrained_per_event_run_says_why_not_to_run_longer(skipped, zero, says):
    """A per-event run that captured no event names the cause and its fix: zero gradients point
    at capture.targets, tied groups at the reward; neither is helped by more RL steps."""
    from sae_shards.capture.event_capture import EventCapture
    from sae_shards import RunnerConfig
    from sae_shards.capture.summary import _why_untrained

    capture = object.__new__(EventCapture)  # only its counters are read
    capture.n_captured, capture.n_skipped, capture.n_zero = 0, skipped, zero
    text = _why_untrained(capture, RunnerConfig())
    assert text.startswith(f"no event was captured ({skipped} had every advantage 0")
    assert says in text and "run more RL steps" not in text
    assert ("capture.targets" in text) == bool(zero)


def test_an_sae_that_started_on_one_distinct_sample_says_so():
    """min_samples=1 and one event captured: the SAE starts, and skips every batch (one sample
    repeated has no spread). The summary says that, not that too few samples were buffered
    for it to start (both conditions were met), and names all-zero samples when there were."""
    from sae_shards.capture.event_capture import EventCapture
    from sae_shards import RunnerConfig
    from sae_shards.capture.summary import _why_untrained

    capture = object.__new__(EventCapture)  # only its counters are read
    capture.n_captured, capture.n_skipped, capture.n_zero = 1, 7, 0
    runner = RunnerConfig(min_samples=1)
    text = _why_untrained(capture, runner, degenerate=3)
    assert text.startswith("1 sample was captured and the SAE started, but each of its 3 "
                           "batches held one distinct nonzero sample")
    assert "start it later (runner.min_samples=1" in text and "all zeros" not in text
    assert "it starts once runner.min_samples" in _why_untrained(capture, runner)  # none drawn
    capture.n_captured, capture.n_zero = 8, 7  # one nonzero sample beside seven zeros
    text = _why_untrained(capture, RunnerConfig(min_samples=8), degenerate=2)
    assert "7 of the captured samples were all zeros" in text
    assert "runner.min_samples=8" in text


def test_a_script_captures_events_under_trls_default_checkpointing(tiny_model, tmp_path):
    """TRL's GRPOConfig turns activation checkpointing on (non-reentrant): a per-event script
    run captures under it as it is, and its shards are those of the same run without it."""
    def final_shards(name, **overrides):
        torch.manual_seed(0)
        callback = ShardCallback(run_dir=tmp_path / name, capture={"granularity": "group"},
                                 runner={"min_samples": 2})
        trainer = _user_trainer(tiny_model, tmp_path / f"trl_{name}", [callback], max_steps=4,
                                **overrides)
        assert trainer.args.activation_checkpointing == (name == "default")
        trainer.train()
        assert callback.summary["sae_steps"] > 0 and callback.summary["captured"] > 0
        return load_file(tmp_path / name / "checkpoints" / "final" / "sae.safetensors")

    default, off = final_shards("default"), final_shards("off", gradient_checkpointing=False)
    assert default.keys() == off.keys()
    for key in default:  # bit-identical (a top-k SAE's threshold is NaN: unset)
        torch.testing.assert_close(default[key], off[key], rtol=0, atol=0, equal_nan=True)


def test_a_generation_trained_over_several_steps_is_refused_per_event_and_noted_per_step(
        tiny_model, tmp_path, caplog):
    """TRL's num_iterations > 1 trains each generation over several optimizer steps: events
    (prompt groups of the step that trains on them) are refused before the first step; per-step
    capture runs and says what its rollouts rows then hold."""
    events = ShardCallback(run_dir=tmp_path / "events", capture={"granularity": "group"},
                           runner={"min_samples": 2})
    trainer = _user_trainer(tiny_model, tmp_path / "trl_e", [events], max_steps=4,
                            gradient_checkpointing=False, num_iterations=2)
    with pytest.raises(ValueError, match=r"ShardCallback\(capture=\{'granularity': 'group'\}\) "
                                         r"needs one generation per optimizer step .* config has "
                                         r"num_iterations=2.* generation_batch_size unset"):
        trainer.train()
    assert trainer.state.global_step == 0
    steps = ShardCallback(run_dir=tmp_path / "steps", runner={"min_samples": 2})
    _user_trainer(tiny_model, tmp_path / "trl_s", [steps], max_steps=4, num_iterations=2).train()
    assert steps.summary["rl_steps"] == 4
    assert "rollouts.jsonl gives each step the whole generation batch" in caplog.text
    assert cli_main(["analyze", str(tmp_path / "steps"), "--no-dose"]) == 0  # the report too
    assert ("trained each generation over several optimizer steps (num_iterations=2)"
            in (tmp_path / "steps" / "report.html").read_text())


def test_per_event_capture_under_torch_compile_is_refused_and_lora_dropout_reaches_the_summary(
        tiny_model, tmp_path):
    """Audit 104 F16: under torch_compile=True per-event capture stopped after its first step,
    blaming TRL's fused head and advising to drop the attention projections from the targets;
    it is refused before the first step, naming torch_compile. F12: with LoRA dropout the
    events are approximate (27-41% off at 0.1), which only a start-up log line said; the
    summary's warning, which the report shows, says it too."""
    from peft import LoraConfig

    compiled = ShardCallback(run_dir=tmp_path / "compiled", capture={"granularity": "group"},
                             runner={"min_samples": 2})
    trainer = _user_trainer(tiny_model, tmp_path / "trl_c", [compiled], max_steps=4,
                            gradient_checkpointing=False, torch_compile=True,
                            torch_compile_backend="eager")
    with pytest.raises(ValueError, match=r"module hooks, which torch.compile traces .* set "
                                         r"torch_compile=False .* or capture per step"):
        trainer.train()
    assert trainer.state.global_step == 0
    # a model the script compiled itself, under torch_compile=False (audit 110 F16)
    from transformers import AutoModelForCausalLM

    model = torch.compile(AutoModelForCausalLM.from_pretrained(tiny_model), backend="eager")
    own = ShardCallback(run_dir=tmp_path / "own", capture={"granularity": "group"},
                        runner={"min_samples": 2})
    trainer = _user_trainer(tiny_model, tmp_path / "trl_o", [own], max_steps=4, model=model,
                            gradient_checkpointing=False)
    with pytest.raises(ValueError, match=r"module hooks, which torch.compile traces .* give the "
                                         r"trainer the model itself, not torch.compile\(model\)"):
        trainer.train()
    assert trainer.state.global_step == 0

    dropped = ShardCallback(run_dir=tmp_path / "dropout", capture={"granularity": "group"},
                            runner={"min_samples": 2})
    _user_trainer(tiny_model, tmp_path / "trl_d", [dropped], max_steps=4,
                  gradient_checkpointing=False,
                  peft_config=LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj"])
                  ).train()
    assert ("capture.granularity=group with lora_dropout=0.1: each event's gradient of the "
            "adapted weights is approximate") in dropped.summary["warning"]


def _tagging_reward(prompts, completions, task, log_extra=None, **kwargs):
    if log_extra is not None:
        log_extra("task", task)
    return [0.1 * len(c) + sum(ch in "aeiou" for ch in c) for c in completions]


@pytest.mark.parametrize("steps_per_generation,grad_accum", [(2, 1), (1, 2)],
                         ids=["generation-reused", "two-generations-a-step"])
def test_a_steps_rollouts_are_the_training_generations_it_trained_on(
        tiny_model, tmp_path, caplog, steps_per_generation, grad_accum):
    """TRL appends evaluation generations to the same completion log, and keeps one generation
    batch: a step that reuses its generation read the evaluation's (every other step EVAL); a
    step of two generations (steps_per_generation < gradient_accumulation_steps) kept half."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    train = Dataset.from_dict({"prompt": [f"v {i}" for i in range(32)], "task": ["train"] * 32})
    held = Dataset.from_dict({"prompt": [f"EVAL {i}" for i in range(8)], "task": ["EVAL"] * 8})
    callback = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2})
    config = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=4, learning_rate=1e-3,
                        per_device_train_batch_size=4, per_device_eval_batch_size=4,
                        num_generations=4, max_completion_length=6, use_cpu=True, bf16=False,
                        report_to="none", logging_steps=1, disable_tqdm=True,
                        save_strategy="no", eval_strategy="steps", eval_steps=1,
                        steps_per_generation=steps_per_generation,
                        gradient_accumulation_steps=grad_accum, seed=0)
    GRPOTrainer(model=str(tiny_model), reward_funcs=_tagging_reward, args=config,
                train_dataset=train, eval_dataset=held, callbacks=[callback]).train()
    rows = rundir.read_jsonl(tmp_path / "run" / "rollouts.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(set(r["tasks"]) == {"train"} for r in rows)
    assert not any(p.startswith("EVAL") for r in rows for p in r["prompts"])
    if grad_accum == 1:  # one generation of 8 completions for steps 1-2, another for 3-4
        assert rows[0] == {**rows[1], "step": 1} and rows[2] == {**rows[3], "step": 3}
        assert all(len(r["completions"]) == 8 for r in rows) and rows[1] != {**rows[2], "step": 2}
        assert "trains on each generation over several optimizer steps" in caplog.text
    else:  # two generations of one prompt group each, both recorded
        assert all(len(r["completions"]) == 8 and len(set(r["prompts"])) == 2 for r in rows)
        assert "over several optimizer steps" not in caplog.text


def test_user_script_resumes_with_resume_from_checkpoint(tiny_model, whole, tmp_path, caplog):
    """request_stop at step 7 checkpoints both sides; ShardCallback(resume=True) plus TRL's
    resume_from_checkpoint=True ends with the uninterrupted run's shards, bit for bit."""
    first = _seeded_run(tiny_model, tmp_path, "cut", stop_at=7)
    assert first.summary["interrupted"] and first.summary["rl_steps"] == 7
    assert ("to continue, run the script again with ShardCallback(..., resume=True) and "
            "trainer.train(resume_from_checkpoint=True)") in caplog.text  # it says how
    assert (tmp_path / "trl_cut" / "checkpoint-7").is_dir()
    # a copy whose rollouts.jsonl lost its first rows: the resume refuses it (a script's resume
    # checks the logs in restore; sae-shards train checks them before it writes anything)
    short = tmp_path / "short"
    shutil.copytree(tmp_path / "cut", short)
    rows = (short / "rollouts.jsonl").read_text().splitlines(keepends=True)
    (short / "rollouts.jsonl").write_text("".join(rows[2:]))
    copied = ShardCallback(run_dir=short, runner={"min_samples": 2}, resume=True)
    with pytest.raises(CheckpointError, match=r"rollouts.jsonl: 5 rows up to RL step 7, where the "
                                              r"run had written 7"):
        _user_trainer(tiny_model, tmp_path / "trl_cut", [copied]).train(
            resume_from_checkpoint=True)
    copied.close()
    with pytest.raises(FileExistsError, match="already holds a run") as e:
        ShardCallback(run_dir=tmp_path / "cut")  # neither resume nor overwrite: refused
    assert "resume=True" in str(e.value) and "overwrite=True" in str(e.value)  # in its terms
    plain = ShardCallback(run_dir=tmp_path / "cut", runner={"min_samples": 2}, resume=True)
    with pytest.raises(CheckpointError, match=r"call trainer.train\(resume_from_checkpoint=True"):
        _user_trainer(tiny_model, tmp_path / "trl_cut", [plain]).train()  # TRL not resumed
    plain.close()
    with pytest.raises(ValueError, match=r"runner.min_samples: 2 in the run, 4 now") as e:
        ShardCallback(run_dir=tmp_path / "cut", runner={"min_samples": 4}, resume=True)
    assert "sae.k: 4 in the run, 8 now" not in str(e.value)
    with pytest.raises(ValueError, match=r"sae.k: 4 in the run, 8 now"):  # other settings
        ShardCallback(run_dir=tmp_path / "cut", runner={"min_samples": 2}, sae={"k": 8},
                      resume=True)
    longer = ShardCallback(run_dir=tmp_path / "cut", runner={"min_samples": 2}, resume=True)
    with pytest.raises(ValueError, match=r"rl.max_steps: 10 in the run, 20 now"):  # the trainer's
        _user_trainer(tiny_model, tmp_path / "trl_cut", [longer], max_steps=20).train(
            resume_from_checkpoint=True)
    smaller = ShardCallback(run_dir=tmp_path / "cut", runner={"min_samples": 2}, resume=True)
    with pytest.raises(ValueError, match=r"rl.per_device_train_batch_size: 8 in the run, 4 now"):
        _user_trainer(tiny_model, tmp_path / "trl_cut", [smaller],  # TRL would only warn
                      per_device_train_batch_size=4).train(resume_from_checkpoint=True)
    # the learning-rate schedule and the optimizer's settings (audit 138 F14: a resume with
    # lr_scheduler_type="constant" jumped the learning rate from 1.8e-4 to 3e-4 unsaid)
    for change, said in [(dict(lr_scheduler_type="constant"),
                          "rl.lr_scheduler_type: 'linear' in the run, 'constant' now"),
                         (dict(warmup_steps=3), "rl.warmup_steps: 0 in the run, 3 now"),
                         (dict(weight_decay=0.1), "rl.weight_decay: 0.0 in the run, 0.1 now"),
                         (dict(adam_beta2=0.9), "rl.adam_beta2: 0.999 in the run, 0.9 now"),
                         (dict(epsilon=0.1), "rl.epsilon: 0.2 in the run, 0.1 now")]:
        other = ShardCallback(run_dir=tmp_path / "cut", runner={"min_samples": 2}, resume=True)
        with pytest.raises(ValueError, match=re.escape(said)):
            _user_trainer(tiny_model, tmp_path / "trl_cut", [other], **change).train(
                resume_from_checkpoint=True)
    # trained under another distribution: refused as the trainer is built, on every rank, before
    # train() loads TRL's checkpoint in a format this launch does not read (it failed there, or
    # without DeepSpeed started a fresh optimizer); nothing of the run changes
    config_json = tmp_path / "cut" / "config.json"
    recorded = config_json.read_text()
    launch = "accelerate launch --use_deepspeed --zero_stage 3 --num_processes 1"
    config_json.write_text(json.dumps({**json.loads(recorded), "launch": launch,
                                       "distribution": "DeepSpeed ZeRO-3"}))
    before = tree_bytes(tmp_path / "cut")
    other = ShardCallback(run_dir=tmp_path / "cut", runner={"min_samples": 2}, resume=True)
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'cut'} was trained under DeepSpeed ZeRO-3 and is resumed under one "
            "process") + ".*" + re.escape(f"({launch})")):
        _user_trainer(tiny_model, tmp_path / "trl_cut", [other])  # train() is never reached
    assert tree_bytes(tmp_path / "cut") == before
    config_json.write_text(recorded)
    # the script's dataset and reward functions are the run's too (audit 113: a script resumed
    # on another dataset trained the rest of the run on it without a word): another length,
    # another reward function are each refused; other rows of that length (the same rows in
    # another order here) are warned about and recorded (audit 119: the same script may render
    # its prompts anew, a chat template writing today's date)
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["rl"]["dataset"]["rows"] == 64 and config["rl"]["reward_names"] == [
        "char_class_reward"], config["rl"]
    from datasets import Dataset

    from sae_shards.recipe.tasks import build_task

    rows = Dataset.from_dict(build_task("letters", target_length=8).dataset(64).to_dict())
    for changed, said in [
            (dict(n_prompts=48), r"rl.dataset.rows: 64 in the run, 48 now"),
            (dict(reward_funcs=[_vowel_reward]),
             r"rl.reward_names: \['char_class_reward'\] in the run, \['_vowel_reward'\] now")]:
        other = ShardCallback(run_dir=tmp_path / "cut", runner={"min_samples": 2}, resume=True)
        with pytest.raises(ValueError, match=said) as e:
            _user_trainer(tiny_model, tmp_path / "trl_cut", [other], **changed).train(
                resume_from_checkpoint=True)
        assert "rl.dataset.digest" not in str(e.value)
    shuffled = tmp_path / "shuffled"  # a copy of the run, with TRL's side
    shutil.copytree(tmp_path / "cut", shuffled)
    shutil.copytree(tmp_path / "trl_cut", tmp_path / "trl_shuffled")
    other = ShardCallback(run_dir=shuffled, runner={"min_samples": 2}, resume=True)
    caplog.clear()
    _user_trainer(tiny_model, tmp_path / "trl_shuffled", [other],
                  dataset=rows.shuffle(seed=1)).train(resume_from_checkpoint=True)
    assert other.summary["rl_steps"] == 10
    assert f"resuming {shuffled} on other dataset rows than the run started with" in caplog.text
    # the way back skips a stop's checkpoint, which would keep these steps (audit 131 F5)
    assert ("kill it before its next checkpoint (kill -9, or Ctrl-C twice: one Ctrl-C or SIGTERM "
            "checkpoints these steps) and resume from RL step 7's checkpoint") in caplog.text
    resumed = json.loads((shuffled / "config.json").read_text())["resumed_under"]
    assert resumed == [{"rl_step": 7, "dataset": resumed[0]["dataset"]}] and re.fullmatch(
        r"with other rows \(hash [0-9a-f]{16} -> [0-9a-f]{16}\)", resumed[0]["dataset"])
    # a run started by an earlier version recorded model.path as the model's name: still resumes
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["model"]["path"] == str(tiny_model.resolve())
    config["model"] = {"path": str(tiny_model), "lora": {"enabled": False}}
    # the software and device that started the run are recorded; a resume under another TRL
    # or on another device is warned about and recorded beside them, not refused
    now = run_versions(torch.device("cpu"))
    assert config["versions"] == now and "resumed_under" not in config
    config["versions"] = {**now, "trl": "0.0.1", "device": "cuda NVIDIA H200"}
    (tmp_path / "cut" / "config.json").write_text(json.dumps(config))
    again = ShardCallback(run_dir=tmp_path / "cut", runner={"min_samples": 2}, resume=True)
    caplog.clear()
    _user_trainer(tiny_model, tmp_path / "trl_cut", [again]).train(resume_from_checkpoint=True)
    assert again.summary["rl_steps"] == 10 and not again.summary["interrupted"]
    assert (f"under other versions than it started with (trl 0.0.1 -> {now['trl']}, device "
            "cuda NVIDIA H200 -> cpu)") in caplog.text
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["versions"] == {**now, "trl": "0.0.1", "device": "cuda NVIDIA H200"}
    assert config["resumed_under"] == [{"rl_step": 7, "trl": now["trl"], "device": "cpu"}]
    assert "does not checkpoint its shuffle" not in caplog.text  # one epoch: exact, said nothing
    _assert_same_ending(whole, tmp_path / "cut")
    with pytest.raises(FileExistsError, match="finished .*nothing to resume"):  # it is done
        ShardCallback(run_dir=tmp_path / "cut", runner={"min_samples": 2}, resume=True)


def test_a_script_run_moved_with_its_trainers_output_dir_resumes_there(tiny_model, tmp_path):
    """Stopped on one machine, the run, the trainer's output_dir and the initial model copied
    to another path: the new places are where they now are, not changed settings; another
    model at the new place is still refused (its fingerprint is not the run's)."""
    shutil.copytree(tiny_model, tmp_path / "model")
    _seeded_run(tmp_path / "model", tmp_path, "cut", stop_at=3)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("cut", "trl_cut", "model"):
        (tmp_path / name).rename(moved / name)
    other = build_tiny_model(tmp_path / "other", seed=1)
    refused = ShardCallback(run_dir=moved / "cut", runner={"min_samples": 2}, resume=True)
    with pytest.raises(ValueError, match=r"model.name_or_path: .* in the run, .*other' now"):
        _user_trainer(other, moved / "trl_cut", [refused]).train(resume_from_checkpoint=True)
    refused.close()
    again = ShardCallback(run_dir=moved / "cut", runner={"min_samples": 2}, resume=True)
    _user_trainer(moved / "model", moved / "trl_cut", [again]).train(resume_from_checkpoint=True)
    assert again.summary["rl_steps"] == 10 and not again.summary["interrupted"]
    config = json.loads((moved / "cut" / "config.json").read_text())
    assert config["rl"]["output_dir"] == str((moved / "trl_cut").resolve())
    assert config["model"]["path"] == str((moved / "model").resolve())  # analysis reads it there


class _CrashAt(TrainerCallback):
    """Raises after RL step ``step``'s callbacks (a crash: out of memory, a lost node), so the
    run ends with no checkpoint of that step on either side."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"crashed after step {self.step}")


@pytest.fixture(scope="module")
def every_two_steps(tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted script run whose callback checkpoints every 2 steps (10 prompts, 2 per
    step: an epoch is 5 steps, each in the dataset's order: a resumed TRL run draws an epoch's
    shuffle afresh, so after an epoch boundary it would train on another order); its run
    directory."""
    run_dir = tmp_path_factory.mktemp("every_two") / "whole"
    torch.manual_seed(0)
    whole = ShardCallback(run_dir=run_dir, runner={"min_samples": 2, "checkpoint_every": 2})
    _user_trainer(tiny_model, run_dir.parent / "trl_whole", [whole], n_prompts=10,
                  shuffle_dataset=False).train()
    return run_dir


@pytest.mark.parametrize("saving", [{"save_steps": 5}, {"save_strategy": "epoch"}],
                         ids=["save_steps", "epoch"])
def test_a_script_crash_resumes_when_the_trainer_saves_less_often_than_the_callback(
        tiny_model, tmp_path, every_two_steps, saving):
    """The callback checkpoints every 2 steps, TRL at step 5 (its save_steps, or the end of an
    epoch, which it decides after the step). Crashed after step 9, TRL resumes from its
    checkpoint-5, whose resume file must exist: the callback writes one exactly where TRL
    checkpoints (an epoch's on TRL's on_save; it used to write them only every 2 steps, and keep
    the newest two, so neither run could resume). Its other checkpoints hold the shards only.
    The resumed run ends with the uninterrupted run's shards, bit for bit."""
    runner = {"min_samples": 2, "checkpoint_every": 2}
    torch.manual_seed(0)
    crashed = ShardCallback(run_dir=tmp_path / "cut", runner=runner)
    with pytest.raises(RuntimeError, match="crashed after step 9"):
        _user_trainer(tiny_model, tmp_path / "trl_cut", [crashed, _CrashAt(9)], n_prompts=10,
                      shuffle_dataset=False, **saving).train()
    crashed.close()
    assert [p.name for p in (tmp_path / "trl_cut").glob("checkpoint-*")] == ["checkpoint-5"]
    assert rundir.saved_steps(tmp_path / "cut" / "resume") == [5]
    checkpoints = tmp_path / "cut" / "checkpoints"
    assert rundir.saved_steps(checkpoints) == [2, 4, 5, 6, 8]
    assert [step for step in [2, 4, 5, 6, 8]  # the optimizer state only where a resume can be
            if (checkpoints / rundir.step_name(step) / STATE_FILE).is_file()] == [5]
    ShardSet.load(checkpoints / rundir.step_name(6))  # a shards-only checkpoint loads
    killed = RunView(tmp_path / "cut")  # read as of the newest step it can re-encode and pair
    assert killed.checkpoint == "step_000005" and killed.recovered == "killed"
    with pytest.raises(CheckpointError, match="checkpoints with a resume file: step_000005"):
        RunView(tmp_path / "cut", 8)  # the shards only: no buffer to encode
    again = ShardCallback(run_dir=tmp_path / "cut", runner=runner, resume=True)
    _user_trainer(tiny_model, tmp_path / "trl_cut", [again], n_prompts=10,
                  shuffle_dataset=False, **saving).train(resume_from_checkpoint=True)
    assert again.summary["rl_steps"] == 10 and not again.summary["interrupted"]
    _assert_same_ending(every_two_steps, tmp_path / "cut")


def test_a_resume_from_an_older_trl_checkpoint_says_the_later_ones_are_stale(tmp_path, caplog):
    """Resumed from checkpoint-4 of an output_dir that also holds checkpoint-6 and -8 (a run
    resumed by path, from before its newest checkpoint): those belong to the replaced
    trajectory, and the next resume_from_checkpoint=True would pick them. Those another run
    wrote (an output_dir two runs share: their logs up to step 4 are not this run's) are said
    to be another run's: they were said to be this run's, whose side sae-shards had removed
    (audit 131 F3)."""
    from sae_shards.capture.resume import other_runs_trl_checkpoints
    from sae_shards.capture.trl_checkpoints import warn_later_trl_checkpoints

    out, run = tmp_path / "trl", tmp_path / "run"
    run.mkdir()
    rows = [{"kind": "rl", "rl_step": s, "loss": 0.5 + s, "reward": s / 10} for s in (2, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, reward in ((2, 0.2), (4, 0.4), (6, 0.4), (8, 0.9), (10, None)):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        log = [{"step": s, "loss": 0.5 + s, "reward": reward if s == 4 else s / 10}
               for s in (2, 4, 6, 8) if s <= step]
        if reward is not None:  # checkpoint-10's trainer_state.json is torn: not counted
            (out / f"checkpoint-{step}" / "trainer_state.json").write_text(
                json.dumps({"log_history": log}))
    (out / "checkpoint-9.tmp").mkdir()  # not a checkpoint
    assert other_runs_trl_checkpoints(run, str(out), 4) == [8]
    assert other_runs_trl_checkpoints(run, str(out), 8) == []
    with caplog.at_level("WARNING", logger="sae_shards.capture.trl_checkpoints"):
        warn_later_trl_checkpoints(str(out), 10)
        warn_later_trl_checkpoints(str(out / "missing"), 0)
        assert not caplog.records
        warn_later_trl_checkpoints(str(out), 4)
        assert ("also holds this run's TRL checkpoints of the later steps it now trains again "
                "(checkpoint-6, checkpoint-8, checkpoint-10; sae-shards' side of them is removed)"
                ) in caplog.text and "another run" not in caplog.text
        caplog.clear()
        warn_later_trl_checkpoints(str(out), 4, [8])
    said = caplog.text
    assert "this run's TRL checkpoints of the later steps it now trains again (checkpoint-6, " \
        "checkpoint-10;" in said
    assert "TRL checkpoints of later steps that another run wrote (checkpoint-8: their logs" in said
    assert said.rstrip().endswith("delete them (and give each run an output_dir of its own)")


def test_the_end_of_a_users_run_survives_a_stop_in_its_last_step_and_a_kill_after_it(
        tiny_model, tmp_path, caplog):
    """A stop asked during the last step: the run simply ends (not interrupted, nothing to
    resume). Killed after the last step's checkpoint, before its end: resumed, the callback
    writes the end as of that step; the step transformers' loop still runs past max_steps is
    left out of the run directory."""
    _seeded_run(tiny_model, tmp_path, "whole")
    last = _seeded_run(tiny_model, tmp_path, "last", stop_at=10)
    assert last.summary["rl_steps"] == 10 and not last.summary["interrupted"]
    def ending(run):  # the shards, their activations, the rollouts and the final policy
        files = ("checkpoints/final/sae.safetensors", "activations.safetensors",
                 "final_model/model.safetensors")
        return ({name: load_file(run / name) for name in files},
                (run / "rollouts.jsonl").read_text())

    def same(a, b):
        assert a[1] == b[1] and a[0].keys() == b[0].keys()
        for name in a[0]:
            assert a[0][name].keys() == b[0][name].keys(), name
            for key in a[0][name]:  # NaN (an unused threshold) equals NaN here
                torch.testing.assert_close(a[0][name][key], b[0][name][key], rtol=0, atol=0,
                                           equal_nan=True, msg=f"{name}: {key}")

    kept = ending(tmp_path / "whole")
    same(ending(tmp_path / "last"), kept)
    # killed after the checkpoint of step 10 (TRL's save_steps=5), before the end was written
    for name in ("summary.json", "activations.safetensors"):
        (tmp_path / "whole" / name).unlink()
    for name in ("checkpoints/final", "final_model"):
        shutil.rmtree(tmp_path / "whole" / name)
    again = ShardCallback(run_dir=tmp_path / "whole", runner={"min_samples": 2}, resume=True)
    trainer = _user_trainer(tiny_model, tmp_path / "trl_whole", [again])
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # what a script shows by default
        trainer.train(resume_from_checkpoint=True)
    # said once, without "training continues" before it (audit 113)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("sae_shards")]
    assert [m for m in said if "resumed" in m] == [
        "resumed at RL step 10 = max_steps: training had finished; writing the run's end as "
        "of that step"], said
    assert trainer.state.global_step == 11  # transformers' own extra step
    assert again.summary["rl_steps"] == 10 and not again.summary["interrupted"]
    same(ending(tmp_path / "whole"), kept)
    assert again.capture is None  # inert for that step


class _SignalAt(TrainerCallback):
    """Sends this process ``signum`` as RL step ``step`` begins (a scheduler's SIGTERM)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


class _RaiseAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise RuntimeError("the reward broke")


@pytest.fixture
def default_sigint():
    """SIGINT as an interactive Python has it, whatever pytest was started with (a runner that
    starts it as a background job has it ignored: the test then failed, naming nothing); put
    back afterwards."""
    import signal

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, outer)


def test_a_users_script_stops_on_sigterm_after_the_step_with_a_checkpoint(tiny_model, tmp_path,
                                                                          caplog, default_sigint):
    """The one-line ShardCallback handles SIGTERM itself while it trains (the script installs
    nothing): the run ends after the step, both sides checkpointed; the handlers are put back."""
    import signal

    shards = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2})
    second = ShardCallback(run_dir=tmp_path / "second", runner={"min_samples": 2})  # one trainer
    _user_trainer(tiny_model, tmp_path / "trl", [shards, second,
                                                 _SignalAt(4, signal.SIGTERM)]).train()
    assert shards.summary["interrupted"] and shards.summary["rl_steps"] == 4
    assert second.summary["interrupted"] and second.summary["rl_steps"] == 4  # both stopped
    assert shards.summary["stop_signal"] == signal.SIGTERM
    assert (tmp_path / "trl" / "checkpoint-4").is_dir()
    assert (tmp_path / "run" / "resume" / "step_000004.safetensors").is_file()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # started in the background by a shell (`python train.py &`): SIGINT ignored, SIGTERM handled
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        bg = ShardCallback(run_dir=tmp_path / "bg", runner={"min_samples": 2})
        _user_trainer(tiny_model, tmp_path / "trl_bg", [bg, _SignalAt(3, signal.SIGTERM)]).train()
        assert bg.summary["interrupted"] and bg.summary["rl_steps"] == 3
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # left as it was
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # a train() that raises leaves the handlers in place (transformers has no exception event);
    # a signal outside the training loop then gets the previous behaviour, not a stop request
    failing = ShardCallback(run_dir=tmp_path / "failing", runner={"min_samples": 2})
    with pytest.raises(RuntimeError, match="the reward broke"):
        _user_trainer(tiny_model, tmp_path / "trl_failing", [failing, _RaiseAt(2)]).train()
    assert hasattr(signal.getsignal(signal.SIGTERM), "sae_shards_previous")
    seen = []
    signal.getsignal(signal.SIGTERM).sae_shards_previous[signal.SIGTERM] = \
        lambda signum, frame: seen.append(signum)  # stands in for the default: ending the process
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM] and failing.stop_signal is None
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # a script (or sae-shards train) that handles the signals itself keeps its own handlers
    mine = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        other = ShardCallback(run_dir=tmp_path / "own", runner={"min_samples": 2})
        with caplog.at_level("WARNING", logger="sae_shards"):  # the first run's output_dir
            _user_trainer(tiny_model, tmp_path / "trl", [other, _SignalAt(3, signal.SIGTERM)],
                          max_steps=5).train()
        assert not other.summary["interrupted"] and other.summary["rl_steps"] == 5
        assert "already holds TRL checkpoints of an earlier run (steps 4)" in caplog.text
    finally:
        signal.signal(signal.SIGTERM, mine)


def _plain_trainer(tiny_model, out_dir, callback, model=None, max_steps=4):
    """A transformers ``Trainer`` (supervised, not TRL): it keeps no completion log."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ids = tok(["abcabc" * 4] * 16)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(out_dir), max_steps=max_steps,
                             per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True,
                             logging_steps=1)
    return Trainer(model=model or AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                   args=args, train_dataset=data, callbacks=[callback])


def test_trainer_without_completion_log_needs_record_rollouts_false(tiny_model, tmp_path,
                                                                     capsys):
    """A trainer that is not TRL's GRPO/RLOO is refused at the start, naming the argument that
    captures without rollouts; with it, every step's update is captured and analysable."""
    refused = _plain_trainer(tiny_model, tmp_path / "trl_a",
                             ShardCallback(run_dir=tmp_path / "a", runner={"min_samples": 2}))
    with pytest.raises(ValueError, match=r"Trainer keeps no TRL completion log.*"
                                         r"ShardCallback\(\.\.\., record_rollouts=False\)"):
        refused.train()

    callback = ShardCallback(run_dir=tmp_path / "b", runner={"min_samples": 2},
                             record_rollouts=False)
    _plain_trainer(tiny_model, tmp_path / "trl_b", callback).train()
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["rl_steps"] == 4 and summary["captured"] == 4
    assert summary["sae_steps"] == (4 - 2 + 1) * 4  # min_samples 2, 4 SAE steps per RL step
    assert not (tmp_path / "b" / "rollouts.jsonl").read_text().strip()  # no rollouts recorded
    assert len(ShardSet.from_run(tmp_path / "b")) == 64
    # no processing_class: the final policy was saved without a tokenizer; the initial
    # directory's is read (was: "final_model has no tokenizer files", analysis refused)
    assert not (tmp_path / "b" / "final_model" / "tokenizer.json").exists()
    from sae_shards.analysis.shards import load_run_models

    models = load_run_models(tmp_path / "b")
    assert models.tokenizer("abc")["input_ids"] and models.final is not None
    # a trainer without reward functions: analyze says so, not "your script's own rewards"
    from sae_shards.run.rundir import read_config, rewardless_trainer

    assert rewardless_trainer(read_config(tmp_path / "b")) == "Trainer"
    assert cli_main(["analyze", str(tmp_path / "b"), "--shards", "0", "--no-dose"]) == 0
    assert cli_main(["analyze", str(tmp_path / "b"), "--shards", "0"]) == 0
    said = capsys.readouterr().err
    assert "the run's trainer (Trainer) had no reward functions" in said, said
    assert said.count("no dose-response or ablation") == 1  # --no-dose: not said
    assert "none: the trainer (Trainer) had no reward functions" in (
        tmp_path / "b" / "report.html").read_text()
    assert rewardless_trainer({"task": None, "rl": {"algorithm": "GRPOTrainer",
                                                    "reward_weights": [1.0]}}) is None
    # an older script run, which did not record reward_weights: not said to have none
    assert rewardless_trainer({"task": None, "rl": {"algorithm": "GRPOTrainer"}}) is None


def test_a_script_model_without_any_tokenizer_is_said_before_training(tiny_model, tmp_path,
                                                                       caplog):
    """A policy built in the script, trained without a processing_class: no tokenizer is saved
    anywhere, and the run says so at its start, not analysis at its end."""
    from transformers import AutoConfig, AutoModelForCausalLM

    callback = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2},
                             record_rollouts=False)
    built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tiny_model)))
    trainer = _plain_trainer(tiny_model, tmp_path / "trl", callback, model=built, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="sae_shards.capture.callback"):
        trainer.train()
    assert ("the trainer has no processing_class and " + str(tmp_path / "run" / "model")
            + " holds no tokenizer") in caplog.text


def _vowel_reward(prompts, completions, **kwargs):
    """A user's reward that gets the dataset's ``task`` column but never logs it."""
    return [sum(c in "aeiou" for c in text) / 8 for text in completions]


def _context_reward(prompts, completions, log_extra=None, **kwargs):
    """A user's reward that logs each completion's context under its own name, "context"."""
    if log_extra is not None:
        log_extra("context", ["vowels"] * len(completions))
    return [sum(c in "aeiou" for c in text) / 8 for text in completions]


def test_a_label_logged_under_another_name_is_pointed_out(tiny_model, tmp_path, caplog):
    """Reward functions that log their context as "context" while the callback reads "task":
    the warning names what was logged and the label_column that would read it."""
    import logging

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, learning_rate=3e-4,
                        per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=8, use_cpu=True, bf16=False, report_to="none",
                        save_strategy="no", disable_tqdm=True)
    callback = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 1})
    trainer = GRPOTrainer(model=str(tiny_model), reward_funcs=[_context_reward], args=config,
                          train_dataset=Dataset.from_dict({"prompt": ["a b", "c d"] * 8}),
                          callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="sae_shards"):
        trainer.train()
    assert "log ['context'] with log_extra but not the label column 'task'" in caplog.text
    assert "ShardCallback(label_column='context')" in caplog.text


def _half_labelled_reward(prompts, completions, task, log_extra=None, **kwargs):
    """A user's slip: it logs the labels of the completions it scored first only."""
    if log_extra is not None:
        log_extra("task", list(task)[: len(task) // 2])
    return [sum(c in "aeiou" for c in text) / 8 for text in completions]


def _iterated_label_reward(prompts, completions, task, log_extra=None, **kwargs):
    """Labels logged as an iterator (TRL takes any iterable), some of them None."""
    if log_extra is not None:
        log_extra("task", map(lambda t: None if t == "tb" else t, task))
    return [0.1 * len(text) for text in completions]


def _labelled_twice_reward(prompts, completions, task, log_extra=None, **kwargs):
    """Two reward functions of one script each log the labels, whole: still one per row."""
    if log_extra is not None:
        log_extra("task", list(task))
    return [0.1 * len(text) for text in completions]


class _SometimesLabelledReward:
    """Logs the labels on its odd calls only (a reward that logs when it scored anything)."""

    __name__ = "sometimes_labelled"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts, completions, task, log_extra=None, **kwargs):
        self.calls += 1
        if log_extra is not None and self.calls % 2 == 1:
            log_extra("task", list(task))
        return [0.1 * len(text) for text in completions]


def test_labels_logged_for_only_part_of_a_generation_are_left_out_not_shifted(
        tiny_model, tmp_path, caplog):
    """Audit 106 F11: a reward logging fewer labels than completions was taken as it stood:
    TRL's log keeps the earlier generation's labels, so step 2 on gave completions the labels of
    other prompts, silently. Such labels are left out (and said); labels every completion has,
    logged by two functions, are kept and right."""
    import logging

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    data = Dataset.from_dict({"prompt": [f"{a} {b}" for a in "abcd" for b in "efgh"],
                              "task": [f"t{a}" for a in "abcd" for _ in "efgh"]})
    truth = dict(zip(data["prompt"], data["task"]))

    def run(name, reward_funcs):
        config = GRPOConfig(output_dir=str(tmp_path / f"trl_{name}"), max_steps=3,
                            learning_rate=3e-4, per_device_train_batch_size=8,
                            num_generations=4, max_completion_length=8, use_cpu=True,
                            bf16=False, report_to="none", save_strategy="no",
                            disable_tqdm=True, seed=1)
        callback = ShardCallback(run_dir=tmp_path / name, runner={"min_samples": 1})
        GRPOTrainer(model=str(tiny_model), reward_funcs=reward_funcs, args=config,
                    train_dataset=data, callbacks=[callback]).train()
        return [json.loads(line) for line in (tmp_path / name / "rollouts.jsonl").open()]

    with caplog.at_level(logging.WARNING, logger="sae_shards"):
        half = run("half", [_half_labelled_reward])
    assert "logged 4 value(s) of 'task' with log_extra for a generation of 8 completions" \
        in caplog.text
    assert "not the label column" not in caplog.text  # not told it logged no labels
    assert "completion log does not" not in caplog.text  # (audit 110 F8)
    assert [row["tasks"] for row in half] == [None] * 3
    twice = run("twice", [_labelled_twice_reward, _tagging_reward])
    for row in twice:
        assert row["tasks"] == [truth[p] for p in row["prompts"]]
    # audit 110 F7: 12 labels for 8 completions (one function's 8, another's 4) are no whole
    # multiple; F6: labels logged by the first generation and not the second are not the
    # second's (TRL's log keeps the first's)
    assert [row["tasks"] for row in run("and_half", [_labelled_twice_reward,
                                                     _half_labelled_reward])] == [None] * 3
    sometimes = run("sometimes", [_SometimesLabelledReward()])
    assert [row["tasks"] for row in sometimes] == [
        [truth[p] for p in sometimes[0]["prompts"]], None,
        [truth[p] for p in sometimes[2]["prompts"]]]

    # audit 107 F7: an iterator crashed training in the counting wrapper; F3: a None label was
    # the context "None": a step with one has no labels, said once
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_shards"):
        some = run("iterated", [_iterated_label_reward])
    assert "some completions have no 'task' label" in caplog.text
    assert "but not the label column" not in caplog.text  # (audit 109 F5: it was said too)
    for row in some:
        labels = [truth[p] for p in row["prompts"]]
        assert row["tasks"] == (None if "tb" in labels else labels)
    assert any(row["tasks"] for row in some) and not any(row["tasks"] for row in some
                                                          if "tb" in map(truth.get, row["prompts"]))

    # F9: two reward functions of one name: TRL's log keeps one column, the last one's
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_shards"):
        run("same_name", [functools.partial(_vowel_reward), functools.partial(_vowel_reward)])
    assert "reward functions share a name (_vowel_reward;" in caplog.text


def test_policy_not_from_a_local_directory_keeps_its_initial_weights(tiny_model, tmp_path,
                                                                     caplog):
    """A policy given as a model object (built in the script, or from a Hub id) has no directory
    to reload theta_0 from: the callback saves it to run_dir/model before the first step, so the
    report's logit lens works; config.json never records a name as a path. A dataset label
    column that no reward function logs is warned about once."""
    import logging
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from sae_shards.recipe.tasks import build_task

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model.config._name_or_path = "some-org/some-model"  # as a Hub id would read
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = build_task("letters", target_length=8)
    config = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=4, learning_rate=3e-4,
                        per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=8, use_cpu=True, bf16=False, report_to="none",
                        save_strategy="no", disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[_vowel_reward], args=config,
                          processing_class=AutoTokenizer.from_pretrained(str(tiny_model)),
                          train_dataset=Dataset.from_dict(task.dataset(32).to_dict()))
    run = tmp_path / "run"
    trainer.add_callback(ShardCallback(run_dir=run, runner={"min_samples": 2}))
    with caplog.at_level(logging.WARNING, logger="sae_shards"):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if "completion log does not" in r.getMessage()]
    assert len(warned) == 1 and "log_extra('task'" in warned[0]
    assert all(json.loads(line)["tasks"] is None
               for line in (run / "rollouts.jsonl").read_text().splitlines())

    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["path"] is None and cfg["model"]["name_or_path"] == "some-org/some-model"
    saved = AutoModelForCausalLM.from_pretrained(str(run / "model"))
    for name, p in saved.named_parameters():  # theta_0, not the trained policy
        assert torch.equal(p, theta0[name]), name
    trained = dict(model.named_parameters())
    assert any(not torch.equal(trained[n], theta0[n]) for n in theta0)
    assert (run / "model" / "tokenizer_config.json").is_file()
    assert cli_main(["analyze", str(run), "--shards", "1"]) == 0
    html = (run / "report.html").read_text()
    assert "Needs the run's initial and final model" not in html.split('id="logit-lens"')[1]
    assert "--task FILE.py:NAME" in html  # dose-response: its rewards are the script's own
    assert (f"<td>initial weights</td><td>{run / 'model'} (saved when the run started: the "
            "policy held no local directory&#x27;s weights exactly)</td>") in html

    # the copy is fingerprinted as a model.path is (audit 134 #3: a swapped model/ was read
    # as theta_0 without a word)
    from safetensors.torch import load_file, save_file

    from sae_shards.capture.initial_model import fingerprint

    assert cfg["model"]["fingerprint"] == fingerprint(run / "model") != {}
    weights = run / "model" / "model.safetensors"
    kept = weights.read_bytes()
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    assert cli_main(["analyze", str(run), "--shards", "1"]) == 0
    assert ("are not the ones the run started from (model.safetensors differ"
            in (run / "report.html").read_text())
    weights.write_bytes(kept)

    (run / "model" / "config.json").unlink()  # the report then says what is missing
    assert cli_main(["analyze", str(run), "--shards", "1"]) == 0
    assert f"no initial model at {run / 'model'}" in (run / "report.html").read_text()


def test_loaded_from_trusts_a_directory_only_while_the_model_holds_its_weights(tiny_model,
                                                                             monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sae_shards.capture.initial_model import loaded_from

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert loaded_from(model) == str(tiny_model.resolve())
    monkeypatch.chdir(tiny_model.parent)  # a relative name is recorded absolute
    assert loaded_from(AutoModelForCausalLM.from_pretrained(tiny_model.name)) == \
        str(tiny_model.resolve())
    # the config names the directory, the weights are new: not theta_0 of that directory
    assert loaded_from(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
        str(tiny_model)))) is None
    with torch.no_grad():  # changed after loading (the spot-checked tensors)
        for p in model.parameters():
            p.add_(1.0)
    assert loaded_from(model) is None
    model.config._name_or_path = "some-org/some-model"
    assert loaded_from(model) is None


def test_a_sharded_policy_is_taken_at_its_word_only_for_a_directory_with_weights(tiny_model,
                                                                                tmp_path,
                                                                                monkeypatch):
    """A sharded policy (no process holds a whole weight) cannot be compared with its
    directory: a directory holding weights is taken at its word; one holding a config alone
    (the policy was built with from_config) is not, so the callback gathers theta_0. It took
    any directory with a config.json, and analysis then read weights that were never theta_0."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from sae_shards.capture import initial_model

    monkeypatch.setattr(initial_model, "is_sharded", lambda model: True)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(tiny_model / "config.json", config_only / "config.json")
    built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_only)))
    assert built.config._name_or_path == str(config_only)  # names it, holds none of its weights
    assert initial_model.loaded_from(built) is None
    loaded = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert initial_model.loaded_from(loaded) == str(tiny_model.resolve())


@pytest.mark.parametrize("change", ["one_late_weight", "bf16_from_fp32", "resized_embeddings"])
def test_loaded_from_sees_any_change_after_loading(tiny_model, change):
    """A policy changed after loading (a weight edited deep in the model, as merging an SFT
    adapter would; cast to a lower precision; its vocabulary resized) does not start from its
    directory's weights: theta_0 must be saved, not read back from the directory."""
    from transformers import AutoModelForCausalLM

    from sae_shards.capture.initial_model import loaded_from

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_model), dtype=torch.bfloat16 if change == "bf16_from_fp32" else torch.float32)
    if change == "one_late_weight":
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.weight[0, 0] += 0.5
    elif change == "resized_embeddings":
        model.resize_token_embeddings(model.config.vocab_size + 2)
    assert loaded_from(model) is None


def test_loaded_from_takes_a_lossless_upcast(tiny_model, tmp_path):
    """bf16 files loaded in fp32 hold the files' values exactly: the directory is theta_0."""
    from transformers import AutoModelForCausalLM

    from sae_shards.capture.initial_model import loaded_from

    halved = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_model)).to(torch.bfloat16).save_pretrained(halved)
    model = AutoModelForCausalLM.from_pretrained(str(halved), dtype=torch.float32)
    assert model.dtype == torch.float32 and loaded_from(model) == str(halved.resolve())


def test_loaded_from_does_not_take_a_directory_it_cannot_check(tiny_model, tmp_path):
    """Weights only in pytorch_model.bin: checking them, and analysis reading them, would
    unpickle; the callback saves theta_0 as safetensors instead."""
    import shutil

    from transformers import AutoModelForCausalLM

    from sae_shards.capture.initial_model import loaded_from

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    model.config._name_or_path = str(pickled)
    assert loaded_from(model) is None
    model.config._name_or_path = str(tiny_model)  # the same weights, checkable
    assert loaded_from(model) == str(tiny_model.resolve())


def test_loaded_from_sees_through_a_peft_model(tiny_model):
    """A LoRA policy's theta_0 is its base model's directory (the adapter starts at B = 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sae_shards.capture.initial_model import loaded_from

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert loaded_from(model) == str(tiny_model.resolve())


def test_a_lora_policy_built_in_the_script_has_its_base_saved_for_analysis(tmp_path):
    """GRPOTrainer(model=<a model object>, peft_config=...): theta_0 is the base model, saved to
    run_dir/model before the first step (without the LoRA factors, under the base's own names),
    and analysis merges the final adapter into it."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer

    from sae_shards.analysis.shards import load_run_models, run_models_missing
    from sae_shards.recipe.models import tiny_model_and_tokenizer
    from sae_shards.recipe.tasks import build_task

    model, tokenizer = tiny_model_and_tokenizer(seed=1)  # built here: no directory to name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = build_task("letters", target_length=8)
    run = tmp_path / "run"
    config = _four_lora_steps(tmp_path / "trl")
    GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=task.reward_funcs,
                args=config, train_dataset=Dataset.from_dict(task.dataset(32).to_dict()),
                peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                callbacks=[ShardCallback(run_dir=run, runner={"min_samples": 2})]).train()
    assert run_models_missing(run) is None
    recorded = json.loads((run / "config.json").read_text())["model"]
    assert recorded["name_or_path"] == type(model).__name__  # the base's class, not "PeftModel"
    assert recorded["lora"] == {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                                "target_modules": ["q_proj", "v_proj"], "rslora": False}
    saved = load_file(run / "model" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in saved)
    models = load_run_models(run)
    initial = models.initial.state_dict()
    assert all(torch.equal(initial[k], v) for k, v in before.items())  # theta_0, bit for bit
    final = models.final.state_dict()
    moved = {k for k in before if not torch.equal(final[k], initial[k])}
    assert moved and all("q_proj.weight" in k or "v_proj.weight" in k for k in moved)


def test_a_lora_policy_continued_from_a_trained_adapter_starts_from_it(tiny_model, tmp_path):
    """An adapter that does not start at zero (an SFT adapter loaded with is_trainable=True)
    with lm_head trained through modules_to_save: theta_0 is the base with that adapter merged
    in (saved to run_dir/initial_adapter), lm_head is captured under the merged model's name,
    and final - initial, as analysis loads them, is exactly the sum of the captured updates."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from sae_shards.analysis.shards import load_run_models, run_models_missing
    from sae_shards.recipe.tasks import build_task

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["lm_head"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the adapter as an earlier fine-tuning left it
        for name, p in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    started = {k: v.clone() for k, v in _merged(model).items()}
    task = build_task("letters", target_length=8)
    run = tmp_path / "run"
    config = _four_lora_steps(tmp_path / "trl")
    targets = ["*q_proj.weight", "*v_proj.weight", "lm_head.weight"]
    GRPOTrainer(model=model, processing_class=AutoTokenizer.from_pretrained(str(tiny_model)),
                reward_funcs=task.reward_funcs, args=config,
                train_dataset=Dataset.from_dict(task.dataset(32).to_dict()),
                callbacks=[ShardCallback(run_dir=run, capture={"targets": targets},
                                         runner={"min_samples": 2, "save_samples": True})]).train()
    assert (run / "initial_adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "config.json").read_text())["model"]["initial_adapter"] is True
    models = load_run_models(run)
    initial, final = models.initial.state_dict(), models.final.state_dict()
    assert all(torch.equal(initial[k], v) for k, v in started.items())  # base + s B0 A0
    samples = load_file(run / "samples.safetensors")
    names = {k.removeprefix("sample.") for k in samples if k.startswith("sample.")}
    assert "lm_head.weight" in names and len(names) == 5  # 2 layers x (q, v) + lm_head
    for name in names:
        total = samples[f"sample.{name}"].sum(0)
        moved = final[name] - initial[name]
        assert moved.abs().max() > 0
        torch.testing.assert_close(total, moved, rtol=1e-4, atol=1e-6)
    # without its initial adapter (a partial copy of the run) it is refused, not read as the base
    shutil.rmtree(run / "initial_adapter")
    assert "the run started from a LoRA adapter that was not zero" in run_models_missing(run)
    assert load_run_models(run) is None


def _four_lora_steps(output_dir: Path):
    """A short GRPO config for the LoRA policies above (4 steps, a large learning rate)."""
    from trl import GRPOConfig

    return GRPOConfig(output_dir=str(output_dir), max_steps=4, learning_rate=1e-2,
                      per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                      use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                      disable_tqdm=True, seed=3)


def _merged(peft_model) -> dict[str, torch.Tensor]:
    """The effective weights of a PEFT model (a merged copy; the model is left as it is)."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload().state_dict()


@pytest.mark.parametrize("reward", ["constant", "letters"])
def test_rewards_that_always_tie_are_warned_about(tiny_model, tmp_path, caplog, reward):
    """A reward every completion scores alike gives zero advantages: the run says so after five
    logged steps; the graded letters reward does not trigger it."""
    import logging

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from sae_shards.recipe.tasks import build_task

    task = build_task("letters", target_length=8)

    def constant(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    config = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=6, learning_rate=3e-4,
                        per_device_train_batch_size=8, num_generations=4, seed=0,
                        max_completion_length=8, use_cpu=True, bf16=False, report_to="none",
                        save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = GRPOTrainer(model=str(tiny_model), args=config,
                          reward_funcs=constant if reward == "constant" else task.reward_funcs,
                          train_dataset=Dataset.from_dict(task.dataset(64).to_dict()))
    trainer.add_callback(ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2},
                                       save_model=False))
    with caplog.at_level(logging.WARNING, logger="sae_shards"):
        trainer.train()
    tied = [r.getMessage() for r in caplog.records if "rewards tied" in r.getMessage()]
    if reward == "constant":
        assert len(tied) == 1 and "steps 1-5" in tied[0]
    else:
        assert tied == []


def test_a_script_run_is_evaluated_with_its_reward_handed_back(tiny_model, tmp_path, capsys):
    """``sae-shards evaluate`` of a user's run that kept samples and held-out steps: without
    ``--task`` the causal figures are null and the report says why; with the script's
    ``RewardTask`` the steering and ablation tests run on its contexts."""
    from trl import GRPOConfig, GRPOTrainer

    from sae_shards.analysis.reward_task import load_task_spec

    script = load_task_spec(f"{EXAMPLE}:reward_task")  # the example's dataset and reward
    run = tmp_path / "run"
    torch.manual_seed(0)
    config = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=16, learning_rate=3e-4,
                        per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=8, beta=0.0, use_cpu=True, bf16=False,
                        report_to="none", save_strategy="no", logging_steps=1,
                        disable_tqdm=True, seed=1)
    GRPOTrainer(model=str(tiny_model), reward_funcs=script.reward_funcs, args=config,
                train_dataset=script.prompts,
                callbacks=[ShardCallback(run_dir=run, runner={
                    "min_samples": 2, "save_samples": True, "heldout_every": 4})]).train()
    small = ["--n-null", "2", "--n-prompts", "2"]
    assert cli_main(["evaluate", str(run), *small]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert result["causal"] is None and "--task FILE.py:NAME" in result["causal_skipped"]
    assert "No steering or ablation: the run used its script's own reward" in capsys.readouterr().out
    assert cli_main(["evaluate", str(run), *small, "--task", f"{EXAMPLE}:reward_task"]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert result["causal_skipped"] is None and result["tasks"] == ["digits", "vowels"]
    assert "schedule none (not a scheduled task), group" in (run / "evaluation.md").read_text()
    effects = result["steering"]["per_task"]["vowels"]["shard_plus"]
    assert set(effects) == {"digits", "vowels"} and all(math.isfinite(v) for v in effects.values())
    assert cli_main(["evaluate", str(run), "--no-steering", "--task",
                     f"{EXAMPLE}:reward_task"]) == 2  # scoring asked for and skipped: refused


def test_a_script_whose_trainer_never_saves_is_told_it_cannot_resume_after_a_kill(tmp_path,
                                                                                   caplog):
    """Only TRL's save_steps make a killed script's run resumable: save_strategy='no' is warned
    about at the start, and the "no resumable run" refusal names the trainer's setting."""
    from trl import GRPOConfig

    from sae_shards.capture.trl_checkpoints import in_script_terms, warn_no_trl_checkpoints
    from sae_shards.run.rundir import _why_not_resumable

    def args(**kw):
        return GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False,
                          report_to="none", **kw)

    with caplog.at_level("WARNING", logger="sae_shards.capture.trl_checkpoints"):
        warn_no_trl_checkpoints(args(save_strategy="steps", save_steps=5, max_steps=300))
        warn_no_trl_checkpoints(args(save_strategy="steps", save_steps=0.5, max_steps=300))
        warn_no_trl_checkpoints(args(save_strategy="steps"))  # max_steps from the epochs
        warn_no_trl_checkpoints(args(save_strategy="epoch"), epochs=2)  # saves after epoch 1
        warn_no_trl_checkpoints(args(save_strategy="epoch"))  # epochs not known yet
        assert not caplog.records
        warn_no_trl_checkpoints(args(save_strategy="epoch", max_steps=10), epochs=1)
        assert ("save_strategy='epoch') and this run is one epoch or less: its first checkpoint "
                "is at its last step") in caplog.text
        caplog.clear()
        warn_no_trl_checkpoints(args(save_strategy="no"))
        assert "saves no checkpoints (save_strategy='no')" in caplog.text
        caplog.clear()  # TRL's default save_steps=500 on a 300-step run: only the last step
        warn_no_trl_checkpoints(args(save_strategy="steps", max_steps=300), checkpoint_every=50)
        assert ("first checkpoint at its last step (save_steps=500, max_steps=300): a run "
                "killed before its end") in caplog.text
        assert "e.g. save_steps=50)" in caplog.text
        caplog.clear()
        warn_no_trl_checkpoints(args(save_strategy="steps", save_steps=0.99, max_steps=40))
        assert "save_steps=0.99, max_steps=40" in caplog.text and "e.g. save_steps=4)" in caplog.text
    said = in_script_terms(_why_not_resumable(tmp_path, ["rollouts.jsonl"]))
    assert "checkpoint_every" not in said and "smaller save_steps" in said


def test_whether_a_run_copies_its_buffer_at_checkpoints_is_the_trainers_save_strategy(tmp_path):
    """The host-memory check of resumable step checkpoints (accelerators) applies when the
    trainer saves (any save_strategy but 'no'): runner.checkpoint_every alone writes the shards
    only. Without a trainer, runner.checkpoint_every (sae-shards train gives TRL its steps)."""
    from types import SimpleNamespace

    from trl import GRPOConfig

    from sae_shards.capture.trl_checkpoints import writes_checkpoints
    from sae_shards.capture.runner import RunnerConfig

    def trainer(**kw):
        return SimpleNamespace(args=GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True,
                                               bf16=False, report_to="none", **kw))

    never, every = RunnerConfig(checkpoint_every=0), RunnerConfig(checkpoint_every=5)
    assert not writes_checkpoints(never, trainer(save_strategy="no"))
    assert not writes_checkpoints(every, trainer(save_strategy="no"))  # the shards only
    assert writes_checkpoints(never, trainer(save_strategy="steps", save_steps=5))
    assert writes_checkpoints(never, trainer(save_strategy="epoch"))
    assert writes_checkpoints(every, None)  # no trainer: sae-shards train saves TRL's side too
    assert not writes_checkpoints(never, None)


def test_the_launcher_a_run_records_is_the_one_it_was_started_with():
    from sae_shards.capture.distributed import launcher

    assert launcher(1, {}) == ""
    assert launcher(2, {}) == "accelerate launch --multi_gpu --num_processes 2"
    assert launcher(4, {"ACCELERATE_USE_DEEPSPEED": "true",
                        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == (
        "accelerate launch --use_deepspeed --zero_stage 3 --num_processes 4")
    assert launcher(2, {"ACCELERATE_USE_FSDP": "true"}) == (
        "accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2")
    # torchrun itself (accelerate launch runs torchrun too, with its own environment)
    assert launcher(2, {"TORCHELASTIC_RUN_ID": "x"}) == "torchrun --nproc_per_node 2"
    assert launcher(8, {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4"}) == (
        "torchrun --nnodes 2 --nproc_per_node 4")  # per node, not the total
    assert launcher(2, {"TORCHELASTIC_RUN_ID": "x", "ACCELERATE_DYNAMO_BACKEND": "no"}) == (
        "torchrun --nproc_per_node 2")  # an accelerate setting exported in the shell
    assert launcher(2, {"TORCHELASTIC_RUN_ID": "x", "ACCELERATE_MIXED_PRECISION": "no"}) == (
        "accelerate launch --multi_gpu --num_processes 2")


def test_an_fsdp_launch_that_accelerate_ran_replicated_is_warned():
    """accelerate applies FSDP only on accelerators: an FSDP launch on CPUs ran as DDP, green,
    with no word (an audit's smoke test of its FSDP setup exercised DDP's path)."""
    from sae_shards.capture.distributed import fsdp_not_applied

    fsdp = {"ACCELERATE_USE_FSDP": "true"}
    assert "this run is DDP's" in fsdp_not_applied(False, 2, fsdp)
    assert fsdp_not_applied(True, 2, fsdp) is None  # sharded: FSDP applied
    assert fsdp_not_applied(False, 1, fsdp) is None and fsdp_not_applied(False, 2, {}) is None


def test_a_model_file_too_large_to_map_is_named_not_raised_from_inside_safetensors(tiny_model,
                                                                                   tmp_path):
    """The policy's model directory whose model.safetensors declares a 4 TB tensor (a sparse
    file: safetensors' size check passes): comparing it with the policy when a run starts
    raises a CheckpointError naming the file and saying what the directory is, not
    safetensors' bare RuntimeError ('unable to mmap')."""
    from helpers import sparse_safetensors
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from sae_shards.capture.initial_model import loaded_from

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    huge = sparse_safetensors(copy / "model.safetensors", {"lm_head.weight": [10**6, 10**6]})
    try:
        with safe_open(huge, framework="pt", device="cpu"):
            pytest.skip("this machine maps a 4 TB file (overcommit): nothing to refuse")
    except RuntimeError:
        pass
    model.config._name_or_path = str(copy)
    with pytest.raises(CheckpointError, match=f"{huge}: cannot be mapped into memory .*unable "
                                              r"to mmap.*the directory the policy was loaded "
                                              r"from.*download or save the model again"):
        loaded_from(model)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_model_file_is_named_not_raised_from_inside_safetensors(tiny_model, tmp_path,
                                                                          damage):
    """The policy's model directory whose model.safetensors was cut short, or whose header
    length was overwritten, after the policy was loaded from it: comparing the two when a run
    starts raises a CheckpointError naming the file and what the directory is, not safetensors'
    bare SafetensorError ('incomplete metadata', 'header too large') from inside
    trainer.train()."""
    from transformers import AutoModelForCausalLM

    from sae_shards.capture.initial_model import loaded_from

    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    model = AutoModelForCausalLM.from_pretrained(str(copy))
    file = copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=f"{file}: cannot be read as safetensors .*truncated "
                                              r"or damaged .*the directory the policy was "
                                              r"loaded from.*download or save the model again"):
        loaded_from(model)


def test_a_model_file_this_process_may_not_map_is_named(tmp_path):
    """Under an address-space limit (ulimit -v) that leaves 1 GiB, a model directory's 4 GiB
    weight file fails safetensors' memory map with a MemoryError: a CheckpointError naming the
    file and the limit, in a process of its own."""
    from helpers import sparse_safetensors

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    file = sparse_safetensors(folder / "model.safetensors", {"weight": [2**15, 2**15]})
    code = (
        "import resource, types, torch\n"
        "from sae_shards.capture.initial_model import loaded_from\n"
        "from sae_shards.core.checkpoint_checks import CheckpointError\n"
        "model = torch.nn.Linear(2, 2, bias=False)\n"
        f"model.config = types.SimpleNamespace(_name_or_path={str(folder)!r})\n"
        "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n"
        "try:\n"
        "    loaded_from(model)\n"
        "except CheckpointError as e:\n"
        "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"{file}: cannot be mapped into memory (")
    assert "ulimit -v" in done.stdout and "the directory the policy was loaded from" in done.stdout


@pytest.mark.parametrize("run_dir, problem", [
    ("", "run_dir is empty; give the run a directory of its own"),
    (" ", "run_dir is empty; give the run a directory of its own"),
    (".", "run_dir='.' would write the run into the current directory"),
])
def test_a_run_dir_that_is_no_directory_of_its_own_is_refused_as_given(
        run_dir, problem, tmp_path, monkeypatch):
    """``ShardCallback(run_dir="")`` is refused as empty, as ``sae-shards train run_dir=`` is,
    not as "run_dir='.'" (what ``Path("")`` reads), which the user never wrote; nothing is
    created."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(problem)):
        ShardCallback(run_dir=run_dir)
    assert list(tmp_path.iterdir()) == []


def test_a_rank_at_which_low_rank_saves_nothing_is_warned(tiny_model, tmp_path, caplog):
    """sae.rank=1000 was taken in silence: capped at min(m, n), it made every latent's factored
    direction larger than the matrix, the SAE 1.7x a dense one and 70x slower. The tiny model's
    64 x 64 matrices break even at rank 32 (32 x 128 = 64 x 64), its 64 x 128 ones above 42."""
    with caplog.at_level("WARNING", logger="sae_shards.capture.callback"):
        _user_trainer(tiny_model, tmp_path / "trl", [ShardCallback(
            run_dir=tmp_path / "r32", sae={"rank": 32}, runner={"min_samples": 2})],
            max_steps=2).train()
    assert re.search(r"sae.rank=32 gives \d+ of \d+ targets a factored direction at least as "
                     r"large as the matrix itself \(.*q_proj.weight.*\): .* lower sae.rank to 31 "
                     r"or less", caplog.text), caplog.text
    assert "down_proj" not in caplog.text.split("sae.rank=32 gives")[1].split("\n")[0]
    assert "exceeds capture.capacity" not in caplog.text  # batch 32 of 256 slots
    from sae_shards.core.targets import make_targets, oversized_ranks

    shapes = {"q": (64, 64), "down": (64, 128)}  # rank 31 saves memory on both
    assert oversized_ranks(make_targets(shapes, rank=31)) == {}
    assert oversized_ranks(make_targets(shapes, rank=32)) == {"q": 31}


def test_a_matrix_no_rank_saves_memory_on_is_named_without_an_impossible_rank():
    """A mixture of experts' shared-expert gate is [1, 64]: rank 1 already costs 65 numbers for
    64. The warning said "lower sae.rank to 1 or less"; it now says no rank saves memory there."""
    from sae_shards.capture.callback_args import oversized_rank_text
    from sae_shards.core.targets import make_targets, oversized_ranks

    gate = oversized_ranks(make_targets({"mlp.shared_expert_gate.weight": (1, 64),
                                         "q": (64, 64)}, rank=1))
    assert gate == {"mlp.shared_expert_gate.weight": 1}
    text = oversized_rank_text(1, gate, 2)
    assert "no rank does on matrices this narrow" in text and "or less" not in text
    wide = oversized_ranks(make_targets({"q": (64, 64)}, rank=40))
    assert oversized_rank_text(40, wide, 1).endswith("lower sae.rank to 31 or less")


def test_a_batch_larger_than_the_buffer_is_warned(tiny_model, tmp_path, caplog):
    """sae.batch_size=1000 with 256 slots was taken in silence: every batch repeats samples."""
    with caplog.at_level("WARNING", logger="sae_shards.capture.callback"):
        _user_trainer(tiny_model, tmp_path / "trl", [ShardCallback(
            run_dir=tmp_path / "r", sae={"batch_size": 40}, capacity=32,
            runner={"min_samples": 2})], max_steps=2).train()
    assert ("sae.batch_size=40 exceeds capture.capacity=32: a batch is drawn with replacement "
            "from the buffer") in caplog.text, caplog.text


@pytest.mark.parametrize("granularity, said, saved", [
    ("step", ", the LoRA adapters' effective weight updates s (B1 A1 - B0 A0)", False),
    ("group", ", each event's gradient of the LoRA-adapted effective weights W0 + s B A", False),
    ("step", ", 2 of them the LoRA adapters' effective weight updates s (B1 A1 - B0 A0), 1 "
             "weight trained whole (modules_to_save)", True),
])
def test_the_start_line_says_what_a_lora_run_captures(tmp_path, caplog, granularity, said,
                                                      saved):
    """Per event the start line said 'effective weight updates s (B1 A1 - B0 A0)' too, which
    is what a per-step LoRA run captures; per event it is each event's gradient. A weight the
    adapter trains whole (modules_to_save) is not called an adapter's update (audit 138 F13)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer

    from sae_shards.recipe.models import tiny_model_and_tokenizer
    from sae_shards.recipe.tasks import build_task

    model, tokenizer = tiny_model_and_tokenizer(seed=1)
    task = build_task("letters", target_length=8)
    callback = ShardCallback(run_dir=tmp_path / "run", capture={"granularity": granularity},
                             runner={"min_samples": 2},
                             **({"targets": ["lm_head.weight", "*q_proj.weight"]} if saved
                                else {}))
    with caplog.at_level("WARNING", logger="sae_shards.capture.callback"):
        GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=task.reward_funcs,
                    args=_four_lora_steps(tmp_path / "trl"),
                    train_dataset=Dataset.from_dict(task.dataset(32).to_dict()),
                    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                           modules_to_save=["lm_head"] if saved else None),
                    callbacks=[callback]).train()
    (line,) = [r.getMessage() for r in caplog.records if "sae-shards captures" in r.getMessage()]
    assert said in line and line.count("LoRA") == 1, line


def test_a_dataset_record_follows_its_rows_and_their_order_not_object_addresses():
    """``rl.dataset`` of a script's config.json: the same rows give the same record in any
    process (a row's object whose repr names its address, e.g. an image, counts by its type);
    another row, another order, another length, a changed tensor give another; a dataset with
    no length (iterable) is not recorded."""
    from datasets import Dataset

    from sae_shards.capture.trainer_settings import dataset_record

    rows = {"prompt": [f"p{i}" for i in range(100)], "x": list(range(100))}
    record = dataset_record(Dataset.from_dict(rows))
    assert record["rows"] == 100 and record["columns"] == ["prompt", "x"]
    assert dataset_record([{"prompt": p, "x": x} for p, x in zip(rows["prompt"], rows["x"])]) \
        == {**record, "columns": None}  # a list of rows: the same content
    for other in (Dataset.from_dict(rows).shuffle(seed=0), Dataset.from_dict(rows).select(
            range(99)), Dataset.from_dict({**rows, "x": [*range(99), 7]})):
        assert dataset_record(other)["digest"] != record["digest"]
    tensors = [{"ids": torch.arange(4) + i, "image": object()} for i in range(3)]
    again = [{"ids": torch.arange(4) + i, "image": object()} for i in range(3)]
    assert dataset_record(tensors) == dataset_record(again)
    again[2]["ids"][0] = 9
    assert dataset_record(tensors) != dataset_record(again)
    assert dataset_record(iter(tensors)) is None and dataset_record(None) is None
    shifting = _ShiftingRows()  # rows that read differently each time: no digest to compare
    assert dataset_record(shifting) == {"rows": 2, "columns": None, "digest": None}
    # rows that rarely read differently may read alike in one process and not in the other
    # (audit 119: 40% of such resumes refused): a change is said only when both have a digest
    from sae_shards.capture.trainer_settings import rows_changed, without_digest

    clean = {"rows": 2, "columns": None, "digest": "ab"}
    varied = {**clean, "digest": None}
    assert rows_changed(clean, clean) is None
    assert rows_changed({**clean, "digest": "cd"}, clean) == "hash ab -> cd"
    for now, recorded in ((varied, clean), (clean, varied), (varied, varied), (clean, None),
                          (None, clean)):
        assert rows_changed(now, recorded) is None
    assert without_digest(clean) == {"rows": 2, "columns": None}
    assert without_digest(None) is None
    # a numpy object array's bytes are pointers: its elements are hashed, alike in any process
    # (audit 119); a row that cannot be hashed gives no digest, and the run goes on
    import subprocess
    import sys

    import numpy as np

    rows = "[{'a': np.array(['a', 'bb', i], dtype=object)} for i in range(3)]"
    script = ("import numpy as np; from sae_shards.capture.trainer_settings import "
              f"dataset_record; print(dataset_record({rows})['digest'])")
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert there == dataset_record(eval(rows, {"np": np}))["digest"] is not None
    assert dataset_record([{"x": torch.eye(2).to_sparse()}])["digest"] is None


class _ShiftingRows(torch.utils.data.Dataset):
    """A dataset with a random transform: each read of a row differs."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"prompt": f"p{i}", "noise": torch.rand(2)}


class _AddsToLogs(TrainerCallback):
    """A user's callback that adds its own figure to TRL's logs (before ShardCallback sees
    them: transformers passes one dict to every callback, after log_history took its copy)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["my_figure"] = float(state.global_step) / 3


def test_a_script_whose_callback_adds_to_the_logs_resumes(tiny_model, tmp_path):
    """metrics.jsonl's rl rows are the logs ShardCallback was handed, which another callback
    before it may have added to; TRL's checkpoint log holds only what TRL logged. The resume's
    check that the checkpoint is this run's compares the figures both hold (it refused the
    run's own checkpoint: "my_figure ... None in TRL's")."""
    torch.manual_seed(0)
    first = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2})
    _user_trainer(tiny_model, tmp_path / "trl", [_AddsToLogs(), first, _StopAt(first, 5)]).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert any("my_figure" in r for r in rows if r.get("kind") == "rl")
    again = ShardCallback(run_dir=tmp_path / "run", runner={"min_samples": 2}, resume=True)
    _user_trainer(tiny_model, tmp_path / "trl", [_AddsToLogs(), again]).train(
        resume_from_checkpoint=True)
    assert again.summary["rl_steps"] == 10 and not again.summary["interrupted"]


@pytest.mark.parametrize("storage", ["bfloat16", "float32"])
def test_the_buffer_is_allocated_in_the_storage_dtype_its_memory_was_checked_for(tmp_path,
                                                                                 storage):
    """capture.storage_dtype reaches the ring buffer its memory was checked for (a bf16
    buffer allocated in fp32 takes twice what was checked; audit 128 PL03)."""
    from sae_shards.capture.callback import ShardCallback
    from sae_shards.capture.memory import buffer_memory_bytes
    from sae_shards.recipe.models import tiny_model_and_tokenizer

    model, _ = tiny_model_and_tokenizer("qwen2", hidden_size=32, num_layers=2, num_heads=4,
                                        intermediate_size=64, seed=0)
    callback = ShardCallback(run_dir=tmp_path / "run", capture={"storage_dtype": storage},
                             handle_signals=False, log_to_wandb=False)
    try:
        callback.setup(model)
        buffer = callback.parts.buffer
        assert buffer.dtype == getattr(torch, storage)
        assert buffer.memory_bytes == buffer_memory_bytes(buffer.targets, buffer.capacity,
                                                            getattr(torch, storage))
    finally:
        callback.close()




def test_a_lora_adapter_away_from_zero_does_not_start_at_the_base():
    """No modules_to_save: the LoRA factors alone decide (the existing test's adapter also
    trains modules_to_save, which answers first)."""
    import peft

    from sae_shards.capture.initial_model import starts_at_base

    def lora_model(init):
        torch.manual_seed(0)
        base = torch.nn.Module()
        base.q = torch.nn.Linear(6, 4, bias=False)
        return peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q"],
                                                         init_lora_weights=init))

    assert starts_at_base(lora_model(True))  # peft's default: B = 0
    assert not starts_at_base(lora_model(False))  # B != 0: the adapter moves the weights


class _ReportMidRun(TrainerCallback):
    """Writes a report into the run directory at RL step ``step``, as `sae-shards analyze` of
    the live run would."""

    def __init__(self, run_dir: Path, step: int) -> None:
        self.run_dir, self.step = run_dir, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            (self.run_dir / "report.html").write_text("<html>as of step 2</html>")


def test_a_report_written_mid_run_is_removed_at_its_end_in_words_a_script_shows(
        tiny_model, tmp_path, caplog):
    """A report analyze wrote into a script's live run is stale at its end and removed: that
    was logged at INFO, which a script that configures no logging never shows, so the report
    simply vanished (audit 131 F4)."""
    run = tmp_path / "run"
    callback = ShardCallback(run_dir=run, runner={"min_samples": 2})
    with caplog.at_level(logging.WARNING, logger="sae_shards"):
        _user_trainer(tiny_model, tmp_path / "trl", [callback, _ReportMidRun(run, 2)],
                      max_steps=4).train()
    assert not (run / "report.html").exists()
    said = [r for r in caplog.records if "report.html: removed" in r.getMessage()]
    assert said and said[0].levelno == logging.WARNING


def _requeued_run(tiny_model, run: Path, out: Path, stop_at: int | None = None) -> ShardCallback:
    """One launch of a script a scheduler requeues: the same lines on the first launch and
    after a stop, ShardCallback(resume="auto") and train() from callback.resume_from."""
    torch.manual_seed(0)
    callback = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume="auto")
    stop = [_StopAt(callback, stop_at)] if stop_at is not None else []
    trainer = _user_trainer(tiny_model, out, [callback, *stop])
    trainer.train(resume_from_checkpoint=callback.resume_from(trainer))
    return callback


def test_one_script_starts_and_resumes_its_run_with_resume_auto(tiny_model, whole, tmp_path,
                                                                caplog):
    """A requeued script had no one setting for its first launch and its later ones: resume=True
    refused a new run_dir, resume=False a stopped run, and resume_from's "None: start anew" was
    unreachable (audit 131 F6). resume="auto" starts, then continues, and ends as the
    uninterrupted run."""
    run, out = tmp_path / "run", tmp_path / "trl"
    with caplog.at_level("WARNING", logger="sae_shards.capture.callback"):
        first = _requeued_run(tiny_model, run, out, stop_at=7)
        assert not first.resume and first.summary["interrupted"]
        assert f'resume="auto": starting a new run in {run}' in caplog.text
        # the way on is the same script, not one edited to resume=True (audit 133 F1)
        assert ('to continue, run the script again as it is: its resume="auto" continues the '
                "run") in caplog.text
        again = _requeued_run(tiny_model, run, out)
    assert again.resume and again.summary["rl_steps"] == 10 and not again.summary["interrupted"]
    assert f'resume="auto": continuing the run in {run}' in caplog.text
    _assert_same_ending(whole, run)
    # a finished run is refused as any resume of it is, before it was said to be continued,
    # with the way to replace it that "auto" allows (audit 133 F2)
    caplog.clear()
    with pytest.raises(FileExistsError) as e:
        ShardCallback(run_dir=run, resume="auto")
    assert str(e.value) == (
        f'resume="auto": the run in run_dir={run} finished (10 RL steps, summary.json): there '
        f"is nothing to resume. Analyze it (sae-shards analyze {run}), or give a new run_dir "
        "(to replace it, resume=False and overwrite=True)")
    assert "continuing" not in caplog.text


def test_resume_auto_replaces_only_a_run_with_nothing_to_resume(tmp_path, caplog):
    """A run killed before its first checkpoint is started again (nothing of it can be
    resumed); a copy with step checkpoints but no resume files is refused naming what it lacks,
    never replaced; "auto" beside overwrite, or another word, is refused."""
    early = tmp_path / "early"  # what a run killed before its first checkpoint leaves
    early.mkdir()
    (early / "rollouts.jsonl").write_text('{"step": 1}\n')
    (early / "config.json").write_text('{"capture": {}, "sae": {}}')
    with caplog.at_level(logging.WARNING, logger="sae_shards"):
        callback = ShardCallback(run_dir=early, resume="auto")
    assert not callback.resume and not (early / "rollouts.jsonl").exists()
    assert (f'resume="auto": replacing the run in {early}, which has no complete checkpoint to '
            "resume from") in caplog.text
    assert f"removed the earlier run in {early} to start anew" in caplog.text
    callback.close()
    copy = tmp_path / "copy"
    (copy / "checkpoints" / "step_000005").mkdir(parents=True)
    (copy / "checkpoints" / "step_000005" / "training_state.safetensors").write_bytes(b"x")
    (copy / "rollouts.jsonl").write_text('{"step": 1}\n')
    (copy / "config.json").write_text('{"capture": {}, "sae": {}}')  # (a run writes it first)
    before = tree_bytes(copy)
    with pytest.raises(FileNotFoundError, match="without their resume files") as e:
        ShardCallback(run_dir=copy, resume="auto")
    assert "resume=True" not in str(e.value)  # words the script as it is (audit 133 F1)
    assert "step checkpoints (checkpoints/) without" in str(e.value)  # no trl/ named: none here
    assert tree_bytes(copy, skip=(".lock",)) == before
    # shards-only checkpoints (runner.checkpoint_every between the trainer's saves) hold no
    # training state: a run killed before its first resumable one is started again; it was
    # taken for a copy without resume/ and refused on every requeue (audit 133 F3)
    (copy / "checkpoints" / "step_000005" / "training_state.safetensors").unlink()
    callback = ShardCallback(run_dir=copy, resume="auto")
    assert not callback.resume and not (copy / "checkpoints").exists()
    callback.close()
    with pytest.raises(ValueError, match='resume="auto", overwrite=True'):
        ShardCallback(run_dir=tmp_path / "new", resume="auto", overwrite=True)
    with pytest.raises(ValueError, match="resume='yes' \\(expected True, False or \"auto\"\\)"):
        ShardCallback(run_dir=tmp_path / "new", resume="yes")
    assert not (tmp_path / "new").exists()


def test_a_resume_past_a_shuffled_epoch_says_its_prompts_differ(tiny_model, tmp_path, caplog):
    """A script's shuffled dataset of 4 steps an epoch, stopped at step 6 and resumed: TRL's
    sampler does not checkpoint its shuffle, so the resumed steps see other prompts than the
    uninterrupted run's, which the resume now says (the docs said it, nothing at resume time
    did; audit 131 N4). A resume within a run of one epoch says nothing of it."""
    def run(name, stop_at=None, resume=False):
        torch.manual_seed(0)
        callback = ShardCallback(run_dir=tmp_path / name, runner={"min_samples": 2},
                                 resume=resume)
        stop = [_StopAt(callback, stop_at)] if stop_at is not None else []
        _user_trainer(tiny_model, tmp_path / f"trl_{name}", [callback, *stop], n_prompts=8,
                      save_steps=2).train(resume_from_checkpoint=resume or None)

    def prompts(name):
        rows = map(json.loads, (tmp_path / name / "rollouts.jsonl").read_text().splitlines())
        return {r["step"]: sorted(r["prompts"]) for r in rows}

    run("whole")
    run("cut", stop_at=6)
    with caplog.at_level(logging.WARNING, logger="sae_shards"):
        run("cut", resume=True)
    assert ("resumed at RL step 6, and it resumed in epoch 2 of its dataset: TRL's prompt "
            "sampler does not checkpoint its shuffle, so from here") in caplog.text
    whole, cut = prompts("whole"), prompts("cut")
    assert all(whole[s] == cut[s] for s in range(1, 7))
    assert any(whole[s] != cut[s] for s in range(7, 11))  # what the warning says


def test_a_script_relaunched_with_another_output_dir_is_told_where_its_checkpoints_are(
        tiny_model, tmp_path):
    """A requeued script whose output_dir comes from a job id: the trainer finds none of the
    run's TRL checkpoints. It was told to pass resume_from_checkpoint=True, which cannot work
    there, and the refused attempt recorded the new output_dir in config.json, where analysis
    then looked for the policies (audit 133 F7). Now refused naming both, changing nothing."""
    run = tmp_path / "cut"
    _seeded_run(tiny_model, tmp_path, "cut", stop_at=7)
    before = tree_bytes(run, skip=(".lock",))
    again = ShardCallback(run_dir=run, runner={"min_samples": 2}, resume="auto")
    trainer = _user_trainer(tiny_model, tmp_path / "job_42", [again])
    with pytest.raises(CheckpointError) as e:
        trainer.train(resume_from_checkpoint=again.resume_from(trainer))
    assert str(e.value) == (
        f"{run}: the trainer's output_dir {tmp_path / 'job_42'} holds none of this run's TRL "
        f"checkpoints, which are in {tmp_path / 'trl_cut'} (config.json's rl.output_dir): give "
        f"the trainer output_dir='{tmp_path / 'trl_cut'}', or move them to "
        f"{tmp_path / 'job_42'}; nothing was changed")
    again.close()
    assert tree_bytes(run, skip=(".lock",)) == before


@pytest.mark.parametrize("at", [7, 2])  # after checkpoint-5; before any checkpoint
def test_a_second_sigterm_in_a_script_ends_it_as_sigterm_does_and_says_how_to_resume(
        tiny_model, tmp_path, at):
    """Audit 138 F8: a second SIGTERM raised SecondSignal (a KeyboardInterrupt subclass) out of
    trainer.train(): a traceback and exit status 1, where docs/usage.md promises 128 + the
    signal, and no word on how to go on. It now says how to go on, then ends the process as
    SIGTERM does (143); doing what it says finishes the run, from the newest complete
    checkpoint or, before the first one, from the start (audit 140: resume=True was advised,
    which a run without a checkpoint refuses)."""
    import signal

    script = tmp_path / "train.py"
    script.write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from transformers import TrainerCallback
from sae_shards import ShardCallback
from test_callback import _user_trainer

class Twice(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == {at}:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

first = sys.argv[1] == "start"
cb = ShardCallback(run_dir={str(tmp_path / 'run')!r}, runner={{"min_samples": 2}}, resume="auto")
trainer = _user_trainer({str(tiny_model)!r}, {str(tmp_path / 'trl')!r},
                        [cb] + ([Twice()] if first else []))
trainer.train(resume_from_checkpoint=cb.resume_from(trainer))
print("rl_steps", cb.summary["rl_steps"], "interrupted", cb.summary["interrupted"])
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, str(script), "start"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == -signal.SIGTERM, first.stderr[-3000:]  # as SIGTERM ends it
    assert "Traceback" not in first.stderr and "SecondSignal" not in first.stderr
    assert ("SIGTERM again: stopping at once, as the signal does without sae-shards" in
            first.stderr)
    assert ('ShardCallback(..., resume="auto") and trainer.train(resume_from_checkpoint='
            'callback.resume_from(trainer))') in first.stderr
    again = subprocess.run([sys.executable, str(script), "again"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rl_steps 10 interrupted False" in again.stdout


def test_a_run_stopped_before_its_sae_started_is_told_to_resume(tiny_model, tmp_path):
    """Audit 138 F9: a run stopped by SIGTERM at step 3 of 10, before runner.min_samples were
    buffered, was told to "run more RL steps or lower them"; it has the steps, and its resume
    trains the SAE."""
    stopped = ShardCallback(run_dir=tmp_path / "stopped", runner={"min_samples": 8})
    _user_trainer(tiny_model, tmp_path / "trl", [stopped, _StopAt(stopped, 3)]).train()
    assert stopped.summary["interrupted"] and stopped.summary["sae_steps"] == 0
    assert stopped.summary["warning"].startswith("the SAE never trained: 3 samples were captured")
    assert "the run was stopped before that: resume it to train the SAE" in \
        stopped.summary["warning"]
    assert "run more RL steps" not in stopped.summary["warning"]


def test_a_resume_inside_the_first_epoch_is_exact_and_not_warned_about(tiny_model, tmp_path,
                                                                       caplog):
    """Audit 138 F1: a resume inside the first epoch of a run that goes on to a second was
    warned to draw the second epoch "in the first epoch's order, not the uninterrupted run's";
    it is exact (TRL's sampler, built anew with its seed, draws the first epoch's order again
    for the skipped batches, then the second epoch's as the uninterrupted run did). A resume
    inside the second epoch is not exact, and is warned about. 16 prompts, 2 per step: 8 steps
    an epoch, 12 steps."""
    import logging

    def run(name: str, stop: int | None) -> None:
        cb = ShardCallback(run_dir=tmp_path / name, runner={"min_samples": 2})
        extra = [_StopAt(cb, stop)] if stop else []
        _user_trainer(tiny_model, tmp_path / f"trl_{name}", [cb, *extra], max_steps=12,
                      n_prompts=16, save_steps=4).train()
        if stop:
            again = ShardCallback(run_dir=tmp_path / name, runner={"min_samples": 2},
                                  resume=True)
            with caplog.at_level(logging.WARNING, logger="sae_shards"):
                _user_trainer(tiny_model, tmp_path / f"trl_{name}", [again], max_steps=12,
                              n_prompts=16, save_steps=4).train(resume_from_checkpoint=True)

    def prompts(name: str) -> list:
        return [json.loads(line)["prompts"]
                for line in (tmp_path / name / "rollouts.jsonl").read_text().splitlines()]

    run("whole", None)
    run("first", 3)  # resumed in epoch 1
    assert "TRL's prompt sampler does not checkpoint" not in caplog.text
    _assert_same_ending(tmp_path / "whole", tmp_path / "first")
    caplog.clear()
    run("second", 10)  # resumed in epoch 2
    assert "and it resumed in epoch 2 of its dataset: TRL's prompt sampler" in caplog.text
    assert prompts("second")[:10] == prompts("whole")[:10]
    assert prompts("second")[10:] != prompts("whole")[10:]  # the warning is true


def test_a_resume_compares_a_trainer_mapping_whole_and_one_adamw_under_both_kernels():
    """Audit 140: lr_scheduler_kwargs added on resume was a key on one side only of the
    flattened configs, and went unchecked; transformers' default optim is adamw_torch_fused on
    torch >= 2.8 and adamw_torch below, one algorithm a resume under another torch must not be
    refused for."""
    from trl import GRPOConfig

    from sae_shards.capture.trainer_settings import step_settings
    from sae_shards.run.rundir import config_differences

    def rl(**fields):
        return {"rl": {"lr_scheduler_kwargs": {}, "generation_kwargs": None, **fields}}

    assert config_differences(rl(), rl(lr_scheduler_kwargs={"num_cycles": 3.0})) == [
        "rl.lr_scheduler_kwargs: {} in the run, {'num_cycles': 3.0} now"]
    assert config_differences(rl(generation_kwargs={"top_k": 5}),
                              rl(generation_kwargs={"top_k": 5, "min_p": 0.1})) != []
    assert config_differences(rl(lr_scheduler_kwargs={"a": 1}), rl(lr_scheduler_kwargs={"a": 1})) == []
    fused, plain = (step_settings(GRPOConfig(output_dir="/tmp/x", use_cpu=True, optim=o))
                    for o in ("adamw_torch_fused", "adamw_torch"))
    assert fused["optim"] == plain["optim"] == "adamw_torch"
    sgd = step_settings(GRPOConfig(output_dir="/tmp/x", use_cpu=True, optim="sgd"))
    assert sgd["optim"] == "sgd"  # another optimizer is another setting


def test_tied_rewards_are_warned_about_once_and_a_collapse_is_among_the_causes(caplog):
    """Five logged steps in a row whose every prompt group tied warn once, naming the steps;
    when rewards had differed before (audit 143 F10: rl.learning_rate=100 destroyed the policy
    and the warning blamed the reward alone) a collapsed policy is named among the causes."""
    from sae_shards.capture.trainer_settings import TiedRewardsWatch

    def warnings_after(fracs: list[float | None]) -> list[str]:
        caplog.clear()
        watch = TiedRewardsWatch()
        with caplog.at_level(logging.WARNING, logger="sae_shards"):
            for step, frac in enumerate(fracs, 1):
                watch.observe(frac, step)
        return [r.getMessage() for r in caplog.records if "rewards tied" in r.getMessage()]

    assert warnings_after([1.0] * 4 + [0.5] + [1.0] * 4) == []  # never 5 in a row
    never = warnings_after([1.0] * 8)
    assert len(never) == 1 and "(steps 1-5," in never[0] and "collapsed" not in never[0]
    after = warnings_after([0.2, 0.5, None] + [1.0] * 6)
    assert len(after) == 1 and "(steps 4-8," in after[0]
    assert "a policy that collapsed, every completion alike: a learning rate too high" in after[0]
