"""The ``sae-shards`` command: ``train [hydra overrides]``, ``analyze RUN_DIR``, ``evaluate RUN_DIR``.

Hydra composes ``configs/`` (next to this package in a source checkout, or ``--config-dir``),
then the config becomes a validated :class:`~sae_shards.run.config.JobConfig` once, here. A bad
value ends the command with ``sae-shards: config error: <field, value, fix>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # imported lazily at run time: `sae-shards --help` stays fast
    from sae_shards.run.config import JobConfig


def config_dir() -> Path:
    """Hydra's primary config directory: ``sae_shards/configs`` inside an installed wheel
    (``pip install .``), else the repo's top-level ``configs/`` (editable install / source checkout)."""
    here = Path(__file__).resolve().parent
    candidates = (here / "configs", here.parent / "configs")
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "sae-shards: no Hydra configs found (looked for config.yaml in "
        + " and ".join(str(c) for c in candidates)
        + "); reinstall the package: `pip install .` ships them inside the wheel")


CONFIG_DIR = config_dir()

USAGE = """usage: sae-shards <command> [args]

commands:
  train [overrides] [-m]   run RL + delta capture + concurrent SAE (Hydra overrides, e.g. sae.k=8)
  analyze RUN_DIR [--out FILE] [--shards N | I,J,...] [--no-dose] [--checkpoint NAME] [--threads N]
                  [--task FILE.py:NAME] [--n-prompts N] [--initial-model DIR]
                  [--trust-remote-code]
                           write an HTML report of a run (default RUN_DIR/report.html)
  evaluate RUN_DIR [--null-run DIR] [--no-steering] [...]
                           score the shards against sign-free task ground truth (multiskill runs
                           with runner.save_samples=true runner.heldout_every=k):
                           evaluation.json/.md
                           (`sae-shards evaluate --help` lists every option)
  compare A B [--checkpoint-a NAME] [--checkpoint-b NAME] [--threshold T] [--min-density D]
              [--top N] [--out FILE.json]
                           match each shard of A (a run or checkpoint directory) to its nearest
                           in B, against a chance control: do two runs find the same shards?
  --version                the versions of sae-shards, Python and the libraries a run records

Examples:
  sae-shards train                              the built-in default (tiny model, CPU, ~1 min)
  sae-shards train rl.max_steps=50 run_dir=runs/short
  sae-shards train -m sae.k=2,4 run_dir=runs/k_sweep
  sae-shards analyze runs/default
  sae-shards compare runs/seed1 runs/seed2
"""


class ConfigError(ValueError):
    """The composed configuration is invalid (message names the field, the value and a fix)."""


def job_config_from_hydra(cfg) -> JobConfig:
    """Hydra's DictConfig -> validated JobConfig, its task options and TRL settings checked
    too (``run.job.check_recipe``; raises ConfigError). A mandatory value left unset (``???``,
    e.g. ``model=hf_path`` without ``model.path``) is an error."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from sae_shards.run.config import JobConfig

    from sae_shards.run.job import check_recipe

    try:
        job = JobConfig.from_dict(OmegaConf.to_container(cfg, resolve=True,
                                                         throw_on_missing=True))
        check_recipe(job)  # task.options and rl.extra: before a sweep or a run writes anything
        return job
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or "a field"
        raise ConfigError(f"{key} has no value (it is ???); set it, e.g. {key}=...") from e
    except (ValueError, FileNotFoundError) as e:  # ours (a model.path that is no directory)
        raise ConfigError(str(e)) from e
    except Exception as e:  # OmegaConf interpolation errors
        raise ConfigError(f"{type(e).__name__}: {e}") from e


def check_overrides(args: list[str]) -> None:
    """Reject an override naming no config field before Hydra sees it, with the closest field
    (Hydra's own error would only suggest appending it with ``+``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sae_shards.run.config import JobConfig, check_steps_or_budget
    from sae_shards.run.schema import unknown_key_error

    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    try:
        overrides = OverridesParser.create().parse_overrides(_override_args(args))
    except Exception as e:  # Hydra's grammar errors say what is wrong with the override
        raise ConfigError(f"{e}\n(a value holding '=', ',', spaces or non-ASCII letters, such "
                          "as a sweep job's directory, is quoted: "
                          "\"run_dir='runs/sweep/sae.k=2'\")") from e
    for o in overrides:
        key = o.key_or_group
        if key == "run_dir" and not o.is_delete() and o.value() is None:  # Hydra's dir is it
            raise ConfigError("run_dir=null: give the run a directory of its own, e.g. "
                              "run_dir=runs/my_run")
        if key == "hydra.job.chdir" and not o.is_delete() and str(o.value()).lower() != "false":
            raise ConfigError(f"hydra.job.chdir={o.value()}: sae-shards writes the run into "
                              "run_dir itself and reads relative paths (model.path) from the "
                              "directory it is started in; remove the override")
        if (key in groups and not o.is_delete() and not o.is_sweep_override()
                and o.value() is not None and not isinstance(o.value(), list)):
            options = sorted(p.stem for p in (CONFIG_DIR / key).glob("*.yaml"))
            if str(o.value()) not in options:
                raise ConfigError(f"{key}={o.value()} is not one of the {key} configs: "
                                  f"{', '.join(options)} (configs/{key}/)")
        if key.startswith("hydra/"):  # Hydra's own config groups
            raise ConfigError(
                f"{o.input_line}: sae-shards runs a sweep's jobs one after another in its own "
                "process (Hydra's basic launcher and sweeper), so that it can check every job "
                "first and report each job's outcome at the end, and writes each run's cli.log "
                "with its own logging; Hydra's launcher, sweeper and logging groups cannot be "
                "changed (hydra.* settings such as hydra.sweep.subdir can)")
        if key.startswith("hydra.") or key == "hydra" or key in groups or o.is_delete():
            continue
        problem = unknown_key_error(key, JobConfig)
        if problem:
            raise ConfigError(problem)
    _check_tiny_fields_with_a_path(overrides)
    runner = {o.key_or_group.removeprefix("runner."): o.value() for o in overrides
              if o.key_or_group.startswith("runner.") and not o.is_delete()
              and not o.is_sweep_override()}
    try:
        check_steps_or_budget(runner, " on the command line")
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _refuse_other_primary_config(args: list[str]) -> None:
    """``--config-path`` / ``--config-name`` replace ``configs/config.yaml``, whose ``hydra``
    block makes ``run_dir`` the run's directory: a run's saved ``.hydra/config.yaml`` composed
    so ran into Hydra's ``outputs/<date>/<time>/``, ``run_dir=`` ignored. Refused, saying what
    does the same."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in ("--config-path", "-cp", "--config-name", "-cn"):
            continue
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        if flag in ("--config-name", "-cn") and value == "config":  # the default, named
            continue
        raise ConfigError(
            f"{flag} {value}: sae-shards train composes its own configs/config.yaml, which makes "
            "run_dir the run's directory (a run's saved .hydra/config.yaml would run into "
            "Hydra's outputs/ instead); to run a run's settings again, give the overrides in "
            "RUN/.hydra/overrides.yaml with a new run_dir")


def _check_tiny_fields_with_a_path(overrides: list) -> None:
    """``model=hf_path`` with a field that shapes the tiny model (``model.hidden_size=32``):
    ``configs/model/hf_path.yaml`` does not hold it, so Hydra would refuse it advising
    ``+model.hidden_size=32``, which is then refused for what it is. Say that at once."""
    from sae_shards.run.config import TINY_ONLY

    given = {o.key_or_group: o for o in overrides if not o.is_delete()}
    group = given.get("model")
    if group is None or group.is_sweep_override() or str(group.value()) != "hf_path":
        return
    tiny = [key for key in given if key in {f"model.{name}" for name in TINY_ONLY}]
    if tiny:
        raise ConfigError(f"{', '.join(tiny)}: these shape the built-in tiny model only "
                          "(model=tiny), and model=hf_path uses model.path as saved; drop them")


_SHOW_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help"}
"""Hydra's flags that show something instead of running (no ``-m`` with them)."""

_VALUED_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                 "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}
"""Hydra's flags that take the next argument as their value (``--cfg job``)."""


def _is_override(args: list[str]) -> list[bool]:
    """For each of ``sae-shards train``'s arguments, whether it is an override (not one of
    Hydra's flags or a flag's value)."""
    out, skip = [], False
    for arg in args:
        out.append(not skip and not arg.startswith("-"))
        skip = not skip and arg.startswith("-") and arg in _VALUED_FLAGS
    return out


JOB_DIRNAME_MAX = 200
"""The longest sweep job directory name, in bytes (filesystems allow 255)."""


def job_dirname(override_dirname: str) -> str:
    """A sweep job's directory name: Hydra's ``override_dirname`` without the ``+`` / ``++``
    prefixes (``open_map_args`` adds ``++``; a user's ``+key`` names the same setting), so
    ``rl.extra.x=1`` and ``++rl.extra.x=1`` name one job; a ``/`` in a value (a swept
    ``model.path``) written ``%2F``, so each job is one directory named by the whole path; cut
    to ``JOB_DIRNAME_MAX`` bytes with a hash of the whole name when longer (``bounded``)."""
    from sae_shards.run.tracking import bounded

    name = re.sub(r"(^|,)\+{1,2}", r"\1", override_dirname).replace("/", "%2F")
    return bounded(name, JOB_DIRNAME_MAX)


def register_resolvers() -> None:
    """The OmegaConf resolvers ``configs/config.yaml`` uses (``sae_shards_job_dirname``)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sae_shards_job_dirname"):
        OmegaConf.register_new_resolver("sae_shards_job_dirname", job_dirname)


def _override_args(args: list[str]) -> list[str]:
    """The overrides among ``sae-shards train``'s arguments (Hydra's flags and their values
    left out)."""
    return [arg for arg, is_override in zip(args, _is_override(args)) if is_override]


def open_map_args(args: list[str]) -> list[str]:
    """``args`` with each plain override of a key below a free-form mapping (``task.options.x=1``,
    ``rl.extra.x=1``: ``rundir.OPEN_MAPS``) passed as ``++key=...`` (add or override): those
    mappings start empty or partial, so Hydra alone would refuse a key they do not hold yet and
    ask for ``+``. Flags, their values and other overrides are returned unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sae_shards.run.rundir import OPEN_MAPS

    parse = OverridesParser.create().parse_override
    out = []
    for arg, is_override in zip(args, _is_override(args)):
        o = parse(arg) if is_override else None
        under_map = o is not None and any(o.key_or_group.startswith(m + ".") for m in OPEN_MAPS)
        plain = under_map and not (o.is_add() or o.is_force_add() or o.is_delete())
        out.append("++" + arg if plain else arg)
    return out


_RUN_KEYS = ("run_dir", "resume", "overwrite")
"""Overrides that name the run rather than configure it: never carried over on resume."""


def saved_overrides(run_dir: str | Path) -> list[tuple[str, Any]] | None:
    """The overrides a run started with (``RUN_DIR/.hydra/overrides.yaml``), each as its text
    and Hydra's parse of it; None when the run has none (started from a script, or killed before
    its ``.hydra/`` was written). An unreadable file is a ``ConfigError`` naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(str(run_dir)) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        texts = [str(x) for x in OmegaConf.to_container(OmegaConf.load(path))]
        return list(zip(texts, OverridesParser.create().parse_overrides(texts)))
    except Exception as e:  # YAML or override grammar errors: say which file
        raise ConfigError(f"{path}: cannot read the run's overrides ({e})") from e


_PLAIN_WORD = re.compile(r"[A-Za-z0-9_/.+:@%-]+")
"""Characters that neither the shell nor Hydra's override grammar reads specially: a value made
of them alone needs no quotes (Hydra refuses ``~ # & ; ! < > ^`` and any non-ASCII letter
unquoted; the shell globs ``? *`` and pipes ``|``)."""


def _quoted_run_dir(run_dir: str | Path) -> str:
    """``run_dir=...`` as one shell word Hydra parses back (a sweep job's directory holds ``=``
    and ``,``; a directory may hold spaces or non-ASCII letters: quoted for both)."""
    text = str(run_dir)
    if _PLAIN_WORD.fullmatch(text):
        return f"run_dir={text}"
    if "'" not in text and not any(c in text for c in '"$`\\!'):
        return f"\"run_dir='{text}'\""  # the shell's double quotes around Hydra's single ones
    if "\\" not in text:  # the shell's quoting around Hydra's, a quote in the name escaped
        return shlex.quote("run_dir='" + text.replace("'", "\\'") + "'")
    return shlex.quote(f"run_dir={text}")


def _how_to_continue(run_dir: Path, fix: str = "") -> str:
    """After a run stopped by a failure: what to run once ``fix`` is done (what the user must
    do first, e.g. free space after a failed write): resume from its newest complete checkpoint
    (``resume.latest_complete``, the one a resume takes), or, before its first one, start it
    again; when it wrote no result yet, the same command again."""
    from sae_shards.capture.resume import latest_complete
    from sae_shards.run import rundir

    then = f"{fix}, then " if fix else ""
    if run_dir.is_dir() and latest_complete(run_dir, quiet=True) is not None:
        return f"{then}resume from the last complete checkpoint with: {resume_command(run_dir)}"
    if run_dir.is_dir() and rundir.earlier_results(run_dir):
        again = rerun_command(run_dir) or f"sae-shards train ... run_dir={run_dir} overwrite=true"
        return ("it stopped before its first complete checkpoint (runner.checkpoint_every), so "
                f"nothing can be resumed: {then}start it again with: {again}")
    return f"no step of the run was trained: {then}run the same command again"


def train_command(run_dir: str | Path) -> str:
    """``sae-shards train``, under the launcher the run in ``run_dir`` recorded when it ran on
    several processes (``config.json``'s ``launch``): ``accelerate launch ... -m
    sae_shards.cli train``."""
    from sae_shards.run import rundir

    launch = rundir.read_config(Path(run_dir)).get("launch")
    return f"{launch} -m sae_shards.cli train" if launch else "sae-shards train"


def resume_command(run_dir: str | Path) -> str:
    """The command that continues the run in ``run_dir`` (its own overrides are reused)."""
    return f"{train_command(run_dir)} {_quoted_run_dir(run_dir)} resume=true"


def rerun_command(run_dir: str | Path) -> str | None:
    """The command that starts the run in ``run_dir`` again from scratch, with its own
    overrides; None when they are not known (or not readable)."""
    import shlex

    try:
        saved = saved_overrides(run_dir)
    except ConfigError:
        return None
    if saved is None:
        return None
    own = [shlex.quote(t) for t, o in saved if o.key_or_group not in _RUN_KEYS]
    group = _recorded_group(Path(run_dir))  # a sweep's job run again alone: in its group
    if group and not any(o.key_or_group == "logging.group" for _, o in saved):
        own.append(shlex.quote(f"logging.group={group}"))
    return " ".join([train_command(run_dir), *own, _quoted_run_dir(run_dir), "overwrite=true"])


def _resuming(args: list[str]) -> tuple[list[tuple[str, Any]], Path] | None:
    """``(the overrides given, each as its text and Hydra's parse; the run_dir)`` when ``args``
    resume one run (the last ``resume=`` is true; not a multirun sweep), else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if _is_sweep(args):
        return None
    parse = OverridesParser.create().parse_overrides
    now = list(zip(_override_args(args), parse(_override_args(args))))
    given = {o.key_or_group: o for _, o in now}  # the last of each key wins, as in Hydra
    run_dir = _run_dir_arg(given)
    if run_dir is None or not _resume_given(given):
        return None
    return now, run_dir


def _is_sweep(args: list[str]) -> bool:
    """Whether ``sae-shards train``'s arguments ask Hydra for a multirun sweep."""
    return bool({"-m", "--multirun"} & set(args))


MAX_CHECKED_JOBS = 256
"""A sweep of more jobs than this is not checked job by job before it starts (each job still
checks its own config when its turn comes)."""


def check_sweep_jobs(args: list[str]) -> None:
    """Compose and validate every job of a ``-m`` sweep before the first one runs, so a bad
    value in one sweep element is a config error now, not hours later when its turn comes
    (``ConfigError`` naming the job's overrides). Sweeps of more than ``MAX_CHECKED_JOBS`` jobs
    are left to each job."""
    import itertools

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import open_dict

    choices = []
    parsed = OverridesParser.create().parse_overrides(_override_args(args))
    # jobs named by a subdir of the user's own (hydra.sweep.subdir=${hydra.job.num}) are not
    # named by their overrides: Hydra's naming then keeps them apart, or it is the user's
    own_subdir = any(o.key_or_group == "hydra.sweep.subdir" for o in parsed)
    for o in parsed:
        if o.is_sweep_override():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    n_jobs = math.prod(len(c) for c in choices)
    if n_jobs > MAX_CHECKED_JOBS:
        print(f"sae-shards: a sweep of {n_jobs} jobs, more than {MAX_CHECKED_JOBS}: each job's "
              "config is checked when its turn comes, not all of them before the first",
              file=sys.stderr)
        return
    run_dirs: dict[str, str] = {}
    job_dirs: dict[str, list[str]] = {}  # each job's directory name: the jobs it would hold
    unnamed: list[str] = []  # the keys a job directory's name leaves out
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        for job in itertools.product(*choices):
            # the job's swept overrides as the user wrote them (open_map_args adds ++)
            swept = " ".join(re.sub(r"^\+{1,2}", "", o) for o, c in zip(job, choices)
                             if len(c) > 1)
            try:  # a ConfigError, or Hydra's own composition error
                composed = compose(config_name="config", overrides=list(job),
                                   return_hydra_config=True)
                naming = composed.hydra.job
                job_dirs.setdefault(job_dirname(naming.override_dirname), []).append(
                    swept or "the defaults")
                unnamed = unnamed or list(naming.config.override_dirname.exclude_keys)
                with open_dict(composed):
                    del composed["hydra"]
                cfg = job_config_from_hydra(composed)
            except Exception as e:
                hint = (" (run_dir=${hydra:...} has no value before a sweep's jobs exist: "
                        "Hydra resolves a sweep's directory once; each job already gets "
                        "run_dir/<its overrides>, so give run_dir a fixed directory, e.g. "
                        "run_dir=runs/my_sweep)") if "HydraConfig was not set" in str(e) else ""
                raise ConfigError(f"the sweep's job {swept}: {e}{hint} (no job was "
                                  "started)") from None
            run_dirs.setdefault(str(cfg.run_dir), swept or "the defaults")
    if len(run_dirs) > 1:
        raise ConfigError(
            "the sweep's run_dir differs between its jobs ("
            + ", ".join(f"{d} for {j}" for d, j in run_dirs.items())
            + "): Hydra writes the sweep's multirun.yaml to one directory and each job to "
            "run_dir/<its overrides>; give the sweep one fixed run_dir (e.g. "
            "run_dir=runs/my_sweep), not a swept or interpolated one (no job was started)")
    shared = [] if own_subdir else [jobs for jobs in job_dirs.values() if len(jobs) > 1]
    if shared:  # the later job would be refused, or with overwrite=true delete the earlier
        raise ConfigError(
            f"the sweep's jobs {' and '.join(shared[0][:2])} would write one directory: a "
            f"job's directory is named by its overrides except {', '.join(unnamed)}, which "
            "may change when a sweep is resumed; sweep those in separate sweeps, each with a "
            "run_dir of its own (no job was started)")
    if len(run_dirs) == 1:  # the directory as resolved (an interpolated run_dir too)
        _check_sweep_dir(Path(next(iter(run_dirs))), _resume_given(_given_overrides(args)))


def _given_overrides(args: list[str]) -> dict[str, Any]:
    """Hydra's parse of each override key among ``args`` (the last of each key wins, as in
    Hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group: o for o in
            OverridesParser.create().parse_overrides(_override_args(args))}


def _run_dir_arg(given: dict[str, Any]) -> Path | None:
    """The ``run_dir`` the overrides ``given`` name (``configs/config.yaml``'s without one);
    None when it is swept over."""
    if "run_dir" not in given:
        from omegaconf import OmegaConf

        return Path(str(OmegaConf.load(CONFIG_DIR / "config.yaml").run_dir))
    return None if given["run_dir"].is_sweep_override() else Path(str(given["run_dir"].value()))


def _new_run_dir(args: list[str]) -> Path | None:
    """For a single run (not a sweep) whose run directory does not exist yet (Hydra creates it
    before the config is checked): the outermost of the directories that will be created; else
    None."""
    run_dir = None if _is_sweep(args) else _run_dir_arg(_given_overrides(args))
    if run_dir is None or run_dir.exists():
        return None
    while not run_dir.parent.exists():  # the outermost directory Hydra will create
        run_dir = run_dir.parent
    return run_dir


def _check_run_dir_arg(args: list[str]) -> None:
    """Refuse, before Hydra writes its log or ``multirun.yaml`` there, a ``run_dir=`` that is a
    model's directory (``rundir.prepare_run_dir`` refuses it too, for scripts), a single run's
    ``run_dir`` that holds a sweep, and a sweep's ``run_dir`` that holds a run (its jobs would
    be written inside it)."""
    from sae_shards.run import rundir

    given = _given_overrides(args)
    run_dir = _run_dir_arg(given)  # a sweep's parent too
    if run_dir is None:
        return
    if "run_dir" in given:
        try:
            rundir.check_not_foreign(run_dir)
            if not _is_sweep(args):  # before Hydra writes a single run's log into a sweep
                rundir.check_not_sweep(run_dir)
        except FileExistsError as e:
            raise ConfigError(str(e)) from None
    if "${" not in str(run_dir):  # before Hydra creates it (its traceback names no fix)
        unwritable = rundir.unwritable(run_dir)
        if unwritable:
            raise ConfigError(f"run_dir={run_dir} cannot be written: {unwritable}; give a "
                              "run_dir where you can write (e.g. run_dir=runs/my_run), or fix "
                              "its permissions")
    if _is_sweep(args) and "${" not in str(run_dir):  # before Hydra writes multirun.yaml
        _check_sweep_dir(run_dir, _resume_given(given))  # interpolated: check_sweep_jobs


def _refused_unwritable(command: str, run_dir: Path, folders: list[Path], what: str,
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


def _resume_given(given: dict[str, Any]) -> bool:
    """Whether the overrides ``given`` (``_given_overrides``: the last of each key, as in
    Hydra) set ``resume=true``."""
    return "resume" in given and given["resume"].value() in (True, "true", "True")


def _check_sweep_dir(run_dir: Path, resume: bool) -> None:
    """A sweep's ``run_dir`` may not hold a run (its jobs would be written inside it); a
    resumed sweep's must be a sweep's (else ``resume=true`` would quietly start a new one)."""
    from sae_shards.run import rundir

    inside = rundir.earlier_results(run_dir)
    if inside:
        raise ConfigError(
            f"run_dir={run_dir} holds a run ({', '.join(inside)}), and a sweep (-m) writes "
            "its jobs into subdirectories of run_dir; give the sweep a directory of its "
            "own, e.g. run_dir=runs/my_sweep")
    if resume and not (run_dir / rundir.SWEEP).is_file():
        raise ConfigError(
            f"resume=true but run_dir={run_dir} holds no sweep ({rundir.SWEEP}); give the "
            "directory of the sweep to continue, or start a new sweep without resume=true")


def _drop_file_handlers(directory: Path) -> None:
    """Close and remove the root logger's file handlers writing under ``directory`` (Hydra's
    ``cli.log`` of a refused run, opened on its first record): once the directory is removed,
    a later record in this process (``main`` called again, from Python) would fail to open it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        name = getattr(handler, "baseFilename", None)
        if name is not None and Path(name).is_relative_to(directory.resolve()):
            root.removeHandler(handler)
            handler.close()


def _main_process() -> bool:
    """Whether this process speaks for a multi-process launch (rank 0; any lone process)."""
    from sae_shards.capture.distributed import is_main

    return is_main()


def _warn_unused_lora(overrides: Sequence[str], enabled: bool) -> None:
    """Warn when ``model.lora.*`` settings were given on the command line while LoRA is off: no
    adapter uses them, and the run trains the full weights (a preset's own values, such as
    ``model=tiny_lora model.lora.enabled=false``'s rank, are not the user's)."""
    typed = [o.lstrip("+") for o in overrides if not o.startswith("~")]  # not a deletion
    unused = [o for o in typed if o.startswith(("model.lora.", "model.lora="))
              and not o.startswith("model.lora.enabled")]
    if unused and not enabled and _main_process():
        logging.getLogger("sae_shards.cli").warning(
            "%s given, but model.lora.enabled=false: no adapter is trained, RL changes the full "
            "weights; add model.lora.enabled=true to train one", ", ".join(unused))


def _rank() -> int:
    from sae_shards.capture.distributed import rank

    return rank()


class _RankLabel(logging.Formatter):
    """A handler's own format, each record labelled with the rank that logged it (``cli.log``
    is every rank's: Hydra gives each process a handler on it)."""

    def __init__(self, inner: logging.Formatter, rank: int) -> None:
        super().__init__()
        self.inner, self.label = inner, f"[rank {rank}] "

    def format(self, record: logging.LogRecord) -> str:
        return self.label + self.inner.format(record)


def _speak_as_rank() -> None:
    """On a rank other than 0 of a launch: sae-shards' own records below ERROR unsaid
    (``distributed.quiet_other_ranks``), the rest (errors, other libraries' warnings) labelled
    with the rank in every handler Hydra configured for this job."""
    from sae_shards.capture.distributed import quiet_other_ranks

    quiet_other_ranks()
    if _main_process():
        return
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, _RankLabel):
            handler.setFormatter(_RankLabel(handler.formatter or logging.Formatter(), _rank()))


def _check_process_count(run_dir: Path) -> None:
    """A resume on another number of processes than the run's is refused here, before Hydra
    writes into the run's ``.hydra/`` (the callback checks it again, for scripts)."""
    from sae_shards.capture.distributed import world_mismatch
    from sae_shards.run import rundir

    why = world_mismatch(run_dir, rundir.read_config(run_dir),
                         int(os.environ.get("WORLD_SIZE", "1")))
    if why:
        raise ConfigError(why)


def resume_args(args: list[str]) -> tuple[list[str], list[str]]:
    """``(with_saved_overrides(args), resume_changes(args))`` from one read of the run's
    ``.hydra/overrides.yaml`` (``sae-shards train`` needs both)."""
    resuming = _resuming(args)
    if resuming is None:
        return args, []
    now, run_dir = resuming
    if not run_dir.is_dir():  # said before Hydra creates the directory for its log
        raise ConfigError(f"resume=true but run_dir={run_dir} does not exist; give the directory "
                          "of the run to continue, or start a new run without resume=true")
    _check_process_count(run_dir)
    saved = saved_overrides(run_dir)
    if saved is None:
        return args, []
    replaced = {o.key_or_group for _, o in now if not o.is_delete()}  # ~key applies on top
    _refuse_saved_opt_ins(saved, {o.key_or_group for _, o in now}, run_dir)
    keep = [text for text, o in saved
            if o.key_or_group not in replaced and o.key_or_group not in _RUN_KEYS]
    added = {o.key_or_group for _, o in saved if o.is_add() or o.is_force_add()}
    plain = {text for text, o in now
             if o.key_or_group in added and not (o.is_add() or o.is_force_add() or o.is_delete())}
    own = [(o.key_or_group, o.is_delete(), o.value()) for _, o in saved]  # +, ++ or plain alike
    changes = [text for text, o in now
               if o.key_or_group not in _RUN_KEYS and not o.key_or_group.startswith("hydra.")
               and (o.key_or_group, o.is_delete(), o.value()) not in own]
    if keep and _main_process():
        print(f"sae-shards: resuming with the run's own overrides ({run_dir}/.hydra/"
              f"overrides.yaml): {' '.join(keep)}", file=sys.stderr)
    return [*keep, *("++" + a if a in plain else a for a in args)], changes


OPT_INS = ("model.trust_remote_code",)
"""Overrides a resume never takes from the run's ``.hydra/overrides.yaml``: each lets
sae-shards run code it otherwise never runs, so only the command line turns it on."""


def _refuse_saved_opt_ins(saved: list[tuple[str, Any]], given: set[str], run_dir: Path) -> None:
    """A ``ConfigError`` when the run's saved overrides turn on one of ``OPT_INS`` that the
    resume's own arguments (``given``: their keys) do not set again."""
    taken = [text for text, o in saved if o.key_or_group in OPT_INS and o.key_or_group not in given
             and not o.is_delete() and o.value() is True]
    if taken:
        raise ConfigError(
            f"{run_dir} started with {' '.join(taken)} ({run_dir}/.hydra/overrides.yaml), which "
            "runs model.path's own Python code; a resume never takes that from the run "
            f"directory: add {' '.join(taken)} to the command if you still trust that code")


def with_saved_overrides(args: list[str]) -> list[str]:
    """``resume=true`` continues a run with the settings it started with: the run's own
    overrides (``saved_overrides``) go before ``args``, except those ``args`` set again (the job
    then refuses any that changes a setting, naming it); a key the run added (``+key=...``)
    given again without ``+`` is passed as ``++key=...``. Other arguments, and multirun sweeps
    (each job's overrides are on the command line), are returned unchanged."""
    return resume_args(args)[0]


def resume_changes(args: list[str]) -> list[str]:
    """The overrides ``resume=true`` is given that are not among the run's own (``run_dir``,
    ``resume``, ``overwrite`` and ``hydra.*`` left out): each may change a setting the run
    started with. Empty when not resuming, in a multirun sweep, or when the run has no saved
    overrides (nothing was composed with them); a missing run_dir is a ``ConfigError``."""
    return resume_args(args)[1]


def _hydra_files(cfg) -> dict[str, str]:
    """What Hydra would write to ``.hydra/`` (written by the job once the run dir is accepted,
    so a refused run leaves the earlier run's files alone)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    return {"config.yaml": OmegaConf.to_yaml(cfg),
            "overrides.yaml": OmegaConf.to_yaml(list(hc.overrides.task))}


def _closing_lines(summary: dict, run_dir: Path) -> list[str]:
    """The end of a run: figures, the files written, and the next command."""
    fig = lambda k: _figure(summary, k)  # noqa: E731
    share = lambda k: "n/a" if summary.get(k) is None else f"{summary[k]:.0%}"  # noqa: E731
    lines = [f"run finished: {summary['rl_steps']} RL steps, {summary['sae_steps']} SAE steps, "
             f"{summary['wall_s']:.0f} s",
             f"  reward {fig('reward_first')} -> {fig('reward_last')} (mean over the first -> "
             f"last fifth of the RL steps)  |  fvu {fig('fvu_first')} -> {fig('fvu_last')} "
             "(first -> last tenth of the SAE steps)",
             f"  dead latents {share('dead_frac')}"
             + (" (the SAE saw fewer than sae.dead_after samples)"
                if summary.get("dead_frac") is None and summary.get("sae_steps") else "")
             + f"  |  never fired in training {share('never_fired_frac')}"]
    if summary.get("events") is not None:
        lines.append(_events_line(summary))
    if summary.get("warning"):
        lines.append(f"  warning: {summary['warning']}")
    if summary.get("interrupted"):
        lines[0] = lines[0].replace("run finished", "run interrupted")
        lines.append(f"  the run stopped early, checkpointed at {summary['final_checkpoint']}; "
                     f"continue it with: {resume_command(run_dir)}")
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir()
                   if not p.name.startswith("."))
    quoted = shlex.quote(str(run_dir))  # a directory with spaces: one word to paste
    lines += [f"  run directory {run_dir}: {', '.join(files)}",
              f"  next: sae-shards analyze {quoted}"]
    if "samples.safetensors" in files and _evaluable(run_dir):
        lines[-1] += f"  |  sae-shards evaluate {quoted} (shards against the tasks)"
    return lines


def _figure(summary: dict, key: str) -> str:
    """One of ``summary.json``'s figures as the closing lines show it (n/a when null)."""
    return "n/a" if summary.get(key) is None else f"{summary[key]:.3f}"


def _events_line(summary: dict) -> str:
    """A per-event run's closing line: how exactly its samples are the events' gradients (cut to
    ``capture.event_rank``?) and how they relate to the update applied (clipped steps?)."""
    cut = summary.get("truncated_events") or 0
    parts = [f"{summary['events']} captured",
             f"{cut} cut to capture.event_rank (smallest kept energy "
             f"{summary['kept_energy_min']:.3f}; a step's events then sum to its gradient "
             "approximately)" if cut else "none cut to capture.event_rank"]
    if summary.get("clipped_steps"):
        parts.append(f"{summary['clipped_steps']} of the {summary['grad_norm_steps']} steps "
                     f"with a logged grad_norm clipped at max_grad_norm="
                     f"{summary['max_grad_norm']:g} (events are gradients before clipping)")
    return "  events: " + "; ".join(parts)


def _evaluable(run_dir: Path) -> bool:
    """A run of a built-in task with several labels that held out steps: what evaluate scores."""
    from sae_shards.run import rundir
    from sae_shards.run.config import ONE_LABEL_TASKS

    cfg = rundir.read_config(run_dir)
    task, runner = rundir.section(cfg, "task"), rundir.section(cfg, "runner")
    name = task.get("name")
    return name is not None and name not in ONE_LABEL_TASKS and bool(runner.get("heldout_every"))


def _quiet_third_party() -> None:
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


def _train(args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sae_shards.capture.distributed import StoppedWithAnotherRank, every_rank_knows
    from sae_shards.capture.runner import SAEWorkerError
    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.run import rundir
    from sae_shards.run.job import JobSetupError, RefusedOnRankZero, check_same_settings, run_job
    from sae_shards.run.rundir import RunWriteError

    try:
        if _is_sweep(args) and _SHOW_FLAGS & set(args):
            raise ConfigError("-m (a sweep) cannot be combined with --cfg, --info or --help: "
                              "Hydra shows one job's config; drop -m and give one value per key")
        _refuse_other_primary_config(args)
        check_overrides(args)
        _check_run_dir_arg(args)
        args, changes = resume_args(open_map_args(args))
        if _is_sweep(args):
            check_sweep_jobs(args)
    except ConfigError as e:
        if _main_process():  # every rank of a launch refuses; one says why
            print(f"sae-shards: config error: {e}", file=sys.stderr)
        return 2
    # a resumed run's own overrides and the ones given now may not compose: say which were new
    resume_hint = (f" (resume=true composed the run's own overrides with {' '.join(changes)}; "
                   "a resumed run keeps the settings it started with: drop those, or start a "
                   "new run_dir)") if changes else ""
    failures: list[str] = []
    interrupted: list[int] = []
    alone: list[BaseException] = []  # failures other processes of a launch may not know of
    crashed: list[Path] = []  # sweep jobs that raised an unforeseen error (exit 1, as Hydra's)
    jobs: list[Path] = []  # a sweep's job directories, in the order they ran
    outcome: dict[Path, str] = {}  # what this command did with a sweep's job, when not a run
    _quiet_third_party()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def train_main(cfg) -> None:
        said = len(failures)
        one_job(cfg)
        if jobs and len(failures) > said:  # refused, stopped or failed: said after the table
            outcome.setdefault(jobs[-1], "not run to its end by this command (see below)")

    def failed_alone(e: BaseException) -> None:
        """Under a launch, a job failure the other processes may not have learnt of (not told
        by ``begin_together`` or rank 0's setup broadcast) ends a sweep after that job:
        the next job's collectives would not match those the other processes are still in."""
        if _several_processes() and not every_rank_knows(e):
            alone.append(e)

    def one_job(cfg) -> None:
        hc = HydraConfig.get()
        sweep = hc.mode == RunMode.MULTIRUN
        job_name = f"{job_dirname(hc.job.override_dirname) or 'the defaults'}: " if sweep else ""
        if sweep:
            jobs.append(Path(hc.runtime.output_dir))
        _speak_as_rank()  # Hydra configured this job's logging
        _warn_unused_lora(hc.overrides.task, bool(cfg.model.lora.enabled))
        try:
            job = job_config_from_hydra(cfg)
        except ConfigError as e:
            failures.append(f"{job_name}config error: {e}{resume_hint}")
            return
        run_dir = Path(hc.runtime.output_dir)
        job = dataclasses.replace(job, run_dir=str(run_dir))
        if sweep:  # one W&B group per sweep, and each job's run a name of its own
            named = job.logging
            job = dataclasses.replace(job, logging=dataclasses.replace(
                named, group=named.group or Path(hc.sweep.dir).name,
                name=named.name and f"{named.name}-{run_dir.name}"))
        elif job.resume and job.logging.group is None:  # a sweep's job resumed on its own
            job = dataclasses.replace(job, logging=dataclasses.replace(
                job.logging, group=_recorded_group(run_dir)))
        if sweep and interrupted:  # a signal stops the whole sweep, not only its current job
            failures.append(f"{run_dir}: not started (the sweep was stopped); continue the "
                            "sweep with the same command and resume=true")
            return
        if sweep and alone:  # a failure the other processes may not know of: they may be
            # inside that job still (or may have failed the same way: not known here)
            failures.append(f"{run_dir}: not started (a job failed on this process in a way "
                            "the launch's other processes may not have learnt of, and they may "
                            "still be inside it); continue the sweep with the same command and "
                            "resume=true")
            return
        if sweep and job.resume:  # resume a sweep: skip finished jobs, start unstarted ones
            done = rundir.finished_steps(run_dir)
            if done is not None:
                try:  # a finished job of these settings, not another job's run in its place
                    check_same_settings(job, run_dir, (
                        "A sweep's resume skips a finished job only when its directory holds "
                        "that job's run; give the sweep a new run_dir"))
                except ValueError as e:
                    failures.append(f"{job_name}not skipped: {e}")
                    return
                if _main_process():  # (every rank skips it)
                    print(f"sae-shards: {run_dir} finished ({done} RL steps) earlier: skipped")
                outcome[run_dir] = "finished earlier: skipped"
                return
            if not rundir.has_resume_state(run_dir):  # never started, or named otherwise
                if _main_process():
                    print(f"sae-shards: {run_dir}: no checkpoint of this job in the sweep "
                          "(it never started, or the earlier command named it otherwise): "
                          "started from the beginning")
                job = dataclasses.replace(job, resume=False)
        try:
            summary = run_job(job, run_dir, hydra_files=_hydra_files(cfg))
        except (RefusedOnRankZero, StoppedWithAnotherRank):  # the rank that refused says why
            failures.append("")
            return
        except JobSetupError as e:
            failed_alone(e)
            # the run directory's refusals advise overwrite=true: show what the run started as
            again = rerun_command(run_dir) if "overwrite=true" in str(e) else None
            failures.append(f"{job_name}cannot {'resume' if job.resume else 'start'}: {e}"
                            + (f" (to start it again with its own settings, deleting what it "
                               f"holds: {again})" if again else ""))
            return
        except RunWriteError as e:
            failed_alone(e)
            failures.append(f"{job_name}stopped: {e.what}; "
                            f"{_how_to_continue(run_dir, 'free space (or fix permissions)')}")
            return
        except CheckpointError as e:  # a resume's checkpoint, read as training begins
            failed_alone(e)
            failures.append(f"{job_name}cannot resume: {e}")
            return
        except SAEWorkerError as e:  # the SAE failed or hung: RL was stopped, not left blocked
            failed_alone(e)
            failures.append(f"{job_name}stopped: {e}; {_how_to_continue(run_dir)}")
            return
        except KeyboardInterrupt as e:  # a second signal (SecondSignal), or Ctrl-C outside
            failures.append(f"{job_name}stopped at once by a second signal; "
                            f"{_how_to_continue(run_dir)}")
            interrupted.append(getattr(e, "signum", signal.SIGINT))
            return
        except Exception as e:  # unforeseen: a sweep's other jobs still run, each failure named
            if not sweep:
                raise
            logging.getLogger("sae_shards.cli").exception("the job failed")  # into its cli.log
            if _several_processes():  # the other processes may wait in this job's
                # collectives: end this one (Hydra goes on after an Exception, not after
                # SystemExit), so that the launcher ends theirs
                raise SystemExit(1) from e
            failures.append(f"{job_name}failed: {type(e).__name__}: {e} (the traceback is in "
                            f"{run_dir / 'cli.log'})")
            crashed.append(run_dir)
            return
        if summary is None or "rank" in summary:  # a rank other than 0: rank 0 reports
            if summary and summary.get("interrupted"):  # ... but every rank exits as stopped
                interrupted.append(summary["stop_signal"] or signal.SIGTERM)
            return
        print("\n".join(_closing_lines(summary, run_dir)))
        if summary.get("interrupted"):
            interrupted.append(summary["stop_signal"] or signal.SIGTERM)

    register_resolvers()
    fresh = _new_run_dir(args)
    flags = [a for a, is_override in zip(args, _is_override(args)) if not is_override]
    sys.argv = ["sae-shards train", *flags, *_override_args(args)]
    train_main()
    end_process_group()
    # Hydra made the run's (each job's) directory: one refused at its config, or a job that
    # never started, leaves none (every rank may try: one removal is enough)
    for made in ([fresh] if fresh is not None else []) + jobs:
        if made.is_dir() and not any(p.is_file() for p in made.rglob("*")):
            shutil.rmtree(made, ignore_errors=True)
            _drop_file_handlers(made)
    # every rank says its own failures (one rank may fail alone: a model.path missing on one
    # node), each other rank's labelled as its
    said_by = "sae-shards" if _main_process() else f"sae-shards (rank {_rank()})"
    if len(jobs) > 1 and _main_process():
        print("\n".join(_sweep_lines(jobs, outcome)))
    for msg in filter(None, failures):
        print(f"{said_by}: {msg}", file=sys.stderr)
    if interrupted:  # the shell's convention for a process ended by a signal
        return 128 + int(interrupted[0])
    return 1 if crashed else 2 if failures else 0


def _sweep_lines(jobs: list[Path], outcome: dict[Path, str]) -> list[str]:
    """The end of a sweep: each job's directory and how it ended, from its ``summary.json``,
    unless this command did not run it (``outcome``: skipped as finished earlier, or refused,
    stopped or failed, which the messages after say): another run's figures there (a numbered
    directory's) are not this job's."""
    from sae_shards.run import rundir

    lines = [f"sweep of {len(jobs)} jobs in {jobs[0].parent}:"]
    for d in jobs:
        if d in outcome:
            lines.append(f"  {d.name}: {outcome[d]}")
            continue
        s = rundir.read_summary(d)
        how = ("interrupted" if s.get("interrupted") else "finished") if s else \
            "no summary.json (see below)"
        lines.append(f"  {d.name}: {how}" + (
            f", {s.get('rl_steps')} RL steps, reward {_figure(s, 'reward_first')} -> "
            f"{_figure(s, 'reward_last')}, fvu {_figure(s, 'fvu_first')} -> "
            f"{_figure(s, 'fvu_last')}"
            if s else ""))
    return lines


def _several_processes() -> bool:
    """Whether this process is one of a multi-process launch (``accelerate launch``,
    ``torchrun``: ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _recorded_group(run_dir: Path) -> str | None:
    """The W&B group a run started in (its ``config.json``), which a resume keeps unless
    ``logging.group`` is given: a sweep's job resumed alone stays in the sweep's group."""
    from sae_shards.run import rundir

    group = rundir.section(rundir.read_config(run_dir), "logging").get("group")
    return group if isinstance(group, str) else None  # no config.json: the resume refuses it


def end_process_group() -> None:
    """Destroy the process group a run on several processes set up (``accelerate launch``)
    once its jobs are done, while the interpreter is whole: left to the interpreter's exit,
    gloo's worker threads can abort the process after a finished run ("terminate called without
    an active exception", exit -6; pytorch/pytorch#190489)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def _shards_arg(text: str) -> int | list[int]:
    """``--shards``: how many to detail (``4``), or which (``13,30``)."""
    if "," not in text:
        return _non_negative(text)
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a count (4) or shard indices separated by commas (13,30)") from None


DEFAULT_SHARDS = 4
"""``analyze --shards``'s default: how many shards the report details beside the always-on."""


def _check_shards_arg(shards: int | list[int], run_dir: Path, checkpoint: str) -> str | None:
    """Why ``--shards`` cannot be taken on ``checkpoint``: an index it lacks, or a count above
    its number of shards (meant as one shard's index, most likely); None when it can. A count
    above the default is said to be one, with how to name a single shard instead."""
    if not isinstance(shards, list) and shards <= DEFAULT_SHARDS:
        return None
    from sae_shards.core.checkpoint_checks import read_spec
    from sae_shards.run.rundir import CHECKPOINTS

    n = read_spec(run_dir / CHECKPOINTS / checkpoint).cfg.n_latents  # config.json alone
    if isinstance(shards, list):
        wrong = [i for i in shards if not 0 <= i < n]
        return (f"--shards names shard {wrong[0]}, but checkpoint {checkpoint} has shards 0 to "
                f"{n - 1}") if wrong else None
    if shards > n:
        return (f"--shards {shards} is a count (detail the {shards} largest shards), but "
                f"checkpoint {checkpoint} has {n}; to detail shard {shards} alone, end it with a "
                f"comma: --shards {shards},")
    print(f"sae-shards: --shards {shards} details the always-on shards and the {shards} "
          f"largest others (a count; shard {shards} alone is --shards {shards},)",
          file=sys.stderr)
    return None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def _analyze(args: list[str]) -> int:
    import argparse

    import json

    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.analysis.report import analyze, together_line
    from sae_shards.run.rundir import RunWriteError, read_config, rewardless_trainer

    parser = argparse.ArgumentParser(prog="sae-shards analyze")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)")
    parser.add_argument("--shards", type=_shards_arg, default=DEFAULT_SHARDS, metavar="N | I,J,...",
                        help="how many shards to detail beside the always-on ones (default "
                             "%(default)s), or which: their indices, e.g. 13,30")
    parser.add_argument("--n-prompts", type=_positive, default=32,
                        help="prompts per reward estimate of the dose-response and ablation "
                             "(4 completions each; more resolve smaller changes; default "
                             "%(default)s)")
    parser.add_argument("--no-dose", action="store_true", help="skip logit lens, dose-response and ablation")
    parser.add_argument("--threads", type=_positive, default=1, help="torch threads (explicit: "
                        "default counts oversubscribe small CPUs; default %(default)s)")
    parser.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    parser.add_argument("--initial-model", type=Path, default=None, metavar="DIR",
                        help="the run's initial model directory, when it moved from the "
                             "model.path its config.json records (checked against the run's "
                             "record of its weights)")
    parser.add_argument("--task", default=None, metavar="FILE.py:NAME | MODULE:NAME",
                        help=TASK_HELP.format(what="the dose-response and ablation"))
    _add_trust_remote_code(parser, "the logit lens, dose-response and ablation")
    ns = parser.parse_args(args)
    _set_threads(ns.threads)
    _quiet_third_party()
    from sae_shards.analysis.interventions import ScoringError

    try:
        task = _task_arg(ns.task, ns.no_dose, "--no-dose", "the dose-response and the ablation")
    except ValueError as e:
        print(f"sae-shards: cannot analyze {ns.run_dir}: {e}", file=sys.stderr)
        return 2
    from sae_shards.analysis.report import analysis_path, report_path_refusal

    refused = report_path_refusal(ns.out, ns.run_dir) if ns.out else None
    if refused:  # the run's own rollouts.jsonl was overwritten with the report
        print(f"sae-shards: cannot analyze {ns.run_dir}: {refused}", file=sys.stderr)
        return 2
    out_dir = ns.out.parent if ns.out else ns.run_dir
    if _refused_unwritable("analyze", ns.run_dir, [out_dir] if ns.run_dir.is_dir() else [],
                           f"the report cannot be written to {out_dir}", ns.out,
                           "write it elsewhere with --out DIR/report.html (analysis.json goes "
                           "beside it); the run itself is only read"):
        return 2
    _warn_if_live(ns.run_dir)
    try:
        name = _announce_checkpoint(ns.run_dir, ns.checkpoint)
        refused = _check_shards_arg(ns.shards, ns.run_dir, name)
        if not refused and ns.initial_model is not None:
            from sae_shards.analysis.shards import named_initial_refusal

            refused = named_initial_refusal(ns.run_dir, ns.initial_model)
        if refused:
            print(f"sae-shards: cannot analyze {ns.run_dir}: {refused}", file=sys.stderr)
            return 2
        out = analyze(ns.run_dir, ns.out, n_shards=ns.shards, dose=not ns.no_dose,
                      checkpoint=name, task=task, n_prompts=ns.n_prompts,
                      initial_model=ns.initial_model, trust_remote_code=ns.trust_remote_code)
    except RunWriteError as e:  # a full disk: the run is untouched (its own advice is a run's)
        print(f"sae-shards: cannot analyze {ns.run_dir}: {e.what}; the run itself is intact "
              "(a report already there too): free space and analyze again, or write the report "
              "elsewhere with --out DIR/report.html", file=sys.stderr)
        return 2
    except (CheckpointError, ScoringError) as e:
        print(f"sae-shards: cannot analyze {ns.run_dir}: {e}", file=sys.stderr)
        return 2
    print(out)
    line = together_line(json.loads(analysis_path(out).read_text()))
    if line:
        print(line)
    if task is None and not ns.no_dose and _own_reward_unknown(ns.run_dir):
        rewardless = rewardless_trainer(read_config(ns.run_dir))
        print("sae-shards: no dose-response or ablation: "
              + (f"the run's trainer ({rewardless}) had no reward functions; to measure what "
                 "the shards do to a reward of yours, give it with --task FILE.py:NAME"
                 if rewardless else
                 "the run used your script's own reward functions, which a run directory does "
                 "not hold; hand them back with --task FILE.py:NAME")
              + " (docs/analysis.md, 'Your own reward')", file=sys.stderr)
    return 0


def _warn_if_live(run_dir: Path) -> None:
    """Say when another process is writing the run now: its checkpoints rotate under the
    analysis (TRL keeps its two newest, sae-shards its two newest resume files), so the policy
    of the checkpoint read can be gone by the time the report needs it."""
    from sae_shards.run.rundir import live_writer

    writer = live_writer(run_dir) if run_dir.is_dir() else None
    if writer:
        print(f"sae-shards: note: {run_dir} is still being written ({writer}): its older "
              "checkpoints are removed as it trains, and one this analysis reads may go before "
              "it is done (the report then leaves out what needed it, e.g. the logit lens and "
              "dose-response); for a stable report analyze it once it has finished or stopped",
              file=sys.stderr)


def _add_trust_remote_code(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``--trust-remote-code`` opt-in (off by default: a run's own files never turn it on)."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help=f"for {what}, load a policy that needs Python code of its own "
                             "(config.json's auto_map) by running the .py files in its model "
                             "directories (the run's final_model/, the initial model's): they "
                             "run with your permissions, so only for code you have read and "
                             "trust. Without it such a policy is never loaded and its code "
                             "never runs")


TASK_HELP = ("your run's prompts and reward functions, for {what} of a run of your own TRL "
             "script: a RewardTask, or a function returning one (docs/analysis.md)")


def _task_arg(spec: str | None, skipped: bool, flag: str, what: str) -> Any:
    """The ``--task FILE.py:NAME`` argument loaded (None without one); ``ValueError`` when the
    scoring it is for is skipped by ``flag`` or the script cannot give it."""
    if spec is None:
        return None
    from sae_shards.analysis.reward_task import load_task_spec

    if skipped:
        raise ValueError(f"--task scores {what}, which {flag} skips; drop one of them")
    return load_task_spec(spec)


def _own_reward_unknown(run_dir: Path) -> bool:
    """Whether the run was scored by a user's own reward (``ShardCallback``: ``task`` null)."""
    from sae_shards.run import rundir

    config = rundir.read_config(run_dir)
    return bool(config) and not rundir.section(config, "task").get("name")


CHECKPOINT_HELP = ("checkpoint to read: final, step_XXXXXX, or its RL step (100 for "
                   "step_000100) (default: final, or the newest step of an interrupted or "
                   "killed run)")
EVALUATE_CHECKPOINT_HELP = ("checkpoint whose SAE to score: final, step_XXXXXX, or its RL step "
                            "(100 for step_000100) (default: final; the run must have finished: "
                            "the samples it scores are written at its end)")


def _announce_checkpoint(run_dir: Path, checkpoint: str | None) -> str:
    """The checkpoint to read, said on stderr when it is not the final one."""
    from sae_shards.run import rundir

    from sae_shards.analysis.recovered import resume_file_of
    from sae_shards.analysis.shards import checkpoint_name

    name = checkpoint_name(run_dir, checkpoint)
    if name != "final":
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


def _evaluate(args: list[str]) -> int:
    import argparse

    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.analysis.families import FAMILY_THRESHOLD
    from sae_shards.analysis.interventions import ScoringError
    from sae_shards.planted.evaluate import evaluate_run, to_markdown
    from sae_shards.run.rundir import RunWriteError

    parser = argparse.ArgumentParser(prog="sae-shards evaluate")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n-null", type=_positive, default=5,
                        help="label shuffles for the nulls (default %(default)s)")
    parser.add_argument("--from-step", type=_non_negative, default=0,
                        help="use only RL steps >= this one (task directions drift; default "
                             "%(default)s)")
    parser.add_argument("--no-steering", action="store_true",
                        help="skip the causal tests (steering and ablation)")
    parser.add_argument("--null-run", type=Path, default=None,
                        help="the null-control run (task=multiskill_null) whose AUROC fills the "
                             "headline's auroc_null_control")
    parser.add_argument("--n-prompts", type=_positive, default=8,
                        help="prompts per task for each causal reward estimate (default "
                             "%(default)s)")
    parser.add_argument("--family-threshold", type=float, default=FAMILY_THRESHOLD,
                        help="co-activation correlation in (0, 1] above which latents join one "
                             f"shard family (default {FAMILY_THRESHOLD})")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch threads (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the shuffled-label nulls and the causal controls (default: "
                             "the run's own seed, as scripts.planted_sweep evaluates it)")
    parser.add_argument("--checkpoint", default=None, help=EVALUATE_CHECKPOINT_HELP)
    parser.add_argument("--task", default=None, metavar="FILE.py:NAME | MODULE:NAME",
                        help=TASK_HELP.format(what="the steering and ablation tests"))
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="directory for evaluation.json and evaluation.md (default RUN_DIR; "
                             "a --null-run's own evaluation goes to DIR/null_control)")
    _add_trust_remote_code(parser, "the steering and ablation tests")
    ns = parser.parse_args(args)
    if not 0.0 < ns.family_threshold <= 1.0:
        parser.error(f"--family-threshold must be in (0, 1], got {ns.family_threshold}")
    _set_threads(ns.threads)
    _quiet_third_party()
    writes = [ns.out] if ns.out else [d for d in (ns.run_dir, ns.null_run) if d and d.is_dir()]
    if _refused_unwritable("evaluate", ns.run_dir, writes, "its evaluation cannot be written",
                           ns.out, "write it elsewhere with --out DIR; the runs themselves are "
                           "only read"):
        return 2
    try:
        task = _task_arg(ns.task, ns.no_steering, "--no-steering",
                         "the steering and ablation tests")
    except ValueError as e:
        print(f"sae-shards: cannot evaluate {ns.run_dir}: {e}", file=sys.stderr)
        return 2
    try:
        name = _announce_checkpoint(ns.run_dir, ns.checkpoint)
        seed = ns.seed if ns.seed is not None else _run_seed(ns.run_dir)
        result = evaluate_run(ns.run_dir, n_null=ns.n_null, from_step=ns.from_step,
                              steering=not ns.no_steering, checkpoint=name, seed=seed,
                              null_run=ns.null_run, n_prompts=ns.n_prompts,
                              family_threshold=ns.family_threshold, task=task, out=ns.out,
                              trust_remote_code=ns.trust_remote_code)
    except RunWriteError as e:  # a full disk: the run is untouched (its own advice is a run's)
        print(f"sae-shards: cannot evaluate {ns.run_dir}: {e.what}; the run itself is intact: "
              "free space (or fix permissions) and evaluate again", file=sys.stderr)
        return 2
    except (CheckpointError, ScoringError) as e:
        print(f"sae-shards: cannot evaluate {ns.run_dir}: {e}", file=sys.stderr)
        return 2
    print(to_markdown(result))
    return 0


def _compare(args: list[str]) -> int:
    import argparse

    import json

    from sae_shards.analysis.compare import (MIN_DENSITY, REPLICATED, check_min_density,
                                             check_threshold, compare_shards, comparison_lines,
                                             comparison_path_refusal, load_shards,
                                             subset_origin)
    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.run import rundir

    def checked(check):
        def parse(text: str) -> float:  # argparse names the flag; the check says what fits
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
            try:
                check(value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{text}: {str(e).split(': ', 1)[1]}") from None
            return value
        return parse

    parser = argparse.ArgumentParser(
        prog="sae-shards compare", description="Match each trained shard of A to the shard of "
        "B whose direction is nearest (|cosine|), beside a chance control: random directions "
        "in the span of B's trained shards. Always-on (drift) shards are listed apart.")
    parser.add_argument("a", type=Path, help="a run directory, or a checkpoint directory")
    parser.add_argument("b", type=Path, help="the same, over the same targets")
    for side in ("a", "b"):
        parser.add_argument(f"--checkpoint-{side}", default=None, metavar="NAME",
                            help=f"{side.upper()}'s checkpoint, when it is a run: final, "
                                 "step_XXXXXX or its RL step (default: final, or the newest "
                                 "step of an interrupted or killed run)")
    parser.add_argument("--threshold", type=checked(check_threshold), default=REPLICATED,
                        metavar="T", help="the |cosine| a pair needs (beside beating its "
                        "chance control) to count as replicated (default %(default)s)")
    parser.add_argument("--min-density", type=checked(check_min_density), default=MIN_DENSITY,
                        metavar="D", help="compare only A's shards that fired on at least this "
                        "share of their SAE's training samples (default %(default)s: rarer "
                        "ones are as good as dead; 0: any that fired). Shards that never left "
                        "their initial direction are left out whatever it is")
    parser.add_argument("--top", type=_non_negative, default=20, metavar="N",
                        help="pairs to list, by |cosine| (0: every pair; default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                        help="also write every pair and figure as JSON (its folder is made)")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch threads (default %(default)s)")
    ns = parser.parse_args(args)
    _set_threads(ns.threads)
    refused = comparison_path_refusal(ns.out) if ns.out is not None else None
    if refused:
        print(f"sae-shards: cannot compare {ns.a} with {ns.b}: {refused}", file=sys.stderr)
        return 2
    try:
        a, b = (load_shards(path, checkpoint) for path, checkpoint in
                ((ns.a, ns.checkpoint_a), (ns.b, ns.checkpoint_b)))
        result = compare_shards(a, b, ns.threshold, ns.min_density)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"sae-shards: cannot compare {ns.a} with {ns.b}: {e}", file=sys.stderr)
        return 2
    try:
        print("\n".join(comparison_lines(result, a, b, ns.top or None)), flush=True)
    except BrokenPipeError:  # `| head`: the rest of the printout is unwanted, --out is not
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if ns.out is not None:
        try:
            ns.out.parent.mkdir(parents=True, exist_ok=True)
            subsets = {side: {"path": origin[0], "indices": origin[1]}
                       for side, origin in (("a", subset_origin(a)), ("b", subset_origin(b)))
                       if origin is not None}
            rundir.write_text(ns.out, json.dumps(rundir.strict_json(
                {"a": str(a.path), "b": str(b.path), **result.to_dict(),
                 **({"subset_of": subsets} if subsets else {})}), indent=2))
        except (OSError, rundir.RunWriteError) as e:
            print(f"sae-shards: the comparison above was not written to {ns.out}: "
                  f"{getattr(e, 'what', None) or e}", file=sys.stderr)
            return 2
    return 0


def _run_seed(run_dir: Path) -> int:
    """The run's own seed (``config.json``), 0 when it records none."""
    from sae_shards.run import rundir

    seed = rundir.read_config(run_dir).get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] != "train":  # train: Hydra configures logging (--info doubled otherwise)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from sae_shards.run.versions import library_versions, version_line

        print(version_line(library_versions()))
        return 0
    command, rest = argv[0], argv[1:]
    match command:
        case "train":
            return _train(rest)
        case "analyze":
            return _analyze(rest)
        case "evaluate":
            return _evaluate(rest)
        case "compare":
            return _compare(rest)
        case other:
            print(f"sae-shards: unknown command {other!r}\n\n{USAGE}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
