"""The planted-shard benchmark: one RL run, every (capture source, target group) side by side.

The RL trajectory does not depend on what is captured, so one GRPO run feeds several
``ShardCallback``s at once, each with its own targets, source, ring buffer and SAE (trained
inline) and its own standard run directory under the run's directory (``<group>-<source>/``),
which ``sae-shards evaluate`` reads. The policy is saved once; each sub-run links to it.

Target groups: ``body`` (attention and MLP matrices, the headline) and ``readout`` (``lm_head``
and the final norm), reported apart because the readout separates tasks trivially when rewards
name tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from sae_shards.run import rundir
from sae_shards.run.config import SOURCES, JobConfig
from sae_shards.run.job import build_rl, resolve_device, shard_callback

GROUPS = {
    "body": ["*layers.*.self_attn.*_proj.weight", "*layers.*.mlp.*_proj.weight"],
    "readout": ["lm_head.weight", "model.norm.weight"],
}


@contextlib.contextmanager
def _quiet_transformers():
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def run_planted(cfg: JobConfig, run_dir: Path, sources=SOURCES, groups=tuple(GROUPS)) -> dict[str, Path]:
    """One RL run captured by every (group, source); returns ``{"group-source": run dir}``.

    Sets torch's thread count (``runner.torch_threads``): the benchmark is an entry point."""
    run_dir = rundir.prepare_run_dir(run_dir, cfg.overwrite)
    torch.set_num_threads(cfg.runner.torch_threads)
    torch.manual_seed(cfg.seed)
    rl = build_rl(cfg, run_dir, resolve_device(cfg.device))
    model_path = str(Path(cfg.model.path).resolve() if cfg.model.path else
                     (run_dir / rundir.MODEL).resolve())
    runner = dataclasses.replace(cfg.runner, checkpoint_every=0)
    out = {}
    for group in groups:
        for source in sources:
            name = f"{group}-{source}"
            sub_cfg = dataclasses.replace(
                cfg, runner=runner, model=dataclasses.replace(cfg.model, path=model_path),
                capture=dataclasses.replace(cfg.capture, targets=list(GROUPS[group]),
                                            source=source))
            callback = shard_callback(sub_cfg, run_dir / name, save_model=False,
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
