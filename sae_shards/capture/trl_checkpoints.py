"""How a script's TRL checkpoints and sae-shards' own line up (``ShardCallback``).

A script's run resumes from a TRL checkpoint (``checkpoint-N`` in the trainer's ``output_dir``)
paired with sae-shards' resumable checkpoint of the same step (``capture/resume.py``). These
helpers find TRL's checkpoints, say whether the run writes resumable ones at all, warn when a
script's trainer settings leave a killed run nothing to resume from, and word the run
directory's refusals in ``ShardCallback``'s arguments.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Collection

from sae_shards.run.rundir import trl_checkpoint_steps

log = logging.getLogger(__name__)


def warn_earlier_trl_checkpoints(output_dir: str | None) -> None:
    """A new run (not resumed) whose trainer's ``output_dir`` already holds TRL checkpoints: they
    are an earlier run's (``overwrite=True`` clears the run directory, not the trainer's), and a
    later ``resume_from_checkpoint=True`` would pick the newest of them, mixed with this run's."""
    steps = trl_checkpoint_steps(output_dir)
    if steps:
        log.warning("the trainer's output_dir %s already holds TRL checkpoints of an earlier run "
                    "(steps %s): this run saves its own beside them, and resuming it later "
                    "with resume_from_checkpoint=True would start from the newest, whichever "
                    "run wrote it. Clear the directory or give the trainer a new output_dir",
                    output_dir, ", ".join(map(str, steps)))


def warn_later_trl_checkpoints(output_dir: str | None, step: int,
                               other_runs: Collection[int] = ()) -> None:
    """A run resumed from TRL's checkpoint of ``step`` while ``output_dir`` holds later ones:
    the next ``resume_from_checkpoint=True`` would pick the newest of them. Each is this run's,
    of the steps it now trains again (sae-shards removed its own side of them), or, for the
    steps in ``other_runs``, another run's (``resume.other_runs_trl_checkpoints``)."""
    later = [s for s in trl_checkpoint_steps(output_dir) if s > step]
    own = [s for s in later if s not in other_runs]
    other = [s for s in later if s in other_runs]
    if not later:
        return
    names = lambda steps: ", ".join(f"checkpoint-{s}" for s in steps)  # noqa: E731
    said = ([f"this run's TRL checkpoints of the later steps it now trains again ({names(own)}; "
             "sae-shards' side of them is removed)"] if own else []) + (
        [f"TRL checkpoints of later steps that another run wrote ({names(other)}: their logs "
         "up to that step are not this run's; an output_dir two runs share), which this run's "
         "saves of the same steps replace"] if other else [])
    log.warning("resumed from RL step %d, but the trainer's output_dir %s also holds %s; a "
                "later resume_from_checkpoint=True would pick the newest and be refused: delete "
                "them%s", step, output_dir, ", and ".join(said),
                " (and give each run an output_dir of its own)" if other else "")


def warn_reshuffled_epochs(args: Any, state: Any, level: int = logging.WARNING) -> None:
    """A resume inside the second or a later epoch of a shuffled dataset: TRL's prompt sampler
    does not checkpoint its shuffle, and, built anew with its seed, draws the first epoch's order
    again, so from the resume on the prompts are not the uninterrupted run's. A resume inside
    the first epoch is exact (the skipped batches draw the first epoch's order, the next epoch
    the one the uninterrupted run drew: measured, ``tests/test_callback.py``). Said at
    ``level`` (a script's run: WARNING, which Python shows)."""
    if not getattr(args, "shuffle_dataset", False) or state.global_step >= state.max_steps:
        return
    epoch = float(getattr(state, "epoch", None) or 0.0)
    if epoch < 1:
        return
    log.log(level, "resumed at RL step %d, and it resumed in epoch %d of its dataset: TRL's "
            "prompt sampler does not checkpoint its shuffle, so from here the prompts come in "
            "the first epoch's order, not the uninterrupted run's, and the steps need not match "
            "it (shuffle_dataset=False, or a dataset longer than the run, keeps a resume "
            "exact)", state.global_step, int(epoch) + 1)


def resumed_checkpoint(args: Any, step: int) -> Path | None:
    """The TRL checkpoint the running ``trainer.train()`` resumed from (at RL step ``step``):
    the path it was given, read from transformers' training loop on the call stack (a script
    may pass any checkpoint by path), else ``checkpoint-<step>`` in the trainer's
    ``output_dir``; None when neither is a directory."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop":
            given = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(given, (str, os.PathLike)) and Path(given).is_dir():
                return Path(given)
            break
        frame = frame.f_back
    named = Path(args.output_dir) / f"checkpoint-{step}" if args.output_dir else None
    return named if named is not None and named.is_dir() else None


def rng_state_name(args: Any) -> str:
    """The file of a TRL checkpoint that holds this process's random state (transformers')."""
    index, n_processes = getattr(args, "process_index", 0), getattr(args, "world_size", 1)
    return f"rng_state_{index}.pth" if n_processes > 1 else "rng_state.pth"


def missing_rng_state(checkpoint: Path | None, args: Any) -> str | None:
    """The warning for a TRL checkpoint that lacks this process's random state (a copy made
    without it, or from another node): transformers then resumes without it, saying so only
    at INFO, and the run goes on from other draws than the uninterrupted run's. None when the
    file is there, or when the trainer saves none (``save_only_model``, warned about apart)."""
    if checkpoint is None or getattr(args, "save_only_model", False):
        return None
    name = rng_state_name(args)
    if (checkpoint / name).is_file():
        return None
    return (f"{checkpoint} holds no {name}, the random state of process "
            f"{getattr(args, 'process_index', 0)}: transformers "
            "resumes without it, so that process's generations from here on, and the shards, "
            "are not the uninterrupted run's; to resume exactly, copy the file from the run's "
            "own checkpoint (each process saves its own, on its node's disk)")


def trl_dir(args: Any) -> Path | None:
    """The trainer's ``output_dir``, where TRL writes its checkpoints."""
    return Path(args.output_dir) if args.output_dir else None


def writes_checkpoints(runner_cfg: Any, trainer: Any | None) -> bool:
    """Whether the run writes resumable step checkpoints, which copy the ring buffer to host
    memory: when the trainer saves (any ``save_strategy`` but ``"no"``). Without a trainer,
    ``runner.checkpoint_every`` decides (``sae-shards train`` gives TRL the same steps). The
    shards-only checkpoints between TRL's copy no buffer."""
    args = getattr(trainer, "args", None)
    if args is None:
        return bool(runner_cfg.checkpoint_every)
    return getattr(args, "save_strategy", None) != "no"


def warn_no_trl_checkpoints(args: Any, checkpoint_every: int = 0,
                             epochs: int | None = None) -> None:
    """A script's trainer that saves no checkpoint before its last step (``save_strategy="no"``,
    ``save_steps`` >= ``max_steps``, as TRL's default 500 on a shorter run, or
    ``save_strategy="epoch"`` on a run of one epoch or less: ``epochs``, the trainer state's
    ``num_train_epochs``, known once training begins): a stop (SIGTERM, ``request_stop``) still
    saves one, but a killed run has nothing to resume from, whatever ``runner.checkpoint_every``
    says (a resume needs TRL's side too)."""
    strategy = getattr(args, "save_strategy", None)  # a str enum (SaveStrategy.NO) or a str
    max_steps = getattr(args, "max_steps", -1) or -1
    if strategy == "epoch" and epochs == 1:
        log.warning("the trainer saves at the end of each epoch (save_strategy='epoch') and this "
                    "run is one epoch or less: its first checkpoint is at its last step, so a "
                    "run killed before its end cannot resume (SIGTERM and request_stop() still "
                    "checkpoint; runner.checkpoint_every saves only the shards' side); set "
                    "save_strategy='steps' and save_steps below max_steps to make it resumable")
    elif strategy == "no":
        log.warning("the trainer saves no checkpoints (save_strategy='no'): a run stopped by "
                    "SIGTERM or request_stop() still checkpoints, but a killed one cannot "
                    "resume (runner.checkpoint_every saves only the shards' side); set "
                    "save_strategy='steps' and save_steps to make it resumable")
    elif strategy == "steps" and max_steps > 1:
        every = args.save_steps if args.save_steps >= 1 else math.ceil(max_steps * args.save_steps)
        if every >= max_steps:
            hint = checkpoint_every if 0 < checkpoint_every < max_steps else max(1, max_steps // 10)
            log.warning("the trainer saves its first checkpoint at its last step (save_steps=%s, "
                        "max_steps=%d): a run killed before its end (kill -9, out of memory, a "
                        "lost node) cannot resume (SIGTERM and request_stop() still checkpoint; "
                        "runner.checkpoint_every saves only the shards' side); set "
                        "save_steps below max_steps (e.g. save_steps=%d) to make it resumable",
                        args.save_steps, max_steps, hint)


def warn_model_only_checkpoints(args: Any, resuming: bool) -> None:
    """A script's trainer with ``save_only_model=True``: its checkpoints hold the weights but no
    optimizer, scheduler or RNG state, so transformers resumes one with a fresh AdamW and the
    learning-rate schedule from its start, silently. The updates after such a resume are not an
    uninterrupted run's (a fresh Adam's first steps are large and sign-like), and the SAE's
    samples carry the jump; said when the run starts, and again when it resumes."""
    if not getattr(args, "save_only_model", False):
        return
    if resuming:
        log.warning("resuming from a checkpoint saved with save_only_model=True: it holds no "
                    "optimizer, scheduler or RNG state, so AdamW restarts from zero moments and "
                    "the learning-rate schedule from its start; the updates from here on are "
                    "not the uninterrupted run's, and the shards see the jump")
    else:
        log.warning("the trainer saves its checkpoints with save_only_model=True (no optimizer, "
                    "scheduler or RNG state): a resumed run would restart AdamW and the "
                    "learning-rate schedule, and its updates would not continue this run's; set "
                    "save_only_model=False to make it resumable exactly")


def in_script_terms(message: str, auto: bool = False) -> str:
    """A run-directory refusal worded for ``ShardCallback``'s arguments (the shared message
    speaks ``sae-shards train``'s overrides); ``auto``: the script has ``resume="auto"``, and
    continues as it is (``SCRIPT_AUTO_RESUME``)."""
    how = SCRIPT_AUTO_RESUME if auto else SCRIPT_RESUME
    # "auto" decided to resume; beside it overwrite is refused: replacing means resume=False
    again = "start it again with resume=False and overwrite=True" if auto else (
        "start it again with overwrite=True")
    for cli, kwarg in (("continue it with resume=true", f"continue it with {how}"),
                       ("resume with resume=true", f"resume with {how}"),
                       ("start it again with overwrite=true", again),
                       ("overwrite=true", "overwrite=True"),
                       ("resume=true", 'resume="auto"' if auto else "resume=True"),
                       # a script's trainer checkpoints at its own save_steps (TRL's side)
                       ("lower runner.checkpoint_every to keep earlier steps next time",
                        "set the trainer's save_strategy='steps' and a smaller save_steps to "
                        "keep earlier steps next time")):
        message = message.replace(cli, kwarg)
    return message


SCRIPT_RESUME = "ShardCallback(..., resume=True) and trainer.train(resume_from_checkpoint=True)"
"""How a user's script continues a stopped run."""
SCRIPT_AUTO_RESUME = ('the script as it is (ShardCallback(..., resume="auto") and '
                      "trainer.train(resume_from_checkpoint=callback.resume_from(trainer)))")
"""How a script with ``resume="auto"`` continues one: run again, unchanged."""
