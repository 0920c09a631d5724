"""The two routes of ``events.truncate`` (an event's best rank-k factors) timed against each other.

    python -m scripts.bench_truncate            # CPU, 1 thread, ~1 min
    python -m scripts.bench_truncate --quick    # smoke run (seconds)

``truncate`` cuts an event's ``X = L^T R`` (``L [T, m]``, ``R [T, n]``) to ``capture.event_rank``
rows once per event, target and RL step: the planted benchmark does it 8 x 14 times a step, and
before the dense route it was a third of a per-event run's wall time. Routes:

- ``core``: QR of both factors' transposes and an SVD of their ``[q, q']`` core, ``X`` never formed;
- ``dense``: ``X`` formed (one GEMM) and the top eigenvectors of its smaller Gram matrix.

``truncate`` takes ``dense`` when ``T >= min(m, n)`` (the core would be as large as ``X``). Each
(shape, T) times both routes in the same process, interleaved, median of ``--repeats`` calls; the
ratio ``core / dense`` is the figure (> 1: dense is faster). The route ``truncate`` picks is marked.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_shards.core import events

SHAPES = [(64, 128), (128, 64), (64, 64), (896, 896), (896, 4864)]
"""The planted benchmark's tiny model's matrices, and a 0.5B model's attention and MLP shapes."""


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shapes = SHAPES[:3] if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    g = torch.Generator().manual_seed(0)
    print(f"rank {args.rank}, 1 thread, median of {repeats} calls; * = the route truncate takes\n")
    print("| m x n | T | core ms | dense ms | core / dense |")
    print("|---|---|---|---|---|")
    for m, n in shapes:
        small = min(m, n)
        for T in sorted({max(args.rank + 1, small // 4), small // 2, small, 2 * small}):
            if T <= args.rank:
                continue
            L = torch.randn(T, m, generator=g).double()
            R = torch.randn(T, n, generator=g).double()
            reps = max(2, repeats // 4) if m * n > 1_000_000 else repeats
            core = _time(lambda: events._truncate_core(L, R, args.rank), reps)
            dense = _time(lambda: events._truncate_dense(L, R, args.rank), reps)
            pick = "dense" if T >= small else "core"
            print(f"| {m} x {n} | {T} | {core * 1e3:.2f}{' *' if pick == 'core' else ''} | "
                  f"{dense * 1e3:.2f}{' *' if pick == 'dense' else ''} | {core / dense:.2f} |")


if __name__ == "__main__":
    main()
