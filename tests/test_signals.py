"""Stop signals: the first asks for a stop after the step, a second stops at once and says
which signal it was (the CLI exits with 128 + that signal)."""

from __future__ import annotations

import os
import signal

import pytest

from sae_shards.capture.signals import SecondSignal, stop_on_signals


class _Run:
    stop_signal: int | None = None
    ending = False

    def request_stop(self, signum: int = 0) -> None:
        self.stop_signal = signum


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once_naming_itself(second):
    run = _Run()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SecondSignal) as e, stop_on_signals(run):
        os.kill(os.getpid(), signal.SIGTERM)
        assert run.stop_signal == signal.SIGTERM  # the first: a stop request
        os.kill(os.getpid(), second)
    assert e.value.signum == second and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back


def test_a_first_signal_while_already_stopping_is_not_a_second_one(caplog):
    """Audit 122: after a stop asked on another rank (the step-end vote sets stop_signal here),
    the launcher's forward of that signal, or a scheduler's own, was taken for a second signal
    on rank 0, which then aborted writing the run's end (no summary.json, "stopped at once by a
    second signal" for one signal sent). The first signal this process receives asks nothing
    new; a second one still stops at once."""
    run = _Run()
    run.stop_signal = signal.SIGTERM  # decided by the vote: asked on another rank
    with caplog.at_level("WARNING", "sae_shards.capture.signals"), stop_on_signals(run):
        os.kill(os.getpid(), signal.SIGTERM)  # no SecondSignal
        assert run.stop_signal == signal.SIGTERM
        assert "the run already stops after this RL step" in caplog.text
        with pytest.raises(SecondSignal):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("ending, said", [(False, "finishing this RL step, writing a checkpoint"),
                                          (True, "the run is writing its end")])
def test_a_stop_says_what_the_run_will_do(caplog, ending, said):
    """A signal while the run's end is being written does not promise a checkpoint and a stop
    after a step: the run is ending anyway."""
    run = _Run()
    run.ending = ending
    with caplog.at_level("WARNING", logger="sae_shards.capture.signals"), stop_on_signals(run):
        os.kill(os.getpid(), signal.SIGTERM)
    assert run.stop_signal == signal.SIGTERM
    assert said in caplog.text


def test_the_stop_handlers_stay_until_the_last_callback_leaves():
    """Two ShardCallbacks on one trainer: the first to end leaves the handlers in place (the
    second still writes its end, which a SIGTERM must not cut short); the last restores them."""
    from sae_shards.capture.signals import SignalGuard, free_signals

    if signal.SIGTERM not in free_signals():
        pytest.skip("SIGTERM is handled by someone else in this process")
    before = signal.getsignal(signal.SIGTERM)

    class Run:
        stop_signal = None
        ending = False

        def request_stop(self, signum=0):
            self.stop_signal = signum

    first, second = SignalGuard(Run()), SignalGuard(Run())
    assert first.enter() and second.enter()
    try:
        first.exit()
        assert hasattr(signal.getsignal(signal.SIGTERM), "sae_shards_previous")
    finally:
        first.exit()
        second.exit()
    assert signal.getsignal(signal.SIGTERM) == before
