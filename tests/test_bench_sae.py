"""Smoke test of scripts/bench_sae.py: the smallest size, a handful of steps (< 15 s)."""

import math

from scripts.bench_sae import main


def test_bench_smallest_size_reports_both_and_a_finite_ratio():
    text = main(["--sizes", "64x64", "--n-latents", "32", "--k", "4", "--seconds", "0.2",
                 "--warmup", "1", "--min-steps", "2", "--max-steps", "5", "--extra-rank", "0",
                 "--quality-steps", "20"])
    rows = [line for line in text.splitlines() if line.startswith("| 64x64 |")]
    impls = {row.split("|")[2].strip(): row for row in rows}
    assert set(impls) == {"low-rank", "dense"}
    speed_ratio, mem_ratio = (float(c) for c in impls["low-rank"].split("|")[9:11])
    assert math.isfinite(speed_ratio) and speed_ratio > 0
    assert math.isfinite(mem_ratio)
    assert "mmcs = " in text


def test_bench_step_suite_reports_before_and_after():
    """--step at the L3D shape with a tiny batch: both codes run, a speed-up and a % of mm."""
    text = main(["--step", "--qwen-latents", "", "--l3d-latents", "8", "--k", "2",
                 "--step-batch", "2", "--seconds", "0.1", "--warmup", "1", "--min-steps", "1",
                 "--max-steps", "2"])
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| L3D")]
    assert [r[3].strip() for r in rows] == ["this tree", "before (aec0f5c^)"]
    speedup = rows[0][11].strip()
    assert speedup.endswith("x") and float(speedup[:-1]) > 0
    assert all(r[9].strip().endswith("%") for r in rows)
