"""How tight is the SAE memory check's lower bound? Measured training peak over ``sae_min_bytes``.

``capture.memory.check_sae_memory`` refuses an SAE whose lower bound ``sae_min_bytes`` exceeds the
memory free besides the buffer, and suggests values whose bound is ``SAE_BOUND_RATIO`` times
below it. This script measures, for each ``n_latents x batch_size``, the peak resident memory a
fresh process adds while building the SAE and taking three training steps on the tiny model's
targets (2 layers x 4 attention + 3 MLP matrices, hidden 64, rank 1; dense fp32 samples), and
prints it beside the bound: a ratio below 1 means the bound is not one, a ratio above
``SAE_BOUND_RATIO`` means the suggestions may not fit.

    python -m scripts.bench_sae_bound                      # the default grid (~1 min on 2 cores)
    python -m scripts.bench_sae_bound --configs 500x32 2000x8

CPU only (peak RSS from ``/proc/self/status``' ``VmHWM``, reset before the SAE is built; Linux);
each configuration runs in its own process so peaks do not carry over.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT = ["500x32", "1000x64", "2000x8", "2000x32", "2000x128", "4000x32"]


def tiny_shapes() -> dict[str, tuple[int, int]]:
    """The default capture targets of the built-in tiny model (qwen2, hidden 64, MLP 128)."""
    shapes = {}
    for layer in range(2):
        for proj in ("q", "k", "v", "o"):
            shapes[f"layers.{layer}.{proj}_proj"] = (64, 64)
        shapes[f"layers.{layer}.gate_proj"] = (128, 64)
        shapes[f"layers.{layer}.up_proj"] = (128, 64)
        shapes[f"layers.{layer}.down_proj"] = (64, 128)
    return shapes


def measure(n_latents: int, batch_size: int, steps: int = 3) -> dict[str, float]:
    """In this process (call it in a fresh one): the peak RSS the SAE adds over ``steps``
    training steps, and its ``sae_min_bytes``, in bytes. The peak is measured from here on:
    the kernel's high-water mark is reset first (``/proc/self/clear_refs``), since importing
    torch may have set it above what a small SAE reaches."""
    import torch

    from sae_shards.capture.memory import sae_min_bytes
    from sae_shards.core.sae import LowRankSAE
    from sae_shards.core.sae_config import SAEConfig
    from sae_shards.core.targets import make_targets
    from sae_shards.core.trainer import SAETrainer

    torch.set_num_threads(1)
    shapes = tiny_shapes()
    specs = make_targets(shapes, rank=1)
    g = torch.Generator().manual_seed(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    trainer = SAETrainer(LowRankSAE(specs, SAEConfig(n_latents=n_latents, k=4,
                                                     batch_size=batch_size)))
    for _ in range(steps):
        trainer.step({n: torch.randn(batch_size, *s, generator=g) for n, s in shapes.items()})
    peak = _status("VmHWM")
    return {"peak": float(peak - before), "bound": float(sae_min_bytes(specs, n_latents,
                                                                       batch_size))}


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the file counts kB
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def _config(text: str) -> tuple[int, int]:
    try:
        n, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give N_LATENTSxBATCH, e.g. 2000x32") from None
    if n < 4 or b < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: n_latents >= 4 (k = 4) and batch >= 1")
    return n, b


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    from sae_shards.capture.memory import SAE_BOUND_RATIO

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", type=_config, default=None,
                        help=f"N_LATENTSxBATCH each (default: {' '.join(DEFAULT)})")
    parser.add_argument("--measure", type=_config, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return []
    rows = []
    print("| n_latents | batch | measured peak (MiB) | lower bound (MiB) | ratio |")
    print("|---|---|---|---|---|")
    for n, b in args.configs or [_config(c) for c in DEFAULT]:
        done = subprocess.run([sys.executable, "-m", "scripts.bench_sae_bound", "--measure",
                               f"{n}x{b}"], capture_output=True, text=True, check=True)
        row = {"n_latents": n, "batch": b, **json.loads(done.stdout.strip().splitlines()[-1])}
        row["ratio"] = row["peak"] / row["bound"]
        rows.append(row)
        print(f"| {n} | {b} | {row['peak'] / 2**20:.0f} | {row['bound'] / 2**20:.0f} | "
              f"{row['ratio']:.2f} |", flush=True)
    worst = max(r["ratio"] for r in rows)
    print(f"\nratios {min(r['ratio'] for r in rows):.2f}-{worst:.2f}; the check suggests values "
          f"{SAE_BOUND_RATIO}x below what is free"
          + ("" if worst <= SAE_BOUND_RATIO else ": SOME PEAKS EXCEED THAT MARGIN"))
    return rows


if __name__ == "__main__":
    main()
