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


class GatheringCapture(DeltaCapture):
    """``update`` capture of parameters sharded across ranks (FSDP2, DeepSpeed ZeRO-3): every
    rank runs it and joins the same collectives in the same order; rank 0 (the only one with a
    ``buffer``) writes each target's whole delta into its slot and commits it as
    ``DeltaCapture`` does. Subclasses say how a snapshot is taken and a delta gathered."""

    sharded = True
    backend = ""
    """How the parameters are sharded, for messages."""

    def __init__(self, targets: Mapping[str, Target], buffer: DeltaRingBuffer | None,
                 source: str = "update", **kwargs) -> None:
        if source != "update":
            raise ValueError(
                f"capture.source={source!r} is not supported under {self.backend} (sharded "
                "gradients and optimizer state); use capture.source=update or "
                "capture.granularity=group")
        if not self.applies_to(targets):
            raise ValueError(f"{type(self).__name__} needs {self.backend} targets; use "
                             "DeltaCapture")
        super().__init__(targets, buffer, source, **kwargs)
        self._kept: dict[str, torch.Tensor] = {}
        """What this rank keeps of each target from ``on_step_begin`` (``_snapshot``)."""

    @staticmethod
    def applies_to(targets: Mapping[str, Target]) -> bool:
        raise NotImplementedError

    def _snapshot(self, name: str, p: torch.Tensor) -> None:
        """Keep what this rank needs of target ``name`` before the optimizer step."""
        raise NotImplementedError

    def _gather_delta(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        """Target ``name``'s whole ``theta_after - theta_before`` (collective); None on ranks
        that drop it."""
        raise NotImplementedError

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._reset()  # on every rank: each one joins every collective
        self._check_owned(model)

    @torch.no_grad()
    def on_step_begin(self, args, state, control, **kwargs):
        if self._armed:
            return
        for name, p in self.targets.items():
            self._snapshot(name, p)
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
                full = self._gather_delta(name, p)
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


class ShardedDeltaCapture(GatheringCapture):
    """``update`` capture of FSDP2 targets (see the module docstring). ``buffer`` is None on
    every rank but 0; every rank must add the callback and run the same steps."""

    backend = "FSDP2"
    applies_to = staticmethod(sharded_targets)

    def _snapshot(self, name: str, p: torch.Tensor) -> None:
        local = p.to_local()  # an fp32 copy of this rank's shard, allocated once
        snap = self._kept.get(name)
        if snap is None or snap.shape != local.shape:
            snap = self._kept[name] = torch.empty_like(local, dtype=torch.float32)
        snap.copy_(local)

    def _gather_delta(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        diff = self._kept[name].neg_().add_(p.to_local())  # theta_after - before, this shard
        full = DTensor.from_local(diff, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride()).full_tensor()
        return full if self.buffer is not None else None
