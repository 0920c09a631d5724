"""``ShardCallback`` on 2 CPU processes (``torchrun``, gloo) given a run_dir, or a trainer
``output_dir``, of their own per rank, for ``tests/test_distributed.py``: what each rank's
``resume_from`` and ``on_train_begin`` said goes to ``OUT/rankR.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist
from transformers import TrainerControl, TrainerState, TrainingArguments

from sae_shards.capture.callback import ShardCallback


def said(call) -> str:
    try:
        call()
    except ValueError as e:
        return str(e)
    return "nothing"


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def trainer(output_dir: Path) -> SimpleNamespace:  # what resume_from reads of a trainer
        return SimpleNamespace(args=TrainingArguments(output_dir=str(output_dir),
                                                      report_to=[]))

    own = ShardCallback(run_dir=out / f"run_{rank}", resume="auto")  # built from RANK
    shared = ShardCallback(run_dir=out / "run", resume="auto")
    results = {
        "own run_dir, resume_from": said(lambda: own.resume_from(trainer(out / "trl"))),
        "own run_dir, train begins": said(lambda: own.on_train_begin(
            TrainingArguments(output_dir=str(out / "trl"), report_to=[]), TrainerState(),
            TrainerControl())),
        "own output_dir": said(lambda: shared.resume_from(trainer(out / f"trl_{rank}"))),
        "shared": said(lambda: shared.resume_from(trainer(out / "trl"))),
    }
    # audit 141 F1: capture settings read per rank hung both ranks in different collectives
    mixed = ShardCallback(run_dir=out / "mixed",
                          capture={"granularity": "group"} if rank == 1 else None,
                          sae={"k": 4 + rank})
    results["settings of each rank"] = said(lambda: mixed.on_train_begin(
        TrainingArguments(output_dir=str(out / "trl"), report_to=[]), TrainerState(),
        TrainerControl()))
    # audit 141 F2: an output_dir of each rank was accepted until the resume failed on it
    outs = ShardCallback(run_dir=out / "outs")
    results["output_dir of each rank, train begins"] = said(lambda: outs.on_train_begin(
        TrainingArguments(output_dir=str(out / f"trl_{rank}"), report_to=[]), TrainerState(),
        TrainerControl()))
    # one output_dir path on node-local disks: each node sees its own files; here rank 0 sees a
    # complete step 4 and rank 1 none (the files themselves are what the nodes would hold)
    from sae_shards.capture import resume as resume_state

    resume_state.latest_complete = lambda *a, **k: 4 if rank == 0 else None
    results["node-local output_dir"] = said(lambda: shared.resume_from(trainer(out / "trl")))
    # the callback added under `if rank == 0` (as a logging callback is): refused on rank 0
    from sae_shards.capture import distributed

    distributed.CALLBACK_WAIT_S = 3.0
    main_only = ShardCallback(run_dir=out / "main_only")
    results["on rank 0 only"] = said(lambda: main_only.on_train_begin(
        TrainingArguments(output_dir=str(out / "trl"), report_to=[]), TrainerState(),
        TrainerControl())) if rank == 0 else "no callback"
    results["resume_from on rank 0 only"] = said(  # audit 136 F5: as README's requeue line
        lambda: main_only.resume_from(trainer(out / "trl"))) if rank == 0 else "no callback"
    dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
