"""Where a user's policy came from, and saving a policy into the run directory.

Analysis needs the run's initial weights theta_0 (the logit lens reads the initial model; the
interventions take the cumulative update ``theta_final - theta_0``). ``sae-shards train`` builds
or names its model; a user's script hands ``ShardCallback`` a live model. ``loaded_from`` says
whether that model still holds the weights of a local directory it names (then ``config.json``
records the directory), and otherwise the callback saves theta_0 with ``save_policy`` before the
first step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sae_shards.capture.sharded_delta import is_dtensor
from sae_shards.capture.zero3_delta import is_zero3
from sae_shards.run import rundir

SPOT_CHECKS = 3
"""Tensors compared between a model and the directory it names (the first few in the file)."""


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 DTensors or DeepSpeed ZeRO-3 partitions: one
    process holds no whole weight, so neither comparing nor saving works from rank 0 alone."""
    return any(is_dtensor(p) or is_zero3(p) for p in model.parameters())


def loaded_from(model: torch.nn.Module) -> str | None:
    """The absolute local directory the model's weights came from, or None: a Hub id, a model
    built in the script, or one whose config names a directory whose weights it no longer holds
    (e.g. ``from_config`` on a local config). The directory's safetensors are spot-checked
    against the live parameters (``SPOT_CHECKS`` tensors). A directory without safetensors (only
    ``pytorch_model.bin``) is not taken: it cannot be checked without unpickling, and analysis
    would have to unpickle it, so the callback saves theta_0 as safetensors instead. A sharded
    model cannot be checked (no process holds a whole weight) and is taken at its word."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    folder = Path(name).expanduser()
    if not name or not (folder / "config.json").is_file():
        return None
    folder = folder.resolve()
    if is_sharded(model):
        return str(folder)
    weights = _first_safetensors(folder)
    if weights is None:
        return None
    from safetensors import safe_open

    # a PEFT model: its base model's names (LoRA-wrapped weights are renamed and not compared)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = dict(base.named_parameters())
    checked = 0
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        for key in f.keys():
            live = params.get(key)
            if live is None or tuple(live.shape) != tuple(f.get_slice(key).get_shape()):
                continue
            if not torch.equal(f.get_tensor(key).to(live.dtype), live.detach().cpu()):
                return None
            checked += 1
            if checked == SPOT_CHECKS:
                break
    return str(folder) if checked else None


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}
"""``(path, size, mtime_ns) -> hash`` already taken by this process (a job asks twice)."""


def fingerprint(folder: str | Path) -> dict[str, str]:
    """``{weight file: hash}`` of a model directory's weight files (``*.safetensors``, ``*.bin``
    at its top): the SHA-256 of each whole file, so any edit of the weights changes it (about
    1 GB/s on a 2-core VM, ``scripts/bench_fingerprint.py``: ~15 s for 15 GB, once per file
    and process). Recorded in
    ``config.json`` (``model.fingerprint``) when the run starts, so analysis can tell that the
    initial weights it reads are not the ones the run started from. ``{}`` for a directory
    that is not there."""
    out = {}
    folder = Path(folder)
    if not folder.is_dir():
        return out
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and path.suffix in (".safetensors", ".bin")):
            continue
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _FINGERPRINTS:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 23):
                    digest.update(chunk)
            _FINGERPRINTS[key] = digest.hexdigest()[:24]
        out[path.name] = _FINGERPRINTS[key]
    return out


def _first_safetensors(folder: Path) -> Path | None:
    single = folder / "model.safetensors"
    if single.is_file():
        return single
    index = folder / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return folder / files[0] if files and (folder / files[0]).is_file() else None


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A PEFT model's base weights under the base model's own names: the LoRA factors left out,
    each wrapped layer's ``base_layer`` unwrapped, a ``modules_to_save`` module's original (the
    weights before training; a LoRA run's theta_0, since its adapter starts at B = 0)."""
    out = {}
    for name, tensor in model.get_base_model().state_dict().items():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out


def save_policy(model: torch.nn.Module, tokenizer: Any | None, out: Path,
                base_only: bool = False) -> None:
    """``save_pretrained`` of the model (and tokenizer, when there is one) into ``out``, written
    beside it and renamed into place, so a kill leaves the whole directory or none.
    ``base_only``: a PEFT model's base model alone (``base_weights``), loadable with
    ``from_pretrained`` like the directory it could have been loaded from."""
    tmp = out.with_name(f".{out.name}.tmp")
    with rundir.writing(out):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if base_only:
                model.get_base_model().save_pretrained(str(tmp), state_dict=base_weights(model))
            else:
                model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
