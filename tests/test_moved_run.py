"""A run directory moved to another path, copied in part, or shared: what it recorded as
absolute paths is either still the run's own or not used, never another run's files."""

from __future__ import annotations

import json
from pathlib import Path

from sae_shards.analysis.shards import policy_dir, run_models_missing
from sae_shards.run import rundir


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
