"""The timeline of a run that was killed (``kill -9``, a crash, a pre-empted job).

A run writes ``activations.safetensors`` when it ends, so a killed run has none. Each periodic
checkpoint still left what the end would have used: ``resume/step_N.safetensors`` holds the ring
buffer's samples and slot metadata and the online activation log, and ``checkpoints/step_N/``
the SAE of that step. ``activations_from_resume`` rebuilds the buffer from the file and encodes
it with that SAE, exactly as the end of the run encodes its buffer with the final SAE, so
``RunView`` (and ``sae-shards analyze``) read a killed run as of its newest checkpoint without
resuming it. Only safetensors and JSON are read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from sae_shards.capture.buffer import DeltaRingBuffer
from sae_shards.capture.runner import ActivationLog, encode_buffer
from sae_shards.core import json_read
from sae_shards.core.checkpoint import CheckpointError, read_safetensors
from sae_shards.core.targets import stack_targets
from sae_shards.run import rundir


def resume_file_of(run_dir: Path, checkpoint: str) -> Path | None:
    """The resume file written with checkpoint ``step_XXXXXX``; None for ``final`` (a finished
    run keeps its buffer in no resume file of its own)."""
    step = rundir.step_of(checkpoint)
    return None if step is None else rundir.resume_file(run_dir, step)


def activations_from_resume(run_dir: Path, checkpoint: str, sae, sae_step: int
                            ) -> dict[str, Tensor]:
    """``activations.safetensors``' tensors for step checkpoint ``checkpoint``: the online log
    as saved with it, and ``final.*``, the buffered samples encoded by that checkpoint's SAE
    (``sae``, trained for ``sae_step`` steps). The buffer's layout (dense, or per-event factors
    of some rows per matrix) is read from the SAE's sample form and the saved slots."""
    path = resume_file_of(run_dir, checkpoint)
    if path is None:
        raise CheckpointError(f"{run_dir}: checkpoint {checkpoint!r} has no resume file")
    tensors, header = read_safetensors(
        path, kind=rundir.RESUME_KIND,
        missing_hint=" (a killed run is read from its newest checkpoint's resume file)")
    try:
        info = json_read.loads(header["info"])["buffer"]
        capacity = len(info["meta"])
        captured = stack_targets(sae.targets)  # as the buffer held them (experts whole)
        saved = {t.name: tensors[f"buffer.{t.name}"] for t in captured}
        dtype = saved[captured[0].name].dtype
        # per event: each matrix's slot is [rows, m + n], rows = min(event_rank, m, n)
        rows = [saved[t.name].shape[1] for t in captured if t.is_matrix]
        event_rank = max(rows) if sae.sample_form == "factored" and rows else None
        buffer = DeltaRingBuffer(captured, capacity, "cpu", dtype, event_rank)
        buffer.load_state(tensors, info)
        online = ActivationLog.from_tensors(tensors, "online")
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a resume file that fits {checkpoint}'s shards "
                              f"({type(e).__name__}: {e})") from e
    final = encode_buffer(sae, buffer, sae_step)
    return {**online.tensors("online"), **final.tensors("final"),
            "input_scale": torch.tensor(float(sae.input_scale))}
