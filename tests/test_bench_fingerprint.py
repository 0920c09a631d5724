"""Smoke test of scripts/bench_fingerprint.py: a 64 MiB file (under a second); the script
asserts that ``loaded_from`` takes the directory whose weights the module holds."""

import re

from scripts.bench_fingerprint import main


def test_bench_fingerprint_reports_a_rate_and_a_cached_second_look():
    row = main(["--mib", "64"])
    rate = float(re.search(r"\(([0-9.]+) GB/s", row).group(1))
    first_s = float(re.search(r"fingerprint ([0-9.]+) s", row).group(1))
    again_ms = float(re.search(r"again ([0-9.]+) ms", row).group(1))
    # the second look is the per-process cache, not a second hash of 64 MiB
    assert rate > 0 and again_ms < first_s * 1e3 / 10
    assert float(re.search(r"loaded_from ([0-9.]+) s", row).group(1)) > 0  # it compared them
