"""Smoke test of scripts/bench_events.py: --quick (one small target, a few steps, < 15 s)."""

import math

from scripts.bench_events import main


def test_bench_quick_reports_both_paths_and_a_finite_ratio():
    text = main(["--quick"])
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 64x48 |")]
    paths = {row[3].strip(): row for row in rows}
    assert set(paths) == {"factored", "materialised"}
    speedup = paths["factored"][8].strip()
    assert speedup.endswith("x") and math.isfinite(float(speedup[:-1])) and float(speedup[:-1]) > 0
    assert math.isfinite(float(paths["factored"][9]))
