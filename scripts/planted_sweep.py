"""The planted-shard sweep (v2): per-event vs per-step samples on mixed and random batches.

    python -m scripts.planted_sweep --out /tmp/table.md      # the benchmark; docs/results.md
    python -m scripts.planted_sweep --seeds 0 --schedules mixed --no-null --jobs 1   # quick look

Each (seed, schedule) point is ONE GRPO run of ``experiment=planted`` (body-only policy) captured
by every ``--captures`` entry (``<group>-<kind>``, ``sae_shards.planted.benchmark``: ``event`` is
one sample per prompt group, a source name one sample per optimizer step), each with its own SAE;
every capture is scored by ``sae_shards.planted.evaluate.evaluate_run`` (causal tests for the
body). The null control (``task=multiskill_null``: same prompts and tags, a reward that ignores
the tag) runs on ``--null-schedules`` for every seed, with the captures that have an AUROC to
control there (``null_captures``: per-event ones on ``mixed``); its AUROC is the headline's
``auroc_null_control``. Extra Hydra overrides apply to every run. Points run ``--jobs`` at a time
in separate processes (one torch thread each).

The headline (``headline.json`` and the top of the report) is the mean over seeds of the
evaluation headline of ``--headline`` (default: body, ``mixed``, per-event). The default seeds
(30, 31, 32) were never used to choose any setting (0 and 1 were; 10-12 and 20-22 evaluated
earlier versions of the benchmark, 40-42, 50-52, 60-62, 70-72, 80-82 and 90-92 further fresh
sets; docs/results.md).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from sae_shards.cli import CONFIG_DIR, ConfigError, check_overrides, job_config_from_hydra
from sae_shards.planted.benchmark import GROUPS, KINDS, run_planted
from sae_shards.recipe.tasks import SCHEDULES
from sae_shards.planted.evaluate import HEADLINE_KEYS, evaluate_run

CAPTURES = "body-event,body-grad"
"""Per-event body samples (the headline) beside per-step body gradients."""
FIGURES = tuple(k for k in HEADLINE_KEYS if k not in ("granularity", "source", "schedule", "group"))


def _init_worker() -> None:
    torch.set_num_threads(1)
    if sys.platform == "linux":  # die with the sweep: killing it leaves no orphan workers
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def null_captures(captures: tuple[str, ...], schedule: str) -> tuple[str, ...]:
    """The captures a null-control point runs: those with an AUROC to control. On ``mixed`` every
    step holds every task, so a per-step capture has no AUROC there (its null row would be
    empty) and is left out; per-event captures always stay."""
    if schedule != "mixed":
        return captures
    return tuple(c for c in captures if c.partition("-")[2] == "event")


def point_config(seed: int, schedule: str, null: bool, overrides: list[str]):
    """The job config of one point (``ConfigError`` for a bad schedule or override)."""
    task = "multiskill_null" if null else "multiskill"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return job_config_from_hydra(compose("config", overrides=[
            "experiment=planted", f"task={task}", f"task.options.schedule={schedule}",
            f"seed={seed}", "overwrite=true", *overrides]))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """Every argument checked before a run starts (a typo was a traceback from a worker after
    the first runs, and a --headline naming no capture an all-null headline after the whole
    sweep): the seeds, as ints."""
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 30,31,32")
    captures = args.captures.split(",")
    for c in captures:
        group, _, kind = c.partition("-")
        if group not in GROUPS or kind not in KINDS:
            parser.error(f"--captures: {c!r} is not <group>-<kind> with a group of {list(GROUPS)} "
                         f"and a kind of {list(KINDS)}")
    for name in ("schedules", "null_schedules"):
        for sch in getattr(args, name).split(","):
            if sch not in SCHEDULES:
                parser.error(f"--{name.replace('_', '-')}: {sch!r} is not one of {list(SCHEDULES)}")
    schedule, colon, capture = args.headline.partition(":")
    if not colon or schedule not in args.schedules.split(",") or capture not in captures:
        parser.error(f"--headline {args.headline!r}: give <schedule>:<capture> among the sweep's "
                     f"--schedules {args.schedules} and --captures {args.captures}")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give at least 1")
    for null in (False, True):  # the overrides, composed as the points compose them
        try:
            check_overrides(args.overrides)  # a misspelt key named with the closest field
            point_config(seeds[0], schedule, null, args.overrides)
        except ConfigError as e:
            parser.error(f"the overrides {' '.join(args.overrides)}: {e}")
    return seeds


def run_point(seed: int, schedule: str, null: bool, captures: tuple[str, ...],
              overrides: list[str], out: Path) -> list[dict]:
    """One GRPO run of the point, every capture evaluated: one row per capture."""
    task = "multiskill_null" if null else "multiskill"
    cfg = point_config(seed, schedule, null, overrides)
    rows = []
    t0 = time.perf_counter()
    dirs = run_planted(cfg, out / f"{task}-{schedule}-seed{seed}", captures=captures)
    rl_s = time.perf_counter() - t0
    for name, sub in dirs.items():
        group, _, kind = name.partition("-")
        r = evaluate_run(sub, steering=group == "body" and not null, seed=seed)
        rows.append({"task": task, "schedule": schedule, "seed": seed, "capture": name,
                     "group": group, "kind": kind, "rl_s": rl_s,
                     "source": r["headline"]["source"],  # evaluation.json's name of a sample
                     **{k: r["headline"].get(k) for k in FIGURES},
                     "energy_share_max": r.get("energy_share_max"),
                     "mmcs_margin_oracle": r.get("mmcs_margin_oracle"),
                     **{f"mmcs_class_mean_{k}": v["mmcs_margin"]
                        for k, v in (r.get("mmcs_class_mean") or {}).items()},
                     "fvu_heldout": r.get("fvu_heldout"), "n_heldout": r.get("n_heldout")})
    return rows


def _num(x) -> float | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
        else None


def _finite(rows: list[dict], key: str) -> list[float]:
    """The rows' finite figures under ``key`` (a seed whose figure is missing or NaN has none)."""
    return [v for v in (_num(r.get(key)) for r in rows) if v is not None]


def _cell(rows: list[dict], key: str) -> str:
    """Mean ± standard deviation over the seeds, with how many seeds had a figure when some
    did not (a mean over fewer seeds than the row's must not read as over all of them)."""
    xs = _finite(rows, key)
    if not xs:
        return "-"
    of = f" ({len(xs)} of {len(rows)} seeds)" if len(xs) < len(rows) else ""
    if len(xs) == 1:
        return f"{xs[0]:.3f}{of}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}{of}"


COLUMNS = {"auroc_task": "auroc_task", "auroc_supervised": "supervised AUROC",
           "mmcs_margin": "mmcs margin", "mmcs_margin_supervised": "supervised mmcs margin",
           "mmcs_margin_oracle": "ground truth's own mmcs margin",
           "mmcs_class_mean_families": "family mmcs margin, class means",
           "mmcs_class_mean_oracle": "ground truth's own, class means",
           "ablation_selectivity": "ablation sel.", "ablation_selectivity_random": "random",
           "ablation_selectivity_shuffled": "shuffled", "ablation_own_first": "own task first",
           "steering_selectivity": "steering sel.", "steering_selectivity_random": "random ",
           "auroc_task_family": "family auroc_task", "mmcs_margin_family": "family mmcs margin",
           "ablation_selectivity_family": "family ablation sel.",
           "ablation_selectivity_family_random": "random (family norm)",
           "steering_selectivity_family": "family steering sel.", "n_families": "families",
           "energy_share_max": "max task energy", "fvu_heldout": "fvu_heldout"}


def table(rows: list[dict]) -> str:
    head = "| task | schedule | capture | " + " | ".join(COLUMNS.values()) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for key in sorted({(r["task"], r["schedule"], r["capture"]) for r in rows}):
        sel = [r for r in rows if (r["task"], r["schedule"], r["capture"]) == key]
        lines.append("| " + " | ".join(key) + " | "
                     + " | ".join(_cell(sel, k) for k in COLUMNS) + " |")
    return "\n".join(lines)


def headline(rows: list[dict], schedule: str, capture: str) -> dict:
    """Mean over seeds of the chosen setting's figures; the null control's AUROC beside them.
    ``seeds_without``: for each figure some seed lacked (missing or NaN), the seeds its mean
    leaves out (the mean is None where no seed had it)."""
    sel = [r for r in rows if (r["task"], r["schedule"], r["capture"]) ==
           ("multiskill", schedule, capture)]
    null = [r for r in rows if (r["task"], r["schedule"], r["capture"]) ==
            ("multiskill_null", schedule, capture)]
    mean = lambda rs, k: statistics.fmean(xs) if (xs := _finite(rs, k)) else None  # noqa: E731
    out = {k: mean(sel, k) for k in FIGURES}
    out["auroc_null_control"] = mean(null, "auroc_task")
    out["auroc_null_control_family"] = mean(null, "auroc_task_family")
    group, _, kind = capture.partition("-")
    sources = sorted({r["source"] for r in sel if r.get("source")})  # evaluation.json's words
    out.update(granularity="group" if kind == "event" else "step",
               source=sources[0] if len(sources) == 1 else kind,
               schedule=schedule, group=group, seeds=sorted({r["seed"] for r in sel}))
    lacking = {k: sorted(r["seed"] for r in rs if _num(r.get(key)) is None)
               for k, rs, key in [*((k, sel, k) for k in FIGURES),
                                  ("auroc_null_control", null, "auroc_task"),
                                  ("auroc_null_control_family", null, "auroc_task_family")]}
    out["seeds_without"] = {k: v for k, v in lacking.items() if v}
    return out


def _without(head: dict, key: str) -> str:
    """What a headline line adds when some seeds had no figure for ``key``."""
    seeds = head["seeds_without"].get(key)
    return f" (without seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})" if seeds else ""


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    parser.add_argument("--seeds", default="30,31,32", help="comma-separated run seeds")
    parser.add_argument("--schedules", default="mixed,random", help="multiskill schedules")
    parser.add_argument("--captures", default=CAPTURES, help="comma-separated <group>-<kind>")
    parser.add_argument("--null-schedules", default="mixed",
                        help="schedules of the null control (multiskill_null)")
    parser.add_argument("--no-null", action="store_true", help="skip the null control")
    parser.add_argument("--headline", default="mixed:body-event", help="schedule:capture")
    parser.add_argument("--runs", type=Path, default=Path("runs/planted_sweep"),
                        help="where the runs go")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (none: printed)")
    parser.add_argument("--jobs", type=int, default=2, help="points run at once (processes)")
    args = parser.parse_args(argv)
    seeds = check_args(parser, args)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    captures = tuple(args.captures.split(","))
    points = [(s, sch, False, captures) for s in seeds for sch in args.schedules.split(",")]
    if not args.no_null:
        points += [(s, sch, True, caps) for s in seeds for sch in args.null_schedules.split(",")
                   if (caps := null_captures(captures, sch))]
    args.runs.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failed: list[str] = []
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"),
                             initializer=_init_worker) as pool:
        futures = {pool.submit(run_point, seed, sch, null, caps, args.overrides, args.runs):
                   (seed, sch, null) for seed, sch, null, caps in points}
        for future in as_completed(futures):
            seed, sch, null = futures[future]
            point = f"seed {seed} {sch}{' null' if null else ''}"
            try:
                rows += future.result()
            except Exception as e:  # one failed point: said, and the others still reported
                failed.append(f"{point}: {type(e).__name__}: {e}")
                print(f"{point} FAILED after {time.perf_counter() - t0:.0f} s: {failed[-1]}",
                      file=sys.stderr, flush=True)
                continue
            (args.runs / "results.json").write_text(json.dumps(rows, indent=2))  # partial too
            print(f"{point} done after {time.perf_counter() - t0:.0f} s", flush=True)
    schedule, _, capture = args.headline.partition(":")
    head = headline(rows, schedule, capture)
    (args.runs / "headline.json").write_text(json.dumps(head, indent=2))
    wall = time.perf_counter() - t0
    text = ("Headline (mean over seeds " + ", ".join(map(str, head["seeds"])) + f"; {schedule}, "
            f"{capture}):\n\n" + "\n".join(f"- {k}: {_cell([head], k)}{_without(head, k)}" for k in FIGURES)
            + "\n\n" + table(rows)
            + f"\n\n{len(seeds)} seeds, {len(points)} GRPO runs, {len(rows)} evaluations, "
              f"{wall:.0f} s wall, {args.jobs} processes.\n"
            + "".join(f"\nFAILED: {f}\n" for f in failed))
    if args.out:
        args.out.write_text(text)
    print(text)
    if failed:  # the report holds the other points; the command still says it failed
        raise SystemExit(f"planted_sweep: {len(failed)} of {len(points)} points failed (above)")
    return text


if __name__ == "__main__":
    main()
