"""The commands that continue or restart a run (``resume_command``, ``rerun_command``, under
the launcher the run recorded), and the overrides a ``resume=true`` reuses from the run's own
``.hydra/overrides.yaml`` (``resume_args``): never an opt-in to run a model's own code.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from sae_shards.cli.hydra_config import CONFIG_DIR, ConfigError, open_map_args, override_args
from sae_shards.cli.processes import main_process
from sae_shards.cli.train_checks import is_sweep, resume_given, run_dir_arg


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


def how_to_continue(run_dir: Path, fix: str = "") -> str:
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
    group = recorded_group(Path(run_dir))  # a sweep's job run again alone: in its group
    if group and not any(o.key_or_group == "logging.group" for _, o in saved):
        own.append(shlex.quote(f"logging.group={group}"))
    return " ".join([train_command(run_dir), *own, _quoted_run_dir(run_dir), "overwrite=true"])


def _resuming(args: list[str]) -> tuple[list[tuple[str, Any]], Path] | None:
    """``(the overrides given, each as its text and Hydra's parse; the run_dir)`` when ``args``
    resume one run (the last ``resume=`` is true; not a multirun sweep), else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if is_sweep(args):
        return None
    parse = OverridesParser.create().parse_overrides
    now = list(zip(override_args(args), parse(override_args(args))))
    given = {o.key_or_group: o for _, o in now}  # the last of each key wins, as in Hydra
    run_dir = run_dir_arg(given)
    if run_dir is None or not resume_given(given):
        return None
    return now, run_dir


def auto_resume_args(args: list[str]) -> list[str]:
    """``resume=auto`` (a job a scheduler starts and requeues with one command) as what the run
    directory holds now asks for (``rundir.auto_resume``): ``resume=true`` when the run there
    has a checkpoint, else ``resume=false``, with ``overwrite=true`` over a run that stopped
    before its first checkpoint. A sweep (``-m``) resumes when its directory holds a sweep
    (``rundir.SWEEP``; a sweep's resume starts the jobs that never started). Other arguments
    are returned unchanged; the decision is printed."""
    from sae_shards.cli.hydra_config import override_mask
    from sae_shards.cli.train_checks import _given_overrides
    from sae_shards.run import rundir

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    resumes = []  # (index, value) of each resume= override: ``++resume=auto``, ``'auto'`` too
    for i, (a, o) in enumerate(zip(args, override_mask(args))):
        if not (o and re.match(r"\+{0,2}resume=", a)):
            continue  # others are Hydra's to parse and refuse
        try:
            parsed = parser.parse_overrides([a])[0]
        except Exception:  # noqa: BLE001 (resume="auto: Hydra's own config error says it)
            continue
        if not parsed.is_sweep_override():
            resumes.append((i, str(parsed.value())))
    last = resumes[-1][1].strip().lower() if resumes else ""
    if last not in ("auto", "true", "false", ""):  # Hydra's bool error would not name auto
        raise ConfigError(f"resume={resumes[-1][1]!r}: expected true, false or auto (auto: "
                          "continue the run in run_dir when it has a checkpoint, else start it)")
    if last != "auto":
        return args
    kept = [a for i, a in enumerate(args) if i not in dict(resumes)]
    given = _given_overrides(kept)
    if "overwrite" in given and given["overwrite"].value() in (True, "true", "True"):
        raise ConfigError("resume=auto with overwrite=true: auto itself decides whether to "
                          "continue the run in run_dir or to replace one that stopped before "
                          "its first checkpoint; leave overwrite=true out")
    run_dir = run_dir_arg(given)
    if run_dir is None:
        raise ConfigError("resume=auto needs one run_dir, not a sweep over it")
    if "${" in str(run_dir) and is_sweep(args):
        raise ConfigError(f"resume=auto of a sweep needs a plain run_dir, not run_dir={run_dir}: "
                          "the sweep's directory must be known before its jobs' settings are")
    if "${" in str(run_dir):  # runs/r_${seed}: the directory Hydra will resolve it to
        run_dir = resolved_run_dir(kept, run_dir)
    if is_sweep(args):  # a sweep's directory is one once Hydra wrote its multirun.yaml
        resume, overwrite = (run_dir / rundir.SWEEP).is_file(), False
    else:
        try:
            resume, overwrite = rundir.auto_resume(run_dir, with_trl=True)
        except FileExistsError as e:  # finished
            raise ConfigError(f"resume=auto: {e} (to replace it, overwrite=true in place of "
                              "resume=auto)") from None
    if main_process():
        print("sae-shards: resume=auto: " + (
            f"continuing {'the sweep' if is_sweep(args) else 'the run'} in {run_dir}" if resume
            else f"replacing the run in {run_dir}, which has no complete checkpoint to resume from"
            if overwrite else f"starting a new {'sweep' if is_sweep(args) else 'run'} in "
            f"{run_dir}"), file=sys.stderr)
    return [*kept, f"resume={'true' if resume else 'false'}", *(["overwrite=true"] * overwrite)]


def resolved_run_dir(args: list[str], given: Path) -> Path:
    """The ``run_dir`` the overrides ``args`` give, its interpolations (``runs/r_${seed}``)
    resolved by composing the config as the run will; ``given`` is the text, for the refusal
    when it cannot be resolved before the run starts (``${hydra:...}``)."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = compose(config_name="config",
                               overrides=override_args(open_map_args(args)))
        return Path(str(composed.run_dir))
    except Exception as e:  # Hydra's own error: said with what to do
        raise ConfigError(f"resume=auto: run_dir={given} cannot be resolved before the run "
                          f"starts ({type(e).__name__}: {e}); give a run_dir whose "
                          "interpolations name config fields (runs/r_${seed}), or a plain "
                          "path") from None


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
    if keep and main_process():
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


def recorded_group(run_dir: Path) -> str | None:
    """The W&B group a run started in (its ``config.json``), which a resume keeps unless
    ``logging.group`` is given: a sweep's job resumed alone stays in the sweep's group."""
    from sae_shards.run import rundir

    group = rundir.section(rundir.read_config(run_dir), "logging").get("group")
    return group if isinstance(group, str) else None  # no config.json: the resume refuses it
