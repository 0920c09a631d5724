"""Targets: the parameter tensors whose updates the SAE sees, with the SAE rank of each.

A *target* is one parameter tensor (e.g. ``model.layers.0.mlp.down_proj.weight``). 2-D targets
``(m, n)`` get rank-``r`` factors per latent; 1-D targets ``(m,)`` (biases, norms) are plain
vectors. A *sample* is ``{target name: tensor of the target's shape}``; a batch of samples puts a
leading batch axis on every tensor.

A 3-D target ``(E, m, n)`` is a *stacked* one: a mixture of experts' weights, one ``(m, n)``
matrix per expert (``model.layers.0.mlp.experts.down_proj`` in transformers 5). The capture and
the buffer hold it whole; the SAE sees each expert's matrix as a target of its own, named
``name[e]`` (:func:`expand_stacked`), so every latent has rank-``r`` factors per expert, as it
has per weight matrix. :func:`split_stacked` gives a batch the SAE's names (views, no copy) and
:func:`stack_slices` puts per-expert tensors back into the parameter's shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


@dataclass(frozen=True)
class TargetSpec:
    """One captured parameter tensor and the SAE rank used for it."""

    name: str
    """Parameter name, as in ``model.named_parameters()``."""
    shape: tuple[int, ...]
    """``(m, n)`` for a matrix, ``(m,)`` for a vector, ``(E, m, n)`` for stacked experts."""
    rank: int = 1
    """Rank of every latent's factors on this target (on each expert's matrix of a stacked
    one); must be 1..min(m, n). Ignored for 1-D."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not self.name:
            raise ValueError("TargetSpec.name must be a non-empty parameter name")
        if len(self.shape) not in (1, 2, 3) or any(s < 1 for s in self.shape):
            raise ValueError(
                f"target {self.name!r}: shape {self.shape} is not supported; targets must be "
                "1-D vectors, 2-D matrices or 3-D stacked experts [experts, m, n] with positive "
                "sizes (a conv kernel cannot be captured)"
            )
        if len(self.shape) >= 2 and not 1 <= self.rank <= min(self.shape[-2:]):
            raise ValueError(
                f"target {self.name!r}: rank {self.rank} must be between 1 and "
                f"min{self.shape[-2:]} = {min(self.shape[-2:])}; lower sae.rank for this target"
            )

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def is_stacked(self) -> bool:
        """A mixture of experts' ``(E, m, n)``: the SAE sees it as ``E`` matrix targets."""
        return len(self.shape) == 3

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def factored_numel(self) -> int:
        """Numbers one latent stores for this target in one factored direction."""
        if self.is_stacked:
            return self.shape[0] * (self.shape[1] + self.shape[2]) * self.rank
        return (self.shape[0] + self.shape[1]) * self.rank if self.is_matrix else self.shape[0]


def make_targets(
    shapes: Mapping[str, Sequence[int]], rank: int | Mapping[str, int] = 1
) -> list[TargetSpec]:
    """Build target specs from ``{name: shape}``; ``rank`` is one int or ``{name: rank}``.

    For a single int, matrices smaller than the rank get ``min(m, n)`` instead of an error, so one
    global rank can cover a model with some narrow matrices. A per-target rank is taken literally.
    A stacked ``(E, m, n)`` target's rank applies to each expert's matrix.
    """
    specs = []
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if isinstance(rank, Mapping):
            if name not in rank:
                raise ValueError(f"no rank given for target {name!r}; ranks cover {sorted(rank)}")
            r = int(rank[name])
        else:
            r = min(int(rank), min(shape[-2:])) if len(shape) >= 2 else 1
        specs.append(TargetSpec(name, shape, r))
    return specs


def oversized_ranks(specs: Sequence[TargetSpec]) -> dict[str, int]:
    """The matrix targets whose rank makes a latent's factored direction at least as large as the
    dense matrix (``r (m + n) >= m n``), each with the largest rank below that: the low-rank
    parameterisation saves nothing on them."""
    out = {}
    for t in specs:
        if t.is_matrix or t.is_stacked:
            m, n = t.shape[-2:]
            if t.rank * (m + n) >= m * n:
                out[t.name] = max(1, -(-m * n // (m + n)) - 1)
    return out


def slice_name(name: str, expert: int) -> str:
    """The SAE's name for expert ``expert`` of stacked target ``name``: ``name[expert]``."""
    return f"{name}[{expert}]"


def parse_slice(name: str) -> tuple[str, int | None]:
    """``(parameter name, expert)`` of an SAE target name; ``expert`` None for a whole parameter
    (``"a.down_proj[3]"`` -> ``("a.down_proj", 3)``, ``"a.weight"`` -> ``("a.weight", None)``)."""
    match = _SLICE.fullmatch(name)
    return (match[1], int(match[2])) if match else (name, None)


_SLICE = re.compile(r"(.+)\[(\d+)\]")


def expand_stacked(targets: Sequence[TargetSpec]) -> list[TargetSpec]:
    """The SAE's targets: each stacked ``(E, m, n)`` target replaced by its ``E`` expert matrices
    ``name[e]`` of shape ``(m, n)`` and the same rank, in place; other targets as they are."""
    out = []
    for t in targets:
        if t.is_stacked:
            out.extend(TargetSpec(slice_name(t.name, e), t.shape[1:], t.rank)
                       for e in range(t.shape[0]))
        else:
            out.append(t)
    return out


def stack_targets(targets: Sequence[TargetSpec]) -> list[TargetSpec]:
    """The inverse of ``expand_stacked``: the SAE's targets (a checkpoint's) as captured, every
    run of ``name[0]`` .. ``name[E-1]`` one ``(E, m, n)`` target. Raises ``ValueError`` if a
    parameter's experts are not consecutive, complete and of one shape and rank."""
    out: list[TargetSpec] = []
    run: list[TargetSpec] = []

    def close() -> None:
        if run:
            base = parse_slice(run[0].name)[0]
            if len({(t.shape, t.rank) for t in run}) != 1:
                raise ValueError(f"{base!r}: its experts differ in shape or rank")
            out.append(TargetSpec(base, (len(run), *run[0].shape), run[0].rank))
            run.clear()

    for t in targets:
        base, expert = parse_slice(t.name)
        if expert is not None and run and base == parse_slice(run[0].name)[0]:
            if expert != len(run):
                raise ValueError(f"{base!r}: expert {expert} follows expert {len(run) - 1}")
            run.append(t)
            continue
        close()
        if expert is None:
            out.append(t)
        elif expert != 0:
            raise ValueError(f"{base!r}: its experts start at {expert}, not 0")
        else:
            run.append(t)
    close()
    return out


def split_stacked(sample: Mapping[str, torch.Tensor], targets: Sequence[TargetSpec]
                  ) -> dict[str, torch.Tensor]:
    """A batch ``{name: [batch, *shape]}`` of the capture's ``targets`` under the SAE's names:
    a stacked target's ``[batch, E, m, n]`` becomes ``E`` views ``name[e]: [batch, m, n]``
    (no copy); other targets pass through. The order is ``expand_stacked``'s."""
    out = {}
    for t in targets:
        x = sample[t.name]
        if t.is_stacked:
            out.update((slice_name(t.name, e), x[:, e]) for e in range(t.shape[0]))
        else:
            out[t.name] = x
    return out


def stack_slices(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors under the SAE's names back under parameter names: every ``name[0]`` ..
    ``name[E-1]`` stacked along a new first axis into ``name: [E, *shape]`` (at the first
    slice's place); other entries as they are. Raises ``ValueError`` if a parameter's experts
    are not all there, once each (a direction must cover the whole parameter)."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out_order: list[tuple[str, bool]] = []
    for name, value in tensors.items():
        base, expert = parse_slice(name)
        if expert is None:
            out_order.append((name, False))
            continue
        if base not in groups:
            groups[base] = {}
            out_order.append((base, True))
        groups[base][expert] = value
    out = {}
    for name, stacked in out_order:
        if not stacked:
            out[name] = tensors[name]
            continue
        experts = groups[name]
        if sorted(experts) != list(range(len(experts))):
            raise ValueError(f"{name!r}: experts {sorted(experts)[:8]} do not cover 0..E-1; a "
                             "stacked parameter's direction needs every expert")
        out[name] = torch.stack([experts[e] for e in range(len(experts))])
    return out


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
