"""Smoke test of scripts/bench_activation_log.py: 2000 adds (seconds)."""

import re

from scripts.bench_activation_log import main


def test_bench_activation_log_reports_both_storages():
    out = main(["--adds", "2000"])
    old = float(re.search(r"\| lists \+ a block per add \(before\) \| ([0-9.]+) \|", out).group(1))
    new = float(re.search(r"\| ActivationLog \| ([0-9.]+) \|", out).group(1))
    assert old > 0 and 0 < new < old  # the compact log takes less than the lists did
