"""Time of one ``update`` capture vs a plain copy of the same targets (issue 13).

    python -m scripts.bench_capture                          # 5M, 20M, 100M parameters, ~1 minute
    python -m scripts.bench_capture --sizes 20 --storage float32 bfloat16

The targets are the matrices of a small transformer body (per layer: q, k, v, o ``[d, d]``, up
``[4d, d]``, down ``[d, 4d]``), plain ``nn.Parameter``s on CPU, sized to about ``--sizes`` million
parameters. ``DeltaCapture`` is driven through its callback events with a real
``TrainingArguments`` / ``TrainerState`` / ``TrainerControl``: ``on_step_begin`` (the fp32
snapshot), an untimed stand-in for the optimizer step (every parameter scaled in place, so the
whole delta is non-zero), ``on_step_end`` (the diff into the buffer slot, the norm and the finite
check, the commit). The baseline is a plain ``copy_`` of every target into preallocated fp32
tensors. One torch thread; steps of the measurements are interleaved, each timed part starts
with cold caches (an untimed write of ``--flush-mib`` MiB first: in training a forward and
backward pass runs between the events), and each figure is the median over ``--steps`` steps, after
``--warmup`` untimed ones.

The floor issue 13 set was 2.5 copies: the snapshot is a copy (read + write), the diff reads two
tensors and writes a third. With fp32 storage the snapshot is taken into the buffer slot and the
diff is taken in place (one read of the target, one read-modify-write of the slot), which is
below that; bf16 storage keeps an fp32 snapshot and writes the slot from it.

``unfused`` repeats the end of step as it was before issue 13 on the same tensors, for
comparison: the diff from a separate fp32 snapshot into the slot (bf16: negate, add, round),
then a second pass computing each target's norm; its snapshot is counted at the new snapshot's
time (both are one copy of the targets).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from sae_shards.capture.buffer import DeltaRingBuffer
from sae_shards.capture.delta import DeltaCapture
from sae_shards.core.targets import TargetSpec


def body_params(million: float) -> dict[str, torch.nn.Parameter]:
    """Matrices of a transformer body with about ``million`` * 1e6 parameters."""
    d = 128 if million < 2 else 256 if million < 10 else 512 if million < 50 else 768
    n_layers = max(1, round(million * 1e6 / (12 * d * d)))
    gen = torch.Generator().manual_seed(0)
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (4 * d, d),
              "down": (d, 4 * d)}
    return {f"layers.{i}.{n}": torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)
            for i in range(n_layers) for n, s in shapes.items()}


_FLUSH = torch.empty(0)


def flush(mib: int = 512) -> None:
    """Evict the caches (untimed): write a buffer larger than the last-level cache."""
    global _FLUSH
    if _FLUSH.numel() != mib << 18:
        _FLUSH = torch.empty(mib << 18)
    _FLUSH.fill_(1.0)


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def measure(million: float, storage: torch.dtype, steps: int, warmup: int,
            flush_mib: int = 512) -> dict:
    params = body_params(million)
    model = torch.nn.Module()
    model.body = torch.nn.ParameterList(list(params.values()))
    specs = [TargetSpec(n, tuple(p.shape)) for n, p in params.items()]
    buffer = DeltaRingBuffer(specs, capacity=2, device="cpu", dtype=storage)
    capture = DeltaCapture(params, buffer, source="update")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to=[], use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    capture.on_train_begin(args, state, control, model=model)
    copies = {n: torch.empty_like(p, dtype=torch.float32) for n, p in params.items()}
    ref_snap = {n: torch.empty_like(p, dtype=torch.float32) for n, p in params.items()}

    def optimizer_step() -> None:  # untimed: every entry changes
        with torch.no_grad():
            for p in params.values():
                p.mul_(1.0001)

    def copy() -> None:
        for n, p in params.items():
            copies[n].copy_(p)

    @torch.no_grad()
    def unfused_end() -> None:  # the pre-issue-13 on_step_end, for comparison
        slot, views = buffer.begin_write()
        for n, p in params.items():
            if storage == torch.float32:
                torch.sub(p, ref_snap[n], out=views[n])
            else:
                ref_snap[n].neg_().add_(p)
                views[n].copy_(ref_snap[n])
        norms = [torch.linalg.vector_norm(v, dtype=torch.float32) for v in views.values()]
        torch.linalg.vector_norm(torch.stack(norms)).item()
        buffer.abort(slot)

    def timed(fn) -> float:
        flush(flush_mib)  # cold caches, as after a forward and backward pass
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    t = {"copy": [], "snapshot": [], "diff_norm": [], "unfused": []}
    for i in range(warmup + steps):
        optimizer_step()
        t_copy = timed(copy)
        t_snap = timed(lambda: capture.on_step_begin(args, state, control))
        optimizer_step()
        state.global_step += 1
        t_diff = timed(lambda: capture.on_step_end(args, state, control))
        with torch.no_grad():
            for n, p in params.items():
                ref_snap[n].copy_(p)
        optimizer_step()
        t_unfused = timed(unfused_end)
        if i >= warmup:
            t["copy"].append(t_copy)
            t["snapshot"].append(t_snap)
            t["diff_norm"].append(t_diff)
            t["unfused"].append(t_snap + t_unfused)  # the same snapshot + the old end of step
    assert capture.n_captured == warmup + steps and capture.n_nonfinite == 0
    assert capture.n_zero == 0 and capture.last_norm > 0
    ms = {k: _median_ms(v) for k, v in t.items()}
    ms["capture"] = _median_ms([s + dn for s, dn in zip(t["snapshot"], t["diff_norm"])])
    n_params = sum(p.numel() for p in params.values())
    return {"params": n_params, "storage": str(storage).removeprefix("torch."), **ms,
            "ratio": ms["capture"] / ms["copy"], "unfused_ratio": ms["unfused"] / ms["copy"]}


def table(rows: list[dict]) -> str:
    lines = ["| targets (params) | storage | copy ms | snapshot ms | diff+norm ms | capture ms | "
             "capture / copy | unfused / copy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['params'] / 1e6:.1f}M | {r['storage']} | {r['copy']:.2f} | {r['snapshot']:.2f} "
            f"| {r['diff_norm']:.2f} | {r['capture']:.2f} | {r['ratio']:.2f} | "
            f"{r['unfused_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[5, 20, 100],
                        help="millions of target parameters")
    parser.add_argument("--storage", nargs="+", default=["float32"],
                        choices=["float32", "bfloat16"], help="buffer storage dtype(s)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--flush-mib", type=int, default=512,
                        help="MiB written before each timed part, to evict the caches")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    load_before = os.getloadavg()[0]
    rows = [measure(size, getattr(torch, storage), opts.steps, opts.warmup, opts.flush_mib)
            for size in opts.sizes for storage in opts.storage]
    load_after = os.getloadavg()[0]
    head = (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
            f"thread(s), 1-minute load {load_before:.2f} before / {load_after:.2f} after, "
            f"median of {opts.steps} steps")
    text = head + "\n\n" + table(rows)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
