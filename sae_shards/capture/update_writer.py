"""The capture's hot path: the fp32 snapshot, and ``theta_after - theta_before`` written into a
buffer slot with the sample's norm taken on the way (no second pass over memory, one host sync
per sample). ``DeltaCapture`` calls these; LoRA targets get their effective dense delta."""

from __future__ import annotations

import math

import torch

from sae_shards.capture.buffer import DeltaRingBuffer
from sae_shards.capture.selection import LoraTarget, Target


def target_params(target: Target) -> tuple[torch.nn.Parameter, ...]:
    return (target.A, target.B) if isinstance(target, LoraTarget) else (target,)


def alloc_snapshot(target: Target, buffer: DeltaRingBuffer) -> tuple[torch.Tensor, ...]:
    """fp32 copies of the target's parameters, plus an fp32 scratch for the delta when needed.

    Dense: ``(theta,)`` [*shape]; the delta is computed in place of the snapshot unless it can be
    written straight into an fp32 slot on the same device. LoRA: ``(A0 [r, in], B0 [out, r],
    A1 [r, in] fp32 copy or None, scratch [out, in] or None)``.
    """
    direct = buffer.dtype == torch.float32
    if isinstance(target, LoraTarget):
        A, B = target.A, target.B
        direct = direct and B.device == buffer.device
        a1 = None if A.dtype == torch.float32 else torch.empty_like(A, dtype=torch.float32)
        out = None if direct else torch.empty(target.shape, dtype=torch.float32, device=B.device)
        a0 = torch.empty_like(A, dtype=torch.float32)
        b0 = torch.empty_like(B, dtype=torch.float32)
        return a0, b0, a1, out
    return (torch.empty_like(target, dtype=torch.float32),)


CHUNK = 1 << 16
"""Elements per piece of a sample written on CPU (256 KiB of fp32): each piece of the slot is read
back for the norm right after it is written, while it is still in the core's L2 cache, so the norm
and the finite check cost no second pass over memory."""


class SqNorm:
    """The squared Frobenius norm of one sample, accumulated piece by piece as 0-d fp32 tensors
    (no host sync until ``value``)."""

    def __init__(self) -> None:
        self.sq: list[torch.Tensor] = []  # sums of squares
        self.norms: list[torch.Tensor] = []  # norms (pieces not stored in fp32)

    def add(self, piece: torch.Tensor) -> None:
        """Add the written ``piece`` of a slot (read once, right after it was written)."""
        if piece.dtype == torch.float32:
            flat = piece.reshape(-1)
            self.sq.append(torch.dot(flat, flat))
        else:
            self.norms.append(torch.linalg.vector_norm(piece, dtype=torch.float32))

    def __bool__(self) -> bool:
        return bool(self.sq or self.norms)

    def value(self) -> float:
        """The norm (one host sync for all targets); nan/inf if an entry was."""
        sq = self.sq + [torch.stack(self.norms).square().sum()] if self.norms else self.sq
        return math.sqrt(torch.stack(sq).sum().item())


def pieces(*tensors: torch.Tensor):
    """Aligned flat pieces of ``CHUNK`` elements of same-numel tensors (CPU, all contiguous), or
    the tensors themselves once (CUDA, where one kernel per op is best, or a strided tensor)."""
    if all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return zip(*(t.view(-1).split(CHUNK) for t in tensors))
    return (tensors,)


def write_update(
    target: Target, snap: tuple[torch.Tensor, ...], view: torch.Tensor, norm: SqNorm
) -> None:
    """Write ``theta_after - theta_before`` (computed in fp32) into the slot ``view`` and add the
    written (stored-dtype) values to ``norm``, piece by piece (``pieces``)."""
    if isinstance(target, LoraTarget):
        write_lora_update(target, *snap, view, norm)
    elif view.dtype == torch.float32 and view.device == target.device:
        for t, s, v in pieces(target, snap[0], view):  # s may be v itself (the slot's snapshot)
            torch.sub(t, s, out=v)
            norm.add(v)
    else:
        for t, s, v in pieces(target, snap[0], view):
            torch.sub(t, s, out=s)  # theta_after - theta_before in fp32
            v.copy_(s)  # rounds to the storage dtype
            if s.device.type == v.device.type == "cpu":  # stored values back in fp32 (exact),
                # while hot: a dot is faster than a bf16 norm on CPU
                norm.add(s.copy_(v))
            else:
                norm.add(v)


def write_updates(items, norm: SqNorm) -> None:
    """``write_update`` for each ``(target, snap, view)``; small dense fp32 targets (at most
    ``CHUNK`` elements, slot on their device) go together through three ``torch._foreach_*``
    calls instead of a few ops each, which is most of the capture's cost on small models.
    Bit-identical: ``-(s - t)`` is ``t - s`` exactly in IEEE arithmetic."""
    small_t, small_v = [], []
    for target, snap, view in items:
        if (not isinstance(target, LoraTarget) and view.dtype == torch.float32
                and view.device == target.device and target.numel() <= CHUNK
                and snap[0] is view):  # the slot holds the snapshot: diff in place
            small_t.append(target.detach())
            small_v.append(view)
        else:
            write_update(target, snap, view, norm)
    if small_v:
        torch._foreach_sub_(small_v, small_t)  # snapshot - theta_after
        torch._foreach_neg_(small_v)
        norm.norms.extend(torch._foreach_norm(small_v))


def lora_update(a0: torch.Tensor, b0: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """``s * (B1 A1 - B0 A0)`` ``[out, in]`` from the factors before (``a0`` [r, in], ``b0``
    [out, r]) and after the step, evaluated as ``write_lora_update`` does (``s * (B0 dA + dB
    A1)``), into new memory: for factors gathered whole (ZeRO-3)."""
    return (b0 @ (a1 - a0)).addmm_(b1 - b0, a1).mul_(scaling)


def write_lora_update(
    target: LoraTarget,
    a0: torch.Tensor,  # [r, in] A before the step (overwritten)
    b0: torch.Tensor,  # [out, r] B before the step (overwritten)
    a1: torch.Tensor | None,  # [r, in] fp32 scratch, when A is not fp32
    out: torch.Tensor | None,  # [out, in] fp32 scratch, when the view cannot take it directly
    view: torch.Tensor,  # [out, in] the slot
    norm: SqNorm,
) -> None:
    """``s * (B1 A1 - B0 A0)``, evaluated as ``s * (B0 dA + dB A1)``: the same quantity without the
    cancellation of subtracting two nearly equal products (their difference is ~1e-3 of each)."""
    dense = view if out is None else out  # [out, in] fp32
    A1 = target.A if a1 is None else a1.copy_(target.A)
    d_a = a0.neg_().add_(A1)  # [r, in] = A1 - A0
    torch.matmul(b0, d_a, out=dense)  # B0 dA
    d_b = b0.neg_().add_(target.B)  # [out, r] = B1 - B0
    dense.addmm_(d_b, A1)  # + dB A1
    dense.mul_(target.scaling)
    for d, v in pieces(dense, view):
        if out is not None:
            v.copy_(d)
        norm.add(v)


def finite_norm(norm: SqNorm, views) -> float | None:
    """The sample's Frobenius norm from ``norm``, or None if any entry of ``views`` is nan/inf."""
    value = norm.value()
    if math.isfinite(value):
        return value
    # A non-finite norm means a nan/inf entry, or (rarely) an overflow of finite entries.
    if all(bool(torch.isfinite(v).all()) for v in views):
        return float("inf")
    return None
