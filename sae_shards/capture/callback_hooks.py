"""Decorators of ``ShardCallback``'s hooks (``capture/callback.py``): what each hook's time
costs (``paid``), how a failed write speaks to a user's script (``script_worded``), the
silence of ranks other than 0 (``quiet_on_other_ranks``), and how a stop request reads in the
log (``stop_words``).
"""

from __future__ import annotations

import functools
import signal
import time
import weakref

from sae_shards.capture import distributed
from sae_shards.capture.trl_checkpoints import in_script_terms
from sae_shards.run import rundir


def paid(hook):
    """A callback hook whose wall time is sae-shards work on the RL thread: paid from
    ``runner.sae_budget`` when one is set (less what the SAE work loop paid itself meanwhile in
    this thread, inline pushes and activation flushes, and the waits for a thread worker, whose
    own time it pays); with it, the per-event recorder's time inside RL's forward and backward
    since the last hook (``EventCapture.take_hook_seconds``), which no callback hook times."""
    @functools.wraps(hook)
    def timed(self, *args, **kwargs):
        budget = self.parts.loop.budget if self.parts is not None else None
        if budget is None:
            return hook(self, *args, **kwargs)
        t0, accounted = time.perf_counter(), budget.accounted_in_this_thread()
        try:
            return hook(self, *args, **kwargs)
        finally:
            own = time.perf_counter() - t0 - (budget.accounted_in_this_thread() - accounted)
            take = getattr(getattr(self, "capture", None), "take_hook_seconds", None)
            budget.charge(max(0.0, own) + (take() if take is not None else 0.0))
    return timed


def script_worded(hook):
    """A callback hook whose failed write (``RunWriteError``: a full disk, no permission) tells
    a user's script how it continues (``in_script_terms``: ``ShardCallback(..., resume=True)``
    and ``trainer.train(resume_from_checkpoint=True)``), where the shared message speaks
    ``sae-shards train``'s ``resume=true``; under ``sae-shards train`` (``run_config``) it is
    left as it is, and the CLI adds the command that continues the run."""
    @functools.wraps(hook)
    def worded(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except rundir.RunWriteError as e:
            if self.run_config:
                raise
            raise rundir.RunWriteError(in_script_terms(str(e), getattr(self, "_auto", False)),
                                       e.what) from e
    worded.in_script_terms = True  # every hook has it (a test checks)
    return worded


def quiet_on_other_ranks(init):
    """``ShardCallback.__init__``, on a rank other than 0 of a launch, with sae-shards' own
    records below ERROR unsaid (``distributed.quiet_other_ranks``) until the callback lets go
    (``_let_go``: its training ended, or ``close``) or is collected (a callback abandoned
    after its trainer failed); a construction that raises undoes it at once."""
    @functools.wraps(init)
    def quieted(self, *args, **kwargs):
        self._speak_again = distributed.quiet_other_ranks()
        try:
            init(self, *args, **kwargs)
        except BaseException:
            self._speak_again()
            raise
        weakref.finalize(self, self._speak_again)  # the undo holds no reference to self
    return quieted


def stop_words(signum: int) -> str:
    """How a stop request reads in the log: the signal by name, or ``request_stop``'s."""
    if signum == 0:
        return "a stop was asked (request_stop)"
    try:
        return f"{signal.Signals(signum).name} was received"
    except ValueError:
        return f"signal {signum} was received"
