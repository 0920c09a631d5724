"""A synthetic stream of "deltas" with planted low-rank directions, for tests, docs and benchmarks.

Each planted direction spans a random subset (>= 2) of the targets, is rank-``rank`` on every
matrix it touches, and has unit norm over all targets. A sample is a sparse signed combination of
1..3 (configurable) planted directions plus isotropic Gaussian noise, all times ``scale`` (RL
deltas are tiny, so the SAE's input scaling is exercised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

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

    def __post_init__(self) -> None:
        if not 1 <= self.active_min <= self.active_max <= self.n_directions:
            raise ValueError(
                f"need 1 <= active_min ({self.active_min}) <= active_max ({self.active_max}) "
                f"<= n_directions ({self.n_directions})")
        if not 1 <= self.min_targets <= len(self.shapes):
            raise ValueError(f"min_targets={self.min_targets} must be in 1..{len(self.shapes)}")
        if self.noise_frac < 0:
            raise ValueError(f"noise_frac={self.noise_frac} must be >= 0")


class PlantedBatch(NamedTuple):
    sample: dict[str, Tensor]  # {target: [batch, *shape]} parameter units
    coefficients: Tensor  # [batch, n_directions] signed, 0 where inactive


class PlantedStream:
    """Ground-truth directions and a sampler of noisy sparse combinations of them."""

    def __init__(self, cfg: PlantedConfig):
        self.cfg = cfg
        self.targets: list[TargetSpec] = make_targets(cfg.shapes, rank=cfg.rank)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.directions = self._plant(gen)  # {target: [K, *shape]}, unit norm per direction
        mean_active = (cfg.active_min + cfg.active_max) / 2
        mean_sq_coef = (cfg.coef_max**3 - cfg.coef_min**3) / (3 * (cfg.coef_max - cfg.coef_min)) \
            if cfg.coef_max > cfg.coef_min else cfg.coef_min**2
        self.signal_sq = mean_active * mean_sq_coef  # expected ||signal||^2 (unit-scale units)
        self.dim = sum(t.numel for t in self.targets)
        self.noise_std = cfg.noise_frac * (self.signal_sq / self.dim) ** 0.5

    def _plant(self, gen: torch.Generator) -> dict[str, Tensor]:
        K, cfg = self.cfg.n_directions, self.cfg
        dirs = {t.name: torch.zeros(K, *t.shape) for t in self.targets}
        for k in range(K):
            n_t = int(torch.randint(cfg.min_targets, len(self.targets) + 1, (1,), generator=gen))
            chosen = torch.randperm(len(self.targets), generator=gen)[:n_t].tolist()
            for j in chosen:
                t = self.targets[j]
                if t.is_matrix:
                    u = torch.randn(t.shape[0], t.rank, generator=gen)
                    v = torch.randn(t.shape[1], t.rank, generator=gen)
                    d = u @ v.T
                else:
                    d = torch.randn(t.shape, generator=gen)
                dirs[t.name][k] = d / d.norm()
            norm = sum(dirs[t.name][k].pow(2).sum() for t in self.targets).sqrt()
            for t in self.targets:
                dirs[t.name][k] /= norm
        return dirs

    def sample(self, batch_size: int, generator: torch.Generator) -> PlantedBatch:
        cfg, K = self.cfg, self.cfg.n_directions
        n_active = torch.randint(cfg.active_min, cfg.active_max + 1, (batch_size,), generator=generator)
        ranks = torch.rand(batch_size, K, generator=generator).argsort(1)  # random permutation
        active = ranks < n_active[:, None]  # [b, K]
        mag = cfg.coef_min + (cfg.coef_max - cfg.coef_min) * torch.rand(batch_size, K, generator=generator)
        sign = torch.randint(0, 2, (batch_size, K), generator=generator) * 2 - 1
        coef = active * mag * sign  # [b, K]
        out = {}
        for t in self.targets:
            d = self.directions[t.name].flatten(1)  # [K, numel]
            x = coef @ d + self.noise_std * torch.randn(batch_size, t.numel, generator=generator)
            out[t.name] = (cfg.scale * x).view(batch_size, *t.shape)
        return PlantedBatch(out, coef)

    def noise_only(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Isotropic noise with the planted samples' expected norm: null data with no structure."""
        std = ((self.signal_sq + self.dim * self.noise_std**2) / self.dim) ** 0.5
        return {t.name: self.cfg.scale * std * torch.randn(batch_size, *t.shape, generator=generator)
                for t in self.targets}
