"""Memory of the online activation log over a long run: ``ActivationLog`` against the plain
storage it replaced (Python lists of ints, one pair of small tensors per add), in one process.

    python -m scripts.bench_activation_log              # 20000 adds, ~10 s
    python -m scripts.bench_activation_log --adds 2000  # smoke run

Each add records ``--samples`` samples of ``--k`` codes (a per-event step of 8 events, k = 8),
as ``SAEWorkLoop.flush_activations`` does once per RL step. Memory is the growth of the process's
resident set over the adds (after ``gc.collect()``), per add, each storage in a fresh
process (spawned: freed memory of one would be reused by the other, and a fork would
inherit its parent's heap); the payload is what the samples'
codes and integers take as int64/fp32 tensors. Ratios are new / old from the same run.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os

import torch

from sae_shards.capture.runner import ActivationLog
from sae_shards.core.sparsity import SparseCodes


class ListLog:
    """The storage before 2026-12-02: lists of Python ints and one block of codes per add."""

    def __init__(self) -> None:
        self.rl_step, self.event, self.sae_step, self.codes = [], [], [], []

    def add(self, rl_steps, sae_step, codes, events=None) -> None:
        self.rl_step.extend(rl_steps)
        self.event.extend(events)
        self.sae_step.extend([sae_step] * len(rl_steps))
        self.codes.append(SparseCodes(codes.indices.cpu(), codes.values.float().cpu()))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def per_add(make, adds: int, samples: int, k: int) -> float:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):  # torch's first allocations (its pools, RNG) are not the log's
        SparseCodes(torch.randint(64, (samples, k), generator=gen),
                    torch.randn(samples, k, generator=gen))
    gc.collect()
    before, log = rss(), make()
    for i in range(adds):
        codes = SparseCodes(torch.randint(64, (samples, k), generator=gen),
                            torch.randn(samples, k, generator=gen))
        log.add([1000 + i] * samples, 5000 + i, codes, list(range(samples)))
    gc.collect()
    grown = rss() - before
    del log
    gc.collect()
    return grown / adds


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adds", type=int, default=20000)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    payload = args.samples * (args.k * (8 + 4) + 3 * 8)
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:  # a fresh
        old, new = (pool.apply(per_add, (make, args.adds, args.samples, args.k))  # process each
                    for make in (ListLog, ActivationLog))
    out = (f"{args.adds} adds of {args.samples} samples x k={args.k} (payload {payload} B an "
           f"add)\n\n| storage | bytes per add | over payload |\n|---|---|---|\n"
           f"| lists + a block per add (before) | {old:.0f} | {old / payload:.2f}x |\n"
           f"| ActivationLog | {new:.0f} | {new / payload:.2f}x |\n"
           f"| new / old | {new / old:.2f} | |")
    print(out)
    return out


if __name__ == "__main__":
    main()
