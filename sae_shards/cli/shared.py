"""What the commands share: mostly the analysis ones (``analyze``, ``evaluate``, ``compare``):
argument types (``positive``, ``non_negative``, ``--shards``), ``--task`` and
``--trust-remote-code``, the checkpoint a command reads said up front, an unwritable output
refused before the work; and, with ``train``, third-party output nobody can act on kept quiet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def refused_unwritable(command: str, run_dir: Path, folders: list[Path], what: str,
                        out: Path | None, elsewhere: str) -> bool:
    """Refuse ``analyze`` / ``evaluate`` (print why, return True) when one of ``folders``, where
    its files go, cannot be written: said before the work runs, not after it when they are
    written; ``elsewhere`` is the way out without ``--out``."""
    from sae_shards.run import rundir

    why = next((w for w in map(rundir.unwritable, folders) if w), None)
    if why:
        print(f"sae-shards: cannot {command} {run_dir}: {what}: {why}; "
              + (elsewhere if out is None else "give --out a directory you can write"),
              file=sys.stderr)
    return why is not None


def quiet_third_party() -> None:
    """Drop output a ``sae-shards train`` / ``analyze`` / ``evaluate`` user can do nothing about:
    TRL reads transformers' deprecated ``is_gradient_checkpointing`` at every generation (a
    FutureWarning, shown again after each checkpoint save), and transformers draws a progress
    bar for every model it loads or saves ("Loading weights", "Writing model shards": six a
    default run, between the log lines). A user's own script (``ShardCallback``) keeps its
    settings."""
    import warnings

    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)
    transformers_logging.disable_progress_bar()


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def shards_arg(text: str) -> int | list[int]:
    """``--shards``: how many to detail (``4``), or which (``13,30``)."""
    if "," not in text:
        return non_negative(text)
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a count (4) or shard indices separated by commas (13,30)") from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def warn_if_live(run_dir: Path, out_dir: Path | None = None) -> None:
    """Say when another process is writing the run now: its checkpoints rotate under the
    analysis (TRL keeps its two newest, sae-shards its two newest resume files), so the policy
    of the checkpoint read can be gone by the time the report needs it; and a report written
    into the run directory (``out_dir``, the folder the report goes to) is removed when the
    run ends (``rundir.remove_derived``)."""
    from sae_shards.run.rundir import live_writer

    writer = live_writer(run_dir) if run_dir.is_dir() else None
    if writer:
        inside = out_dir is None or out_dir.resolve() == run_dir.resolve()
        print(f"sae-shards: note: {run_dir} is still being written ({writer}): its older "
              "checkpoints are removed as it trains, and one this analysis reads may go before "
              "it is done (the report then leaves out what needed it, e.g. the logit lens and "
              "dose-response); for a stable report analyze it once it has finished or stopped"
              + ("; the run removes this report when it ends (it describes an earlier state): "
                 "--out DIR/report.html elsewhere keeps it" if inside else ""), file=sys.stderr)


def add_trust_remote_code(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``--trust-remote-code`` opt-in (off by default: a run's own files never turn it on)."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help=f"for {what}, load a policy that needs Python code of its own "
                             "(config.json's auto_map) by running the .py files in its model "
                             "directories (the run's final_model/, the initial model's): they "
                             "run with your permissions, so only for code you have read and "
                             "trust. Without it such a policy is never loaded and its code "
                             "never runs")


def add_initial_model(parser: argparse.ArgumentParser) -> None:
    """``--initial-model DIR``: the run's initial weights, when they moved from the
    ``model.path`` its ``config.json`` records (``named_initial_refusal`` checks them)."""
    parser.add_argument("--initial-model", type=Path, default=None, metavar="DIR",
                        help="the run's initial model directory, when it moved from the "
                             "model.path its config.json records (checked against the run's "
                             "record of its weights)")


def initial_model_refusal(run_dir: Path, initial: Path | None) -> str | None:
    """Why ``--initial-model`` cannot be the run's initial model (None when it can, or was not
    given): asked before any work, as ``analysis.shards.named_initial_refusal``."""
    if initial is None:
        return None
    from sae_shards.analysis.shards import named_initial_refusal

    return named_initial_refusal(run_dir, initial)


TASK_HELP = ("your run's prompts and reward functions, for {what} of a run of your own TRL "
             "script: a RewardTask, or a function returning one (docs/analysis.md)")


def task_arg(spec: str | None, skipped: bool, flag: str, what: str) -> Any:
    """The ``--task FILE.py:NAME`` argument loaded (None without one); ``ValueError`` when the
    scoring it is for is skipped by ``flag`` or the script cannot give it."""
    if spec is None:
        return None
    from sae_shards.analysis.reward_task import load_task_spec

    if skipped:
        raise ValueError(f"--task scores {what}, which {flag} skips; drop one of them")
    return load_task_spec(spec)


def own_reward_unknown(run_dir: Path) -> bool:
    """Whether the run was scored by a user's own reward (``ShardCallback``: ``task`` null)."""
    from sae_shards.run import rundir

    config = rundir.read_config(run_dir)
    return bool(config) and not rundir.section(config, "task").get("name")


CHECKPOINT_HELP = ("checkpoint to read: final, step_XXXXXX, or its RL step (100 for "
                   "step_000100) (default: final, or the newest step of an interrupted or "
                   "killed run)")


EVALUATE_CHECKPOINT_HELP = ("checkpoint whose SAE to score: final, step_XXXXXX, or its RL step "
                            "(100 for step_000100) (default: final, or a stopped run's newest; "
                            "the samples it scores are written as the run ends or is stopped: a "
                            "killed run has none until it is resumed to its end)")


def announce_checkpoint(run_dir: Path, checkpoint: str | None) -> str:
    """The checkpoint to read, said on stderr when it is not the final one."""
    from sae_shards.run import rundir

    from sae_shards.analysis.recovered import resume_file_of
    from sae_shards.analysis.shards import checkpoint_name

    name = checkpoint_name(run_dir, checkpoint)
    if name != "final" and (run_dir / rundir.CHECKPOINTS / name).is_dir():  # else refused next
        stopped = rundir.read_summary(run_dir).get("interrupted")
        lacks = [part for part in (f"{rundir.CHECKPOINTS}/final", rundir.ACTIVATIONS)
                 if not (run_dir / part).exists()]  # a finished run's copy left them out
        resumable = resume_file_of(run_dir, name)
        newest = ("its newest checkpoint with a resume file"
                  if resumable is not None and resumable.is_file() else "its newest checkpoint")
        why = ("" if checkpoint else " (the run was stopped before its end: its newest checkpoint)"
               if stopped else f" (the run finished, but this copy of it lacks {' and '.join(lacks)}"
               f": {newest})"
               if rundir.finished_steps(run_dir) is not None else
               " (the run was killed, or is still running: the step a resume continues from, "
               "its newest with a resume file and TRL's finished checkpoint)")
        print(f"sae-shards: reading checkpoint {name} of {run_dir}{why}", file=sys.stderr)
    return name


