"""Preconditioning and unit normalisation of factored per-event samples (event_precondition).

Every check materialises the factored result (``L^T R``) and compares it with the dense
elementwise / matrix computation done independently here.
"""

import math

import pytest
import torch

from sae_shards.capture.event_precondition import (
    EventPreconditioner,
    adam_approx_error,
    adam_scales,
    normalize_unit,
)
from sae_shards.capture.selection import LoraTarget
from sae_shards.core import events
from sae_shards.core.targets import TargetSpec

M, N, T = 5, 4, 3
W = TargetSpec("w", (M, N), rank=2)
B = TargetSpec("b", (M,))


def factors(seed: int = 0, t: int = T) -> dict[str, torch.Tensor]:
    """One event: ``w`` as ``[t, M + N]`` factors, ``b`` dense ``[M]``."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(t, M + N, generator=g), "b": torch.randn(M, generator=g)}


def params() -> dict[str, torch.nn.Parameter]:
    return {"w": torch.nn.Parameter(torch.zeros(M, N)), "b": torch.nn.Parameter(torch.zeros(M))}


def adam_with_state(ps, v_of, step, beta2, eps, **kw):
    """An AdamW over ``ps`` whose state is set to ``exp_avg_sq = v_of[name]`` at ``step``."""
    opt = torch.optim.AdamW(list(ps.values()), betas=(0.9, beta2), eps=eps, **kw)
    for p in ps.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in ps.items():
        opt.state[p]["exp_avg_sq"].copy_(v_of[name])
        opt.state[p]["step"].fill_(step)
    return opt


def exact_adam(X, v, step, beta2, eps):
    return X / ((v / (1 - beta2**step)).sqrt() + eps)


# ---- adam -------------------------------------------------------------------------------------


def test_adam_rank_one_v_is_exact():
    g = torch.Generator().manual_seed(1)
    u, w = torch.rand(M, generator=g) + 0.1, torch.rand(N, generator=g) + 0.1
    v = {"w": torch.outer(u, w), "b": torch.rand(M, generator=g)}  # rank one: r c^T / mean = v
    step, beta2, eps = 3, 0.99, 1e-12
    pre = EventPreconditioner("adam", params(), [W, B])
    pre.bind_optimizer(adam_with_state(pre.targets, v, step, beta2, eps))
    x = factors()
    out = pre.apply(x)
    got = events.materialize(out["w"], W)
    want = exact_adam(events.materialize(x["w"], W), v["w"], step, beta2, eps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["b"], exact_adam(x["b"], v["b"], step, beta2, eps))
    assert pre.approx_error(x)["w"] < 1e-5
    assert out["w"] is not x["w"] and torch.equal(x["w"], factors()["w"])  # inputs untouched


def independent_error(X, v, step, beta2, eps):
    """The documented approximation written out elementwise, in float64."""
    X, vh = X.double(), v.double() / (1 - beta2**step)
    mu = vh.mean()
    denom = torch.empty_like(vh)
    for i in range(vh.shape[0]):
        for j in range(vh.shape[1]):
            p2 = vh[i].mean() / mu.sqrt()
            q2 = vh[:, j].mean() / mu.sqrt()
            denom[i, j] = math.sqrt((p2 + eps) * (q2 + eps))
    exact = X / (vh.sqrt() + eps)
    return float((X / denom - exact).norm() / exact.norm())


def test_adam_approx_error_general_v():
    g = torch.Generator().manual_seed(2)
    v = {"w": torch.rand(M, N, generator=g) ** 3 * 1e-4, "b": torch.rand(M, generator=g)}
    step, beta2, eps = 5, 0.95, 1e-3
    pre = EventPreconditioner("adam", params(), [W, B])
    pre.bind_optimizer(adam_with_state(pre.targets, v, step, beta2, eps))
    x = factors()
    X = events.materialize(x["w"], W)
    want = independent_error(X, v["w"], step, beta2, eps)
    err = pre.approx_error(x)
    assert set(err) == {"w"} and want > 1e-3
    assert err["w"] == pytest.approx(want, rel=1e-6)
    L, R = events.split(x["w"], M)
    assert adam_approx_error(L, R, v["w"], step, beta2, eps) == pytest.approx(want, rel=1e-6)
    # and apply is that approximation
    a, b = adam_scales(v["w"], step, beta2, eps)
    torch.testing.assert_close(events.materialize(pre.apply(x)["w"], W), a[:, None] * X * b)


def test_adam_zero_v_divides_by_eps():
    a, b = adam_scales(torch.zeros(M, N), 2, 0.999, 1e-8)
    torch.testing.assert_close(torch.outer(a, b), torch.full((M, N), 1e8))


class Wrapped:
    """Stands in for accelerate's AcceleratedOptimizer (holds the torch optimizer as .optimizer)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_adam_reads_real_adamw_state():
    torch.manual_seed(0)
    layer = torch.nn.Linear(N, M)  # weight [M, N] = [out, in]
    beta2, eps, steps = 0.9, 1e-6, 3
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, betas=(0.8, beta2), eps=eps)
    v = {"w": torch.zeros(M, N), "b": torch.zeros(M)}  # tracked here, independently of torch
    for _ in range(steps):
        opt.zero_grad()
        layer(torch.randn(7, N)).pow(2).sum().backward()
        for name, p in (("w", layer.weight), ("b", layer.bias)):
            v[name] = beta2 * v[name] + (1 - beta2) * p.grad**2
        opt.step()
    pre = EventPreconditioner("adam", {"w": layer.weight, "b": layer.bias}, [W, B])
    pre.bind_optimizer(Wrapped(opt))
    x = factors()
    out = pre.apply(x)
    torch.testing.assert_close(out["b"], exact_adam(x["b"], v["b"], steps, beta2, eps))
    vh = v["w"] / (1 - beta2**steps)  # bias-corrected with t = 3
    mu = vh.mean()
    a = (vh.mean(1) / mu.sqrt() + eps).rsqrt()
    b = (vh.mean(0) / mu.sqrt() + eps).rsqrt()
    X = events.materialize(x["w"], W)
    torch.testing.assert_close(events.materialize(out["w"], W), a[:, None] * X * b)


def test_adam_rejects_lora_other_optimizers_amsgrad_and_missing_targets():
    lora = LoraTarget(torch.nn.Linear(N, M), "default")
    with pytest.raises(ValueError, match="precondition=adam is not supported for LoRA"):
        EventPreconditioner("adam", {"w": lora}, [W])
    EventPreconditioner("kfac", {"w": lora}, [W])  # fine for the other kinds
    ps = params()
    pre = EventPreconditioner("adam", ps, [W, B])
    with pytest.raises(ValueError, match="needs torch.optim.Adam or AdamW.*SGD"):
        pre.bind_optimizer(torch.optim.SGD(ps.values(), lr=0.1))
    with pytest.raises(ValueError, match="amsgrad"):
        pre.bind_optimizer(torch.optim.Adam(ps.values(), amsgrad=True))
    with pytest.raises(ValueError, match="'b' is not in any param group"):
        pre.bind_optimizer(torch.optim.Adam([ps["w"]]))
    pre.bind_optimizer(torch.optim.Adam(ps.values()))
    with pytest.raises(ValueError, match="no Adam state"):
        pre.apply(factors())  # before the optimizer's first step


# ---- kfac -------------------------------------------------------------------------------------


def inverse_root(S, damping):
    """``(S + damping * trace(S)/k I)^-1/2`` by SVD (S is symmetric positive definite here)."""
    k = S.shape[0]
    Md = S.double() + damping * torch.trace(S.double()) / k * torch.eye(k, dtype=torch.float64)
    U, s, _ = torch.linalg.svd(Md)
    P = U @ torch.diag(s.rsqrt()) @ U.T
    torch.testing.assert_close(P @ Md @ P, torch.eye(k, dtype=torch.float64))
    return P.float()


def sums(seed, count):
    g = torch.Generator().manual_seed(seed)
    Gl, Gr = torch.randn(count, M, generator=g), torch.randn(count, N, generator=g)
    return Gl.T @ Gl, Gr.T @ Gr, count


def test_kfac_matches_materialised_with_ema_and_damping():
    damping, ema = 0.1, 0.7
    pre = EventPreconditioner(
        "kfac", params(), [W, B], kfac_damping=damping, kfac_ema=ema, kfac_update_every=1
    )
    S_l = S_r = None
    for step, count in enumerate([9, 0, 6, 11]):
        sl, sr, c = sums(step, count)
        pre.observe({"w": (sl, sr, c)})
        if c:  # a step without positions changes nothing
            S_l = sl / c if S_l is None else ema * S_l + (1 - ema) * sl / c
            S_r = sr / c if S_r is None else ema * S_r + (1 - ema) * sr / c
    x = factors()
    out = pre.apply(x)
    want = inverse_root(S_l, damping) @ events.materialize(x["w"], W) @ inverse_root(S_r, damping)
    torch.testing.assert_close(events.materialize(out["w"], W), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(out["b"], x["b"]) and out["b"] is not x["b"]  # 1-D: unchanged


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_kfac_output_whitens_the_output_gradient_side_only(layout):
    """Linear weights ([out, in]) keep output gradients in L, Conv1D ones ([in, out]) in R: only
    that side is whitened, the other is left raw; resume state round-trips with one root."""
    damping = 0.1
    pre = EventPreconditioner("kfac_output", params(), [W, B], kfac_damping=damping,
                              kfac_update_every=1)
    pre.bind_layouts({"w": layout})
    sl, sr, c = sums(0, 9)
    pre.observe({"w": (sl, sr, c)})
    x = factors()
    X = events.materialize(x["w"], W)
    want = (inverse_root(sl / c, damping) @ X if layout == "out_in"
            else X @ inverse_root(sr / c, damping))
    got = events.materialize(pre.apply(x)["w"], W)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert pre.root_updates == 1
    again = EventPreconditioner("kfac_output", params(), [W, B])
    again.bind_layouts({"w": layout})
    again.load_state_tensors(pre.state_tensors())
    torch.testing.assert_close(events.materialize(again.apply(x)["w"], W), got)
    with pytest.raises(ValueError, match="unknown weight layout"):
        pre.bind_layouts({"w": "rows"})


def test_kfac_identity_covariances_only_damp():
    damping = 1e-3
    pre = EventPreconditioner("kfac", params(), [W, B], kfac_damping=damping)
    pre.observe({"w": (torch.eye(M) * 4, torch.eye(N) * 4, 4)})  # covariances I
    x = factors()
    got = events.materialize(pre.apply(x)["w"], W)
    torch.testing.assert_close(got, events.materialize(x["w"], W) / (1 + damping))


def test_kfac_inverse_roots_recomputed_every_update_every_steps():
    every, ema, damping = 3, 0.5, 1e-2
    pre = EventPreconditioner(
        "kfac", params(), [W, B], kfac_damping=damping, kfac_ema=ema, kfac_update_every=every
    )
    x = factors()
    X = events.materialize(x["w"], W)
    S_l = S_r = None
    roots = None
    for step in range(1, 8):
        sl, sr, c = sums(step, 8)
        pre.observe({"w": (sl, sr, c)})
        S_l = sl / c if S_l is None else ema * S_l + (1 - ema) * sl / c
        S_r = sr / c if S_r is None else ema * S_r + (1 - ema) * sr / c
        if step in (1, 4, 7):
            roots = inverse_root(S_l, damping), inverse_root(S_r, damping)
        got = events.materialize(pre.apply(x)["w"], W)
        torch.testing.assert_close(got, roots[0] @ X @ roots[1], rtol=1e-4, atol=1e-5)
    assert pre.root_updates == 2 * 3


def test_kfac_errors():
    pre = EventPreconditioner("kfac", params(), [W, B])
    with pytest.raises(ValueError, match="no covariances for 'w'"):
        pre.apply(factors())
    with pytest.raises(ValueError, match=r"need \(5, 5\) and \(4, 4\)"):
        pre.observe({"w": (torch.eye(N), torch.eye(M), 1)})  # sides swapped
    with pytest.raises(ValueError, match="not a matrix target"):
        pre.observe({"b": (torch.eye(M), torch.eye(M), 1)})
    with pytest.raises(ValueError, match="kfac_damping"):
        EventPreconditioner("kfac", params(), [W], kfac_damping=0)
    with pytest.raises(ValueError, match="must be one of"):
        EventPreconditioner("shampoo", params(), [W])


def test_none_returns_the_same_tensors():
    pre = EventPreconditioner("none", params(), [W, B])
    x = factors()
    out = pre.apply(x)
    assert out is not x and all(out[k] is x[k] for k in x)
    assert pre.approx_error(x) == {}


# ---- unit normalisation -----------------------------------------------------------------------


def test_normalize_unit_over_all_targets_scales_x_by_one_over_norm():
    x = factors(3)
    dense = events.materialize_all(x, [W, B])
    norm_want = math.sqrt(sum(float(d.pow(2).sum()) for d in dense.values()))
    out, norm = normalize_unit(x, [W, B])
    assert norm == pytest.approx(norm_want, rel=1e-6)
    got = events.materialize_all(out, [W, B])
    assert math.sqrt(sum(float(d.pow(2).sum()) for d in got.values())) == pytest.approx(1, 1e-6)
    # X itself scaled by exactly 1/norm (not 1/norm^2, as scaling both factors would give)
    torch.testing.assert_close(got["w"], dense["w"] / norm)
    torch.testing.assert_close(got["b"], dense["b"] / norm)
    assert torch.equal(out["w"][:, :M], x["w"][:, :M])  # L untouched, only R scaled


def test_normalize_unit_leaves_zero_event_alone():
    x = {"w": torch.zeros(T, M + N), "b": torch.zeros(M)}
    out, norm = normalize_unit(x, [W, B])
    assert norm == 0 and all(torch.equal(out[k], x[k]) for k in x)
