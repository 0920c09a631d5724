"""The run directory: every file a run writes, named in one place, and how each is written.

::

    run_dir/
      config.json                 the resolved configuration (JobConfig layout; see ``run_config``)
      model/                      the built-in tiny model, initial weights (sae-shards train only)
      final_model/                the policy after RL (with LoRA: the adapter) and its tokenizer
      checkpoints/step_XXXXXX/    every runner.checkpoint_every RL steps (core/checkpoint.py)
      checkpoints/final/          at the end
      activations.safetensors     per captured sample: RL step, latent indices, values
      samples.safetensors         every buffered sample (runner.save_samples=true)
      rollouts.jsonl              per RL step: prompts, completions, rewards, advantages, labels
      metrics.jsonl               TRL and SAE figures per step (also in W&B)
      summary.json                first/last reward and FVU, counters, sizes, wall time
      wandb/                      the offline W&B run (sae-shards train)
      .hydra/                     Hydra's composed config and overrides (sae-shards train)

JSON files are written to a temporary name and renamed into place, with NaN/Inf as ``null``
(strict JSON); JSON-lines logs are appended and flushed line by line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sae_shards.core.checkpoint import save_file_atomic

CONFIG = "config.json"
MODEL = "model"
FINAL_MODEL = "final_model"
CHECKPOINTS = "checkpoints"
ACTIVATIONS = "activations.safetensors"
SAMPLES = "samples.safetensors"
ROLLOUTS = "rollouts.jsonl"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WANDB = "wandb"
HYDRA = ".hydra"
HYDRA_LOG = "cli.log"  # Hydra's job log (named after the entry point)
TRL_OUTPUT = "trl"
REPORT = "report.html"
EVALUATION = ("evaluation.json", "evaluation.md")

OWNED = (CONFIG, MODEL, FINAL_MODEL, CHECKPOINTS, ACTIVATIONS, SAMPLES, ROLLOUTS, METRICS, SUMMARY,
         WANDB, HYDRA, HYDRA_LOG, TRL_OUTPUT, REPORT, *EVALUATION)
"""Everything a run writes into its directory; ``overwrite=true`` removes all of it first."""

_RESULTS = (CHECKPOINTS, ROLLOUTS, ACTIVATIONS, SAMPLES, SUMMARY)
"""Files whose presence means the directory holds an earlier run's results."""


def prepare_run_dir(run_dir: str | Path, overwrite: bool) -> Path:
    """Create ``run_dir``; refuse one holding an earlier run unless ``overwrite``, which removes
    every file an earlier run wrote (``OWNED``) so nothing of it mixes with the new run."""
    run_dir = Path(run_dir)
    if not str(run_dir).strip() or run_dir.resolve() == Path.cwd().resolve():
        raise ValueError(f"run_dir={str(run_dir)!r} would write the run into the current "
                         "directory; give a directory of its own, e.g. run_dir=runs/my_run")
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"run_dir={run_dir} is a file; give a directory")
    earlier = [name for name in _RESULTS if (run_dir / name).exists()]
    if earlier and not overwrite:
        raise FileExistsError(
            f"run_dir={run_dir} already holds a run ({', '.join(earlier)}); choose a new "
            "run_dir=... or pass overwrite=true to replace it")
    if overwrite:
        for name in OWNED:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Strict JSON, written beside ``path`` and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(strict_json(value), indent=2, allow_nan=False))
    os.replace(tmp, path)


class JsonLines:
    """An append-only JSON-lines log (one flushed line per record)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(strict_json(row), allow_nan=False) + "\n")


def save_activations(path: Path, tensors: dict[str, torch.Tensor], input_scale: float) -> None:
    """``online.*`` / ``final.*`` activation logs (``capture.runner.ActivationLog.tensors``)."""
    save_file_atomic({**tensors, "input_scale": torch.tensor(float(input_scale))}, path,
                     "sae-shards-activations")


def save_samples(path: Path, samples: dict[str, torch.Tensor], rl_steps: list[int],
                 heldout: list[bool], task_labels: list[list[str]]) -> None:
    """Every buffered sample (fp32, oldest first) with its RL step, held-out flag and labels.

    Tensors: ``sample.<target>`` [S, *shape], ``rl_step`` [S], ``heldout`` [S]; the header
    metadata holds ``task_labels`` (JSON list of each sample's labels).
    """
    tensors = {f"sample.{name}": t for name, t in samples.items()}
    tensors["rl_step"] = torch.tensor(rl_steps, dtype=torch.long)
    tensors["heldout"] = torch.tensor(heldout, dtype=torch.bool)
    save_file_atomic(tensors, path, "sae-shards-samples", {"task_labels": json.dumps(task_labels)})
