"""A synthetic stream of "deltas" with planted low-rank directions, for tests, docs and benchmarks.

Each planted direction spans a random subset (>= 2) of the targets, is rank-``rank`` on every
matrix it touches, and has unit norm over all targets. A sample is a sparse signed combination of
1..3 (configurable) planted directions plus isotropic Gaussian noise, all times ``scale`` (RL
deltas are tiny, so the SAE's input scaling is exercised).

:meth:`PlantedStream.sample_factored` gives the same kind of samples as per-event factors
``[batch, T, m + n]`` (``X = L^T R``, see :mod:`sae_shards.core.events`): the active directions'
own factors, plus low-rank Gaussian noise, zero-padded to ``T`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from sae_shards.core import events
from sae_shards.core.targets import TargetSpec, make_targets

DEFAULT_SHAPES = {
    "layers.0.mlp.down_proj.weight": (64, 48),
    "layers.1.mlp.up_proj.weight": (48, 64),
    "layers.1.self_attn.o_proj.weight": (32, 32),
    "layers.1.input_layernorm.weight": (64,),
}


@dataclass(frozen=True)
class PlantedConfig:
    """Settings of a planted stream."""

    shapes: dict = field(default_factory=lambda: dict(DEFAULT_SHAPES))
    """``{target name: shape}`` of the synthetic targets (1-D and 2-D)."""
    n_directions: int = 12
    """Number of planted directions K."""
    rank: int = 1
    """Rank of each planted direction on each matrix it touches."""
    min_targets: int = 2
    """Each direction spans between min_targets and all targets."""
    active_min: int = 1
    """Fewest planted directions active per sample."""
    active_max: int = 3
    """Most planted directions active per sample."""
    coef_min: float = 0.5
    """Smallest |coefficient| of an active direction (sign is random)."""
    coef_max: float = 1.5
    """Largest |coefficient| of an active direction."""
    noise_frac: float = 0.2
    """Noise norm as a fraction of the expected signal norm (noise-to-signal amplitude ratio)."""
    scale: float = 1e-4
    """Overall scale of the samples (parameter units)."""
    seed: int = 0
    """Seed of the planted directions (sampling uses its own generator)."""
    noise_rank: int = 2
    """Factored samples only: rank of the Gaussian noise on each matrix target."""

    def __post_init__(self) -> None:
        if not 1 <= self.active_min <= self.active_max <= self.n_directions:
            raise ValueError(
                f"need 1 <= active_min ({self.active_min}) <= active_max ({self.active_max}) "
                f"<= n_directions ({self.n_directions})")
        if not 1 <= self.min_targets <= len(self.shapes):
            raise ValueError(f"min_targets={self.min_targets} must be in 1..{len(self.shapes)}")
        if self.noise_frac < 0:
            raise ValueError(f"noise_frac={self.noise_frac} must be >= 0")
        if self.noise_rank < 1:
            raise ValueError(f"noise_rank={self.noise_rank} must be >= 1")


class PlantedBatch(NamedTuple):
    sample: dict[str, Tensor]  # {target: [batch, *shape]} parameter units
    coefficients: Tensor  # [batch, n_directions] signed, 0 where inactive


class PlantedStream:
    """Ground-truth directions and a sampler of noisy sparse combinations of them."""

    def __init__(self, cfg: PlantedConfig):
        self.cfg = cfg
        self.targets: list[TargetSpec] = make_targets(cfg.shapes, rank=cfg.rank)
        gen = torch.Generator().manual_seed(cfg.seed)
        # {target: [K, *shape]}, unit norm per direction; for matrix targets also its factors
        # {target: (U [K, m, rank], V [K, n, rank])} with U_k V_k^T = directions[target][k]
        self.directions, self.direction_factors = self._plant(gen)
        mean_active = (cfg.active_min + cfg.active_max) / 2
        mean_sq_coef = (cfg.coef_max**3 - cfg.coef_min**3) / (3 * (cfg.coef_max - cfg.coef_min)) \
            if cfg.coef_max > cfg.coef_min else cfg.coef_min**2
        self.signal_sq = mean_active * mean_sq_coef  # expected ||signal||^2 (unit-scale units)
        self.dim = sum(t.numel for t in self.targets)
        self.noise_std = cfg.noise_frac * (self.signal_sq / self.dim) ** 0.5

    def _plant(self, gen: torch.Generator
               ) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        K, cfg = self.cfg.n_directions, self.cfg
        dirs = {t.name: torch.zeros(K, *t.shape) for t in self.targets}
        facs = {t.name: (torch.zeros(K, t.shape[0], t.rank), torch.zeros(K, t.shape[1], t.rank))
                for t in self.targets if t.is_matrix}
        for k in range(K):
            n_t = int(torch.randint(cfg.min_targets, len(self.targets) + 1, (1,), generator=gen))
            chosen = torch.randperm(len(self.targets), generator=gen)[:n_t].tolist()
            for j in chosen:
                t = self.targets[j]
                if t.is_matrix:
                    u = torch.randn(t.shape[0], t.rank, generator=gen)
                    v = torch.randn(t.shape[1], t.rank, generator=gen)
                    d = u @ v.T
                    facs[t.name][0][k], facs[t.name][1][k] = u / d.norm(), v
                else:
                    d = torch.randn(t.shape, generator=gen)
                dirs[t.name][k] = d / d.norm()
            norm = sum(dirs[t.name][k].pow(2).sum() for t in self.targets).sqrt()
            for t in self.targets:
                dirs[t.name][k] /= norm
                if t.is_matrix:
                    facs[t.name][0][k] /= norm
        return dirs, facs

    def _coefficients(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Signed coefficients ``[batch, K]``, ``active_min..active_max`` nonzero per row."""
        cfg, K = self.cfg, self.cfg.n_directions
        n_active = torch.randint(cfg.active_min, cfg.active_max + 1, (batch_size,), generator=generator)
        ranks = torch.rand(batch_size, K, generator=generator).argsort(1)  # random permutation
        active = ranks < n_active[:, None]  # [b, K]
        mag = cfg.coef_min + (cfg.coef_max - cfg.coef_min) * torch.rand(batch_size, K, generator=generator)
        sign = torch.randint(0, 2, (batch_size, K), generator=generator) * 2 - 1
        return active * mag * sign  # [b, K]

    def sample(self, batch_size: int, generator: torch.Generator) -> PlantedBatch:
        cfg = self.cfg
        coef = self._coefficients(batch_size, generator)  # [b, K]
        out = {}
        for t in self.targets:
            d = self.directions[t.name].flatten(1)  # [K, numel]
            x = coef @ d + self.noise_std * torch.randn(batch_size, t.numel, generator=generator)
            out[t.name] = (cfg.scale * x).view(batch_size, *t.shape)
        return PlantedBatch(out, coef)

    def min_event_rank(self) -> int:
        """Fewest factor rows ``T`` a factored sample needs: ``active_max * rank + noise_rank``."""
        return self.cfg.active_max * self.cfg.rank + self.cfg.noise_rank

    def sample_factored(self, batch_size: int, generator: torch.Generator, T: int
                        ) -> PlantedBatch:
        """Planted samples as factors ``{target: [batch, T, m + n]}`` (1-D targets dense).

        On a matrix target the rows are, per active direction ``k`` (coefficient ``c``), the
        ``rank`` rows of ``c U_k^T`` beside ``V_k^T``, then ``noise_rank`` rows of Gaussian noise
        whose product has the dense stream's expected noise norm on that target, then zero rows.
        Materialised, a sample is a sparse combination of planted directions plus rank
        ``noise_rank`` noise, times ``scale``.
        """
        cfg = self.cfg
        if T < self.min_event_rank():
            raise ValueError(f"T={T} rows cannot hold active_max * rank + noise_rank = "
                             f"{self.min_event_rank()} factor rows")
        coef = self._coefficients(batch_size, generator)  # [b, K]
        # [b, A]: the active directions first (A = active_max slots), then inactive ones
        order = (coef == 0).to(torch.int8).argsort(dim=1, stable=True)[:, :cfg.active_max]
        c = coef.gather(1, order)  # [b, A], zero in the inactive slots
        q = cfg.noise_rank
        out = {}
        for t in self.targets:
            if not t.is_matrix:
                d = self.directions[t.name]  # [K, m]
                noise = self.noise_std * torch.randn(batch_size, *t.shape, generator=generator)
                out[t.name] = cfg.scale * (coef @ d + noise)
                continue
            m, n = t.shape
            U, V = self.direction_factors[t.name]  # [K, m, r], [K, n, r]
            Ls = (U[order] * c[..., None, None]).transpose(2, 3).reshape(batch_size, -1, m)
            Rs = (V[order] * (c != 0)[..., None, None]).transpose(2, 3).reshape(
                batch_size, -1, n)  # [b, A r, n], zero rows for inactive slots
            # E||sum_t g_t h_t^T||^2 = q m n for standard normal rows: noise_std^2 m n in total
            Ln = self.noise_std / q ** 0.5 * torch.randn(batch_size, q, m, generator=generator)
            Rn = torch.randn(batch_size, q, n, generator=generator)
            L = torch.cat([Ls, Ln], 1)  # [b, A r + q, m]
            R = cfg.scale * torch.cat([Rs, Rn], 1)  # [b, A r + q, n]
            pad = T - L.shape[1]
            out[t.name] = events.join(torch.cat([L, L.new_zeros(batch_size, pad, m)], 1),
                                      torch.cat([R, R.new_zeros(batch_size, pad, n)], 1))
        return PlantedBatch(out, coef)

    def noise_only(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Isotropic noise with the planted samples' expected norm: null data with no structure."""
        std = ((self.signal_sq + self.dim * self.noise_std**2) / self.dim) ** 0.5
        return {t.name: self.cfg.scale * std * torch.randn(batch_size, *t.shape, generator=generator)
                for t in self.targets}

    def noise_only_factored(self, batch_size: int, generator: torch.Generator, T: int
                            ) -> dict[str, Tensor]:
        """:meth:`noise_only` as factored samples: ``T`` Gaussian rows per matrix target (rank
        ``min(T, m, n)`` noise), with the planted samples' expected norm."""
        std = ((self.signal_sq + self.dim * self.noise_std**2) / self.dim) ** 0.5
        out = {}
        for t in self.targets:
            if not t.is_matrix:
                out[t.name] = self.cfg.scale * std * torch.randn(batch_size, *t.shape,
                                                                 generator=generator)
                continue
            m, n = t.shape
            L = std / T ** 0.5 * torch.randn(batch_size, T, m, generator=generator)
            R = self.cfg.scale * torch.randn(batch_size, T, n, generator=generator)
            out[t.name] = events.join(L, R)
        return out
