"""A run directory moved to another path, copied in part, or shared: what it recorded as
absolute paths is either still the run's own or not used, never another run's files."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import own_code_cache, plant_own_code
from safetensors.torch import load_file

from sae_shards import CheckpointError
from sae_shards.analysis.shards import load_run_models, policy_dir, run_models_missing
from sae_shards.run import rundir


def _copy(run: Path, to: Path) -> Path:
    """``run`` copied as a colleague gets it: without the big parts analysis does not need."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(rundir.RESUME, rundir.TRL_OUTPUT,
                                                           rundir.WANDB))
    return to


class _Planted:
    """What a shared run's pickle would run when unpickled (it must never be)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _script_run(run: Path, output_dir: Path, grad_norms: list[float]) -> None:
    """A user script's run as analysis reads it: ``config.json`` naming the trainer's
    ``output_dir`` (outside the run, as ``docs/examples/trl_script.py`` has it), TRL's logs in
    ``metrics.jsonl``, a checkpoint of step 2 in sae-shards' ``checkpoints/``."""
    (run / rundir.CHECKPOINTS / rundir.step_name(2)).mkdir(parents=True)
    rundir.write_json(run / rundir.CONFIG, {"model": {"path": None, "lora": {"enabled": False}},
                                            "task": None, "rl": {"output_dir": str(output_dir)}})
    (run / rundir.METRICS).write_text("".join(
        json.dumps({"kind": "rl", "rl_step": i + 1, "grad_norm": g, "step_time": 0.1 * i}) + "\n"
        for i, g in enumerate(grad_norms)))


def _trl_checkpoint(output_dir: Path, step: int, grad_norms: list[float]) -> Path:
    """TRL's ``checkpoint-{step}``: a policy's ``config.json`` and its log history."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": [
        {"step": i + 1, "grad_norm": g, "step_time": 9.0} for i, g in enumerate(grad_norms)]}))
    return folder


def test_a_moved_script_run_is_not_paired_with_another_runs_trl_checkpoint(tmp_path):
    out = tmp_path / "mine-trl"
    run = tmp_path / "moved"  # was tmp_path / "mine"; its trainer's output_dir stayed behind
    _script_run(run, out, [1.5, 0.75])
    ours = _trl_checkpoint(out, 2, [1.5, 0.75])  # step_time differs: a timing, not compared
    assert policy_dir(run, "step_000002") == ours

    # another run started where the moved one was and wrote its own checkpoint-2 there
    theirs = tmp_path / "other-trl"
    ours.rename(theirs)
    _trl_checkpoint(out, 2, [1.5, 0.5])
    assert policy_dir(run, "step_000002") == run / rundir.FINAL_MODEL
    why = run_models_missing(run, "step_000002", initial=tmp_path)  # no initial model: first
    assert why is not None and "no initial model" in why
    (tmp_path / "config.json").write_text("{}")  # past the initial model's checks, it names it
    (tmp_path / "tokenizer.json").write_text("{}")
    why = run_models_missing(run, "step_000002", initial=tmp_path)
    assert f"{out / 'checkpoint-2'} is another run's: its trainer_state.json logged " \
        "grad_norm=0.5 at step 2, this run's metrics.jsonl 0.75" in why

    # a copy without metrics.jsonl cannot tell: the checkpoint outside it is not used either
    (out / "checkpoint-2").rename(tmp_path / "stale")
    theirs.rename(out / "checkpoint-2")
    (run / rundir.METRICS).unlink()
    assert policy_dir(run, "step_000002") == run / rundir.FINAL_MODEL


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_truncated_policy_file_is_named_not_raised_from_inside_transformers(short_run_dir,
                                                                              tmp_path, name):
    """An interrupted copy of the run: a file of its final policy cut short."""
    run = _copy(short_run_dir, tmp_path / "copy")
    cut = run / rundir.FINAL_MODEL / name
    with cut.open("r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=f"{cut}: cannot be read as {cut.suffix[1:]} .*"
                                              "truncated or damaged .*copy it again"):
        load_run_models(run)


def test_a_policy_file_too_large_to_map_is_named_not_raised_from_inside_safetensors(
        short_run_dir, tmp_path):
    """A final policy whose safetensors header declares a 4 TB tensor (a sparse file: the size
    check passes): safetensors' failed memory map is a CheckpointError naming the file, not its
    bare RuntimeError."""
    from helpers import sparse_safetensors
    from safetensors import safe_open

    run = _copy(short_run_dir, tmp_path / "copy")
    huge = sparse_safetensors(run / rundir.FINAL_MODEL / "model.safetensors",
                              {"lm_head.weight": [10**6, 10**6]})
    try:
        with safe_open(huge, framework="pt", device="cpu"):
            pytest.skip("this machine maps a 4 TB file (overcommit): nothing to refuse")
    except RuntimeError:
        pass
    with pytest.raises(CheckpointError, match=f"{huge}: cannot be mapped into memory .*unable "
                                              r"to mmap.*copy it again from the run"):
        load_run_models(run)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "config.json"])
def test_a_policy_json_file_that_is_not_an_object_is_named(short_run_dir, tmp_path, name):
    """A policy's JSON file that parses but is not an object (a list: edited, or another
    tool's): named, instead of an AttributeError from inside load_tokenizer or transformers."""
    run = _copy(short_run_dir, tmp_path / "copy")
    bad = run / rundir.FINAL_MODEL / name
    bad.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=f"{bad}: cannot be read as json \\(not a JSON "
                                              "object\\).*copy it again"):
        load_run_models(run)


def test_a_policy_needing_its_own_code_is_never_run_even_when_the_user_says_yes(
        short_run_dir, tmp_path, monkeypatch):
    """A shared run whose final_model/config.json names Python code of its own (auto_map, a
    model_type transformers lacks) beside it: transformers would ask on stdin whether to run it,
    and run it on "y"; sae-shards never asks, never runs it, and says why, naming the file and
    the flag that opts in. The run's config.json saying to trust it changes nothing."""
    run = _copy(short_run_dir, tmp_path / "copy")
    marker = tmp_path / "ran"
    code = plant_own_code(run / rundir.FINAL_MODEL, marker)
    config = json.loads((run / rundir.CONFIG).read_text())
    config["model"]["trust_remote_code"] = True  # as a run trained with the opt-in records it
    config["trust_remote_code"] = True
    (run / rundir.CONFIG).write_text(json.dumps(config))
    own_code_cache(monkeypatch, tmp_path / "modules")
    monkeypatch.setattr("builtins.input", lambda *args: "y")  # the user answering the prompt
    why = run_models_missing(run)
    assert why is not None and "needs Python code of its own to load" in why, why
    assert f"auto_map names {code}, which sae-shards never runs unless you opt in" in why, why
    assert "opt in with --trust-remote-code (sae-shards analyze / evaluate), " \
        "trust_remote_code=True (Python)" in why, why
    assert load_run_models(run) is None
    assert not marker.exists()


def test_a_policy_needing_its_own_code_loads_when_the_user_opts_in(short_run_dir, tmp_path,
                                                                   monkeypatch):
    """trust_remote_code=True: the policy's own code runs (the marker its import writes) and
    builds the policy, whose weights are the run's."""
    run = _copy(short_run_dir, tmp_path / "copy")
    marker = tmp_path / "ran"
    plant_own_code(run / rundir.FINAL_MODEL, marker)
    own_code_cache(monkeypatch, tmp_path / "modules")
    assert run_models_missing(run, trust_remote_code=True) is None
    assert marker.exists()
    marker.unlink()
    models = load_run_models(run, trust_remote_code=True)
    assert type(models.final).__name__ == "PlantedForCausalLM"
    assert type(models.initial).__name__ == "Qwen2ForCausalLM"  # model/: no code of its own
    saved = load_file(run / rundir.FINAL_MODEL / "model.safetensors")
    for name, param in models.final.named_parameters():
        assert torch.equal(param, saved[name]), name


def test_a_model_folder_linked_outside_a_shared_run_is_never_unpickled(short_run_dir, tmp_path):
    """A shared run whose ``model/`` is a symlink to a folder of pickles next to it: the folder
    is the run's, read from safetensors only, whatever the link resolves to."""
    run = _copy(short_run_dir, tmp_path / "shared" / "run")
    elsewhere = tmp_path / "shared" / "weights"
    shutil.copytree(run / rundir.MODEL, elsewhere, ignore=shutil.ignore_patterns("*.safetensors"))
    with (elsewhere / "pytorch_model.bin").open("wb") as f:
        pickle.dump({"w": _Planted(tmp_path / "ran")}, f)
    shutil.rmtree(run / rundir.MODEL)
    (run / rundir.MODEL).symlink_to(elsewhere)
    assert "no safetensors weights in" in run_models_missing(run)
    assert load_run_models(run) is None
    assert not (tmp_path / "ran").exists()


def test_a_copy_without_the_runs_own_model_folders_says_to_copy_them(short_run_dir, tmp_path):
    """``model/`` of a ``sae-shards train`` run is the run's own (the tiny model it built): a
    copy without it is told to copy it, not to look for a moved model directory."""
    run = _copy(short_run_dir, tmp_path / "copy")
    shutil.rmtree(run / rundir.FINAL_MODEL)
    assert f"or a copy of the run without its {rundir.FINAL_MODEL}/ folder)" in \
        run_models_missing(run)
    shutil.rmtree(run / rundir.MODEL)
    assert run_models_missing(run) == (
        f"no initial model at {run / rundir.MODEL}: sae-shards train built the run's tiny model "
        "there before its first step, so this copy of the run lacks its model/ folder; copy it "
        "from the run")
    from sae_shards.analysis.report import analyze

    out = analyze(run, tmp_path / "report.html", n_shards=1)  # analysis.json says why, too
    assert json.loads(out.with_name("analysis.json").read_text())["models_skipped"] == \
        run_models_missing(run)


def test_a_copy_without_its_summary_recomputes_the_runs_figures(short_run_dir, tmp_path):
    """The run's figures of a copy without ``summary.json``: recomputed from the checkpoint and
    the logs, as for a killed run, the same as the summary's (they were all null)."""
    from sae_shards import RunView
    from sae_shards.analysis.report import checkpoint_figures

    summary = json.loads((short_run_dir / rundir.SUMMARY).read_text())
    run = _copy(short_run_dir, tmp_path / "copy")
    (run / rundir.SUMMARY).unlink()
    figures, own = checkpoint_figures(RunView(run), {})
    assert not own
    for key in ("rl_steps", "sae_steps", "reward_first", "reward_last", "fvu_first", "fvu_last",
                "dead_frac", "never_fired_frac"):
        assert figures[key] == pytest.approx(summary[key]), key


def test_the_report_names_the_model_folder_of_a_moved_run_where_it_is_now(short_run_dir,
                                                                           tmp_path):
    """The report's model row read the checkpoint's model_id: the tiny model's folder at the
    place the run was written, which a moved run no longer has (or another run now has)."""
    from sae_shards import RunView
    from sae_shards.analysis.report import model_shown

    run = _copy(short_run_dir, tmp_path / "moved")
    meta = RunView(run).shards.meta
    assert meta["model_id"] == str(short_run_dir / rundir.MODEL)  # as written
    assert model_shown(meta, run) == str(run / rundir.MODEL)
    assert model_shown({**meta, "model_id": "Qwen/Qwen2-0.5B"}, run) == "Qwen/Qwen2-0.5B"


def _pickled_model(short_run_dir: Path, folder: Path, marker: Path) -> Path:
    """The run's model config and tokenizer beside a ``pytorch_model.bin`` that would touch
    ``marker`` if unpickled."""
    shutil.copytree(short_run_dir / rundir.MODEL, folder,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    with (folder / "pytorch_model.bin").open("wb") as f:
        pickle.dump({"w": _Planted(marker)}, f)
    return folder


def test_a_shared_runs_model_path_to_pickles_is_read_only_when_named(short_run_dir, tmp_path):
    """``config.json`` is the sharer's: a ``model.path`` naming a folder of pickles outside the
    run is not unpickled unless the reader names that folder (``--initial-model``)."""
    run = _copy(short_run_dir, tmp_path / "shared")
    pickles = _pickled_model(short_run_dir, tmp_path / "pickles", tmp_path / "ran")
    config = json.loads((run / rundir.CONFIG).read_text())
    config["model"]["path"] = str(pickles)
    (run / rundir.CONFIG).write_text(json.dumps(config))
    assert re.search(rf"no safetensors weights in {pickles}: .*never loaded.*name the "
                     rf"directory: --initial-model {pickles}", run_models_missing(run) or "")
    assert load_run_models(run) is None
    assert not (tmp_path / "ran").exists()


def test_a_task_this_version_cannot_rebuild_is_named_in_the_runs_terms(short_run_dir, tmp_path):
    """A run made by another sae-shards version (a task or option this one lacks)."""
    run = _copy(short_run_dir, tmp_path / "newer")
    config = json.loads((run / rundir.CONFIG).read_text())
    config["task"]["name"] = "letters_v2"
    (run / rundir.CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{run / rundir.CONFIG}: its task cannot be "
                                              r"rebuilt \(task.name='letters_v2' is unknown"):
        load_run_models(run)


def test_a_finished_runs_copy_without_its_end_says_what_to_copy(short_run_dir, tmp_path, capsys):
    """A finished run copied without ``checkpoints/final/`` or ``activations.safetensors`` (and
    without ``resume/``, which could stand in): not called killed, the missing part named."""
    from sae_shards import RunView
    from sae_shards.cli import main as cli_main

    run = _copy(short_run_dir, tmp_path / "copy")
    shutil.rmtree(run / rundir.CHECKPOINTS / "final")
    with pytest.raises(CheckpointError, match=r"is the encoding of checkpoint final, which this "
                                              r"copy of the run lacks \(copy checkpoints/final/ "):
        RunView(run)
    assert cli_main(["analyze", str(run), "--no-dose"]) == 2
    assert (f"reading checkpoint step_000012 of {run} (the run finished, but this copy of it "
            "lacks checkpoints/final: its newest") in capsys.readouterr().err
    (run / rundir.ACTIVATIONS).unlink()
    with pytest.raises(CheckpointError, match=r"activations.safetensors is missing, though the "
                                              r"run finished \(a copy of the run without it"):
        RunView(run)


def test_the_report_of_a_finished_runs_copy_without_activations_does_not_call_it_killed(
        short_run_dir, tmp_path):
    """A finished run copied with ``resume/`` but without ``activations.safetensors`` is read
    as of its newest step, re-encoded; the report's checkpoint row said the run was killed."""
    from sae_shards.analysis.report import analyze

    run = tmp_path / "copy"
    shutil.copytree(short_run_dir, run, ignore=shutil.ignore_patterns(
        rundir.ACTIVATIONS, rundir.TRL_OUTPUT, rundir.WANDB, "report.html", "analysis.json"))
    page = Path(analyze(run, dose=False)).read_text()
    assert "this copy of the finished run lacks activations.safetensors" in page
    assert "the run was killed" not in page


def test_a_trl_checkpoint_of_zero3_partitions_is_never_offered_and_is_named(short_run_dir,
                                                                            tmp_path):
    """A ZeRO-3 run's TRL checkpoint holds config.json and DeepSpeed's partitions
    (global_stepN/), no whole weights. Analysis pointed a run without final_model/ at it
    ("analyse it with --checkpoint step_N"), then called its weights a pickle; it now offers
    only a checkpoint it can load, and names the partitions and zero_to_fp32.py."""
    run = tmp_path / "copy"
    shutil.copytree(short_run_dir, run, ignore=shutil.ignore_patterns(rundir.WANDB))
    shutil.rmtree(run / rundir.FINAL_MODEL)
    step = rundir.saved_steps(run / "checkpoints")[-1]
    trl = run / "trl" / f"checkpoint-{step}"
    assert (trl / "model.safetensors").is_file()
    why = run_models_missing(run)
    assert f"analyse it with --checkpoint {rundir.step_name(step)}" in why, why  # loadable
    (trl / "model.safetensors").unlink()
    (trl / f"global_step{step}").mkdir()
    (trl / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    why = run_models_missing(run)
    assert "analyse it with --checkpoint" not in why, why
    why = run_models_missing(run, rundir.step_name(step))
    assert f"it holds DeepSpeed ZeRO-3 partitions (global_step{step}/)" in why, why
    assert "zero_to_fp32.py" in why and "pickle" not in why, why
