"""The job's configuration: one documented dataclass per Hydra group, validated when built.

Hydra composes ``configs/``; ``JobConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))``
turns the result into these frozen dataclasses once, in the CLI. Unknown keys and wrongly typed
values are rejected with the dotted field name; each ``__post_init__`` checks ranges and says how
to fix a bad value. Nothing below the CLI sees Hydra.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from sae_shards.capture.delta import SOURCES
from sae_shards.recipe.trainers import DEFAULT_GRPO
from sae_shards.core.sae_config import SAEConfig

STORAGE_DTYPES = ("float32", "bfloat16")
CONCURRENCY = ("inline", "thread")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA adapter (passed to TRL as ``peft_config``)."""

    enabled: bool = False
    """Train a LoRA adapter instead of the full weights."""
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """lora_alpha; the effective delta is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names to adapt (peft's ``target_modules``); the captured targets must be among them."""
    dropout: float = 0.0
    """lora_dropout."""
    rslora: bool = False
    """Use rank-stabilised scaling alpha / sqrt(r)."""

    def __post_init__(self) -> None:
        if self.enabled and self.r < 1:
            raise ValueError(f"model.lora.r={self.r} must be >= 1")
        if self.enabled and not self.target_modules:
            raise ValueError("model.lora.target_modules is empty; name the modules to adapt")


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to fine-tune (group ``model/``)."""

    path: str | None = None
    """Local transformers causal-LM directory; null builds the tiny built-in model in the run dir."""
    arch: str = "qwen2"
    """Tiny model architecture when ``path`` is null: qwen2 or llama."""
    hidden_size: int = 64
    """Tiny model width."""
    num_layers: int = 2
    """Tiny model depth."""
    num_heads: int = 4
    """Tiny model attention heads."""
    intermediate_size: int = 128
    """Tiny model MLP width."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Optional LoRA adapter."""

    def __post_init__(self) -> None:
        if self.arch not in ("qwen2", "llama"):
            raise ValueError(f"model.arch={self.arch!r} is unknown; use qwen2 or llama")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by "
                             f"model.num_heads={self.num_heads}")


@dataclass(frozen=True)
class TaskConfig:
    """The RL task (group ``task/``)."""

    name: str = "letters"
    """Built-in task name."""
    n_prompts: int = 512
    """Prompts in the training dataset."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task-specific settings passed to ``tasks.build_task`` (e.g. ``target_chars``)."""

    def __post_init__(self) -> None:
        if self.n_prompts < 1:
            raise ValueError(f"task.n_prompts={self.n_prompts} must be >= 1")


@dataclass(frozen=True)
class RLConfig:
    """The RL algorithm and its main settings (group ``rl/``); defaults from ``rl.DEFAULT_GRPO``."""

    algorithm: str = "grpo"
    """Only grpo for now."""
    max_steps: int = DEFAULT_GRPO["max_steps"]
    """Optimizer steps of the RL run."""
    learning_rate: float = DEFAULT_GRPO["learning_rate"]
    """Policy learning rate (~1e-3..3e-4 for tiny models; TRL's 1e-6 barely moves them)."""
    per_device_train_batch_size: int = DEFAULT_GRPO["per_device_train_batch_size"]
    """Completions per device per step (prompts x num_generations)."""
    num_generations: int = DEFAULT_GRPO["num_generations"]
    """Completions per prompt (the GRPO group)."""
    gradient_accumulation_steps: int = DEFAULT_GRPO["gradient_accumulation_steps"]
    """Micro-batches per optimizer step (one captured delta per optimizer step)."""
    max_completion_length: int = DEFAULT_GRPO["max_completion_length"]
    """Tokens generated per completion."""
    temperature: float = DEFAULT_GRPO["temperature"]
    """Sampling temperature."""
    beta: float = DEFAULT_GRPO["beta"]
    """KL coefficient; > 0 makes TRL rebuild a reference model from the model path."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other ``trl.GRPOConfig`` field, passed through as is."""

    def __post_init__(self) -> None:
        if self.algorithm != "grpo":
            raise ValueError(f"rl.algorithm={self.algorithm!r} is not supported yet; use grpo")
        for name in ("max_steps", "per_device_train_batch_size", "num_generations",
                     "gradient_accumulation_steps", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 1")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"rl.per_device_train_batch_size={self.per_device_train_batch_size} must be a "
                f"multiple of rl.num_generations={self.num_generations} (whole GRPO groups)")
        if not self.learning_rate > 0:
            raise ValueError(f"rl.learning_rate={self.learning_rate} must be positive")

    def grpo_kwargs(self) -> dict[str, Any]:
        """Plain kwargs for ``rl.grpo_config`` (typed fields first, then ``extra``)."""
        typed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("algorithm", "extra")}
        clash = sorted(set(typed) & set(self.extra))
        if clash:
            raise ValueError(f"rl.extra repeats {clash}; set them as rl.<name> instead")
        return {**typed, **self.extra}


@dataclass(frozen=True)
class CaptureConfig:
    """What is captured from each optimizer step (group ``capture/``)."""

    targets: list[str] = field(default_factory=lambda: ["*layers.*.self_attn.*_proj.weight",
                                                        "*layers.*.mlp.*_proj.weight"])
    """Glob patterns over parameter names (base names with LoRA)."""
    source: str = "update"
    """``update`` (theta_after - theta_before, fp32), ``grad`` (the clipped gradient),
    ``precond`` (Adam/AdamW's preconditioned gradient g / (sqrt(v_hat) + eps), read from the
    optimizer state) or ``deconv`` (the update with momentum removed, from consecutive updates and
    the known schedule; Adam/AdamW/SGD-momentum; steps with lr = 0 are skipped). Only ``update``
    works with LoRA."""
    storage_dtype: str = "float32"
    """Ring buffer storage: float32, or bfloat16 to halve memory (the diff is always fp32)."""
    capacity: int = 256
    """Ring buffer slots (one per optimizer step)."""
    memory_fraction: float = 0.5
    """Largest share of the device's free memory the buffer may take (checked before training)."""

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("capture.targets is empty; give glob patterns over parameter names")
        if self.source not in SOURCES:
            raise ValueError(f"capture.source={self.source!r} is unknown; use one of {SOURCES}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"capture.storage_dtype={self.storage_dtype!r}; use one of {STORAGE_DTYPES}")
        if self.capacity < 1:
            raise ValueError(f"capture.capacity={self.capacity} must be >= 1")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"capture.memory_fraction={self.memory_fraction} must be in (0, 1]")


@dataclass(frozen=True)
class RunnerConfig:
    """How the SAE trains beside the RL run (section ``runner``)."""

    concurrency: str = "inline"
    """``inline``: SAE steps run in the RL callback after each push; ``thread``: a background
    worker trains while RL continues (the RL side waits only when ``max_lag`` pushes are queued)."""
    sae_steps_per_rl_step: int = 4
    """SAE steps per captured delta."""
    min_samples: int = 8
    """Buffered samples before the SAE starts training."""
    sae_start_step: int = 0
    """First RL step whose push trains the SAE. Earlier deltas are captured, buffered and saved,
    but not trained on. With ``capture.capacity`` it sets the window of RL steps the SAE learns
    from: e.g. 150 and 150 on a 300-step run train it on steps 1..300 as the buffer rolls, ending
    on steps 151..300 (the early steps' Adam preconditioner is a short average, and directions
    drift)."""
    max_lag: int = 8
    """thread mode: captured deltas the worker may fall behind before RL waits."""
    torch_threads: int = 1
    """torch intra-op threads, process-wide (torch's pool is global: the RL thread and the SAE
    worker each use up to this many). Set explicitly: default counts oversubscribe small CPUs."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many RL steps (0: only the final one)."""
    recent_frac: float = 0.0
    """Share of each SAE batch drawn from the newest buffer slots."""
    heldout_every: int = 0
    """Hold out every k-th RL step from SAE training (0: none); held-out samples give
    ``fvu_heldout`` and the held-out figures of ``sae-shards evaluate``."""
    save_samples: bool = False
    """Write every buffered sample to ``run_dir/samples.safetensors`` at the end (for evaluation
    against ground truth; ``capacity * sum(numel) * 4`` bytes: for small models)."""

    def __post_init__(self) -> None:
        if self.concurrency not in CONCURRENCY:
            raise ValueError(f"runner.concurrency={self.concurrency!r}; use one of {CONCURRENCY}")
        for name in ("sae_steps_per_rl_step", "min_samples", "max_lag", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"runner.{name}={getattr(self, name)} must be >= 1")
        if self.sae_start_step < 0:
            raise ValueError(f"runner.sae_start_step={self.sae_start_step} must be >= 0")
        if self.checkpoint_every < 0:
            raise ValueError(f"runner.checkpoint_every={self.checkpoint_every} must be >= 0")
        if not 0 <= self.recent_frac <= 1:
            raise ValueError(f"runner.recent_frac={self.recent_frac} must be in [0, 1]")
        if self.heldout_every < 0 or self.heldout_every == 1:
            raise ValueError(f"runner.heldout_every={self.heldout_every} must be 0 (none) or >= 2 "
                             "(1 would hold out every step)")


@dataclass(frozen=True)
class LoggingConfig:
    """Weights & Biases (group ``logging/``)."""

    mode: str = "offline"
    """offline (default: files under run_dir/wandb), online, or disabled."""
    project: str = "sae-shards"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team/user); null uses the default."""
    name: str | None = None
    """Run name; null uses the run directory's name."""
    artifacts: bool = True
    """Upload the final checkpoint as a W&B artifact."""

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logging.mode={self.mode!r}; use one of {WANDB_MODES}")


@dataclass(frozen=True)
class JobConfig:
    """The whole ``sae-shards train`` job (``configs/config.yaml``)."""

    run_dir: str = "runs/default"
    """Where everything of the run goes (fixed and explicit; multirun jobs get subdirectories)."""
    seed: int = 0
    """Seed of RL, the SAE and sampling."""
    device: str = "auto"
    """auto (cuda when available), cpu, or cuda[:i]: where RL, the buffer and the SAE live."""
    overwrite: bool = False
    """Allow writing into a run_dir that already holds checkpoints (they are replaced)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r}; use auto, cpu or cuda[:index]")
        if self.capture.source != "update" and self.model.lora.enabled:
            raise ValueError(f"capture.source={self.capture.source} needs dense targets and is not "
                             "supported with model.lora.enabled=true; use capture.source=update")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobConfig":
        return build_dataclass(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- dict -> dataclass


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build ``cls`` from a plain dict, recursively, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; "
                         f"{where} takes {sorted(known)}")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check ``value`` against a field's annotation (ints are accepted where floats are)."""
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, name + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ValueError(f"{name}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
