"""What ``EventRecorder`` hooks and what it refuses: the module owning each target and how to read
it (``Site``), the rows of a model forward, and the trainer settings per-event capture supports
(see ``capture/event_hooks.py``)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from sae_shards.capture.selection import LoraTarget, Target, few_names, full_shape, weight_layout


@dataclass(frozen=True)
class Site:
    """One target read at one hooked module."""

    name: str
    kind: str  # "matrix" or "bias"
    layout: str  # "out_in" (Linear, LoRA) or "in_out" (Conv1D)
    shape: tuple[int, ...]
    device: torch.device



def batch_shape(args, kwargs) -> tuple[int, int]:
    """Rows and sequence length of a top-level forward: the first two dimensions of
    ``input_ids`` / ``inputs_embeds``."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), Tensor):
            return int(kwargs[key].shape[0]), int(kwargs[key].shape[1])
    if args and isinstance(args[0], Tensor):
        return int(args[0].shape[0]), int(args[0].shape[1])
    raise RuntimeError("EventRecorder: a model forward without input_ids / inputs_embeds; "
                       "cannot tell how many rows it runs")


def hook_sites(model: nn.Module, targets: Mapping[str, Target]) -> dict[nn.Module, list[Site]]:
    """``{module to hook: [its targets]}``; ``ValueError`` for targets it cannot capture."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr))
    sites: dict[nn.Module, list[Site]] = {}
    for name, target in targets.items():
        if isinstance(target, LoraTarget):
            site = Site(name, "matrix", "out_in", tuple(target.shape), target.A.device)
            sites.setdefault(target.layer, []).append(site)
            continue
        found = owners.get(id(target), [])
        if len(found) > 1:
            named = {id(m): n for n, m in model.named_modules()}
            users = ", ".join(f"{named.get(id(m)) or type(m).__name__}.{a}" for m, a in found)
            raise ValueError(
                f"per-event capture target {name!r} is one weight shared by several modules "
                f"({users}: tied weights, such as an embedding that is also the LM head), so no "
                "one layer's hook sees its whole gradient; capture it per step "
                "(capture.granularity=step), or leave it out of capture.targets")
        if not found:
            raise ValueError(f"per-event capture target {name!r} is not a parameter of the "
                             "model being trained; select targets from trainer.model (after "
                             "peft wrapped it)")
        module, attr = found[0]
        layout = weight_layout(module)
        kind = {"weight": "matrix", "bias": "bias"}.get(attr)
        if layout is None or kind is None:
            raise ValueError(
                f"per-event capture target {name!r} is the {attr!r} of a {type(module).__name__}; "
                "per-event capture supports the weights and biases of nn.Linear and transformers "
                "Conv1D layers and LoRA-adapted weights, not norms, embeddings or other "
                "parameters (drop it from capture.targets)")
        site = Site(name, kind, layout, full_shape(target), target.device)
        sites.setdefault(module, []).append(site)
    return sites


def trl_fuses_lm_head() -> bool:
    """Whether the installed TRL computes GRPO's and RLOO's log-probabilities with a fused LM head
    (``trl.trainer.utils.add_fused_lm_head``, TRL 1.15 on)."""
    from trl.trainer import utils

    return hasattr(utils, "add_fused_lm_head")


def check_head_not_targeted(model: nn.Module, targets: Mapping[str, Target]) -> None:
    """Refuse per-event targets on the LM head, before anything trains.

    TRL 1.15 on patches a fused LM head into the policy's forward (``trl_fuses_lm_head``), which
    multiplies the hidden states by the output embeddings' weight itself and never calls the
    module: hooks on it see no rows, and its events would all read as zero. EventRecorder's
    check that every target's module ran in a step stays the authority for other bypasses.
    """
    if not trl_fuses_lm_head():
        return
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return
    owned = {id(p) for p in head.parameters()}
    names = [name for name, target in targets.items()
             if not isinstance(target, LoraTarget) and id(target) in owned]
    if names:
        raise ValueError(
            f"per-event capture target {few_names(names)} belongs to the LM head "
            f"({type(head).__name__}): TRL {importlib.metadata.version('trl')} computes "
            "log-probabilities with a fused LM head that multiplies by its weight directly, "
            "never calling the module, so its gradient cannot be split by event; leave it out "
            "of capture.targets, or capture per step (capture.granularity=step)")


def zero_advantage_means_zero_gradient(trainer) -> bool:
    """Whether rows with advantage 0 get exactly zero gradient from the trainer's loss.

    RLOO folds its KL into the reward; GRPO adds ``beta * KL`` per token. An entropy bonus and a
    MoE load-balancing loss do not depend on the advantage either.
    """
    from trl import RLOOTrainer

    kl_in_loss = not isinstance(trainer, RLOOTrainer) and getattr(trainer, "beta", 0.0) != 0.0
    entropy = bool(getattr(trainer, "_entropy_bonus_enabled", False))
    aux = bool(getattr(trainer, "aux_loss_enabled", False))
    return not (kl_in_loss or entropy or aux)


def check_supported(model: nn.Module, trainer) -> None:
    if model is not getattr(trainer, "model", None):
        raise ValueError(
            "EventRecorder needs the model the trainer trains (trainer.model, with any peft "
            "wrapper): peft calls the inner model's forward directly, so hooks on it see no rows")
    missing = [n for n in ("_generate_and_score_completions", "compute_loss", "num_generations",
                           "accelerator") if not hasattr(trainer, n)]
    if missing:
        raise ValueError(
            f"{type(trainer).__name__} lacks {few_names(missing)}: per-event capture "
            "(capture.granularity group or completion) needs TRL's GRPOTrainer, RLOOTrainer or "
            "a subclass; with other trainers capture per step (capture.granularity=step)")
    if getattr(trainer.accelerator, "scaler", None) is not None:
        raise ValueError("per-event capture does not support fp16 loss scaling (the hooks would "
                         "see scaled gradients): set fp16=False in the trainer's arguments "
                         "(rl.extra.fp16 in sae-shards train), and bf16=True for mixed "
                         "precision, or capture per step (capture.granularity=step)")
    check_checkpointing(model, trainer)


def check_checkpointing(model: nn.Module, trainer) -> None:
    """Activation (gradient) checkpointing is supported in torch's non-reentrant form only.

    Non-reentrant checkpointing (``use_reentrant=False``: transformers 5's and TRL's default) runs
    each layer's forward once with grad enabled, so the hooks see it, and re-runs it inside
    backward only to refill saved tensors; the hooks ignore that re-run (``in_backward``) and the
    gradients still arrive at the first forward's outputs. The reentrant form runs the first
    forward without grad and the re-run on other tensors, which the hooks cannot map to rows.
    Checked on the trainer's arguments (before ``train()`` enables it) and on the model's layers.
    """
    args = trainer.args
    on = bool(getattr(args, "gradient_checkpointing", False)
              or getattr(args, "activation_checkpointing", False))
    if on:
        # transformers 5.25 renamed gradient_ to activation_checkpointing (the old name kept as
        # an alias, mirrored): the names this trainer's config has, the current one first
        fields = [f for f in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
                  if hasattr(args, f)]
        if any((getattr(args, f, None) or {}).get("use_reentrant") for f in fields):
            raise ValueError(_REENTRANT.format(
                where=f"the trainer's {' / '.join(fields)} has use_reentrant=True",
                field=fields[0], flag=fields[0].removesuffix("_kwargs")))
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        reentrant = _reentrant(getattr(module, "_gradient_checkpointing_func", None))
        if reentrant is not False:
            how = ("reentrant checkpointing" if reentrant
                   else "a checkpoint function sae-shards cannot inspect")
            raise ValueError(_REENTRANT.format(
                where=f"{type(module).__name__} layers use {how}",
                field="gradient_checkpointing_kwargs", flag="gradient_checkpointing"))


_REENTRANT = (
    "per-event capture supports activation (gradient) checkpointing only with "
    "use_reentrant=False (transformers' and TRL's default), and {where}: the re-run forward "
    "cannot be mapped to rows; pass {field}={{'use_reentrant': False}}, or {flag}=False")


def _reentrant(func) -> bool | None:
    """Whether a transformers layer's ``_gradient_checkpointing_func`` (a ``functools.partial``
    of ``torch.utils.checkpoint.checkpoint``) is reentrant; None when it cannot tell."""
    keywords = getattr(func, "keywords", None)
    if not isinstance(keywords, dict):
        return None
    return bool(keywords.get("use_reentrant", True))  # torch's default when not passed


def in_backward() -> bool:
    """Whether the calling code runs inside an autograd backward pass (a non-reentrant
    checkpoint's re-run forward does)."""
    return torch._C._current_graph_task_id() != -1
