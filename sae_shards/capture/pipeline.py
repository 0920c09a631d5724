"""The capture pipeline's parts for one model: targets -> ring buffer -> SAE -> online loop.

``build_pipeline`` resolves the targets against the trained model, checks the buffer's memory
before allocating it, and builds the SAE, its trainer, the per-delta work loop and its runner
(inline or thread). ``ShardCallback`` is its one caller; tests and benchmarks reach it through
the callback too, so the pipeline is wired in exactly one place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_shards.capture.buffer import DeltaRingBuffer
from sae_shards.capture.event_precondition import COVARIANCE_KINDS
from sae_shards.capture.event_sites import check_head_not_targeted, hook_sites
from sae_shards.capture.memory import (buffer_memory_bytes, cgroup_note, check_buffer_memory,
                                      check_checkpoint_host_memory, check_sae_memory,
                                      checkpoint_host_bytes, default_memory_budget,
                                      host_available)
from sae_shards.capture.policy_memory import NONE as NO_PENDING
from sae_shards.capture.policy_memory import PendingMemory, size
from sae_shards.capture.runner import InlineRunner, SAEWorkLoop, ThreadRunner, make_runner
from sae_shards.capture.selection import (Target, check_stacked, default_targets, select_targets,
                                          target_shapes)
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import TargetSpec, expand_stacked, make_targets
from sae_shards.core.trainer import SAETrainer
from sae_shards.run.config import CaptureConfig, RunnerConfig, sample_form

STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16}

WORKING_COPIES = {"update": 1, "grad": 0, "precond": 1, "deconv": 2}
"""fp32 copies of the targets the capture keeps besides the buffer (snapshot, previous
momentum-free step), per source; bf16 storage adds one fp32 scratch."""


class Pipeline(NamedTuple):
    targets: dict[str, Target]
    specs: list[TargetSpec]  # the SAE's: a stacked target one matrix per expert (the buffer's
    # own, as captured, are ``buffer.targets``)
    buffer: DeltaRingBuffer
    sae: LowRankSAE
    trainer: SAETrainer
    loop: SAEWorkLoop
    runner: InlineRunner | ThreadRunner


def _after(pending: PendingMemory) -> str:
    """The part of an error that says what free memory was counted without."""
    if not pending.total:
        return ""
    return (f"\nFree memory was counted less what the policy's first training step will "
            f"allocate: {pending.describe()}.")


def _cgroup(device: torch.device) -> str:
    """The part of an error that says the CPU's free memory is set by a cgroup memory limit,
    when it is (``cgroup_note``); "" on an accelerator."""
    return cgroup_note(host_available()) if device.type == "cpu" else ""


def resolve_targets(model: torch.nn.Module, patterns: list[str] | None,
                    granularity: str = "step", warn: bool = True) -> dict[str, Target]:
    """``capture.targets`` against the trained model; None: every block's attention and MLP
    matrices, found by module type (``selection.default_targets``; ``warn``: name what they
    leave out), and per step also a mixture of experts' stacked expert tensors. Per event, a
    stacked target is refused (``check_stacked``), and so are a target no hook can split by event
    (``event_sites.hook_sites``: norms, embeddings) and the LM head under TRL's fused head
    (``event_sites.check_head_not_targeted``)."""
    per_step = granularity == "step"
    targets = select_targets(model, default_targets(model, stacked=per_step, warn=warn)
                             if patterns is None else list(patterns))
    if not per_step:
        check_stacked(targets, granularity)
        hook_sites(model, targets)  # a target the hooks cannot split by event (a norm weight)
        check_head_not_targeted(model, targets)
    return targets


def working_bytes(capture: CaptureConfig, specs: list[TargetSpec]) -> int:
    """Device memory the capture keeps besides the buffer: fp32 copies of the targets for per-step
    sources (``WORKING_COPIES``, plus a scratch for bf16 storage); for ``precondition=kfac`` (and
    ``kfac_output``) the covariances ``m^2 + n^2`` of each matrix target and their inverse roots.
    (Per-event hooks hold each target module's input from its forward to its backward, under
    activation checkpointing too, and its output gradient during backward: activation memory
    of the RL step, not counted here; docs/usage.md, "Per-event samples".)"""
    if capture.granularity == "step":
        copies = WORKING_COPIES[capture.source] + (capture.storage_dtype != "float32")
        return copies * 4 * sum(t.numel for t in specs)
    if capture.precondition in COVARIANCE_KINDS:  # kfac_output keeps one root: counted as two
        return 2 * 4 * sum(t.shape[0] ** 2 + t.shape[1] ** 2 for t in specs if t.is_matrix)
    return 0


def build_pipeline(
    model: torch.nn.Module,
    capture: CaptureConfig,
    sae_cfg: SAEConfig,
    runner: RunnerConfig,
    device: torch.device,
    seed: int,
    pending: PendingMemory = NO_PENDING,
    checkpoints: bool = False,
) -> Pipeline:
    """All parts, the buffer's memory checked against the budget left after the capture's own
    working copies of the targets, and the SAE's against what is free besides them (each
    raises ``ValueError`` saying how to fit). Free memory is read now, less ``pending``: what the
    policy's first training step will still allocate (``policy_memory``). ``checkpoints``: the run
    writes step checkpoints; on an accelerator their host copies must fit in host memory."""
    targets = resolve_targets(model, capture.targets, capture.granularity)
    captured = make_targets(target_shapes(targets), rank=sae_cfg.rank)  # the buffer's
    specs = expand_stacked(captured)  # the SAE's: one matrix per expert of a stacked target
    dtype = STORAGE[capture.storage_dtype]
    per_event = capture.granularity != "step"
    event_rank = capture.event_rank if per_event else None
    form = sample_form(capture.granularity)
    b_dec = sae_cfg.uses_b_dec(form)  # whether the SAE trains a decoder bias
    free = default_memory_budget(device, 1.0) - pending.total
    share = int(max(free, 0) * capture.memory_fraction)
    working = working_bytes(capture, specs)
    try:
        check_buffer_memory(specs, capture.capacity, dtype, share - working, device, event_rank,
                            runner.min_samples)
    except ValueError as e:
        raise ValueError(
            f"{e}\n  - capture.memory_fraction above its {capture.memory_fraction:g} (at most 1): "
            f"a larger share of free memory (now {size(share)}, of which the capture's working "
            f"copies of the targets take {size(working)} and the buffer gets the rest)"
            f"{_after(pending)}{_cgroup(device)}"
        ) from None
    try:  # the SAE is not held to the share
        check_sae_memory(specs, sae_cfg.n_latents, sae_cfg.batch_size,
                         free - working - buffer_memory_bytes(specs, capture.capacity, dtype,
                                                              event_rank),
                         device, event_rank, b_dec)
    except ValueError as e:
        raise ValueError(f"{e}{_after(pending)}{_cgroup(device)}") from None
    if checkpoints and device.type != "cpu":
        host = host_available()
        try:
            check_checkpoint_host_memory(
                checkpoint_host_bytes(specs, sae_cfg.n_latents, capture.capacity, dtype,
                                      event_rank, b_dec),
                host.bytes, device, capture.capacity,
                buffer_memory_bytes(specs, 1, dtype, event_rank))
        except ValueError as e:
            raise ValueError(f"{e}{cgroup_note(host)}") from None
    buffer = DeltaRingBuffer(captured, capture.capacity, device, dtype, event_rank)
    sae = LowRankSAE(specs, sae_cfg, sample_form=form).to(device)
    trainer = SAETrainer(sae)
    loop = SAEWorkLoop(trainer, buffer, runner, torch.Generator().manual_seed(seed))
    return Pipeline(targets, specs, buffer, sae, trainer, loop, make_runner(loop, runner))
