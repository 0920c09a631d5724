"""The ``sae-shards`` command: ``train [hydra overrides]``, ``analyze RUN_DIR``, ``evaluate RUN_DIR``.

Hydra composes ``configs/`` (next to this package in a source checkout, or ``--config-dir``),
then the config becomes a validated :class:`~sae_shards.config.JobConfig` once, here. A bad value
ends the command with ``sae-shards: config error: <field, value, fix>`` and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily at run time: `sae-shards --help` stays fast
    from sae_shards.run.config import JobConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USAGE = """usage: sae-shards <command> [args]

commands:
  train [overrides] [-m]   run RL + delta capture + concurrent SAE (Hydra overrides, e.g. sae.k=8)
  analyze RUN_DIR [--out FILE] [--shards N] [--no-dose]
                           write an HTML report of a finished run (default RUN_DIR/report.html)
  evaluate RUN_DIR         score the shards against sign-free task ground truth (multiskill runs
                           with runner.save_samples=true runner.heldout_every=k): evaluation.json/.md

Examples:
  sae-shards train                              the built-in default (tiny model, CPU, minutes)
  sae-shards train rl.max_steps=50 run_dir=runs/short
  sae-shards train -m sae.k=2,4 run_dir=runs/k_sweep
  sae-shards analyze runs/default
"""


class ConfigError(ValueError):
    """The composed configuration is invalid (message names the field, the value and a fix)."""


def job_config_from_hydra(cfg) -> JobConfig:
    """Hydra's DictConfig -> validated JobConfig (raises ConfigError)."""
    from omegaconf import OmegaConf

    from sae_shards.run.config import JobConfig

    try:
        return JobConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    except Exception as e:  # OmegaConf interpolation / missing-value errors
        raise ConfigError(f"{type(e).__name__}: {e}") from e


def _train(args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from sae_shards.run.job import JobSetupError, run_job

    failures: list[str] = []

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def train_main(cfg) -> None:
        try:
            job = job_config_from_hydra(cfg)
        except ConfigError as e:
            failures.append(f"config error: {e}")
            return
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        job = dataclasses.replace(job, run_dir=str(run_dir))
        try:
            summary = run_job(job, run_dir)
        except JobSetupError as e:
            failures.append(f"cannot start: {e}")
            return
        print(json.dumps({k: summary[k] for k in (
            "rl_steps", "sae_steps", "reward_first", "reward_last", "fvu_first", "fvu_last",
            "final_checkpoint", "wall_s")}, indent=2))

    sys.argv = ["sae-shards train", *args]
    train_main()
    if failures:
        for msg in failures:
            print(f"sae-shards: {msg}", file=sys.stderr)
        return 2
    return 0


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _analyze(args: list[str]) -> int:
    import argparse

    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.analysis.report import analyze

    parser = argparse.ArgumentParser(prog="sae-shards analyze")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)")
    parser.add_argument("--shards", type=int, default=4, help="how many top shards to report")
    parser.add_argument("--no-dose", action="store_true", help="skip logit lens and dose-response")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (explicit: "
                        "default counts oversubscribe small CPUs)")
    ns = parser.parse_args(args)
    _set_threads(ns.threads)
    try:
        out = analyze(ns.run_dir, ns.out, n_shards=ns.shards, dose=not ns.no_dose)
    except CheckpointError as e:
        print(f"sae-shards: cannot analyze {ns.run_dir}: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _evaluate(args: list[str]) -> int:
    import argparse

    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.planted.evaluate import evaluate_run, to_markdown

    parser = argparse.ArgumentParser(prog="sae-shards evaluate")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n-null", type=int, default=5, help="label shuffles for the nulls")
    parser.add_argument("--from-step", type=int, default=0,
                        help="use only RL steps >= this one (task directions drift)")
    parser.add_argument("--no-steering", action="store_true", help="skip steering selectivity")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    ns = parser.parse_args(args)
    _set_threads(ns.threads)
    try:
        result = evaluate_run(ns.run_dir, n_null=ns.n_null, from_step=ns.from_step,
                              steering=not ns.no_steering)
    except CheckpointError as e:
        print(f"sae-shards: cannot evaluate {ns.run_dir}: {e}", file=sys.stderr)
        return 2
    print(to_markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    match command:
        case "train":
            return _train(rest)
        case "analyze":
            return _analyze(rest)
        case "evaluate":
            return _evaluate(rest)
        case other:
            print(f"sae-shards: unknown command {other!r}\n\n{USAGE}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
