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
