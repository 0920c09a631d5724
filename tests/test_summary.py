"""``summary.json``'s figures (``capture/summary.py``) against their definitions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.capture.summary import first_last, heldout_fvu
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import TargetSpec
from sae_shards.core.trainer import SAETrainer


def test_first_last_are_the_means_of_the_first_and_last_part():
    """reward_first / reward_last (fifths) and fvu_first / fvu_last (tenths) are the means of the
    first and last ``len // parts`` values, at least one, NaNs left out (audit 124, SU01)."""
    assert first_last([float(v) for v in range(1, 11)], 5) == (1.5, 9.5)
    assert first_last([1.0, 2.0, 3.0], 5) == (1.0, 3.0)  # fewer than parts: one value each
    assert first_last([1.0, math.nan, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 5) == (1.0, 9.5)
    first, last = first_last([], 10)
    assert math.isnan(first) and math.isnan(last)


def test_the_heldout_fvu_of_a_single_heldout_sample_is_nan():
    """The held-out FVU is pooled about the held-out samples' mean, which one sample alone
    leaves without variance: with fewer than two it is NaN (documented), not the residual over
    1e-30 (audit 124, SU04)."""
    specs = [TargetSpec("w", (4, 3), rank=1), TargetSpec("b", (5,))]
    buffer = DeltaRingBuffer(specs, capacity=8, device="cpu")
    trainer = SAETrainer(LowRankSAE(specs, SAEConfig(n_latents=4, k=1, batch_size=4)))
    g = torch.Generator().manual_seed(0)

    def push(step: int, heldout: bool) -> None:
        buffer.push({t.name: torch.randn(t.shape, generator=g) for t in specs},
                    StepMeta(step, heldout=heldout))

    for step in range(1, 11):  # the ring holds steps 3..10: held out 5 and 9
        push(step, step in (5, 9))
    for _ in range(3):
        trainer.step(buffer.sample(4, torch.Generator().manual_seed(1), 0.0).batch)
    parts = SimpleNamespace(buffer=buffer, sae=trainer.sae)
    value, n = heldout_fvu(parts)
    assert n == 2 and math.isfinite(value) and 0 < value < 100
    for step in range(11, 19):  # steps 11..18: one held-out sample left, 18
        push(step, step == 18)
    value, n = heldout_fvu(parts)
    assert n == 1 and math.isnan(value)
