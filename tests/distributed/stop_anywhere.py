"""``distributed.stop_asked_anywhere`` on 2 CPU processes (``torchrun``, gloo), for
``tests/test_distributed.py``: each argument is one round, ``R:S`` (rank R was asked to stop
by signal S; ``-`` for no rank); what each rank learnt goes to ``OUT/rankR.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from sae_shards.capture import distributed


def main(out: Path, rounds: list[dict[int, int]]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    learnt = [distributed.stop_asked_anywhere(asked.get(rank)) for asked in rounds]
    (out / f"rank{rank}.json").write_text(json.dumps(learnt))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), [dict(tuple(map(int, pair.split(":"))) for pair in a.split(",")
                                  if pair != "-") for a in sys.argv[2:]])
