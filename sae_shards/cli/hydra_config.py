"""Hydra's side of ``sae-shards train``: where ``configs/`` is, the composed config turned
into a validated :class:`~sae_shards.run.config.JobConfig` once (``job_config_from_hydra``), the
overrides checked before Hydra runs (unknown keys, a second primary config), and the names of a
sweep's job directories.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily at run time: `sae-shards --help` stays fast
    from sae_shards.run.config import JobConfig


def config_dir() -> Path:
    """Hydra's primary config directory: ``sae_shards/configs`` inside an installed wheel
    (``pip install .``), else the repo's top-level ``configs/`` (editable install / source checkout)."""
    here = Path(__file__).resolve().parent.parent  # sae_shards/
    candidates = (here / "configs", here.parent / "configs")
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "sae-shards: no Hydra configs found (looked for config.yaml in "
        + " and ".join(str(c) for c in candidates)
        + "); reinstall the package: `pip install .` ships them inside the wheel")


CONFIG_DIR = config_dir()


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
        overrides = OverridesParser.create().parse_overrides(override_args(args))
    except Exception as e:  # Hydra's grammar errors say what is wrong with the override
        glob = (" A glob's character class inside a list is quoted too: \"capture.targets="
                "['model.layers.[01].*']\"." if any("=[" in a and a.count("[") > 1
                                                   for a in override_args(args)) else "")
        raise ConfigError(f"{e}\n(a value holding '=', ',', spaces or non-ASCII letters, such "
                          "as a sweep job's directory, is quoted: "
                          f"\"run_dir='runs/sweep/sae.k=2'\".{glob})") from e
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


def refuse_other_primary_config(args: list[str]) -> None:
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
                          "(model=tiny), and model=hf_path uses model.path as saved; drop them"
                          + ("; one the experiment sets is dropped with "
                             + " ".join(f"'~{k}'" for k in tiny) if "experiment" in given
                             else ""))


SHOW_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help"}
"""Hydra's flags that show something instead of running (no ``-m`` with them)."""


_VALUED_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                 "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}
"""Hydra's flags that take the next argument as their value (``--cfg job``)."""


def override_mask(args: list[str]) -> list[bool]:
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


def override_args(args: list[str]) -> list[str]:
    """The overrides among ``sae-shards train``'s arguments (Hydra's flags and their values
    left out)."""
    return [arg for arg, is_override in zip(args, override_mask(args)) if is_override]


def open_map_args(args: list[str]) -> list[str]:
    """``args`` with each plain override of a key below a free-form mapping (``task.options.x=1``,
    ``rl.extra.x=1``: ``rundir.OPEN_MAPS``) passed as ``++key=...`` (add or override): those
    mappings start empty or partial, so Hydra alone would refuse a key they do not hold yet and
    ask for ``+``. Flags, their values and other overrides are returned unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sae_shards.run.rundir import OPEN_MAPS

    parse = OverridesParser.create().parse_override
    out = []
    for arg, is_override in zip(args, override_mask(args)):
        o = parse(arg) if is_override else None
        under_map = o is not None and any(o.key_or_group.startswith(m + ".") for m in OPEN_MAPS)
        plain = under_map and not (o.is_add() or o.is_force_add() or o.is_delete())
        out.append("++" + arg if plain else arg)
    return out


def hydra_files(cfg) -> dict[str, str]:
    """What Hydra would write to ``.hydra/`` (written by the job once the run dir is accepted,
    so a refused run leaves the earlier run's files alone)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    return {"config.yaml": OmegaConf.to_yaml(cfg),
            "overrides.yaml": OmegaConf.to_yaml(list(hc.overrides.task))}
