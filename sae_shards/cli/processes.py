"""One process of a multi-process launch (``accelerate launch``, ``torchrun``): whether it
speaks for the launch (rank 0), its log lines labelled with its rank, and the process group
ended while the interpreter is whole.
"""

from __future__ import annotations

import logging
import os


def main_process() -> bool:
    """Whether this process speaks for a multi-process launch (rank 0; any lone process)."""
    from sae_shards.capture.distributed import is_main

    return is_main()


def this_rank() -> int:
    """This process's rank in its launch (0 for a lone process)."""
    from sae_shards.capture.distributed import rank

    return rank()


class _RankLabel(logging.Formatter):
    """A handler's own format, each record labelled with the rank that logged it (``cli.log``
    is every rank's: Hydra gives each process a handler on it)."""

    def __init__(self, inner: logging.Formatter, rank: int) -> None:
        super().__init__()
        self.inner, self.label = inner, f"[rank {rank}] "

    def format(self, record: logging.LogRecord) -> str:
        return self.label + self.inner.format(record)


def speak_as_rank() -> None:
    """On a rank other than 0 of a launch: sae-shards' own records below ERROR unsaid
    (``distributed.quiet_other_ranks``), the rest (errors, other libraries' warnings) labelled
    with the rank in every handler Hydra configured for this job."""
    from sae_shards.capture.distributed import quiet_other_ranks

    quiet_other_ranks()
    if main_process():
        return
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, _RankLabel):
            handler.setFormatter(_RankLabel(handler.formatter or logging.Formatter(), this_rank()))


def several_processes() -> bool:
    """Whether this process is one of a multi-process launch (``accelerate launch``,
    ``torchrun``: ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def end_process_group() -> None:
    """Destroy the process group a run on several processes set up (``accelerate launch``)
    once its jobs are done, while the interpreter is whole: left to the interpreter's exit,
    gloo's worker threads can abort the process after a finished run ("terminate called without
    an active exception", exit -6; pytorch/pytorch#190489)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
