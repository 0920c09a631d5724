"""Read the records of an offline W&B run file (``run-<id>.wandb``), for tests.

The file is a 7-byte header (``:W&B``, magic, version) followed by LevelDB-log framed protobuf
``wandb.proto.wandb_internal_pb2.Record`` messages in 32 KiB blocks: each chunk has a 4-byte CRC,
a 2-byte little-endian length and a 1-byte type (1 full, 2 first, 3 middle, 4 last).
"""

from __future__ import annotations

import glob
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def read_records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer: zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero fill at the end of a block
            pos += left_in_block
            continue
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def offline_run(run_dir: Path) -> dict:
    """History keys, summary keys and defined metrics of the single offline run in run_dir."""
    (file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, keys, summary, metrics, artifacts = 0, set(), {}, {}, []
    for rec in read_records(file):
        match rec.WhichOneof("record_type"):
            case "history":
                history += 1
                keys |= {it.key or "/".join(it.nested_key) for it in rec.history.item}
            case "summary":
                summary |= {it.key or "/".join(it.nested_key): it.value_json for it in rec.summary.update}
            case "metric":
                metrics[rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
            case "artifact":
                artifacts.append(rec.artifact.name)
    return {"history_rows": history, "keys": keys, "summary": summary, "metrics": metrics,
            "artifacts": artifacts}
