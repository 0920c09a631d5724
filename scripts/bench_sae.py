"""Throughput and peak memory of the low-rank SAE against a dense SAE with the same latents.

    python -m scripts.bench_sae                      # CPU, 1 thread, default sizes (< 5 min)
    python -m scripts.bench_sae --device cuda --threads 4 --out runs/bench.md

One target matrix of growing size ``m x n``; fixed ``n_latents``, ``k`` and batch. Both SAEs are
driven by the same :class:`SAETrainer` (same signed top-k, FVU loss, input scaling, Adam and
per-step decoder renormalisation), so only the SAE differs. A throughput figure is samples per
second of ``SAETrainer.step`` (forward, backward, Adam, renorm) after warm-up, each configuration
time-boxed to ``--seconds``. Every (implementation, size) runs in a fresh subprocess, so its peak
memory is its own: peak RSS growth over the worker's RSS after imports on CPU (includes the input
batch), ``torch.cuda.max_memory_allocated`` on CUDA. A configuration whose estimated memory
exceeds ``--mem-budget-gib`` is reported as "does not fit" without being allocated.

``--step`` runs instead the issue-13 suite (the SAE step after the factored loss): the L3D-shaped
point (one 1024x4096 target, 64 latents, rank 1, batch 32) and the shapes of one Qwen2.5-0.5B layer
at several latent counts; each point is run with this tree's code and with the code of
``--before-rev`` (default ``aec0f5c^``, the last revision before the factored loss; copied from
``git show`` into a temporary package, so the ratio comes from one run), and reports samples/s, the step's GFLOP/s (FLOP model: :func:`step_flops`), the GFLOP/s of a
2048^3 ``torch.mm`` in the same worker process and the peak RSS growth.

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
# Batch-sized fp32 tensors alive at the peak of one step of the dense baseline (input,
# NaN-filtered copy, scaled input, centred input, reconstruction, residual, their squares and
# gradients). Measured, see docs.
ACT_COPIES = 9
# The low-rank SAE's factored loss builds no reconstruction: the batch and one cleaned copy
# (measured peaks 233 MiB / 608 MiB / 1.94 GiB at 1024x1024 / 1024x4096 / 4096x4096, batch 16,
# N 256, rank 1).
LOW_RANK_ACT_COPIES = 2
BEFORE_FACTORED = "aec0f5c^"
"""The last revision before the factored loss (``--step``'s default ``--before-rev``)."""


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
        self.sample_form = "dense"
        self.uses_b_dec = cfg.use_b_dec is not False  # None means on for dense samples
        self.b_dec = nn.ParameterList(
            nn.Parameter(torch.zeros(t.shape), requires_grad=self.uses_b_dec) for t in self.targets
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
    denominator) and the batch-sized activations. Within ~20% of the measured peaks on CPU."""
    D = m * n
    if impl == "dense":
        weights = 2 * n_latents * D  # W_enc and W_dec
        return 4 * (4 * weights + 3 * n_latents * D + ACT_COPIES * batch * D)
    acts = LOW_RANK_ACT_COPIES * batch * D
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
    shapes = spec.get("shapes") or [["w", spec["m"], spec["n"]]]
    targets = [TargetSpec(name, (m, n), min(spec["rank"], m, n)) for name, m, n in shapes]
    # use_b_dec explicit (what null resolves to for dense samples): the --before-rev code may
    # predate the null default
    cfg = SAEConfig(n_latents=spec["n_latents"], rank=spec["rank"], k=spec["k"],
                    batch_size=spec["batch"], aux_coef=0.0, use_b_dec=True, seed=0)
    sae_cls, trainer_cls = LowRankSAE, SAETrainer
    if spec["impl"] == "head":
        sae_cls, trainer_cls = head_modules(spec.get("rev", "HEAD"))
    sae = (DenseSAE if spec["impl"] == "dense" else sae_cls)(targets, cfg).to(device)
    trainer = (SAETrainer(sae, dense_loss=True) if spec["impl"] == "dense"
               else trainer_cls(sae))
    gen = torch.Generator().manual_seed(0)
    # randn then scale in place: no second batch-sized tensor in the peak
    batch = {t.name: torch.randn(spec["batch"], *t.shape, generator=gen).mul_(1e-4).to(device)
             for t in targets}
    for _ in range(steps):
        trainer.step(batch)
    return sae, trainer, batch


_HEAD_FILES = ("sae", "trainer", "metrics", "sparsity")


def head_modules(rev: str = "HEAD"):
    """(LowRankSAE, SAETrainer) of git ``rev``: its core/{sae,trainer,metrics,sparsity}.py copied
    into a temporary package (imports between them rewritten), so the old step can be timed next
    to the new one without touching the working tree."""
    import atexit
    import importlib
    import shutil
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="sae_head_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # imported by then: not needed
    (root / "sae_head").mkdir()
    (root / "sae_head" / "__init__.py").write_text("")
    for name in _HEAD_FILES:
        text = subprocess.run(["git", "show", f"{rev}:sae_shards/core/{name}.py"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout
        for other in _HEAD_FILES:
            text = text.replace(f"sae_shards.core.{other} ", f"sae_head.{other} ")
        (root / "sae_head" / f"{name}.py").write_text(text)
    sys.path.insert(0, str(root))
    return (importlib.import_module("sae_head.sae").LowRankSAE,
            importlib.import_module("sae_head.trainer").SAETrainer)


def mm_gflops(device: torch.device, size: int = 2048, reps: int = 3) -> float:
    """Best-of-``reps`` GFLOP/s of one fp32 ``[size, size] @ [size, size]`` torch.mm."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = math.inf
    for _ in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def step_flops(impl: str, shapes: Sequence[Sequence], n_latents: int, rank: int, k: int,
               batch: int) -> float:
    """FLOPs of one SAE step's batch contractions (the parameter-sized work is left out).

    ``low-rank`` (factored loss): the encoder ``x @ [n, N r]`` forward (2 b N r mn) and its weight
    gradient (the same again), plus the active latents' decoder inner products
    ``x_b @ V_g [n, k r]`` forward and weight gradient (4 b k r mn): ``4 b (N + k) r sum(mn)``.
    ``head`` (dense reconstruction): the same encoder ``4 b N r sum(mn)`` plus the decode
    ``[b, m, k r] @ [b, k r, n]`` forward and its two gradients ``6 b k r sum(mn)``.
    """
    mn = sum(m * n for _, m, n in shapes)
    if impl == "low-rank":
        return 4.0 * batch * (n_latents + k) * rank * mn
    return 4.0 * batch * n_latents * rank * mn + 6.0 * batch * k * rank * mn


def run_config(spec: dict) -> dict:
    """Build, warm up and time one (implementation, size); runs inside a fresh worker process."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    _build_and_train(dict(spec, m=8, n=8, rank=1, shapes=None), device, steps=3)
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
    out = dict(spec, steps=steps, elapsed=elapsed, samples_per_s=steps * spec["batch"] / elapsed,
               peak_bytes=peak, params=params, fvu=metrics.fvu)
    if spec.get("shapes"):
        del sae, trainer, batch
        out["mm_gflops"] = mm_gflops(device)
    return out


def _spawn(spec: dict) -> dict:
    return spawn_worker("scripts.bench_sae", spec)


def spawn_worker(module: str, spec: dict) -> dict:
    """Run ``python -m module --worker spec`` (its ``run_config``) in a fresh interpreter; its last
    stdout line is the JSON result."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--worker", json.dumps(spec)],
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


# ---------------------------------------------------------------------------- issue-13 suite
L3D_SHAPES = [["w", 1024, 4096]]
QWEN_LAYER = [["q", 896, 896], ["k", 128, 896], ["v", 128, 896], ["o", 896, 896],
              ["gate", 4864, 896], ["up", 4864, 896], ["down", 896, 4864]]


def step_suite(args: argparse.Namespace) -> str:
    """The L3D point and one Qwen2.5-0.5B layer, this tree's step against ``--before-rev``'s."""
    points = [("L3D 1024x4096", L3D_SHAPES, args.l3d_latents)]
    points += [("Qwen2.5-0.5B layer", QWEN_LAYER, n) for n in args.qwen_latents]
    impls = ["low-rank"] + (["head"] if args.before_rev else [])
    rows = []
    for label, shapes, n_lat in points:
        for impl in impls:
            spec = dict(impl=impl, shapes=shapes, m=0, n=0, rank=args.rank, n_latents=n_lat,
                        k=args.k, batch=args.step_batch, device=args.device,
                        threads=args.threads, seconds=args.seconds, warmup=args.warmup,
                        min_steps=args.min_steps, max_steps=args.max_steps,
                        rev=args.before_rev, label=label)
            per_sample = 4 * ACT_COPIES * sum(m * n for _, m, n in shapes)
            if impl == "head" and per_sample * args.step_batch > args.mem_budget_gib * GIB:
                # the dense step keeps ~ACT_COPIES batch copies alive: shrink its batch to fit
                spec["batch"] = max(1, int(args.mem_budget_gib * GIB // per_sample))
            row = _spawn(spec)
            row["gflops"] = step_flops(impl, shapes, n_lat, args.rank, args.k,
                                       spec["batch"]) * row["steps"] / row["elapsed"] / 1e9
            rows.append(row)
            print(f"{label} N={n_lat} {impl}: {row['samples_per_s']:.2f} samples/s, "
                  f"{row['gflops']:.1f} GFLOP/s (mm {row['mm_gflops']:.1f}), peak "
                  f"{_fmt_mem(row['peak_bytes'])}", flush=True)
    return format_step_table(rows)


def format_step_table(rows: list[dict]) -> str:
    head = ("| point | N | code | batch | steps timed | samples/s | step GFLOP/s "
            "| torch.mm GFLOP/s "
            "| % of mm | peak RSS growth | speed-up vs before |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    before = {(r["label"], r["n_latents"]): r for r in rows
              if r["impl"] == "head" and "samples_per_s" in r}
    for r in rows:
        code = "this tree" if r["impl"] == "low-rank" else f"before ({r['rev']})"
        cells = [r["label"], str(r["n_latents"]), code, str(r["batch"])]
        b = before.get((r["label"], r["n_latents"]))
        speedup = (f"{r['samples_per_s'] / b['samples_per_s']:.1f}x"
                   if b is not None and r["impl"] == "low-rank" else "")
        cells += [str(r["steps"]), f"{r['samples_per_s']:.2f}", f"{r['gflops']:.1f}",
                  f"{r['mm_gflops']:.1f}", f"{100 * r['gflops'] / r['mm_gflops']:.0f}%",
                  _fmt_mem(r["peak_bytes"]), speedup]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    p.add_argument("--step", action="store_true", help="run the issue-13 suite (L3D point and "
                   "a Qwen2.5-0.5B layer, this tree against --before-rev) instead of the sweep")
    p.add_argument("--step-batch", type=int, default=32, help="batch of the --step suite")
    p.add_argument("--l3d-latents", type=int, default=64)
    p.add_argument("--qwen-latents", type=lambda s: [int(x) for x in s.split(",") if x],
                   default="64,256,1024", help="latent counts of the Qwen layer (empty: none)")
    p.add_argument("--before-rev", default=BEFORE_FACTORED,
                   help="git revision whose SAE step is timed as 'before' in --step (default: "
                        "the last one before the factored loss; '': none)")
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

    if args.step:
        table = step_suite(args)
        text = "\n".join([header, "", f"--step: k={args.k}, rank {args.rank}, batch "
                          f"{args.step_batch} (the before code at a smaller batch where its ~"
                          f"{ACT_COPIES} batch copies exceed {args.mem_budget_gib:g} GiB), "
                          f"signed top-k, AuxK off, time box {args.seconds:g} s,"
                          f" peak RSS growth over the worker's RSS before the SAE and batch are "
                          f"built (includes the batch)", "", table, "",
                          f"Total wall time {time.perf_counter() - t_start:.0f} s."])
        print("\n" + text)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return text

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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
