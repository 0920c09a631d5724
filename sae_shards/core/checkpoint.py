"""SAE checkpoints: one directory with ``sae.safetensors`` + ``config.json`` (+ resume state).

Layout (format version 1)::

    sae.safetensors            decoder.<target>.U [N, m, r]   decoder.<target>.V [N, n, r]
                               encoder.<target>.A [N, m, r]   encoder.<target>.B [N, n, r]
                               decoder.<target>.d [N, m]      encoder.<target>.d [N, m]  (1-D)
                               b_enc [N]  b_dec.<target> [*shape]  input_scale []  threshold []
                               stats.density / stats.mean_abs_act / stats.last_active_step [N]
                               header metadata: {"format": "sae-shards", "format_version": "1"}
    config.json                format_version, sae config, targets (name/shape/rank), run metadata
    training_state.safetensors optional: Adam moments, trainer counters, latent statistics

Directories are written under a temporary name and renamed into place, so a reader never sees a
half-written checkpoint. Loading reads safetensors and JSON only (never pickle) and validates
names, shapes and the version before building anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import TargetSpec

FORMAT = "sae-shards"
FORMAT_VERSION = 1
SAE_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the fix."""


class LoadedSAE(NamedTuple):
    sae: LowRankSAE
    config: dict[str, Any]  # the parsed config.json (run metadata under "meta")
    stats: dict[str, torch.Tensor]  # stats.* tensors
    path: Path


# ---------------------------------------------------------------------------- tensors <-> SAE


def live_tensors(sae: LowRankSAE) -> dict[str, torch.Tensor]:
    """The SAE's parameters and buffers under their checkpoint names (the live objects)."""
    out: dict[str, torch.Tensor] = {}
    for tf, bd in zip(sae.factors, sae.b_dec):
        name = tf.spec.name
        if tf.spec.is_matrix:
            out[f"decoder.{name}.U"], out[f"decoder.{name}.V"] = tf.U, tf.V
            out[f"encoder.{name}.A"], out[f"encoder.{name}.B"] = tf.A, tf.B
        else:
            out[f"decoder.{name}.d"], out[f"encoder.{name}.d"] = tf.d_dec, tf.d_enc
        out[f"b_dec.{name}"] = bd
    out["b_enc"] = sae.b_enc
    out["input_scale"] = sae.input_scale
    out["threshold"] = sae.threshold
    return out


def sae_tensors(sae: LowRankSAE) -> dict[str, torch.Tensor]:
    """CPU copies of :func:`live_tensors`, ready for safetensors."""
    return {k: v.detach().to("cpu").contiguous() for k, v in live_tensors(sae).items()}


# ---------------------------------------------------------------------------- writing


def save_checkpoint(
    path: str | Path,
    sae: LowRankSAE,
    stats: Mapping[str, torch.Tensor] | None = None,
    meta: Mapping[str, Any] | None = None,
    training_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temporary directory renamed into place).

    ``stats`` are ``stats.*`` tensors (e.g. ``LatentStats.as_tensors()``), ``meta`` is JSON-able
    run metadata (source, model id, RL step, ...), ``training_state`` the resume tensors.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is as readable as its parent
    try:
        tensors = sae_tensors(sae)
        for k, v in (stats or {}).items():
            if not k.startswith("stats."):
                raise ValueError(f"stat tensor names must start with 'stats.', got {k!r}")
            tensors[k] = v.detach().to("cpu").contiguous()
        _save_tensors(tensors, tmp / SAE_FILE,
                      {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sae": sae.cfg.to_dict(),
            "targets": [{"name": t.name, "shape": list(t.shape), "rank": t.rank} for t in sae.targets],
            "meta": dict(meta or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        if training_state is not None:
            _save_tensors({k: v.detach().to("cpu").contiguous() for k, v in training_state.items()},
                          tmp / STATE_FILE, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        _fsync_dir(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: Path, kind: str,
                     metadata: Mapping[str, str] | None = None) -> None:
    """One safetensors file (CPU, contiguous), written beside ``path`` and renamed into place.

    The header holds ``format = kind`` and ``format_version`` plus ``metadata``.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    header = {"format": kind, "format_version": str(FORMAT_VERSION), **(metadata or {})}
    _save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, header)
    os.replace(tmp, path)


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path,
                  metadata: Mapping[str, str]) -> None:
    """``safetensors.save_file``, then the mode any new file gets (safetensors creates 0600, so
    shards written by one user could not be read by the group that analyses them)."""
    save_file(dict(tensors), path, metadata=dict(metadata))
    os.chmod(path, 0o666 & ~process_umask())


def process_umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0o022
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst``; an existing ``dst`` is moved aside first, then removed."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


# ---------------------------------------------------------------------------- reading


def read_config(path: str | Path) -> dict[str, Any]:
    """Parse and validate ``config.json`` of a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; a checkpoint directory holds {CONFIG_FILE} "
                              f"and {SAE_FILE}")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e}); the file is damaged") from e
    version = config.get("format_version")
    if config.get("format") != FORMAT or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file}: format {config.get('format')!r} version {version!r} is not supported; "
            f"this sae-shards reads {FORMAT!r} version {FORMAT_VERSION}")
    for key in ("sae", "targets"):
        if key not in config:
            raise CheckpointError(f"{cfg_file}: missing key {key!r}")
    return config


def read_tensors(file: Path, expect_version: bool = True) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning any damage into an error naming the file."""
    return read_safetensors(file, expect_version)[0]


def read_safetensors(file: Path, expect_version: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``read_tensors`` and the file's header metadata, in one read."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if expect_version and header.get("format_version") != str(FORMAT_VERSION):
                raise CheckpointError(
                    f"{file}: header format_version {header.get('format_version')!r}, expected "
                    f"'{FORMAT_VERSION}'")
            return {k: f.get_tensor(k) for k in f.keys()}, header
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot be read as safetensors ({e}); the file is "
                              "truncated or damaged — re-save it from the run") from e


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedSAE:
    """Load and validate a checkpoint directory; returns the SAE (eval mode) and its metadata."""
    path = Path(path)
    config = read_config(path)
    try:
        cfg = SAEConfig.from_dict(config["sae"])
        targets = [TargetSpec(t["name"], tuple(t["shape"]), int(t["rank"])) for t in config["targets"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid SAE config or targets: {e}") from e
    tensors = read_tensors(path / SAE_FILE)
    sae = LowRankSAE(targets, cfg)
    live = live_tensors(sae)
    missing = sorted(set(live) - set(tensors))
    if missing:
        raise CheckpointError(f"{path / SAE_FILE}: missing tensors {missing[:5]} named by {CONFIG_FILE}")
    stats = {k: v for k, v in tensors.items() if k.startswith("stats.")}
    unknown = sorted(set(tensors) - set(live) - set(stats))
    if unknown:
        raise CheckpointError(f"{path / SAE_FILE}: unexpected tensors {unknown[:5]}")
    for name, dst in live.items():
        if tensors[name].shape != dst.shape:
            raise CheckpointError(
                f"{path / SAE_FILE}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"{CONFIG_FILE} implies {tuple(dst.shape)}")
    with torch.no_grad():
        for name, dst in live.items():
            dst.copy_(tensors[name])
    return LoadedSAE(sae.to(device).eval(), config, stats, path)


def load_training_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The resume tensors of a checkpoint directory (error if it was saved without them)."""
    return read_tensors(Path(path) / STATE_FILE)
