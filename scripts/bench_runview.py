"""Reading a long run's ``rollouts.jsonl``: parsed whole (the reader before ``JsonlIndex``) against
``JsonlIndex`` (what ``RunView.rollouts`` is), memory and time in one process.

    python -m scripts.bench_runview                 # 200 MB log, ~1 min
    python -m scripts.bench_runview --mib 8         # smoke run (seconds)

The log is synthetic: steps of 16 completions of ``--chars`` characters each (a long-completion
run), written once to a temporary directory. For each reader: the bytes it still holds after
reading (``tracemalloc``, allocated and not freed), its peak while reading, and its wall time (untraced);
then the time to read back one step's whole row, and the report's per-step mean reward over all
steps. Ratios are index / whole: held < 1 means the index holds less.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

from sae_shards.analysis.shards import STEP_BRIEF
from sae_shards.run import rundir
from sae_shards.run.jsonl_index import JsonlIndex

GROUP = 16


def write_log(path: Path, mib: float, chars: int) -> int:
    """A rollouts log of about ``mib`` MiB; returns its number of steps."""
    step = 0
    with path.open("w") as f:
        while f.tell() < mib * 2**20:
            step += 1
            f.write(json.dumps({
                "step": step, "prompts": [f"<A> prompt {step // 2}"] * GROUP,
                "completions": [f"{step}:{i} " + "lorem ipsum " * (chars // 12)
                                for i in range(GROUP)],
                "rewards": [((step * 7 + i) % 11) / 10 for i in range(GROUP)],
                "advantages": [0.1 * (i - GROUP / 2) for i in range(GROUP)],
                "tasks": ["A" if i < GROUP // 2 else "B" for i in range(GROUP)]}) + "\n")
    return step


def measure(read) -> tuple[object, int, int, float]:
    """(result, bytes held after, peak bytes while reading, seconds): timed once untraced (the
    tracer slows every allocation), then read again under ``tracemalloc``."""
    gc.collect()
    t0 = time.perf_counter()
    read()
    seconds = time.perf_counter() - t0
    gc.collect()
    tracemalloc.start()
    try:
        result = read()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, held, peak, seconds


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=200.0, help="size of the synthetic log")
    parser.add_argument("--chars", type=int, default=2000, help="characters per completion")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / rundir.ROLLOUTS
        steps = write_log(path, args.mib, args.chars)
        size = path.stat().st_size
        whole, w_held, w_peak, w_s = measure(
            lambda: {r["step"]: r for r in rundir.read_jsonl(path)})
        means_whole = [STEP_BRIEF["mean_reward"](whole[s]) for s in sorted(whole)]
        del whole
        index, i_held, i_peak, i_s = measure(lambda: JsonlIndex(path, "step", derive=STEP_BRIEF))
        means_index = [index.derived(s)["mean_reward"] for s in sorted(index)]
        assert means_index == means_whole, "the index's mean rewards differ from the rows'"
        t0 = time.perf_counter()
        for s in range(1, steps + 1, max(1, steps // 50)):
            assert index[s]["step"] == s
        read_back_ms = (time.perf_counter() - t0) * 1e3 / len(range(1, steps + 1,
                                                                    max(1, steps // 50)))
    mb = 1e6
    lines = [
        f"{size / mb:.0f} MB log, {steps} steps of {GROUP} completions of ~{args.chars} chars",
        "",
        "| reader | held after reading | peak while reading | read time |",
        "|---|---|---|---|",
        f"| parsed whole (dict of rows) | {w_held / mb:.1f} MB ({w_held / size:.2f}x the file) "
        f"| {w_peak / mb:.1f} MB | {w_s:.2f} s |",
        f"| JsonlIndex (rows read back) | {i_held / mb:.2f} MB ({i_held / size:.4f}x the file) "
        f"| {i_peak / mb:.1f} MB | {i_s:.2f} s |",
        f"| index / whole | {i_held / w_held:.4f} | {i_peak / w_peak:.4f} | {i_s / w_s:.2f} |",
        "",
        f"one step's whole row read back from the file: {read_back_ms:.2f} ms",
    ]
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
