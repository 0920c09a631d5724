"""scripts/bench_overhead.py checks its arguments before it times anything (a full run takes
minutes, so it is not run here; docs/benchmarks.md has its figures)."""

import pytest

import scripts.bench_overhead as bench


def test_an_unknown_mode_is_refused_before_any_mode_runs(capsys, monkeypatch):
    timed = []
    monkeypatch.setattr(bench, "time_mode", lambda cfg, mode, run_dir: timed.append(mode))
    with pytest.raises(SystemExit) as stop:
        bench.main(["--modes", "rl,bogus"])
    assert stop.value.code == 2 and timed == []  # "rl" was not timed first
    assert "unknown mode 'bogus'" in capsys.readouterr().err


def test_capture_mode_hides_only_its_expected_never_trained_warning(caplog):
    """Capture mode never starts its SAE by design: the summary's "never trained" warning is
    not printed as if something went wrong, and the logger's level is restored afterwards."""
    import logging

    import torch

    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING):
            table = bench.main(["rl.max_steps=10", "--modes", "capture"])
    finally:
        torch.set_num_threads(threads)
    assert "| capture |" in table and "| 0 |" in table  # no SAE step
    assert not [r for r in caplog.records if "never trained" in r.getMessage()]
    assert logging.getLogger("sae_shards.capture.summary").level == logging.NOTSET
