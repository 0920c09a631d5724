"""SAE checkpoints: one directory with ``sae.safetensors`` + ``config.json`` (+ resume state).

Layout (format version 2; version 1, still read, differs only in storing an unused decoder
bias as zeros)::

    sae.safetensors            decoder.<target>.U [N, m, r]   decoder.<target>.V [N, n, r]
                               encoder.<target>.A [N, m, r]   encoder.<target>.B [N, n, r]
                               decoder.<target>.d [N, m]      encoder.<target>.d [N, m]  (1-D)
                               b_enc [N]  b_dec.<target> [*shape]  input_scale []  threshold []
                               (b_dec only when the SAE learns one: ``sae.uses_b_dec``;
                               version 1 held zeros otherwise)
                               stats.density / stats.mean_abs_act [N] float32,
                               stats.fire_count / stats.samples_since_fired /
                               stats.last_active_step [N] int64 (``STATS``)
                               header metadata: {"format": "sae-shards", "format_version": "2"}
    config.json                format_version, sae config, targets (name/shape/rank), sample_form
                               ("dense" or "factored"; absent in older checkpoints: "dense"),
                               run metadata
    training_state.safetensors optional: Adam moments, trainer counters, latent statistics

Directories are written under a temporary name and renamed into place, so a reader never sees a
half-written checkpoint. Loading reads safetensors and JSON only (no code is ever run) and validates
everything before building the SAE; any damage is a ``CheckpointError`` naming the file:

- the directory and each file exist and are regular files; safetensors files parse, and their
  header has ``format = "sae-shards"`` and a ``format_version`` this reads (1 or 2); a higher
  version is reported as written by a newer sae-shards;
- before a safetensors file is opened, its header alone (``check_declared_sizes``): no tensor
  declared larger than the largest one ``config.json`` implies, nor than this machine's memory
  (safetensors checks the header against the file's length only, which a sparse file meets);
- ``config.json`` is one JSON object (no repeated keys) with exactly the keys above
  (``sample_form`` optional, one of "dense"/"factored"); ``sae`` holds known settings of the
  right JSON types that ``SAEConfig`` accepts; each target has a name, an integer shape and rank
  that ``TargetSpec`` accepts, names unique;
- ``sae.safetensors`` holds exactly the tensors the config implies, with its shapes, the SAE's
  tensors float32 only (what ``save_checkpoint`` writes: float16/bfloat16/float64/integer
  tensors are rejected, not converted), all finite, decoder directions of unit norm; ``input_scale`` is 0 (the SAE never
  trained, and ``threshold`` is then NaN) or finite and > 0; ``threshold`` is NaN or finite and
  >= 0; the known ``stats.*`` tensors have one entry per latent and their dtype;
- ``training_state.safetensors`` (read only by ``load_training_state``): complete, finite Adam
  moments shaped like the SAE's trainable parameters, and the trainer's per-latent tensors and
  counters. A damaged training state does not stop ``load_checkpoint``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from sae_shards.core.checkpoint_checks import (  # noqa: F401  (the format's names re-exported)
    ADAM, CONFIG_FILE, DAMAGED, FORMAT, FORMAT_VERSION, SAE_FILE, STATE_FILE, STATE_OPTIONAL,
    STATE_REQUIRED, STATS, CheckpointError, SizeLimit, check_declared_sizes, check_file,
    check_names, check_scale_and_threshold, check_tensor, check_unit_norm, check_version,
    damaged, opened_safetensors, read_spec)
from sae_shards.core.sae import LowRankSAE


class LoadedSAE(NamedTuple):
    sae: LowRankSAE
    config: dict[str, Any]  # the parsed config.json (run metadata under "meta")
    stats: dict[str, torch.Tensor]  # stats.* tensors
    path: Path


# ---------------------------------------------------------------------------- tensors <-> SAE


def live_tensors(sae: LowRankSAE) -> dict[str, torch.Tensor]:
    """The SAE's parameters and buffers under their checkpoint names (the live objects)."""
    out: dict[str, torch.Tensor] = {}
    for i, tf in enumerate(sae.factors):
        name = tf.spec.name
        if tf.spec.is_matrix:
            out[f"decoder.{name}.U"], out[f"decoder.{name}.V"] = tf.U, tf.V
            out[f"encoder.{name}.A"], out[f"encoder.{name}.B"] = tf.A, tf.B
        else:
            out[f"decoder.{name}.d"], out[f"encoder.{name}.d"] = tf.d_dec, tf.d_enc
        if sae.b_dec is not None:
            out[f"b_dec.{name}"] = sae.b_dec[i]
    out["b_enc"] = sae.b_enc
    out["input_scale"] = sae.input_scale
    out["threshold"] = sae.threshold
    return out


def sae_tensors(sae: LowRankSAE, copy: bool = False) -> dict[str, torch.Tensor]:
    """:func:`live_tensors` on the CPU, ready for safetensors (on a CPU SAE the live tensors
    themselves unless ``copy``)."""
    return {k: v.detach().to("cpu", copy=copy).contiguous() for k, v in live_tensors(sae).items()}


# ---------------------------------------------------------------------------- writing


class CheckpointFiles(NamedTuple):
    """What one checkpoint directory holds, ready to write (``write_checkpoint``)."""

    sae: dict[str, torch.Tensor]  # sae.safetensors: parameters, buffers and stats.*
    config: dict[str, Any]  # config.json
    training_state: dict[str, torch.Tensor] | None  # training_state.safetensors, optional


def checkpoint_files(
    sae: LowRankSAE,
    stats: Mapping[str, torch.Tensor] | None = None,
    meta: Mapping[str, Any] | None = None,
    training_state: Mapping[str, torch.Tensor] | None = None,
    copy: bool = False,
) -> CheckpointFiles:
    """The contents of a checkpoint of ``sae`` (arguments as for ``save_checkpoint``) as CPU
    tensors; ``copy``: never the live tensors, so the SAE may train on while they are written."""
    def cpu(v: torch.Tensor) -> torch.Tensor:
        return v.detach().to("cpu", copy=copy).contiguous()

    tensors = sae_tensors(sae, copy)
    for k, v in (stats or {}).items():
        if not k.startswith("stats."):
            raise ValueError(f"stat tensor names must start with 'stats.', got {k!r}")
        tensors[k] = cpu(v)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sae": sae.cfg.to_dict(),
        "sample_form": sae.sample_form,
        "targets": [{"name": t.name, "shape": list(t.shape), "rank": t.rank} for t in sae.targets],
        "meta": dict(meta or {}),
    }
    state = None if training_state is None else {k: cpu(v) for k, v in training_state.items()}
    return CheckpointFiles(tensors, config, state)


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
    return write_checkpoint(path, checkpoint_files(sae, stats, meta, training_state))


def write_checkpoint(path: str | Path, files: CheckpointFiles) -> Path:
    """Write ``files`` as the checkpoint directory ``path``, atomically: under a temporary name,
    each file synced, then renamed into place (an earlier ``path`` is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is as readable as its parent
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    try:
        _save_tensors(files.sae, tmp / SAE_FILE, header)
        (tmp / CONFIG_FILE).write_text(json.dumps(files.config, indent=2, sort_keys=True))
        if files.training_state is not None:
            _save_tensors(files.training_state, tmp / STATE_FILE, header)
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
    try:
        _save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
                      header)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path,
                  metadata: Mapping[str, str]) -> None:
    """``safetensors.save_file``, then the mode any new file gets (safetensors creates 0600, so
    shards written by one user could not be read by the group that analyses them)."""
    try:
        save_file(dict(tensors), path, metadata=dict(metadata))
    except SafetensorError as e:  # how safetensors reports an I/O failure such as a full disk
        raise OSError(str(e)) from e  # (the callers remove their temporary file)
    os.chmod(path, 0o666 & ~process_umask())


def usual_file_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a new file of this process gets
    (``0o666 & ~umask``): ``save_pretrained`` writes weights through safetensors, which creates
    them 0600, so a policy saved by one user could not be read by the group analysing the run."""
    mode = 0o666 & ~process_umask()
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)


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
    return read_spec(Path(path)).config


def read_tensors(file: str | Path, expect_version: bool = True) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning any damage into an error naming the file."""
    return read_safetensors(file, expect_version)[0]


def read_safetensors(file: str | Path, expect_version: bool = True, kind: str | None = None,
                     missing_hint: str = "", limit: SizeLimit | None = None,
                     advice: str = DAMAGED) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``read_tensors`` and the file's header metadata, in one read.

    ``kind``: the header's ``format`` must equal it; ``missing_hint`` is added to the error when
    the file does not exist; ``advice``: what to do when it is truncated or damaged (by default:
    read another checkpoint, which suits a checkpoint's own files, not a run's one file of its
    kind). Before anything is read, every tensor the header declares must fit ``limit`` (what
    the reader knows this file holds at most) and this machine's memory
    (``check_declared_sizes``).
    """
    check_file(file, missing_hint)
    try:
        check_declared_sizes(Path(file), limit, advice)
    except OSError as e:
        raise damaged(Path(file), e, advice) from e
    with opened_safetensors(file, advice) as f:
        header = f.metadata() or {}
        if kind is not None and header.get("format") != kind:
            raise CheckpointError(
                f"{file}: header format {header.get('format')!r}, expected {kind!r}: "
                f"sae-shards did not write this file — {advice}")
        if expect_version:
            check_version(file, "header format_version", header.get("format_version"),
                          as_text=True)
        return {k: f.get_tensor(k) for k in f.keys()}, header


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedSAE:
    """Load and validate a checkpoint directory; returns the SAE (eval mode) and its metadata.

    ``sae.safetensors`` must hold exactly the tensors ``config.json`` implies, float32 (the only
    dtype ``save_checkpoint`` writes; nothing is converted), finite, with unit-norm decoder
    directions; ``input_scale`` is 0 (never trained, threshold NaN) or finite and > 0; known
    ``stats.*`` tensors have one entry per latent. ``training_state.safetensors`` is not read.
    """
    path = Path(path)
    spec = read_spec(path)
    file = path / SAE_FILE
    tensors, _ = read_safetensors(
        file, kind=FORMAT, missing_hint=f"; a checkpoint directory holds {CONFIG_FILE} and "
        f"{SAE_FILE}", limit=spec.size_limit())
    layout = live_tensors(spec.layout)
    stats = {k: v for k, v in tensors.items() if k.startswith("stats.")}
    _drop_unused_bias(file, spec.layout, tensors)
    check_names(file, set(tensors) - set(stats), set(layout),
                 f"{path / CONFIG_FILE} describes; the two files are not from the same checkpoint")
    implied = f"{CONFIG_FILE} implies"
    for name, like in layout.items():
        check_tensor(file, name, tensors[name], tuple(like.shape), torch.float32, implied,
                      finite=name not in ("input_scale", "threshold"))
    check_scale_and_threshold(file, float(tensors["input_scale"]), float(tensors["threshold"]))
    for name, (dtype, low) in STATS.items():
        if name in stats:
            check_tensor(file, name, stats[name], (spec.cfg.n_latents,), dtype, implied, low=low)
    sae = LowRankSAE(spec.targets, spec.cfg, spec.sample_form)
    with torch.no_grad():
        for name, dst in live_tensors(sae).items():
            dst.copy_(tensors[name])
        check_unit_norm(file, sae.decoder_sq_norms())
    return LoadedSAE(sae.to(device).eval(), spec.config, stats, path)


def _drop_unused_bias(file: Path, layout: LowRankSAE, tensors: dict[str, torch.Tensor]) -> None:
    """Format version 1 kept an unused decoder bias as zeros (``b_dec.<target>``, per-event
    SAEs and ``sae.use_b_dec=false``): accept those zeros and drop them; a nonzero one is not
    something this SAE can hold."""
    if layout.uses_b_dec:
        return
    for t in layout.targets:
        name = f"b_dec.{t.name}"
        if name in tensors:
            check_tensor(file, name, tensors[name], tuple(t.shape), torch.float32,
                          f"{CONFIG_FILE} implies")
            if bool(tensors.pop(name).any()):
                raise CheckpointError(
                    f"{file}: {name} is nonzero, but {CONFIG_FILE} describes an SAE without a "
                    f"decoder bias (sample_form {layout.sample_form!r}, sae.use_b_dec "
                    f"{layout.cfg.use_b_dec!r}); the two files are not from the same checkpoint "
                    f"— {DAMAGED}")


def load_training_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The resume tensors of a checkpoint directory (error if it was saved without them).

    Checked against the SAE ``config.json`` describes: Adam moments (``adam.<i>.*``, ``i`` the
    index among the SAE's trainable parameters) complete, float32, finite and shaped like their
    parameter; the trainer's per-latent tensors and counters present and shaped. Other
    ``trainer.*`` entries are passed through unchecked.
    """
    path = Path(path)
    spec = read_spec(path)
    file = path / STATE_FILE
    tensors, _ = read_safetensors(file, kind=FORMAT, missing_hint=(
        "; this checkpoint was saved without training state (only a resume needs it, and a "
        "run keeps it at the steps it can resume from), or a copy of the run left it out: copy "
        "it again from the run"),
        limit=spec.size_limit())
    params = [p for p in spec.layout.parameters() if p.requires_grad]
    adam = {f"adam.{i}.{key}" for i in range(len(params)) for key in ADAM}
    required = {*STATE_REQUIRED, "trainer.counters"}
    optional = {k for k in tensors if k in adam or (k.startswith("trainer.") and k not in required)}
    check_names(file, set(tensors) - optional, required,
                 f"SAETrainer.state_tensors() writes for the SAE {path / CONFIG_FILE} describes")
    implied = f"{CONFIG_FILE} implies"
    for i, p in enumerate(params):
        names = [f"adam.{i}.{key}" for key in ADAM]
        if not any(n in tensors for n in names):
            continue  # the trainer never stepped
        absent = [n for n in names if n not in tensors]
        if absent:
            raise CheckpointError(f"{file}: the Adam state of trainable parameter {i} "
                                  f"(adam.{i}.*) is incomplete, missing {absent}; {DAMAGED}")
        exp_avg, exp_avg_sq, step = names
        check_tensor(file, exp_avg, tensors[exp_avg], tuple(p.shape), torch.float32, implied)
        check_tensor(file, exp_avg_sq, tensors[exp_avg_sq], tuple(p.shape), torch.float32,
                      implied, low=0)
        check_tensor(file, step, tensors[step], (), torch.float32, "expected", low=0)
    for name, (dtype, low) in {**STATE_REQUIRED, **STATE_OPTIONAL}.items():
        if name in tensors:
            check_tensor(file, name, tensors[name], (spec.cfg.n_latents,), dtype, implied,
                          low=low)
    check_tensor(file, "trainer.counters", tensors["trainer.counters"], (4,), torch.int64,
                  "expected", low=0)
    return tensors

