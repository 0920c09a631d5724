"""The run directory: every file a run writes, named in one place, and how each is written.

::

    run_dir/
      config.json                 the resolved configuration (JobConfig layout; see ``run_config``)
      model/                      the initial weights: the built-in tiny model (sae-shards train),
                                  or ShardCallback's copy of a policy not loaded from a local dir
      final_model/                the policy after RL (with LoRA: the adapter) and its tokenizer
      checkpoints/step_XXXXXX/    every runner.checkpoint_every RL steps (core/checkpoint.py)
      checkpoints/final/          at the end (absent when the run was interrupted)
      resume/step_XXXXXX.safetensors  the SAE side of a resumable checkpoint (capture/resume.py)
      trl/checkpoint-N/           TRL's own checkpoint of the policy, optimizer, scheduler, RNG
      activations.safetensors     per captured sample: RL step, event, latent indices, values
      samples.safetensors         every buffered sample (runner.save_samples=true)
      rollouts.jsonl              per RL step: prompts, completions, rewards, advantages, labels
      events.jsonl                per-event capture: per event its step, completions (indices into
                                  the step's rollouts), advantage, norm, kept energy, labels
      metrics.jsonl               TRL and SAE figures per step (also in W&B)
      summary.json                first/last reward and FVU, counters, sizes, wall time
      wandb/                      the offline W&B run (sae-shards train)
      .hydra/                     Hydra's composed config and overrides (sae-shards train)
      .lock                       held (flock) by the process writing the run, while it writes

One process writes a run at a time: ``prepare_run_dir`` takes ``.lock`` (an exclusive ``flock``,
released by ``release_run_dir`` or when the process dies, ``kill -9`` included) and refuses a
directory another live process holds, e.g. the workers of an ``accelerate launch`` whose
launcher was killed (they keep running) when the run is resumed.

Every file is complete or absent after a kill at any instant: JSON and safetensors files are
written to a temporary name and renamed into place (JSON strict: NaN/Inf as ``null``);
checkpoint directories likewise; JSON-lines logs are appended line by line, and a torn last line
(a kill mid-write) is dropped by ``read_jsonl`` and by resume's ``truncate_jsonl``. A failed write
(disk full, no permission) raises ``RunWriteError`` naming the path.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from sae_shards.core import json_read
from sae_shards.core.checkpoint import (SAE_FILE, STATE_FILE, CheckpointError, process_umask,
                                       save_file_atomic)
from sae_shards.run.config import EMPTY_RUN_DIR

log = logging.getLogger(__name__)

CONFIG = "config.json"
MODEL = "model"
INITIAL_ADAPTER = "initial_adapter"
"""A LoRA policy's adapter as the run started, when it was not zero (``initial_model``)."""
RESUME_KIND = "sae-shards-resume"
"""The header format of ``resume/step_N.safetensors`` (``capture.resume``)."""
FINAL_MODEL = "final_model"
CHECKPOINTS = "checkpoints"
ACTIVATIONS = "activations.safetensors"
SAMPLES = "samples.safetensors"
ROLLOUTS = "rollouts.jsonl"
EVENTS = "events.jsonl"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WANDB = "wandb"
HYDRA = ".hydra"
HYDRA_LOG = "cli.log"  # Hydra's job log (hydra.job.name in configs/config.yaml)
TRL_OUTPUT = "trl"
RESUME = "resume"
REPORT = "report.html"
ANALYSIS = "analysis.json"
EVALUATION = ("evaluation.json", "evaluation.md")
DERIVED = (REPORT, ANALYSIS, *EVALUATION)
"""What ``analyze`` and ``evaluate`` write from a run's state; stale once the run continues."""
ENDING = (ACTIVATIONS, SAMPLES, SUMMARY)
"""What the end of a run writes (a stopped run's end too); stale once the run continues, and
written again at its next end."""

OWNED = (CONFIG, MODEL, INITIAL_ADAPTER, FINAL_MODEL, CHECKPOINTS, ACTIVATIONS, SAMPLES, ROLLOUTS,
         EVENTS, METRICS, SUMMARY, WANDB, HYDRA, HYDRA_LOG, TRL_OUTPUT, RESUME, *DERIVED)
"""Everything a run writes into its directory; ``overwrite=true`` removes all of it first."""

RESUME_FREE = ("run_dir", "overwrite", "resume", "device", "logging", "runner.torch_threads",
               "runner.keep_checkpoints", "world_size", "launch", "distribution", "versions",
               "resumed_under", "rl.output_dir", "run_id")
"""Settings a resumed run may change (``config_differences``; ``rl.output_dir``: where a
script's trainer keeps its checkpoints, moved with the run); every other one must match the
run's ``config.json`` (the process count and the distribution are checked on their own, with
their own messages; the software's versions are warned about and recorded,
``run/versions.py``)."""

_RESULTS = (CHECKPOINTS, ROLLOUTS, EVENTS, ACTIVATIONS, SAMPLES, SUMMARY)
"""Files whose presence means the directory holds an earlier run's results."""

_AFTER_CONFIG = (WANDB, METRICS, ROLLOUTS, EVENTS, SUMMARY, ACTIVATIONS, SAMPLES, RESUME,
                 FINAL_MODEL, *DERIVED)
"""What a run writes (with content) only once its ``config.json`` is written; beside no
``config.json`` they are another tool's or the user's (a project's own ``wandb/``), or a copy
of a run that lost its ``config.json``. Hydra's ``.hydra/`` and ``cli.log``, the tiny model's
``model/`` and TRL's ``trl/`` may come first, from a start that failed before its config was
written; ``overwrite`` removes ``config.json`` last, so a killed removal leaves one. One writer
has no ``config.json`` at its top: the planted benchmark's run captured several ways, whose
``final_model/`` its captures' run directories share (``_shares_final_model``)."""


LOCK = ".lock"
"""Held by the process writing the run (not in ``OWNED``: ``overwrite`` never removes it)."""

_HELD: dict[Path, list[int]] = {}
"""Run directories this process holds: resolved path -> [the lock file's descriptor, how many
holders in this process (a job and its callback; two callbacks) have taken it]."""


class RunDirBusy(FileExistsError):
    """Another live process is writing the run directory."""


def lock_run_dir(run_dir: Path) -> None:
    """Take ``run_dir/.lock`` for this process, or raise ``RunDirBusy`` naming the process that
    holds it; each call is matched by one ``release_run_dir`` (holders in one process are
    counted: the lock goes when the last lets go). The lock is an exclusive ``flock``: the
    kernel drops it when the holder exits, however it dies, so a killed run never leaves a
    stale lock (a filesystem without ``flock``, e.g. some network mounts, gets no lock: a
    warning, not a refusal)."""
    key = run_dir.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        return
    path = key / LOCK
    try:  # never through a link: the lock file is written (a copied run's .lock -> ~/.bashrc)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileExistsError(
                f"{path} is a symbolic link (to {os.readlink(path)}): the run's lock file is "
                "written, never through a link out of the run directory; remove the link "
                f"(rm {path}) and run again") from None
        raise write_error(path, e) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd, "unknown")
        os.close(fd)
        raise RunDirBusy(
            f"run_dir={run_dir} is being written by another process ({holder}): wait for it to "
            "finish, or stop it first. After kill -9 on `accelerate launch` (or torchrun) its "
            "worker processes keep running and writing; kill them too (the holder's pid above, "
            "and its sibling ranks: pgrep -af sae_shards.cli lists those of sae-shards train, "
            "pgrep -af with your script's name those of a script), then resume. A "
            "notebook or script whose train() raised still "
            "holds it: call the callback's close() there, or end that process") from None
    except OSError as e:
        os.close(fd)
        log.warning("cannot lock %s (%s): nothing stops a second process from writing this "
                    "run at the same time", path, e)
        return
    try:  # who holds it, for the message above (the lock itself does not need it)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    except OSError as e:
        log.warning("could not note this process in %s: %s", path, e)
    _HELD[key] = [fd, 1]


def _holder(fd: int, unknown: str) -> str:
    """Who holds the lock open as ``fd``, as its holder noted it in the file (``unknown`` when
    it noted nothing)."""
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or unknown


def release_run_dir(run_dir: Path) -> None:
    """Let go of one hold of ``run_dir``'s lock (``lock_run_dir``); the last one in this
    process drops it. A no-op where this process holds none."""
    key = Path(run_dir).resolve()
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        os.close(held[0])  # closing the descriptor drops the flock


def live_writer(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock (``lock_run_dir``: ``pid N on HOST, since ...``) when another
    live process is writing the run now, else None (none, or it cannot be told). Asked by a
    reader (``analyze``) in another process; it takes nothing (a shared ``flock``, let go at
    once)."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd, "another process")
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunWriteError(RuntimeError):
    """A file of the run could not be written (disk full, no permission); names the path.
    ``what``: ``could not write PATH: REASON`` alone, for a caller that says itself what to do
    next (``sae-shards train`` names the command that continues the run, or starts it again)."""

    def __init__(self, message: str, what: str | None = None) -> None:
        super().__init__(message)
        self.what = what or message


WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)
"""An ``OSError`` with one of these failed a write, whatever it was writing."""
_WRITE_FAILED = re.compile(r"\(os error (?:%s)\)|file write failed|unexpected pos \d+ vs \d+"
                           % "|".join(str(n) for n in WRITE_ERRNOS))
"""How libraries that do not raise ``OSError`` report a failed write: safetensors (``... (os
error 28)``) and torch.save (``PytorchStreamWriter failed ... file write failed``, or ``unexpected
pos N vs M`` after a short write)."""


def write_failure(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from, says a file could not be written for
    want of space or a writable filesystem (``WRITE_ERRNOS``; torch's and safetensors' own
    wording of the same), where a library writing the run (TRL's checkpoint, transformers'
    ``save_pretrained``) raised it deep inside."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return True
        if not isinstance(e, OSError) and _WRITE_FAILED.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def write_error(path: Path, e: BaseException) -> RunWriteError:
    """The ``RunWriteError`` for ``e``, a failed write of ``path`` (or into it)."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    try:
        free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
        reason += f"; {free / 2**20:.1f} MiB free on its filesystem"
    except (OSError, StopIteration):
        pass
    what = f"could not write {path}: {reason}"
    return RunWriteError(f"{what}; what the run wrote before is intact (free space or fix "
                         "permissions, then resume with resume=true)", what)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` (or a library's own error for a full disk:
    ``write_failure``) into a ``RunWriteError`` that names it."""
    try:
        yield
    except RunWriteError:
        raise
    except Exception as e:
        if not isinstance(e, OSError) and not write_failure(e):
            raise
        raise write_error(Path(path), e) from e


def _has_content(path: Path) -> bool:
    if path.is_dir():  # a killed writer's leftovers alone are no run (they are removed)
        return any(not _is_leftover(p) for p in path.iterdir())
    return path.exists() and path.stat().st_size > 0


def unwritable(run_dir: Path) -> str | None:
    """Why ``run_dir``, or the directory it would be created in, cannot be written to: a file
    in the way (``run_dir`` itself or a folder above it), a read-only filesystem, no
    permission, or a place where nothing can be created (``/proc``, which root's permission
    bits allow: tried with a directory made and removed at once); None when it can (or
    nothing of it exists to ask)."""
    found = _unwritable(run_dir)
    return found[0] if found else None


def run_dir_refusal(run_dir: Path, example: str = "") -> str | None:
    """``unwritable``'s reason as ``sae-shards train``'s config error and a script's
    ``ShardCallback`` both say it, with what to do (``example``: a run_dir to give instead);
    None when ``run_dir`` can be written."""
    found = _unwritable(run_dir)
    if found is None:
        return None
    why, permission = found
    return (f"run_dir={run_dir} cannot be written: {why}; give a run_dir where you can write"
            + example + (", or fix its permissions" if permission else ""))


def _unwritable(run_dir: Path) -> tuple[str, bool] | None:
    """``unwritable``'s reason, and whether permissions are what stop the write."""
    folder = next((p for p in (run_dir, *run_dir.absolute().parents) if p.exists()), None)
    if folder is None:
        return None
    if not folder.is_dir():
        return f"{folder} is a file, not a directory", False
    if os.access(folder, os.W_OK | os.X_OK):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".sae-shards-probe-", dir=folder))
        except OSError as e:
            return f"nothing can be created in {folder} ({e.strerror or e})", False
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"{folder} is on a read-only filesystem", False
    return f"{folder} is not writable by this user (permission denied)", True


def prepare_run_dir(run_dir: str | Path, overwrite: bool, resume: bool = False) -> Path:
    """Create ``run_dir``; refuse one holding an earlier run unless ``overwrite``, which removes
    every file an earlier run wrote (``OWNED``) so nothing of it mixes with the new run, or
    ``resume``, which continues it. Takes one hold of the directory's lock (``lock_run_dir``),
    which the caller releases (``release_run_dir``) when it is done writing; a refusal
    releases it."""
    if not str(run_dir).strip():  # before Path turns "" into "."
        raise ValueError(EMPTY_RUN_DIR)
    run_dir = Path(run_dir)
    if run_dir.resolve() == Path.cwd().resolve():
        raise ValueError(f"run_dir={str(run_dir)!r} would write the run into the current "
                         "directory; give a directory of its own, e.g. run_dir=runs/my_run")
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"run_dir={run_dir} is a file; give a directory")
    check_not_foreign(run_dir)
    check_not_sweep(run_dir)
    check_not_in_run_folder(run_dir)
    if resume and not run_dir.is_dir():  # refused before anything is created
        raise FileNotFoundError(f"resume=true but run_dir={run_dir} does not exist: "
                                + _why_not_resumable(run_dir, []))
    refused = run_dir_refusal(run_dir)
    if refused:  # before mkdir's bare OSError (a script's ShardCallback gets here first)
        raise PermissionError(refused)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"run_dir={run_dir} cannot be created: {e.strerror or e} "
                              f"({e.filename}); give a run_dir where you can write") from None
    lock_run_dir(run_dir)  # before anything is read or removed: one writer at a time
    try:
        return _prepare_locked(run_dir, overwrite, resume)
    except BaseException:
        release_run_dir(run_dir)  # refused: this hold ends here
        raise


def auto_resume(run_dir: str | Path, with_trl: bool = False) -> tuple[bool, bool]:
    """``(resume, overwrite)`` for ``resume="auto"``, the setting of a job that a scheduler
    starts and requeues with one command, from what ``run_dir`` holds now. A run with a
    complete resumable step (its resume file and its shards checkpoint with the training
    state; ``with_trl``, ``sae-shards train``'s run: also TRL's finished checkpoint in
    ``trl/``; a script's trainer keeps its own elsewhere) is resumed. A new or empty directory
    starts a new run, and so does a run with nothing to resume, replaced as ``overwrite`` would:
    one that stopped before its first checkpoint, or was killed while it wrote it (the parts of
    one step at most; shards-only checkpoints, which hold no training state, count for none).
    Parts of two steps or more, none complete, or a shards checkpoint without its resume file
    (written first), are a copy that left a part out: resumed, so that the resume refuses them
    naming what is missing, never replaced. A finished run: ``FileExistsError``."""
    run_dir = Path(run_dir)
    if not str(run_dir).strip() or not run_dir.is_dir():
        return False, False
    done = finished_steps(run_dir)
    if done is not None:
        raise FileExistsError(f"{_nothing_to_resume(run_dir, done)}, or give a new run_dir")
    resumes = set(saved_steps(run_dir / RESUME))
    states = {s for s in saved_steps(run_dir / CHECKPOINTS)
              if (run_dir / CHECKPOINTS / step_name(s) / STATE_FILE).is_file()}
    trl = run_dir / TRL_OUTPUT
    started = set(trl_checkpoint_steps(str(trl))) if with_trl else set()
    complete = resumes & states
    if with_trl:
        complete = {s for s in complete if trl_finished(trl, s)}
    # a step's resume file is written before its shards checkpoint: a checkpoint without one,
    # or parts of several steps, are a copy's, not a kill's
    if complete or states - resumes or len(resumes | states | started) >= 2:
        return True, False
    return False, bool(earlier_results(run_dir)) or bool(resumes | states | started)


def _nothing_to_resume(run_dir: Path, steps: int) -> str:
    """What a resume of the finished run in ``run_dir`` is told (its caller adds the way on)."""
    return (f"the run in run_dir={run_dir} finished ({steps} RL steps, {SUMMARY}): there is "
            f"nothing to resume. Analyze it (sae-shards analyze {run_dir})")


def _why_not_resumable(run_dir: Path, earlier: list[str]) -> str:
    """What a ``resume=true`` without resume state found, and what to run instead."""
    if earlier and (saved_steps(run_dir / CHECKPOINTS)
                    or any((run_dir / TRL_OUTPUT).glob("checkpoint-*"))):
        places = ", ".join(f"{d}/" for d in (CHECKPOINTS, TRL_OUTPUT) if (run_dir / d).is_dir())
        return (f"it holds step checkpoints ({places}) without their "
                f"resume files. A copy that left {RESUME}/ out: copy it from the run; a run "
                "killed while it wrote its first checkpoint: start it again with "
                "overwrite=true (which deletes what the directory holds)")
    if earlier:
        return ("it stopped before its first checkpoint; start it again with overwrite=true "
                "(or lower runner.checkpoint_every to keep earlier steps next time)")
    if run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir()):
        return ("it stopped before its first RL step ended (while writing its config, building "
                "or loading its model, or inside step 1); start it again without resume=true "
                "(what it wrote is replaced)")
    return "no run was started there; start it without resume=true"


def rewardless_trainer(config: Mapping[str, Any]) -> str | None:
    """The trainer class of a script's run that had no reward functions (``SFTTrainer``,
    ``DPOTrainer``: ``ShardCallback`` recorded ``rl.reward_weights`` as null), else None (a run
    recorded before that key existed is not known to have none)."""
    if section(config, "task").get("name"):
        return None
    rl = section(config, "rl")
    recorded_none = "reward_weights" in rl and rl["reward_weights"] is None
    return (rl.get("algorithm") or None) if recorded_none else None


def leftovers(run_dir: Path) -> list[Path]:
    """Files and directories a killed writer left half-written under their temporary names:
    ``.NAME.tmp*`` (JSON, reports, checkpoints), ``.tmpXXXX`` (safetensors' own), ``.NAME.old-PID``
    (a checkpoint moved aside while its replacement was renamed in) and ``.model.XXXX`` (the tiny
    model's build), at the top, in ``checkpoints/`` and in ``resume/``.
    Whoever holds the run directory's lock may remove them: nobody else is writing."""
    found = []
    for folder in (run_dir, run_dir / CHECKPOINTS, run_dir / RESUME):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if _is_leftover(p)]
    return sorted(found)


def _is_leftover(path: Path) -> bool:
    name = path.name
    return name.startswith(".") and (".tmp" in name or ".old-" in name
                                     or name.startswith(f".{MODEL}."))


def _remove_leftovers(run_dir: Path, resuming: bool = False) -> None:
    """Remove ``leftovers``; when ``resuming``, a step checkpoint or resume file left
    half-written under its temporary name is a warning (that step's state was never complete)."""
    for path in leftovers(run_dir):
        if (resuming and path.parent.name in (CHECKPOINTS, RESUME)
                and path.name.startswith(f".{STEP_PREFIX}") and ".tmp" in path.name):
            log.warning("%s: removed (a step's %s the process was killed while writing; the run "
                        "resumes from the newest step whose checkpoint is complete)",
                        path, "checkpoint" if path.parent.name == CHECKPOINTS else "resume file")
        else:
            log.info("%s: removed (left half-written by a process that was killed)", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def earlier_results(run_dir: Path) -> list[str]:
    """The names of an earlier run's results in ``run_dir`` (``_RESULTS`` with content; empty
    logs of a run that failed before its first step do not count: a retry may reuse them)."""
    return [name for name in _RESULTS if _has_content(run_dir / name)]


def _prepare_locked(run_dir: Path, overwrite: bool, resume: bool) -> Path:
    earlier = earlier_results(run_dir)
    finished = finished_steps(run_dir)
    if resume:
        if finished is not None:
            raise FileExistsError(f"resume=true but {_nothing_to_resume(run_dir, finished)}, "
                                  "or start it again with overwrite=true")
        if not has_resume_state(run_dir):
            raise FileNotFoundError(
                f"resume=true but run_dir={run_dir} holds no resumable run ({RESUME}/ is "
                "missing or empty): " + _why_not_resumable(run_dir, earlier))
        _remove_leftovers(run_dir, resuming=True)
        return run_dir
    if earlier and not overwrite:
        resumable = finished is None and has_resume_state(run_dir)
        raise FileExistsError(
            f"run_dir={run_dir} already holds a run ({', '.join(earlier)}); "
            + ("it was stopped before it finished: continue it with resume=true, " if resumable
               else "")
            + "choose a new run_dir=... or pass overwrite=true to replace it")
    for name in (ROLLOUTS, EVENTS, METRICS):  # a failed start's empty logs: not this run's
        path = run_dir / name  # nor is a link (to an empty file, or dangling): the run would
        if path.is_symlink() or (path.is_file() and path.stat().st_size == 0):  # append
            path.unlink()  # through it, out of its directory; the link goes, never its target
    if overwrite:
        removed = []
        for name in (*(n for n in OWNED if n != CONFIG), CONFIG):  # see _AFTER_CONFIG
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            removed.append(name)
        if removed:  # said where Python shows it by default: a script configures no logging
            log.warning("removed the earlier run in %s to start anew (%s)", run_dir,
                        ", ".join(removed))  # overwrite=true, overwrite=True or resume="auto"
    _remove_leftovers(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors",
               "tokenizer.json", "tokenizer_config.json", "generation_config.json")
"""Files of a Hugging Face model or adapter directory; a run directory holds them only in its
``model/`` and ``final_model/`` subdirectories, never at its top."""


def has_tokenizer(folder: Path) -> bool:
    """Whether a model (or adapter) directory holds a saved tokenizer."""
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def is_run_config(config: Any) -> bool:
    """Whether a parsed ``config.json`` is a sae-shards run's (its ``capture`` and ``sae``
    sections), not a model's, another tool's or a user's own."""
    return (isinstance(config, dict) and isinstance(config.get("capture"), dict)
            and isinstance(config.get("sae"), dict))


def holds_run_config(folder: Path) -> bool:
    """Whether ``folder`` holds a sae-shards run's ``config.json`` (``is_run_config``)."""
    try:
        return is_run_config(json_read.loads((folder / CONFIG).read_text()))
    except (OSError, ValueError):
        return False


def inside_run_folder(path: Path) -> tuple[Path, str] | None:
    """``(run_dir, name)`` when ``path`` is, or lies inside, what a run writes (``OWNED``: its
    ``checkpoints/``, ``resume/``, ``trl/``, ``final_model/``...) in a run directory above it;
    None otherwise. A run rewrites, prunes (``runner.keep_checkpoints``, a resume from an
    earlier step) and removes (``overwrite=true``) those folders with whatever a user put in
    them, so nothing of the user's is saved there."""
    for seen in dict.fromkeys((Path(os.path.abspath(path)), Path(path).resolve())):  # as given,
        for folder in (seen, *seen.parents):  # and through links (checkpoints/ on another disk)
            if folder.name in OWNED and holds_run_config(folder.parent):
                return folder.parent, folder.name
    return None


def foreign_files(run_dir: Path) -> list[str]:
    """What in ``run_dir`` no sae-shards run wrote, under names a run writes or removes: the
    files of a model (or adapter) directory at its top (``MODEL_FILES``), a ``config.json``
    that is not a run's (a model's: ``model_type`` / ``architectures``; another tool's or the
    user's: not ``is_run_config``), and, in a directory without a ``config.json``, entries of
    ``checkpoints/`` that are not a run's step or final checkpoints (another trainer's
    ``checkpoint-500/``)."""
    if not run_dir.is_dir():
        return []
    found = [name for name in MODEL_FILES if (run_dir / name).exists()]
    path = run_dir / CONFIG
    has_config = path.exists() or path.is_symlink()
    if has_config:
        try:
            config = json_read.loads(path.read_text())
        except ValueError:
            found.insert(0, f"a {CONFIG} that is not JSON")
        except OSError:  # unreadable (another user's run): the permission check says so
            pass
        else:
            if isinstance(config, dict) and ("model_type" in config
                                             or "architectures" in config):
                found.insert(0, f"{CONFIG} of a model (model_type {config.get('model_type')!r})")
            elif not is_run_config(config):
                found.insert(0, f"a {CONFIG} that is not a sae-shards run's (no capture and sae "
                                "settings)")
    checkpoints = run_dir / CHECKPOINTS
    # judged only without a config.json: beside a run's, another entry there is the user's own
    # (a ShardSet saved beside the steps) in a run all the same
    if not has_config and checkpoints.is_dir() and not checkpoints.is_symlink():
        others = sorted(p.name for p in checkpoints.iterdir() if not (
            p.name == "final" or step_of(p.name) is not None or _is_leftover(p)))
        if others:
            found.append(f"{CHECKPOINTS}/ with {', '.join(others[:3])}"
                         + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                         + " (not a run's step or final checkpoint)")
    if not has_config:
        late = [name + ("/" if (run_dir / name).is_dir() else "") for name in _AFTER_CONFIG
                if _has_content(run_dir / name)
                and not (name == FINAL_MODEL and _shares_final_model(run_dir))]
        if late:
            found.append(f"{', '.join(late)} without a {CONFIG}: a run writes its {CONFIG} "
                         "first, so these are another tool's files, or a copy of a run that "
                         f"lost its {CONFIG} (copy it again from the run)")
    return found


def _shares_final_model(folder: Path) -> bool:
    """Whether ``folder`` is the planted benchmark's directory of one RL run captured several
    ways (``planted.benchmark.run_planted``): no ``config.json`` of its own, its policy in
    ``final_model/``, which each capture's run directory links to."""
    link = Path("..") / FINAL_MODEL
    try:
        return any((sub / FINAL_MODEL).is_symlink()
                   and Path(os.readlink(sub / FINAL_MODEL)) == link and holds_run_config(sub)
                   for sub in folder.iterdir() if sub.is_dir())
    except OSError:
        return False


def check_not_foreign(run_dir: Path) -> None:
    """Raise ``FileExistsError`` when ``run_dir`` holds what no run wrote under the names a run
    writes (``foreign_files``): a run never writes into, or with ``overwrite`` or
    ``resume="auto"`` removes, a ``config.json`` or ``checkpoints/`` it did not write."""
    foreign = foreign_files(run_dir)
    if foreign:
        raise FileExistsError(
            f"run_dir={run_dir} holds a model or another tool's files ({'; '.join(foreign)}), "
            "not a sae-shards run: writing the run there would replace or remove them. Give "
            "the run a directory of its own, e.g. run_dir=runs/my_run")


SWEEP = "multirun.yaml"
"""What Hydra writes at the top of a sweep's ``run_dir`` (its jobs in subdirectories)."""


def check_not_sweep(run_dir: Path) -> None:
    """Raise ``FileExistsError`` when ``run_dir`` is a sweep's directory (``SWEEP``): a single
    run written there would mix with the sweep's files, and a resume of the sweep would then
    find a run where its jobs go."""
    if (Path(run_dir) / SWEEP).is_file():
        raise FileExistsError(
            f"run_dir={run_dir} holds a sweep ({SWEEP}; its jobs are its subdirectories), not "
            "a single run: give the run a directory of its own, or name one job's directory, "
            f"quoted (\"run_dir='{run_dir}/<job>'\"), to continue that job")


def check_not_in_run_folder(run_dir: Path) -> None:
    """Raise ``FileExistsError`` when ``run_dir`` lies inside one of another run's own folders
    (``inside_run_folder``: its ``checkpoints/``, ``trl/``, ``final_model/``...), which that run
    prunes, and removes whole under ``overwrite=true``, with this run in them (audit 151 F7)."""
    inside = inside_run_folder(run_dir)
    if inside is not None:
        other, name = inside
        raise FileExistsError(
            f"run_dir={run_dir} lies inside {other / name}, a folder of the run in {other}, "
            "which that run rewrites, prunes and removes (overwrite=true) with whatever is in "
            "it: give this run a directory outside it")


def has_resume_state(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds resumable checkpoints (``resume/`` is not empty)."""
    return _has_content(run_dir / RESUME)


def remove_derived(run_dir: Path, ending: bool = False, level: int = logging.INFO) -> None:
    """Remove ``DERIVED`` files, and with ``ending`` the ``ENDING`` ones: a run that continues
    (resumed, or reaching its end after a report was written mid-run) would otherwise leave
    files describing an earlier state beside its newer checkpoints. Each is logged at
    ``level`` (a script configures no logging: WARNING is shown there)."""
    for name in (*DERIVED, *(ENDING if ending else ())):
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            log.log(level, "%s: removed (it described an earlier state of the run)",
                    run_dir / name)


def finished_steps(run_dir: Path) -> int | None:
    """The RL steps of the run in ``run_dir`` when it finished (its ``summary.json`` says it
    was not interrupted), else None (no run, a running, killed or interrupted one)."""
    summary = read_summary(run_dir)
    return None if summary.get("interrupted", True) else summary.get("rl_steps")


OPEN_MAPS = ("task.options", "rl.extra")
"""Config fields holding free-form mappings: compared whole (a key added is a change)."""

WHOLE_MAPS = (*OPEN_MAPS, "rl.lr_scheduler_kwargs", "rl.generation_kwargs",
              "rl.chat_template_kwargs")
"""The mappings a resume compares whole: ``OPEN_MAPS`` and a script's trainer settings that are
mappings (audit 140: ``lr_scheduler_kwargs`` added on resume was a key on one side only, and
went unchecked)."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (``WHOLE_MAPS``, empty dicts and other values are
    leaves)."""
    if not isinstance(d, dict) or not d or prefix.rstrip(".") in WHOLE_MAPS:
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_differences(saved: dict[str, Any], now: dict[str, Any],
                       free: tuple[str, ...] = RESUME_FREE) -> list[str]:
    """The settings (dotted names) in both ``saved`` (a run's ``config.json``) and ``now`` whose
    values differ, outside ``free`` (names or their prefixes), each as ``"name: X in the run, Y
    now"``. Values are compared as JSON (tuples as lists, NaN as null)."""
    a, b = _flat(saved), _flat(now)
    norm = lambda v: json.dumps(strict_json(v), sort_keys=True)  # noqa: E731
    skip = lambda k: any(k == f or k.startswith(f + ".") for f in free)  # noqa: E731
    return [f"{k}: {a[k]!r} in the run, {b[k]!r} now" for k in sorted(a.keys() & b.keys())
            if not skip(k) and norm(a[k]) != norm(b[k])]


def check_resume_config(run_dir: Path, now: dict[str, Any], how: str) -> None:
    """A resumed run keeps the settings it started with: raise ``ValueError`` naming every
    setting of ``now`` that differs from ``run_dir/config.json`` (``how``: what to do instead).
    A missing or torn ``config.json`` is not checked when the run saved no step yet (killed
    during its first write); after that it is a ``ValueError``: a copy that lost it would take
    any settings as its own."""
    try:
        saved = json_read.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        if saved_steps(run_dir / RESUME) or saved_steps(run_dir / CHECKPOINTS):
            raise ValueError(
                f"{run_dir / CONFIG} is missing or damaged, so the resume's settings cannot be "
                "checked against the ones the run started with; copy config.json again from "
                "the run")
        return
    diffs = config_differences(saved, now)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ValueError(f"resuming {run_dir} with other settings than it started with would mix "
                         f"them in one run ({run_dir / CONFIG}): {shown}. {how}")


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.json``, leniently: ``{}`` when it is missing, unreadable or not an
    object (for hints and checks that step aside; loading a run reads it strictly)."""
    return _read_object(Path(run_dir) / CONFIG)


def inside_name(run_dir: Path, path: Path | None) -> str | None:
    """``path`` as ``summary.json`` records it: relative to ``run_dir`` when inside it (so a
    moved or copied run still names its own file), else whole; None stays None."""
    if path is None:
        return None
    try:
        return Path(path).relative_to(run_dir).as_posix()
    except ValueError:
        return str(path)


def run_seed(run_dir: Path) -> int:
    """The run's own seed (``config.json``), 0 when it records none."""
    seed = read_config(run_dir).get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json``, leniently: ``{}`` when the run wrote none yet (killed, or
    still running) or it is unreadable."""
    return _read_object(Path(run_dir) / SUMMARY)


def _read_object(path: Path) -> dict[str, Any]:
    try:
        value = json_read.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def section(config: dict[str, Any], key: str) -> dict[str, Any]:
    """``config[key]`` when it is an object, else ``{}`` (``task`` is null for a user's script)."""
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def write_text(path: Path, text: str) -> None:
    """``text`` written beside ``path`` and renamed into place: a kill leaves the old file or
    the new one, never a torn one. The temporary file's name says which process wrote it
    (``_temp_prefix``), so the next write of ``path`` removes what a killed one left
    (``_remove_dead_temps``): a ``kill -9`` of ``analyze`` left ``.report.html.tmpXXXX`` beside
    the report until a ``train`` took the run directory."""
    with writing(path):  # a name of its own: two writers never rename each other's half
        _remove_dead_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(fd, 0o666 & ~process_umask())  # as readable as a plain write makes it
                f.write(text)
            os.replace(tmp, path)
        except BaseException:  # a full disk: its half is not left taking the space
            Path(tmp).unlink(missing_ok=True)
            raise


def _temp_prefix(path: Path) -> str:
    """``.NAME.tmp-HOST-PID-``: ``write_text``'s temporary name for ``path`` (a leftover all the
    same: ``_is_leftover``)."""
    return f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


_TEMP_OWNER = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-[^-]*$")


def _remove_dead_temps(path: Path) -> None:
    """Remove ``write_text``'s temporary files of ``path`` whose writer, a process of this host,
    is gone (killed while writing); a live writer's, another host's (a shared filesystem: its
    processes cannot be asked) and one of an unknown writer are left alone."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        owner = _TEMP_OWNER.search(tmp.name)
        if owner and owner["host"] == host and not _alive(int(owner["pid"])):
            with contextlib.suppress(OSError):  # best effort: never what fails the write
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True


def write_json(path: Path, value: Any) -> None:
    """Strict JSON, written atomically (``write_text``)."""
    write_text(path, json.dumps(strict_json(value), indent=2, allow_nan=False))


def row_digest(row: dict[str, Any]) -> str:
    """A short digest of a log row as parsed (keys sorted, NaN as null): the same for the row
    written again in another layout, another for another run's row."""
    text = json.dumps(strict_json(row), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class JsonLines:
    """An append-only JSON-lines log (one flushed line per record)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()
        self._rows: int | None = None  # counted from the file when first asked (``rows``)
        self._last: str | None = None  # the last line appended by this process

    def last_digest(self) -> str | None:
        """``row_digest`` of the log's last row (None when it has none): a resume checks that
        its copy of the log holds this row where the run had it (``resume._check_logs``)."""
        if self._last is not None:
            return row_digest(json_read.loads(self._last))
        last = None
        for _, _, row in iter_jsonl(self.path):
            last = row
        return None if last is None else row_digest(last)

    def append(self, row: dict[str, Any]) -> None:
        try:  # the C encoder at once; the (slower) NaN scrub only when a value needs it
            line = json.dumps(row, allow_nan=False)
        except ValueError:
            line = json.dumps(strict_json(row), allow_nan=False)
        with writing(self.path), self.path.open("a") as f:
            f.write(line + "\n")
        self._last = line
        if self._rows is not None:
            self._rows += 1

    def rows(self) -> int:
        """How many rows the log holds: read from the file once (after a resume cut it back),
        then counted as they are appended."""
        if self._rows is None:
            self._rows = sum(1 for _ in iter_jsonl(self.path))
        return self._rows


def iter_jsonl(path: Path) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """``(offset, line, row)`` for each row of a JSON-lines log, read one line at a time (a log
    of any size in constant memory): the byte offset and raw bytes of its line, and the parsed
    row. A torn last line (a kill mid-write, even one cut inside a UTF-8 character) is dropped
    with a warning; any other bad line is a ``CheckpointError`` naming the file and line."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; is this a sae-shards run directory?")
    with path.open("rb") as f:
        offset, n, line = 0, 1, f.readline()
        while line:
            after = f.readline()
            try:
                row = json_read.loads(line)
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError: not UTF-8 text
                if not after:
                    log.warning("%s: dropping a torn last line (the run was killed mid-write)",
                                path)
                    return
                what = ("not UTF-8 text" if isinstance(e, UnicodeDecodeError)
                        else "not valid JSON")
                raise CheckpointError(f"{path}:{n}: {what} ({e}); the log was edited or "
                                      "damaged: copy it again from the run") from e
            if not isinstance(row, dict):
                raise CheckpointError(
                    f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield offset, line, row
            offset, n, line = offset + len(line), n + 1, after


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log (``iter_jsonl``: a torn last line is dropped, any other bad
    line is a ``CheckpointError``)."""
    return [row for _, _, row in iter_jsonl(path)]


def truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``path`` (atomically, one line at a time) with only the rows ``keep`` accepts,
    each line as it was written; a torn last line is dropped."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            with tmp.open("wb") as out:
                for _, line, row in iter_jsonl(path) if path.is_file() else ():
                    if keep(row):
                        out.write(line if line.endswith(b"\n") else line + b"\n")
            os.replace(tmp, path)
        except BaseException:  # a full disk: its half is not left taking the space
            tmp.unlink(missing_ok=True)
            raise


STEP_PREFIX = "step_"


def step_name(step: int) -> str:
    """``step_XXXXXX``: the name of RL step ``step``'s checkpoint (and resume file's stem)."""
    return f"{STEP_PREFIX}{step:06d}"


def step_of(checkpoint: str) -> int | None:
    """The RL step of checkpoint name ``step_XXXXXX``; None for ``final`` or another name."""
    m = re.fullmatch(r"step_(\d{6})", checkpoint)
    return int(m.group(1)) if m else None


def resume_file(run_dir: Path, step: int) -> Path:
    """``resume/step_XXXXXX.safetensors``: the SAE side of RL step ``step``'s checkpoint."""
    return Path(run_dir) / RESUME / f"{step_name(step)}.safetensors"


def saved_steps(folder: Path) -> list[int]:
    """RL steps of the ``step_XXXXXX`` entries (directories or ``.safetensors`` files) in
    ``folder``, ascending; none if it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir()
                  if (m := re.fullmatch(r"step_(\d{6})(\.safetensors)?", p.name)))


def _nearby_runs(missing: Path) -> str:
    """What "no such run directory" adds: the run directories beside ``missing`` whose names
    are closest to its name (a typo), or all of them when few; "" when there are none."""
    parent = missing.parent
    try:
        runs = sorted(p.name for p in parent.iterdir()  # a model's config.json is no run's
                      if p.is_dir() and ((p / CHECKPOINTS).is_dir() or holds_run_config(p)))
    except OSError:  # no parent, or not readable: nothing to offer
        return ""
    offered = difflib.get_close_matches(missing.name, runs, n=3) or (runs if len(runs) <= 5 else [])
    if not offered:
        return ""
    return (f"; run directories in {parent}: "
            + ", ".join(str(parent / name) for name in offered))


def latest_checkpoint(run_dir: Path) -> str:
    """``final`` when the run finished, else its newest ``step_XXXXXX`` (an interrupted run, or
    one killed while it wrote its end: ``final/`` without the activations written after it,
    which only a step checkpoint's resume file can stand in for). Without activations (killed,
    or still running) the newest step that has a resume file and TRL's finished checkpoint
    (``trainer_state.json`` parses), the step a resume continues from, else the newest with a
    resume file: a script's shards-only checkpoints after it have no buffer to re-encode nor
    TRL policy to pair with, and a kill between sae-shards' side of a step and TRL's leaves a
    step the resume removes (``ShardSet.from_run`` reads them when named)."""
    folder = run_dir / CHECKPOINTS
    if run_dir.is_file():
        above = next((p for p in run_dir.parents
                      if (p / CHECKPOINTS).is_dir() or holds_run_config(p)), None)
        hint = f" (the run directory {above}?)" if above is not None else ""
        raise CheckpointError(f"{run_dir}: a file, not a run directory; give the run's "
                              f"directory{hint}")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory{_nearby_runs(run_dir)}")
    steps = [s for s in saved_steps(folder) if (folder / step_name(s)).is_dir()]
    if (folder / "final").is_dir() and ((run_dir / ACTIVATIONS).is_file() or not steps):
        return "final"
    jobs = sorted(p.name for p in run_dir.iterdir() if (p / CHECKPOINTS).is_dir())
    if not steps and jobs:
        what = "a sweep's directory" if (run_dir / SWEEP).is_file() else "a directory of runs"
        raise CheckpointError(f"{run_dir} is {what}, not a run: it holds the runs "
                              f"{jobs}; analyze one of them (e.g. {run_dir / jobs[0]})")
    if not steps and (run_dir / SAE_FILE).is_file():
        run = (f", or give its run ({run_dir.parent.parent})"
               if run_dir.parent.name == CHECKPOINTS else "")  # not a ShardSet.save elsewhere
        raise CheckpointError(f"{run_dir} is a checkpoint directory, not a run: load it with "
                              f"ShardSet.load({str(run_dir)!r}){run}")
    if not steps:
        raise CheckpointError(f"{folder}: no checkpoint (neither final/ nor step_XXXXXX/); is "
                              f"{run_dir} a sae-shards run directory, and did it reach its first "
                              "checkpoint?")
    if not (run_dir / ACTIVATIONS).is_file():
        readable = [step for step in steps if resume_file(run_dir, step).is_file()]
        # of those, the ones TRL finished too: where a resume continues, with a policy to pair
        # (a kill between sae-shards' side and TRL's leaves a newer step a resume removes)
        paired = [step for step in readable
                  if any(trl_finished(root, step) for root in trl_roots(run_dir))]
        steps = paired or readable or steps
    return step_name(steps[-1])


def trl_checkpoint_steps(output_dir: str | None) -> list[int]:
    """The steps of the ``checkpoint-N`` directories in a trainer's ``output_dir``, ascending."""
    if not output_dir or not Path(output_dir).is_dir():
        return []
    return sorted(int(p.name.removeprefix("checkpoint-")) for p in Path(output_dir).iterdir()
                  if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir())


def trl_finished(trl_dir: Path, step: int) -> bool:
    """TRL finished its checkpoint of ``step`` in ``trl_dir``: ``trainer_state.json``, which it
    writes last and not atomically, parses to an object."""
    try:
        state = json_read.loads((trl_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    except (OSError, ValueError):  # missing, or torn by a kill
        return False
    return isinstance(state, dict)


def trl_roots(run_dir: Path) -> list[Path]:
    """Where the run's TRL checkpoints may be: ``run_dir/trl`` (``sae-shards train``'s), and
    ``config.json``'s ``rl.output_dir`` (a script's trainer) when it records one."""
    out = section(read_config(run_dir), "rl").get("output_dir")
    return [run_dir / TRL_OUTPUT, *([Path(out)] if isinstance(out, str) and out else [])]


def save_activations(path: Path, tensors: dict[str, torch.Tensor], input_scale: float,
                     checkpoint: str | None = None) -> None:
    """``online.*`` / ``final.*`` activation logs (``capture.runner.ActivationLog.tensors``);
    ``checkpoint``: the name of the checkpoint whose SAE encoded ``final.*`` (``final``, or the
    ``step_XXXXXX`` a stopped run ended on), kept in the header so a reader can tell."""
    with writing(path):
        save_file_atomic({**tensors, "input_scale": torch.tensor(float(input_scale))}, path,
                         "sae-shards-activations",
                         {"checkpoint": checkpoint} if checkpoint else None)


def save_samples(path: Path, samples: dict[str, torch.Tensor], rl_steps: list[int],
                 heldout: list[bool], task_labels: list[list[str]]) -> None:
    """Every buffered sample (fp32, oldest first) with its RL step, held-out flag and labels.

    Tensors: ``sample.<target>`` [S, *shape], ``rl_step`` [S], ``heldout`` [S]; the header
    metadata holds ``task_labels`` (JSON list of each sample's labels).
    """
    tensors = {f"sample.{name}": t for name, t in samples.items()}
    tensors["rl_step"] = torch.tensor(rl_steps, dtype=torch.long)
    tensors["heldout"] = torch.tensor(heldout, dtype=torch.bool)
    with writing(path):
        save_file_atomic(tensors, path, "sae-shards-samples",
                         {"task_labels": json.dumps(task_labels)})
