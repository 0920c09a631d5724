"""The SAE training loss without a dense reconstruction (docs/sae.md, "The math").

With unit decoder directions ``D_i``, codes ``z`` (k active per sample) and the decoder bias ``b``,

    ||X - b - sum_i z_i D_i||^2 = ||X - b||^2 - 2 sum_i z_i <X - b, D_i> + z^T Gram z,

where ``<X, D_i>`` is taken like the encoder, with the decoder factors, for the active latents
only (:func:`active_decoder_inner`: one batched GEMM on the gathered factors) and
``Gram_ij = <D_i, D_j>`` comes from the factors. AuxK's residual ``e = X - Xhat`` is handled the
same way: ``<e, D_j> = <X - b, D_j> - sum_i z_i Gram_ij``. Nothing of shape ``[batch, m, n]`` is
allocated besides the batch itself; the per-sample scalars are combined in fp64.

The SAE works in scaled units ``X / input_scale``; here the raw (parameter-unit) batch is used and
the scale is applied to the ``[batch, n_latents]`` inner products instead, so no scaled copy of the
batch is made either.

:func:`dense_losses` is the reference (the original dense path): the parity tests,
``SAETrainer(dense_loss=True)`` and the dense entries of ``scripts/bench_sae.py``.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from torch import Tensor

from sae_shards.core.metrics import fvu, fvu_parts
from sae_shards.core.sparsity import SparseCodes, aux_latents, aux_values

Sample = Mapping[str, Tensor]  # {target name: [batch, *shape]}


class StepLosses(NamedTuple):
    """What the trainer needs from the forward pass of one step."""

    fvu: Tensor  # [] fp32, differentiable
    aux: Tensor  # [] fp32, differentiable (0 when nothing is dead or aux_coef == 0)
    pre_acts: Tensor  # [batch, n_latents]
    codes: SparseCodes  # [batch, k]
    batch_threshold: Tensor | None  # batch_topk only


# ---------------------------------------------------------------------------- pure pieces
def cross_gram(left: tuple[Tensor, ...], right: tuple[Tensor, ...]) -> Tensor:
    """``<L_i, R_j>_F`` for one target, ``[N1, N2]`` (two sets of directions, e.g. two
    checkpoints' decoders, may differ in count and rank).

    Matrices: ``left = (U1 [N, m, r], V1 [N, n, r])``, ``right = (U2, V2)``; the entry is
    ``sum_{r,s} (U1_ir . U2_js)(V1_ir . V2_js)`` (for rank 1: ``(U1 U2^T) * (V1 V2^T)``).
    Vectors: ``left = (d1 [N, m],)``, ``right = (d2,)``: ``d1 @ d2^T``.
    """
    if len(left) == 1:
        return left[0] @ right[0].T
    U1, V1 = left
    U2, V2 = right
    (N1, _, r1), (N2, _, r2) = U1.shape, U2.shape  # two sets may differ in count and rank
    if r1 == r2 == 1:
        return (U1[..., 0] @ U2[..., 0].T) * (V1[..., 0] @ V2[..., 0].T)
    uu = U1.transpose(1, 2).reshape(N1 * r1, -1) @ U2.transpose(1, 2).reshape(N2 * r2, -1).T
    vv = V1.transpose(1, 2).reshape(N1 * r1, -1) @ V2.transpose(1, 2).reshape(N2 * r2, -1).T
    return (uu * vv).view(N1, r1, N2, r2).sum((1, 3))  # [N1, N2]


def paired_inner(left: tuple[Tensor, ...], right: tuple[Tensor, ...]) -> Tensor:
    """``<L_i, R_i>_F`` for one target, ``[N]``: the diagonal of :func:`cross_gram` (two sets of
    as many directions, paired by index) without the rest. Matrices ``(U [N, m, r], V [N, n,
    r])``: ``sum_{r,s} (U1_ir . U2_is)(V1_ir . V2_is)``; vectors ``(d [N, m],)``: ``d1 . d2``."""
    if len(left) == 1:
        return (left[0] * right[0]).sum(-1)
    (U1, V1), (U2, V2) = left, right
    uu = torch.einsum("imr,ims->irs", U1, U2)
    vv = torch.einsum("inr,ins->irs", V1, V2)
    return (uu * vv).sum((1, 2))


def gather_pairs(G: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``G[rows_bk, cols_bl]``: ``[batch, k, l]`` from indices ``[batch, k]``, ``[batch, l]``."""
    return G[rows[:, :, None], cols[:, None, :]]


def quad(a: Tensor, G: Tensor, c: Tensor) -> Tensor:
    """``a_b^T G_b c_b`` per sample: ``[b, k] x [b, k, l] x [b, l] -> [b]``."""
    return torch.einsum("bk,bkl,bl->b", a, G, c)


# ---------------------------------------------------------------------------- SAE-level pieces
def gather_decoder(tf, cols: Tensor) -> tuple[Tensor, Tensor]:
    """The decoder factors of the latents ``cols [b, c]`` of one matrix target, side by side per
    sample: ``(U_g [b, m, c r], V_g [b, n, c r])``."""
    b, c = cols.shape
    (m, n), r = tf.spec.shape, tf.spec.rank
    Ug = tf.U[cols].permute(0, 2, 1, 3).reshape(b, m, c * r)
    Vg = tf.V[cols].permute(0, 2, 1, 3).reshape(b, n, c * r)
    return Ug, Vg


def active_decoder_inner(sae, x: Sample, cols: Tensor) -> Tensor:
    """``<x_b, D_j>`` for the latents ``cols [batch, c]`` of each sample only, ``[batch, c]``.

    Per target one batched GEMM ``x_b [m, n] @ V_g [n, c r]`` on the gathered factors: it reads the
    batch once (and once more in the backward), whatever ``n_latents`` is, where all N inner
    products would cost ``2 b N r m n``.
    """
    b, c = cols.shape
    out = None
    for tf in sae.factors:
        xp = x[tf.spec.name]
        if tf.spec.is_matrix:
            Ug, Vg = gather_decoder(tf, cols)  # [b, m, c r], [b, n, c r]
            part = (torch.bmm(xp, Vg) * Ug).sum(1).view(b, c, tf.spec.rank).sum(-1)  # [b, c]
        else:
            part = torch.einsum("bm,bcm->bc", xp, tf.d_dec[cols])  # [b, c]
        out = part if out is None else out + part
    return out


def decoder_gram_pair(sae, detach_left: bool = False) -> Tensor:
    """``<D_i, D_j>`` over all targets, ``[N, N]``; with ``detach_left`` the gradient flows only
    through ``D_j`` (AuxK: the residual is a fixed target)."""
    total = None
    for tf in sae.factors:
        f = tf.factors("decoder")
        left = tuple(t.detach() for t in f) if detach_left else f
        part = cross_gram(left, f)
        total = part if total is None else total + part
    return total


def sq_error(xx: Tensor, xd: Tensor, G: Tensor, codes: SparseCodes) -> Tensor:
    """``||X_b - sum_i z_i D_i||^2 = ||X_b||^2 - 2 sum_i z_i <X_b, D_i> + z^T Gram z`` per
    sample, ``[batch]`` fp64, from ``xx = ||X_b||^2 [batch]``, the active latents' inner products
    ``xd = <X_b, D_i> [batch, k]`` and ``G = Gram [N, N]`` (``X`` may be a centred sample)."""
    zx = (codes.values.double() * xd.double()).sum(1)  # [b] sum_i z_i <X_b, D_i>
    return xx - 2 * zx + recon_sq(G, codes)


def recon_sq(G: Tensor, codes: SparseCodes) -> Tensor:
    """``||sum_i z_i D_i||^2 = z^T Gram z`` per sample, ``[batch]`` fp64 (``G = Gram [N, N]``)."""
    idx, z = codes  # [b, k]
    z64 = z.double()
    return quad(z64, gather_pairs(G, idx, idx).double(), z64)


def aux_sq_error(sae, pre: Tensor, codes: SparseCodes, aidx: Tensor, ed: Tensor,
                 e_sq: Tensor, G: Tensor) -> Tensor:
    """AuxK's ``||e_b - ehat_b||^2`` per sample, ``[batch]`` fp64: the dead latents ``aidx [b, ka]``
    (scores from ``pre [b, N]``) reconstruct the detached residual ``e = X - Xhat``, whose norms
    ``e_sq [b]`` and inner products ``ed = <X_b, D_j> [b, ka]`` with the aux latents (``X`` as
    the main loss took it) are given. ``<e_b, D_j> = <X_b, D_j> - sum_i z_bi Gram_ij``, with the
    gradient only through ``D_j`` (``e`` is a fixed target)."""
    idx, z = codes  # [b, k]
    a64 = aux_values(pre, aidx, sae.cfg.signed).double()  # [b, ka]
    Gh = decoder_gram_pair(sae, detach_left=True)  # [N, N], gradient only via D_j
    e_d = ed.double() - torch.einsum("bk,bka->ba", z.detach().double(),
                                     gather_pairs(Gh, idx, aidx).double())  # [b, ka] <e_b, D_j>
    eh_sq = quad(a64, gather_pairs(G, aidx, aidx).double(), a64)  # [b] ||ehat_b||^2
    return e_sq - 2 * (a64 * e_d).sum(1) + eh_sq


def sq_dist(x: Sample, centre: Mapping[str, Tensor] | None, chunk_mib: float = 1.0) -> Tensor:
    """``||x_b - centre||^2`` summed over targets, ``[batch]`` fp64, no gradient (``centre``
    None: ``||x_b||^2``).

    Reduces the actual differences (not ``||x||^2 - 2<x, c> + ||c||^2``, which cancels when the
    centre is large), a slice of columns of the whole batch at a time: the only temporary is
    ``chunk_mib`` (cache-sized, so this costs about one read of the batch).
    """
    out = None
    with torch.no_grad():
        for k, v in x.items():
            flat = v.flatten(1)  # [b, D_p]
            c = None if centre is None else centre[k].flatten()  # [D_p]
            per = max(1, int(chunk_mib * (1 << 20)) // (flat.shape[0] * flat.element_size()))
            norms = [torch.linalg.vector_norm(
                flat[:, i:i + per] if c is None else flat[:, i:i + per] - c[i:i + per], dim=1)
                for i in range(0, flat.shape[1], per)]  # each [b]
            part = torch.stack(norms).double().pow(2).sum(0)  # [b]
            out = part if out is None else out + part
    return out


# ---------------------------------------------------------------------------- the losses
def factored_losses(sae, x: Sample, dead: Tensor, aux_k: int, aux_coef: float) -> StepLosses:
    """FVU and AuxK of one training batch without any dense reconstruction.

    ``x`` is the cleaned batch in PARAMETER units ``{target: [batch, *shape]}`` (fp32);
    ``sae.input_scale`` maps it to scaled units.
    """
    inv = 1.0 / sae.input_scale  # []
    B = next(iter(x.values())).shape[0]
    N = sae.n_latents
    bias = sae.bias_sample()  # {target: [1, *shape]} b_dec, scaled units; None without one
    pre = sae.inner(x, "encoder") * inv + sae.b_enc  # [b, N]
    if bias is not None:
        pre = pre - sae.inner(bias, "encoder")
    codes, floor = sae.select(pre, training=True)
    idx = codes.indices  # [b, k]
    k = idx.shape[1]
    n_dead = int(dead.sum())
    with_aux = aux_coef > 0 and n_dead > 0
    if with_aux:  # AuxK: the k_aux dead latents with the largest score (|pre| or ReLU)
        aidx = aux_latents(pre, dead, aux_k, sae.cfg.signed)  # [b, ka]
        cols = torch.cat([idx, aidx], 1)  # [b, k + ka]
    else:
        cols = idx
    dxc = active_decoder_inner(sae, x, cols) * inv  # [b, k (+ ka)] <X_b, D_j>, scaled units
    db = pre.new_zeros(N) if bias is None else sae.inner(bias, "decoder")[0]  # [N] <b, D_i>
    xd = dxc[:, :k] - db[idx]  # [b, k] <X_b - b, D_i> of the active latents
    G = sae.decoder_gram()  # [N, N]

    # ||X_b - b||^2 per sample, fp64: the value reduced exactly from the differences (sq_dist,
    # no cancellation when b is large); the gradient of its batch sum w.r.t. b from ``lin``.
    inv64 = inv.double()
    s = sae.input_scale
    with torch.no_grad():
        mean = {name: v.mean(0) for name, v in x.items()}  # [*shape] per target, param. units
        centre = None if bias is None else {k: v[0].detach() * s for k, v in bias.items()}
        xb = sq_dist(x, centre) * inv64 ** 2  # [b] exact ||X_b - b||^2
    if bias is not None and any(v.requires_grad for v in bias.values()):
        # d/db sum_b ||X_b - b||^2 = 2 B (b - mean X): a surrogate with value 0 and that gradient
        lin = sum((2 * B * (v[0].detach() - mean[k] * inv) * v[0]).sum()
                  for k, v in bias.items())
        lin = (lin - lin.detach()).double()  # []
    else:
        lin = 0.0
    resid = sq_error(xb, xd, G, codes)  # [b] ||X_b - Xhat_b||^2 (no gradient w.r.t. b via xb)
    with torch.no_grad():
        # sum_b ||X_b - mean||^2 = sum_b ||X_b - b||^2 - B ||mean - b||^2 (b_dec ~ the mean, so
        # this rarely cancels; when it does by > 10x, reduce the differences directly)
        mb = sum((mean[k].double() * inv64 - (0 if bias is None else bias[k][0].detach().double())
                  ).pow(2).sum() for k in mean)
        total = xb.sum() - B * mb
        if total < 0.1 * xb.sum():
            total = sq_dist(x, mean).sum() * inv64 ** 2
    out_dtype = torch.promote_types(pre.dtype, torch.float32)
    main = ((resid.sum() + lin) / total.clamp_min(1e-30)).to(out_dtype)

    if not with_aux:
        aux = torch.zeros((), device=pre.device)
        return StepLosses(main, aux, pre, codes, floor)

    # AuxK: the aux latents reconstruct e = X - Xhat (detached).
    db_det = db if bias is None else \
        sae.inner(sae.bias_sample(detach=True), "decoder")[0]  # [N] grad only via D
    e_sq = resid.detach()  # [b] ||e_b||^2
    r_aux = aux_sq_error(sae, pre, codes, aidx, dxc[:, k:] - db_det[aidx], e_sq, G).sum()
    with torch.no_grad():  # sum_b ||e_b - mean e||^2 = sum ||e_b||^2 - B ||mean e||^2
        zbar = codes.dense(N).double().mean(0)  # [N]
        md = sae.inner({kk: v[None] for kk, v in mean.items()}, "decoder")[0] * inv - db  # [N]
        m_sq = (mb - 2 * (zbar * md.double()).sum()
                + zbar @ G.double() @ zbar)  # ||mean_b e||^2
        tot_aux = e_sq.sum() - B * m_sq
    aux = (r_aux / tot_aux.clamp_min(1e-30)).nan_to_num(0.0).to(out_dtype)
    return StepLosses(main, aux, pre, codes, floor)


def dense_losses(sae, xs: Sample, dead: Tensor, aux_k: int, aux_coef: float) -> StepLosses:
    """Reference: the same losses through the dense reconstruction ``[batch, m, n]`` per target.

    ``xs`` is in SCALED units (``sae.to_scaled``).
    """
    out = sae(xs, training=True)
    up = {k: v.to(torch.promote_types(v.dtype, torch.float32)) for k, v in out.recon.items()}
    main = fvu(xs, up)
    n_dead = int(dead.sum())
    if aux_coef == 0 or n_dead == 0:
        return StepLosses(main, torch.zeros((), device=sae.device), out.pre_acts, out.codes,
                          out.batch_threshold)
    idx = aux_latents(out.pre_acts, dead, aux_k, sae.cfg.signed)  # [b, k_aux]
    vals = aux_values(out.pre_acts, idx, sae.cfg.signed)
    ehat = sae.decode(SparseCodes(idx, vals), with_bias=False)
    resid = {k: (xs[k] - up[k]).detach() for k in xs}
    r, tot = fvu_parts(resid, {k: v.to(up[k].dtype) for k, v in ehat.items()})
    aux = (r / tot.clamp_min(1e-30)).nan_to_num(0.0)
    return StepLosses(main, aux, out.pre_acts, out.codes, out.batch_threshold)
