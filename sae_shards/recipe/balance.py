"""Task balance: each task's share of the gradient energy of labelled samples.

The planted benchmark's ground truth (each task's principal direction) and its mmcs null are
only as good as the balance between tasks: when one task holds half of the squared norm, the
principal direction of any random relabelling is pulled towards that task's direction and the
shuffled null rises (docs/results.md). ``energy_shares`` measures the balance; the devices that
change it are the ``mixed`` schedule (every step trains every task on equally many prompt
groups), ``capture.normalize=unit`` (every event weighs the same), and
``task.options.reward_scale`` with ``rl.extra.scale_rewards=none`` (see ``tasks.MultiSkillTask``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

MIXED_SEPARATOR = "+"
"""Joins the labels of a sample that holds several tasks (a ``mixed`` step): ``"A+B+C+D"``."""


def sample_key(labels: str | Sequence[str]) -> str:
    """The key a sample's energy is counted under: its one task label, or the sorted labels of a
    multi-task sample joined by ``MIXED_SEPARATOR`` (``""`` for a sample without a label)."""
    if isinstance(labels, str):
        return labels
    return MIXED_SEPARATOR.join(sorted(set(map(str, labels))))


def sample_energy(samples: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[S]`` float64: each sample's squared norm summed over all targets (``sum ||x||^2``).

    ``samples``: ``{target: [S, ...]}`` (dense, any trailing shape), every target with the
    same number of samples S."""
    if not samples:
        raise ValueError("samples is empty; give {target: [S, ...]} tensors")
    sizes = {name: x.shape[0] if x.ndim else None for name, x in samples.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"every target must hold the same number of samples along dim 0; "
                         f"got {sizes}")
    n_samples = next(iter(sizes.values()))
    energy = torch.zeros(n_samples, dtype=torch.float64)
    for x in samples.values():
        flat = x.detach().reshape(n_samples, -1).to(device="cpu", dtype=torch.float64)
        energy += flat.square().sum(dim=1)
    return energy


def energy_shares(samples: Mapping[str, torch.Tensor],
                  labels: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Each task's share of the samples' total gradient energy ``sum_s sum_p ||x_sp||^2``.

    ``samples``: ``{target: [S, ...]}``; ``labels``: one entry per sample, a task label or a
    sequence of them (as ``samples.safetensors``' ``task_labels``); a sample of several tasks
    counts under their joined key (``sample_key``: ``"A+B"``). Returns ``{key: share}`` sorted by
    key, summing to 1 (every share 0 when all samples are zero). Select held-out samples by
    indexing both arguments before the call."""
    energy = sample_energy(samples)
    if len(labels) != energy.shape[0]:
        raise ValueError(f"{len(labels)} labels for {energy.shape[0]} samples; give one per sample")
    totals: dict[str, float] = {}
    for label, e in zip(labels, energy.tolist(), strict=True):
        key = sample_key(label)
        totals[key] = totals.get(key, 0.0) + e
    total = sum(totals.values())
    return {key: (totals[key] / total if total > 0 else 0.0) for key in sorted(totals)}
