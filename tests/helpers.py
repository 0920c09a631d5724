"""Helpers shared by several test modules (test modules never import each other).

Tiny models and data for the capture tests, and a reader for offline W&B run files.
Heavy imports (transformers, peft, wandb) happen inside the helpers that need them.

Offline W&B run files (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic, version) followed by
LevelDB-log framed protobuf ``wandb.proto.wandb_internal_pb2.Record`` messages in 32 KiB blocks:
each chunk has a 4-byte CRC, a 2-byte little-endian length and a 1-byte type (1 full, 2 first,
3 middle, 4 last).
"""

from __future__ import annotations

import glob
import json
import math
import struct
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

def tree_bytes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``folder`` (its path relative to it) with its bytes, leaving out files
    named in ``skip`` (``.lock``, ``cli.log``: written by every attempt): compared before and
    after a refusal, which must change nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


# --- intervention tests: a direction that raises one task's reward --------------------------


def vowel_direction(model, tokenizer, task) -> dict[str, torch.Tensor]:
    """A unit lm_head direction raising the vowels' logits (the ``letters`` reward): their rows
    move along the mean final hidden state of real prompts, so every vowel logit grows for
    typical inputs."""
    prompts = list(task.dataset(16, seed=99)["prompt"])
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    mean_hidden = out.hidden_states[-1][:, -1].mean(dim=0)  # [d_model], after the final norm
    d = torch.zeros_like(model.lm_head.weight)  # [vocab, d_model]
    for ch in task.target_chars:
        d[tokenizer.convert_tokens_to_ids(ch)] = mean_hidden / mean_hidden.norm()
    return {"lm_head.weight": d / d.norm()}


# --- capture tests: a tiny causal LM, token data, a ring buffer -------------------------------

PATTERNS = [
    "*layers.*.self_attn.q_proj.weight", "*layers.1.mlp.down_proj.weight", "model.norm.weight"
]


def tiny_lm(seed: int = 0):
    """A 2-layer Qwen2 causal LM (hidden 32, vocab 64), deterministic for ``seed``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg)


def token_data(n: int = 64, length: int = 12) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(64, (n, length), generator=gen)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def lora_model():
    """``tiny_lm()`` with LoRA (r=4, alpha=8) on q_proj and v_proj; skips without peft."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(tiny_lm(), cfg)


@contextmanager
def one_process_group():
    """A torch.distributed process group of this process alone (gloo, a free local port), for
    DTensor parameters as FSDP2 makes them; destroyed on leaving."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def make_buffer(targets, capacity=16, dtype=torch.float32):
    from sae_shards.capture.buffer import DeltaRingBuffer
    from sae_shards.capture.selection import target_shapes
    from sae_shards.core.targets import make_targets

    specs = make_targets(target_shapes(targets), rank=2)
    return DeltaRingBuffer(specs, capacity=capacity, device="cpu", dtype=dtype)


def captured_in_order(buffer):
    """``[{name: fp32 delta}]`` oldest first, and the global steps of their slots."""
    slots = buffer.chronological_slots()
    batch = buffer.gather(slots)
    samples = [{n: x[i] for n, x in batch.items()} for i in range(len(slots))]
    return samples, [buffer.metadata(int(s)).global_step for s in slots]


# --- offline W&B run files --------------------------------------------------------------------

BLOCK = 32768


def read_records(path: str | Path) -> list:
    """The ``wandb_internal_pb2.Record`` messages of an offline run file, in order.

    W&B's service process may still be appending to the file: reading stops at the first chunk
    that is cut short or whose checksum (CRC-32 of its kind byte and data) does not match, so a
    record half-written at the moment of reading is left for the next read rather than parsed.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer: zero padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero fill at the end of a block
            pos += left_in_block
            continue
        chunk = data[pos + 7: pos + 7 + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            break  # not yet fully written
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def finished_records(path: str | Path, kinds: tuple[str, ...] = ("exit",),
                     timeout: float = 30.0) -> list:
    """``read_records(path)`` once it holds a record of each of ``kinds`` (W&B's service
    process writes after the run's ``finish()`` returns: ``exit`` is its last record, an
    artifact's may come late), or as it is after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        present = {rec.WhichOneof("record_type") for rec in records}
        if set(kinds) <= present or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def offline_run(run_dir: Path, kinds: tuple[str, ...] = ("exit", "artifact")) -> dict:
    """History keys, summary keys, defined metrics and config of the single offline run in
    run_dir, read once it holds a record of each of ``kinds`` (``finished_records``)."""
    (file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, keys, summary, metrics, artifacts, group, name = 0, set(), {}, {}, [], None, None
    config: dict = {}
    exit_code = None
    for rec in finished_records(file, kinds):
        match rec.WhichOneof("record_type"):
            case "run":
                group = rec.run.run_group or None
                name = rec.run.display_name or None
                config |= {it.key: json.loads(it.value_json) for it in rec.run.config.update}
            case "config":
                config |= {it.key: json.loads(it.value_json) for it in rec.config.update}
            case "history":
                history += 1
                keys |= {it.key or "/".join(it.nested_key) for it in rec.history.item}
            case "summary":
                summary |= {it.key or "/".join(it.nested_key): it.value_json for it in rec.summary.update}
            case "metric":
                metrics[rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
            case "artifact":
                artifacts.append(rec.artifact.name)
            case "exit":
                exit_code = rec.exit.exit_code
    return {"history_rows": history, "keys": keys, "summary": summary, "metrics": metrics,
            "artifacts": artifacts, "group": group, "name": name, "config": config,
            "exit_code": exit_code}


# --- planted tests: a broken pipeline ---------------------------------------------------------


def random_decoder_copy(run_dir: Path, out: Path) -> Path:
    """A copy of a run whose final SAE has random (unit-norm) directions: a broken pipeline that
    the planted checks must fail."""
    import shutil

    from sae_shards.core.checkpoint import load_checkpoint, save_checkpoint

    shutil.copytree(run_dir, out, symlinks=True)
    loaded = load_checkpoint(out / "checkpoints" / "final")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in loaded.sae.factors.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        loaded.sae.normalize_decoder_()
    save_checkpoint(out / "checkpoints" / "final", loaded.sae, loaded.stats,
                    loaded.config["meta"])
    return out


def edited_copy(run_dir: Path, out: Path, file: str, edit) -> Path:
    """A copy of a run at ``out`` whose safetensors ``file`` is saved again after
    ``edit(tensors, metadata)`` changed them in place (both dicts): a damaged or tampered run."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(run_dir, out, symlinks=True)
    with safe_open(out / file, "pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(out / file)
    edit(tensors, meta)
    save_file(tensors, out / file, metadata=meta)
    return out


def shuffled_labels_copy(run_dir: Path, out: Path) -> Path:
    """A copy of a run whose saved samples' task labels are shuffled: a broken pipeline that the
    planted checks must fail."""
    import random

    def shuffle(tensors, meta):
        labels = json.loads(meta["task_labels"])
        random.Random(0).shuffle(labels)
        meta["task_labels"] = json.dumps(labels)
    return edited_copy(run_dir, out, "samples.safetensors", shuffle)


# --- shard families: the grouping by its definition ---------------------------------------


def average_linkage_by_definition(sim, threshold, exclude=()):
    """The definition, pair by pair: merge the two groups of highest mean similarity."""
    groups = [[j] for j in range(sim.shape[0]) if j not in set(exclude)]
    while len(groups) > 1:
        best, pair = -float("inf"), None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                s = float(sim[groups[a]][:, groups[b]].mean())
                if s > best:
                    best, pair = s, (a, b)
        if best < threshold:
            break
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups)


# --- a model directory that needs its own code (config.json's auto_map) ---------------------

OWN_CODE_FILE = "planted.py"
"""The Python file ``plant_own_code`` writes beside a model."""


def plant_own_code(folder: Path, marker: Path) -> Path:
    """Turn the saved qwen2 model in ``folder`` into one that needs Python code of its own: a
    ``planted.py`` beside it (a ``model_type`` transformers lacks, its config and causal-LM
    classes subclassing qwen2's, so the weights load as they are) named by ``config.json``'s
    ``auto_map``. Importing that file creates ``marker``: proof that the code ran. Returns the
    file."""
    code = folder / OWN_CODE_FILE
    code.write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n\n\n"
        "class PlantedConfig(Qwen2Config):\n"
        "    model_type = 'planted'\n\n\n"
        "class PlantedForCausalLM(Qwen2ForCausalLM):\n"
        "    config_class = PlantedConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="planted", architectures=["PlantedForCausalLM"],
                  auto_map={"AutoConfig": "planted.PlantedConfig",
                            "AutoModelForCausalLM": "planted.PlantedForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return code


def own_code_cache(monkeypatch: pytest.MonkeyPatch, where: Path) -> None:
    """Make transformers copy and import a model's own code under ``where`` (its modules cache,
    ``HF_MODULES_CACHE``), not the user's ``~/.cache/huggingface/modules``, for one test."""
    import sys

    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(where))
    monkeypatch.setattr(sys, "path", list(sys.path))  # init_hf_modules appends it


# --- reading checks: a safetensors file declaring more than it holds -------------------------


def sparse_safetensors(path: Path, shapes: dict[str, list[int]],
                       metadata: dict[str, str] | None = None) -> Path:
    """A valid safetensors file whose float32 tensors ``shapes`` are all zeros, written as a
    sparse file: the header's data offsets match the file's length, so safetensors' own size
    check passes, yet the disk (and this test) holds only the header."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    end = 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end + size]}
        end += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + end)
    return path
