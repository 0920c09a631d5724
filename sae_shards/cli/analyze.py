"""``sae-shards analyze RUN_DIR``: the HTML report of a run's shards (``analysis.report``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from sae_shards.cli.shared import (CHECKPOINT_HELP, TASK_HELP, add_initial_model,
                                   add_trust_remote_code, announce_checkpoint,
                                   initial_model_refusal, own_reward_unknown, positive,
                                   quiet_third_party, refused_unwritable, set_threads, shards_arg,
                                   task_arg, warn_if_live)


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
    if shards > n:  # no shard has that index either
        return (f"--shards {shards} is a count (detail the {shards} largest shards), but "
                f"checkpoint {checkpoint} has {n} (shards 0 to {n - 1}); give a count up to "
                f"{n}, or the indices of the shards to detail (one shard: end it with a comma, "
                f"--shards {n - 1},)")
    alone = f"shard {shards} alone is --shards {shards}," if shards < n else "every shard"
    print(f"sae-shards: --shards {shards} details the always-on shards and the {shards} "
          f"largest others (a count; {alone})", file=sys.stderr)
    return None


def run(args: list[str]) -> int:
    import argparse

    import json

    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.analysis.report import analyze, together_line
    from sae_shards.run.rundir import RunWriteError, read_config, rewardless_trainer

    parser = argparse.ArgumentParser(prog="sae-shards analyze")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)")
    parser.add_argument("--shards", type=shards_arg, default=DEFAULT_SHARDS, metavar="N | I,J,...",
                        help="how many shards to detail beside the always-on ones (default "
                             "%(default)s), or which: their indices, e.g. 13,30")
    parser.add_argument("--n-prompts", type=positive, default=32,
                        help="prompts per reward estimate of the dose-response and ablation "
                             "(4 completions each; more resolve smaller changes; default "
                             "%(default)s)")
    parser.add_argument("--no-dose", action="store_true", help="skip the logit lens, dose-response, ablation and shards together")
    parser.add_argument("--threads", type=positive, default=1, help="torch threads (explicit: "
                        "default counts oversubscribe small CPUs; default %(default)s)")
    parser.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    add_initial_model(parser)
    parser.add_argument("--task", default=None, metavar="FILE.py:NAME | MODULE:NAME",
                        help=TASK_HELP.format(what="the dose-response and ablation"))
    add_trust_remote_code(parser, "the logit lens, dose-response and ablation")
    ns = parser.parse_args(args)
    set_threads(ns.threads)
    quiet_third_party()
    from sae_shards.analysis.interventions import ScoringError

    try:
        task = task_arg(ns.task, ns.no_dose, "--no-dose", "the dose-response and the ablation")
    except ValueError as e:
        print(f"sae-shards: cannot analyze {ns.run_dir}: {e}", file=sys.stderr)
        return 2
    from sae_shards.analysis.report import analysis_path, report_path_refusal

    refused = report_path_refusal(ns.out, ns.run_dir) if ns.out else None
    if refused:  # the run's own rollouts.jsonl was overwritten with the report
        print(f"sae-shards: cannot analyze {ns.run_dir}: {refused}", file=sys.stderr)
        return 2
    out_dir = ns.out.parent if ns.out else ns.run_dir
    if refused_unwritable("analyze", ns.run_dir, [out_dir] if ns.run_dir.is_dir() else [],
                           f"the report cannot be written to {out_dir}", ns.out,
                           "write it elsewhere with --out DIR/report.html (analysis.json goes "
                           "beside it); the run itself is only read"):
        return 2
    warn_if_live(ns.run_dir, out_dir)
    try:
        name = announce_checkpoint(ns.run_dir, ns.checkpoint)
        refused = _check_shards_arg(ns.shards, ns.run_dir, name)
        refused = refused or initial_model_refusal(ns.run_dir, ns.initial_model)
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
    if task is None and not ns.no_dose and own_reward_unknown(ns.run_dir):
        rewardless = rewardless_trainer(read_config(ns.run_dir))
        print("sae-shards: no dose-response or ablation: "
              + (f"the run's trainer ({rewardless}) had no reward functions; to measure what "
                 "the shards do to a reward of yours, give it with --task FILE.py:NAME"
                 if rewardless else
                 "the run used your script's own reward functions, which a run directory does "
                 "not hold; hand them back with --task FILE.py:NAME")
              + " (docs/analysis.md, 'Your own reward')", file=sys.stderr)
    return 0
