"""Metric functions shared by training, evaluation, tests and benchmarks (pure, no state)."""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple

import torch
from torch import Tensor

Sample = Mapping[str, Tensor]  # {target name: [batch, *shape]}


def sample_sq_norms(x: Sample) -> Tensor:
    """``||x_b||^2`` over all targets, shape [batch] (inf/NaN for a row with such an entry).

    ``vector_norm`` reduces without a batch-sized temporary (``v.pow(2)`` would make one).
    """
    return sum(torch.linalg.vector_norm(v.flatten(1), dim=1).pow(2) for v in x.values())


def fvu_parts(x: Sample, xhat: Sample) -> tuple[Tensor, Tensor]:
    """(residual sum of squares, total sum of squares about the batch mean), pooled over targets."""
    resid = sum((x[k] - xhat[k]).pow(2).sum() for k in x)
    total = sum((v - v.mean(0, keepdim=True)).pow(2).sum() for v in x.values())
    return resid, total


def fvu(x: Sample, xhat: Sample) -> Tensor:
    """Fraction of variance unexplained, batch-pooled over all targets:
    ``sum_b ||x_b - xhat_b||^2 / sum_b ||x_b - mean_b x||^2``."""
    resid, total = fvu_parts(x, xhat)
    return resid / total.clamp_min(1e-30)


def ml2r(x: Sample, xhat: Sample) -> Tensor:
    """Mean over samples of ``||xhat_b|| / ||x_b||`` (1 is ideal, below 1 is shrinkage)."""
    return (sample_sq_norms(xhat).sqrt() / sample_sq_norms(x).sqrt().clamp_min(1e-30)).mean()


class Matching(NamedTuple):
    """How well a set of reference directions is matched by the SAE's decoder directions."""

    mmcs: float  # mean over references of the max |cosine| with any latent
    max_abs_cos: Tensor  # [n_refs]
    best_latent: Tensor  # [n_refs] the latent achieving it
    abs_cos: Tensor  # [n_refs, n_latents]


def match_directions(sae, refs: Sample) -> Matching:
    """Sign-invariant matching of reference directions ``{target: [n_refs, *shape]}`` to shards.

    The reference's inner product with every decoder direction is taken in factored form (the
    same contraction as the encoder), so the SAE's dense directions are never built.
    """
    refs = {t.name: refs[t.name].to(sae.device, torch.float32) for t in sae.targets}
    with torch.no_grad():
        dots = sae.inner(refs, "decoder")  # [n_refs, n_latents]
        norms = sample_sq_norms(refs).sqrt()[:, None] * sae.decoder_sq_norms().sqrt()[None]
        abs_cos = (dots / norms.clamp_min(1e-30)).abs()
    best = abs_cos.max(1)
    return Matching(best.values.mean().item(), best.values, best.indices, abs_cos)


def mmcs(sae, refs: Sample) -> float:
    """Mean max |cosine| between reference directions and decoder directions."""
    return match_directions(sae, refs).mmcs


class HeldOut(NamedTuple):
    fvu: float
    ml2r: float
    l0: float


@torch.no_grad()
def evaluate_heldout(sae, batches: Iterable[Sample]) -> HeldOut:
    """FVU (pooled over all given batches), ML2R and L0 on parameter-unit samples never trained on.

    The pooled FVU's denominator uses the mean over all held-out samples; for factored per-event
    samples it is taken about zero, as in training (``core/event_losses.py``), and nothing is
    materialised.
    """
    if getattr(sae, "sample_form", "dense") == "factored":
        return _evaluate_heldout_events(sae, batches)
    xs, xh, l0s = [], [], []
    for batch in batches:
        x = sae.to_scaled(batch)
        out = sae(x)
        xs.append(x)
        xh.append(out.recon)
        l0s.append(out.codes.active().sum(1).float())
    x = {k: torch.cat([b[k] for b in xs]) for k in xs[0]}
    xhat = {k: torch.cat([b[k] for b in xh]) for k in xh[0]}
    return HeldOut(fvu(x, xhat).item(), ml2r(x, xhat).item(), torch.cat(l0s).mean().item())


def _evaluate_heldout_events(sae, batches: Iterable[Sample]) -> HeldOut:
    from sae_shards.core.event_losses import event_recon_norms

    xx, rr, hh, l0s = [], [], [], []
    for batch in batches:
        x = sae.to_scaled(batch)
        codes = sae.encode(x)
        parts = event_recon_norms(sae, x, codes)  # ||X||^2, ||X - Xhat||^2, ||Xhat||^2: [b]
        for out, part in zip((xx, rr, hh), parts):
            out.append(part)
        l0s.append(codes.active().sum(1).float())
    x_sq, r_sq, h_sq = (torch.cat(p) for p in (xx, rr, hh))
    fvu_value = (r_sq.sum() / x_sq.sum().clamp_min(1e-30)).item()
    ratio = (h_sq.clamp_min(0).sqrt() / x_sq.sqrt().clamp_min(1e-30)).mean().item()
    return HeldOut(fvu_value, ratio, torch.cat(l0s).mean().item())
