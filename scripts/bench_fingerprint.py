"""What ``initial_model.fingerprint`` costs: the SHA-256 of a model directory's weight files,
taken when a run from ``model.path`` starts and again by ``sae-shards analyze``.

    python -m scripts.bench_fingerprint              # a 1 GiB safetensors-sized file, ~5 s
    python -m scripts.bench_fingerprint --mib 64     # smoke run

Writes one file of ``--mib`` random bytes into a temporary directory, then times, in the same
process: reading the file alone (the disk / page cache), ``fingerprint`` of it (read + hash),
and ``fingerprint`` again (the per-process cache: ``(path, size, mtime)`` already hashed). The
figures: GB/s of the first fingerprint, and its time over the plain read.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from sae_shards.capture import initial_model


def _read(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(1 << 23):
            pass


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the weight file (MiB)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        with path.open("wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        _read(path)  # warm the page cache, as a model just loaded leaves it
        times = {}
        for name, fn in (("read", lambda: _read(path)),
                         ("fingerprint", lambda: initial_model.fingerprint(tmp)),
                         ("fingerprint again (cached)", lambda: initial_model.fingerprint(tmp))):
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
    gb = args.mib * 2**20 / 1e9
    row = (f"| {args.mib} MiB | read {times['read']:.2f} s | fingerprint "
           f"{times['fingerprint']:.2f} s ({gb / times['fingerprint']:.2f} GB/s, "
           f"{times['fingerprint'] / times['read']:.1f}x the read) | again "
           f"{times['fingerprint again (cached)'] * 1e3:.2f} ms |")
    print(row)
    return row


if __name__ == "__main__":
    main()
