"""Smoke test of scripts/bench_sae_bound.py on two small SAEs (seconds): the memory check's
bound is below the measured peak (it is a lower bound), and the grid's rows come back."""

import pytest

from scripts.bench_sae_bound import main


def test_the_sae_memory_bound_is_below_the_measured_peak():
    rows = main(["--configs", "200x8", "400x16"])
    assert [(r["n_latents"], r["batch"]) for r in rows] == [(200, 8), (400, 16)]
    assert all(r["ratio"] >= 1 for r in rows), rows


def test_bad_configs_are_refused():
    with pytest.raises(SystemExit):
        main(["--configs", "2000by32"])
