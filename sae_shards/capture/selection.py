"""Target selection: glob patterns over parameter names -> the tensors whose updates are captured.

Dense models: every trainable parameter whose name matches. With a peft LoRA model the patterns
name the *base* weights (``*layers.*.self_attn.q_proj.weight``) and map to the adapter factors of
that layer (``LoraTarget``), whose effective dense delta the capture computes. Sharded parameters
(ZeRO-3, FSDP) are rejected with a clear error.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from dataclasses import dataclass
from typing import Mapping

import torch

@dataclass(frozen=True)
class LoraTarget:
    """A LoRA-adapted base weight ``(out, in)``, captured through its adapter factors.

    Its delta is the change of the effective weight, ``s * (B1 @ A1 - B0 @ A0)`` with
    ``s = layer.scaling[adapter]`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
    """

    layer: torch.nn.Module
    """The ``peft.tuners.lora.Linear`` wrapping the base layer."""
    adapter: str
    """The adapter being trained (the layer's only active adapter)."""

    @property
    def A(self) -> torch.nn.Parameter:  # [r, in]
        return self.layer.lora_A[self.adapter].weight

    @property
    def B(self) -> torch.nn.Parameter:  # [out, r]
        return self.layer.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.layer.get_base_layer().weight.shape)


Target = torch.nn.Parameter | LoraTarget


# ---- selecting targets ------------------------------------------------------------------------


def select_targets(model: torch.nn.Module, patterns: list[str]) -> dict[str, Target]:
    """``{name: target}`` for every parameter whose name matches a glob in ``patterns``.

    Names are those of ``model.named_parameters()``; for a peft LoRA model they are the *base*
    model's names (``model.layers.0.self_attn.q_proj.weight``, without ``base_model.model.`` or
    ``.base_layer.``), and an adapted weight becomes a ``LoraTarget``. Every match must be
    capturable (a trainable parameter or a LoRA-adapted weight) and every pattern must match;
    otherwise ``ValueError`` names the pattern and what is available.
    """
    if not patterns:
        raise ValueError(
            "capture.targets is empty; give at least one glob, e.g. '*mlp.down_proj.weight'"
        )
    capturable, frozen = _candidates(model)
    selected: dict[str, Target] = {}
    for pattern in patterns:
        hits = [n for n in capturable if fnmatch.fnmatchcase(n, pattern)]
        stuck = [n for n in frozen if fnmatch.fnmatchcase(n, pattern)]
        if stuck:
            raise ValueError(_frozen_error(pattern, stuck, capturable))
        if not hits:
            raise ValueError(
                f"capture.targets pattern {pattern!r} matches no parameter of "
                f"{type(model).__name__}; capturable names include {few_names(capturable)}"
            )
        selected.update((n, capturable[n]) for n in hits)
    return selected


def target_shapes(targets: Mapping[str, Target]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of selected targets, for ``targets.make_targets``."""
    return {name: tuple(t.shape) for name, t in targets.items()}


def _candidates(model: torch.nn.Module) -> tuple[dict[str, Target], list[str]]:
    """(capturable ``{name: target}``, names of frozen parameters without a LoRA adapter)."""
    base, lora = _lora_targets(model)
    factor_ids = {id(p) for t in lora.values() for p in (t.A, t.B)}
    capturable: dict[str, Target] = dict(lora)
    frozen = []
    for name, p in base.named_parameters():
        name = name.replace(".base_layer.", ".")
        if id(p) in factor_ids or name in lora:
            continue
        if p.requires_grad:
            capturable[name] = p
        else:
            frozen.append(name)
    return capturable, frozen


def _lora_targets(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, LoraTarget]]:
    """The model under any peft wrapper, and its LoRA-adapted weights by base weight name."""
    if importlib.util.find_spec("peft") is None:  # without peft there are no LoRA layers
        return model, {}
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    targets = {}
    for module_name, layer in base.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        name = f"{module_name}.weight"
        if type(layer) is not LoraLinear:
            raise NotImplementedError(
                f"{name}: LoRA layer type {type(layer).__name__} is not supported for capture; "
                "only peft's lora.Linear on nn.Linear (drop it from the LoRA target_modules)"
            )
        adapters = layer.active_adapters
        if len(adapters) != 1:
            raise ValueError(f"{name}: capture needs one active LoRA adapter, got {adapters}")
        adapter = adapters[0]
        unsupported = {
            "DoRA / LoRA variants": adapter in layer.lora_variant,
            "lora_bias": layer.lora_bias.get(adapter, False),
            "fan_in_fan_out": layer.fan_in_fan_out,
        }
        for what, on in unsupported.items():
            if on:
                raise NotImplementedError(f"{name}: capture does not support {what} yet")
        targets[name] = LoraTarget(layer, adapter)
    return base, targets


def _frozen_error(pattern: str, stuck: list[str], capturable: Mapping[str, Target]) -> str:
    adapted = [n for n, t in capturable.items() if isinstance(t, LoraTarget)]
    fix = (
        f"add their modules to the LoRA target_modules (adapted now: {few_names(adapted)})"
        if adapted
        else "unfreeze them (requires_grad) or narrow the pattern"
    )
    return (
        f"capture.targets pattern {pattern!r} matches parameters that never change: "
        f"{few_names(stuck)} are frozen and have no LoRA adapter; narrow the pattern or {fix}"
    )


def few_names(names, k: int = 8) -> str:
    names = list(names)
    more = f" ... (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more if names else "(none)"


def check_not_sharded(named_params) -> None:
    """Raise ``ValueError`` if a parameter looks sharded (ZeRO-3, FSDP); capture needs full ones."""
    for name, p in named_params:
        if (
            hasattr(p, "ds_id")  # DeepSpeed ZeRO-3 partitioned parameter
            or getattr(p, "_is_flat_param", False)  # FSDP1 FlatParameter
            or type(p.data).__name__ == "DTensor"  # FSDP2 / tensor parallel
            or p.numel() == 0
        ):
            raise ValueError(
                f"parameter {name!r} looks sharded (DeepSpeed ZeRO-3 or FSDP); delta capture "
                "supports only full, replicated parameters (single process, DDP, ZeRO-1/2)"
            )
