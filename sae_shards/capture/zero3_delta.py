"""``update`` capture under DeepSpeed ZeRO-3: parameters partitioned across ranks.

Under ZeRO-3 (TRL through ``accelerate launch`` with a DeepSpeed config, stage 3) each rank holds
a flat slice of every parameter; the module's ``param`` has shape ``(0,)`` and its real shape in
``param.ds_shape``, and the optimizer's fp32 master copy of the slice is what ``step()`` changes.
``Zero3DeltaCapture`` runs on every rank. At ``on_step_begin`` and ``on_step_end`` every rank calls
``deepspeed.utils.safe_get_full_fp32_param`` for each target in the same order (a collective: it
all-gathers the fp32 master copy); rank 0 keeps the first as its snapshot and writes the
difference into its buffer slot, committed exactly as ``DeltaCapture`` does; the other ranks
drop what they gathered. Two all-gathers of the targets per step, through DeepSpeed's own API.

Under DeepSpeed the optimizer step runs inside ``accelerator.backward`` (before
``on_pre_optimizer_step``), so only ``on_step_begin`` sees the weights before it; that is where
the snapshot is taken. Only ``source=update`` on dense targets; targets must be trainable (a
frozen parameter has no fp32 master copy).
"""

from __future__ import annotations

from typing import Mapping

import torch

from sae_shards.capture.selection import LoraTarget, Target, few_names
from sae_shards.capture.sharded_delta import GatheringCapture


def is_zero3(p: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_shape")


def zero3_targets(targets: Mapping[str, Target]) -> bool:
    """Whether the targets are ZeRO-3 parameters (all of them; a mix raises ``ValueError``)."""
    flags = {n: not isinstance(t, LoraTarget) and is_zero3(t) for n, t in targets.items()}
    if not any(flags.values()):
        return False
    if not all(flags.values()):
        plain = [n for n, flag in flags.items() if not flag]
        raise ValueError(
            f"capture targets {few_names(plain, 3)} are not DeepSpeed ZeRO-3 parameters while "
            "others are; capture either only partitioned weights or only replicated ones (LoRA "
            "adapters are not supported under ZeRO-3)")
    return True


def full_fp32(name: str, p: torch.Tensor) -> torch.Tensor:
    """The whole fp32 master copy of ZeRO-3 parameter ``p`` (collective: every rank calls it, for
    the same parameters in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)
    if full is None:
        raise ValueError(
            f"capture target {name!r} has no fp32 master copy in the ZeRO-3 optimizer: it is "
            "frozen (requires_grad=False) or not in the optimizer; capture only trained weights")
    return full


class Zero3DeltaCapture(GatheringCapture):
    """``update`` capture of ZeRO-3 targets (see the module docstring). ``buffer`` is None on
    every rank but 0; every rank must add the callback and run the same steps."""

    backend = "DeepSpeed ZeRO-3"
    applies_to = staticmethod(zero3_targets)

    def _snapshot(self, name: str, p: torch.Tensor) -> None:
        full = full_fp32(name, p)  # every rank joins the gather; rank 0 keeps the whole target
        if self.buffer is not None:
            self._kept[name] = full

    def _gather_delta(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        after = full_fp32(name, p)
        if self.buffer is None:
            return None
        return after.sub_(self._kept.pop(name).to(after.device))
