"""The planted-shard sweep: seeds x schedules (+ the null control), every source and target group.

    python -m scripts.planted_sweep --out /tmp/table.md   # ~19 min on 2 cores; docs/results.md
    python -m scripts.planted_sweep --seeds 0 --schedules random --no-null --jobs 1   # quick look

Each (seed, schedule) is ONE GRPO run of ``experiment=planted`` captured by every source
(update, grad, precond, deconv) for both target groups (body, readout), each with its own SAE
(``sae_shards.planted.run_planted``); every (group, source) directory is scored by
``sae-shards evaluate``. The null control (``task=multiskill_null``: same prompts and tags, reward
ignores the tag) runs on the ``random`` schedule for every seed. Extra Hydra overrides apply to
every run. Points run ``--jobs`` at a time in separate processes (one torch thread each).

The default seeds (20, 21, 22) were never used to choose the benchmark's settings (seeds 0 and 1
were; seeds 10-12 evaluated an earlier, 300-step version, see docs/results.md). Beside the table it reports how closely ``deconv`` (from updates alone) matches
``precond`` (from Adam's state) on the same steps: the per-step cosine over the body targets.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from sae_shards.core.checkpoint import read_tensors
from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.planted.evaluate import evaluate_run
from sae_shards.planted.benchmark import GROUPS, SOURCES, run_planted

FIGURES = ("auroc_task", "auroc_null", "mmcs", "mmcs_null", "mmcs_margin", "mmcs_supervised",
           "mmcs_supervised_null", "supervised_auroc", "fvu_heldout")


def source_cosines(a_dir: Path, b_dir: Path) -> list[float]:
    """Per-step cosine (all targets flattened, float64) between two sources' saved samples of the
    same RL steps; steps where either sample is all zero are left out."""
    a, b = read_tensors(a_dir / "samples.safetensors"), read_tensors(b_dir / "samples.safetensors")
    names = sorted(k for k in a if k.startswith("sample."))
    row_b = {int(s): i for i, s in enumerate(b["rl_step"])}
    out = []
    for i, step in enumerate(a["rl_step"].tolist()):
        if step not in row_b:
            continue
        x = torch.cat([a[n][i].double().flatten() for n in names])
        y = torch.cat([b[n][row_b[step]].double().flatten() for n in names])
        if x.norm() > 0 and y.norm() > 0:
            out.append(float(x @ y / (x.norm() * y.norm())))
    return out


def _init_worker() -> None:
    torch.set_num_threads(1)
    if sys.platform == "linux":  # die with the sweep: killing it leaves no orphan workers
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_point(seed: int, schedule: str, null: bool, overrides: list[str], out: Path,
              n_prompts: int) -> list[dict]:
    task = "multiskill_null" if null else "multiskill"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "experiment=planted", f"task={task}", f"task.options.schedule={schedule}",
            f"seed={seed}", "overwrite=true", *overrides]))
    rows = []
    dirs = run_planted(cfg, out / f"{task}-{schedule}-seed{seed}")
    for name, sub in dirs.items():
        group, source = name.split("-")
        r = evaluate_run(sub, steering=group == "body", n_prompts=n_prompts, n_null=5, seed=seed)
        st = r["steering"] or {}
        rows.append({"task": task, "schedule": schedule, "seed": seed, "group": group,
                     "source": source, **{k: r[k] for k in FIGURES},
                     "mmcs_supervised_margin": r["mmcs_supervised"] - r["mmcs_supervised_null"],
                     "selectivity": st.get("selectivity"),
                     "control_selectivity": st.get("control_selectivity")})
    cos = source_cosines(dirs["body-deconv"], dirs["body-precond"])
    for r in rows:
        if r["group"] == "body" and r["source"] == "deconv":
            r["deconv_precond_cos"] = cos
    return rows


def _cell(rows: list[dict], key: str) -> str:
    xs = [r[key] for r in rows if r[key] is not None and r[key] == r[key]]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


COLUMNS = {"auroc_task": "auroc_task", "auroc_null": "auroc null",
           "supervised_auroc": "supervised AUROC", "mmcs": "mmcs", "mmcs_null": "mmcs null",
           "mmcs_margin": "mmcs margin", "mmcs_supervised_margin": "supervised mmcs margin",
           "fvu_heldout": "fvu_heldout", "selectivity": "steering selectivity",
           "control_selectivity": "random control"}


def table(rows: list[dict]) -> str:
    head = "| task | schedule | group | source | " + " | ".join(COLUMNS.values()) + " |"
    lines = [head, "|" + "---|" * (4 + len(COLUMNS))]
    keys = sorted({(r["task"], r["schedule"], r["group"], r["source"]) for r in rows},
                  key=lambda k: (k[0], k[1], list(GROUPS).index(k[2]), SOURCES.index(k[3])))
    for task, schedule, group, source in keys:
        sel = [r for r in rows if (r["task"], r["schedule"], r["group"], r["source"]) ==
               (task, schedule, group, source)]
        lines.append(f"| {task} | {schedule} | {group} | {source} | " + " | ".join(
            _cell(sel, k) for k in COLUMNS) + " |")
    return "\n".join(lines)


def agreement(rows: list[dict]) -> str:
    """One line on deconv vs precond per-step cosines over every run of the sweep."""
    cos = sorted(c for r in rows for c in r.get("deconv_precond_cos", []))
    if not cos:
        return ""
    return (f"deconv vs precond, body, per-step cosine over {len(cos)} steps of "
            f"{sum('deconv_precond_cos' in r for r in rows)} runs: median {statistics.median(cos):.4f}, "
            f"5th percentile {cos[len(cos) // 20]:.4f}, min {cos[0]:.4f}; "
            f"{sum(c > 0.99 for c in cos) / len(cos):.1%} of steps above 0.99.\n")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    parser.add_argument("--seeds", default="20,21,22")
    parser.add_argument("--schedules", default="random,blocks")
    parser.add_argument("--no-null", action="store_true", help="skip the null control")
    parser.add_argument("--runs", type=Path, default=Path("runs/planted_sweep"))
    parser.add_argument("--n-prompts", type=int, default=16, help="prompts per steering reward")
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default: print)")
    parser.add_argument("--jobs", type=int, default=2, help="points run at once (processes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    args.runs.mkdir(parents=True, exist_ok=True)
    points = [(seed, schedule, False) for seed in seeds for schedule in args.schedules.split(",")]
    points += [] if args.no_null else [(seed, "random", True) for seed in seeds]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"),
                             initializer=_init_worker) as pool:
        futures = {pool.submit(run_point, seed, schedule, null, args.overrides, args.runs,
                               args.n_prompts): (seed, schedule, null)
                   for seed, schedule, null in points}
        for future in as_completed(futures):
            seed, schedule, null = futures[future]
            rows += future.result()
            (args.runs / "results.json").write_text(json.dumps(rows, indent=2))  # partial too
            print(f"seed {seed} {schedule}{' null' if null else ''} done after "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    text = table(rows) + f"\n\n{len(seeds)} seeds, {len(rows)} (run, group, source) evaluations, " \
                         f"{time.perf_counter() - t0:.0f} s wall, {args.jobs} processes.\n\n" \
        + agreement(rows)
    if args.out:
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
