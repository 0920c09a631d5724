"""Smoke test of scripts/bench_capture.py: the smallest size, a few steps (a few seconds)."""

import math

from scripts.bench_capture import main


def test_bench_capture_smallest_size_reports_finite_ratios():
    text = main(["--sizes", "0.2", "--steps", "2", "--warmup", "1", "--storage", "float32",
                 "bfloat16", "--flush-mib", "8"])
    rows = [line for line in text.splitlines() if line.startswith("| 0.")]
    assert [row.split("|")[2].strip() for row in rows] == ["float32", "bfloat16"]
    for row in rows:
        ratio, unfused = (float(c) for c in row.split("|")[7:9])
        assert math.isfinite(ratio) and ratio > 0 and math.isfinite(unfused) and unfused > 0
    assert "1-minute load" in text
