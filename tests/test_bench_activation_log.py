"""Smoke test of scripts/bench_activation_log.py at its default 20000 adds (~6 s: fewer adds
measure mostly the allocator's fixed slack)."""

import re

from scripts.bench_activation_log import main


def test_bench_activation_log_reports_both_storages():
    out = main([])
    old = float(re.search(r"\| lists \+ a block per add \(before\) \| ([0-9.]+) \|", out).group(1))
    new = float(re.search(r"\| ActivationLog \| ([0-9.]+) \|", out).group(1))
    assert old > 0 and 0 < new < old  # the compact log takes less than the lists did
