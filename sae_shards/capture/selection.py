"""Target selection: glob patterns over parameter names -> the tensors whose updates are captured.

Dense models: every trainable parameter whose name matches. With a peft LoRA model the patterns
name the *base* weights (``*layers.*.self_attn.q_proj.weight``) and map to the adapter factors of
that layer (``LoraTarget``), whose effective dense delta the capture computes. Sharded parameters
(ZeRO-3, FSDP) are rejected with a clear error.

``default_targets`` picks every matrix of every transformer block by module type (``nn.Linear``
and transformers' ``Conv1D``), for any family. The layout of a matrix layer's weight, and so which
side of it writes to the layer's output, is known in one place only: ``weight_layout``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import math
import re
import weakref
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)
_WARNED_LEFT_OUT: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


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
        """The base weight's shape (under ZeRO-3 its whole one, ``ds_shape``)."""
        return full_shape(self.layer.get_base_layer().weight)


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
            raise ValueError(_frozen_error(pattern, stuck, capturable, frozen))
        if not hits:
            tied = {a: n for a, n in _aliases(model).items() if fnmatch.fnmatchcase(a, pattern)}
            partial = "" if any(c in pattern for c in "*?[") else (
                f" (patterns match whole parameter names: '*{pattern}*' matches names that "
                f"contain it)")
            base = re.fullmatch(r"(.+)\[\d+\]", pattern)
            if base and base[1] in capturable:
                partial = (f": {base[1]} is a stacked expert tensor, captured whole (the SAE "
                           f"factors each of its experts); name the parameter itself")
            if tied:
                alias, name = next(iter(tied.items()))
                partial = (f" under that name: {alias} is tied to {name} (the same tensor, "
                           f"named once); name {name}")
            raise ValueError(
                f"capture.targets pattern {pattern!r} matches no parameter of "
                f"{type(model).__name__}{partial}; its capturable names, each layer's as "
                f"layers.*, are {few_names(name_patterns(capturable), 40)}"
            )
        selected.update((n, capturable[n]) for n in hits)
    return selected


def full_shape(target: Target) -> tuple[int, ...]:
    """A target's whole shape, also under DeepSpeed ZeRO-3 (whose partitioned parameters have
    shape ``(0,)`` and the real one in ``ds_shape``)."""
    return tuple(getattr(target, "ds_shape", None) or target.shape)


def target_shapes(targets: Mapping[str, Target]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of selected targets, for ``targets.make_targets``."""
    return {name: full_shape(t) for name, t in targets.items()}


# ---- matrix layers by module type -------------------------------------------------------------


def weight_layout(module: nn.Module) -> str | None:
    """``"out_in"`` for ``nn.Linear`` (weight ``[out, in]``, ``y = x W^T + b``), ``"in_out"`` for
    transformers' ``Conv1D`` (GPT-2; weight ``[in, out]``, ``y = x W + b``), ``None`` for anything
    else. The only place that knows matrix layer types; a peft LoRA layer is neither (ask its
    ``get_base_layer()``)."""
    if isinstance(module, nn.Linear):
        return "out_in"
    if isinstance(module, Conv1D):
        return "in_out"
    return None


def layer_output_axis(layer: nn.Module) -> int:
    """The axis of ``layer.weight`` that indexes the layer's outputs: 0 for Linear, 1 for Conv1D."""
    layout = weight_layout(layer)
    if layout is None:
        raise ValueError(
            f"{type(layer).__name__} is not an nn.Linear or transformers Conv1D, so the output "
            "side of its weight is unknown"
        )
    return 0 if layout == "out_in" else 1


def matrix_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{weight name: layer}`` for every ``nn.Linear`` and ``Conv1D`` of a model, in module order.

    Names are ``select_targets``' names (a peft model's base names, ``peft_name``); a LoRA-adapted
    layer appears once, under its base weight's name, as its base layer (the adapter factors are
    not listed), and a ``modules_to_save`` layer as its trained copy.
    """
    base, lora = _lora_targets(model)
    adapted = {name.removesuffix(".weight"): t.layer for name, t in lora.items()}
    layers = {}
    for name, module in base.named_modules():
        if inside_any(name, adapted):
            continue  # base_layer, lora_A, lora_B, ... of an adapted layer
        if name in adapted:
            module = adapted[name].get_base_layer()
        if weight_layout(module) is not None:
            weight = peft_name(f"{name}.weight", module.weight.requires_grad)
            if weight is not None:
                layers[weight] = module
    return layers


def block_lists(model: nn.Module) -> list[str]:
    """Module names of the model's block lists, relative to the model under any peft wrapper.

    A block list is an ``nn.ModuleList`` of blocks of one class holding matrix layers
    (``model.layers`` in Llama/Qwen2/Mistral, ``transformer.h`` in GPT-2, ``gpt_neox.layers``),
    not nested inside another block list (so a block's list of MoE experts is not one).
    """
    found: list[str] = []
    for name, module in unwrap_peft(model).named_modules():
        if inside_any(name, found) or not isinstance(module, nn.ModuleList) or not len(module):
            continue
        first = module[0]
        if (
            len({type(block) for block in module}) == 1
            and weight_layout(first) is None
            and any(weight_layout(m) is not None for m in first.modules())
        ):
            found.append(name)
    return found


def block_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``matrix_layers`` inside the model's blocks (no embeddings, no lm_head), in module order."""
    blocks = block_lists(model)
    if not blocks:
        raise ValueError(
            f"found no transformer block list in {type(model).__name__} (an nn.ModuleList of "
            "same-class blocks holding nn.Linear or Conv1D layers); set capture.targets to "
            "explicit globs, e.g. '*mlp.down_proj.weight'"
        )
    return {n: m for n, m in matrix_layers(model).items() if inside_any(n, blocks)}


def default_targets(model: nn.Module, stacked: bool = False, warn: bool = True) -> list[str]:
    """Every capturable attention and MLP matrix of every block, as ``select_targets`` patterns.

    Chosen by module type: the weight of each ``nn.Linear`` and ``Conv1D`` inside the blocks
    (``block_lists``) that is trainable or LoRA-adapted (under its base weight's name). With
    ``stacked`` (per-step capture), also every trainable 3-D parameter inside the blocks: a
    mixture of experts' stacked expert tensors ``[experts, m, n]`` (not a conv kernel), in
    parameter order. Never
    embeddings, lm_head, norms or biases. The names are exact, glob-escaped (``glob_escape``).
    Raises ``ValueError`` if nothing qualifies. Trainable block parameters of two or more
    dimensions left out (a mixture of experts' router; its stacked expert tensors without
    ``stacked``) are named in a warning (unless ``warn`` is false).
    """
    capturable, _ = _candidates(model)
    blocks = block_lists(model)
    layers = block_layers(model)
    names = [n for n in layers if n in capturable]
    base = unwrap_peft(model)
    stacks = [n for n, t in capturable.items()
              if is_expert_stack(base, n, t) and inside_any(n, blocks)]
    experts = stacks if stacked else []
    if experts:  # in parameter order, among the layers' weights
        order = {n: i for i, n in enumerate(capturable)}
        names = sorted(names + experts, key=order.__getitem__)
    left_out = {n: tuple(t.shape) for n, t in capturable.items()
                if n not in names and isinstance(t, nn.Parameter) and t.ndim >= 2
                and inside_any(n, blocks)}
    if left_out and warn and model not in _WARNED_LEFT_OUT:  # once per model (targets resolve twice)
        _WARNED_LEFT_OUT.add(model)
        sizes = {n: math.prod(full_shape(t)) for n, t in capturable.items()
                 if inside_any(n, blocks)}
        share = sum(sizes[n] for n in left_out) / max(sum(sizes.values()), 1)
        experts_out = any(n in left_out for n in stacks)
        log.warning(
            "the default capture targets leave out %d trainable block parameters that are not "
            "nn.Linear / Conv1D weights (%.0f%% of the blocks' trainable entries), so what RL "
            "changes there is not captured: %s. %s",
            len(left_out), 100 * share,
            few_names([f"{n} {list(s)}" for n, s in left_out.items()]),
            "Stacked expert tensors [experts, m, n] cannot be captured per event: capture "
            "per step (capture.granularity=step) to include them." if experts_out else
            "A 2-D one (e.g. a mixture of experts' router) can be named in capture.targets "
            "(per step).")
    if not names:
        # the example is a matrix that trains (one of a block's would be refused as frozen)
        trained = [n for n, t in capturable.items() if len(full_shape(t)) >= 2]
        example = (f"[{', '.join(repr(glob_escape(n)) for n in trained[:2])}], which train"
                   if trained else "'*mlp.down_proj.weight' once they train")
        raise ValueError(
            f"no block matrix of {type(model).__name__} is trainable or LoRA-adapted, so there "
            f"are no default targets; set capture.targets to explicit globs, e.g. {example}, "
            "or unfreeze / adapt the block layers"
        )
    return [glob_escape(n) for n in names]


def _is_stacked(target: Target) -> bool:
    return isinstance(target, nn.Parameter) and len(full_shape(target)) == 3


def is_expert_stack(model: nn.Module, name: str, target: Target) -> bool:
    """Whether parameter ``name`` of ``model`` is a mixture of experts' stacked tensor
    ``[experts, m, n]``: 3-D, and not a conv layer's kernel."""
    return _is_stacked(target) and not isinstance(model.get_submodule(name.rpartition(".")[0]),
                                                  nn.modules.conv._ConvNd)


def check_stacked(targets: Mapping[str, Target], granularity: str) -> None:
    """Raise ``ValueError`` for stacked expert tensors ``[experts, m, n]`` among per-event
    targets: an event's gradient is recorded from each matrix layer's inputs and output
    gradients, and experts are not layers of their own."""
    stacked = [n for n, t in targets.items() if _is_stacked(t)]
    if stacked:
        raise ValueError(
            f"capture.targets selects stacked expert tensors [experts, m, n] "
            f"({few_names(stacked, 3)}), which capture.granularity={granularity} cannot record "
            "per event (their gradients do not pass through nn.Linear layers); capture them per "
            "step (capture.granularity=step), or leave them out of capture.targets"
        )


def output_axis(model: nn.Module, name: str) -> int:
    """The axis of target ``name``'s weight that writes to its layer's output.

    0 for an ``nn.Linear`` (weight ``[out, in]``: rows, the left factor of ``U V^T``); 1 for a
    ``Conv1D`` (weight ``[in, out]``: columns, the right factor). A LoRA target has its base
    layer's layout.
    """
    layers = matrix_layers(model)
    if name not in layers:
        raise ValueError(
            f"{name!r} is not the weight of an nn.Linear or Conv1D layer of "
            f"{type(model).__name__}; matrix weights include {few_names(layers)}"
        )
    return layer_output_axis(layers[name])


def glob_escape(name: str) -> str:
    """``name`` as an ``fnmatch`` pattern that matches exactly it (``[``, ``]``, ``*``, ``?``)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model under a ``peft.PeftModel`` wrapper (the model itself otherwise)."""
    if importlib.util.find_spec("peft") is None:
        return model
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def inside_any(name: str, prefixes) -> bool:
    """Whether module ``name`` lies strictly inside one of the modules named in ``prefixes``."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def _candidates(model: torch.nn.Module) -> tuple[dict[str, Target], dict[str, int]]:
    """(capturable ``{name: target}``, ``{name: ndim}`` of the frozen parameters without a
    LoRA adapter)."""
    base, lora = _lora_targets(model)
    factor_ids = {id(p) for t in lora.values() for p in (t.A, t.B)}
    capturable: dict[str, Target] = dict(lora)
    frozen: dict[str, int] = {}
    for name, p in base.named_parameters():
        name = peft_name(name, p.requires_grad)
        if name is None or id(p) in factor_ids or name in lora:
            continue
        if p.requires_grad:
            capturable[name] = p
        else:
            frozen[name] = p.ndim
    return capturable, frozen


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """``{second name: the name it is listed under}`` of tied parameters (a tied ``lm_head``'s
    weight is the input embedding's, and ``named_parameters`` lists it once)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def peft_name(name: str, trained: bool = True) -> str | None:
    """A parameter name under a peft model (below ``base_model.model``) as the merged model
    names it (``merge_and_unload``, which analysis loads): a LoRA layer's ``base_layer``
    unwrapped, and a ``modules_to_save`` module (``lm_head`` trained beside the adapter) named
    by its trained copy. None for a parameter the merged model does not have under its own
    name: that module's frozen ``original_module``, and copies kept for inactive adapters
    (``trained`` False)."""
    name = name.replace(".base_layer.", ".")
    if ".original_module." in name:
        return None
    if ".modules_to_save." in name:
        return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name) if trained else None
    return name


def _lora_targets(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, LoraTarget]]:
    """The model under any peft wrapper, and its LoRA-adapted weights by base weight name."""
    if importlib.util.find_spec("peft") is None:  # without peft there are no LoRA layers
        return model, {}
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    base = unwrap_peft(model)
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
        if layer.fan_in_fan_out:
            raise NotImplementedError(
                f"{name}: a LoRA adapter on a Conv1D layer (GPT-2 style, peft's "
                "fan_in_fan_out), which capture does not follow; leave Conv1D modules out of "
                "the LoRA target_modules, or train this model without LoRA (capture then takes "
                "the Conv1D weights themselves)")
        unsupported = {
            "DoRA / LoRA variants (use_dora=True, ...)": (adapter in layer.lora_variant,
                                                          "use_dora=False"),
            "lora_bias": (layer.lora_bias.get(adapter, False), "lora_bias=False"),
        }
        for what, (on, fix) in unsupported.items():
            if on:
                raise NotImplementedError(
                    f"{name}: capture does not support {what} yet: its update is not the "
                    f"s * B A that capture takes; set {fix} in the LoraConfig (plain LoRA), or "
                    "train without LoRA")
        targets[name] = LoraTarget(layer, adapter)
    return base, targets


def _frozen_error(pattern: str, stuck: list[str], capturable: Mapping[str, Target],
                  ndims: Mapping[str, int]) -> str:
    adapted = [n for n, t in capturable.items() if isinstance(t, LoraTarget)]
    vectors = [n for n in stuck if ndims.get(n, 2) < 2]  # a norm's gain, a bias: no adapter
    if adapted and len(vectors) == len(stuck):  # audit 137 F8: the advice could not work
        fix = ("leave them out: they are not weight matrices, and LoRA adapts only those "
               f"(adapted now: {few_names(adapted)})")
    elif adapted:
        fix = (f"add their modules to the LoRA target_modules (adapted now: "
               f"{few_names(adapted)})")
    else:
        fix = ("unfreeze them (requires_grad; with sae-shards train, include them in "
               "rl.trainable)")
    return (
        f"capture.targets pattern {pattern!r} matches parameters that never change: "
        f"{few_names(stuck)} are frozen and have no LoRA adapter; narrow the pattern or {fix}"
    )


def name_patterns(names) -> list[str]:
    """``names`` with every numeric path part (a layer's or an expert's index) written ``*``,
    each pattern once, in first-seen order: a model's parameter names in a few lines, which
    also work as ``capture.targets`` patterns."""
    return list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.)", "*", n) for n in names))


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
            if "lora_" in name and type(p.data).__name__ == "DTensor":
                raise ValueError(
                    f"parameter {name!r} is a LoRA adapter's, sharded by FSDP2: LoRA is not "
                    "supported under FSDP2 (docs/scaling.md); train the adapter under DDP "
                    "(accelerate launch --multi_gpu) or DeepSpeed ZeRO-3, or the full weights "
                    "under FSDP2")
            raise ValueError(
                f"parameter {name!r} looks sharded (DeepSpeed ZeRO-3 or FSDP); this capture "
                "supports full, replicated parameters (single process, DDP, ZeRO-1/2), and FSDP2 "
                "(fully_shard) or DeepSpeed ZeRO-3 with capture.source=update or per-event "
                "capture through ShardCallback; FSDP1 is not supported"
            )
