"""Logit lens for shards: which tokens a shard's writes to the residual stream promote.

A shard's component on a *writer* target (a matrix whose layer adds its output to the residual
stream: the attention and MLP output projections, ``writer_targets``) changes what that layer
adds to the residual stream; the directions it can add span the component's *write side*. Which
side that is comes from the layer's type (``selection.weight_layout``): an ``nn.Linear`` weight is
``[d_model, d_in]`` and writes along its rows' space (the left factor ``U`` of ``U V^T``); a
transformers ``Conv1D`` weight (GPT-2) is ``[d_in, d_model]`` and writes along its columns' space
(the right factor ``V``). For each top singular direction ``u`` of the write side (unit norm,
``[d_model]``) this module reads off the logits ``W_U (g * u)``, with ``g`` the final norm's
elementwise gain (measured by running the norm, ``norm_gain``: ``weight`` for LayerNorm and
RMSNorm, ``1 + weight`` for Gemma's) and ``W_U`` the unembedding
(``model.get_output_embeddings().weight``, ``[vocab, d_model]``).

A writer whose output passes through a norm before the residual add (post-norm blocks: OLMo2,
Gemma2/3; found by running, ``writer_post_norms``) is read through that norm's gain too:
``W_U (g * g_post * u)``.

A mixture of experts' stacked down projection ``[experts, d_model, d_in]`` (transformers 5)
writes one expert at a time: each expert's matrix is a writer of its own, ``name[e]``
(``stacked_writers``), read like an ``nn.Linear`` weight (or a ``Conv1D`` one when the experts
module says ``is_transposed``). Its output is taken as added to the residual stream as it is
(post-norms are found for layers only).

Approximation: the norms' *normalisation* (mean/variance, which depends on the whole vector)
and their biases are skipped; only their elementwise scales are applied. The lens
shows which tokens a write direction favours, not the size of the logit change in a real forward
pass.

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
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Collection, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from sae_shards.capture.selection import (
    block_layers,
    block_lists,
    few_names,
    inside_any,
    layer_output_axis,
    matrix_layers,
    peft_name,
    unwrap_peft,
)
from sae_shards.core.targets import parse_slice, slice_name

logger = logging.getLogger(__name__)

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")
"""Module names (last component) tried for the final norm, outside the blocks (Llama/Qwen2:
``model.norm``, GPT-2: ``transformer.ln_f``, GPT-NeoX/OPT: ``final_layer_norm``)."""

Component = Tensor | tuple[Tensor, Tensor]
"""As the target's parameter is laid out: dense (the weight's shape), factored ``(U [m, r],
V [n, r])`` meaning ``U V^T`` of shape ``[m, n]``, or a 1-D ``[d_model]`` vector (a writer's
bias). ``logit_lens`` finds the write side from the layer type."""


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
    direction: Tensor
    """The unit write direction ``u``, ``[d_model]`` (float64, CPU)."""
    promoted_ids: tuple[int, ...] = ()
    """The token ids of ``promoted``, in its order."""
    suppressed_ids: tuple[int, ...] = ()
    """The token ids of ``suppressed``, in its order."""


class WriterSplit(NamedTuple):
    writers: list[str]
    """Names that are writers, in input order."""
    skipped: list[str]
    """The other names, in input order."""


def _output_projections(model: nn.Module) -> dict[str, nn.Module]:
    """Each sub-block's layer that runs last (``writer_targets``' candidates), by name, in
    module order."""
    layers = block_layers(model)
    order: dict[str, int] = {}
    tick = itertools.count()
    _probe(model, [
        layer.register_forward_hook(lambda *_, n=name: order.__setitem__(n, next(tick)))
        for name, layer in layers.items()
    ])
    last_in_group = {_parent(n): n for n in sorted(order, key=order.__getitem__)}
    return {name: layer for name, layer in layers.items()
            if last_in_group.get(_parent(name)) == name}


def no_writers_reason(model: nn.Module) -> str | None:
    """Why ``writer_targets`` finds no writer in a model whose blocks do have output projections
    (None when it finds some, or the model has none): they write another width than the
    unembedding reads, so a projection the logit lens does not follow sits between the residual
    stream and the unembedding (OPT-350m's ``project_out``)."""
    if writer_targets(model) or not (layers := _output_projections(model)):
        return None
    d_in = model.get_output_embeddings().weight.shape[1]
    widths = sorted({int(m.weight.shape[layer_output_axis(m)]) for m in layers.values()})
    return (f"the unembedding reads {d_in} features but the blocks' output projections write "
            f"{'/'.join(map(str, widths))}: a projection between the residual stream and the "
            "unembedding (such as OPT-350m's project_out), which the logit lens does not follow")


def writer_targets(model: nn.Module) -> list[str]:
    """Names of the parameters that write into the residual stream, in module order.

    Found by module type and execution order, not by family names. In every block
    (``selection.block_layers``) the ``nn.Linear`` / ``Conv1D`` layers are grouped by their
    parent module, the sub-block (attention, MLP; a block's own direct layers form a group too,
    as OPT's ``fc1``/``fc2``). One forward pass of two tokens, with hooks, orders the layers as
    they run. In each group the layer that runs last is the sub-block's output projection, and it
    is a writer when its output size is ``d_model`` (the unembedding's input size): after it
    comes only the residual add. This gives ``o_proj``/``down_proj`` (Llama, Qwen2, Mistral),
    ``attn.c_proj``/``mlp.c_proj`` (GPT-2), ``dense``/``dense_4h_to_h`` (GPT-NeoX). A writer's
    bias, if it has one, writes too and is listed after its weight. Layers that never run
    (unrouted experts) are not writers. A LoRA-adapted layer counts as its base layer. A
    mixture of experts' stacked writer (``stacked_writers``) is listed one expert at a time,
    ``name[e]``, as the SAE names its targets.
    """
    d_model = model.get_output_embeddings().weight.shape[1]
    writers = []
    for name, layer in _output_projections(model).items():
        if layer.weight.shape[layer_output_axis(layer)] != d_model:
            continue
        writers.append(name)
        if getattr(layer, "bias", None) is not None:
            writers.append(name.removesuffix(".weight") + ".bias")
    experts = stacked_writers(model)
    if experts:  # each expert's matrix, in parameter order among the layers' writers
        position = {peft_name(n) or n: i
                    for i, (n, _) in enumerate(unwrap_peft(model).named_parameters())}
        writers += [slice_name(n, e) for n, w in experts.items() for e in range(w.n_experts)]
        writers.sort(key=lambda n: (position.get(parse_slice(n)[0], -1), parse_slice(n)[1] or 0))
    return writers


class StackedWriter(NamedTuple):
    """A mixture of experts' stacked tensor whose experts write to the residual stream."""

    n_experts: int
    shape: tuple[int, int]
    """One expert's matrix."""
    axis: int
    """The axis of one expert's matrix that indexes its outputs."""


def stacked_writers(model: nn.Module) -> dict[str, StackedWriter]:
    """``{parameter name: StackedWriter}`` of the stacked expert tensors ``[experts, m, n]``
    whose experts write to the residual stream (an MoE layer's down projection), found by
    shape, not by name: a module inside the blocks holding 3-D parameters is an experts module;
    its layout is ``[experts, out, in]``, or ``[experts, in, out]`` when it says
    ``is_transposed`` (transformers' ``use_experts_implementation``); the writer is the one
    tensor whose output size is ``d_model`` (of two, the one whose input size is not). An
    experts module where this leaves no single tensor has no writer here."""
    d_model = model.get_output_embeddings().weight.shape[1]
    blocks = block_lists(model)
    found = {}
    for name, module in unwrap_peft(model).named_modules():
        if not inside_any(name, blocks):
            continue
        stacked = {n: p for n, p in module.named_parameters(recurse=False) if p.ndim == 3}
        if not stacked:
            continue
        axis = 1 if getattr(module, "is_transposed", False) else 0
        out = {n: p for n, p in stacked.items() if p.shape[1 + axis] == d_model}
        if len(out) > 1:
            out = {n: p for n, p in out.items() if p.shape[2 - axis] != d_model}
        if len(out) == 1:
            (n, p), = out.items()
            found[f"{name}.{n}"] = StackedWriter(p.shape[0], tuple(p.shape[1:]), axis)
    return found


def _probe(model: nn.Module, hooks: Sequence[Any]) -> None:
    """One forward pass of two tokens under ``hooks`` (removed after it, whatever happens), on a
    forked RNG: dropout in this pass must not shift the caller's random stream."""
    device = next(model.parameters()).device
    ids = torch.ones(1, 2, dtype=torch.long, device=device)  # [1, 2]
    rng_devices = [device] if device.type != "cpu" else []
    try:
        with torch.random.fork_rng(devices=rng_devices, device_type=device.type), torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for hook in hooks:
            hook.remove()


def writer_post_norms(model: nn.Module, writers: Sequence[str] | None = None
                      ) -> dict[str, nn.Module]:
    """``{writer weight name: norm}`` for writers whose output passes through a norm before the
    residual add (post-norm blocks: OLMo2's and Gemma2/3's ``post_attention_layernorm`` and
    ``post_feedforward_layernorm``); writers added to the residual as they are have no entry.

    Found by running, not by names (Llama's ``post_attention_layernorm`` is the MLP's pre-norm):
    one forward pass follows each writer's output tensor (through dropout and identity modules,
    and a LoRA layer's sum) and notes the norm that takes exactly that tensor as its input. A
    norm is a leaf module inside the blocks with a ``[d_model]`` weight that is not a matrix
    layer. ``writers``: weight names (``writer_targets``, the default); bias names are ignored.
    """
    if writers is None:
        writers = writer_targets(model)
    layers = matrix_layers(model)
    d_model = model.get_output_embeddings().weight.shape[1]
    blocks = block_lists(model)
    base = unwrap_peft(model)
    wrapper = {id(m.get_base_layer()): m for m in base.modules()
               if hasattr(m, "get_base_layer") and m.get_base_layer() is not m}
    matrices = {id(m) for m in layers.values()}
    carried: dict[int, tuple[Tensor, str]] = {}  # id(tensor) -> (tensor, writer) in flight
    found: dict[str, nn.Module] = {}

    def carrier(name: str):
        def hook(module, args, out):
            if isinstance(out, Tensor):
                carried[id(out)] = (out, name)
        return hook

    def follow(module, args, out):  # dropout / identity: the writer's output passed on
        x = args[0] if args else None
        held = carried.get(id(x))
        if held is not None and held[0] is x and isinstance(out, Tensor):
            carried[id(out)] = (out, held[1])

    def take(norm):
        def hook(module, args):
            x = args[0] if args else None
            held = carried.get(id(x))
            if held is not None and held[0] is x:
                found.setdefault(held[1], norm)
        return hook

    hooks = []
    for name in writers:
        if name in layers and name.endswith(".weight"):
            layer = layers[name]
            outer = wrapper.get(id(layer), layer)
            hooks.append(outer.register_forward_hook(carrier(name)))
    for name, module in base.named_modules():
        if not inside_any(name, blocks) or id(module) in matrices or any(module.children()):
            continue
        if isinstance(module, (nn.Dropout, nn.Identity)):
            hooks.append(module.register_forward_hook(follow))
        elif isinstance(getattr(module, "weight", None), Tensor) and \
                tuple(module.weight.shape) == (d_model,):
            hooks.append(module.register_forward_pre_hook(take(module)))
    _probe(model, hooks)
    return found


def _parent(weight_name: str) -> str:
    """The module holding the layer of a weight (``h.0.attn.c_proj.weight`` -> ``h.0.attn``)."""
    return weight_name.removesuffix(".weight").rpartition(".")[0]


def split_writers(names: Sequence[str], writers: Collection[str]) -> WriterSplit:
    """Split parameter names into writers and the rest.

    ``writers`` holds exact names (``writer_targets``) or ``fnmatch`` globs.
    """
    split_w, skipped = [], []
    for name in names:
        matched = name in writers or any(fnmatch.fnmatchcase(name, pat) for pat in writers)
        (split_w if matched else skipped).append(name)
    return WriterSplit(split_w, skipped)


def write_side(component: Component, axis: int) -> Component:
    """``component`` with its write side first: as is for ``axis`` 0 (Linear), transposed for
    ``axis`` 1 (Conv1D: a dense ``[d_in, d_model]`` becomes ``[d_model, d_in]``, a factored
    ``(U, V)`` becomes ``(V, U)``). A 1-D component is its own write direction."""
    if axis == 0 or (isinstance(component, Tensor) and component.ndim == 1):
        return component
    if isinstance(component, tuple):
        return component[1], component[0]
    return component.T


def write_directions(component: Component, rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Left singular vectors ``[d_model, k]`` and singular values ``[k]`` of a component.

    ``component`` must have its write side first (``write_side``): dense ``[d_model, d_in]`` or
    ``(U [d_model, r], V [d_in, r])``.

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


class FinalNormNotFound(ValueError):
    """The logit lens cannot tell which module is the model's final norm."""


def find_final_norm(model: nn.Module) -> nn.Module:
    """The model's final norm (before the unembedding), found by running: the module outside
    the blocks with a ``[d_model]`` weight whose output the unembedding reads (one forward pass
    of two tokens, ``_probe``). Where none does (an operation of the model's own between the two),
    the one such module whose last name component is in ``FINAL_NORM_NAMES``. Any peft wrapper
    is looked through. :class:`FinalNormNotFound` when neither gives exactly one."""
    d_model = model.get_output_embeddings().weight.shape[1]
    blocks = block_lists(model)
    candidates = {
        name: module
        for name, module in unwrap_peft(model).named_modules()
        if not inside_any(name, blocks)
        and isinstance(getattr(module, "weight", None), Tensor)
        and tuple(module.weight.shape) == (d_model,)
    }
    fed = _feeding_unembedding(model, candidates)
    if fed is not None:
        return candidates[fed]
    named = {n: m for n, m in candidates.items() if n.rpartition(".")[2] in FINAL_NORM_NAMES}
    if len(named) != 1:
        raise FinalNormNotFound(
            f"cannot tell the final norm of {type(model).__name__}: no module outside the blocks "
            f"with a [{d_model}] weight feeds the unembedding directly, and "
            f"{len(named)} ({few_names(named)}) are named {list(FINAL_NORM_NAMES)}; in Python, "
            "logit_lens(..., final_norm=<its elementwise gain>) reads it")
    return next(iter(named.values()))


def _feeding_unembedding(model: nn.Module, candidates: dict[str, nn.Module]) -> str | None:
    """The name of the one candidate whose output is the unembedding's input (the same memory,
    seen whole: a model's ``hidden_states[:, slice]`` before its head is a view of it), or None."""
    outputs: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (data_ptr, shape)
    read: list[tuple[int, tuple[int, ...]]] = []

    def record(name: str):
        def hook(module, args, out):
            if isinstance(out, Tensor):
                outputs[name] = (out.data_ptr(), tuple(out.shape))
        return hook

    def head(module, args):
        if args and isinstance(args[0], Tensor):
            read.append((args[0].data_ptr(), tuple(args[0].shape)))

    hooks = [m.register_forward_hook(record(n)) for n, m in candidates.items()]
    hooks.append(model.get_output_embeddings().register_forward_pre_hook(head))
    _probe(model, hooks)
    fed = [n for n, out in outputs.items() if read and out == read[0]]
    return fed[0] if len(fed) == 1 else None


def norm_gain(norm: nn.Module, d_model: int) -> Tensor:
    """The elementwise gain ``[d_model]`` (fp32) that ``norm`` applies after normalising, read
    by running it rather than from its ``weight``: Gemma's RMSNorm scales by ``1 + weight``
    (``weight`` starts at zero), LayerNorm and RMSNorm by ``weight``.

    The probe ``x`` has mean zero and no zero entry, so LayerNorm's centring leaves it as it is
    and ``(norm(x) - norm(-x)) / 2`` cancels any bias: it is ``g * x / rms(x)`` for every
    LayerNorm / RMSNorm variant, and ``g`` follows (up to their ``eps``, relative 1e-10 here:
    ``x`` is large)."""
    signs = [1.0, -1.0] * (d_model // 2) if d_model % 2 == 0 else \
        [1.0, 1.0, -2.0] + [1.0, -1.0] * ((d_model - 3) // 2)
    weight = norm.weight
    x = 1e3 * torch.tensor(signs, dtype=torch.float32, device=weight.device)  # [d_model]
    with torch.no_grad():
        plus = norm(x.to(weight.dtype).view(1, 1, d_model)).float().view(d_model)
        minus = norm((-x).to(weight.dtype).view(1, 1, d_model)).float().view(d_model)
    rms = x.pow(2).mean().sqrt()
    return ((plus - minus) / (2 * x) * rms).detach()


def _top(logits: Tensor, top_k: int, largest: bool) -> tuple[list[int], list[float]]:
    values, ids = torch.topk(logits, min(top_k, logits.numel()), largest=largest)
    return ids.tolist(), values.tolist()


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A token as text: decoded, or, when it is part of a character (a byte-level BPE token
    that decodes to U+FFFD alone), the vocabulary's own spelling of it (``Ġ``-style bytes,
    ``<0xE2>``), so that distinct tokens stay distinct."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        raw = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(raw, str) and raw:
            return raw
    return text


def _as_components(components: Any) -> Mapping[str, Component]:
    """``components`` as ``{name: Component}``: a ``Shard`` gives its unit direction's factors
    (a 1-D target's ``(d,)`` as ``d``)."""
    if hasattr(components, "factors") and not isinstance(components, Mapping):  # a Shard
        return {name: f[0] if len(f) == 1 else f for name, f in components.factors().items()}
    if not isinstance(components, Mapping):
        raise TypeError(f"logit_lens: components must be a Shard or a {{parameter name: "
                        f"component}} mapping, not {type(components).__name__}")
    return components


def _matrix_layout(name: str, layers: Mapping[str, nn.Module],
                   experts: Mapping[str, StackedWriter]) -> tuple[tuple[int, ...], int] | None:
    """``(shape, output axis)`` of the matrix ``name`` names: a layer's weight, or one expert's
    matrix ``base[e]`` of a stacked writer; None for anything else."""
    if name in layers:
        layer = layers[name]
        return tuple(layer.weight.shape), layer_output_axis(layer)
    base, expert = parse_slice(name)
    if expert is not None and base in experts and expert < experts[base].n_experts:
        return experts[base].shape, experts[base].axis
    return None


def _is_zero(component: Component) -> bool:
    parts = component if isinstance(component, tuple) else (component,)
    return any(not bool(x.detach().any()) for x in parts)


def _check_layout(name: str, component: Component, shape: tuple[int, ...]) -> None:
    """A matrix component must be laid out as its parameter: ``shape``, or ``(U [m, r],
    V [n, r])`` with ``(m, n) == shape``; else it was taken from another matrix."""
    if isinstance(component, tuple):
        got = tuple(x.shape[0] for x in component) if len(component) == 2 else None
        what = f"factors of shapes {[tuple(x.shape) for x in component]}"
    else:
        got, what = tuple(component.shape), f"shape {tuple(component.shape)}"
    if got != shape:
        raise ValueError(
            f"logit_lens: component {name!r} has {what} but the parameter has shape {shape}: "
            "give it laid out as the parameter (dense, or (U [m, r], V [n, r]) with U V^T of "
            "the parameter's shape)")


def logit_lens(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    components: Mapping[str, Component],
    top_k: int = 10,
    writers: Collection[str] | None = None,
    final_norm: Tensor | None = None,
    rtol: float = 1e-6,
    post_norms: Mapping[str, Tensor] | None = None,
) -> list[LensResult]:
    """Promoted and suppressed tokens of every write direction of a shard's writer components.

    ``components`` maps parameter names to the shard's component there, laid out as the
    parameter (see ``Component``). ``writers`` (exact names or globs) says which targets write to
    the residual stream; by default ``writer_targets(model)``. Other names are skipped (logged at
    INFO; ``split_writers`` returns them). A writer matrix is read on its write side, found from
    its layer's type (``write_side``; a writer that is not the weight of an ``nn.Linear`` or
    ``Conv1D`` is an error). Each writer target gives one ``LensResult`` per singular direction
    above ``rtol * largest``, in order of singular value. ``final_norm`` overrides the final norm's
    gain (``norm_gain`` of ``find_final_norm``). ``post_norms`` maps writer weight names to the
    gain ``[d_model]`` of the norm their output passes through before the residual add (its bias
    shares it); by default it is measured (``writer_post_norms``, ``norm_gain``), empty for
    pre-norm models. See the module docstring for the sign convention and the skipped
    normalisation.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"logit_lens: top_k={top_k!r} must be a positive int (tokens listed "
                         "per direction and sign)")
    components = _as_components(components)
    if writers is None:
        writers = writer_targets(model)
    chosen, skipped = split_writers(list(components), writers)
    if not chosen:
        raise ValueError(
            f"no component targets a residual-stream writer: got {list(components)}; the "
            f"model's writers are {few_names(writers)} (the attention and MLP output "
            "projections, e.g. 'model.layers.0.mlp.down_proj.weight'), or pass writers=[...]"
        )
    if skipped:
        logger.info("logit_lens: skipping non-writer targets %s", skipped)
    layers = matrix_layers(model)
    experts = stacked_writers(model)
    unembed = model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    d_model = unembed.shape[1]
    if final_norm is None:
        final_norm = norm_gain(find_final_norm(model), d_model)
    gain = final_norm.detach().to(unembed)  # [d_model]
    if post_norms is None:
        weights = [n for n in writers if isinstance(n, str) and n.endswith(".weight")] \
            if not any(c in n for n in writers for c in "*?[") else None
        post_norms = {n: norm_gain(norm, d_model)
                      for n, norm in writer_post_norms(model, weights).items()}
    results = []
    if all(_is_zero(components[name]) for name in chosen):
        raise ValueError(
            "logit_lens: every writer component is all zeros, so nothing is written (a shard "
            "that never fired, given as shard.dense(), which scales it by its typical "
            "activation: give the Shard itself, or shard.dense(scaled=False))")
    for name in chosen:
        component = components[name]
        layout = _matrix_layout(name, layers, experts)  # (shape, output axis) or None
        if not (isinstance(component, Tensor) and component.ndim == 1):
            if layout is None:
                raise ValueError(
                    f"logit_lens: writer {name!r} is not the weight of an nn.Linear or Conv1D "
                    f"layer of {type(model).__name__} nor one expert of a stacked writer "
                    f"('...experts.down_proj[3]'), so its write side is unknown; matrix "
                    f"weights include {few_names(layers)}"
                )
            _check_layout(name, component, layout[0])
            component = write_side(component, layout[1])
        left, s = write_directions(component, rtol)  # [d_model, k], [k]
        if left.shape[0] != d_model:
            raise ValueError(
                f"logit_lens: component {name!r} writes vectors of size {left.shape[0]} but the "
                f"model's d_model is {d_model}; give it laid out as the parameter "
                f"({layout[0] if layout else '[d_model]'})"
            )
        post = post_norms.get(name.removesuffix(".bias") + ".weight"
                              if name.endswith(".bias") else name)
        scale = gain if post is None else gain * post.detach().to(unembed)  # [d_model]
        logits = unembed @ (scale[:, None] * left.to(unembed))  # [vocab, k]
        for j in range(left.shape[1]):
            (up, up_v), (down, down_v) = (_top(logits[:, j], top_k, largest)
                                          for largest in (True, False))
            results.append(
                LensResult(
                    target=name,
                    index=j,
                    singular_value=float(s[j]),
                    promoted=[(token_text(tokenizer, i), v) for i, v in zip(up, up_v)],
                    suppressed=[(token_text(tokenizer, i), v) for i, v in zip(down, down_v)],
                    direction=left[:, j].cpu(),
                    promoted_ids=tuple(up),
                    suppressed_ids=tuple(down),
                )
            )
    return results
