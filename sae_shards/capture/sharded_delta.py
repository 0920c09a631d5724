"""``update`` capture under FSDP2: parameters sharded across ranks as DTensors.

Under ``fully_shard`` (FSDP2, TRL's FSDP path through accelerate) no rank holds a whole weight
matrix. ``ShardedDeltaCapture`` runs on every rank: at ``on_step_begin`` each rank copies its own
shard of each target (fp32, ``1 / world_size`` of the targets' memory); at ``on_step_end`` it
takes the difference of its shard in place and ``DTensor.full_tensor()`` all-gathers the
difference, one collective per target that every rank joins in the same order. Rank 0 writes
the gathered delta into its buffer slot and commits it exactly as ``DeltaCapture`` does; the other
ranks drop it. One all-gather of the delta per step, instead of gathering the weights twice.

Only ``source=update`` on dense targets (LoRA adapters under FSDP2 are left to future work).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch.distributed.tensor import DTensor

from sae_shards.capture.buffer import DeltaRingBuffer
from sae_shards.capture.delta import DeltaCapture
from sae_shards.capture.selection import LoraTarget, Target, few_names
from sae_shards.capture.update_writer import SqNorm


def is_dtensor(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor)


def sharded_targets(targets: Mapping[str, Target]) -> bool:
    """Whether the targets are FSDP2 DTensors (all of them; a mix raises ``ValueError``)."""
    dense = {n: t for n, t in targets.items() if not isinstance(t, LoraTarget)}
    flags = {n: is_dtensor(t) for n, t in dense.items()}
    if not any(flags.values()):
        return False
    if not all(flags.values()) or len(dense) != len(targets):
        plain = [n for n in targets if not flags.get(n, False)]
        raise ValueError(
            f"capture targets {few_names(plain, 3)} are not FSDP2 DTensors while others are; "
            "capture either only sharded weights or only replicated ones (LoRA adapters are "
            "not supported under FSDP2)")
    return True


class ShardedDeltaCapture(DeltaCapture):
    """``DeltaCapture`` for FSDP2 targets (see the module docstring). ``buffer`` is None on
    every rank but 0; every rank must add the callback and run the same steps."""

    sharded = True

    def __init__(self, targets: Mapping[str, Target], buffer: DeltaRingBuffer | None,
                 source: str = "update", **kwargs) -> None:
        if source != "update":
            raise ValueError(
                f"capture.source={source!r} is not supported under FSDP2 (sharded gradients and "
                "optimizer state); use capture.source=update or capture.granularity=group")
        if not sharded_targets(targets):
            raise ValueError("ShardedDeltaCapture needs FSDP2 (DTensor) targets; use DeltaCapture")
        super().__init__(targets, buffer, source, **kwargs)
        self._shards: dict[str, torch.Tensor] = {}  # fp32 copy of this rank's shard, per target

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._reset()  # on every rank: each one holds its shard of every target
        self._check_owned(model)

    @torch.no_grad()
    def on_step_begin(self, args, state, control, **kwargs):
        if self._armed:
            return
        for name, p in self.targets.items():
            local = p.to_local()
            snap = self._shards.get(name)
            if snap is None or snap.shape != local.shape:
                snap = self._shards[name] = torch.empty_like(local, dtype=torch.float32)
            snap.copy_(local)
        self._armed = True

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        assert self._armed, "on_step_end without a snapshot from on_step_begin"
        self._armed = False
        main = self.buffer is not None
        if main:
            self._slot, self._slot_views = self.buffer.begin_write()
        sq_norm = SqNorm()
        try:
            for name, p in self.targets.items():
                diff = self._shards[name].neg_().add_(p.to_local())  # theta_after - before
                full = DTensor.from_local(diff, p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride()).full_tensor()
                if main:
                    view = self._slot_views[name]
                    view.copy_(full)
                    sq_norm.add(view)
        except BaseException:
            if main:
                self.buffer.abort(self._slot)
                self._slot, self._slot_views = None, {}
            raise
        if main:
            self._commit(state.global_step, sq_norm)
