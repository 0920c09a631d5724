"""Checkpoint writes off the RL thread: one write at a time on a background thread.

The callback takes a consistent snapshot of the SAE side at RL step k (copies of the small SAE
and trainer tensors; the ring buffer's filled slots as views), hands the file writing to
``BackgroundWriter.submit`` and lets RL go on. The buffer views stay valid because the callback
calls ``wait`` before the next step writes the buffer (``on_step_begin``), before the next
checkpoint and at the end of the run. An error in the write (disk full) is raised in the RL
thread at that ``wait``; whatever was complete on disk before stays intact, since every file is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class BackgroundWriter:
    """Runs ``submit``-ted writes one at a time on a background thread."""

    def __init__(self, name: str = "sae-shards-checkpoint") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """A write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the background, once the previous write finished (its error,
        if any, is raised here instead)."""
        self.wait()
        # Not a daemon: an interpreter exiting after an error elsewhere still finishes the file.
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=self.name)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            fn(*args)
        except BaseException as e:  # re-raised in the caller's thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the write in flight is done; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
