"""The planted-shard benchmark: one RL run, every (capture source, target group) side by side.

The RL trajectory does not depend on what is captured, so one GRPO run feeds several
``ShardCallback``s at once, each with its own targets, source, ring buffer and SAE (trained
inline) and its own standard run directory under the run's directory (``<group>-<source>/``),
which ``sae-shards evaluate`` reads. The policy is saved once; each sub-run links to it.

Target groups: ``body`` (attention and MLP matrices, the headline) and ``readout`` (``lm_head``
and the final norm), reported apart because the readout separates tasks trivially when rewards
name tokens. Kinds: a per-step capture source (``update``, ``grad``, ``precond``, ``deconv``) or
``event`` (``capture.granularity=group``: one sample per prompt group, with the run's
``capture.precondition`` / ``normalize``). Every capture's ring buffer holds the same window of
RL steps: ``capture.capacity`` read in the units of the run's ``capture.granularity`` (events or
steps) and converted (a step holds ``batch x accumulation / num_generations`` groups), and every
capture's SAE draws each of its samples about as often (with a fixed step count; a
``runner.sae_budget`` sets steps by time instead): ``runner.sae_steps_per_rl_step`` is read
in the same units and scaled by the capture's samples per RL step (``sae_steps``; at least 1), so
a per-step SAE beside a per-event one is neither over- nor under-trained (it once took the same
steps on 1/8 of the samples: 8x the passes, and half the sweep's SAE time). The readout has no
per-event capture: TRL's fused LM head multiplies by ``lm_head.weight`` outside the module, and
the final norm is a norm weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from sae_shards.run import rundir
from sae_shards.run.config import SOURCES, JobConfig, ModelConfig
from sae_shards.run.job import build_rl, resolve_device, shard_callback

GROUPS = {
    "body": ["*layers.*.self_attn.*_proj.weight", "*layers.*.mlp.*_proj.weight"],
    "readout": ["lm_head.weight", "model.norm.weight"],
}
KINDS = (*SOURCES, "event")
"""What one capture samples: a per-step source, or ``event`` (per prompt group)."""


def sae_steps(steps: int, granularity: str, kind: str, groups_per_step: int) -> int:
    """SAE steps per RL step for a capture of ``kind`` when ``steps`` is meant for the run's
    ``granularity``: the same draws per sample. A per-event capture has ``groups_per_step``
    samples per RL step, a per-step capture one; rounded up, at least 1."""
    per_step_run = granularity == "step"
    per_step_capture = kind != "event"
    if per_step_run == per_step_capture:
        return steps
    if per_step_capture:  # fewer samples than the steps were meant for
        return max(1, -(-steps // groups_per_step))
    return steps * groups_per_step


def capture_config(cfg: JobConfig, group: str, kind: str) -> JobConfig:
    """The run's config for the capture ``<group>-<kind>`` (see the module docstring)."""
    if group not in GROUPS or kind not in KINDS:
        raise ValueError(f"unknown capture {group}-{kind}: groups {list(GROUPS)}, kinds {KINDS}")
    if cfg.capture.granularity not in ("step", "group"):
        raise ValueError(f"capture.granularity={cfg.capture.granularity}: the planted benchmark "
                         "compares per-step samples with per-prompt-group events (step or group)")
    if kind == "event" and group == "readout":
        raise ValueError("readout-event: per-event capture cannot split the readout's gradient "
                         "(TRL's fused LM head bypasses the lm_head module); use a step source")
    groups_per_step = (cfg.rl.per_device_train_batch_size * cfg.rl.gradient_accumulation_steps
                       // cfg.rl.num_generations)
    window = (cfg.capture.capacity if cfg.capture.granularity == "step"
              else max(1, cfg.capture.capacity // groups_per_step))  # RL steps in the buffer
    if kind == "event":
        capture = dataclasses.replace(
            cfg.capture, granularity="group", source="update", targets=list(GROUPS[group]),
            capacity=window * groups_per_step)
    else:
        capture = dataclasses.replace(cfg.capture, granularity="step", source=kind,
                                      precondition="none", normalize="none",
                                      targets=list(GROUPS[group]), capacity=window)
    runner = dataclasses.replace(cfg.runner, sae_steps_per_rl_step=sae_steps(
        cfg.runner.sae_steps_per_rl_step, cfg.capture.granularity, kind, groups_per_step))
    return dataclasses.replace(cfg, capture=capture, runner=runner)


@contextlib.contextmanager
def _quiet_transformers():
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def run_planted(cfg: JobConfig, run_dir: Path, sources=SOURCES, groups=tuple(GROUPS),
                captures: tuple[str, ...] | None = None) -> dict[str, Path]:
    """One RL run captured by every (group, kind); returns ``{"group-kind": run dir}``.

    ``captures`` names them (``"body-event"``, ``"readout-precond"``...); by default every group
    with every one of ``sources``. Sets torch's thread count (``runner.torch_threads``): the
    benchmark is an entry point."""
    if captures is None:
        captures = tuple(f"{g}-{s}" for g in groups for s in sources)
    run_dir = rundir.prepare_run_dir(run_dir, cfg.overwrite)
    try:
        return _run_captures(cfg, run_dir, captures)
    finally:
        rundir.release_run_dir(run_dir)


def _run_captures(cfg: JobConfig, run_dir: Path, captures: tuple[str, ...]) -> dict[str, Path]:
    torch.set_num_threads(cfg.runner.torch_threads)
    torch.manual_seed(cfg.seed)
    rl = build_rl(cfg, run_dir, resolve_device(cfg.device))
    model_path = str(Path(cfg.model.path).resolve() if cfg.model.path else
                     (run_dir / rundir.MODEL).resolve())
    out = {}
    for name in captures:
        group, _, kind = name.partition("-")
        sub_cfg = capture_config(cfg, group, kind)
        sub_cfg = dataclasses.replace(
            sub_cfg, runner=dataclasses.replace(sub_cfg.runner, checkpoint_every=0),
            # the model built above, by path (its tiny-model shape settings are spent)
            model=ModelConfig(path=model_path, lora=cfg.model.lora))
        callback = shard_callback(sub_cfg, run_dir / name, rl.task.target_length, save_model=False,
                                  meta={"group": group}, overwrite=cfg.overwrite)
        callback.setup(rl.trainer.model, rl.trainer)
        with _quiet_transformers():  # several ShardCallbacks on one trainer is intended
            rl.trainer.add_callback(callback)
        out[name] = run_dir / name
    rl.trainer.train()
    rl.trainer.save_model(str(run_dir / rundir.FINAL_MODEL))
    for sub in out.values():  # relative: the run dir may be moved
        os.symlink(Path("..") / rundir.FINAL_MODEL, sub / rundir.FINAL_MODEL)
    return out
