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
from sae_shards.capture.update_writer import lora_update


def is_zero3(p: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_shape")


def zero3_targets(targets: Mapping[str, Target]) -> bool:
    """Whether the targets are ZeRO-3 parameters, or LoRA adapters whose factors are (all of
    them; a mix raises ``ValueError``)."""
    flags = {n: is_zero3(t.A if isinstance(t, LoraTarget) else t) for n, t in targets.items()}
    if not any(flags.values()):
        return False
    if not all(flags.values()):
        plain = [n for n, flag in flags.items() if not flag]
        raise ValueError(
            f"capture targets {few_names(plain, 3)} are not DeepSpeed ZeRO-3 parameters while "
            "others are; capture either only partitioned weights or only replicated ones")
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

    def _snapshot(self, name: str, p: Target) -> None:
        whole = self._whole(name, p)  # every rank joins the gathers; rank 0 keeps them
        if self.buffer is not None:
            self._kept[name] = whole

    def _gather_delta(self, name: str, p: Target) -> torch.Tensor | None:
        after = self._whole(name, p)
        if self.buffer is None:
            return None
        before = self._kept.pop(name)
        if isinstance(p, LoraTarget):  # s * (B1 A1 - B0 A0), as without ZeRO-3
            return lora_update(*before, *after, p.scaling)
        return after[0].sub_(before[0].to(after[0].device))

    @staticmethod
    def _whole(name: str, p: Target) -> tuple[torch.Tensor, ...]:
        """The whole fp32 master copy of the weight (collective), or of a LoRA target's two
        factors ``(A [r, in], B [out, r])``: small, gathered whole."""
        if not isinstance(p, LoraTarget):
            return (full_fp32(name, p),)
        return full_fp32(f"{name}'s lora_A", p.A), full_fp32(f"{name}'s lora_B", p.B)
