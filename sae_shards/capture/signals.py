"""Stopping a run on SIGTERM / Ctrl-C after the current step, with a checkpoint.

A scheduler's SIGTERM (SLURM before its time limit, a pre-empted node) or a Ctrl-C asks the run
to end after the optimizer step it is in, with a checkpoint TRL and sae-shards resume from; a
second signal stops at once. ``ShardCallback`` installs this while it trains
(``handle_signals=True``, where the process's handlers are still Python's defaults, on the main
thread); ``sae-shards train`` wraps its whole ``trainer.train()`` in it. Under ``torchrun`` /
``accelerate launch`` the launcher forwards the signal and kills its workers about 30 s later:
a step plus its checkpoint must fit in that time (signal the workers themselves otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any, Collection, Iterator, Protocol

log = logging.getLogger(__name__)

REPEAT_S = 2.0
"""Multi-process runs: a second identical signal this soon after the first is the launcher's
echo of it, not a second request."""

SIGNALS = (signal.SIGTERM, signal.SIGINT)


SECOND_IN_SCRIPT = (
    "%s again: stopping at once, as the signal does without sae-shards (SIGTERM ends the "
    "process, exit status 143; Ctrl-C raises KeyboardInterrupt); this RL step is lost. To "
    "continue, run the script again with ShardCallback(..., resume=\"auto\") and "
    "trainer.train(resume_from_checkpoint=callback.resume_from(trainer)): it resumes from the "
    "newest complete checkpoint, or starts the run again when it has none yet")
"""A second stop signal in a user's script (``ShardCallback``'s guard): said, then the signal's
own action, so the exit status is the signal's (a ``KeyboardInterrupt`` subclass raised out of
``trainer.train()`` ended the script with status 1 and a traceback)."""


class Stoppable(Protocol):
    stop_signal: int | None
    ending: bool
    """The run's end (final shards, model, summary) is being written: a stop changes nothing."""

    def request_stop(self, signum: int = 0) -> None: ...


class SecondSignal(KeyboardInterrupt):
    """A second stop signal while training: the run stops at once (``signum``: which)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum} again: stopping at once")
        self.signum = signum


class StoppedBeforeTraining(KeyboardInterrupt):
    """A stop signal during a job's setup (the model loads, W&B starts): nothing is trained
    yet, so there is no step to finish and no checkpoint to write; the job ends at once
    (``signum``: which signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} before training began")
        self.signum = signum


@contextlib.contextmanager
def stop_before_training() -> Iterator[None]:
    """While in the block, SIGTERM (and SIGINT) raise ``StoppedBeforeTraining``, so that the
    job says it stopped and why, where SIGTERM's default would end the process without a
    word. Only the signals :func:`free_signals` gives (a script's own handlers are kept)."""
    previous: dict[int, Any] = {}

    def handler(signum, frame):
        raise StoppedBeforeTraining(signum)

    for sig in free_signals():
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        _restore(previous)


class EndAtOnce:
    """While armed, SIGTERM and SIGINT write ``message`` (``{signal}`` in it: the signal's name;
    nothing when None) to stderr and end the process at once with 128 + the signal.

    For the windows in which nothing needs finishing and raising would be unsafe: the seconds
    ``sae-shards train`` spends importing torch, transformers and TRL. A ``KeyboardInterrupt``
    raised inside an import leaves half-imported modules, whose own errors then replace it
    (sympy's ``AttributeError``, transformers' "Could not import module"); SIGTERM's default
    ends the process without a word. Only the signals :func:`free_signals` gives, so a job's
    own guards (:func:`stop_before_training`, :func:`stop_on_signals`) need it disarmed."""

    def __init__(self, message: str | None) -> None:
        self.message = message
        self.previous: dict[int, Any] = {}
        self.remove_if_empty: list[str] = []  # directories made for nothing (deepest first)

    def arm(self, message: str | None = None) -> None:
        """Take the free signals (if not held already); ``message``: a new one."""
        if message is not None:
            self.message = message
        if not self.previous:
            for sig in free_signals():
                self.previous[sig] = signal.signal(sig, self._end)

    def disarm(self) -> None:
        """Give the signals back (their handlers before ``arm``)."""
        _restore(self.previous)
        self.previous = {}

    def _end(self, signum: int, frame: Any) -> None:
        try:  # no imports here: one may be half done; nothing may keep the process alive
            for folder in self.remove_if_empty:
                try:
                    os.rmdir(folder)  # only when empty
                except OSError:
                    pass
            if self.message is not None:
                said = self.message.replace("{signal}", signal.Signals(signum).name)
                os.write(2, (said + "\n").encode())
        except BaseException:  # noqa: BLE001 - stderr closed, or a pipe the same Ctrl-C ended
            pass
        os._exit(128 + signum)


@contextlib.contextmanager
def stop_on_signals(callback: Stoppable, only_while_training: bool = False,
                    signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """While in the block: the first SIGTERM/SIGINT asks the callback to stop after the current
    step (with a checkpoint); a second one raises ``SecondSignal`` (a ``KeyboardInterrupt``) at
    once, which ``sae-shards train`` reports, or in a script's guard (``only_while_training``)
    says how to resume and gets the signal's own action (``SECOND_IN_SCRIPT``). Main thread
    only.

    Under a multi-process launch one Ctrl-C reaches each worker twice (from the terminal, and
    forwarded by the launcher): a repeat of the same signal within ``REPEAT_S`` counts once.

    ``only_while_training``: a signal that arrives outside transformers' training loop (its
    ``train()`` raised, so the block was never left) puts the previous handlers back and gets
    their behaviour (by default: the process ends), never a stop request nobody will act on.
    ``signals``: which of SIGTERM and SIGINT to handle."""
    from sae_shards.capture import distributed  # torch: here, not in the handler (``train``
    # takes this module's ``stop_before_training`` before torch is imported)

    first: list[float] = []
    previous: dict[int, Any] = {}

    def handler(signum, frame):
        if only_while_training and not in_training_loop(frame):
            _restore(previous)
            _deliver(signum, frame, previous[signum])
            return
        if callback.stop_signal is not None and first:  # this process's second signal
            echo = (distributed.world_size() > 1 and signum == callback.stop_signal
                    and time.monotonic() - first[0] < REPEAT_S)
            if echo:
                return
            if only_while_training:  # a script's guard: the signal's own action, said first
                if distributed.is_main():
                    log.warning(SECOND_IN_SCRIPT, signal.Signals(signum).name)
                _restore(previous)
                _deliver(signum, frame, previous[signum])
                return
            raise SecondSignal(signum)
        first.append(time.monotonic())
        name = signal.Signals(signum).name
        if callback.stop_signal is not None:  # stopping already, though no signal reached this
            # process: asked on another rank (its launcher's forward may follow), or by code
            if distributed.is_main():
                log.warning("%s: the run already stops after this RL step (send it again to "
                            "stop at once)", name)
            return
        callback.request_stop(signum)
        if not distributed.is_main():  # the launcher signals every rank; rank 0 says it once
            return
        if getattr(callback, "ending", False):
            log.warning("%s: the run is writing its end (shards, final policy, summary) and "
                        "stops when that is done (send it again to stop at once; resume=true "
                        "then writes the end again)", name)
        else:
            log.warning("%s: finishing this RL step, writing a checkpoint, then stopping (send "
                        "it again to stop at once)", name)

    if only_while_training:  # marks a guard's handler (``_Training.stale``)
        handler.sae_shards_previous = previous  # type: ignore[attr-defined]
    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        _restore(previous)


def _restore(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _deliver(signum: int, frame: Any, old: Any) -> None:
    """What ``old`` (a handler ``signal.signal`` returned) does with ``signum``."""
    if callable(old):
        old(signum, frame)
    elif old != signal.SIG_IGN:  # the default action (SIGTERM: the process ends)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def in_training_loop(frame: Any) -> bool:
    """Whether ``frame`` (where a signal interrupted the main thread) is inside transformers'
    ``Trainer`` training loop, which TRL's trainers run."""
    while frame is not None:
        if (frame.f_code.co_name == "_inner_training_loop"
                and str(frame.f_globals.get("__name__", "")).startswith("transformers.")):
            return True
        frame = frame.f_back
    return False


def free_signals() -> tuple[int, ...]:
    """The signals a guard may take: on the main thread, SIGTERM and SIGINT where each still has
    Python's default handler. Nothing when SIGTERM is handled by someone else (the user's
    script, ``sae-shards train``); SIGTERM alone when SIGINT is ignored (a process started in
    the background by a shell: ``cmd &``, nohup)."""
    if threading.current_thread() is not threading.main_thread():
        return ()
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return ()
    return ((signal.SIGTERM, signal.SIGINT)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler
            else (signal.SIGTERM,))


class _Training:
    """Every callback training in this process now (several ``ShardCallback``s may share one
    trainer), behind one set of handlers: a signal asks all of them to stop."""

    def __init__(self) -> None:
        self.callbacks: list[Stoppable] = []
        self.installed: Any = None  # the entered stop_on_signals, while any callback trains

    @property
    def stop_signal(self) -> int | None:
        return next((c.stop_signal for c in self.callbacks if c.stop_signal is not None), None)

    @property
    def ending(self) -> bool:
        return any(getattr(c, "ending", False) for c in self.callbacks)

    def request_stop(self, signum: int = 0) -> None:
        for c in self.callbacks:
            c.request_stop(signum)

    def stale(self) -> bool:
        """The handlers installed for these callbacks are no longer in place (a signal outside
        the training loop restored the earlier ones, or a script replaced them): what is left
        is a ``train()`` that raised, whose callbacks will never leave."""
        return (self.installed is not None
                and not hasattr(signal.getsignal(signal.SIGTERM), "sae_shards_previous"))


_TRAINING = _Training()


class SignalGuard:
    """A callback's share of ``stop_on_signals(only_while_training=True)``, entered at its train
    begin and left at its end: the first callback to enter installs the handlers (for the
    signals :func:`free_signals` gives), the last to leave restores them."""

    def __init__(self, callback: Stoppable) -> None:
        self.callback = callback

    def enter(self, peers: Collection[Any] | None = None) -> bool:
        """Join the callbacks a signal stops; False when no handler is installed for them
        (someone else's are in place). ``peers``: the callbacks of the trainer now training;
        members that are not among them were left by a ``train()`` that raised (transformers
        calls no callback on an exception) and are dropped."""
        group = _TRAINING
        if group.stale():
            group.callbacks.clear()
            group.installed = None
        if peers is not None:
            group.callbacks[:] = [c for c in group.callbacks if any(c is p for p in peers)]
        if self.callback in group.callbacks:
            return group.installed is not None
        if group.installed is None:
            signals = free_signals()
            if not signals:
                return False
            group.installed = stop_on_signals(group, only_while_training=True, signals=signals)
            group.installed.__enter__()
        group.callbacks.append(self.callback)
        return True

    def exit(self) -> None:
        """Leave; the last callback to leave puts the previous handlers back."""
        group = _TRAINING
        if self.callback not in group.callbacks:
            return
        group.callbacks.remove(self.callback)
        if not group.callbacks and group.installed is not None:
            installed, group.installed = group.installed, None
            installed.__exit__(None, None, None)
