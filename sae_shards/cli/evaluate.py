"""``sae-shards evaluate RUN_DIR``: a multiskill run's shards scored against its tasks' ground
truth (``planted.evaluate``): ``evaluation.json`` and ``evaluation.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sae_shards.cli.shared import (EVALUATE_CHECKPOINT_HELP, TASK_HELP, add_initial_model,
                                   add_trust_remote_code, announce_checkpoint,
                                   initial_model_refusal, non_negative, positive,
                                   quiet_third_party, refused_unwritable, set_threads, task_arg)


def run(args: list[str]) -> int:
    import argparse

    from sae_shards.core.checkpoint import CheckpointError
    from sae_shards.analysis.families import FAMILY_THRESHOLD
    from sae_shards.analysis.interventions import ScoringError
    from sae_shards.planted.evaluate import evaluate_run, to_markdown
    from sae_shards.run.rundir import RunWriteError

    parser = argparse.ArgumentParser(prog="sae-shards evaluate")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n-null", type=positive, default=5,
                        help="label shuffles for the nulls (default %(default)s)")
    parser.add_argument("--from-step", type=non_negative, default=0,
                        help="use only RL steps >= this one (task directions drift; default "
                             "%(default)s)")
    parser.add_argument("--no-steering", action="store_true",
                        help="skip the causal tests (steering and ablation)")
    parser.add_argument("--null-run", type=Path, default=None,
                        help="the null-control run (task=multiskill_null) whose AUROC fills the "
                             "headline's auroc_null_control")
    parser.add_argument("--n-prompts", type=positive, default=8,
                        help="prompts per task for each causal reward estimate (default "
                             "%(default)s)")
    parser.add_argument("--family-threshold", type=float, default=FAMILY_THRESHOLD,
                        help="co-activation correlation in (0, 1] above which latents join one "
                             f"shard family (default {FAMILY_THRESHOLD})")
    parser.add_argument("--threads", type=positive, default=1,
                        help="torch threads (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the shuffled-label nulls and the causal controls (default: "
                             "the run's own seed, as scripts.planted_sweep evaluates it)")
    parser.add_argument("--checkpoint", default=None, help=EVALUATE_CHECKPOINT_HELP)
    parser.add_argument("--task", default=None, metavar="FILE.py:NAME | MODULE:NAME",
                        help=TASK_HELP.format(what="the steering and ablation tests"))
    add_initial_model(parser)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="directory for evaluation.json and evaluation.md (default RUN_DIR; "
                             "a --null-run's own evaluation goes to DIR/null_control)")
    add_trust_remote_code(parser, "the steering and ablation tests")
    ns = parser.parse_args(args)
    if not 0.0 < ns.family_threshold <= 1.0:
        parser.error(f"--family-threshold must be in (0, 1], got {ns.family_threshold}")
    set_threads(ns.threads)
    quiet_third_party()
    if ns.null_run is not None and not ns.null_run.is_dir():
        print(f"sae-shards: cannot evaluate {ns.run_dir}: --null-run {ns.null_run}: no such run "
              "directory (a null-control run: sae-shards train experiment=planted "
              "task=multiskill_null run_dir=...)", file=sys.stderr)
        return 2
    writes = [ns.out] if ns.out else [d for d in (ns.run_dir, ns.null_run) if d and d.is_dir()]
    if refused_unwritable("evaluate", ns.run_dir, writes, "its evaluation cannot be written",
                           ns.out, "write it elsewhere with --out DIR; the runs themselves are "
                           "only read"):
        return 2
    try:
        task = task_arg(ns.task, ns.no_steering, "--no-steering",
                         "the steering and ablation tests")
    except ValueError as e:
        print(f"sae-shards: cannot evaluate {ns.run_dir}: {e}", file=sys.stderr)
        return 2
    try:
        name = announce_checkpoint(ns.run_dir, ns.checkpoint)
        refused = initial_model_refusal(ns.run_dir, ns.initial_model)
        if refused:
            print(f"sae-shards: cannot evaluate {ns.run_dir}: {refused}", file=sys.stderr)
            return 2
        result = evaluate_run(ns.run_dir, n_null=ns.n_null, from_step=ns.from_step,
                              steering=not ns.no_steering, checkpoint=name, seed=ns.seed,
                              null_run=ns.null_run, n_prompts=ns.n_prompts,
                              family_threshold=ns.family_threshold, task=task, out=ns.out,
                              initial_model=ns.initial_model,
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
