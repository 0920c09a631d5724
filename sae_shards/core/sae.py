"""The low-rank (L3D-style) sparse autoencoder over parameter deltas.

For a 2-D target p of shape (m, n) and rank r, latent i owns decoder factors ``U[i]: (m, r)``,
``V[i]: (n, r)`` (direction ``U V^T``) and untied encoder factors ``A[i], B[i]`` of the same
shapes. 1-D targets use plain vectors. A latent's decoder direction across all targets has unit
Frobenius norm: that direction is the *shard*.

The SAE works in *scaled units*: a sample divided by ``input_scale`` (the running RMS of sample
norms kept by the trainer). :meth:`LowRankSAE.to_scaled` maps parameter-unit samples in; an
activation times ``input_scale`` is the shard's coefficient in parameter units.

Samples come in one of two forms (``sample_form``): ``"dense"`` (per-step deltas, a matrix
target's sample is ``[m, n]``) or ``"factored"`` (per-event gradients, ``[T, m + n]`` meaning
``L^T R``, see :mod:`sae_shards.core.events`). 1-D targets are dense vectors in both. Factored
samples are encoded without ever forming ``L^T R``, and have no decoder bias (``uses_b_dec``).

Nothing here materialises the ``n_latents`` dense directions except the explicitly named
``dense_*`` helpers, which exist for tests, small analyses and the parity reference.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping, NamedTuple, Sequence, get_args

import torch
from torch import Tensor, nn

from sae_shards.core import events
from sae_shards.core.factored import cross_gram
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.sparsity import SparseCodes, batch_topk, select_codes, threshold_codes
from sae_shards.core.targets import TargetSpec

Sample = Mapping[str, Tensor]  # {target name: [batch, *shape]} or factored [batch, T, m + n]
SampleForm = Literal["dense", "factored"]
SAMPLE_FORMS: tuple[str, ...] = get_args(SampleForm)


class SAEOutput(NamedTuple):
    """What one forward pass returns (all in scaled units)."""

    pre_acts: Tensor  # [batch, n_latents] encoder output before sparsity
    codes: SparseCodes  # active latents per sample: indices/values [batch, k]
    recon: dict[str, Tensor] | None  # {target: [batch, *shape]} dense reconstruction incl.
    # b_dec; None when not asked for (the default for factored input)
    batch_threshold: Tensor | None  # batch_topk only: smallest kept activation this batch


class _TargetFactors(nn.Module):
    """Encoder and decoder factors of every latent on one target."""

    def __init__(self, spec: TargetSpec, n_latents: int, generator: torch.Generator):
        super().__init__()
        self.spec = spec
        if spec.is_matrix:
            m, n = spec.shape
            self.U = nn.Parameter(torch.randn(n_latents, m, spec.rank, generator=generator))
            self.V = nn.Parameter(torch.randn(n_latents, n, spec.rank, generator=generator))
            self.A = nn.Parameter(self.U.detach().clone())
            self.B = nn.Parameter(self.V.detach().clone())
        else:
            self.d_dec = nn.Parameter(torch.randn(n_latents, spec.shape[0], generator=generator))
            self.d_enc = nn.Parameter(self.d_dec.detach().clone())

    def factors(self, which: str) -> tuple[Tensor, ...]:
        """(U, V) / (A, B) for matrices, (d,) for vectors."""
        if self.spec.is_matrix:
            return (self.U, self.V) if which == "decoder" else (self.A, self.B)
        return (self.d_dec,) if which == "decoder" else (self.d_enc,)


class LowRankSAE(nn.Module):
    """Sparse autoencoder whose latent directions are low-rank per target matrix."""

    def __init__(self, targets: Sequence[TargetSpec], cfg: SAEConfig,
                 sample_form: SampleForm = "dense"):
        super().__init__()
        if sample_form not in SAMPLE_FORMS:
            raise ValueError(f"sample_form={sample_form!r} is unknown; choose one of "
                             f"{SAMPLE_FORMS}")
        if not targets:
            raise ValueError("the SAE needs at least one target (capture.targets matched nothing)")
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate target names in {names}")
        stacked = [t.name for t in targets if t.is_stacked]
        if stacked:
            raise ValueError(f"stacked targets {stacked[:3]} reach the SAE whole; give it "
                             "targets.expand_stacked(targets), one matrix per expert")
        self.cfg = cfg
        self.sample_form = sample_form
        cfg.check_sample_form(sample_form)
        self.uses_b_dec = cfg.uses_b_dec(sample_form)
        self.targets = list(targets)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.factors = nn.ModuleList(_TargetFactors(t, cfg.n_latents, gen) for t in self.targets)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        # One [*shape] per target, or None: an unused bias is never allocated (per-event at 7B
        # it would be 26 GB of zeros) nor checkpointed.
        self.b_dec: nn.ParameterList | None = nn.ParameterList(
            nn.Parameter(torch.zeros(t.shape)) for t in self.targets
        ) if self.uses_b_dec else None
        # Running RMS of sample norms (parameter units); 0 until the trainer sees data.
        self.register_buffer("input_scale", torch.zeros(()))
        # batch_topk inference threshold (scaled units); NaN until trained.
        self.register_buffer("threshold", torch.full((), math.nan))
        with torch.no_grad():
            self.normalize_decoder_()
            for tf in self.factors:  # encoder starts equal to the normalised decoder
                for enc, dec in zip(tf.factors("encoder"), tf.factors("decoder")):
                    enc.copy_(dec)

    # ------------------------------------------------------------------ sizes
    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def device(self) -> torch.device:
        return self.b_enc.device

    def factored_param_count(self) -> int:
        """Weights of the encoder + decoder directions: ``2 N sum_p r_p (m_p + n_p)``."""
        return 2 * self.n_latents * sum(t.factored_numel for t in self.targets)

    def dense_param_count(self) -> int:
        """What a dense SAE with the same latents would need: ``2 N sum_p m_p n_p``."""
        return 2 * self.n_latents * sum(t.numel for t in self.targets)

    # ------------------------------------------------------------------ units
    def to_scaled(self, sample: Sample) -> dict[str, Tensor]:
        """Parameter units -> the SAE's scaled units (divide by ``input_scale``; a factored matrix
        sample only in its ``R`` factor). Each target's form is read from its shape."""
        if not self.input_scale > 0:
            raise RuntimeError("input_scale is not set yet: train at least one step first")
        inv = 1.0 / self.input_scale
        out = {}
        for t in self.targets:
            x = sample[t.name].to(self.device, torch.float32)
            out[t.name] = events.scale(x, t, inv) if form_of(x, t) == "factored" else x * inv
        return out

    # ------------------------------------------------------------------ encode
    def inner(self, x: Sample, which: str = "encoder", form: SampleForm | None = None) -> Tensor:
        """``<x, W_i>_F`` summed over targets for every latent, in factored form.

        ``x`` is ``{target: [batch, *shape]}`` (dense) or, for matrix targets, factored
        ``{target: [batch, T, m + n]}``; with ``form=None`` each target's form is read from its
        shape (unambiguous: a dense sample's last axis is ``n``, a factored one's ``m + n``), so
        dense references (planted directions, materialised samples) work on any SAE. Returns
        ``[batch, n_latents]``. ``which`` picks the encoder (A B^T) or decoder (U V^T) directions.
        """
        out = None
        for tf in self.factors:
            xp = x[tf.spec.name]
            if not tf.spec.is_matrix:
                part = _vector_inner(xp, *tf.factors(which))
            elif (form or form_of(xp, tf.spec)) == "factored":
                part = self._event_inner(xp, *tf.factors(which))
            else:
                part = self._matrix_inner(xp, *tf.factors(which))
            out = part if out is None else out + part
        return out

    def _event_inner(self, x: Tensor, left: Tensor, right: Tensor) -> Tensor:
        # x [b, T, m + n]; left [N, m, r]; right [N, n, r]
        b, T, _ = x.shape
        n_lat, _, r = left.shape
        # two intermediates [chunk*T, N*r]
        chunk = max(1, (self.cfg.encode_chunk_mib << 20) // (4 * 2 * T * n_lat * r))
        parts = [_event_inner_chunk(x[i:i + chunk], left, right) for i in range(0, b, chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _matrix_inner(self, x: Tensor, left: Tensor, right: Tensor) -> Tensor:
        # x [b, m, n]; left [N, m, r]; right [N, n, r]
        b, m, n = x.shape
        n_lat, _, r = left.shape
        width = n_lat * r
        chunk = max(1, (self.cfg.encode_chunk_mib << 20) // (4 * m * width))  # [chunk, m, N*r]
        parts = [_matrix_inner_chunk(x[i:i + chunk], left, right) for i in range(0, b, chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def encode_pre(self, xs: Sample) -> Tensor:
        """Pre-activations ``[batch, n_latents]`` of scaled samples, ``<x - b_dec, W_i> + b_enc``.

        By linearity ``<x - b_dec, W> = <x, W> - <b_dec, W>``: the second term is one "sample",
        so no centred copy of the batch (nor its gradient) is ever made. Without a decoder bias
        (factored samples, ``sae.use_b_dec=false``): ``<x, W_i> + b_enc``.
        """
        bias = self.bias_sample()
        if bias is None:
            return self.inner(xs, "encoder") + self.b_enc
        return self.inner(xs, "encoder") - self.inner(bias, "encoder") + self.b_enc

    def bias_sample(self, detach: bool = False) -> dict[str, Tensor] | None:
        """``b_dec`` as a one-sample batch ``{target: [1, *shape]}``; None without a decoder
        bias (``uses_b_dec`` false)."""
        if self.b_dec is None:
            return None
        return {t.name: (bd.detach() if detach else bd)[None]
                for t, bd in zip(self.targets, self.b_dec)}

    def select(self, pre: Tensor, training: bool) -> tuple[SparseCodes, Tensor | None]:
        """Apply the sparsity; batch_topk uses the batch in training, the threshold otherwise."""
        if self.cfg.sparsity != "batch_topk":
            return select_codes(pre, self.cfg.sparsity, self.cfg.k), None
        if training or torch.isnan(self.threshold):
            return batch_topk(pre, self.cfg.k)
        return threshold_codes(pre, self.threshold), None

    # ------------------------------------------------------------------ decode
    def decode(self, codes: SparseCodes, with_bias: bool = True) -> dict[str, Tensor]:
        """``sum_i z_i U_i V_i^T (+ b_dec)`` per target, gathering only the active latents."""
        idx, val = codes  # [b, k]
        b, k = idx.shape
        out = {}
        bias = self.bias_sample() if with_bias else None
        for tf in self.factors:
            if tf.spec.is_matrix:
                U, V = tf.factors("decoder")  # [N, m, r], [N, n, r]
                m, n, r = tf.spec.shape[0], tf.spec.shape[1], tf.spec.rank
                Ug = (U[idx] * val[..., None, None].to(U.dtype))  # [b, k, m, r]
                Ug = Ug.permute(0, 2, 1, 3).reshape(b, m, k * r)
                Vg = V[idx].permute(0, 2, 1, 3).reshape(b, n, k * r)
                rec = Ug @ Vg.transpose(1, 2)  # [b, m, n]
            else:
                rec = torch.einsum("bk,bkm->bm", val, tf.d_dec[idx])  # [b, m]
            out[tf.spec.name] = rec if bias is None else rec + bias[tf.spec.name][0]
        return out

    def forward(self, xs: Sample, training: bool = False,
                with_recon: bool | None = None) -> SAEOutput:
        """Encode, select, and (``with_recon``; default: when every target's sample is dense)
        decode densely.

        The reconstruction is always dense ``[batch, *shape]``: for factored samples it costs
        ``m n`` per sample, so it is only built when asked for.
        """
        pre = self.encode_pre(xs)
        codes, floor = self.select(pre, training)
        if with_recon is None:
            with_recon = all(form_of(xs[t.name], t) == "dense" for t in self.targets)
        return SAEOutput(pre, codes, self.decode(codes) if with_recon else None, floor)

    @torch.no_grad()
    def encode(self, xs: Sample) -> SparseCodes:
        """Inference: the active latents of scaled samples."""
        return self.select(self.encode_pre(xs), training=False)[0]

    # ------------------------------------------------------------------ geometry
    def decoder_sq_norms(self) -> Tensor:
        """``||D_i||_F^2 = sum_p trace((U^T U)(V^T V)) + sum_q ||d_q||^2``, shape [n_latents]."""
        total = None
        for tf in self.factors:
            if tf.spec.is_matrix:
                U, V = tf.factors("decoder")
                part = (_gram(U) * _gram(V)).sum((1, 2))
            else:
                part = tf.d_dec.pow(2).sum(-1)
            total = part if total is None else total + part
        return total

    def decoder_gram(self) -> Tensor:
        """``<D_i, D_j>_F`` for all pairs, ``[n_latents, n_latents]``, in factored form."""
        total = None
        for tf in self.factors:
            f = tf.factors("decoder")
            part = cross_gram(f, f)  # [N, N]
            total = part if total is None else total + part
        return total

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder direction to unit norm across all targets.

        Each matrix target's U and V are first balanced (equal Frobenius norms per latent), which
        leaves U V^T unchanged but stops one factor from drifting large and the other small.
        """
        for tf in self.factors:
            if tf.spec.is_matrix:
                U, V = tf.factors("decoder")
                nu = U.flatten(1).norm(dim=1).clamp_min(1e-12)
                nv = V.flatten(1).norm(dim=1).clamp_min(1e-12)
                g = (nv / nu).sqrt()[:, None, None]
                U.mul_(g)
                V.div_(g)
        inv = self.decoder_sq_norms().clamp_min(1e-24).rsqrt()  # [N]
        for tf in self.factors:
            if tf.spec.is_matrix:
                U, V = tf.factors("decoder")
                U.mul_(inv.sqrt()[:, None, None])
                V.mul_(inv.sqrt()[:, None, None])
            else:
                tf.d_dec.mul_(inv[:, None])

    # ------------------------------------------------------------------ dense views (small only)
    @torch.no_grad()
    def dense_directions(self, which: str = "decoder", latents: Tensor | None = None
                         ) -> dict[str, Tensor]:
        """Materialise directions ``{target: [n, *shape]}`` for the given latents (default all).

        Costs ``n * sum_p m_p n_p`` memory: for tests, small models and a handful of shards.
        """
        sel = torch.arange(self.n_latents, device=self.device) if latents is None else latents
        out = {}
        for tf in self.factors:
            f = tf.factors(which)
            if tf.spec.is_matrix:
                out[tf.spec.name] = torch.einsum("imr,inr->imn", f[0][sel], f[1][sel])
            else:
                out[tf.spec.name] = f[0][sel].clone()
        return out


def _gram(F: Tensor) -> Tensor:
    """Per-latent ``F_i^T F_i``: [N, d, r] -> [N, r, r]."""
    return torch.einsum("idr,ids->irs", F, F)


def _vector_inner(x: Tensor, d: Tensor) -> Tensor:
    # x [b, m]; d [N, m] -> [b, N]
    return x @ d.T


def form_of(x: Tensor, spec: TargetSpec) -> SampleForm:
    """``"factored"`` for a matrix target's ``[..., T, m + n]``, ``"dense"`` for
    ``[..., m, n]`` (and for every 1-D target's ``[..., m]``); ValueError for anything else."""
    if not spec.is_matrix:
        return "dense"
    m, n = spec.shape
    if x.ndim >= 2 and x.shape[-1] == m + n:
        return "factored"
    if tuple(x.shape[-2:]) == (m, n):
        return "dense"
    raise ValueError(f"target {spec.name!r}: a sample of shape {tuple(x.shape)} is neither dense "
                     f"[..., {m}, {n}] nor factored [..., T, {m + n}]")


def _event_inner_chunk(x: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``<L_b^T R_b, left_i right_i^T> = sum_{t,r} (L_b left_i)[t, r] (R_b right_i)[t, r]`` for
    all latents: factored x [b, T, m + n] -> [b, N].

    Two GEMMs ``[b*T, m] @ [m, N*r]`` and ``[b*T, n] @ [n, N*r]``: ``T (m + n) N r`` per sample
    instead of ``m n N r``; padding rows (zero) add nothing.
    """
    b, T, _ = x.shape
    n_lat, m, r = left.shape
    L, R = events.split(x, m)  # [b, T, m], [b, T, n]
    Lw = left.permute(1, 0, 2).reshape(m, n_lat * r)  # [m, N*r]
    Rw = right.permute(1, 0, 2).reshape(-1, n_lat * r)  # [n, N*r]
    lp = L.reshape(b * T, m) @ Lw  # [b*T, N*r]
    rq = R.reshape(b * T, -1) @ Rw  # [b*T, N*r]
    return (lp * rq).view(b, T, n_lat, r).sum((1, 3))


def _matrix_inner_chunk(x: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``sum_r left_ir^T x right_ir`` for all latents: x [b, m, n] -> [b, N].

    Always contracts the last (contiguous) axis first, as one ``[b*m, n] @ [n, N*r]`` GEMM: for
    tall matrices (m > n) this beats ``x^T @ left`` (a transposed batched matmul, which also makes
    autograd copy the batch) although the intermediate ``[b, m, N*r]`` is larger; the caller
    chunks the batch to bound it.
    """
    b, m, n = x.shape
    n_lat, _, r = left.shape
    L = left.permute(1, 0, 2).reshape(m, n_lat * r)  # [m, N*r]
    R = right.permute(1, 0, 2).reshape(n, n_lat * r)  # [n, N*r]
    xr = (x.reshape(b * m, n) @ R).view(b, m, n_lat * r)  # [b, m, N*r]
    prod = (xr * L).sum(1)  # [b, N*r]
    return prod.view(b, n_lat, r).sum(-1)
