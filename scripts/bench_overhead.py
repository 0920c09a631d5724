"""Wall time of the RL run alone vs RL + capture vs RL + capture + SAE (inline and thread).

    python -m scripts.bench_overhead                     # default job config, CPU, ~2-4 minutes
    python -m scripts.bench_overhead rl.max_steps=60 runner.sae_steps_per_rl_step=2
    python -m scripts.bench_overhead runner.sae_budget=0.05 --repeats 3   # medians of 3 rounds

Every mode builds the same job (Hydra overrides as for ``sae-shards train``; same seed, same
model, same task) in a fresh temporary run directory and times ``trainer.train()`` only. The
modes run one after another in this process, so the ratios come from one run on one machine:

- ``rl``: the GRPO trainer with no sae-shards callback;
- ``capture``: plus the job's ``ShardCallback`` capturing every delta into the ring buffer, its
  SAE never started (``runner.sae_start_step`` past the run; the run summary's "SAE never
  trained" warning, expected here, is not shown);
- ``inline``: plus the SAE trained inside the callback (``runner.concurrency=inline``);
- ``thread``: plus the SAE trained by the background worker (``runner.concurrency=thread``).

A suffix ``-group`` / ``-completion`` runs a mode with per-event capture
(``capture.granularity``), e.g. ``--modes rl,capture,capture-group,inline,inline-group``.

The callback is the job's own (``run.job.shard_callback``), so the timed pipeline is the one
``sae-shards train`` runs; the timed loop includes its end-of-run writes (final checkpoint and
activations; the final policy is not saved).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.run.config import JobConfig
from sae_shards.run.job import build_rl, resolve_device, shard_callback
from sae_shards.run.tracking import RunLogger

MODES = ("rl", "capture", "inline", "thread")


def time_mode(cfg: JobConfig, name: str, run_dir: Path) -> dict:
    """Build the job for mode ``name`` (``MODES``, optionally ``-group``/``-completion``) and time
    its RL training loop."""
    mode, _, granularity = name.partition("-")
    if mode not in MODES or granularity not in ("", "group", "completion"):
        raise SystemExit(f"unknown mode {name!r}: use {MODES}, optionally with -group or "
                         "-completion")
    if granularity:
        cfg = dataclasses.replace(cfg, capture=dataclasses.replace(cfg.capture,
                                                                   granularity=granularity))
    torch.set_num_threads(cfg.runner.torch_threads)
    torch.manual_seed(cfg.seed)
    rl = build_rl(cfg, run_dir, resolve_device(cfg.device))
    callback = None
    if mode != "rl":
        runner = dataclasses.replace(
            cfg.runner, concurrency="inline" if mode == "capture" else mode, checkpoint_every=0,
            sae_start_step=cfg.rl.max_steps + 1 if mode == "capture" else cfg.runner.sae_start_step)
        callback = shard_callback(cfg, run_dir / "shards", runner=runner, save_model=False,
                                  logger=RunLogger())
        callback.setup(rl.trainer.model, rl.trainer)
        rl.trainer.add_callback(callback)
    start = time.perf_counter()
    with _quiet_summary() if mode == "capture" else contextlib.nullcontext():
        rl.trainer.train()  # thread mode: on_train_end waits for the worker's backlog
    end = time.perf_counter()
    return {"mode": name, "total_s": end - start,
            "sae_steps": callback.parts.trainer.n_steps if callback else 0,
            "per_slot": callback.summary["samples_per_slot"] if callback else 0.0}


@contextlib.contextmanager
def _quiet_summary():
    """Hide the run summary's warnings (capture mode's SAE never trains, by design)."""
    logger = logging.getLogger("sae_shards.capture.summary")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _median_row(runs: list[dict]) -> dict:
    """The run with the median wall time (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for sae-shards train")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of modes")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the modes this many times, interleaved (rl, capture, ..., rl, "
                             "capture, ...); the table gives each mode's median and the range of "
                             "its per-round ratio to rl")
    args = parser.parse_args(argv)
    for mode in args.modes.split(","):  # every name checked before minutes of timing
        base, _, granularity = mode.partition("-")
        if base not in MODES or granularity not in ("", "group", "completion"):
            parser.error(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}, "
                         "each optionally with -group or -completion")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=["logging=disabled", *args.overrides]))
    modes = args.modes.split(",")
    rounds: list[list[dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            rounds.append([time_mode(cfg, mode, Path(tmp) / f"{mode}-{k}") for mode in modes])
    rows = [_median_row([rnd[i] for rnd in rounds]) for i in range(len(modes))]
    base = next((r["total_s"] for r in rows if r["mode"] == "rl"), None)
    steps = cfg.rl.max_steps
    lines = [
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"device {resolve_device(cfg.device)}, torch threads {cfg.runner.torch_threads}, "
        f"{steps} RL steps, "
        + (f"SAE budget {cfg.runner.sae_budget:g} of RL wall time" if cfg.runner.sae_budget else
           f"{cfg.runner.sae_steps_per_rl_step} SAE steps per RL step")
        + f" (batch {cfg.sae.batch_size}, {cfg.sae.n_latents} latents)",
        "",
        "| mode | RL loop s (incl. SAE backlog) | s / RL step | SAE steps | samples / slot "
        "| overhead vs rl |" + (" per-round ratios |" if args.repeats > 1 else ""),
        "|---|---|---|---|---|---|" + ("---|" if args.repeats > 1 else ""),
    ]
    rl_at = next((i for i, m in enumerate(modes) if m == "rl"), None)
    for i, r in enumerate(rows):
        ratio = f"{r['total_s'] / base:.2f}x" if base else "n/a"
        line = (f"| {r['mode']} | {r['total_s']:.1f} | {r['total_s'] / steps:.3f} | "
                f"{r['sae_steps']} | {r['per_slot']:.1f} | {ratio} |")
        if args.repeats > 1:
            per = ([f"{rnd[i]['total_s'] / rnd[rl_at]['total_s']:.2f}" for rnd in rounds]
                   if rl_at is not None else ["n/a"])
            line += f" {', '.join(per)} |"
        lines.append(line)
    if args.repeats > 1:
        lines.append(f"\nMedian of {args.repeats} interleaved rounds per mode; the overhead is the "
                     "ratio of medians.")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
