"""The SAE's training step on a mixture of experts' stacked tensor, by number of experts.

    python -m scripts.bench_experts            # CPU, 2 threads, ~1 min
    python -m scripts.bench_experts --quick    # smoke run (seconds)

A stacked target ``[E, m, n]`` is factored per expert: the SAE sees ``E`` matrix targets
(``core.targets.expand_stacked``) and loops over them in every pass, as it loops over a model's
weight matrices. This times ``SAETrainer.step`` on one stacked target of a fixed number of
entries (``--entries``, square experts ``m = n``) split into more and more experts, interleaved
in one process (rounds of every setting, the median step of each): the ratio to ``E = 1`` (the
same entries as one matrix) is the figure. An SAE on ``E`` experts also stores ``E`` times the
factors of one ``m x n`` matrix per latent (column ``weights``), so part of the cost is inherent;
the rest is the per-target overhead of many small products.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import TargetSpec, expand_stacked, split_stacked
from sae_shards.core.trainer import SAETrainer

EXPERTS = (1, 4, 16, 64, 256)


def _setting(experts: int, entries: int, n_latents: int, k: int, batch: int, seed: int):
    side = math.isqrt(entries // experts)
    spec = [TargetSpec("experts.down_proj", (experts, side, side))]
    sae = LowRankSAE(expand_stacked(spec), SAEConfig(n_latents=n_latents, k=k, batch_size=batch,
                                                      seed=seed))
    trainer = SAETrainer(sae)
    x = torch.randn(batch, experts, side, side, generator=torch.Generator().manual_seed(seed))
    sample = split_stacked({"experts.down_proj": x}, spec)
    trainer.step(sample)  # warm-up (and input_scale set)
    return side, sae.factored_param_count() // (2 * n_latents), lambda: trainer.step(sample)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1 << 20, help="entries of the target")
    parser.add_argument("--experts", default=",".join(map(str, EXPERTS)))
    parser.add_argument("--n-latents", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small target, 2 rounds")
    args = parser.parse_args(argv)
    entries = 1 << 14 if args.quick else args.entries
    rounds = 2 if args.quick else args.rounds
    counts = [int(e) for e in args.experts.split(",")]
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        settings = {e: _setting(e, entries, args.n_latents, args.k, args.batch, 0)
                    for e in counts}
        times: dict[int, list[float]] = {e: [] for e in counts}
        for _ in range(rounds):  # interleaved: machine noise falls on every setting alike
            for e, (_, _, step) in settings.items():
                t0 = time.perf_counter()
                step()
                times[e].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    base = statistics.median(times[counts[0]])
    lines = [f"{entries} entries, {args.n_latents} latents, k={args.k}, batch {args.batch}, "
             f"rank 1, {args.threads} threads, median of {rounds} interleaved steps",
             "", f"| experts E | each m x n | weights per latent | ms / step | vs E = {counts[0]} |",
             "|---|---|---|---|---|"]
    for e, (side, per_latent, _) in settings.items():
        med = statistics.median(times[e])
        lines.append(f"| {e} | {side} x {side} | {per_latent} | {med * 1e3:.1f} | "
                     f"{med / base:.2f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
