"""Memory the RL step has yet to allocate when the capture sizes its buffer and SAE.

The capture checks its memory when training begins (``ShardCallback.setup``). At that moment the
policy has no gradients and its optimizer no state: both appear at the first step (AdamW's two
moments are each the size of the trainable parameters). Free memory read then overstates what
the buffer and the SAE may take by exactly that much; at 0.5B with full fine-tuning in fp32 it is
6 GB. ``pending_policy_memory`` estimates it, from the optimizer when the trainer has built it and
from ``TrainingArguments.optim`` otherwise, counting only what does not exist yet.

The estimate is a lower bound, like the checks it feeds: an optimizer it does not know adds no
state, and DeepSpeed (which allocates its partitions when it is set up) adds nothing.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import torch

# TrainingArguments.optim -> (states per trainable entry, bytes per state; None: the parameter's)
_BY_NAME: dict[str, tuple[int, int | None]] = {
    **{n: (2, None) for n in ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla",
                              "adamw_torch_npu_fused", "adamw_anyprecision", "paged_adamw_32bit",
                              "stable_adamw", "grokadamw", "schedule_free_adamw",
                              "schedule_free_radam", "galore_adamw", "apollo_adamw")},
    **{n: (2, 1) for n in ("adamw_torch_8bit", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit",
                           "galore_adamw_8bit")},
    **{n: (1, None) for n in ("lion_32bit", "paged_lion_32bit", "adagrad", "rmsprop")},
    **{n: (1, 1) for n in ("lion_8bit", "paged_lion_8bit")},
    "sgd": (0, None),  # a momentum buffer only with optim_args momentum: not counted
}

# torch.optim classes -> states per trainable entry (a function of the parameter group)
_BY_CLASS = {
    "Adam": lambda g: 2, "AdamW": lambda g: 2, "NAdam": lambda g: 2, "RAdam": lambda g: 2,
    "Adamax": lambda g: 2, "Adadelta": lambda g: 2, "Adagrad": lambda g: 1,
    "SGD": lambda g: int(g.get("momentum", 0) > 0),
    "RMSprop": lambda g: 1 + int(g.get("momentum", 0) > 0) + int(bool(g.get("centered"))),
}


class PendingMemory(NamedTuple):
    """Bytes the policy's training will still allocate on the capture's device."""

    gradients: int  # trainable parameters that have no .grad yet
    optimizer_state: int  # their optimizer state not yet created
    optimizer: str  # what the state was estimated for: a class, an optim name, or why none

    @property
    def total(self) -> int:
        return self.gradients + self.optimizer_state

    def describe(self) -> str:
        """E.g. ``"0.927 GiB (gradients 0.309 GiB, AdamW state 0.618 GiB)"``."""
        return (f"{size(self.total)} (gradients {size(self.gradients)}, {self.optimizer} state "
                f"{size(self.optimizer_state)})")


NONE = PendingMemory(0, 0, "no optimizer")


def pending_policy_memory(model: torch.nn.Module, trainer: Any | None,
                          device: torch.device | str) -> PendingMemory:
    """What ``model``'s first training step will add on ``device``: a gradient for each trainable
    parameter without one, and the optimizer state of each parameter that has none.

    The optimizer is ``trainer.optimizer`` (unwrapped from accelerate) when built, else the one
    ``trainer.args.optim`` names; without a trainer only the gradients count. Under FSDP2 each
    rank counts its own shard; under DeepSpeed nothing (its buffers exist by now).
    """
    device = torch.device(device)
    if trainer is not None and getattr(trainer, "is_deepspeed_enabled", False):
        return PendingMemory(0, 0, "DeepSpeed (allocated at its setup)")
    params = [p for p in model.parameters() if p.requires_grad and _on(p, device)]
    grads = sum(_local(p).numel() * p.element_size() for p in params if p.grad is None)
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        return PendingMemory(grads, _state_of(inner, device), type(inner).__name__)
    name = _optim_name(trainer)
    if name is None:
        return PendingMemory(grads, 0, "no optimizer")
    states, width = _BY_NAME.get(name, (0, None))
    state = sum(states * _local(p).numel() * (width or p.element_size()) for p in params)
    return PendingMemory(grads, state, name if name in _BY_NAME else f"{name} (not estimated)")


def _state_of(optimizer: Any, device: torch.device) -> int:
    per_group = _BY_CLASS.get(type(optimizer).__name__)
    if per_group is None or not isinstance(optimizer, torch.optim.Optimizer):
        return 0
    have = optimizer.state
    return sum(per_group(g) * _local(p).numel() * p.element_size()
               for g in optimizer.param_groups for p in _params(g)
               if p.requires_grad and _on(p, device) and not have.get(p))


def _params(group: dict) -> Iterable[torch.Tensor]:
    return group.get("params", ())


def _optim_name(trainer: Any | None) -> str | None:
    optim = getattr(getattr(trainer, "args", None), "optim", None)
    if optim is None:
        return None
    return str(getattr(optim, "value", optim))


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (an FSDP2 DTensor's local shard)."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


def _on(p: torch.Tensor, device: torch.device) -> bool:
    d = p.device
    return d.type == device.type and (device.index is None or d.index in (None, device.index))


def size(n: int) -> str:
    """Bytes in GiB to three places, or in MiB below 0.1 GiB."""
    return f"{n / 2**30:.3f} GiB" if n >= 0.1 * 2**30 else f"{n / 2**20:.1f} MiB"
