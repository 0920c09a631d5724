"""The planted-shard benchmark: one RL run, every (capture source, target group) side by side.

The RL trajectory does not depend on what is captured, so one GRPO run feeds several
``DeltaCapture`` callbacks at once, each with its own ring buffer and SAE (trained inline). Each
(group, source) pair then gets a run directory of its own under the run's directory, in the
layout ``sae-shards evaluate`` reads (``checkpoints/final``, ``samples.safetensors``,
``config.json``, ``final_model``), so every figure comes from the standard evaluation.

Target groups: ``body`` (attention and MLP matrices, the headline) and ``readout`` (``lm_head``
and the final norm), reported apart because the readout separates tasks trivially when rewards
name tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import torch
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging as hf_logging

from sae_shards.capture.buffer import StepMeta
from sae_shards.capture.delta import DeltaCapture
from sae_shards.core.checkpoint import save_checkpoint
from sae_shards.run.config import JobConfig
from sae_shards.run.job import (RolloutLog, build_capture, build_rl, prepare_run_dir, resolve_device,
                            save_samples)
from sae_shards.capture.runner import InlineRunner, SAEWorkLoop
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.trainer import SAETrainer

GROUPS = {
    "body": ["*layers.*.self_attn.*_proj.weight", "*layers.*.mlp.*_proj.weight"],
    "readout": ["lm_head.weight", "model.norm.weight"],
}
SOURCES = ("update", "grad", "precond", "deconv")


@contextlib.contextmanager
def _quiet_transformers():
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


class SharedStepMeta:
    """One ``StepMeta`` per RL step for every capture callback (the recorder drains only once)."""

    def __init__(self, step_meta: Callable[[int], StepMeta]) -> None:
        self.step_meta = step_meta
        self._cache: dict[int, StepMeta] = {}

    def __call__(self, global_step: int) -> StepMeta:
        if global_step not in self._cache:
            self._cache = {global_step: self.step_meta(global_step)}  # keep only the current step
        return self._cache[global_step]


def run_planted(cfg: JobConfig, run_dir: Path, sources=SOURCES, groups=tuple(GROUPS)) -> dict[str, Path]:
    """One RL run captured by every (group, source); returns ``{"group-source": run dir}``."""
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, cfg.overwrite)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.runner.torch_threads)
    torch.manual_seed(cfg.seed)
    rl = build_rl(cfg, run_dir, device)
    meta = SharedStepMeta(RolloutLog(run_dir / "rollouts.jsonl", rl.recorder,
                                     cfg.runner.heldout_every).step_meta)
    runner_cfg = dataclasses.replace(cfg.runner, checkpoint_every=0)
    parts = {}
    for group in groups:
        for source in sources:
            sub_cfg = dataclasses.replace(cfg, capture=dataclasses.replace(
                cfg.capture, targets=list(GROUPS[group]), source=source))
            targets, specs, buffer = build_capture(sub_cfg, rl.trainer.model, device)
            trainer = SAETrainer(LowRankSAE(specs, cfg.sae).to(device))
            loop = SAEWorkLoop(trainer, buffer, runner_cfg, torch.Generator().manual_seed(cfg.seed))
            capture = DeltaCapture(targets, buffer, source, meta_fn=meta,
                                   on_push=InlineRunner(loop).on_push)
            with _quiet_transformers():  # several DeltaCaptures on one trainer is intended
                rl.trainer.add_callback(capture)
            parts[f"{group}-{source}"] = (sub_cfg, trainer, buffer, capture)
    rl.trainer.remove_callback(ProgressCallback)
    rl.trainer.train()
    rl.trainer.save_model(str(run_dir / "final_model"))

    out = {}
    for name, (sub_cfg, trainer, buffer, capture) in parts.items():
        sub = run_dir / name
        sub.mkdir(exist_ok=True)
        model_path = str(Path(cfg.model.path).resolve()) if cfg.model.path else \
            str((run_dir / "model").resolve())
        sub_cfg = dataclasses.replace(sub_cfg, run_dir=str(sub), model=dataclasses.replace(
            sub_cfg.model, path=model_path))
        (sub / "config.json").write_text(json.dumps(sub_cfg.to_dict(), indent=2))
        if not (sub / "final_model").is_symlink():  # relative: the run dir may be moved
            os.symlink(Path("..") / "final_model", sub / "final_model")
        save_checkpoint(sub / "checkpoints" / "final", trainer.sae, trainer.stats.as_tensors(),
                        {"source": capture.source, "group": name.split("-")[0],
                         "model_id": model_path, "rl_step": cfg.rl.max_steps,
                         "sae_step": trainer.n_steps})
        save_samples(sub / "samples.safetensors", buffer)
        (sub / "summary.json").write_text(json.dumps({
            "captured": capture.n_captured, "zero_samples": capture.n_zero,
            "skipped": capture.n_skipped, "sae_steps": trainer.n_steps,
            "sae_skipped_zero": trainer.n_skipped_zero}, indent=2))
        out[name] = sub
    return out
