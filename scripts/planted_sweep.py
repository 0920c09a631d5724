"""The planted-shard sweep: seeds x schedules (+ the null control), every source and target group.

    python -m scripts.planted_sweep                       # writes docs/results.md (~20-30 min CPU)
    python -m scripts.planted_sweep --seeds 0 --schedules random --out /tmp/r.md   # quick look

Each (seed, schedule) is ONE GRPO run of ``experiment=planted`` captured by every source
(update, grad, precond, deconv) for both target groups (body, readout), each with its own SAE
(``sae_shards.planted.run_planted``); every (group, source) directory is scored by
``sae-shards evaluate``. The null control (``task=multiskill_null``: same prompts and tags, reward
ignores the tag) runs on the ``random`` schedule for every seed. Extra Hydra overrides apply to
every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.evaluate import evaluate_run
from sae_shards.planted import GROUPS, SOURCES, run_planted

FIGURES = ("auroc_task", "auroc_null", "mmcs", "mmcs_null", "supervised_auroc", "fvu_heldout")


def run_point(seed: int, schedule: str, null: bool, overrides: list[str], out: Path,
              n_prompts: int) -> list[dict]:
    task = "multiskill_null" if null else "multiskill"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "experiment=planted", f"task={task}", f"task.options.schedule={schedule}",
            f"seed={seed}", "overwrite=true", *overrides]))
    rows = []
    for name, sub in run_planted(cfg, out / f"{task}-{schedule}-seed{seed}").items():
        group, source = name.split("-")
        r = evaluate_run(sub, steering=group == "body", n_prompts=n_prompts, n_null=5, seed=seed)
        st = r["steering"] or {}
        rows.append({"task": task, "schedule": schedule, "seed": seed, "group": group,
                     "source": source, **{k: r[k] for k in FIGURES},
                     "selectivity": st.get("selectivity"),
                     "control_selectivity": st.get("control_selectivity")})
    return rows


def _cell(rows: list[dict], key: str) -> str:
    xs = [r[key] for r in rows if r[key] is not None and r[key] == r[key]]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def table(rows: list[dict]) -> str:
    head = ("| task | schedule | group | source | auroc_task | auroc null | mmcs | mmcs null | "
            "supervised AUROC | fvu_heldout | steering selectivity | random control |")
    lines = [head, "|" + "---|" * 12]
    keys = sorted({(r["task"], r["schedule"], r["group"], r["source"]) for r in rows},
                  key=lambda k: (k[0], k[1], list(GROUPS).index(k[2]), SOURCES.index(k[3])))
    for task, schedule, group, source in keys:
        sel = [r for r in rows if (r["task"], r["schedule"], r["group"], r["source"]) ==
               (task, schedule, group, source)]
        lines.append(f"| {task} | {schedule} | {group} | {source} | " + " | ".join(
            _cell(sel, k) for k in ("auroc_task", "auroc_null", "mmcs", "mmcs_null",
                                    "supervised_auroc", "fvu_heldout", "selectivity",
                                    "control_selectivity")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--schedules", default="random,blocks")
    parser.add_argument("--no-null", action="store_true", help="skip the null control")
    parser.add_argument("--runs", type=Path, default=Path("runs/planted_sweep"))
    parser.add_argument("--n-prompts", type=int, default=16, help="prompts per steering reward")
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default: print)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    args.runs.mkdir(parents=True, exist_ok=True)
    points = [(seed, schedule, False) for seed in seeds for schedule in args.schedules.split(",")]
    points += [] if args.no_null else [(seed, "random", True) for seed in seeds]
    for seed, schedule, null in points:
        rows += run_point(seed, schedule, null, args.overrides, args.runs, args.n_prompts)
        (args.runs / "results.json").write_text(json.dumps(rows, indent=2))  # partial results too
        print(f"seed {seed} {schedule}{' null' if null else ''} done after "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    text = table(rows) + f"\n\n{len(seeds)} seeds, {len(rows)} (run, group, source) evaluations, " \
                         f"{time.perf_counter() - t0:.0f} s wall.\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
