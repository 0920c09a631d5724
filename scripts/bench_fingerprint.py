"""What checking a model directory costs when a run starts: ``initial_model.fingerprint`` (the
SHA-256 of its weight files, taken when a run from ``model.path`` starts and again by
``sae-shards analyze``) and ``initial_model.loaded_from`` (every parameter of a script's live
policy compared with the directory's safetensors, to know whether theta_0 must be saved).

    python -m scripts.bench_fingerprint              # a 1 GiB safetensors file, ~10 s
    python -m scripts.bench_fingerprint --mib 64     # smoke run

Writes one safetensors file of ``--mib`` MiB of random fp32 tensors (16 MiB each) into a
temporary directory and holds the same tensors as a module's parameters, then times, in the same
process: reading the file alone (the disk / page cache), ``fingerprint`` of it (read + hash),
``fingerprint`` again (the per-process cache: ``(path, size, mtime)`` already hashed) and
``loaded_from`` of the module. The figures: GB/s, and each time over the plain read.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_shards.capture import initial_model

TENSOR_MIB = 16


def _read(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(1 << 23):
            pass


class _Policy(torch.nn.Module):
    """A module holding ``weights`` as parameters, its config naming ``folder`` (as a model
    loaded with ``from_pretrained(folder)`` does)."""

    def __init__(self, weights: dict[str, torch.Tensor], folder: str) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Module() for _ in weights)
        for layer, w in zip(self.layers, weights.values()):
            layer.weight = torch.nn.Parameter(w.clone())
        self.config = type("Config", (), {"_name_or_path": folder})()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--mib", type=int, default=1024, help="size of the weight file (MiB)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        g = torch.Generator().manual_seed(0)
        n = max(1, args.mib // TENSOR_MIB)
        weights = {f"layers.{i}.weight": torch.randn(TENSOR_MIB * 2**18 // 1024, 1024,
                                                        generator=g) for i in range(n)}
        save_file(weights, str(path))
        (Path(tmp) / "config.json").write_text("{}")
        policy = _Policy(weights, tmp)
        _read(path)  # warm the page cache, as a model just loaded leaves it
        times = {}
        for name, fn in (("read", lambda: _read(path)),
                         ("fingerprint", lambda: initial_model.fingerprint(tmp)),
                         ("fingerprint again (cached)", lambda: initial_model.fingerprint(tmp)),
                         ("loaded_from", lambda: initial_model.loaded_from(policy))):
            t0 = time.perf_counter()
            out = fn()
            times[name] = time.perf_counter() - t0
        assert out == str(Path(tmp).resolve()), out  # the policy holds the file's weights
    gb = n * TENSOR_MIB * 2**20 / 1e9
    row = (f"| {n * TENSOR_MIB} MiB | read {times['read']:.2f} s | fingerprint "
           f"{times['fingerprint']:.2f} s ({gb / times['fingerprint']:.2f} GB/s, "
           f"{times['fingerprint'] / times['read']:.1f}x the read) | again "
           f"{times['fingerprint again (cached)'] * 1e3:.2f} ms | loaded_from "
           f"{times['loaded_from']:.2f} s ({gb / times['loaded_from']:.2f} GB/s, "
           f"{times['loaded_from'] / times['read']:.1f}x the read) |")
    header = ("| file | read | fingerprint | fingerprint again (cached) | loaded_from |\n"
              "|---|---|---|---|---|")
    print(header + "\n" + row)
    return row


if __name__ == "__main__":
    main()
