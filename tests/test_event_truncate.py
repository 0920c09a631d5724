"""``events.truncate``: the best rank-k factors of ``X = L^T R`` without an SVD of ``X``, on both of
its routes (few rows: QR of the factors and an SVD of the core; many rows: the eigenvectors of
``X``'s smaller Gram matrix), against ``torch.linalg.svd`` of the dense ``X`` in float64."""

import pytest
import torch

from sae_shards.core import events

RANK = 4


def _factors(T, m, n, seed=0, decay=0.7):
    """``L [T, m]``, ``R [T, n]`` whose product has a decaying spectrum (distinct values: the
    top-k subspace is well defined)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(T, m, generator=g, dtype=torch.float64)
    R = torch.randn(T, n, generator=g, dtype=torch.float64)
    weights = decay ** torch.arange(T, dtype=torch.float64)
    return L * weights[:, None], R


@pytest.mark.parametrize("T,m,n", [(10, 24, 32), (10, 32, 24),  # core route (T < min(m, n))
                                   (40, 24, 32), (40, 32, 24), (24, 24, 24)])  # dense route
def test_truncate_is_the_best_rank_k_approximation(T, m, n):
    L, R = _factors(T, m, n)
    X = L.T @ R
    U, S, Wh = torch.linalg.svd(X, full_matrices=False)
    best = (U[:, :RANK] * S[:RANK]) @ Wh[:RANK]
    cut = events.truncate(L, R, RANK)
    assert cut.L.shape == (RANK, m) and cut.R.shape == (RANK, n) and cut.L.dtype == L.dtype
    torch.testing.assert_close(cut.L.T @ cut.R, best, rtol=0, atol=1e-10 * float(S[0]))
    assert cut.kept == pytest.approx(float(S[:RANK].pow(2).sum() / S.pow(2).sum()), rel=1e-10)
    # convention: L's rows carry the singular values, R's rows are orthonormal
    torch.testing.assert_close(cut.L.norm(dim=1), S[:RANK], rtol=1e-9, atol=0)
    torch.testing.assert_close(cut.R @ cut.R.T, torch.eye(RANK, dtype=L.dtype), rtol=0,
                               atol=1e-9)


def test_truncate_keeps_zero_rows_for_a_rank_deficient_product():
    """X of rank 2 cut to 4 rows (many-row route): the two extra rows add nothing, kept is 1."""
    L, R = _factors(40, 24, 32)
    L[:, 2:] = 0  # X's rows 2.. are zero: rank <= 2
    R = R @ torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0]
    X = L.T @ R
    cut = events.truncate(L, R, RANK)
    torch.testing.assert_close(cut.L.T @ cut.R, X, rtol=0, atol=1e-10 * float(X.norm()))
    assert cut.kept == pytest.approx(1.0, abs=1e-12)
    zero = events.truncate(torch.zeros(40, 24), torch.zeros(40, 32), RANK)
    assert zero.kept == 1.0 and not zero.L.any() and zero.R.shape == (RANK, 32)


def test_fp32_factors_come_back_fp32_and_close():
    L, R = _factors(40, 32, 24)
    cut = events.truncate(L.float(), R.float(), RANK)
    ref = events.truncate(L, R, RANK)
    assert cut.L.dtype == torch.float32
    torch.testing.assert_close((cut.L.T @ cut.R).double(), ref.L.T @ ref.R, rtol=1e-5, atol=1e-6)
