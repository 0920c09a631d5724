"""Validation of checkpoint files: the format's constants, ``CheckpointError``, and the checks
``core/checkpoint.py`` runs on every file it reads (see its docstring for what is checked).

Every check names the file and says what is wrong and how to fix it; library errors (safetensors,
json, the OS) are caught where a file is read and re-raised as ``CheckpointError``.
"""

from __future__ import annotations

import functools
import json
import math
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from types import UnionType
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

import torch
from safetensors import SafetensorError, safe_open

from sae_shards.core import json_read
from sae_shards.core.host_memory import memory_limit
from sae_shards.core.sae import SAMPLE_FORMS, LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import TargetSpec

FORMAT = "sae-shards"
FORMAT_VERSION = 2
"""The version written. 2: an SAE without a decoder bias stores none (1 stored zeros)."""
READ_VERSIONS = (1, 2)
"""The versions read (``FORMAT_VERSION`` and earlier)."""
SAE_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the fix."""


DAMAGED = ("read another of the run's checkpoints instead (`--checkpoint step_XXXXXX` for "
           "analyze / evaluate, `--checkpoint-a` / `--checkpoint-b` for compare, "
           "ShardSet.from_run(run_dir, \"step_XXXXXX\")), or restore the file from a copy")
# "sample_form" is optional: checkpoints written before per-event samples lack it ("dense").
_CONFIG_KEYS = frozenset({"format", "format_version", "sae", "targets", "meta", "sample_form"})
_META_COUNTS = ("rl_step", "sae_step", "sae_samples")
"""The counts ``meta`` records (``capture.resume.checkpoint_meta``), when present."""
_TARGET_KEYS = frozenset({"name", "shape", "rank"})
# More numbers than any SAE holds, and far below where torch's size arithmetic overflows.
_MAX_ELEMENTS = 1 << 48
# safetensors' own limit on a header's length; a longer one is left for safetensors to refuse.
_MAX_HEADER = 100_000_000
# Saved decoder directions have unit norm (the trainer renormalises after every step).
_UNIT_NORM_TOL = 1e-3
# Latent statistics save_checkpoint writes (LatentStats.as_tensors): dtype and smallest value.
STATS = {"stats.density": (torch.float32, 0), "stats.mean_abs_act": (torch.float32, 0),
          "stats.last_active_step": (torch.int64, -1), "stats.fire_count": (torch.int64, 0),
          "stats.samples_since_fired": (torch.int64, 0)}
# Training state (SAETrainer.state_tensors): per-latent tensors, then the Adam entries.
STATE_REQUIRED = {"trainer.stats.fire_count": (torch.int64, 0),
                   "trainer.stats.samples_since_fired": (torch.int64, 0),
                   "trainer.stats.last_active_step": (torch.int64, -1),
                   "trainer.abs_act_sum": (torch.float64, 0)}
STATE_OPTIONAL = {"trainer.stats.density": (torch.float32, 0),
                   "trainer.stats.mean_abs_act": (torch.float32, 0)}
ADAM = ("exp_avg", "exp_avg_sq", "step")


class SizeLimit(NamedTuple):
    """The most numbers one tensor of a file may hold, and what sets that bound (for the
    error message)."""

    numel: int
    why: str


class _Spec(NamedTuple):
    """A validated config.json: the SAE it describes, and that SAE's layout on the meta device
    (tensor names and shapes, nothing allocated)."""

    config: dict[str, Any]
    cfg: SAEConfig
    targets: list[TargetSpec]
    sample_form: str  # "dense" or "factored"
    layout: LowRankSAE

    def size_limit(self) -> SizeLimit:
        """The largest tensor a file of this checkpoint holds: a parameter or buffer of the
        layout (its Adam moments are the same size), a per-latent statistic, or the trainer's
        four counters."""
        largest = max([p.numel() for p in self.layout.state_dict().values()]
                      + [self.cfg.n_latents, 4])
        return SizeLimit(largest, f"the largest tensor {CONFIG_FILE} implies")


# ---------------------------------------------------------------------------- checks


def _check_dir(path: Path) -> None:
    where = f"a checkpoint is a directory holding {CONFIG_FILE} and {SAE_FILE}"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as e:
        siblings = (sorted(p.name for p in path.parent.iterdir() if p.is_dir())
                    if path.parent.is_dir() else [])
        raise CheckpointError(f"{path}: no such checkpoint directory"
                              + (f"; {path.parent} holds {', '.join(siblings)}" if siblings
                                 else "")) from e
    except OSError as e:  # a symlink loop, no permission
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror}); {where}") from e
    if not stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: not a directory; {where} (e.g. run_dir/checkpoints/final)")


def check_file(file: str | Path, missing_hint: str = "") -> None:
    try:
        mode = Path(file).stat().st_mode
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: missing{missing_hint}") from e
    except OSError as e:  # a symlink loop, no permission
        raise CheckpointError(f"{file}: cannot be opened ({e.strerror}); {DAMAGED}") from e
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{file}: is a directory, expected a file; {DAMAGED}")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{file}: not a regular file; {DAMAGED}")


def check_declared_sizes(file: Path, limit: SizeLimit | None = None,
                         advice: str = DAMAGED) -> None:
    """Refuse, from the safetensors header alone, a tensor of ``file`` declared with more
    numbers than ``limit`` allows or more bytes than this process's memory may hold (the
    machine's, or its cgroup's limit when smaller: ``host_memory.memory_limit``). safetensors
    checks a header against the file's length only, so a sparse file (or a header edited to
    match its length) declaring a huge tensor would pass it and be mapped, then allocated whole
    by the first check that reads it."""
    memory = memory_limit()
    for name, (shape, nbytes) in declared_tensors(file).items():
        numel = math.prod(shape)
        # (the bytes its data offsets span beside it only where memory is the question: an
        # edited header's shape and offsets need not agree, "0.0 GiB" beside 64M numbers)
        what = f"{file}: tensor {name!r} is declared with shape {shape} ({numel:,} numbers"
        if limit is not None and numel > limit.numel:
            raise CheckpointError(
                f"{what}), more than {limit.why} ({limit.numel:,} numbers); sae-shards never "
                "writes such a tensor there, so the header is damaged or edited (a sparse file "
                f"passes safetensors' size check) — {advice}")
        if memory is not None and nbytes > memory.bytes:
            whose = (f"this process may hold ({_gib(memory.bytes)}: {memory.note()})"
                     if memory.limited else f"this machine's memory ({_gib(memory.bytes)})")
            raise CheckpointError(
                f"{what}, {_gib(nbytes)}), more than {whose}: it cannot be read here. A real "
                "file this large is read on a machine (or under a limit) with more memory; "
                "otherwise the header is damaged or edited (a sparse file passes safetensors' "
                f"size check) — {advice}")


def unmappable(file: Path, error: Exception, advice: str = DAMAGED) -> CheckpointError:
    """The error for a safetensors file that safetensors failed to map into memory (its
    ``RuntimeError``, or ``MemoryError`` under an address-space limit): a header declaring more
    than it holds, or more than the process may map. ``advice``: what to do when the header is
    damaged."""
    return CheckpointError(
        f"{file}: cannot be mapped into memory ({error}): its header declares more than this "
        "process may map. A damaged or edited header does (a sparse file passes safetensors' "
        f"size check): {advice}; a real file this large needs a machine or a limit (ulimit -v) "
        "that allows it")


@contextmanager
def opened_safetensors(file: str | Path, advice: str = DAMAGED) -> Iterator[Any]:
    """``safe_open`` of ``file`` on the CPU, as a context, whose failures name the file: one
    that is truncated or damaged (safetensors' ``SafetensorError``, or an ``OSError``, while
    opening or reading it) and one safetensors fails to map (``unmappable``) raise
    ``CheckpointError`` with ``advice``, what to do about it, rather than safetensors' bare
    error."""
    try:
        f = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise damaged(Path(file), e, advice) from None
    except (RuntimeError, MemoryError) as e:  # safetensors' failed mmap (a ValueError is not)
        raise unmappable(Path(file), e, advice) from None
    with f:
        try:
            yield f
        except (SafetensorError, OSError) as e:
            raise damaged(Path(file), e, advice) from None


def damaged(file: Path, error: Exception, advice: str = DAMAGED) -> CheckpointError:
    """The error for a file that cannot be read as what its suffix says (``error``: the
    reader's), with ``advice``: what to do about it."""
    return CheckpointError(f"{file}: cannot be read as {file.suffix[1:]} ({error}); the file is "
                           f"truncated or damaged — {advice}")


def declared_tensors(file: Path) -> dict[str, tuple[list[int], int]]:
    """``{name: (shape, bytes)}`` as ``file``'s safetensors header declares them (its first 8
    bytes: the header's length, little-endian; then the header, JSON), read without the data.
    Entries that are not a tensor's, or a header that is not readable so, are left out: opening
    the file with safetensors then says what is wrong."""
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or length > _MAX_HEADER:
            return {}
        raw = f.read(length)
    try:
        header = json_read.loads(raw)
    except ValueError:  # also bytes that are not UTF-8
        return {}
    out: dict[str, tuple[list[int], int]] = {}
    for name, entry in (header.items() if isinstance(header, dict) else ()):
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if _counts(shape) and _counts(offsets) and len(offsets) == 2:
            out[name] = (shape, offsets[1] - offsets[0])
    return out


def _counts(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


def _version_number(value: Any) -> int | None:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_version(file: Path, what: str, found: Any, as_text: bool) -> None:
    """``found`` is a version this reads (``READ_VERSIONS``), as text (safetensors headers) or
    as a JSON integer (``config.json``); a higher one was written by a newer sae-shards."""
    readable = {str(v) if as_text else v for v in READ_VERSIONS}
    if type(found) is (str if as_text else int) and found in readable:
        return
    number = _version_number(found)
    if number is not None and number > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format version {number} is not supported by this sae-shards, which reads "
            f"versions up to {FORMAT_VERSION}; it was written by a newer sae-shards — upgrade "
            "sae-shards to load it")
    expected = "a version " + ", ".join(map(repr, sorted(readable)))
    raise CheckpointError(f"{file}: {what} {found!r}, expected {expected}; the file is damaged "
                          f"or not a sae-shards checkpoint — {DAMAGED}")


def read_spec(path: Path) -> _Spec:
    """Read and validate ``config.json`` of the checkpoint directory ``path``."""
    _check_dir(path)
    file = path / CONFIG_FILE
    check_file(file, f"; a checkpoint directory holds {CONFIG_FILE} and {SAE_FILE}")
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror})") from e
    try:
        config = json_read.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys(file))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not UTF-8 text ({e}); the file is damaged — "
                              f"{DAMAGED}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); the file is damaged — "
                              f"{DAMAGED}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {_json_kind(config)}; the "
                              f"file is damaged — {DAMAGED}")
    if config.get("format") != FORMAT:
        run_dir = (path / "checkpoints").is_dir()  # a run directory's config.json is the job's
        raise CheckpointError(
            f"{file}: format {config.get('format')!r}, expected {FORMAT!r}: not a sae-shards "
            "checkpoint config" + (f"; {path} is a run directory: load its shards with "
                                   f"ShardSet.from_run({str(path)!r}){_held(path / 'checkpoints')}"
                                   if run_dir else ""))
    if "format_version" not in config:
        raise CheckpointError(f"{file}: missing key 'format_version'; {DAMAGED}")
    check_version(file, "format_version", config["format_version"], as_text=False)
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise CheckpointError(
            f"{file}: unknown keys {unknown}; a format version {FORMAT_VERSION} config holds "
            f"{sorted(_CONFIG_KEYS)} — the file was edited, or written by a newer sae-shards")
    for key in ("sae", "targets"):
        if key not in config:
            raise CheckpointError(f"{file}: missing key {key!r}; {DAMAGED}")
    for key, what in (("sae", "the SAE's settings"), ("meta", "run metadata")):
        if key in config and not isinstance(config[key], dict):
            raise CheckpointError(f"{file}: {key!r} must be a JSON object ({what}), got "
                                  f"{_json_kind(config[key])}; {DAMAGED}")
    for key in _META_COUNTS:  # RL and SAE steps a reader compares and counts with
        value = config.get("meta", {}).get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and 0 <= value < 2**63):
            raise CheckpointError(f"{file}: meta.{key} = {_short(value)} must be a count (an "
                                  f"integer >= 0, below 2**63); {DAMAGED}")
    cfg = _sae_config(file, config["sae"])
    targets = _targets(file, config["targets"])
    sample_form = config.get("sample_form", "dense")
    if sample_form not in SAMPLE_FORMS:
        raise CheckpointError(f"{file}: sample_form = {_short(sample_form)} must be one of "
                              f"{', '.join(repr(f) for f in SAMPLE_FORMS)}; {DAMAGED}")
    elements = (cfg.n_latents * (1 + sum(2 * t.factored_numel for t in targets))
                + sum(t.numel for t in targets))
    if elements > _MAX_ELEMENTS:
        raise CheckpointError(
            f"{file}: the SAE it describes is too large (n_latents={cfg.n_latents}, target shapes "
            f"{[t.shape for t in targets]}: over {_MAX_ELEMENTS:,} numbers); the file is damaged "
            f"— {DAMAGED}")
    try:
        with torch.device("meta"):  # names and shapes only; nothing is allocated
            layout = LowRankSAE(targets, cfg, sample_form)
    except ValueError as e:  # values torch refuses, e.g. a seed beyond 64 bits
        raise CheckpointError(f"{file}: the SAE it describes cannot be built ({e}); the file is "
                              f"damaged — {DAMAGED}") from e
    return _Spec(config, cfg, targets, sample_form, layout)


def _unique_keys(file: Path):
    """``json`` object hook: a key given twice is an error (json would keep the last silently)."""
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{file}: key {key!r} appears twice in one JSON object; "
                                      f"the file was edited or damaged — {DAMAGED}")
            out[key] = value
        return out
    return build


def _sae_config(file: Path, raw: dict[str, Any]) -> SAEConfig:
    types = _sae_config_types()
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise CheckpointError(
            f"{file}: unknown sae config keys {unknown}; this sae-shards knows {sorted(types)} — "
            "the checkpoint was edited, or written by a newer sae-shards")
    for key, value in raw.items():
        if not _json_matches(types[key], value):
            raise CheckpointError(f"{file}: sae.{key} = {_short(value)} must be "
                                  f"{_describe(types[key])}; {DAMAGED}")
    try:
        return SAEConfig.from_dict(raw)
    except ValueError as e:
        raise CheckpointError(f"{file}: invalid sae config: {e}; {DAMAGED}") from e


@functools.cache
def _sae_config_types() -> dict[str, Any]:
    hints = get_type_hints(SAEConfig)
    return {f.name: hints[f.name] for f in fields(SAEConfig)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_matches(hint: Any, value: Any) -> bool:
    """Whether a JSON value has the Python type of an ``SAEConfig`` field (bools are not ints)."""
    origin = get_origin(hint)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in get_args(hint))
    if origin in (Union, UnionType):
        return any(_json_matches(a, value) for a in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_int(value) or isinstance(value, float) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    raise TypeError(f"SAEConfig field type {hint!r} has no JSON check in {__name__}; add one")


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (Union, UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    return {type(None): "null", bool: "true or false", int: "an integer",
            float: "a finite number", str: "a string"}[hint]


def _targets(file: Path, raw: Any) -> list[TargetSpec]:
    if not isinstance(raw, list) or not raw:
        raise CheckpointError(f"{file}: 'targets' must be a non-empty list of {{name, shape, "
                              f"rank}} objects, got {_short(raw)}; {DAMAGED}")
    specs = []
    for i, t in enumerate(raw):
        where = f"{file}: targets[{i}]"
        if not isinstance(t, dict) or set(t) != _TARGET_KEYS:
            got = f"keys {sorted(t)}" if isinstance(t, dict) else _short(t)
            raise CheckpointError(f"{where} must be an object with keys name, rank, shape; got "
                                  f"{got}; {DAMAGED}")
        name, shape, rank = t["name"], t["shape"], t["rank"]
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{where}.name = {_short(name)} must be a parameter name; "
                                  f"{DAMAGED}")
        if not isinstance(shape, list) or not all(_is_int(s) for s in shape):
            raise CheckpointError(f"{where}.shape = {_short(shape)} must be a list of integers "
                                  f"([m, n] or [m]); {DAMAGED}")
        if not _is_int(rank) or rank < 1:
            raise CheckpointError(f"{where}.rank = {_short(rank)} must be a positive integer; "
                                  f"{DAMAGED}")
        if len(shape) not in (1, 2):
            raise CheckpointError(f"{where}.shape = {_short(shape)} is not supported: an SAE's "
                                  "targets are [m, n] or [m] (a stacked expert tensor is saved "
                                  f"one matrix per expert); {DAMAGED}")
        try:
            specs.append(TargetSpec(name, tuple(shape), rank))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e} ({DAMAGED})") from e
    names = [t.name for t in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CheckpointError(f"{file}: duplicate target name(s) {duplicates}; each target is "
                              f"one parameter tensor — {DAMAGED}")
    return specs


def check_names(file: Path, present: set[str], expected: set[str], against: str) -> None:
    missing, unknown = sorted(expected - present), sorted(present - expected)
    if not missing and not unknown:
        return
    parts = [f"{what} tensors {names[:5]}" + (f" (and {len(names) - 5} more)" if len(names) > 5
                                              else "")
             for what, names in (("missing", missing), ("unexpected", unknown)) if names]
    raise CheckpointError(f"{file}: {', '.join(parts)}, compared with what {against} — "
                          f"{DAMAGED}")


def check_tensor(file: Path, name: str, t: torch.Tensor, shape: tuple[int, ...],
                  dtype: torch.dtype, source: str, finite: bool = True,
                  low: int | None = None) -> None:
    """Shape, then dtype (no conversion), then non-finite values and values below ``low``."""
    if tuple(t.shape) != shape:
        why = (f"{file.name} and {file.parent / CONFIG_FILE} disagree: one of the two was edited "
               "or damaged, or they come from different checkpoints" if CONFIG_FILE in source
               else "the file is damaged or not from this checkpoint")
        raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, {source} "
                              f"{shape}; {why} — {DAMAGED}")
    if t.dtype != dtype:
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {t.dtype}, expected {dtype}; "
                              f"sae-shards writes it as {dtype} and converts nothing on load — "
                              f"{DAMAGED}")
    if finite and t.is_floating_point():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise CheckpointError(f"{file}: tensor {name!r} has {bad} non-finite value(s) (NaN "
                                  "or Inf); the SAE diverged before this save, or the file is "
                                  "damaged — use an earlier checkpoint of the run")
    if low is not None and t.numel() and bool((t < low).any()):
        raise CheckpointError(f"{file}: tensor {name!r} has values below {low} (smallest "
                              f"{t.min().item()}), which it cannot hold; the file is damaged — "
                              f"{DAMAGED}")


def check_scale_and_threshold(file: Path, scale: float, threshold: float) -> None:
    """``input_scale``: 0 until the trainer saw data (``LowRankSAE.__init__``), then the running
    RMS of sample norms, finite and > 0. ``threshold``: NaN until batch_topk trained, then an
    EMA of kept ReLU activations, finite and >= 0."""
    if not (math.isfinite(scale) and scale >= 0):
        raise CheckpointError(
            f"{file}: input_scale is {scale}; it must be finite and > 0 for an SAE that trained "
            "(or 0 for one that never did) — the SAE diverged or the file is damaged; use an "
            "earlier checkpoint of the run")
    if not (math.isnan(threshold) or (math.isfinite(threshold) and threshold >= 0)):
        raise CheckpointError(
            f"{file}: threshold is {threshold}; the batch_topk inference threshold is NaN until "
            f"the SAE trains, then finite and >= 0 — {DAMAGED}")
    if scale == 0 and not math.isnan(threshold):
        raise CheckpointError(
            f"{file}: input_scale is 0 (the SAE never trained) but threshold is {threshold}, "
            f"which only training sets; the file is damaged — {DAMAGED}")


def check_unit_norm(file: Path, sq_norms: torch.Tensor) -> None:
    bad = ((sq_norms - 1).abs() > _UNIT_NORM_TOL).nonzero().flatten().tolist()
    if bad:
        found = [round(float(sq_norms[i]), 4) for i in bad[:5]]
        raise CheckpointError(
            f"{file}: the decoder directions of latents {bad[:5]} have squared norms {found}, "
            "not 1; every saved decoder direction has unit norm (the trainer renormalises after "
            f"each step), so the decoder tensors were altered or damaged — {DAMAGED}")


def _held(checkpoints: Path) -> str:
    """The checkpoint of a run's ``checkpoints`` folder to name beside ``from_run``: ``final``
    when the run wrote it, else its newest (a run still training), else that it has none."""
    names = sorted(p.name for p in checkpoints.iterdir()
                   if p.is_dir() and not p.name.startswith("."))
    if not names:
        return " (it has no checkpoint yet)"
    return f" or a checkpoint such as {checkpoints / ('final' if 'final' in names else names[-1])}"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    for types, word in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"),
                        (list, "a list"), (dict, "an object")):
        if isinstance(value, types):
            return word
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
