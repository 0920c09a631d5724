"""Throughput and peak memory of the low-rank SAE against a dense SAE with the same latents.

    python -m scripts.bench_sae                      # CPU, 1 thread, default sizes (< 5 min)
    python -m scripts.bench_sae --device cuda --threads 4 --out bench.md

One target matrix of growing size ``m x n``; fixed ``n_latents``, ``k`` and batch. Both SAEs are
driven by the same :class:`SAETrainer` (same signed top-k, FVU loss, input scaling, Adam and
per-step decoder renormalisation), so only the SAE differs. A throughput figure is samples per
second of ``SAETrainer.step`` (forward, backward, Adam, renorm) after warm-up, each configuration
time-boxed to ``--seconds``. Every (implementation, size) runs in a fresh subprocess, so its peak
memory is its own: peak RSS growth over the worker's RSS after imports on CPU (includes the input
batch), ``torch.cuda.max_memory_allocated`` on CUDA. A configuration whose estimated memory
exceeds ``--mem-budget-gib`` is reported as "does not fit" without being allocated.

AuxK is off (``aux_coef=0``) in both: its cost depends on how many latents happen to be dead,
which drifts with the number of steps and would make the figures depend on the time box.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_shards.core.metrics import match_directions
from sae_shards.core.sae import LowRankSAE, SAEOutput
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.sparsity import SparseCodes
from sae_shards.core.synthetic import PlantedConfig, PlantedStream
from sae_shards.core.targets import TargetSpec, total_numel
from sae_shards.core.trainer import SAETrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
MIB = 1 << 20
# Batch-sized fp32 tensors alive at the peak of one step (input, NaN-filtered copy, scaled input,
# centred input, reconstruction, residual, their squares and gradients). Measured, see docs.
ACT_COPIES = 9


# ---------------------------------------------------------------------------- the dense baseline
class DenseSAE(nn.Module):
    """A plain SAE over the flattened sample: ``W_enc [D, N]``, ``W_dec [N, D]`` (unit rows).

    It duck-types the parts of :class:`LowRankSAE` that :class:`SAETrainer` uses, so both are
    trained by the same code. Decoding gathers only the active rows (``embedding_bag``), as a
    sensible dense SAE would; the encoder is one ``[b, D] @ [D, N]`` matmul.
    """

    def __init__(self, targets: Sequence[TargetSpec], cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.targets = list(targets)
        self.dim = total_numel(self.targets)  # D
        gen = torch.Generator().manual_seed(cfg.seed)
        self.W_dec = nn.Parameter(torch.randn(cfg.n_latents, self.dim, generator=gen))  # [N, D]
        with torch.no_grad():
            self.normalize_decoder_()
        self.W_enc = nn.Parameter(self.W_dec.detach().T.contiguous())  # [D, N], tied at init
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.ParameterList(
            nn.Parameter(torch.zeros(t.shape), requires_grad=cfg.use_b_dec) for t in self.targets
        )
        self.register_buffer("input_scale", torch.zeros(()))
        self.register_buffer("threshold", torch.full((), math.nan))

    # Same input scaling and sparsity code as the low-rank SAE (they only read cfg and buffers).
    to_scaled = LowRankSAE.to_scaled
    select = LowRankSAE.select

    @property
    def device(self) -> torch.device:
        return self.b_enc.device

    def param_count(self) -> int:
        return 2 * self.cfg.n_latents * self.dim

    def _flat(self, parts: list[Tensor]) -> Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def forward(self, xs, training: bool = False) -> SAEOutput:
        centred = self._flat([(xs[t.name] - bd).flatten(1) for t, bd in zip(self.targets, self.b_dec)])
        pre = centred @ self.W_enc + self.b_enc  # [b, N]
        codes, floor = self.select(pre, training)
        return SAEOutput(pre, codes, self.decode(codes), floor)

    def decode(self, codes: SparseCodes, with_bias: bool = True) -> dict[str, Tensor]:
        idx, val = codes  # [b, k]
        flat = F.embedding_bag(idx, self.W_dec, per_sample_weights=val, mode="sum")  # [b, D]
        out, start = {}, 0
        for t, bd in zip(self.targets, self.b_dec):
            rec = flat[:, start:start + t.numel].view(-1, *t.shape)
            out[t.name] = rec + bd if with_bias else rec
            start += t.numel
        return out

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


# ---------------------------------------------------------------------------- memory estimates
def estimate_bytes(impl: str, m: int, n: int, rank: int, n_latents: int, batch: int) -> int:
    """Memory one training step needs: parameters, grads, 2 Adam moments, the temporaries of
    backward and of Adam (for-loop Adam allocates two parameter-sized tensors for its
    denominator) and the batch-sized activations. Within ~10% of the measured peaks on CPU."""
    D = m * n
    acts = ACT_COPIES * batch * D
    if impl == "dense":
        weights = 2 * n_latents * D  # W_enc and W_dec
        return 4 * (4 * weights + 3 * n_latents * D + acts)
    weights = 2 * n_latents * rank * (m + n)
    encode = 3 * batch * min(m, n) * n_latents * rank  # [b, min(m,n), N*r] and its grads
    return 4 * (5 * weights + acts + encode)


# ---------------------------------------------------------------------------- one configuration
def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status (CPU memory needs Linux)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_and_train(spec: dict, device: torch.device, steps: int):
    """The SAE, its trainer and one random batch, after ``steps`` untimed steps.

    Called once on a tiny 8x8 target before the memory baseline is taken: the first steps fault
    in libtorch's code pages and thread pools (~100 MiB of RSS), which is not the SAE's memory.
    """
    m, n = spec["m"], spec["n"]
    target = TargetSpec("w", (m, n), spec["rank"])
    cfg = SAEConfig(n_latents=spec["n_latents"], rank=spec["rank"], k=spec["k"],
                    batch_size=spec["batch"], aux_coef=0.0, seed=0)
    sae = (DenseSAE if spec["impl"] == "dense" else LowRankSAE)([target], cfg).to(device)
    trainer = SAETrainer(sae)
    gen = torch.Generator().manual_seed(0)
    batch = {"w": (1e-4 * torch.randn(spec["batch"], m, n, generator=gen)).to(device)}
    for _ in range(steps):
        trainer.step(batch)
    return sae, trainer, batch


def run_config(spec: dict) -> dict:
    """Build, warm up and time one (implementation, size); runs inside a fresh worker process."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    _build_and_train(dict(spec, m=8, n=8, rank=1), device, steps=3)  # see _build_and_train
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_bytes("VmRSS")

    sae, trainer, batch = _build_and_train(spec, device, steps=spec["warmup"])
    _sync(device)
    steps, t0 = 0, time.perf_counter()
    while steps < spec["min_steps"] or (time.perf_counter() - t0 < spec["seconds"]
                                        and steps < spec["max_steps"]):
        metrics = trainer.step(batch)
        steps += 1
    _sync(device)
    elapsed = time.perf_counter() - t0

    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else _rss_bytes("VmHWM")) - base
    params = sae.param_count() if spec["impl"] == "dense" else sae.factored_param_count()
    return dict(spec, steps=steps, elapsed=elapsed, samples_per_s=steps * spec["batch"] / elapsed,
                peak_bytes=peak, params=params, fvu=metrics.fvu)


def _spawn(spec: dict) -> dict:
    """Run :func:`run_config` in a fresh interpreter; its last stdout line is the JSON result."""
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench_sae", "--worker", json.dumps(spec)],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- quality sanity
def quality_check(m: int, n: int, steps: int, seed: int = 0) -> float:
    """mmcs of a low-rank SAE trained on planted rank-1 directions in one ``m x n`` target."""
    stream = PlantedStream(PlantedConfig(shapes={"w": (m, n)}, n_directions=12, min_targets=1,
                                         noise_frac=0.2, seed=seed))
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=24, k=3, lr=3e-3, seed=seed))
    trainer = SAETrainer(sae)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        trainer.step(stream.sample(64, gen).sample)
    return match_directions(sae, stream.directions).mmcs


# ---------------------------------------------------------------------------- report
def _fmt_mem(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / MIB:.0f} MiB"


def format_table(rows: list[dict]) -> str:
    head = ("| size (m x n) | SAE | rank | params | est. mem | steps timed | samples/s | peak mem "
            "| speed LR/dense | mem LR/dense | params LR/dense |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = {(r["m"], r["n"]): r for r in rows if r["impl"] == "dense"}
    for r in rows:
        size = f"{r['m']}x{r['n']}"
        rank = str(r["rank"]) if r["impl"] == "low-rank" else "-"
        cells = [size, r["impl"], rank, f"{r['params']:,}", _fmt_mem(r["est_bytes"])]
        if "samples_per_s" not in r:
            cells += [f"does not fit (needs {r['est_bytes'] / GIB:.1f} GiB)", "-", "-"]
        else:
            cells += [str(r["steps"]), f"{r['samples_per_s']:.1f}", _fmt_mem(r["peak_bytes"])]
        d = dense.get((r["m"], r["n"]))
        if r["impl"] == "low-rank" and d is not None:
            both = "samples_per_s" in d and "samples_per_s" in r
            cells += [f"{r['samples_per_s'] / d['samples_per_s']:.2f}" if both else "-",
                      f"{r['peak_bytes'] / d['peak_bytes']:.3f}" if both else "-",
                      f"{r['params'] / d['params']:.4f}"]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info(args: argparse.Namespace) -> str:
    dev = args.device
    if dev.startswith("cuda"):
        dev += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    return (f"torch {torch.__version__}, python {platform.python_version()}, device {dev}, "
            f"torch threads {args.threads} (of {os.cpu_count()} CPUs), "
            f"load average {os.getloadavg()[0]:.2f} at start")


# ---------------------------------------------------------------------------- entry point
def _size(text: str) -> tuple[int, int]:
    m, _, n = text.lower().partition("x")
    if not (m.isdigit() and n.isdigit()):
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 512x1024")
    return int(m), int(n)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=lambda s: [_size(x) for x in s.split(",")],
                   default="64x64,256x256,512x1024,1024x1024,1024x4096,4096x4096",
                   help="comma-separated target shapes m x n")
    p.add_argument("--n-latents", type=int, default=256)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=1, help="low-rank SAE rank for every size")
    p.add_argument("--extra-rank", type=int, default=4, help="one more low-rank run at this rank "
                   "(0: none)")
    p.add_argument("--extra-rank-size", type=_size, default="512x1024")
    p.add_argument("--mem-budget-gib", type=float, default=8.0,
                   help="configurations estimated above this are not run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads in every worker; 1 gives stable figures on a "
                   "shared machine and the same footing for both SAEs")
    p.add_argument("--seconds", type=float, default=3.0, help="time box per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--quality-steps", type=int, default=300,
                   help="steps of the planted-direction sanity run at the smallest size (0: skip)")
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; print and return the markdown report."""
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_config(json.loads(args.worker))))
        return ""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} requested but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    header = machine_info(args)
    print(header, flush=True)

    configs = [("low-rank", m, n, args.rank) for m, n in args.sizes]
    configs += [("dense", m, n, 1) for m, n in args.sizes]
    if args.extra_rank:
        m, n = args.extra_rank_size
        configs.append(("low-rank", m, n, args.extra_rank))
    configs.sort(key=lambda c: (c[1] * c[2], c[0] != "low-rank", c[3]))

    rows = []
    for impl, m, n, rank in configs:
        est = estimate_bytes(impl, m, n, rank, args.n_latents, args.batch)
        spec = dict(impl=impl, m=m, n=n, rank=min(rank, m, n), n_latents=args.n_latents,
                    k=args.k, batch=args.batch, device=args.device, threads=args.threads,
                    seconds=args.seconds, warmup=args.warmup, min_steps=args.min_steps,
                    max_steps=args.max_steps, est_bytes=est)
        if est > args.mem_budget_gib * GIB:
            dense_params = 2 * args.n_latents * m * n
            spec["params"] = dense_params if impl == "dense" else \
                2 * args.n_latents * spec["rank"] * (m + n)
            rows.append(spec)
            print(f"{impl:8s} {m}x{n} r{rank}: does not fit (needs {est / GIB:.1f} GiB)", flush=True)
            continue
        row = _spawn(spec)
        rows.append(row)
        print(f"{impl:8s} {m}x{n} r{rank}: {row['samples_per_s']:.1f} samples/s over "
              f"{row['steps']} steps, peak {_fmt_mem(row['peak_bytes'])}", flush=True)

    report = [header, "", f"n_latents={args.n_latents}, k={args.k}, batch={args.batch}, "
              "signed top-k, AuxK off, the trainer's fused Adam, "
              f"time box {args.seconds:g} s per configuration, "
              f"memory budget {args.mem_budget_gib:g} GiB", "", format_table(rows)]
    if args.quality_steps:
        m, n = min(args.sizes, key=lambda s: s[0] * s[1])
        score = quality_check(m, n, args.quality_steps)
        report += ["", f"Quality sanity: low-rank SAE (24 latents, k=3) on 12 planted rank-1 "
                   f"directions in one {m}x{n} target, {args.quality_steps} steps of batch 64: "
                   f"mmcs = {score:.3f}"]
    report += ["", f"Total wall time {time.perf_counter() - t_start:.0f} s."]
    text = "\n".join(report)
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
