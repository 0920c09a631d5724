"""``distributed.begin_together`` on 2 CPU processes (``torchrun``, gloo), for
``tests/test_distributed.py``: in each round, the ranks named for it are given a problem (the
others none), each rank a note; what the calls did goes to ``OUT/rankR.json``, a list by round."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from sae_shards.capture import distributed


def main(out: Path, rounds: list[set[int]]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    said = []
    for failing in rounds:
        problem = ValueError(f"rank {rank}'s file is damaged") if rank in failing else None
        try:
            said.append({"notes": distributed.begin_together(problem, [f"note of rank {rank}"])})
        except distributed.StoppedWithAnotherRank as e:
            said.append({"stopped": str(e)})
    (out / f"rank{rank}.json").write_text(json.dumps(said))
    dist.destroy_process_group()


if __name__ == "__main__":  # rounds: "-" for none failing, else ranks joined by ","
    main(Path(sys.argv[1]), [{int(r) for r in a.split(",") if r != "-"} for a in sys.argv[2:]])
