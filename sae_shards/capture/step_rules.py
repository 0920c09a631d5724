"""Optimizer step rules for the ``precond`` and ``deconv`` capture sources.

``precond`` reads Adam's denominator from the optimizer's state; ``deconv`` inverts one step's
update back to the momentum-free step from consecutive updates and the step's hyperparameters
alone. Which optimizers (and param-group options) can be inverted is decided once, at
``on_train_begin`` (``step_rule``); the per-step math is in ``deconv_coefficients`` and the
in-place writers, which ``DeltaCapture`` calls on its hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from sae_shards.capture.buffer import DeltaRingBuffer
from sae_shards.capture.selection import Target
from sae_shards.run.config import deconv_warmup_loss

def unwrap_optimizer(optimizer):
    """The torch optimizer inside wrappers that hold it as ``.optimizer`` (accelerate's)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def step_rule(
    optimizer: torch.optim.Optimizer, targets: Mapping[str, Target], source: str
) -> tuple[str, dict[str, dict]]:
    """(``"adam"`` or ``"sgd"``, ``{target: its param group}``), or ``ValueError`` saying why
    ``source`` cannot invert this optimizer's step."""
    cls = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    if isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam
        kind = "adam"
    elif isinstance(optimizer, torch.optim.SGD) and source == "deconv":
        kind = "sgd"
    else:
        needs = "torch.optim.Adam/AdamW" + (" or torch.optim.SGD" if source == "deconv" else "")
        raise ValueError(
            f"capture.source={source!r} needs {needs}, but the trainer's optimizer is {cls}; "
            "use source='update' or 'grad' (any optimizer), or 'deconv' with Adam/AdamW/SGD"
        )
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    groups = {}
    for name, p in targets.items():
        if id(p) not in group_of:
            raise ValueError(f"capture target {name!r} is not in any param group of {cls}")
        group = groups[name] = group_of[id(p)]
        problems = {
            "maximize=True": group["maximize"],
            "amsgrad=True (divides by the running maximum of v)": group.get("amsgrad", False),
            "L2 weight_decay (decoupled_weight_decay=False; use AdamW)": kind == "adam"
            and group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False),
            "nesterov=True": group.get("nesterov", False),
            "dampening != 0": group.get("dampening", 0) != 0,
        }
        for what, on in problems.items():
            if on:
                raise ValueError(
                    f"capture.source={source!r} does not support {cls} with {what} "
                    f"(param group of {name!r}); use source='update' or 'grad'"
                )
    return kind, groups


def deconv_leading_loss(optimizer) -> tuple[int, str]:
    """How many of a fresh run's first steps ``deconv`` cannot invert, read from the learning
    rate the first step will use (the scheduler has set it on every param group by
    ``on_train_begin``), and why: ``(0, "")`` unless that rate is 0 in every group (a warmup
    from 0). Then step 1 moves nothing and, where the step rule has momentum (Adam; SGD with
    ``momentum``), step 2 lacks the previous update it inverts."""
    optimizer = unwrap_optimizer(optimizer)
    groups = getattr(optimizer, "param_groups", None) or []
    if not groups or any(float(g.get("lr", 1.0)) != 0.0 for g in groups):
        return 0, ""
    momentum = isinstance(optimizer, torch.optim.Adam) or any(
        float(g.get("momentum", 0.0)) != 0.0 for g in groups)
    return deconv_warmup_loss(2 if momentum else 1)


@dataclass(frozen=True)
class DeconvCoefficients:
    """How one step's update ``u_t`` inverts to a sample: with ``b_t = -u_t / lr_t`` and
    ``a_t = b_t - wd_state theta_t``, ``sample = alpha a_t - beta a_{t-1} - wd_out theta_t``."""

    alpha: float
    beta: float
    wd_state: float  # decoupled weight decay, applied to theta outside the momentum (AdamW)
    wd_out: float  # weight decay added to g before the momentum (SGD)


def deconv_coefficients(kind: str, group: Mapping, t: int) -> DeconvCoefficients:
    """Coefficients for optimizer step ``t`` (1-based) of a target in ``group``.

    AdamW: ``u_t = -lr_t (m_hat_t / P_t + wd theta_t)``, so ``a_t = m_hat_t / P_t`` with
    ``m_t = beta1 m_{t-1} + (1 - beta1) g_t`` and ``m_hat_t = m_t / (1 - beta1^t)``; then
    ``((1 - beta1^t) a_t - beta1 (1 - beta1^(t-1)) a_{t-1}) / (1 - beta1) = g_t / P_t`` when
    ``P_t = P_{t-1}``. SGD (torch: ``b_t = mu b_{t-1} + g_t + wd theta_t``, ``u_t = -lr_t b_t``):
    ``g_t = b_t - mu b_{t-1} - wd theta_t`` exactly. At ``t = 1`` the previous term vanishes.
    """
    wd = float(group["weight_decay"])
    match kind:
        case "adam":
            beta1 = float(group["betas"][0])
            return DeconvCoefficients(
                alpha=(1 - beta1**t) / (1 - beta1),
                beta=beta1 * (1 - beta1 ** (t - 1)) / (1 - beta1),
                wd_state=wd, wd_out=0.0,
            )
        case "sgd":  # torch starts the momentum buffer as b_1 = g_1 + wd theta_1: b_0 = 0
            mu = float(group["momentum"]) if t > 1 else 0.0
            return DeconvCoefficients(alpha=1.0, beta=mu, wd_state=0.0, wd_out=wd)
        case other:
            raise AssertionError(f"unknown step rule {other!r}")


@dataclass
class Scratch:
    """fp32 work tensors ``[*shape]`` of one dense target for ``precond``/``deconv``, allocated
    once. Where the slot view is fp32 on the target's device the sample is built in it directly."""

    prev: torch.Tensor | None = None  # deconv: a_{t-1} (zeros until the first step)
    work: torch.Tensor | None = None  # deconv: a_t, when the view cannot hold it
    grad_buf: torch.Tensor | None = None  # precond: g_t, when the view cannot hold it
    denom: torch.Tensor | None = None  # precond: Adam's denominator P_t

    @staticmethod
    def alloc(p: torch.Tensor, source: str, buffer: DeltaRingBuffer) -> Scratch:
        direct = buffer.dtype == torch.float32 and p.device == buffer.device

        def fp32() -> torch.Tensor:
            return torch.empty(p.shape, dtype=torch.float32, device=p.device)

        if source == "precond":
            return Scratch(grad_buf=None if direct else fp32(), denom=fp32())
        return Scratch(prev=fp32().zero_(), work=None if direct else fp32())

    def grad(self, view: torch.Tensor) -> torch.Tensor:
        """Where ``precond`` keeps ``g_t``: the slot view, or the fp32 scratch."""
        return view if self.grad_buf is None else self.grad_buf


def write_precond(
    g: torch.Tensor,  # [*shape] fp32 clipped gradient g_t (overwritten)
    v: torch.Tensor,  # [*shape] Adam's exp_avg_sq after the step (v_t)
    step: float,  # Adam's step count t after the step
    beta2: float,
    eps: float,
    denom: torch.Tensor,  # [*shape] fp32 scratch
    view: torch.Tensor,  # [*shape] the slot (may be g itself)
) -> None:
    """``g_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)``, the denominator as torch's Adam forms it."""
    denom.copy_(v).sqrt_().div_(math.sqrt(1 - beta2**step)).add_(eps)
    g.div_(denom)
    if g is not view:
        view.copy_(g)


def deconv_state(
    p: torch.Tensor, theta: torch.Tensor, lr: float, coef: DeconvCoefficients, out: torch.Tensor
) -> torch.Tensor:
    """``a_t = -(theta_{t+1} - theta_t) / lr_t - wd_state * theta_t`` into ``out`` (fp32)."""
    torch.sub(p, theta, out=out).div_(-lr)  # the update, exact in fp32, over -lr
    if coef.wd_state:
        out.add_(theta, alpha=-coef.wd_state)
    return out


def write_deconv(
    p: torch.Tensor,  # [*shape] the target after the step
    theta: torch.Tensor,  # [*shape] fp32 snapshot theta_t (overwritten with a_t)
    scratch: Scratch,  # prev: a_{t-1} (overwritten)
    lr: float,
    coef: DeconvCoefficients,
    view: torch.Tensor,  # [*shape] the slot
) -> torch.Tensor:
    """Write ``alpha a_t - beta a_{t-1} - wd_out theta_t`` into ``view``; return the tensor that
    now holds ``a_t`` (``theta``'s). ``scratch.prev`` is free afterwards."""
    a_t = deconv_state(p, theta, lr, coef, out=view if scratch.work is None else scratch.work)
    sample = scratch.prev  # [*shape] a_{t-1} -> the sample
    if coef.beta:
        sample.mul_(-coef.beta).add_(a_t, alpha=coef.alpha)
    else:  # a_{t-1} may be stale (first step): never multiply it, even by 0
        torch.mul(a_t, coef.alpha, out=sample)
    if coef.wd_out:
        sample.add_(theta, alpha=-coef.wd_out)
    theta.copy_(a_t)
    view.copy_(sample)
    return theta
