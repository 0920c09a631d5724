"""Targets: the parameter tensors whose updates the SAE sees, with the SAE rank of each.

A *target* is one parameter tensor (e.g. ``model.layers.0.mlp.down_proj.weight``). 2-D targets
``(m, n)`` get rank-``r`` factors per latent; 1-D targets ``(m,)`` (biases, norms) are plain
vectors. A *sample* is ``{target name: tensor of the target's shape}``; a batch of samples puts a
leading batch axis on every tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


@dataclass(frozen=True)
class TargetSpec:
    """One captured parameter tensor and the SAE rank used for it."""

    name: str
    """Parameter name, as in ``model.named_parameters()``."""
    shape: tuple[int, ...]
    """``(m, n)`` for a matrix, ``(m,)`` for a vector."""
    rank: int = 1
    """Rank of every latent's factors on this target; must be 1..min(m, n). Ignored for 1-D."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not self.name:
            raise ValueError("TargetSpec.name must be a non-empty parameter name")
        if len(self.shape) not in (1, 2) or any(s < 1 for s in self.shape):
            raise ValueError(
                f"target {self.name!r}: shape {self.shape} is not supported; targets must be "
                "1-D vectors or 2-D matrices with positive sizes (a mixture of experts' stacked "
                "[experts, m, n] tensor or a conv kernel cannot be captured)"
            )
        if self.is_matrix and not 1 <= self.rank <= min(self.shape):
            raise ValueError(
                f"target {self.name!r}: rank {self.rank} must be between 1 and "
                f"min{self.shape} = {min(self.shape)}; lower sae.rank for this target"
            )

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def factored_numel(self) -> int:
        """Numbers one latent stores for this target in one factored direction."""
        return (self.shape[0] + self.shape[1]) * self.rank if self.is_matrix else self.shape[0]


def make_targets(
    shapes: Mapping[str, Sequence[int]], rank: int | Mapping[str, int] = 1
) -> list[TargetSpec]:
    """Build target specs from ``{name: shape}``; ``rank`` is one int or ``{name: rank}``.

    For a single int, matrices smaller than the rank get ``min(m, n)`` instead of an error, so one
    global rank can cover a model with some narrow matrices. A per-target rank is taken literally.
    """
    specs = []
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if isinstance(rank, Mapping):
            if name not in rank:
                raise ValueError(f"no rank given for target {name!r}; ranks cover {sorted(rank)}")
            r = int(rank[name])
        else:
            r = min(int(rank), min(shape)) if len(shape) == 2 else 1
        specs.append(TargetSpec(name, shape, r))
    return specs


def total_numel(targets: Sequence[TargetSpec]) -> int:
    """Entries in one sample (the dense input dimension D)."""
    return sum(t.numel for t in targets)


def check_batch(
    batch: Mapping[str, torch.Tensor], targets: Sequence[TargetSpec], batched: bool = True
) -> int:
    """Check names and shapes of a (batch of) sample(s); return the batch size.

    Raises ``ValueError`` naming the target and both shapes on any mismatch.
    """
    names = {t.name for t in targets}
    missing = sorted(names - set(batch))
    extra = sorted(set(batch) - names)
    if missing or extra:
        raise ValueError(
            f"sample targets do not match the SAE's: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    batch_size = None
    for t in targets:
        x = batch[t.name]
        got = tuple(x.shape[1:]) if batched else tuple(x.shape)
        if got != t.shape:
            raise ValueError(
                f"target {t.name!r}: sample has shape {got}, the SAE expects {t.shape}"
            )
        if batched:
            if batch_size is None:
                batch_size = x.shape[0]
            elif x.shape[0] != batch_size:
                raise ValueError(
                    f"target {t.name!r}: batch size {x.shape[0]} differs from {batch_size} "
                    "of the other targets"
                )
    return batch_size if batched else 1
