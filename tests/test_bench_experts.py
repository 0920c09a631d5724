"""Smoke test of scripts/bench_experts.py: a small stacked target, two rounds (seconds)."""

import math

from scripts.bench_experts import main


def test_bench_reports_every_expert_count_with_a_finite_ratio():
    text = main(["--quick", "--experts", "1,4,16", "--n-latents", "16", "--k", "2",
                 "--batch", "2", "--threads", "1"])
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and
            line[2].isdigit()]
    assert [int(r[1]) for r in rows] == [1, 4, 16]
    assert [r[2].strip() for r in rows] == ["128 x 128", "64 x 64", "32 x 32"]
    # factors per latent: E (m + n) at rank 1
    assert [int(r[3]) for r in rows] == [256, 512, 1024]
    assert float(rows[0][5]) == 1.0
    assert all(math.isfinite(float(r[5])) and float(r[5]) > 0 for r in rows)
