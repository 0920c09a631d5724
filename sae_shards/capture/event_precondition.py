"""Preconditioning and unit normalisation of per-event samples, keeping the factored form.

An event's sample on a matrix target ``(m, n)`` is ``X = L^T R`` (``L [T, m]``, ``R [T, n]``,
stored ``[T, m + n]``; see ``core.events``). Every preconditioner here is a pair of per-side maps,
``X' = P_l X P_r``, applied to the factors without forming ``X``:

    L' = L P_l^T,   R' = R P_r      (P_l [m, m] or diag(a), P_r [n, n] or diag(b)).

``capture.precondition``:

- ``none``: samples unchanged.
- ``adam``: Adam's elementwise ``1 / (sqrt(v_hat) + eps)``, ``v_hat = v / (1 - beta2^t)``, with
  ``v`` (``exp_avg_sq``) approximated Adafactor-style by its row and column means (``adam_scales``
  says how ``eps`` enters). Read from the optimizer after its step, so ``v_t`` includes the
  step's own gradient: the same denominator torch's Adam divided this step's update by. ``v`` has
  the parameter's shape, which is the target's ``(m, n)`` (GPT-2's Conv1D ``[in, out]`` too). Dense
  parameters only (a LoRA target's effective weight has no Adam state); 1-D targets are divided
  exactly.
- ``kfac``: EMA covariances ``S_l [m, m]``, ``S_r [n, n]`` of the factors' rows (for a Linear
  weight ``[out, in]``: output gradients and inputs; GPT-2's Conv1D swaps them), applied as
  ``S_l^-1/2 X S_r^-1/2`` with damping (``kfac_inverse_root``). Costs ``2 (m^2 + n^2)`` numbers per
  target (covariances and their inverse roots). 1-D targets are left unchanged.
- ``kfac_output``: ``kfac`` on the output-gradient side only (``S_l`` of a Linear weight, ``S_r``
  of a Conv1D one: ``bind_layouts``); the input side is left as it is. Whitening the inputs also
  amplifies rare input directions such as a prompt's own tag tokens, which then mark its events
  whatever the reward did (docs/results.md).

``normalize_unit`` then scales a whole event to Frobenius norm 1 over all its targets.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from sae_shards.capture.selection import LoraTarget, Target
from sae_shards.capture.step_rules import unwrap_optimizer
from sae_shards.core import events
from sae_shards.core.targets import TargetSpec

Kind = Literal["none", "adam", "kfac", "kfac_output"]
KINDS = ("none", "adam", "kfac", "kfac_output")
COVARIANCE_KINDS = ("kfac", "kfac_output")
"""The kinds that ``observe`` each step's covariances."""


# ---- per-side maps on factors -----------------------------------------------------------------


def scale_sides(x: Tensor, m: int, a: Tensor, b: Tensor) -> Tensor:
    """``diag(a) X diag(b)`` of factored ``x [..., T, m + n]``: ``L * a``, ``R * b`` (a new tensor
    in ``x``'s dtype; ``a [m]``, ``b [n]``)."""
    L, R = events.split(x.float(), m)
    a = a.to(device=x.device, dtype=torch.float32)
    b = b.to(device=x.device, dtype=torch.float32)
    return events.join(L * a, R * b).to(x.dtype)


def transform_sides(x: Tensor, m: int, left: Tensor, right: Tensor) -> Tensor:
    """``left X right`` of factored ``x [..., T, m + n]`` for symmetric ``left [m, m]`` and
    ``right [n, n]``: ``L left``, ``R right`` (a new tensor in ``x``'s dtype)."""
    L, R = events.split(x.float(), m)
    left = left.to(device=x.device, dtype=torch.float32)
    right = right.to(device=x.device, dtype=torch.float32)
    return events.join(L @ left, R @ right).to(x.dtype)


def transform_side(x: Tensor, m: int, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``left X`` or ``X right`` (whichever map is given; symmetric) of factored
    ``x [..., T, m + n]``: one side transformed, the other copied (a new tensor in ``x``'s dtype)."""
    L, R = events.split(x.float(), m)
    if left is not None:
        L = L @ left.to(device=x.device, dtype=torch.float32)
    else:
        R = R @ right.to(device=x.device, dtype=torch.float32)
    return events.join(L, R).to(x.dtype)


# ---- adam -------------------------------------------------------------------------------------


def check_step(step: float) -> None:
    """``ValueError`` unless Adam has stepped (bias correction divides by ``1 - beta2^t``)."""
    if not step >= 1:
        raise ValueError(f"Adam step count {step} < 1: precondition after the optimizer's step")


def adam_denominator(v: Tensor, step: float, beta2: float, eps: float) -> Tensor:
    """Adam's exact denominator ``sqrt(v / (1 - beta2^t)) + eps`` ``[*shape]``, in ``v``'s dtype
    promoted to at least fp32."""
    check_step(step)
    v = v.float() if v.dtype not in (torch.float32, torch.float64) else v
    return (v / (1 - beta2**step)).sqrt() + eps


def adam_scales(v: Tensor, step: float, beta2: float, eps: float) -> tuple[Tensor, Tensor]:
    """``(a [m], b [n])`` with ``a_i b_j ~ 1 / (sqrt(v_hat_ij) + eps)`` for ``v [m, n]``.

    ``v_hat = v / (1 - beta2^t)`` is approximated as Adafactor does by ``r c^T / mu`` with row
    means ``r [m]``, column means ``c [n]`` and overall mean ``mu``. Its square root splits
    evenly, ``sqrt(r_i c_j / mu) = p_i q_j`` with ``p_i^2 = r_i / sqrt(mu)``, ``q_j^2 = c_j /
    sqrt(mu)`` (so ``mean(p^2) = mean(q^2)``), and ``eps`` enters once per side:

        sqrt(v_hat_ij) + eps  ~  sqrt(p_i^2 + eps) sqrt(q_j^2 + eps)
                              =  sqrt((p_i q_j + eps)^2 + eps (p_i - q_j)^2),

    i.e. ``a_i = (p_i^2 + eps)^-1/2``, ``b_j = (q_j^2 + eps)^-1/2``. Against the rank-one
    ``p_i q_j + eps`` this never shrinks the denominator (Cauchy-Schwarz), is exact where ``p_i =
    q_j`` and when ``v = 0`` (denominator ``eps``), and is off by a relative ``~ eps (1/p_i -
    1/q_j)^2 / 2`` otherwise: negligible unless a row's or column's ``p^2`` falls towards ``eps``
    (a nearly dead row). The rank-one approximation of ``v`` itself is the larger error
    (``adam_approx_error`` measures both together). Computed in float64, returned in fp32.
    """
    check_step(step)
    v_hat = v.double() / (1 - beta2**step)  # [m, n]
    r = v_hat.mean(1)  # [m]
    c = v_hat.mean(0)  # [n]
    mu = v_hat.mean()
    root_mu = mu.sqrt() if mu > 0 else mu.new_ones(())  # v = 0: p = q = 0 whatever the divisor
    a = (r / root_mu + eps).rsqrt()  # [m]
    b = (c / root_mu + eps).rsqrt()  # [n]
    return a.float(), b.float()


def adam_approx_error(
    L: Tensor, R: Tensor, v: Tensor, step: float, beta2: float, eps: float
) -> float:
    """``||approx - exact||_F / ||exact||_F`` for the sample ``X = L^T R`` (``L [T, m]``, ``R [T,
    n]``): ``exact = X / (sqrt(v_hat) + eps)`` elementwise, ``approx = diag(a) X diag(b)`` from
    ``adam_scales``. Materialises ``[m, n]`` in float64: for occasional logging. 0 when ``X = 0``.
    """
    X = L.double().T @ R.double()  # [m, n]
    exact = X / adam_denominator(v.double(), step, beta2, eps)
    a, b = adam_scales(v, step, beta2, eps)
    approx = a.double()[:, None] * X * b.double()[None, :]
    norm = float(torch.linalg.matrix_norm(exact))
    return float(torch.linalg.matrix_norm(approx - exact)) / norm if norm > 0 else 0.0


def adam_state(optimizer: torch.optim.Optimizer, p: Tensor) -> tuple[Tensor, float, float, float]:
    """``(v, step, beta2, eps)`` of parameter ``p`` in a torch Adam/AdamW after its step."""
    state = optimizer.state.get(p, {})
    if "exp_avg_sq" not in state or "step" not in state:
        raise ValueError(
            "capture.precondition=adam found no Adam state (exp_avg_sq, step) for a target: "
            "precondition only after the optimizer's first step"
        )
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    return state["exp_avg_sq"], float(state["step"]), float(group["betas"][1]), float(group["eps"])


def check_adam(optimizer, targets: Mapping[str, Target]) -> torch.optim.Optimizer:
    """The torch Adam/AdamW inside ``optimizer`` (accelerate's wrapper is unwrapped), or
    ``ValueError`` if it is another optimizer, uses amsgrad, or lacks a target."""
    opt = unwrap_optimizer(optimizer)
    cls = f"{type(opt).__module__}.{type(opt).__qualname__}"
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(
            f"capture.precondition=adam needs torch.optim.Adam or AdamW, but the trainer's "
            f"optimizer is {cls}; use capture.precondition=none or kfac"
        )
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in targets.items():
        if id(p) not in group_of:
            raise ValueError(
                f"capture.precondition=adam: target {name!r} is not in any param group of {cls}"
            )
        if group_of[id(p)].get("amsgrad", False):
            raise ValueError(
                f"capture.precondition=adam does not support amsgrad=True (param group of "
                f"{name!r}: Adam divides by the running maximum of v); use none or kfac"
            )
    return opt


# ---- kfac -------------------------------------------------------------------------------------


def kfac_inverse_root(S: Tensor, damping: float) -> Tensor:
    """``(S + damping * mean_eig(S) I)^-1/2`` of a covariance ``S [k, k]``, by ``eigh`` in float64
    (negative eigenvalues from rounding count as 0). A zero ``S`` (no information) gives ``I``.
    Returned in fp32 on ``S``'s device."""
    w, V = torch.linalg.eigh(0.5 * (S.double() + S.double().T))  # [k], [k, k]
    w = w.clamp_min(0)
    shift = damping * w.mean()
    if not shift > 0:
        return torch.eye(S.shape[0], dtype=torch.float32, device=S.device)
    return ((V * (w + shift).rsqrt()) @ V.T).float()


def ema_update(S: Tensor | None, C: Tensor, decay: float) -> Tensor:
    """``decay S + (1 - decay) C``; the first observation (``S`` None) is taken as it is."""
    return C.clone() if S is None else S.mul_(decay).add_(C, alpha=1 - decay)


class _KfacSide:
    """One target's running covariances and the inverse roots last computed from them."""

    def __init__(self) -> None:
        self.S_l: Tensor | None = None  # [m, m] EMA of sum_l / count
        self.S_r: Tensor | None = None  # [n, n]
        self.P_l: Tensor | None = None  # [m, m] (S_l + damping)^-1/2, recomputed every update_every
        self.P_r: Tensor | None = None  # [n, n]
        self.observed = 0  # steps observed with count > 0


# ---- the state class --------------------------------------------------------------------------


class EventPreconditioner:
    """Preconditions one event's samples, target by target, keeping matrix samples factored.

    ``adam``: ``bind_optimizer`` once, then ``apply`` after each optimizer step (the scales are
    recomputed once per step and target, from ``v_t`` including the step's own gradient).
    ``kfac``: ``observe`` each step's covariance sums, then ``apply``; the inverse roots are
    recomputed at a target's 1st, ``1 + update_every``-th, ... observed step. ``none``: ``apply``
    returns the same tensors (in a new dict).
    """

    def __init__(
        self,
        kind: Kind,
        targets: Mapping[str, Target],
        specs: Sequence[TargetSpec],
        *,
        kfac_damping: float = 1e-3,
        kfac_ema: float = 0.95,
        kfac_update_every: int = 10,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"capture.precondition={kind!r} must be one of {KINDS}")
        self.kind = kind
        self.specs = {s.name: s for s in specs}
        self.targets = dict(targets)
        if kind == "adam":
            lora = [name for name, t in self.targets.items() if isinstance(t, LoraTarget)]
            if lora:
                raise ValueError(
                    f"capture.precondition=adam is not supported for LoRA targets ({lora[0]!r}"
                    f"{f' and {len(lora) - 1} more' if len(lora) > 1 else ''}): Adam keeps no "
                    "state for the effective weight; use capture.precondition=none or kfac"
                )
        if not kfac_damping > 0:
            raise ValueError(f"capture.kfac_damping={kfac_damping} must be > 0")
        if not 0 <= kfac_ema < 1:
            raise ValueError(f"EventPreconditioner: kfac_ema={kfac_ema} must be in [0, 1)")
        if kfac_update_every < 1:
            raise ValueError(f"EventPreconditioner: kfac_update_every={kfac_update_every} "
                             "must be >= 1")
        self.damping = float(kfac_damping)
        self.ema = float(kfac_ema)
        self.update_every = int(kfac_update_every)
        self.optimizer: torch.optim.Optimizer | None = None
        self._adam_cache: dict[str, tuple[tuple, tuple[Tensor, ...]]] = {}
        self._kfac: dict[str, _KfacSide] = {}
        self._output_left = {name: True for name in self.specs}  # Linear layout until bound
        self.root_updates = 0  # kfac: inverse-root recomputations so far (all targets, both sides)

    # ---- adam ----

    def bind_optimizer(self, optimizer) -> None:
        """Adam: remember the (possibly accelerate-wrapped) optimizer whose ``v`` preconditions.
        ``ValueError`` unless it is torch Adam/AdamW without amsgrad holding every target."""
        if self.kind == "adam":
            self.optimizer = check_adam(optimizer, self.targets)

    def _adam_factors(self, name: str) -> tuple[Tensor, ...]:
        """``(a [m], b [n])`` for a matrix target, ``(denominator [m],)`` for a vector; cached per
        optimizer step (and in-place version of ``v``)."""
        if self.optimizer is None:
            raise ValueError("capture.precondition=adam: call bind_optimizer before apply")
        v, step, beta2, eps = adam_state(self.optimizer, self.targets[name])
        key = (step, v._version, v.data_ptr())
        cached = self._adam_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        if self.specs[name].is_matrix:
            out = adam_scales(v, step, beta2, eps)
        else:
            out = (adam_denominator(v, step, beta2, eps).float(),)
        self._adam_cache[name] = (key, out)
        return out

    # ---- kfac ----

    def bind_layouts(self, layouts: Mapping[str, str]) -> None:
        """``{target: "out_in" | "in_out"}`` (``event_sites.Site.layout``): which factor holds the
        output gradients (``L`` for a Linear weight ``[out, in]``, ``R`` for a Conv1D one)."""
        for name, layout in layouts.items():
            if layout not in ("out_in", "in_out"):
                raise ValueError(f"target {name!r}: unknown weight layout {layout!r}")
            self._output_left[name] = layout == "out_in"

    def observe(self, covariances: Mapping[str, tuple[Tensor, Tensor, int]]) -> None:
        """Kfac: fold one step's ``{target: (sum_l [m, m], sum_r [n, n], count)}`` into the EMAs.

        ``sum_l = sum_t l_t l_t^T`` over the step's positions of the rows ``l_t`` of ``L`` (the
        target's first axis), likewise ``sum_r``; ``count`` the positions summed. The step's
        covariance ``sum / count`` enters as ``S = ema S + (1 - ema) C`` (the first step's is
        taken as it is). A target with ``count == 0`` is skipped. Other kinds: ignored.
        """
        if self.kind not in COVARIANCE_KINDS:
            return
        for name, (sum_l, sum_r, count) in covariances.items():
            spec = self.specs.get(name)
            if spec is None or not spec.is_matrix:
                raise ValueError(
                    f"kfac covariances given for {name!r}, which is not a matrix target "
                    "(1-D targets are not preconditioned by kfac)"
                )
            m, n = spec.shape
            if tuple(sum_l.shape) != (m, m) or tuple(sum_r.shape) != (n, n):
                raise ValueError(
                    f"kfac covariances of {name!r} {tuple(sum_l.shape)}, {tuple(sum_r.shape)} do "
                    f"not match its shape {spec.shape}: need ({m}, {m}) and ({n}, {n})"
                )
            if count <= 0:
                continue
            side = self._kfac.setdefault(name, _KfacSide())
            side.S_l = ema_update(side.S_l, sum_l.float() / count, self.ema)
            side.S_r = ema_update(side.S_r, sum_r.float() / count, self.ema)
            if side.observed % self.update_every == 0:
                both = self.kind == "kfac"
                left = both or self._output_left.get(name, True)
                side.P_l = kfac_inverse_root(side.S_l, self.damping) if left else None
                side.P_r = kfac_inverse_root(side.S_r, self.damping) if both or not left else None
                self.root_updates += 2 if both else 1
            side.observed += 1

    # ---- resume ----

    def state_tensors(self) -> dict[str, Tensor]:
        """kfac: every target's running covariances, inverse roots and observed-step count, so a
        resumed run continues with the same whitening ({} for other kinds)."""
        out: dict[str, Tensor] = {}
        for name, side in self._kfac.items():
            for key in ("S_l", "S_r", "P_l", "P_r"):
                if getattr(side, key) is not None:  # kfac_output keeps one root
                    out[f"kfac.{name}.{key}"] = getattr(side, key).detach().cpu().clone()
            out[f"kfac.{name}.observed"] = torch.tensor(side.observed, dtype=torch.long)
        return out

    def load_state_tensors(self, state: Mapping[str, Tensor]) -> None:
        """Inverse of ``state_tensors`` (keys of other prefixes are ignored)."""
        for name, spec in self.specs.items():
            if f"kfac.{name}.observed" not in state:
                continue
            side = self._kfac.setdefault(name, _KfacSide())
            device = _device_of(self.targets[name])
            for key in ("S_l", "S_r", "P_l", "P_r"):
                saved = state.get(f"kfac.{name}.{key}")
                setattr(side, key, None if saved is None else saved.to(device).clone())
            side.observed = int(state[f"kfac.{name}.observed"])

    # ---- applying ----

    def apply(self, factors: dict[str, Tensor]) -> dict[str, Tensor]:
        """One event's ``{target: [k, m + n] or [m]}`` preconditioned, as new tensors (``none``:
        the same tensors, in a new dict)."""
        unknown = [name for name in factors if name not in self.specs]
        if unknown:
            raise ValueError(f"event preconditioning: no TargetSpec for {unknown}")
        if self.kind == "none":
            return dict(factors)
        out = {}
        for name, x in factors.items():
            spec = self.specs[name]
            if self.kind == "adam":
                if spec.is_matrix:
                    a, b = self._adam_factors(name)
                    out[name] = scale_sides(x, spec.shape[0], a, b)
                else:
                    (denom,) = self._adam_factors(name)
                    out[name] = (x.float() / denom.to(x.device)).to(x.dtype)
            elif spec.is_matrix:
                side = self._kfac.get(name)
                if side is None:
                    raise ValueError(
                        f"capture.precondition=kfac has no covariances for {name!r} yet; "
                        "observe a step's covariances before apply"
                    )
                out[name] = (transform_sides(x, spec.shape[0], side.P_l, side.P_r)
                             if self.kind == "kfac" else
                             transform_side(x, spec.shape[0], side.P_l, side.P_r))
            else:
                out[name] = x.clone()
        return out

    def approx_error(self, factors: Mapping[str, Tensor]) -> dict[str, float]:
        """Adam: ``{matrix target: adam_approx_error}`` for one event (materialises one ``m x n``
        per target: for occasional logging). ``{}`` for the other kinds."""
        if self.kind != "adam":
            return {}
        if self.optimizer is None:
            raise ValueError("capture.precondition=adam: call bind_optimizer before approx_error")
        errors = {}
        for name, x in factors.items():
            spec = self.specs[name]
            if spec.is_matrix:
                L, R = events.split(x, spec.shape[0])
                v, step, beta2, eps = adam_state(self.optimizer, self.targets[name])
                errors[name] = adam_approx_error(L, R, v, step, beta2, eps)
        return errors


# ---- unit normalisation -----------------------------------------------------------------------


def normalize_unit(
    factors: dict[str, Tensor], specs: Sequence[TargetSpec], norm: float | None = None
) -> tuple[dict[str, Tensor], float]:
    """One event scaled to Frobenius norm 1 over all its targets (every entry of ``factors``),
    and its original norm (keep it as metadata).

    The norm comes from ``events.sq_norm`` (Gram products, fp32), unless the caller passes the
    one it already has; matrices are scaled through ``R`` only (``events.scale``). An event of
    norm 0, or a non-finite one (for the caller's checks to see), is returned unchanged (the same
    tensors, in a new dict).
    """
    by_name = {s.name: s for s in specs}
    missing = [name for name in factors if name not in by_name]
    if missing:
        raise ValueError(f"normalize_unit: no TargetSpec for {missing}")
    if norm is None:
        sq = sum(float(events.sq_norm(x.float(), by_name[name])) for name, x in factors.items())
        norm = math.sqrt(sq) if sq >= 0 else math.nan
    if not (norm > 0 and math.isfinite(norm)):
        return dict(factors), norm
    return {name: events.scale(x, by_name[name], 1 / norm) for name, x in factors.items()}, norm


def _device_of(target: Target) -> torch.device:
    return target.A.device if isinstance(target, LoraTarget) else target.device
