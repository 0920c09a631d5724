"""``events.truncate``: the best rank-k factors of ``X = L^T R`` without an SVD of ``X``, on both of
its routes (few rows: QR of the factors and an SVD of the core; many rows: the eigenvectors of
``X``'s smaller Gram matrix), each against ``torch.linalg.svd`` of the dense ``X`` in float64,
and which route ``truncate`` takes."""

import math

import pytest
import torch

from sae_shards.core import events

RANK = 4
ROUTES = {"core": events._truncate_core, "dense": events._truncate_dense}


def _factors(T, m, n, spectrum, seed=0):
    """``L [T, m]``, ``R [T, n]`` (float64) whose product has exactly the singular values
    ``spectrum`` (then zeros), with random singular vectors spread over all ``T`` rows."""
    g = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    W = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    mix = torch.linalg.qr(torch.randn(T, k, generator=g, dtype=torch.float64))[0]  # [T, k]
    S = torch.tensor(spectrum, dtype=torch.float64)
    return mix @ (U * S).T, mix @ W.T  # L^T R = U S W^T


def _check(Lk, Rk, kept, X, rank):
    U, S, Wh = torch.linalg.svd(X, full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Wh[:rank]
    k = Lk.shape[0]
    torch.testing.assert_close(Lk.T @ Rk, best, rtol=0, atol=1e-10 * float(S[0]))
    assert kept == pytest.approx(float(S[:rank].pow(2).sum() / S.pow(2).sum()), rel=1e-10)
    # L's rows carry the singular values in order (the dense route resolves values down to
    # ~1e-9 of the largest, far below the fp32 the events are stored in); R's rows are orthonormal
    torch.testing.assert_close(Lk.norm(dim=1), S[:k], rtol=1e-9, atol=1e-9 * float(S[0]))
    torch.testing.assert_close(Rk @ Rk.T, torch.eye(k, dtype=Rk.dtype), rtol=0, atol=1e-9)


SPECTRA = {"decaying": [0.7 ** i for i in range(10)],
           "steep": [1.0, 0.5, 0.25, 1e-6, 1e-10, 1e-12],
           "tiny": [1.0, 0.5, 1e-10],  # a kept direction below what the Gram resolves
           "deficient": [3.0, 1.0]}  # rank 2 < RANK: two kept directions hold nothing


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("m,n", [(24, 32), (32, 24), (24, 24)])
@pytest.mark.parametrize("spectrum", SPECTRA)
def test_each_route_is_the_best_rank_k_approximation(route, m, n, spectrum):
    L, R = _factors(40, m, n, SPECTRA[spectrum])
    _check(*ROUTES[route](L, R, RANK), L.T @ R, RANK)


@pytest.mark.parametrize("T,m,n,route", [(10, 24, 32, "core"), (23, 32, 24, "core"),
                                         (24, 32, 24, "dense"), (40, 24, 32, "dense")])
def test_truncate_takes_the_cheaper_route_and_pads_to_rank(T, m, n, route, monkeypatch):
    taken = []
    for name, fn in ROUTES.items():
        monkeypatch.setattr(events, f"_truncate_{name}",
                            lambda *a, _n=name, _f=fn: taken.append(_n) or _f(*a))
    L, R = _factors(T, m, n, SPECTRA["deficient"])
    cut = events.truncate(L.float(), R.float(), RANK)
    assert taken == [route]
    assert cut.L.shape == (RANK, m) and cut.R.shape == (RANK, n) and cut.L.dtype == torch.float32
    torch.testing.assert_close(cut.L.T @ cut.R, (L.T @ R).float(), rtol=1e-5, atol=1e-5)
    assert cut.kept == pytest.approx(1.0, abs=1e-6)


def test_zero_and_non_finite_events():
    zero = events.truncate(torch.zeros(40, 24), torch.zeros(40, 32), RANK)
    assert zero.kept == 1.0 and not zero.L.any() and zero.R.shape == (RANK, 32)
    # few rows (T = 6 < min(m, n)): the QR-core route, whose zero event keeps all of nothing too
    few = events.truncate(torch.zeros(6, 24), torch.zeros(6, 32), RANK)
    assert few.kept == 1.0 and not few.L.any() and few.R.shape == (RANK, 32)
    L, R = _factors(40, 24, 32, SPECTRA["decaying"])
    L[3, 5] = math.nan  # a NaN gradient: passed on for the capture to count and skip
    bad = events.truncate(L.float(), R.float(), RANK)
    assert math.isnan(bad.kept) and bad.L.isnan().all() and bad.L.shape == (RANK, 24)
