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

A second table asks whether batching the experts would pay: the encoder's inner products
(forward and backward) as the SAE takes them, one expert at a time, against one batched
product over all experts on the same factors (``batched_inner``, a design not built; its
result is checked equal to the loop's before it is timed).
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


def batched_inner(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``sum_e sum_r left[e, i, :, r]^T x[b, e] right[e, i, :, r]`` for all latents at once:
    x [b, E, m, n], left [E, N, m, r], right [E, N, n, r] -> [b, N]. One batched GEMM over
    the experts (the batch moved behind the experts axis: a copy of x)."""
    b, E, m, n = x.shape
    _, N, _, r = left.shape
    L = left.permute(0, 2, 1, 3).reshape(E, m, N * r)  # [E, m, N*r]
    R = right.permute(0, 2, 1, 3).reshape(E, n, N * r)  # [E, n, N*r]
    xr = torch.bmm(x.transpose(0, 1).reshape(E, b * m, n), R).view(E, b, m, N * r)
    return (xr * L[:, None]).sum(2).view(E, b, N, r).sum((0, 3))


def _encoder_pair(sae: LowRankSAE, sample: dict, x: torch.Tensor):
    """The SAE's looped encoder product and the batched one on copies of the same factors,
    each as a forward + backward closure; the two results are checked equal first."""
    A = torch.stack([tf.A.detach() for tf in sae.factors]).requires_grad_()
    B = torch.stack([tf.B.detach() for tf in sae.factors]).requires_grad_()
    with torch.no_grad():
        looped, batched = sae.inner(sample), batched_inner(x, A, B)
    if not torch.allclose(looped, batched, rtol=1e-4, atol=1e-3 * looped.abs().max().item()):
        raise AssertionError("batched_inner disagrees with the SAE's encoder")
    return (lambda: sae.inner(sample).square().sum().backward(),
            lambda: batched_inner(x, A, B).square().sum().backward())


def _setting(experts: int, entries: int, n_latents: int, k: int, batch: int, seed: int):
    side = math.isqrt(entries // experts)
    spec = [TargetSpec("experts.down_proj", (experts, side, side))]
    sae = LowRankSAE(expand_stacked(spec), SAEConfig(n_latents=n_latents, k=k, batch_size=batch,
                                                      seed=seed))
    trainer = SAETrainer(sae)
    x = torch.randn(batch, experts, side, side, generator=torch.Generator().manual_seed(seed))
    sample = split_stacked({"experts.down_proj": x}, spec)
    trainer.step(sample)  # warm-up (and input_scale set)
    return (side, sae.factored_param_count() // (2 * n_latents), lambda: trainer.step(sample),
            *_encoder_pair(sae, sample, x))


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
        times = {(e, part): [] for e in counts for part in range(3)}
        for _ in range(rounds):  # interleaved: machine noise falls on every setting alike
            for e, (_, _, *runs) in settings.items():
                for part, run in enumerate(runs):
                    t0 = time.perf_counter()
                    run()
                    times[e, part].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    med = {key: statistics.median(t) for key, t in times.items()}
    base = med[counts[0], 0]
    lines = [f"{entries} entries, {args.n_latents} latents, k={args.k}, batch {args.batch}, "
             f"rank 1, {args.threads} threads, median of {rounds} interleaved steps",
             "", f"| experts E | each m x n | weights per latent | ms / step | vs E = {counts[0]} |",
             "|---|---|---|---|---|"]
    for e, (side, per_latent, *_) in settings.items():
        lines.append(f"| {e} | {side} x {side} | {per_latent} | {med[e, 0] * 1e3:.1f} | "
                     f"{med[e, 0] / base:.2f} |")
    lines += ["", "Encoder inner products, forward + backward: the SAE's per-expert loop against "
              "one batched product (batched_inner, not built)", "",
              "| experts E | loop ms | batched ms | loop / batched |", "|---|---|---|---|"]
    for e in counts:
        lines.append(f"| {e} | {med[e, 1] * 1e3:.1f} | {med[e, 2] * 1e3:.1f} | "
                     f"{med[e, 1] / med[e, 2]:.2f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
