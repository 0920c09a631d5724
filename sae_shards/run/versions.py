"""Which software made a run, and on what: the versions of sae-shards, Python and the libraries
whose code moves an RL step or the SAE, the device (``cpu``, or the GPU's name) and the precision
of its fp32 matrix products (TF32 rounds each product's inputs to 10 mantissa bits), recorded
in the run's ``config.json`` (``versions``, as the run started) and compared on every resume
(``resumed_under``: what changed).

The same settings under another TRL or torch are another run: TRL's defaults and sampling,
torch's kernels and transformers' models change between releases. A resume under other versions
is allowed (an upgrade to fix a crash is a reason to resume), warned about and recorded, so that
whoever reads the run knows its later steps were not made by the code its first ones were.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `sae-shards --version` stays fast: torch is imported by the one use
    import torch

LIBRARIES = ("sae-shards", "torch", "transformers", "trl", "peft", "accelerate", "safetensors",
             "deepspeed", "wandb")
"""The distributions whose versions a run records (None for one not installed)."""


def library_versions() -> dict[str, str | None]:
    """``{"sae-shards": ..., "python": ..., library: version or None}`` for this process."""
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return {"sae-shards": found.pop("sae-shards"), "python": platform.python_version(), **found}


def device_name(device: torch.device) -> str:
    """What a run computes on: ``"cpu"``, or ``"cuda NVIDIA H200"`` (kernels, and so the last
    bits of every figure, differ between devices as between library versions)."""
    if device.type == "cuda":
        import torch

        return f"cuda {torch.cuda.get_device_name(device)}"
    return device.type


def fp32_matmul(device: torch.device) -> str:
    """How fp32 matrix products are computed on ``device``'s matmuls: ``"ieee"`` (full fp32),
    ``"tf32"`` (inputs rounded to 10 mantissa bits, as transformers' ``tf32=True`` sets on a GPU)
    or ``"bf16"``, read from torch's ``fp32_precision`` (``torch.backends.cuda.matmul``, or
    ``torch.backends.mkldnn.matmul`` on the CPU); under a torch without it (before 2.9), from
    ``allow_tf32`` on a GPU and ``float32_matmul_precision`` (highest, high, medium) on the CPU. The
    SAE's steps and a model's forward passes run at it; captured updates of dense weights do
    not (they are differences of weights), LoRA updates do (products of their factors).

    The new setting is read first: once a script sets it, reading the legacy ``allow_tf32`` or
    ``get_float32_matmul_precision()`` raises in torch 2.9 and later."""
    import torch

    backends = torch.backends
    matmul = getattr(backends.cuda if device.type == "cuda" else backends.mkldnn, "matmul", None)
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:  # "none": torch's generic setting; "none" there too: full fp32
        if precision == "none":
            precision = getattr(backends, "fp32_precision", "none")
        return "ieee" if precision == "none" else precision
    if device.type == "cuda":
        return "tf32" if backends.cuda.matmul.allow_tf32 else "ieee"
    legacy = torch.get_float32_matmul_precision()  # the words torch 2.9 maps to the new ones
    return {"highest": "ieee", "high": "tf32", "medium": "bf16"}.get(legacy, legacy)


def run_versions(device: torch.device) -> dict[str, str | None]:
    """What a run records as the software and device it ran under: :func:`library_versions`,
    ``device`` (:func:`device_name`) and ``fp32 matmul`` (:func:`fp32_matmul`)."""
    return {**library_versions(), "device": device_name(device),
            "fp32 matmul": fp32_matmul(device)}


def changed_versions(saved: Any, now: dict[str, str | None]) -> dict[str, list[str | None]]:
    """``{name: [version in saved, version now]}`` for each entry of ``now`` that ``saved`` (a
    run's recorded ``versions``) gives otherwise; ``{}`` when ``saved`` records none (a run
    of an earlier sae-shards)."""
    if not isinstance(saved, dict):
        return {}
    return {k: [saved.get(k), v] for k, v in now.items() if k in saved and saved[k] != v}


def describe(changed: dict[str, list[str | None]]) -> str:
    """``"trl 1.1.0 -> 1.2.0, peft none -> 0.17.0"``."""
    return ", ".join(f"{k} {a or 'none'} -> {b or 'none'}" for k, (a, b) in changed.items())


def version_line(versions: Any) -> str:
    """``"sae-shards 0.1.0, python 3.12.3, torch 2.13.0, ..."`` of the installed entries;
    ``"not recorded"`` for a run of an earlier sae-shards."""
    if not isinstance(versions, dict) or not versions:
        return "not recorded"
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)
