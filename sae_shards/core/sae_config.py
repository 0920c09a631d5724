"""SAEConfig: every setting of the low-rank SAE and its trainer (the Hydra group ``sae/``).

A leaf module: it imports nothing heavy, so configs can be built and validated without torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

Sparsity = Literal["signed_topk", "topk", "batch_topk"]
SIGNED_MODES = frozenset({"signed_topk"})
"""Sparsity modes whose codes keep their sign (``SAEConfig.signed``)."""
SPARSITY_MODES: tuple[str, ...] = get_args(Sparsity)


@dataclass(frozen=True)
class SAEConfig:
    """Architecture and training settings of the low-rank SAE. Validated when built."""

    n_latents: int = 64
    """Number of latents (candidate shards)."""
    rank: int = 1
    """Rank of every latent's factors on each 2-D target (capped at min(m, n) per target). A rank
    with ``rank * (m + n) >= m * n`` stores more per latent than the dense ``m x n`` matrix: the
    run warns at its start, naming those targets and the largest rank that saves memory."""
    k: int = 4
    """Active latents per sample (per-sample average for batch_topk)."""
    sparsity: Sparsity = "signed_topk"
    """``signed_topk`` (k largest |c|, sign kept), ``topk`` (ReLU then top-k) or ``batch_topk``
    (ReLU, top k*batch over the batch; an EMA threshold is used at inference)."""
    use_b_dec: bool | None = None
    """Learn a decoder bias per target (the part of every reconstruction no latent carries,
    ``ShardSet.decoder_bias``), initialised from the first batch's mean and subtracted before
    encoding. None (default): on for dense
    per-step samples, off for factored per-event samples (``capture.granularity=group|completion``:
    their loss is taken about zero, since the batch mean would be a dense ``m x n`` matrix per
    target); true with factored samples is an error. The SAE resolves it: ``sae.uses_b_dec``."""
    lr: float = 1e-3
    """Adam learning rate (SAE parameters and Adam state stay fp32)."""
    batch_size: int = 32
    """Samples per SAE step, drawn with replacement from the buffer, uniformly unless
    ``runner.recent_frac`` draws a share from its newest slots (so a batch repeats
    samples while fewer are buffered; above ``capture.capacity`` it always does, which the run
    warns about)."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss per sample; None means min(4 * k, n_latents)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (0 switches AuxK off)."""
    dead_after: int = 4096
    """A latent that has not fired in this many training samples (drawn samples, repeats
    counted) is dead (``dead_frac``)."""
    scale_ema: float = 0.01
    """EMA rate of the running input scale (RMS of the sample norm; first batch initialises it)."""
    threshold_ema: float = 0.01
    """EMA rate of the batch_topk inference threshold."""
    autocast_bf16: bool = False
    """Run the forward pass under bf16 autocast (parameters, loss and Adam stay fp32)."""
    encode_chunk_mib: int = 256
    """Largest ``[batch, m, n_latents*rank]`` encode intermediate (for per-event samples the two
    ``[batch*T, n_latents*rank]`` ones together), in MiB, before the batch is split into
    chunks; also the most the end-of-run encode copies of the buffer at once (fp32, gathered
    and scaled; at least one slot)."""
    seed: int = 0
    """Seed of the SAE's initialisation."""

    @property
    def signed(self) -> bool:
        """Whether codes keep their sign (``signed_topk``): a latent scores and acts by ``|c|``,
        otherwise by ``relu(c)``. The one test of it; AuxK's choice of dead latents asks it."""
        return self.sparsity in SIGNED_MODES

    @property
    def codes_per_sample(self) -> int | None:
        """Latents each sample's codes hold: ``k`` for the per-sample top-k modes; None for
        ``batch_topk``, whose codes vary in width (padded with zero values to the widest)."""
        return None if self.sparsity == "batch_topk" else self.k

    def __post_init__(self) -> None:
        _positive(self, "n_latents", "batch_size", "rank", "dead_after", "encode_chunk_mib")
        if self.batch_size < 2:
            raise ValueError(f"sae.batch_size={self.batch_size} must be at least 2: the loss is "
                             "the fraction of the batch's variance left unexplained, which one "
                             "sample does not have")
        _integer(self, "k", "seed")
        if self.aux_k is not None:
            _integer(self, "aux_k")
        if not isinstance(self.autocast_bf16, bool):
            raise ValueError(f"sae.autocast_bf16={self.autocast_bf16!r} must be true or false")
        for name in ("lr", "aux_coef", "scale_ema", "threshold_ema"):  # NaN compares False
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                raise ValueError(f"sae.{name}={value!r} must be a finite number")
            object.__setattr__(self, name, float(value))  # an int given, as the schema stores it
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"sae.k={self.k} must be between 1 and sae.n_latents={self.n_latents}")
        if not -2**63 <= self.seed < 2**64:
            raise ValueError(f"sae.seed={self.seed} must be between -2**63 and 2**64 - 1 (what a "
                             "torch generator takes)")
        if self.sparsity not in SPARSITY_MODES:
            raise ValueError(f"sae.sparsity={self.sparsity!r} is unknown; choose one of {SPARSITY_MODES}")
        if self.aux_k is not None and not 1 <= self.aux_k <= self.n_latents:
            raise ValueError(
                f"sae.aux_k={self.aux_k} must be between 1 and sae.n_latents={self.n_latents}, "
                "or null for the default min(4*k, n_latents)"
            )
        if not (self.use_b_dec is None or isinstance(self.use_b_dec, bool)):
            raise ValueError(f"sae.use_b_dec={self.use_b_dec!r} must be true, false or null")
        if not self.lr > 0:
            raise ValueError(f"sae.lr={self.lr} must be positive (e.g. 1e-3)")
        if self.aux_coef < 0:
            raise ValueError(f"sae.aux_coef={self.aux_coef} must be >= 0 (0 switches AuxK off)")
        for name in ("scale_ema", "threshold_ema"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"sae.{name}={value} must be in (0, 1]")

    def check_sample_form(self, sample_form: str) -> None:
        """``ValueError`` for a setting an SAE of ``sample_form`` samples cannot train with
        (``use_b_dec=true`` or ``autocast_bf16=true`` with factored samples): the job config and
        ``ShardCallback`` ask before anything is written, the SAE again as it is built."""
        self.uses_b_dec(sample_form)
        if sample_form == "factored" and self.autocast_bf16:
            raise ValueError("sae.autocast_bf16=true is not supported with factored (per-event) "
                             "samples: their loss cancels too much for bf16 inner products; set "
                             "sae.autocast_bf16=false")

    def uses_b_dec(self, sample_form: str) -> bool:
        """Whether an SAE trained on ``sample_form`` samples (``dense`` per step, ``factored`` per
        event) learns a decoder bias: ``use_b_dec``, where None means on for dense samples and off
        for factored ones (whose loss is taken about zero). ``ValueError`` for true with factored
        samples; the job config and ``ShardCallback`` ask before anything is written."""
        if self.use_b_dec is None:
            return sample_form == "dense"
        if self.use_b_dec and sample_form == "factored":
            raise ValueError(
                "sae.use_b_dec=true is not supported with factored (per-event) samples: their "
                "loss is taken about zero, the batch mean would be a dense m x n matrix per "
                "target; set sae.use_b_dec=false or null with capture.granularity=group|completion")
        return bool(self.use_b_dec)

    @property
    def effective_aux_k(self) -> int:
        return self.aux_k if self.aux_k is not None else min(4 * self.k, self.n_latents)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAEConfig":
        """Build from a saved dict, rejecting unknown keys (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAE config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def _integer(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"sae.{name}={value!r} must be an integer")


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sae.{name}={value!r} must be a positive integer")
