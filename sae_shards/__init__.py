"""sae-shards: find the directions in parameter space that RL fine-tuning reinforced.

A low-rank sparse autoencoder trains on the parameter-update deltas of an RL run; each decoder
direction is a candidate "shard". In a TRL script::

    from sae_shards import ShardCallback
    trainer.add_callback(ShardCallback(run_dir="runs/x"))

and afterwards ``ShardSet.from_run("runs/x")`` / ``RunView("runs/x")`` or ``sae-shards analyze
runs/x``. The names below are imported lazily: ``import sae_shards`` and the SAE core
(``LowRankSAE``, ``SAEConfig``, ``SAETrainer``, checkpoints) and the shards loaded back
(``ShardSet``, ``RunView``) need only torch and safetensors; transformers, TRL and peft load
with ``ShardCallback`` and with the analyses that run a policy (the report, interventions).
docs/architecture.md maps the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # the SAE core (torch only)
    "SAEConfig": "sae_shards.core.sae_config",
    "LowRankSAE": "sae_shards.core.sae",
    "SAETrainer": "sae_shards.core.trainer",
    "TargetSpec": "sae_shards.core.targets",
    "make_targets": "sae_shards.core.targets",
    "save_checkpoint": "sae_shards.core.checkpoint",
    "load_checkpoint": "sae_shards.core.checkpoint",
    "CheckpointError": "sae_shards.core.checkpoint",
    # capture (TRL, transformers)
    "ShardCallback": "sae_shards.capture.callback",
    "DeltaRingBuffer": "sae_shards.capture.buffer",
    "StepMeta": "sae_shards.capture.buffer",
    "select_targets": "sae_shards.capture.selection",
    "default_targets": "sae_shards.capture.selection",
    # configuration (standard library only)
    "CaptureConfig": "sae_shards.run.config",
    "RunnerConfig": "sae_shards.run.config",
    "JobConfig": "sae_shards.run.config",
    # analysis
    "ShardSet": "sae_shards.analysis.shards",
    "RunView": "sae_shards.analysis.shards",
    "RewardTask": "sae_shards.analysis.reward_task",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from sae_shards.analysis.reward_task import RewardTask
    from sae_shards.analysis.shards import RunView, ShardSet
    from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
    from sae_shards.capture.callback import ShardCallback
    from sae_shards.capture.selection import default_targets, select_targets
    from sae_shards.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from sae_shards.core.sae import LowRankSAE
    from sae_shards.core.sae_config import SAEConfig
    from sae_shards.core.targets import TargetSpec, make_targets
    from sae_shards.core.trainer import SAETrainer
    from sae_shards.run.config import CaptureConfig, JobConfig, RunnerConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sae_shards' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
