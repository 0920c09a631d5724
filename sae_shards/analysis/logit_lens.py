"""Logit lens for shards: which tokens a shard's writes to the residual stream promote.

A shard's component on a *writer* target (a matrix that writes into the residual stream:
``o_proj.weight``, ``down_proj.weight``, shape ``[d_model, d_in]``) changes what that layer adds
to the residual stream; the directions it can add are the component's column space. For each of
its top singular directions ``u`` (unit norm, ``[d_model]``) this module reads off the logits
``W_U (g * u)``, with ``g`` the final norm's weight and ``W_U`` the unembedding
(``model.get_output_embeddings().weight``, ``[vocab, d_model]``).

Approximation: the final norm's *normalisation* (mean/variance, which depends on the whole
residual vector) is skipped; only its elementwise scale ``g`` is applied. The lens shows which
tokens a write direction favours, not the size of the logit change in a real forward pass.

Signs: a singular vector's sign is arbitrary, and so is a shard's (its activations are signed:
the same shard pushes the update either way). Each result therefore reports both ends of the
same axis: ``promoted`` are the top tokens of ``+u``, ``suppressed`` the top tokens of ``-u``
(their logits under ``+u`` are the most negative). For a shard applied with a negative
activation, or a flipped ``u``, promoted and suppressed swap. ``write_directions`` fixes the SVD's
sign by a deterministic convention (see there) so results are reproducible, but that convention
carries no meaning: read each result as an axis with two ends.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

WRITER_PATTERNS = ("*o_proj.weight", "*down_proj.weight")
"""Glob patterns (``fnmatch``) of parameter names that write to the residual stream."""

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "norm_f")
"""Attribute names under ``model.base_model`` tried for the final norm (Llama/Qwen2: ``norm``)."""

Component = Tensor | tuple[Tensor, Tensor]
"""Dense ``[d_model, d_in]``, factored ``(U [d_model, r], V [d_in, r])`` meaning ``U V^T``, or a
1-D ``[d_model]`` vector (a bias that writes to the residual stream)."""


@dataclass(frozen=True)
class LensResult:
    """Tokens one write direction of one target promotes and suppresses."""

    target: str
    """Parameter name of the writer target."""
    index: int
    """Rank of the singular direction within the target (0 = largest singular value)."""
    singular_value: float
    """Singular value of the component along this direction (units of the component)."""
    promoted: list[tuple[str, float]]
    """Top-k ``(token, logit)`` of ``W_U (g * u)``, largest first (logits per unit ``u``)."""
    suppressed: list[tuple[str, float]]
    """Top-k ``(token, logit)`` of ``W_U (g * -u)`` reported as logits under ``+u``, most
    negative first. Swaps with ``promoted`` when the shard's activation is negative."""


class WriterSplit(NamedTuple):
    writers: list[str]
    """Names matching a writer pattern, in input order."""
    skipped: list[str]
    """Names matching none, in input order."""


def split_writers(
    names: Sequence[str], writer_patterns: Sequence[str] = WRITER_PATTERNS
) -> WriterSplit:
    """Split parameter names into residual-stream writers and the rest (by glob pattern)."""
    writers, skipped = [], []
    for name in names:
        matched = any(fnmatch.fnmatchcase(name, pat) for pat in writer_patterns)
        (writers if matched else skipped).append(name)
    return WriterSplit(writers, skipped)


def write_directions(component: Component, rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Left singular vectors ``[d_model, k]`` and singular values ``[k]`` of a component.

    Singular values at most ``rtol * largest`` are dropped (numerical rank). A factored
    ``(U, V)`` is decomposed without forming ``U V^T``: with ``U = Q_u R_u`` and ``V = Q_v R_v``
    (reduced QR), ``U V^T = Q_u (R_u R_v^T) Q_v^T``, so the SVD of the small ``r x r`` core
    ``R_u R_v^T = P S W^T`` gives left singular vectors ``Q_u P`` (right: ``Q_v W``). Computed
    in float64.

    Sign convention (an SVD fixes each pair only up to a joint sign): every pair is flipped so
    that its right singular vector's largest-magnitude entry is positive. Dense and factored
    inputs then agree, and negating the write side (``U -> -U``) negates the left vectors. A 1-D
    component is its own single direction, sign kept.
    """
    if isinstance(component, tuple):
        u, v = (x.detach().to(torch.float64) for x in component)
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
            raise ValueError(
                f"a factored component must be (U [d_model, r], V [d_in, r]); got shapes "
                f"{tuple(u.shape)} and {tuple(v.shape)}"
            )
        q_u, r_u = torch.linalg.qr(u)  # [d_model, r], [r, r]
        q_v, r_v = torch.linalg.qr(v)  # [d_in, r], [r, r]
        p, s, wh = torch.linalg.svd(r_u @ r_v.T)  # [r, r], [r], [r, r]
        left, right = q_u @ p, q_v @ wh.T  # [d_model, r], [d_in, r]
    elif component.ndim == 2:
        left, s, vh = torch.linalg.svd(component.detach().to(torch.float64), full_matrices=False)
        right = vh.T  # [d_in, k]
    elif component.ndim == 1:
        vec = component.detach().to(torch.float64)
        norm = vec.norm()
        left, s = (vec / norm).unsqueeze(1), norm.reshape(1)
        right = torch.ones(1, 1, dtype=torch.float64)  # keeps the vector's own sign
    else:
        raise ValueError(
            f"a component must be 1-D, 2-D or a (U, V) pair; got shape {tuple(component.shape)}"
        )
    pivot = right.gather(0, right.abs().argmax(dim=0, keepdim=True))  # [1, k]
    left = left * torch.where(pivot < 0, -1.0, 1.0).to(left)
    if s.numel() == 0 or not s.max() > 0:
        return left[:, :0], s[:0]  # an all-zero component writes nothing
    keep = s > rtol * s.max()
    return left[:, keep], s[keep]


def final_norm_weight(model: nn.Module) -> Tensor:
    """The elementwise weight ``[d_model]`` of the model's final norm (before the unembedding).

    Looks for ``model.base_model.<name>.weight`` for each name in ``FINAL_NORM_NAMES``. Models
    whose norm scales by ``1 + weight`` (Gemma) need ``final_norm=1 + weight`` in ``logit_lens``.
    """
    for name in FINAL_NORM_NAMES:
        norm = getattr(model.base_model, name, None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            return norm.weight
    raise ValueError(
        f"found no final norm under {type(model.base_model).__name__} "
        f"(tried {list(FINAL_NORM_NAMES)}); pass final_norm=<its elementwise weight> to logit_lens"
    )


def _decode_top(
    tokenizer: PreTrainedTokenizerBase, logits: Tensor, top_k: int, largest: bool
) -> list[tuple[str, float]]:
    values, ids = torch.topk(logits, min(top_k, logits.numel()), largest=largest)
    return [(tokenizer.decode([i]), float(v)) for i, v in zip(ids.tolist(), values)]


def logit_lens(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    components: Mapping[str, Component],
    top_k: int = 10,
    writer_patterns: Sequence[str] = WRITER_PATTERNS,
    final_norm: Tensor | None = None,
    rtol: float = 1e-6,
) -> list[LensResult]:
    """Promoted and suppressed tokens of every write direction of a shard's writer components.

    ``components`` maps parameter names to the shard's component there (see ``Component``).
    Names matching no ``writer_patterns`` are skipped (logged at INFO; ``split_writers`` returns
    them). Each writer target gives one ``LensResult`` per singular direction above
    ``rtol * largest``, in order of singular value. ``final_norm`` overrides the norm weight
    found by ``final_norm_weight``. See the module docstring for the sign convention and the
    skipped normalisation.
    """
    writers, skipped = split_writers(list(components), writer_patterns)
    if not writers:
        raise ValueError(
            f"no component targets a residual-stream writer: got {list(components)}; writers are "
            f"names matching {list(writer_patterns)} (e.g. 'model.layers.0.mlp.down_proj.weight'),"
            " or pass writer_patterns"
        )
    if skipped:
        logger.info("logit_lens: skipping non-writer targets %s", skipped)
    unembed = model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    gain = (final_norm if final_norm is not None else final_norm_weight(model)).detach()
    gain = gain.to(unembed)  # [d_model]
    d_model = unembed.shape[1]
    results = []
    for name in writers:
        left, s = write_directions(components[name], rtol)  # [d_model, k], [k]
        if left.shape[0] != d_model:
            raise ValueError(
                f"logit_lens: component {name!r} writes vectors of size {left.shape[0]} but the "
                f"model's d_model is {d_model}; is it [d_model, d_in] (transpose it otherwise)?"
            )
        logits = unembed @ (gain[:, None] * left.to(unembed))  # [vocab, k]
        for j in range(left.shape[1]):
            results.append(
                LensResult(
                    target=name,
                    index=j,
                    singular_value=float(s[j]),
                    promoted=_decode_top(tokenizer, logits[:, j], top_k, largest=True),
                    suppressed=_decode_top(tokenizer, logits[:, j], top_k, largest=False),
                )
            )
    return results
