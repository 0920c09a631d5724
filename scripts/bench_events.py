"""SAE step on per-event samples: factored ``[T, m + n]`` against materialised dense ``[m, n]``.

    python -m scripts.bench_events            # CPU, 1 thread: 896x896, 4864x896 at T = 64, 256
    python -m scripts.bench_events --quick    # smoke run (seconds)
    python -m scripts.bench_events --capture  # also: capture overhead of granularity=group vs
                                              # step vs RL alone on the default job (minutes)

A per-event sample of a matrix target is ``X = L^T R`` with ``L [T, m]``, ``R [T, n]`` (see
``sae_shards/core/events.py``). Two ways to train the SAE on a batch of them:

- ``factored``: ``SAETrainer`` with a ``sample_form="factored"`` SAE: encode ``T (m + n) N r``
  per sample, the loss from ``T x T`` Grams and the active latents' factors, nothing dense;
- ``materialised``: form every ``L^T R`` (``T m n`` per sample, an ``[m, n]`` tensor each), then the
  existing dense-input step (``SAETrainer`` with a dense-form SAE: encode ``m n N r``).

One target of shape ``m x n`` per configuration, default ``SAEConfig`` (n_latents, k, rank, batch
size, signed top-k, AuxK as configured: no latent is dead within the few timed steps), random
events with all ``T`` rows used. The time of one step includes materialising the batch on the
materialised path. Every (path, shape, T) runs in a fresh subprocess, time-boxed to ``--seconds``
after ``--warmup`` untimed steps; peak memory is the peak RSS growth over the worker's RSS after a
tiny warm-up run (it includes the batch), as in ``scripts/bench_sae.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Sequence

import torch

from sae_shards.core import events
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import TargetSpec
from scripts.bench_sae import _fmt_mem, _rss_bytes, _size, spawn_worker

PATHS = ("factored", "materialised")


# ---------------------------------------------------------------------------- one configuration
def _build(spec: dict, m: int, n: int, T: int):
    """(step function, the SAE) for one path on a ``m x n`` target, and a random event batch."""
    from sae_shards.core.trainer import SAETrainer

    target = TargetSpec("w", (m, n), min(spec["rank"], m, n))
    cfg = SAEConfig(n_latents=spec["n_latents"], k=spec["k"], rank=spec["rank"],
                    batch_size=spec["batch"], seed=0)
    gen = torch.Generator().manual_seed(0)
    batch = {"w": torch.randn(spec["batch"], T, m + n, generator=gen)}
    batch["w"][..., m:].mul_(1e-3 / T ** 0.5)  # tiny, as RL gradients are
    if spec["path"] == "factored":
        sae = LowRankSAE([target], cfg, sample_form="factored")
        trainer = SAETrainer(sae)
        return (lambda: trainer.step(batch)), batch
    sae = LowRankSAE([target], cfg, sample_form="dense")
    trainer = SAETrainer(sae)
    return (lambda: trainer.step(events.materialize_all(batch, [target]))), batch


def run_config(spec: dict) -> dict:
    """Warm up, then time one (path, shape, T); runs inside a fresh worker process."""
    torch.set_num_threads(spec["threads"])
    step, _ = _build(spec, 8, 8, 2)  # fault in libtorch's code pages and thread pools
    for _ in range(3):
        step()
    del step
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _rss_bytes("VmRSS")

    step, batch = _build(spec, spec["m"], spec["n"], spec["T"])
    for _ in range(spec["warmup"]):
        step()
    steps, t0 = 0, time.perf_counter()
    while steps < spec["min_steps"] or (time.perf_counter() - t0 < spec["seconds"]
                                        and steps < spec["max_steps"]):
        metrics = step()
        steps += 1
    elapsed = time.perf_counter() - t0
    return dict(spec, steps=steps, elapsed=elapsed,
                ms_per_sample=1e3 * elapsed / (steps * spec["batch"]),
                peak_bytes=_rss_bytes("VmHWM") - base, fvu=metrics.fvu)


def _spawn(spec: dict) -> dict:
    return spawn_worker("scripts.bench_events", spec)


def format_table(rows: list[dict]) -> str:
    head = ("| target (m x n) | T | path | steps timed | ms / sample | samples/s | peak RSS growth "
            "| speed-up (materialised / factored) | memory (factored / materialised) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    mat = {(r["m"], r["n"], r["T"]): r for r in rows if r["path"] == "materialised"}
    for r in rows:
        cells = [f"{r['m']}x{r['n']}", str(r["T"]), r["path"], str(r["steps"]),
                 f"{r['ms_per_sample']:.2f}", f"{1e3 / r['ms_per_sample']:.1f}",
                 _fmt_mem(r["peak_bytes"])]
        d = mat.get((r["m"], r["n"], r["T"]))
        if r["path"] == "factored" and d is not None:
            cells += [f"{d['ms_per_sample'] / r['ms_per_sample']:.1f}x",
                      f"{r['peak_bytes'] / max(d['peak_bytes'], 1):.3f}"]
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info(threads: int) -> str:
    return (f"torch {torch.__version__}, python {platform.python_version()}, device cpu, "
            f"torch threads {threads} (of {os.cpu_count()} CPUs), "
            f"load average {os.getloadavg()[0]:.2f} at start")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default = SAEConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=lambda s: [_size(x) for x in s.split(",")],
                   default="896x896,4864x896", help="comma-separated target shapes m x n")
    p.add_argument("--T", type=lambda s: [int(x) for x in s.split(",")], default="64,256",
                   help="comma-separated rows per event")
    p.add_argument("--n-latents", type=int, default=default.n_latents)
    p.add_argument("--k", type=int, default=default.k)
    p.add_argument("--rank", type=int, default=default.rank)
    p.add_argument("--batch", type=int, default=default.batch_size)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0, help="time box per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    p.add_argument("--min-steps", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one 64x48 target, T=8, a few steps")
    p.add_argument("--capture", nargs="*", metavar="OVERRIDE",
                   help="also time the default job (Hydra overrides may follow) as RL alone, with "
                        "per-step and per-group capture (SAE off), and with the SAE inline: "
                        "scripts/bench_overhead.py's modes rl,capture,capture-group,inline,"
                        "inline-group")
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.T, args.seconds, args.min_steps, args.max_steps = \
            [(64, 48)], [8], 0.2, 1, 5
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; print and return the markdown report."""
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_config(json.loads(args.worker))))
        return ""
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    header = machine_info(args.threads)
    print(header, flush=True)
    rows = []
    for m, n in args.shapes:
        for T in args.T:
            for path in PATHS:
                spec = dict(path=path, m=m, n=n, T=T, rank=args.rank, n_latents=args.n_latents,
                            k=args.k, batch=args.batch, threads=args.threads,
                            seconds=args.seconds, warmup=args.warmup, min_steps=args.min_steps,
                            max_steps=args.max_steps)
                row = _spawn(spec)
                rows.append(row)
                print(f"{path:12s} {m}x{n} T={T}: {row['ms_per_sample']:.2f} ms/sample over "
                      f"{row['steps']} steps, peak {_fmt_mem(row['peak_bytes'])}", flush=True)
    text = "\n".join([
        header, "",
        f"SAE step per event sample: n_latents={args.n_latents}, k={args.k}, rank={args.rank}, "
        f"batch={args.batch} (SAEConfig defaults unless given), signed top-k; materialised = "
        f"L^T R formed per event then the dense-input step (its time included); time box "
        f"{args.seconds:g} s per configuration", "", format_table(rows), "",
        f"Total wall time {time.perf_counter() - t_start:.0f} s."])
    if args.capture is not None:
        from scripts.bench_overhead import main as overhead

        text += "\n\nCapture overhead on the job (`scripts/bench_overhead.py`):\n\n" + overhead(
            [*args.capture, "--modes", "rl,capture,capture-group,inline,inline-group"])
    print("\n" + text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
