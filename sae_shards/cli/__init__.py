"""The ``sae-shards`` command: ``train [hydra overrides]``, ``analyze RUN_DIR``, ``evaluate
RUN_DIR``, ``compare A B``; one module per command, beside what they share.

- ``hydra_config``: Hydra composes ``configs/`` (next to this package in a source checkout, or
  inside the wheel), and the config becomes a validated :class:`~sae_shards.run.config.JobConfig`
  once, here; overrides checked before Hydra runs.
- ``train_checks``: what ``train`` refuses before Hydra writes anything (a run_dir that is a
  model's or a sweep's, a sweep whose jobs would clash or hold a bad value).
- ``rerun``: the commands that continue or restart a run, and the overrides a resume reuses.
- ``processes``: one process of a multi-process launch (rank 0 speaks; the process group).
- ``train``, ``analyze``, ``evaluate``, ``compare``: each command's ``run(args) -> exit code``;
  ``shared``: the argument types and messages the analysis commands share.

A bad value ends the command with ``sae-shards: config error: <field, value, fix>`` (or the
command's own refusal) and exit code 2. Heavy libraries are imported inside the commands, so
``sae-shards --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys

from sae_shards.cli import analyze, compare, evaluate, train
from sae_shards.cli.hydra_config import (CONFIG_DIR, ConfigError, check_overrides, config_dir,
                                         job_config_from_hydra, job_dirname, open_map_args,
                                         register_resolvers)
from sae_shards.cli.processes import end_process_group
from sae_shards.cli.rerun import (rerun_command, resume_args, resume_changes, resume_command,
                                  saved_overrides, train_command, with_saved_overrides)
from sae_shards.cli.train_checks import check_sweep_jobs

__all__ = ["CONFIG_DIR", "ConfigError", "USAGE", "check_overrides", "check_sweep_jobs",
           "config_dir", "end_process_group", "job_config_from_hydra", "job_dirname", "main",
           "open_map_args", "register_resolvers", "rerun_command", "resume_args",
           "resume_changes", "resume_command", "saved_overrides", "train_command",
           "with_saved_overrides"]

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
              [--top N] [--out FILE.json] [--threads N]
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
            return train.run(rest)
        case "analyze":
            return analyze.run(rest)
        case "evaluate":
            return evaluate.run(rest)
        case "compare":
            return compare.run(rest)
        case other:
            print(f"sae-shards: unknown command {other!r}\n\n{USAGE}", file=sys.stderr)
            return 2
