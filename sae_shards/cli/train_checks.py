"""What ``sae-shards train`` refuses before Hydra writes anything: a ``run_dir`` that is a
model's directory, a single run's ``run_dir`` that holds a sweep (and the reverse), one that
cannot be written, and a ``-m`` sweep with a bad value in any job or two jobs in one directory
(every job composed and validated before the first runs).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

from sae_shards.cli.hydra_config import (CONFIG_DIR, ConfigError, job_config_from_hydra,
                                         job_dirname, override_args)


def is_sweep(args: list[str]) -> bool:
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
    parsed = OverridesParser.create().parse_overrides(override_args(args))
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
        _check_sweep_dir(Path(next(iter(run_dirs))), resume_given(_given_overrides(args)))


def _given_overrides(args: list[str]) -> dict[str, Any]:
    """Hydra's parse of each override key among ``args`` (the last of each key wins, as in
    Hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group: o for o in
            OverridesParser.create().parse_overrides(override_args(args))}


def run_dir_arg(given: dict[str, Any]) -> Path | None:
    """The ``run_dir`` the overrides ``given`` name (``configs/config.yaml``'s without one);
    None when it is swept over."""
    if "run_dir" not in given:
        from omegaconf import OmegaConf

        return Path(str(OmegaConf.load(CONFIG_DIR / "config.yaml").run_dir))
    return None if given["run_dir"].is_sweep_override() else Path(str(given["run_dir"].value()))


def new_run_dir(args: list[str]) -> Path | None:
    """For a single run (not a sweep) whose run directory does not exist yet (Hydra creates it
    before the config is checked): the outermost of the directories that will be created; else
    None."""
    run_dir = None if is_sweep(args) else run_dir_arg(_given_overrides(args))
    if run_dir is None or run_dir.exists():
        return None
    while not run_dir.parent.exists():  # the outermost directory Hydra will create
        run_dir = run_dir.parent
    return run_dir


def check_run_dir_arg(args: list[str]) -> None:
    """Refuse, before Hydra writes its log or ``multirun.yaml`` there, a ``run_dir=`` that is a
    model's directory (``rundir.prepare_run_dir`` refuses it too, for scripts), a single run's
    ``run_dir`` that holds a sweep, and a sweep's ``run_dir`` that holds a run (its jobs would
    be written inside it)."""
    from sae_shards.run import rundir

    given = _given_overrides(args)
    run_dir = run_dir_arg(given)  # a sweep's parent too
    if run_dir is None:
        return
    if "run_dir" in given:
        try:
            rundir.check_not_foreign(run_dir)
            if not is_sweep(args):  # before Hydra writes a single run's log into a sweep
                rundir.check_not_sweep(run_dir)
        except FileExistsError as e:
            raise ConfigError(str(e)) from None
    if "${" not in str(run_dir):  # before Hydra creates it (its traceback names no fix)
        refused = rundir.run_dir_refusal(run_dir, " (e.g. run_dir=runs/my_run)")
        if refused:
            raise ConfigError(refused)
    if is_sweep(args) and "${" not in str(run_dir):  # before Hydra writes multirun.yaml
        _check_sweep_dir(run_dir, resume_given(given))  # interpolated: check_sweep_jobs


def resume_given(given: dict[str, Any]) -> bool:
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
