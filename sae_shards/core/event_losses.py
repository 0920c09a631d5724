"""The SAE loss on factored per-event samples (docs/sae.md, "Per-event (factored)
samples"), never dense.

A matrix target's sample is ``X = L^T R`` (``L [T, m]``, ``R [T, n]``, see
:mod:`sae_shards.core.events`). With unit decoder directions ``D_i = U_i V_i^T`` and codes ``z``
(k active per sample), as in :mod:`sae_shards.core.factored`,

    ||X - sum_i z_i D_i||^2 = ||X||^2 - 2 sum_i z_i <X, D_i> + z^T Gram z,

where now ``||X||^2 = sum((L L^T) * (R R^T))`` comes from ``T x T`` Grams and
``<X, D_i> = sum_{t,r} (L U_i)[t, r] (R V_i)[t, r]`` costs ``T (m + n) r`` per active latent.

The FVU is taken about zero, ``sum_b ||X_b - Xhat_b||^2 / sum_b ||X_b||^2``, and there is no
decoder bias: centring needs the batch mean, a dense ``m x n`` matrix per target. AuxK's
denominator is likewise ``sum_b ||e_b||^2``. Per-sample scalars are combined in fp64.

:func:`dense_event_losses` is the reference: the same definitions through the dense
reconstruction of materialised samples (``events.materialize_all``), for parity tests and the
materialised path of ``scripts/bench_events.py``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from sae_shards.core import events
from sae_shards.core.factored import (StepLosses, aux_sq_error, gather_decoder, recon_sq,
                                      sq_error)
from sae_shards.core.sparsity import SparseCodes, aux_latents, aux_values

Sample = Mapping[str, Tensor]  # {target: [batch, T, m + n]} for matrices, [batch, m] vectors


def active_event_inner(sae, x: Sample, cols: Tensor) -> Tensor:
    """``<X_b, D_j>`` for the latents ``cols [batch, c]`` of each sample only, ``[batch, c]``.

    Per matrix target two batched GEMMs on the gathered decoder factors,
    ``L_b [T, m] @ U_g [m, c r]`` and ``R_b [T, n] @ V_g [n, c r]``: ``T (m + n) c r`` per sample.
    """
    b, c = cols.shape
    out = None
    for tf in sae.factors:
        xp = x[tf.spec.name]
        if tf.spec.is_matrix:
            L, R = events.split(xp, tf.spec.shape[0])  # [b, T, m], [b, T, n]
            Ug, Vg = gather_decoder(tf, cols)  # [b, m, c r], [b, n, c r]
            part = (torch.bmm(L, Ug) * torch.bmm(R, Vg)).sum(1).view(b, c, tf.spec.rank).sum(-1)
        else:
            part = torch.einsum("bm,bcm->bc", xp, tf.d_dec[cols])  # [b, c]
        out = part if out is None else out + part
    return out



def event_losses(sae, x: Sample, dead: Tensor, aux_k: int, aux_coef: float,
                 sq_norms: Tensor | None = None) -> StepLosses:
    """FVU (about zero) and AuxK of one batch of factored samples, nothing dense.

    ``x`` is the cleaned batch in PARAMETER units (fp32); ``sae.input_scale`` maps it to scaled
    units, applied to the ``[batch, n_latents]`` inner products (no scaled copy of the batch).
    ``sq_norms``: ``events.sq_norms(x, sae.targets)`` if the caller has it already (``[batch]``,
    parameter units): its ``T x T`` Grams cost ``T^2 (m + n)`` per sample, more than the encode
    (``T (m + n) N r``) once ``T > N r``.
    """
    inv = 1.0 / sae.input_scale  # []
    pre = sae.inner(x, "encoder", form="factored") * inv + sae.b_enc  # [b, N]
    codes, floor = sae.select(pre, training=True)
    idx = codes.indices  # [b, k]
    k = idx.shape[1]
    with_aux = aux_coef > 0 and bool(dead.any())
    aidx = aux_latents(pre, dead, aux_k, sae.cfg.signed) if with_aux else None  # [b, ka]
    cols = idx if aidx is None else torch.cat([idx, aidx], 1)  # [b, k (+ ka)]
    dxc = active_event_inner(sae, x, cols) * inv  # [b, k (+ ka)] <X_b, D_j>, scaled units
    G = sae.decoder_gram()  # [N, N]

    with torch.no_grad():
        if sq_norms is None:
            sq_norms = events.sq_norms(x, sae.targets)
        xx = sq_norms.double() * inv.double() ** 2  # [b] ||X_b||^2, scaled units
    resid = sq_error(xx, dxc[:, :k], G, codes)  # [b] ||X_b - Xhat_b||^2
    out_dtype = torch.promote_types(pre.dtype, torch.float32)
    main = (resid.sum() / xx.sum().clamp_min(1e-30)).to(out_dtype)
    if aidx is None:
        return StepLosses(main, torch.zeros((), device=pre.device), pre, codes, floor)

    # AuxK: the aux latents reconstruct e = X - Xhat (detached).
    e_sq = resid.detach()  # [b] ||e_b||^2
    aux = aux_sq_error(sae, pre, codes, aidx, dxc[:, k:], e_sq, G).sum() / \
        e_sq.sum().clamp_min(1e-30)
    return StepLosses(main, aux.nan_to_num(0.0).to(out_dtype), pre, codes, floor)


@torch.no_grad()
def event_recon_norms(sae, xs: Sample, codes: SparseCodes) -> tuple[Tensor, Tensor, Tensor]:
    """``(||X_b||^2, ||X_b - Xhat_b||^2, ||Xhat_b||^2)``, each ``[batch]`` fp64, of SCALED factored
    samples reconstructed by ``codes`` (no decoder bias), without materialising anything: for
    held-out figures."""
    xx = events.sq_norms(xs, sae.targets).double()  # [b]
    G = sae.decoder_gram()  # [N, N]
    return xx, sq_error(xx, active_event_inner(sae, xs, codes.indices), G, codes), \
        recon_sq(G, codes)


def dense_event_losses(sae, xs: Sample, dead: Tensor, aux_k: int, aux_coef: float) -> StepLosses:
    """Reference: :func:`event_losses`' definitions on DENSE samples ``{target: [b, *shape]}``
    (materialised events, SCALED units) through the dense reconstruction ``[b, m, n]``.

    No decoder bias; FVU and AuxK about zero (uncentred denominators).
    """
    pre = sae.inner(xs, "encoder", form="dense") + sae.b_enc  # [b, N]
    codes, floor = sae.select(pre, training=True)
    recon = sae.decode(codes, with_bias=False)  # {target: [b, *shape]}
    main = _sq_err(xs, recon) / _sq_sum(xs).clamp_min(1e-30)
    if not (aux_coef > 0 and bool(dead.any())):
        return StepLosses(main, torch.zeros((), device=pre.device), pre, codes, floor)
    aidx = aux_latents(pre, dead, aux_k, sae.cfg.signed)
    ehat = sae.decode(SparseCodes(aidx, aux_values(pre, aidx, sae.cfg.signed)), with_bias=False)
    resid = {name: (xs[name] - recon[name]).detach() for name in xs}
    aux = (_sq_err(resid, ehat) / _sq_sum(resid).clamp_min(1e-30)).nan_to_num(0.0)
    return StepLosses(main, aux, pre, codes, floor)


def _sq_err(x: Sample, xhat: Sample) -> Tensor:
    """``sum_b ||x_b - xhat_b||^2`` over all targets, ``[]``."""
    return sum((x[name] - xhat[name]).pow(2).sum() for name in x)


def _sq_sum(x: Sample) -> Tensor:
    """``sum_b ||x_b||^2`` over all targets, ``[]``."""
    return sum(v.pow(2).sum() for v in x.values())
