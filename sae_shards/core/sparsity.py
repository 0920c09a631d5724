"""Sparsity functions: pre-activations ``[batch, n_latents]`` -> a few active latents per sample.

Each gives :class:`SparseCodes` (``batch_topk`` with its batch threshold beside them), a padded
list of active latents per sample. Padding entries have value 0 (they decode to nothing and never
count as firing), so every mode decodes the same way. The per-sample modes hold ``k`` entries per
sample; ``batch_topk``'s width is the most any sample of the batch has.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from sae_shards.core.sae_config import SPARSITY_MODES


class SparseCodes(NamedTuple):
    """Active latents of a batch; entries with value 0 are padding."""

    indices: Tensor  # [batch, width] int64 latent ids (width k, or varying for batch_topk)
    values: Tensor  # [batch, width] activations (signed for signed_topk)

    def dense(self, n_latents: int) -> Tensor:
        """Codes as a dense ``[batch, n_latents]`` tensor (zeros where inactive)."""
        out = self.values.new_zeros(self.values.shape[0], n_latents)
        return out.scatter_add_(1, self.indices, self.values)

    def active(self) -> Tensor:
        """``[batch, width]`` bool: which entries are real activations, not padding."""
        return self.values != 0


def signed_topk(pre: Tensor, k: int) -> SparseCodes:
    """Keep the k largest ``|pre|`` per sample with their sign (an update may push either way)."""
    indices = pre.abs().topk(k, dim=-1, sorted=False).indices  # [batch, k]
    return SparseCodes(indices, pre.gather(-1, indices))


def relu_topk(pre: Tensor, k: int) -> SparseCodes:
    """ReLU, then the k largest per sample."""
    values, indices = pre.relu().topk(k, dim=-1, sorted=False)
    return SparseCodes(indices, values)


def batch_topk(pre: Tensor, k: int) -> tuple[SparseCodes, Tensor]:
    """ReLU, then the ``k * batch`` largest over the whole batch (training).

    Returns the codes and the smallest kept activation, which the trainer folds into the EMA
    threshold used at inference (:func:`threshold_codes`).
    """
    acts = pre.relu()  # [batch, n_latents]
    n_keep = min(k * acts.shape[0], acts.numel())
    kept = acts.flatten().topk(n_keep, sorted=False).values
    floor = kept.min()
    mask = acts >= floor
    # Ties at the floor can keep a few more than k*batch; harmless and deterministic.
    return _mask_to_codes(acts * mask), floor.detach()


def threshold_codes(pre: Tensor, threshold: Tensor | float) -> SparseCodes:
    """ReLU, then keep activations above a fixed threshold (batch_topk at inference)."""
    acts = pre.relu()
    return _mask_to_codes(acts * (acts > threshold))


def _mask_to_codes(acts: Tensor) -> SparseCodes:
    """Dense non-negative acts with zeros -> padded SparseCodes (width = most active in a row)."""
    width = max(int((acts > 0).sum(-1).max().item()), 1)
    values, indices = acts.topk(width, dim=-1, sorted=False)
    return SparseCodes(indices, values)


def aux_latents(pre: Tensor, dead: Tensor, aux_k: int, signed: bool) -> Tensor:
    """AuxK's latents: the ``min(aux_k, n_dead)`` dead latents (``dead`` ``[n_latents]`` bool)
    with the largest score per sample, ``[batch, ka]``; the score is ``|pre|`` when codes are
    ``signed`` (``SAEConfig.signed``), ``relu(pre)`` otherwise."""
    score = pre.abs() if signed else pre.relu()
    n_dead = int(dead.sum())
    return score.masked_fill(~dead, -1.0).topk(min(aux_k, n_dead), dim=-1, sorted=False).indices


def aux_values(pre: Tensor, aidx: Tensor, signed: bool) -> Tensor:
    """The AuxK latents' activations ``[batch, ka]``: ``pre`` at ``aidx``, ReLU'd unless
    ``signed``."""
    a = pre.gather(-1, aidx)
    return a if signed else a.relu()


def select_codes(pre: Tensor, mode: str, k: int) -> SparseCodes:
    """Dispatch for the per-sample modes (batch_topk needs the trainer's threshold state)."""
    match mode:
        case "signed_topk":
            return signed_topk(pre, k)
        case "topk":
            return relu_topk(pre, k)
        case other:
            raise ValueError(f"sparsity {other!r} has no per-sample selection; use {SPARSITY_MODES}")
