"""Checkpoints that a killed run resumes from: the SAE side of the run's state at one RL step.

At an RL step k that TRL checkpoints the callback writes (in this order, each atomically;
``snapshot_step`` takes what they hold, and ``write_step`` writes it on a ``BackgroundWriter``'s
thread)::

    run_dir/resume/step_00000k.safetensors   the ring buffer (samples, slot metadata, write
                                             position), the batch generator's state, the online
                                             activation log, the capture's counters, the
                                             run's wall time so far (and with a
                                             runner.sae_budget, its time paid and earned from)
    run_dir/checkpoints/step_00000k/         the shards (sae.safetensors, config.json) and the
                                             SAE trainer's Adam state and latent statistics

and TRL writes ``run_dir/trl/checkpoint-k`` (policy, optimizer, scheduler, RNG) meanwhile: the
callback writes in the background from ``on_step_end``, where TRL's ``save_steps`` (and a stop)
are already known, or from ``on_save``, after TRL's checkpoint, when TRL decided to save only
after the step (``save_strategy="epoch"``, ``"best"``).
Step k is *complete* when all three exist (TRL's ``trainer_state.json`` is its last file); a kill
at any instant leaves the previous complete step usable, and ``latest_complete`` finds it.
``restore`` puts the state back into a freshly built pipeline and truncates ``rollouts.jsonl``
and ``metrics.jsonl`` to step k, so nothing is counted twice. Only safetensors and JSON are
read, so loading never runs code from a file. Resume files are pruned to the two newest and the
newest step TRL finished a checkpoint of (``kept_resume_steps``).

At the other steps of ``runner.checkpoint_every`` (a script's trainer may save less often than
the callback checkpoints) only the shards are written (``snapshot_step(..., resumable=False)``):
with no TRL checkpoint of that step nothing could resume from it, so neither the resume file (the
whole ring buffer) nor the SAE's optimizer state is written there.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sae_shards.capture.delta import DeltaCapture
from sae_shards.capture.event_capture import EventCapture
from sae_shards.capture.pipeline import Pipeline
from sae_shards.capture.runner import ActivationLog
from sae_shards.capture.trl_checkpoints import trl_checkpoint_steps
from sae_shards.core import json_read
from sae_shards.core.checkpoint import (DAMAGED, STATE_FILE, CheckpointError, CheckpointFiles,
                                        checkpoint_files, load_checkpoint, load_training_state,
                                        read_safetensors, save_file_atomic, write_checkpoint)
from sae_shards.run import rundir

log = logging.getLogger(__name__)

RESUME_KIND = rundir.RESUME_KIND
END_OF_TRAINING = "train_runtime"
"""The key of transformers' one log row at the end of ``train()``."""

KEEP = 2  # resume files kept: the newest, and the one before it in case TRL's save was cut


resume_file = rundir.resume_file


class StepSnapshot(NamedTuple):
    """The SAE side of RL step ``step``, taken between steps, ready for ``write_step``."""

    step: int
    resume: dict[str, torch.Tensor] | None  # the resume file's tensors (buffer slots as views)
    info: dict[str, Any] | None  # the resume file's JSON header
    checkpoint: CheckpointFiles  # the shards checkpoint (copies)


def snapshot_step(step: int, parts: Pipeline, capture: DeltaCapture | EventCapture,
                  meta: dict[str, Any], wall_s: float, resumable: bool = True,
                  log_rows: dict[str, int] | None = None,
                  log_last: dict[str, str | None] | None = None) -> StepSnapshot:
    """What ``write_step`` writes for RL step ``step``. The caller has made the runner idle
    (every pushed delta processed). The SAE and trainer tensors are copies (the SAE may train
    on), the ring buffer's slots are views: write them before the buffer is written again.
    ``wall_s``: the run's training time so far (this process and those it resumed from).
    ``resumable=False``: the shards only (no resume file, no optimizer state), for a step no
    TRL checkpoint will resume from. ``log_rows``: how many rows the run's step logs
    (``STEP_LOGS``) held as of this step, and ``log_last`` the digest of each one's last row
    (``rundir.row_digest``), which a resume checks its copy of them against (``restore``); the
    resume file also records the run's ``meta["run_id"]``."""
    files = checkpoint_files(parts.sae, parts.trainer.stats.as_tensors(),
                             checkpoint_meta(meta, step, parts.trainer),
                             parts.trainer.state_tensors() if resumable else None, copy=True)
    if not resumable:
        return StepSnapshot(step, None, None, files)
    tensors, info = parts.buffer.state()
    tensors["loop.generator"] = parts.loop.generator.get_state()
    tensors.update(parts.loop.activations.tensors("online"))
    if isinstance(capture, EventCapture):  # kfac's running covariances
        tensors.update({f"precond.{k}": v
                        for k, v in capture.preconditioner.state_tensors().items()})
    info = {"step": step, "buffer": info, "capture": capture.counters(),
            "last_rl_step": parts.loop.last_rl_step, "wall_s": wall_s,
            "log_rows": dict(log_rows or {}), "log_last": dict(log_last or {}),
            "run_id": meta.get("run_id")}
    if parts.loop.budget is not None:  # runner.sae_budget: what it paid and earned from so far
        info["budget"] = dict(zip(("paid_s", "rl_s"), parts.loop.budget.totals()))
    return StepSnapshot(step, tensors, info, files)


def checkpoint_meta(meta: dict, rl_step: int, trainer: Any) -> dict:
    """A shards checkpoint's run metadata: the run's ``meta``, the RL step, the SAE's steps and
    the samples it trained on (``sae_samples``: whether a latent can be called dead yet)."""
    return {**meta, "rl_step": rl_step, "sae_step": trainer.n_steps,
            "sae_samples": trainer.stats.n_samples}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The shards checkpoint of RL step ``step``."""
    return run_dir / rundir.CHECKPOINTS / rundir.step_name(step)


def write_step(run_dir: Path, snap: StepSnapshot, keep_checkpoints: int = 0,
               trl_dir: Path | None = None) -> Path:
    """Write the resume file (when ``snap`` has one) and the shards checkpoint of ``snap``;
    returns the latter. Then prune the resume files to ``kept_resume_steps`` (``trl_dir``:
    TRL's ``output_dir``, by default the run's ``trl/``) and older checkpoints
    (``prune_checkpoints``). An ``OSError`` (disk full, no permission) becomes
    ``rundir.RunWriteError`` naming the path; what was already complete stays as it was."""
    target = resume_file(run_dir, snap.step)
    checkpoint = checkpoint_dir(run_dir, snap.step)
    if snap.resume is not None:
        with rundir.writing(target):
            target.parent.mkdir(exist_ok=True)
            save_file_atomic(snap.resume, target, RESUME_KIND,
                             {"info": json.dumps(rundir.strict_json(snap.info))})
    with rundir.writing(checkpoint):
        write_checkpoint(checkpoint, snap.checkpoint)
    kept = kept_resume_steps(run_dir, trl_dir or run_dir / rundir.TRL_OUTPUT)
    for old in set(rundir.saved_steps(run_dir / rundir.RESUME)) - kept:
        resume_file(run_dir, old).unlink(missing_ok=True)
    prune_checkpoints(run_dir, keep_checkpoints)
    return checkpoint


def kept_resume_steps(run_dir: Path, trl_dir: Path) -> set[int]:
    """The steps whose resume files stay: the ``KEEP`` newest, and the newest of which TRL
    finished a checkpoint in ``trl_dir``. A script's trainer saves at its own ``save_steps``,
    which may be rarer than ``runner.checkpoint_every``; TRL's ``resume_from_checkpoint=True``
    takes its newest checkpoint, and the callback needs that step's resume file."""
    steps = rundir.saved_steps(run_dir / rundir.RESUME)
    trl_done = [step for step in steps if rundir.trl_finished(trl_dir, step)]
    return set(steps[-KEEP:]) | set(trl_done[-1:])


def prune_checkpoints(run_dir: Path, keep: int = 0) -> None:
    """Bound what step checkpoints take on disk over a long run: a checkpoint whose step has no
    resume file left loses its optimizer state (only a resume reads it), and with ``keep`` >= 2
    (``runner.keep_checkpoints``) all but the newest ``keep`` checkpoints go. A checkpoint that
    still has a resume file is never touched."""
    resumable = set(rundir.saved_steps(run_dir / rundir.RESUME))
    steps = rundir.saved_steps(run_dir / rundir.CHECKPOINTS)
    dropped = set(steps[:-keep]) - resumable if keep else set()
    for step in steps:
        if step in resumable:
            continue
        path = checkpoint_dir(run_dir, step)
        with rundir.writing(path):
            if step in dropped:
                shutil.rmtree(path, ignore_errors=True)
            else:
                (path / STATE_FILE).unlink(missing_ok=True)


def latest_complete(run_dir: Path, quiet: bool = False,
                    trl: Path | None = None) -> int | None:
    """The newest RL step with a resume file, a shards checkpoint and TRL's finished checkpoint
    (in ``trl``, the trainer's ``output_dir``; default ``run_dir/trl``, ``sae-shards train``'s).

    TRL writes ``trainer_state.json`` last and not atomically: a kill while it is written leaves
    a torn file, so a checkpoint counts as finished only when that file parses. ``quiet``: no
    warning for an incomplete one passed over (a question asked, not a resume)."""
    trl = run_dir / rundir.TRL_OUTPUT if trl is None else trl
    shown = trl.relative_to(run_dir) if trl.is_relative_to(run_dir) else trl  # trl/ in the run
    for step in reversed(rundir.saved_steps(run_dir / rundir.RESUME)):
        missing = [what for what, ok in (
            (f"{rundir.CHECKPOINTS}/{rundir.step_name(step)} missing",
             (checkpoint_dir(run_dir, step) / "config.json").is_file()),
            (f"{shown / f'checkpoint-{step}' / 'trainer_state.json'} missing or torn",
             rundir.trl_finished(trl, step))) if not ok]
        if not missing:
            return step
        if not quiet:
            log.warning("RL step %d's checkpoint is incomplete (%s: the process was killed "
                        "while writing it); an earlier one is taken", step, ", ".join(missing))
    return None


def partial_checkpoints(run_dir: Path, trl: Path | None = None) -> str | None:
    """For a run with no complete checkpoint (``latest_complete`` is None): which of the three
    parts of one it holds, said as "resume/ step_4, step_8; checkpoints/ none; trl/
    checkpoint-4", or None when it holds none (killed before its first checkpoint). A copy of
    a run left without one part cannot resume, and must not be told to start again."""
    trl = run_dir / rundir.TRL_OUTPUT if trl is None else trl
    parts = {f"{rundir.RESUME}/": [rundir.step_name(s) for s in
                                   rundir.saved_steps(run_dir / rundir.RESUME)],
             f"{rundir.CHECKPOINTS}/": [rundir.step_name(s) for s in
                                        rundir.saved_steps(run_dir / rundir.CHECKPOINTS)],
             f"{trl.name}/": [f"checkpoint-{s}" for s in trl_checkpoint_steps(str(trl))]}
    if not any(parts.values()):
        return None
    return "; ".join(f"{where} {', '.join(names) or 'none'}" for where, names in parts.items())


STEP_LOGS = {rundir.ROLLOUTS: "step", rundir.EVENTS: "step", rundir.METRICS: "rl_step"}
"""The logs appended step by step, and the field naming a row's RL step: up to a checkpoint's
step they hold at least the rows they held when it was taken (``restore`` cuts them back to it)."""


def check_step_logs(run_dir: Path, step: int) -> None:
    """``_check_logs`` before anything of a resume is written (``sae-shards train``), with the
    row counts read from the header of step ``step``'s resume file (a damaged header is left to
    the resume's own read, which names it)."""
    info = _resume_info(run_dir, step)
    if not info:
        return
    _check_same_run(run_dir, step, None, info.get("run_id"))  # a foreign file named as such
    recorded, last = info.get("log_rows"), info.get("log_last")
    _check_logs(run_dir, step, recorded if isinstance(recorded, dict) else {},
                last if isinstance(last, dict) else {})


def _resume_info(run_dir: Path, step: int) -> dict[str, Any]:
    """The JSON ``info`` of step ``step``'s resume file, from its header alone; ``{}`` when it
    cannot be read (the resume's own read names why)."""
    from sae_shards.core.checkpoint_checks import opened_safetensors

    try:
        with opened_safetensors(resume_file(run_dir, step)) as f:
            info = json_read.loads((f.metadata() or {}).get("info", "{}"))
    except (CheckpointError, ValueError, AttributeError):
        return {}
    return info if isinstance(info, dict) else {}


def _check_logs(run_dir: Path, step: int, recorded: dict[str, int],
                last: dict[str, str | None] | None = None) -> None:
    """Refuse a resume whose step logs hold fewer rows, up to RL step ``step``, than the run had
    written when that step's checkpoint was taken (``recorded``: rows per log; none in resume
    files of earlier versions): a copy without them, or with a short one, would go on with a
    hole in its record of the steps (and figures such as the first reward or FVU taken from
    what is left). Or whose row at that place is not the one the run had written there
    (``last``: ``rundir.row_digest`` of each log's last row then): another run's log of as many
    rows would go on as this run's record. Rows are compared as parsed, so a complete log
    written again in another layout passes."""
    last = last or {}
    for name, rows in recorded.items():
        path, key = run_dir / name, STEP_LOGS.get(name)
        if key is None or not isinstance(rows, int):
            continue
        held, at_rows = 0, None
        for _, _, row in (rundir.iter_jsonl(path) if path.is_file() else ()):
            if row.get(key, 0) <= step:  # the rows the resume keeps
                held += 1
                if held == rows:
                    at_rows = row
        if held < rows:
            raise CheckpointError(
                f"{path}: {held} rows up to RL step {step}, where the run had written {rows} "
                f"when that step's checkpoint was taken: this copy's log is missing or cut "
                f"short, and the resumed run would have a hole in it; copy {name} again from "
                "the run")
        if (isinstance(last.get(name), str) and at_rows is not None
                and rundir.row_digest(at_rows) != last[name]):
            raise CheckpointError(
                f"{path}: row {rows} of those up to RL step {step} is not the row the run had "
                f"written there when that step's checkpoint was taken: the log is another "
                f"run's (or was edited since); copy {name} again from this run")


def _remove_later(run_dir: Path, step: int) -> None:
    """Remove the shards checkpoints and resume files of steps after ``step``, the one the run
    resumes from (left by a process killed while it wrote them, or one whose TRL side was
    incomplete): they describe a trajectory the resumed run replaces, and ``--checkpoint`` must
    not offer them."""
    for folder in (run_dir / rundir.CHECKPOINTS, run_dir / rundir.RESUME):
        for later in rundir.saved_steps(folder):
            if later <= step:
                continue
            path = (checkpoint_dir(run_dir, later) if folder.name == rundir.CHECKPOINTS
                    else rundir.resume_file(run_dir, later))
            with rundir.writing(path):  # a read-only folder: named, not a bare PermissionError
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            log.warning("%s: removed (written after RL step %d, which the run resumes from; "
                        "the steps after it are trained again)", path, step)


def _resume_instead(step: int, have: list[int], trl_output: str | Path | None) -> str:
    """The rest of ``restore``'s refusal: why TRL's checkpoint of ``step`` has no sae-shards
    side, and the checkpoint both sides have (the trainer's path to it when known)."""
    if trl_output is None:
        return f"; steps it can resume from: {have or 'none'} (resume TRL from the matching " \
               "checkpoint-N)"
    trl = Path(trl_output)
    saved = trl_checkpoint_steps(str(trl))
    both = [s for s in have if s in saved]
    text = (f". TRL's {trl / f'checkpoint-{step}'} has no sae-shards side: the process was "
            "killed after TRL saved it and before sae-shards' side was written (it follows "
            "TRL's), the write failed (a full disk), or an earlier run in that output_dir left "
            "it; delete it, or resume_from_checkpoint=True picks it again" if step in saved else
            f". TRL's checkpoint of step {step} (not in the trainer's output_dir {trl}) has no "
            "sae-shards side")
    if not both:
        return text + f"; no step has both sides (sae-shards: {have or 'none'}), start anew"
    return text + (f"; the newest step with both sides is {both[-1]}: "
                   f"trainer.train(resume_from_checkpoint='{trl / f'checkpoint-{both[-1]}'}')")


def _check_same_run(run_dir: Path, step: int, checkpoint_id: Any, resume_id: Any) -> None:
    """Refuse a resume whose sae-shards parts of step ``step`` are not the run's own: the shards
    checkpoint (``checkpoint_id``, its meta's ``run_id``) and the resume file (``resume_id``,
    its info's) each record the id ``config.json`` gives the run. A part copied in from another
    run of the same settings (another seed) would otherwise be resumed from without a word, two
    runs mixed under one record. Parts written before run ids are not compared; TRL's side is
    checked by what it logged (``_check_trl_log``)."""
    run_id = rundir.read_config(run_dir).get("run_id")
    if not isinstance(run_id, str):
        return
    parts = {checkpoint_dir(run_dir, step): checkpoint_id, resume_file(run_dir, step): resume_id}
    foreign = [f"{path} (run {other})" for path, other in parts.items()
               if isinstance(other, str) and other != run_id]
    if foreign:
        raise CheckpointError(
            f"{run_dir}: RL step {step}'s checkpoint holds parts of another run than this one "
            f"(config.json's run_id {run_id}): {'; '.join(foreign)}. They were copied in from "
            "another run: copy this run's own parts back, or start a new run_dir")


def recorded_run_id(run_dir: Path, step: int) -> str | None:
    """The ``run_id`` step ``step``'s resume file records (None: none, or unreadable)."""
    found = _resume_info(run_dir, step).get("run_id")
    return found if isinstance(found, str) else None


def _check_trl_log(run_dir: Path, step: int, history: list[dict[str, Any]] | None) -> None:
    """Refuse a resume whose TRL checkpoint is not this run's (``trl_log_mismatch``). Another
    run's checkpoint (another seed's, given by path or found in a shared output_dir) logged
    other losses and rewards."""
    found = trl_log_mismatch(run_dir, step, history)
    if found:
        raise CheckpointError(
            f"{run_dir}: the TRL checkpoint the trainer resumed from (RL step {step}) logged "
            f"other values at RL step {found[0]} than this run did ({found[1]}): its policy "
            "and optimizer are another run's (another seed's checkpoint, given by path or left "
            "in a shared output_dir); resume from this run's own checkpoint of that step")


def _logged_rl_rows(run_dir: Path, step: int) -> dict[int, dict[str, Any]]:
    """This run's ``rl`` rows of ``metrics.jsonl`` up to RL step ``step``, by step (TRL's
    end-of-training row left out)."""
    ours: dict[int, dict[str, Any]] = {}
    path = run_dir / rundir.METRICS
    for _, _, row in rundir.iter_jsonl(path) if path.is_file() else ():
        at = row.get("rl_step")
        if row.get("kind") == "rl" and isinstance(at, int) and at <= step \
                and "train_runtime" not in row:  # not TRL's end-of-training row
            ours[at] = row
    return ours


def trl_log_mismatch(run_dir: Path, step: int, history: list[dict[str, Any]] | None,
                     ours: dict[int, dict[str, Any]] | None = None) -> tuple[int, str] | None:
    """Whether a TRL log is another run's: the log TRL keeps in a checkpoint
    (``trainer_state.json``'s ``log_history``) must hold, at the latest RL step up to ``step``
    that both logged, the values this run's ``metrics.jsonl`` holds there (its ``rl`` rows are
    what TRL passed to ``on_log``), for the figures both hold (a callback before ShardCallback
    may add its own to the logs), and one at least. ``(that step, what differs)`` when it does
    not; None when it does, or when there is nothing to compare (no log in common). ``ours``:
    ``_logged_rl_rows`` when already read (several logs compared with one run's)."""
    ours = _logged_rl_rows(run_dir, step) if ours is None else ours
    theirs: dict[int, list[dict[str, Any]]] = {}
    for entry in history or ():
        at = entry.get("step") if isinstance(entry, dict) else None
        if isinstance(at, int) and at <= step:
            theirs.setdefault(at, []).append(entry)
    common = sorted(ours.keys() & theirs.keys())
    if not common:
        return None
    at = common[-1]
    values = {k: v for k, v in ours[at].items() if k not in ("kind", "rl_step")
              and isinstance(v, (int, float)) and not isinstance(v, bool)}

    def differs(entry: dict[str, Any]) -> str | None:
        # a figure TRL's entry lacks was added to the logs by a callback before ShardCallback
        # (transformers hands every callback one dict, after log_history copied it)
        shared = [key for key in values if key in entry]
        if not shared:
            return f"{', '.join(values)} in metrics.jsonl, none of them in TRL's"
        for key in shared:
            got = entry[key]
            if not isinstance(got, (int, float)) or float(got) != values[key]:
                return f"{key} {values[key]!r} in metrics.jsonl, {got!r} in TRL's"
        return None

    found = [differs(entry) for entry in theirs[at]]
    return (at, found[-1]) if all(found) else None


def other_runs_trl_checkpoints(run_dir: Path, output_dir: str | None, step: int) -> list[int]:
    """The steps after ``step`` (the one a run resumed from) whose TRL checkpoint in
    ``output_dir`` logged, up to ``step``, other values than this run
    (``trl_log_mismatch``): another run's, in an output_dir two runs share. A checkpoint whose
    log cannot be read is not counted."""
    other, ours = [], None
    for later in trl_checkpoint_steps(output_dir):
        state = Path(str(output_dir)) / f"checkpoint-{later}" / "trainer_state.json"
        if later <= step:
            continue
        try:
            history = json_read.loads(state.read_text()).get("log_history")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(history, list):
            continue
        ours = _logged_rl_rows(run_dir, step) if ours is None else ours  # read once
        if trl_log_mismatch(run_dir, step, history, ours):
            other.append(later)
    return other


def _resume_before(run_dir: Path, step: int, trl_output: str | Path | None) -> str:
    """The way past a damaged sae-shards file of step ``step``: delete that step's files, and
    the run resumes from the newest complete step before it (a script names TRL's checkpoint of
    that step); or that no earlier step is complete."""
    trl_folder = Path(trl_output) if trl_output else run_dir / rundir.TRL_OUTPUT
    earlier = [s for s in sorted(set(rundir.saved_steps(run_dir / rundir.RESUME))
                                 & set(rundir.saved_steps(run_dir / rundir.CHECKPOINTS))
                                 & set(trl_checkpoint_steps(str(trl_folder))))
               if s < step]  # all three parts there (TRL's rotation may have removed its own)
    if not earlier:
        return f"No checkpoint before RL step {step} is complete: restore the file, or start anew"
    then = (f"a script then passes resume_from_checkpoint="
            f"'{Path(trl_output) / f'checkpoint-{earlier[-1]}'}'" if trl_output else
            "sae-shards train resume=true then resumes from it")
    return (f"To resume from RL step {earlier[-1]} instead, delete "
            f"{resume_file(run_dir, step)} and {checkpoint_dir(run_dir, step)} ({then})")


def restore(run_dir: Path, step: int, parts: Pipeline,
            capture: DeltaCapture | EventCapture, last: bool = False,
            trl_output: str | Path | None = None, logs_checked: bool = False,
            trl_log: list[dict[str, Any]] | None = None) -> float:
    """Load the state of RL step ``step`` into a freshly built pipeline and capture, and cut the
    run's JSON-lines logs back to that step (raises ``CheckpointError`` naming what is missing).
    TRL's end-of-training row goes too (a stopped process's: the resumed one logs its own),
    unless ``step`` is the run's ``last`` (the run trained to its end and is not trained again).
    Returns the run's training time up to that checkpoint (``wall_s``; 0 for files written
    before it was recorded). ``trl_output``: the trainer's ``output_dir``, for a refusal that
    names the checkpoint to resume from instead. ``logs_checked``: the step logs were already
    checked against the resume file's record (``check_step_logs``, by ``sae-shards train``
    before it wrote anything), so they are not read for it again. ``trl_log``: the log history
    of the TRL checkpoint the trainer resumed from, checked against ``metrics.jsonl``
    (``_check_trl_log``)."""
    checkpoint = checkpoint_dir(run_dir, step)
    target = resume_file(run_dir, step)
    if not target.is_file() or not checkpoint.is_dir():
        have = sorted(set(rundir.saved_steps(run_dir / rundir.RESUME))
                      & set(rundir.saved_steps(run_dir / rundir.CHECKPOINTS)))
        if step == 0:  # the trainer starts afresh: TRL was not asked to resume
            raise CheckpointError(
                f"{run_dir}: resume=True but the trainer starts from step 0: call "
                "trainer.train(resume_from_checkpoint=True) (or the path of TRL's "
                f"checkpoint-N) so TRL resumes too; sae-shards can resume from steps {have or 'none'}")
        raise CheckpointError(
            f"{run_dir}: the trainer resumes from RL step {step} but sae-shards has no complete "
            f"checkpoint of that step ({target.name} and {checkpoint.name})"
            f"{_resume_instead(step, have, trl_output)}")
    try:
        loaded = load_checkpoint(checkpoint, parts.sae.device)
        state = load_training_state(checkpoint)
        tensors, header = read_safetensors(target, kind=rundir.RESUME_KIND)
    except CheckpointError as e:  # a damaged file: what the run can resume from instead
        # (not the advice for analyze / evaluate, which read another checkpoint)
        said = str(e).replace(DAMAGED, "restore the file from a copy of the run")
        raise CheckpointError(f"{said}. {_resume_before(run_dir, step, trl_output)}") from e
    if [t.name for t in loaded.sae.targets] != [t.name for t in parts.specs]:
        raise CheckpointError(f"{checkpoint}: its targets differ from this run's; resume with "
                              "the run's own capture.targets")
    with torch.no_grad():
        parts.sae.load_state_dict(loaded.sae.state_dict())
    parts.trainer.load_state_tensors(state)
    try:  # a damaged or foreign file: named, not a KeyError or torch's error from inside
        info = json_read.loads(header["info"])
        _check_same_run(run_dir, step, rundir.section(loaded.config, "meta").get("run_id"),
                        info.get("run_id"))
        _check_trl_log(run_dir, step, trl_log)
        parts.buffer.load_state(tensors, info["buffer"])
        parts.loop.generator.set_state(tensors["loop.generator"])
        parts.loop.activations = ActivationLog.from_tensors(tensors, "online")
        parts.loop.last_rl_step = int(info["last_rl_step"])
        capture.load_counters(info["capture"])
        if parts.loop.budget is not None and "budget" in info:
            parts.loop.budget.resumed_from = (float(info["budget"]["paid_s"]),
                                              float(info["budget"]["rl_s"]))
        if isinstance(capture, EventCapture):
            capture.preconditioner.load_state_tensors(
                {k[len("precond."):]: v for k, v in tensors.items() if k.startswith("precond.")})
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{target}: not a resume file that fits this run's RL step {step} ({type(e).__name__}: "
            f"{e}); the file is damaged or another run's: restore it from a copy of the run. "
            f"{_resume_before(run_dir, step, trl_output)}") from e
    if not logs_checked:
        _check_logs(run_dir, step, info.get("log_rows") or {}, info.get("log_last") or {})
    _remove_later(run_dir, step)
    cut_logs(run_dir, step, last)
    return float(info.get("wall_s", 0.0))


def cut_logs(run_dir: Path, step: int, last: bool = False) -> None:
    """Cut the run's JSON-lines logs (rollouts, events, metrics) back to RL step ``step``: the
    rows of later steps describe a trajectory the resumed run replaces. TRL's end-of-training
    row goes too (a stopped process's: the resumed one logs its own), unless ``step`` is the
    run's ``last``."""
    rundir.truncate_jsonl(run_dir / rundir.ROLLOUTS, lambda row: row.get("step", 0) <= step)
    if (run_dir / rundir.EVENTS).is_file():
        rundir.truncate_jsonl(run_dir / rundir.EVENTS, lambda row: row["step"] <= step)
    rundir.truncate_jsonl(run_dir / rundir.METRICS, lambda row: row.get("rl_step", 0) <= step
                          and (last or not (row.get("kind") == "rl" and END_OF_TRAINING in row)))
