"""Where a user's policy came from, and saving a policy into the run directory.

Analysis needs the run's initial weights theta_0 (the logit lens reads the initial model; the
interventions take the cumulative update ``theta_final - theta_0``). ``sae-shards train`` builds
or names its model; a user's script hands ``ShardCallback`` a live model. ``loaded_from`` says
whether that model still holds the weights of a local directory it names (then ``config.json``
records the directory), and otherwise the callback saves theta_0 with ``save_policy`` before the
first step. A LoRA policy's theta_0 is its base model with its adapter as the run starts merged
in: the base (a directory or ``run_dir/model``), plus ``run_dir/initial_adapter`` when the adapter
does not start at zero (``starts_at_base``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from sae_shards.capture.sharded_delta import is_dtensor
from sae_shards.capture.zero3_delta import is_zero3
from sae_shards.core import json_read
from sae_shards.core.checkpoint import usual_file_modes
from sae_shards.core.checkpoint_checks import opened_safetensors
from sae_shards.run import rundir

log = logging.getLogger(__name__)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 DTensors or DeepSpeed ZeRO-3 partitions: one
    process holds no whole weight, so neither comparing nor saving works from rank 0 alone."""
    return any(is_dtensor(p) or is_zero3(p) for p in model.parameters())


def loaded_from(model: torch.nn.Module) -> str | None:
    """The absolute local directory the model's weights came from, or None: a Hub id, a model
    built in the script, or one whose config names a directory whose weights it no longer holds
    (``from_config`` on a local config; an adapter merged, embeddings resized, any weight edited
    or cast to a lower precision after loading). Every parameter is compared with the
    directory's safetensors: present under its name, the same shape, a dtype that holds the
    file's values exactly, and equal values (this reads the weight files once, as the
    fingerprint does). A directory without safetensors (only ``pytorch_model.bin``) is not
    taken: it cannot be checked without unpickling, and analysis would have to unpickle it, so
    the callback saves theta_0 as safetensors instead. A sharded model cannot be checked (no
    process holds a whole weight): it is taken at its word when the directory holds safetensors
    weights, else (a config alone: ``from_config``) None, and the callback gathers it."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    folder = Path(name).expanduser()
    if not name or not (folder / "config.json").is_file():
        return None
    folder = folder.resolve()
    files = _safetensors_files(folder)
    if is_sharded(model):
        return str(folder) if files else None
    # a parameter the files do not have, or hold otherwise: not theirs
    if not files or not _files_hold(files, _as_saved(model, _initial_parameters(model)),
                                    MODEL_DIR_ADVICE):
        return None
    return str(folder)


MODEL_DIR_ADVICE = ("this is the directory the policy was loaded from, whose weights sae-shards "
                    "compares with the policy's when a run starts (to record it as theta_0): "
                    "download or save the model again and load the policy from that copy")
CHECKPOINT_ADVICE = ("this is the TRL checkpoint the run resumes from: resume from another "
                     "checkpoint (resume_from_checkpoint)")


def _initial_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a run starts from, under the names its model directory gives them: a
    PEFT model's base parameters (``base_weights``' renaming, LoRA factors and
    ``modules_to_save`` copies left out); tied weights once."""
    if not hasattr(model, "get_base_model"):
        return {n: p for n, p in model.named_parameters()}
    return {_base_name(n): p for n, p in model.get_base_model().named_parameters()
            if ".lora_" not in n and ".modules_to_save." not in n}


def _as_saved(model: torch.nn.Module, params: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
    """``params`` under the names and layout the model's weight files hold. transformers 5
    converts some weights on loading and back on saving (a mixture of experts' experts, one
    file tensor per expert and projection, become one stacked tensor per projection:
    ``revert_weight_conversion``, as ``save_pretrained`` uses it; here views of the live
    parameters, no copy for a split). Unchanged where transformers has no such conversion
    for the model, or cannot revert it (then the files are not taken: theta_0 is saved)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without weight conversions: names are the files'
        return params
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        with torch.no_grad():
            return dict(revert_weight_conversion(base, {n: p.detach() for n, p in params.items()}))
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError) as e:
        log.debug("cannot revert transformers' weight conversion of %s: %s",
                  type(base).__name__, e)
        return params


def restore_converted(model: torch.nn.Module, checkpoint: Path) -> list[str]:
    """Load the weights transformers left out when it resumed ``model`` from TRL's
    ``checkpoint`` directory, and return their names (the model's).

    ``Trainer`` reloads a checkpoint with a plain ``load_state_dict(strict=False)``, which skips
    every weight transformers converts on loading: a mixture of experts' experts, saved one per
    expert and stacked in the model (huggingface/transformers#48805), stay at the weights the
    script loaded while the rest of the policy and the optimizer resume. When the checkpoint's
    files (compared in their own layout, ``_as_saved``) differ from those weights, the
    checkpoint is loaded once more with ``from_pretrained``, which converts them, and the
    model's converted weights are copied from it (this holds a second copy of the model in host
    memory for a moment), then checked (``RuntimeError`` if one still differs). Nothing for a
    model without converted weights, a sharded one, or a checkpoint without safetensors (a LoRA
    checkpoint holds its adapter only)."""
    files = _safetensors_files(Path(checkpoint))
    if not files or is_sharded(model):
        return []
    live = _initial_parameters(model)
    saved = _as_saved(model, live)
    converted = [n for n in live if n not in saved]  # the model's names the files lack
    if not converted or _files_hold(files, {k: v for k, v in saved.items() if k not in live},
                                    CHECKPOINT_ADVICE):
        return []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    reference = dict(type(base).from_pretrained(
        str(checkpoint), dtype=live[converted[0]].dtype).named_parameters())
    with torch.no_grad():
        for name in converted:
            live[name].copy_(reference[name].detach().to(live[name].device))
    del reference
    left = {k: v for k, v in _as_saved(model, live).items() if k not in live}
    if not _files_hold(files, left, CHECKPOINT_ADVICE):
        raise RuntimeError(f"{checkpoint}: the policy's converted weights ({converted[:3]}) "
                           "still differ from the checkpoint's after loading them; resuming "
                           "would continue from other weights than the checkpoint's")
    return converted


def _files_hold(files: list[Path], tensors: dict[str, torch.Tensor], advice: str) -> bool:
    """Whether the safetensors ``files`` hold every one of ``tensors`` exactly (``_holds``).
    A file that is truncated or damaged, or that safetensors fails to map into memory, raises
    ``CheckpointError`` naming it (``opened_safetensors``, with ``advice``: what to do)."""
    unchecked = dict(tensors)
    for path in files:
        with opened_safetensors(path, advice) as f:
            for key in f.keys():
                tensor = unchecked.pop(key, None)
                if tensor is not None and not _holds(tensor, f, key):
                    return False
    return not unchecked


def _base_name(name: str) -> str:
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def _holds(live: torch.Tensor, f: Any, key: str) -> bool:
    """Whether the parameter ``live`` holds exactly tensor ``key`` of the open safetensors
    file ``f``: same shape, a dtype the file's values cast to without loss, equal values."""
    if tuple(live.shape) != tuple(f.get_slice(key).get_shape()):
        return False
    stored = f.get_tensor(key)
    if torch.promote_types(stored.dtype, live.dtype) != live.dtype:  # e.g. fp32 file, bf16 live
        return False
    with torch.no_grad():
        return torch.equal(stored.to(device=live.device, dtype=live.dtype), live.detach())


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


def moved_to(recorded: dict[str, Any], name_or_path: str) -> str | None:
    """Where a resumed run's initial model moved: the absolute ``name_or_path`` the resumed
    policy was loaded from, when it is another local directory than ``config.json``'s
    ``model.path`` (``recorded``: its ``model`` section) with the weight files the run
    fingerprinted (the same files at a new place: a run resumed on another machine); else None."""
    path, known = recorded.get("path"), recorded.get("fingerprint")
    if not (path and known and name_or_path and Path(name_or_path).is_dir()):
        return None
    now = str(Path(name_or_path).resolve())
    return now if now != path and fingerprint(now) == known else None


def _safetensors_files(folder: Path) -> list[Path]:
    """A model directory's safetensors weight files (one, or the shards its index names); []
    when it has none or a file its index names is missing."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    try:
        names = sorted(set(json_read.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    files = [folder / n for n in names]
    return files if files and all(p.is_file() for p in files) else []


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A PEFT model's base weights under the base model's own names: the LoRA factors left out,
    each wrapped layer's ``base_layer`` unwrapped, a ``modules_to_save`` module's original (the
    weights before training; a LoRA run's theta_0, since its adapter starts at B = 0)."""
    return {_base_name(name): tensor
            for name, tensor in model.get_base_model().state_dict().items()
            if ".lora_" not in name and ".modules_to_save." not in name}


def starts_at_base(model: torch.nn.Module) -> bool:
    """Whether a PEFT model's effective weights are its base model's: every active LoRA
    adapter's ``s B A`` is zero (peft's default initialisation, ``B = 0``) and every
    ``modules_to_save`` copy equals its original. False for an adapter trained before (an SFT
    adapter loaded with ``is_trainable=True``) or initialised away from zero (PiSSA, OLoRA...):
    the run then starts from the base with that adapter merged in, and the callback saves the
    adapter as it starts (``save_policy`` of the PEFT model writes its adapter alone)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    with torch.no_grad():
        for module in model.get_base_model().modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    if adapter not in module.lora_B:
                        continue
                    A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                    # B = 0 (the default) settles it without building the [out, in] product
                    if B.any() and A.any() and module.get_delta_weight(adapter).any():
                        return False
            elif isinstance(module, ModulesToSaveWrapper):
                for adapter in module.active_adapters:
                    copy = module.modules_to_save[adapter].state_dict()
                    original = module.original_module.state_dict()
                    if any(not torch.equal(v, original[k]) for k, v in copy.items()):
                        return False
    return True


def save_policy(model: torch.nn.Module, tokenizer: Any | None, out: Path,
                base_only: bool = False,
                state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` of the model (and tokenizer, when there is one) into ``out``, written
    beside it and renamed into place, so a kill leaves the whole directory or none.
    ``base_only``: a PEFT model's base model alone (``base_weights``), loadable with
    ``from_pretrained`` like the directory it could have been loaded from. ``state_dict``: the
    weights to write instead of the model's own (a sharded model's, gathered:
    ``gathered_policy.gathered_state_dict``)."""
    tmp = out.with_name(f".{out.name}.tmp")
    with rundir.writing(out):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if base_only:
                model.get_base_model().save_pretrained(str(tmp), state_dict=base_weights(model))
            elif state_dict is not None:
                model.save_pretrained(str(tmp), state_dict=dict(state_dict))
            else:
                model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            usual_file_modes(tmp)  # the weights' 0600: a policy is read by whoever analyses
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
