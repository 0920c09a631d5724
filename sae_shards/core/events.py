"""Per-event samples in factored form: the gradient of one reinforcement event, never dense.

For a matrix target of shape ``(m, n)`` one event's sample is a pair of factors

    L [T, m], R [T, n],   meaning   X = L^T R = sum_t l_t r_t^T   ([m, n]),

stored side by side as one tensor ``[..., T, m + n]`` (``L = x[..., :m]``, ``R = x[..., m:]``).
For ``nn.Linear`` (weight ``[out, in]``) ``l_t`` is the gradient at the module's output and
``r_t`` its input at position ``t``; for GPT-2's ``Conv1D`` (weight ``[in, out]``) the roles swap.
Rows that are all zero are padding (an event with fewer than ``T`` positions): they add nothing.
1-D targets (biases, norms) keep plain dense vectors ``[..., m]``.

Everything here is a pure function of tensors; shapes are named in the comments.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from sae_shards.core.targets import TargetSpec


def split(x: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``(L [..., T, m], R [..., T, n])`` views of a factored sample ``[..., T, m + n]``."""
    return x[..., :m], x[..., m:]


def join(L: Tensor, R: Tensor) -> Tensor:
    """``[..., T, m + n]`` from ``L [..., T, m]`` and ``R [..., T, n]``."""
    return torch.cat([L, R], dim=-1)


def factored_width(spec: TargetSpec) -> int:
    """Last dimension of a factored matrix sample of ``spec``: ``m + n``."""
    m, n = spec.shape
    return m + n


def slot_shape(spec: TargetSpec, rank: int | None) -> tuple[int, ...]:
    """Storage shape of one sample of ``spec``: dense ``spec.shape`` when ``rank`` is None (per-step
    samples, and 1-D targets always), else ``(min(rank, m, n), m + n)``: an ``m x n`` matrix has
    rank at most ``min(m, n)``, so more rows would never be needed (``truncate`` to that many rows
    is exact)."""
    if rank is None or not spec.is_matrix:
        return spec.shape
    return (min(rank, *spec.shape), factored_width(spec))


def materialize(x: Tensor, spec: TargetSpec) -> Tensor:
    """Dense ``[..., m, n]`` of factored ``[..., T, m + n]`` (1-D targets: unchanged).

    Costs ``T m n`` per sample and an ``m x n`` tensor: for tests, references and small analyses.
    """
    if not spec.is_matrix:
        return x
    L, R = split(x, spec.shape[0])
    return L.transpose(-1, -2) @ R


def materialize_all(x: Mapping[str, Tensor], targets: Sequence[TargetSpec]) -> dict[str, Tensor]:
    """``{target: dense [..., *shape]}`` of a (batch of) factored sample(s)."""
    return {t.name: materialize(x[t.name], t) for t in targets}


def sq_norm(x: Tensor, spec: TargetSpec) -> Tensor:
    """``||X||_F^2`` per sample, ``[...]``, from ``T x T`` Gram products:
    ``||L^T R||^2 = sum((L L^T) * (R R^T))``. Vectors: ``sum(x^2)``."""
    if not spec.is_matrix:
        return x.pow(2).sum(-1)
    L, R = split(x, spec.shape[0])
    gl = L @ L.transpose(-1, -2)  # [..., T, T]
    gr = R @ R.transpose(-1, -2)  # [..., T, T]
    return (gl * gr).sum((-1, -2))


def sq_norms(x: Mapping[str, Tensor], targets: Sequence[TargetSpec]) -> Tensor:
    """``||X_b||^2`` over all targets, ``[batch]`` (inf/NaN for a row with such an entry)."""
    return sum(sq_norm(x[t.name], t) for t in targets)


def scale(x: Tensor, spec: TargetSpec, factor: Tensor | float) -> Tensor:
    """The sample times ``factor`` (a scalar or ``[batch]``): only ``R`` is scaled for matrices,
    since scaling both factors would scale ``X`` by ``factor**2``."""
    f = torch.as_tensor(factor, dtype=x.dtype, device=x.device)
    if not spec.is_matrix:
        return x * (f[..., None] if f.ndim else f)
    m = spec.shape[0]
    fr = f[..., None, None] if f.ndim else f
    return torch.cat([x[..., :m], x[..., m:] * fr], dim=-1)


class Truncated(NamedTuple):
    L: Tensor  # [rank, m] (zero rows past the kept rank)
    R: Tensor  # [rank, n]
    kept: float  # fraction of ||L^T R||^2 kept (1.0 when nothing was cut, or X = 0)


def truncate(L: Tensor, R: Tensor, rank: int) -> Truncated:
    """The best rank-``rank`` approximation of ``X = L^T R`` (``L [T, m]``, ``R [T, n]``), as factors
    padded with zero rows to exactly ``rank`` rows: ``L``'s rows carry the singular values
    (``S_k U_k^T``, descending), ``R``'s are orthonormal right singular vectors (``W_k^T``).

    Computed in float64, returned in ``L``'s dtype, by the cheaper of two routes on CPU
    (``scripts/bench_truncate.py``):

    - ``T < min(m, n)`` (few rows): ``X`` is never formed. QR of both factors' transposes
      (``L^T = Q_l C_l``, ``R^T = Q_r C_r``), SVD of the small core ``C_l C_r^T = U S W^T``, then
      ``X ~ (Q_l U_k S_k)(Q_r W_k)^T``; cost ``O(T^2 (m + n))`` (``_truncate_core``).
    - ``T >= min(m, n)``: the core would be as large as ``X``, so ``X`` is formed (one GEMM), the
      top eigenvectors of its smaller Gram matrix span the kept subspace, and an SVD of ``X``'s
      ``k``-column projection onto them gives the factors; cost ``O(T m n + m n min(m, n))``,
      2-5x less than two QRs and an SVD there (``_truncate_dense``).

    With ``T <= rank`` the factors are only zero-padded (nothing is lost, no rounding); with
    ``min(m, n) <= rank`` the matrix itself is kept (``_exact_small``, exact up to fp32 rounding
    of one GEMM). Non-finite factors give NaN rows and ``kept`` NaN, not an error: the capture
    counts and skips such an event (``n_nonfinite``).
    """
    T, m = L.shape
    n = R.shape[1]
    if rank < 1:
        raise ValueError(f"capture.event_rank={rank} must be >= 1")
    if T <= rank:
        pad_l = L.new_zeros(rank - T, m)
        pad_r = R.new_zeros(rank - T, n)
        return Truncated(torch.cat([L, pad_l]), torch.cat([R, pad_r]), 1.0)
    if min(m, n) <= rank:  # X has rank <= min(m, n): exact as X itself beside an identity
        return _exact_small(L, R, rank)
    if not bool(torch.isfinite(L).all() & torch.isfinite(R).all()):  # one host sync
        return Truncated(L.new_full((rank, m), math.nan), R.new_full((rank, n), math.nan),
                         math.nan)
    Lk, Rk, kept = (_truncate_dense if T >= min(m, n) else _truncate_core)(
        L.double(), R.double(), rank)
    k = Lk.shape[0]
    out_l = L.new_zeros(rank, m)
    out_r = R.new_zeros(rank, n)
    out_l[:k] = Lk.to(L.dtype)
    out_r[:k] = Rk.to(R.dtype)
    return Truncated(out_l, out_r, kept)


def _truncate_core(L: Tensor, R: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``truncate``'s route for few rows (float64 ``L [T, m]``, ``R [T, n]``): ``(S_k U_k^T [k, m],
    W_k^T [k, n], kept)`` from QRs of the factors and the SVD of their ``[q, q']`` core."""
    Ql, Cl = torch.linalg.qr(L.T)  # [m, q], [q, T]
    Qr, Cr = torch.linalg.qr(R.T)  # [n, q'], [q', T]
    U, S, Wh = torch.linalg.svd(Cl @ Cr.T, full_matrices=False)  # [q, s], [s], [s, q']
    k = min(rank, S.numel())
    total = float(S.pow(2).sum())
    kept = float(S[:k].pow(2).sum()) / total if total > 0 else 1.0
    return (Ql @ (U[:, :k] * S[:k])).T, (Qr @ Wh[:k].T).T, kept


def _truncate_dense(L: Tensor, R: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``truncate``'s route for many rows (float64 ``L [T, m]``, ``R [T, n]``, ``rank <
    min(m, n)``): the same ``(S_k U_k^T, W_k^T, kept)``. The top ``rank`` eigenvectors of the
    smaller of ``X X^T`` and ``X^T X`` span the kept subspace (to fp64 rounding of the Gram,
    whose condition is squared); ``X`` projected onto them is a ``k``-column matrix whose SVD
    gives singular values in order and orthonormal ``R`` rows, at ``O(k^2 max(m, n))``."""
    X = L.T @ R  # [m, n]
    total = float(X.pow(2).sum())
    if total == 0:
        return X.new_zeros(0, X.shape[0]), X.new_zeros(0, X.shape[1]), 1.0
    if X.shape[1] <= X.shape[0]:  # right subspace W [n, k] from X^T X [n, n]
        W = torch.linalg.eigh(X.T @ X).eigenvectors[:, -rank:]
        Up, S, Vh = torch.linalg.svd(X @ W, full_matrices=False)  # [m, k], [k], [k, k]
        Lk, Rk = (Up * S).T, Vh @ W.T  # X ~ Up S (W Vh^T)^T
    else:  # left subspace U [m, k] from X X^T [m, m]
        U = torch.linalg.eigh(X @ X.T).eigenvectors[:, -rank:]
        Up, S, Rk = torch.linalg.svd(U.T @ X, full_matrices=False)  # [k, k], [k], [k, n]
        Lk = (U @ (Up * S)).T  # X ~ (U Up) S Rk
    return Lk, Rk, min(1.0, float(S.pow(2).sum()) / total)


def check_event_batch(batch: Mapping[str, Tensor], targets: Sequence[TargetSpec]) -> int:
    """Check names and shapes of a batch of factored samples; return the batch size.

    Matrix targets ``[batch, T, m + n]`` (any ``T >= 1``), 1-D targets ``[batch, m]``. Raises
    ``ValueError`` naming the target and the expected shape on any mismatch.
    """
    names = {t.name for t in targets}
    missing, extra = sorted(names - set(batch)), sorted(set(batch) - names)
    if missing or extra:
        raise ValueError(
            f"sample targets do not match the SAE's: missing {missing[:5]}, unexpected {extra[:5]}")
    sizes = set()
    for t in targets:
        got = tuple(batch[t.name].shape)
        if t.is_matrix:
            ok = len(got) == 3 and got[1] >= 1 and got[2] == factored_width(t)
            want = f"[batch, T, {factored_width(t)}] (factors L [T, {t.shape[0]}], " \
                   f"R [T, {t.shape[1]}] of a {t.shape} target)"
        else:
            ok = len(got) == 2 and got[1:] == t.shape
            want = f"[batch, {t.shape[0]}]"
        if not ok:
            raise ValueError(f"target {t.name!r}: factored sample batch has shape {got}, the SAE "
                             f"expects {want}")
        sizes.add(got[0])
    if len(sizes) != 1:
        raise ValueError(f"targets disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def _exact_small(L: Tensor, R: Tensor, rank: int) -> Truncated:
    """``X = L^T R`` when ``min(m, n) <= rank``: ``(I_m, X)`` or ``(X^T, I_n)``, zero-padded to
    ``rank`` rows; costs ``T m n`` (one GEMM), far less than either route of ``truncate``."""
    m, n = L.shape[1], R.shape[1]
    X = L.T @ R  # [m, n]
    if m <= n:
        left, right = torch.eye(m, dtype=L.dtype, device=L.device), X
    else:
        left, right = X.T, torch.eye(n, dtype=R.dtype, device=R.device)
    k = left.shape[0]
    return Truncated(torch.cat([left, L.new_zeros(rank - k, m)]),
                     torch.cat([right, R.new_zeros(rank - k, n)]), 1.0)
