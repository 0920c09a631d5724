"""``sae-shards compare A B``: each trained shard of A matched to its nearest in B, beside a
chance control (``analysis.compare``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sae_shards.cli.shared import non_negative, positive, set_threads


def run(args: list[str]) -> int:
    import argparse

    import json

    from sae_shards.analysis.compare import (MIN_DENSITY, REPLICATED, check_min_density,
                                             check_threshold, compare_shards, comparison_lines,
                                             comparison_path_refusal, load_shards)
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
        "B whose direction is nearest (|cosine|) among B's trained shards, beside a chance "
        "control: the 95th percentile over redraws of the best |cosine| with as many random "
        "directions of the span of B's trained shards, each cut to the SAE's rank (where A "
        "and B share nothing, 1 pair in 20 beats it). Always-on (drift) shards are listed "
        "apart.")
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
    parser.add_argument("--top", type=non_negative, default=20, metavar="N",
                        help="pairs to list, by |cosine| (0: every pair; default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                        help="also write every pair and figure as JSON (its folder is made)")
    parser.add_argument("--threads", type=positive, default=1,
                        help="torch threads (default %(default)s)")
    ns = parser.parse_args(args)
    set_threads(ns.threads)
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
    for side, path in (("A", ns.a), ("B", ns.b)):  # audit 134 F7: as analyze says of one
        writer = rundir.live_writer(path) if path.is_dir() else None
        if writer:
            print(f"sae-shards: note: {side}, {path}, is still being written ({writer}): its "
                  "shards are those of a checkpoint of an SAE still training, and its older "
                  "checkpoints are removed as it goes; compare it once it has finished or "
                  "stopped for figures that stay", file=sys.stderr)
    try:
        print("\n".join(comparison_lines(result, a, b, ns.top or None)), flush=True)
    except BrokenPipeError:  # `| head`: the rest of the printout is unwanted, --out is not
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if ns.out is not None:
        try:
            ns.out.parent.mkdir(parents=True, exist_ok=True)
            subsets = {side: {"path": origin[0], "indices": origin[1]}
                       for side, origin in (("a", a.subset_origin()), ("b", b.subset_origin()))
                       if origin is not None}
            rundir.write_text(ns.out, json.dumps(rundir.strict_json(
                {"a": str(a.path), "b": str(b.path), **result.to_dict(),
                 **({"subset_of": subsets} if subsets else {})}), indent=2))
        except (OSError, rundir.RunWriteError) as e:
            print(f"sae-shards: the comparison above was not written to {ns.out}: "
                  f"{getattr(e, 'what', None) or e}", file=sys.stderr)
            return 2
    return 0
