"""Weights & Biases logging for a job, on one run with two step axes.

TRL's metrics go under ``train/*`` against ``rl/step``; the SAE's under ``sae/*`` against
``sae/step`` (``wandb.define_metric``), so both curves read naturally although the SAE takes
several steps per RL step. ``logging.mode=offline`` (default) writes under ``run_dir/wandb``;
``disabled`` makes every call a no-op.

A W&B failure must not kill training: every call is guarded; the first failure is logged as a
warning with its cause, later ones are counted (``n_failures``) and reported at ``finish``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from sae_shards.run.config import LoggingConfig

logger = logging.getLogger(__name__)


class RunLogger:
    """One W&B run for one job; see the module docstring."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.n_failures = 0
        self.run = None
        if cfg.mode == "disabled":
            return
        self._guard("init", lambda: self._init(run_dir, config))

    def _init(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, name=self.cfg.name or run_dir.name,
            dir=str(run_dir), mode=self.cfg.mode, config=dict(config),
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.run.define_metric("rl/step")
        self.run.define_metric("train/*", step_metric="rl/step")
        self.run.define_metric("sae/step")
        self.run.define_metric("sae/*", step_metric="sae/step")

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # W&B trouble is reported, never fatal to the RL run
            self.n_failures += 1
            if self.n_failures == 1:
                logger.warning("W&B %s failed (%s: %s); training continues without it",
                               what, type(e).__name__, e)

    def log_rl(self, metrics: Mapping[str, float], rl_step: int) -> None:
        if self.run is not None:
            data = {f"train/{k}": v for k, v in metrics.items()}
            self._guard("log", lambda: self.run.log({**data, "rl/step": rl_step}))

    def log_sae(self, metrics: Mapping[str, float], sae_step: int) -> None:
        if self.run is not None:
            data = {f"sae/{k}": v for k, v in metrics.items()}
            self._guard("log", lambda: self.run.log({**data, "sae/step": sae_step}))

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self._guard("summary", lambda: self.run.summary.update(dict(values)))

    def log_artifact(self, path: Path, name: str, metadata: Mapping[str, Any]) -> None:
        if self.run is None or not self.cfg.artifacts:
            return

        def upload() -> None:
            import wandb

            art = wandb.Artifact(name, type="sae-shards-checkpoint", metadata=dict(metadata))
            art.add_dir(str(path))
            self.run.log_artifact(art)

        self._guard("artifact", upload)

    def finish(self) -> None:
        if self.run is not None:
            self._guard("finish", self.run.finish)
        if self.n_failures:
            logger.warning("W&B: %d call(s) failed during the run", self.n_failures)
