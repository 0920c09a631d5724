"""Weights & Biases logging for a job, on one run with two step axes.

TRL's metrics go under ``train/*`` against ``rl/step``; the SAE's under ``sae/*`` against
``sae/step`` (``wandb.define_metric``), so both curves read naturally although the SAE takes
several steps per RL step. ``logging.mode=offline`` (default) writes under ``run_dir/wandb``;
``disabled`` makes every call a no-op.

A W&B failure must not kill training: every call is guarded; the first failure is logged as a
warning with its cause, later ones are counted (``n_failures``) and reported at ``finish``.

``RunLogger.start`` opens the job's own run; ``RunLogger.attach_active`` joins the run a user's
trainer already logs to (TRL's ``report_to="wandb"``), adding only the ``sae/*`` figures and the
shards artifact, and leaves that run open. A logger without a run (``RunLogger()``) has the same
methods and does nothing, so callers never branch on W&B.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from sae_shards.run.config import LoggingConfig

logger = logging.getLogger(__name__)


class RunLogger:
    """A W&B run (or none) with the job's two step axes; see the module docstring."""

    def __init__(self, run: Any = None, *, owns_run: bool = True, log_rl: bool = True,
                 artifacts: bool = True) -> None:
        self.run = run
        """The ``wandb`` run, or None (every method is then a no-op)."""
        self.owns_run = owns_run
        """Whether ``finish`` ends the run (not for a run the trainer opened)."""
        self.send_rl = log_rl
        """Whether ``log_rl`` sends TRL's figures (off when TRL's own callback already does)."""
        self.artifacts = artifacts
        self.n_failures = 0
        if run is not None:
            self._guard("define_metric", self._define_metrics)

    @classmethod
    def start(cls, cfg: LoggingConfig, run_dir: Path, config: Mapping[str, Any]) -> "RunLogger":
        """The job's own run under ``run_dir/wandb`` (none when ``cfg.mode`` is disabled, or
        W&B is turned off in the environment: ``WANDB_MODE=disabled``, ``WANDB_DISABLED=true``,
        as a shell or cluster turns it off for every tool)."""
        logger_ = cls(artifacts=cfg.artifacts)
        if cfg.mode != "disabled" and wandb_off_in_env():
            logger.info("W&B is off: WANDB_MODE=disabled or WANDB_DISABLED=true in the "
                        "environment (logging.mode=%s is not used)", cfg.mode)
        elif cfg.mode != "disabled":
            logger_._guard("init", lambda: logger_._init(cfg, run_dir, config))
        return logger_

    @classmethod
    def attach_active(cls) -> "RunLogger":
        """The W&B run already active in this process (opened by the trainer's W&B callback),
        or a logger without a run when there is none or wandb is not installed."""
        try:
            import wandb
        except ImportError:
            return cls()
        return cls(wandb.run, owns_run=False, log_rl=False) if wandb.run is not None else cls()

    def _init(self, cfg: LoggingConfig, run_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
            group=cfg.group, dir=str(run_dir), mode=cfg.mode, config=dict(config),
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self._define_metrics()

    def _define_metrics(self) -> None:
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
        if self.run is not None and self.send_rl:
            data = {f"train/{k}": v for k, v in metrics.items()}
            self._guard("log", lambda: self.run.log({**data, "rl/step": rl_step}))

    def log_sae(self, metrics: Mapping[str, float | None], sae_step: int) -> None:
        """An SAE step's metrics; a None (``dead_frac`` before ``dead_after`` samples) is left
        out rather than charted as a value."""
        if self.run is not None:
            data = {f"sae/{k}": v for k, v in metrics.items() if v is not None}
            self._guard("log", lambda: self.run.log({**data, "sae/step": sae_step}))

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self._guard("summary", lambda: self.run.summary.update(dict(values)))

    def log_artifact(self, path: Path, name: str, metadata: Mapping[str, Any]) -> None:
        if self.run is None or not self.artifacts:
            return

        def upload() -> None:
            import wandb

            art = wandb.Artifact(artifact_name(name), type="sae-shards-checkpoint", metadata=dict(metadata))
            art.add_dir(str(path))
            self.run.log_artifact(art)

        self._guard("artifact", upload)

    def finish(self, exit_code: int = 0) -> None:
        """End the run (``exit_code`` 1: marked failed in W&B), once: later calls do nothing.
        A run left open would be the one the next ``wandb.init`` of this process returns: in a
        sweep, the next job's figures would land in the failed job's run."""
        run, self.run = self.run, None
        if run is not None and self.owns_run:
            self._guard("finish", lambda: run.finish(exit_code=exit_code))
        if self.n_failures:
            logger.warning("W&B: %d call(s) failed during the run", self.n_failures)
            self.n_failures = 0


def wandb_off_in_env() -> bool:
    """Whether the environment turns W&B off (``WANDB_MODE=disabled``, or the older
    ``WANDB_DISABLED=true``)."""
    return (os.environ.get("WANDB_MODE", "").lower() == "disabled"
            or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"))


ARTIFACT_NAME_MAX = 128
"""The longest artifact name W&B accepts (its ``NAME_MAXLEN``)."""


def artifact_name(name: str) -> str:
    """A valid W&B artifact name: letters, digits, ``-``, ``_`` and ``.`` (multirun directories
    are named like ``sae.k=2``), at most ``ARTIFACT_NAME_MAX`` characters (``bounded``)."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "shards"
    return bounded(clean, ARTIFACT_NAME_MAX, name)


def bounded(name: str, limit: int, whole: str | None = None) -> str:
    """``name`` if it fits ``limit`` bytes (UTF-8), else its start with ``-`` and 8 hex digits
    of a hash of ``whole`` (default ``name``) in ``limit`` bytes, so long names that differ
    only past the cut stay apart."""
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha1((whole if whole is not None else name).encode()).hexdigest()[:8]
    head = name.encode()[:limit - 9].decode(errors="ignore")
    return f"{head}-{digest}"
