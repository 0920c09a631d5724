"""Smoke test of scripts/bench_activation_log.py: it runs and reports both storages."""

import re

from scripts.bench_activation_log import main


def test_bench_activation_log_reports_both_storages():
    out = main(["--adds", "2000"])
    old = float(re.search(r"\| lists \+ a block per add \(before\) \| (-?[0-9.]+) \|", out).group(1))
    new = float(re.search(r"\| ActivationLog \| (-?[0-9.]+) \|", out).group(1))
    # a smoke test: both measured and reported (which is smaller is the benchmark's figure,
    # docs/benchmarks.md; resident-set growth beside other test workers is too noisy to assert)
    assert old == old and new == new and "| new / old |" in out
