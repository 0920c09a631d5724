"""Smoke test of scripts/bench_runview.py: an 8 MiB log (a second); the script asserts that the
index's per-step mean rewards equal those of the rows parsed whole."""

import re

from scripts.bench_runview import main


def test_bench_runview_reports_what_each_reader_holds():
    out = main(["--mib", "8"])
    held_ratio = float(re.search(r"\| index / whole \| ([0-9.]+) \|", out).group(1))
    assert 0 < held_ratio < 0.1  # the index holds byte ranges, not the completions
    assert float(re.search(r"read back from the file: ([0-9.]+) ms", out).group(1)) > 0
