"""The job's configuration: one documented dataclass per Hydra group, validated when built.

Hydra composes ``configs/``; ``JobConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))``
turns the result into these frozen dataclasses once, in the CLI. Unknown keys and wrongly typed
values are rejected with the dotted field name (and the closest known key); ``Literal`` fields
list their choices; each ``__post_init__`` checks the types, choices and finite numbers of a
config built in Python too (``schema.check_fields``), then ranges, and says how to fix a bad
value. Nothing below the CLI sees Hydra.

A leaf module: it imports only the standard library and the SAE's own config, so a config can be
built and checked without torch, transformers or TRL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from sae_shards.core.sae_config import SAEConfig
from sae_shards.run.schema import UNBOUNDED, build_dataclass, check_fields

EMPTY_RUN_DIR = "run_dir is empty; give the run a directory of its own, e.g. run_dir=runs/my_run"
"""The refusal of an empty ``run_dir`` (the job's config, a ``ShardCallback``'s argument)."""

Source = Literal["update", "grad", "precond", "deconv"]
Granularity = Literal["step", "group", "completion"]
Precondition = Literal["none", "adam", "kfac", "kfac_output"]
Normalize = Literal["none", "unit"]
StorageDtype = Literal["float32", "bfloat16"]
Concurrency = Literal["inline", "thread"]
WandbMode = Literal["offline", "online", "disabled"]
Arch = Literal["qwen2", "llama", "gpt2", "qwen3_moe"]
Algorithm = Literal["grpo", "rloo"]
ALGORITHM_TRAINERS: dict[str, str] = {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer"}
"""Each ``rl.algorithm``'s TRL trainer class (``recipe.trainers.TRAINERS`` builds it; the report
names a run by it, as ``ShardCallback`` records a script's trainer)."""
MAX_SEED = 2**32 - 1
"""The largest seed: NumPy's, which TRL's ``set_seed`` seeds with the run's own."""
TaskName = Literal["letters", "multiskill", "multiskill_null"]
TASK_NAMES: tuple[str, ...] = get_args(TaskName)
"""Built-in tasks (``recipe.tasks.build_task``; ``configs/task/``)."""
ONE_LABEL_TASKS: tuple[str, ...] = ("letters",)
"""Built-in tasks whose prompts all carry one label: ``evaluate`` has no tasks to score their
shards against."""
SOURCES: tuple[str, ...] = get_args(Source)
STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA adapter (passed to TRL as ``peft_config``)."""

    enabled: bool = False
    """Train a LoRA adapter instead of the full weights (``sae-shards train`` warns about other
    ``model.lora.*`` fields given on its command line while it is false: no adapter uses them)."""
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """lora_alpha; the effective delta is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names to adapt (peft's ``target_modules``); the captured targets must be among them.
    ``[all-linear]``: peft's shorthand, every linear layer but the output layer (of any model
    family, whose own names then need not be typed)."""
    dropout: float = 0.0
    """lora_dropout."""
    rslora: bool = False
    """Use rank-stabilised scaling alpha / sqrt(r)."""

    def __post_init__(self) -> None:
        check_fields(self, "model.lora.")
        # checked with LoRA off too: a value no adapter could take is a mistake either way
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"model.lora.r={self.r!r} must be an integer >= 1")
        if self.enabled and not self.target_modules:
            raise ValueError("model.lora.target_modules is empty; name the modules to adapt")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha={self.alpha} must be > 0 (it scales the "
                             "adapter's update by alpha / r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout} must be in [0, 1)")


TRAINABLE_WITH_LORA = ("rl.trainable cannot be combined with model.lora.enabled=true (LoRA "
                       "trains its adapters only); set rl.trainable=null or disable LoRA")


TINY_ONLY = ("arch", "hidden_size", "num_layers", "num_heads", "intermediate_size",
             "readout_scale")
"""``ModelConfig`` fields that build the tiny model; with ``model.path`` they must keep their
defaults (a saved model is used as it is)."""


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to fine-tune (group ``model/``)."""

    path: str | None = None
    """Local transformers causal-LM directory; null builds the tiny built-in model in the run dir."""
    arch: Arch = "qwen2"
    """Tiny model architecture when ``path`` is null: ``qwen2``, ``llama``, ``gpt2`` (Conv1D
    weights), or ``qwen3_moe`` (a mixture of 4 experts, 2 per token, each ``intermediate_size``
    wide, stored stacked ``[experts, m, n]``: captured per step only)."""
    hidden_size: int = 64
    """Tiny model width."""
    num_layers: int = 2
    """Tiny model depth."""
    num_heads: int = 4
    """Tiny model attention heads."""
    intermediate_size: int = 128
    """Tiny model MLP width."""
    readout_scale: float = 1.0
    """Tiny model: factor on the initial ``lm_head`` weights (std 0.02 at 1). A larger readout
    lets the transformer body alone move the output distribution, which a body-only policy
    (``rl.trainable``) needs (the planted experiment uses it)."""
    trust_remote_code: bool = False
    """Load a ``model.path`` that needs Python code of its own (its ``config.json`` ``auto_map``
    names ``.py`` files beside it): true imports and runs that code, with your permissions, so
    only for code you have read and trust. false refuses such a model, naming its files. Never
    taken from a run directory: a resume must give it again."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Optional LoRA adapter."""

    def __post_init__(self) -> None:
        check_fields(self, "model.")
        if self.path is not None and not str(self.path).strip():
            raise ValueError("model.path is empty; give a local model directory, or null for the "
                             "built-in tiny model")
        if self.trust_remote_code and self.path is None:
            raise ValueError("model.trust_remote_code=true runs the Python code of a "
                             "model.path directory, and the built-in tiny model (model.path="
                             "null) has none; drop model.trust_remote_code or give model.path")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if not self.readout_scale > 0:
            raise ValueError(f"model.readout_scale={self.readout_scale} must be > 0 (1: the "
                             "usual init)")
        if self.path is not None:
            tiny = {name: getattr(self, name) for name in TINY_ONLY
                    if getattr(self, name) != getattr(ModelConfig, name)}
            if tiny:
                shown = ", ".join(f"model.{k}={v}" for k, v in tiny.items())
                dropped = " ".join(f"'~model.{k}'" for k in tiny)
                raise ValueError(f"{shown}: these shape the built-in tiny model only, and "
                                 f"model.path={self.path} is used as saved; drop them (one an "
                                 "experiment sets, as experiment=planted sets "
                                 f"model.readout_scale, is dropped with {dropped})")
        if self.lora.enabled and self.path is None and self.arch == "gpt2":
            raise ValueError("model.lora.enabled=true with model.arch=gpt2: GPT-2's matrices are "
                             "Conv1D layers, which peft adapts with fan_in_fan_out, and capture "
                             "follows LoRA on nn.Linear layers only; use model.arch=qwen2 or "
                             "llama, or train GPT-2 without LoRA")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by "
                             f"model.num_heads={self.num_heads}")
        head = self.hidden_size // self.num_heads
        if self.path is None and self.arch != "gpt2" and head % 2:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} / model.num_heads={self.num_heads} gives "
                f"heads of {head} dimensions; model.arch={self.arch} rotates pairs of them "
                "(rotary position embeddings), so a head needs an even number: change "
                "model.hidden_size or model.num_heads")


@dataclass(frozen=True)
class TaskConfig:
    """The RL task (group ``task/``)."""

    name: TaskName = "letters"
    """Built-in task (``configs/task/``): ``letters`` (one task), ``multiskill`` (tagged tasks,
    the planted benchmark) or ``multiskill_null`` (its null control)."""
    n_prompts: int = 512
    """Prompts in the training dataset."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task-specific settings passed to ``tasks.build_task`` (e.g. ``target_chars``)."""

    def __post_init__(self) -> None:
        check_fields(self, "task.")
        if self.n_prompts < 1:
            raise ValueError(f"task.n_prompts={self.n_prompts} must be >= 1")


@dataclass(frozen=True)
class RLConfig:
    """The RL algorithm and its main settings (group ``rl/``).

    Defaults measured on a 2-core CPU with the tiny model (hidden 64, 2 layers) and ``letters``:
    150 steps, qwen2 seed 0, mean reward of the first 20% of steps 0.083, last 20% 0.573 (still
    rising); seeds 1, 2 and llama go ~0.08 -> ~0.80 in 200 steps; lr 1e-3 saturates by step 100.
    """

    algorithm: Algorithm = "grpo"
    """``grpo`` (``trl.GRPOTrainer``) or ``rloo`` (``trl.RLOOTrainer``); both reinforce groups of
    ``num_generations`` completions per prompt."""
    max_steps: int = 150
    """Optimizer steps of the RL run."""
    learning_rate: float = 3e-4
    """Policy learning rate (~1e-3..3e-4 for tiny models; TRL's 1e-6 barely moves them)."""
    per_device_train_batch_size: int = 16
    """Completions per device per step (prompts x num_generations)."""
    num_generations: int = 8
    """Completions per prompt (the GRPO/RLOO group)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (one captured delta per optimizer step)."""
    max_completion_length: int = 16
    """Tokens generated per completion."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    beta: float = 0.0
    """KL coefficient (>= 0); > 0 makes TRL rebuild a reference model from the model path."""
    trainable: list[str] | None = None
    """Glob patterns (``fnmatch``) over the policy's parameter names selecting what RL may
    change, e.g. ``["model.layers.*"]`` for the transformer body only; every other parameter is
    frozen (``requires_grad=False``, kept out of the optimizer) before training. null: every
    parameter. Each pattern must match a parameter (checked when the trainer is built). Not with
    LoRA. Capture targets must lie among the trainable parameters."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other ``trl.GRPOConfig`` / ``trl.RLOOConfig`` field, passed through as is."""

    def __post_init__(self) -> None:
        check_fields(self, "rl.")
        if self.num_generations < 2:
            raise ValueError(f"rl.num_generations={self.num_generations} must be >= 2: a group of "
                             "one completion has no advantage to reinforce")
        if not self.temperature > 0:
            raise ValueError(f"rl.temperature={self.temperature} must be > 0 (sampling needs it)")
        if not self.beta >= 0:
            raise ValueError(f"rl.beta={self.beta} must be >= 0 (0 switches the KL term off)")
        for name in ("max_steps", "per_device_train_batch_size", "num_generations",
                     "gradient_accumulation_steps", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 1")
        owned = {"output_dir": "the run writes TRL's checkpoints to run_dir/trl",
                 "seed": "the top-level seed=N seeds TRL too (and the model, task and SAE)",
                 "trust_remote_code": "model.trust_remote_code=true opts in to running "
                                      "model.path's own code, for TRL and sae-shards alike"}
        for key, why in owned.items():
            if key in self.extra:
                raise ValueError(f"rl.extra.{key} is set by sae-shards ({why}); remove it")
        if "trust_remote_code" in _as_kwargs(self.extra.get("model_init_kwargs")):
            # TRL loads a reference model (rl.beta > 0) with this value over its own
            # trust_remote_code (setdefault): a way round model.trust_remote_code, either way
            raise ValueError("rl.extra.model_init_kwargs.trust_remote_code is set by sae-shards "
                             f"({owned['trust_remote_code']}; TRL would let this one override "
                             "it); remove it from rl.extra.model_init_kwargs")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"rl.per_device_train_batch_size={self.per_device_train_batch_size} must be a "
                f"multiple of rl.num_generations={self.num_generations}: sae-shards train lays "
                "its prompts out in whole GRPO groups on each process (TRL itself, in a script "
                "of your own, needs whole groups only over all processes together)")
        if not self.learning_rate > 0:
            raise ValueError(f"rl.learning_rate={self.learning_rate} must be positive")
        if self.trainable is not None:
            if not self.trainable:
                raise ValueError("rl.trainable is empty; give glob patterns over parameter "
                                 "names (e.g. ['model.layers.*']), or null to train everything")
            bad = [p for p in self.trainable if not isinstance(p, str) or not p.strip()]
            if bad:
                raise ValueError(f"rl.trainable holds empty or non-string patterns {bad}; give "
                                 "glob patterns over parameter names")

    @property
    def prompts_per_step(self) -> int:
        """Prompts one optimizer step trains on (one process)."""
        completions = self.per_device_train_batch_size * self.gradient_accumulation_steps
        return completions // self.num_generations

    def trl_kwargs(self) -> dict[str, Any]:
        """Plain kwargs for ``recipe.trainers.trl_config`` (typed fields first, then ``extra``)."""
        typed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("algorithm", "extra", "trainable")}
        clash = sorted(set(typed) & set(self.extra))
        if clash:
            raise ValueError(f"rl.extra repeats {clash}; set them as rl.<name> instead")
        return {**typed, **self.extra}


def _as_kwargs(value: Any) -> dict[str, Any]:
    """``rl.extra.model_init_kwargs`` (or another ``*_kwargs``) as TRL reads it: a mapping, or a
    JSON object written as a string (``TrainingArguments`` parses one that starts with ``{``);
    ``{}`` for anything else (no keys to check)."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class CaptureConfig:
    """What is captured from each optimizer step (group ``capture/``)."""

    targets: list[str] | None = None
    """Glob patterns over parameter names (base names with LoRA); null picks the attention and
    MLP weight matrices of every transformer block by module type (``nn.Linear`` and GPT-2's
    ``Conv1D``; Llama, Qwen, Mistral, GPT-2, GPT-NeoX...; see ``capture.selection``)."""
    source: Source = "update"
    """``update`` (theta_after - theta_before, fp32), ``grad`` (the clipped gradient),
    ``precond`` (Adam/AdamW's preconditioned gradient g / (sqrt(v_hat) + eps), read from the
    optimizer state) or ``deconv`` (the update with momentum removed, from consecutive updates and
    the known schedule; Adam/AdamW/SGD-momentum; steps with lr = 0 are skipped). Only ``update``
    works with LoRA."""
    storage_dtype: StorageDtype = "float32"
    """Ring buffer storage: ``float32``, or ``bfloat16`` to halve memory (the diff is always
    fp32)."""
    capacity: int = 256
    """Ring buffer slots (one per sample: an optimizer step, or one event with per-event
    granularity, so size it for events per step x steps kept). A step's events must fit in
    what one step may write without overwriting samples the SAE has not read (checked before
    training, which names the capacity that fits)."""
    memory_fraction: float = 0.5
    """Largest share of the device's free memory the buffer may take (checked before training).
    It bounds the buffer only: the SAE's own memory comes on top."""
    outlier_ratio: float = 100.0
    """Skip (and count) a sample whose norm exceeds this multiple of the running RMS norm of the
    accepted samples before it: one wild step would otherwise dominate the SAE's input scale for
    many steps. All-zero samples (steps that changed nothing) are not part of that RMS; after
    three consecutive RL steps each with a skipped sample, the skipped samples' scale becomes
    the reference (learning that starts after steps of weight decay alone loses those three
    steps, then is kept), while a burst of one or two wild steps is left out whole (a burst of
    three or more is taken as the new scale too, and the test stays lax while the running RMS,
    an EMA of rate 0.02, comes back down). summary.json's warning says how many were skipped.
    0 keeps every finite sample."""
    granularity: Granularity = "step"
    """What one SAE sample is. ``step``: one optimizer step (``source`` says which quantity).
    ``group``: one prompt group (GRPO/RLOO's unit of reinforcement: a prompt's completions),
    ``completion``: one completion; both are the event's gradient, kept factored (never dense;
    exact up to ``event_rank``'s cut) and summing over a step's events to its accumulated
    gradient before clipping."""
    event_rank: int = 64
    """group / completion: rows kept per event and target; an event with more token positions is
    cut to its best rank-``event_rank`` approximation (the kept energy is logged). The buffer
    stores ``[capacity, min(event_rank, m, n), m + n]`` per matrix target."""
    precondition: Precondition = "none"
    """group / completion: ``adam`` divides by Adam's second moment approximated per target by
    its row and column means (keeps the factored form; the error is logged), ``kfac`` whitens
    with running covariances of the layer's inputs and output gradients, ``kfac_output`` with the
    output gradients' only (the input side, where a prompt's own tokens enter, is left raw).
    ``none``: raw. ``adam`` is refused for LoRA targets (Adam's moments are the factors', not
    the effective weight's): ``kfac`` or ``none`` there."""
    normalize: Normalize = "none"
    """group / completion: ``unit`` scales each event to unit norm over all targets (its norm is
    kept in ``events.jsonl``); ``none`` keeps the gradient's own size."""
    kfac_damping: float = 1e-3
    """precondition=kfac / kfac_output: added to each covariance as this fraction of its mean
    eigenvalue before the inverse square root. Larger values whiten less: directions rarer
    than it are amplified at most ``1 / sqrt(kfac_damping)`` times."""

    def __post_init__(self) -> None:
        check_fields(self, "capture.")
        if self.targets is not None and not self.targets:
            raise ValueError("capture.targets is empty; give glob patterns over parameter names, "
                             "or null for every block's attention and MLP matrices")
        if self.capacity < 1:
            raise ValueError(f"capture.capacity={self.capacity} must be >= 1")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"capture.memory_fraction={self.memory_fraction} must be in (0, 1]")
        if self.event_rank < 1:
            raise ValueError(f"capture.event_rank={self.event_rank} must be >= 1 (rows kept per "
                             "event and target; e.g. 64)")
        if self.granularity == "step":
            per_step = {"precondition": "or for per-step samples use capture.source=precond for "
                                        "Adam's preconditioner",
                        "normalize": "per-step samples are not normalised one by one (the SAE "
                                     "divides all of them by one running scale): drop it"}
            for name, value in (("precondition", self.precondition),
                                ("normalize", self.normalize)):
                if value != "none":
                    raise ValueError(
                        f"capture.{name}={value} applies to per-event samples; set "
                        f"capture.granularity=group (or completion), {per_step[name]}")
        elif self.source != "update":
            raise ValueError(
                f"capture.source={self.source} applies to capture.granularity=step; per-event "
                f"samples (granularity={self.granularity}) are always the event's gradient: drop "
                "capture.source, and use capture.precondition=adam for Adam's scaling")
        if self.outlier_ratio != 0 and not self.outlier_ratio > 1:
            raise ValueError(f"capture.outlier_ratio={self.outlier_ratio} must be > 1 (or 0 to "
                             "keep every finite sample)")
        if not self.kfac_damping > 0:
            raise ValueError(f"capture.kfac_damping={self.kfac_damping} must be > 0 (e.g. 1e-3)")


@dataclass(frozen=True)
class RunnerConfig:
    """How the SAE trains beside the RL run (section ``runner``)."""

    concurrency: Concurrency = "inline"
    """``inline``: SAE steps run in the RL callback after each push; ``thread``: a background
    worker trains while RL continues (the RL side waits only when ``max_lag`` pushes are queued,
    or when it would overwrite a sample the worker may still draw). Both are bit-reproducible:
    the worker draws each push's batches from the buffer as it was at that push, less its oldest
    ``(max_lag + 1) x`` the push's samples (those RL may overwrite meanwhile), however far behind
    it is. So ``thread`` trains the same SAE run to run and across a resume, but not the
    ``inline`` one, which draws from the whole buffer (they differ once the buffer holds more
    than ``capacity - (max_lag + 1) x`` a push's samples)."""
    sae_steps_per_rl_step: int = 4
    """SAE steps per captured delta (fixed; used when ``sae_budget`` is 0)."""
    sae_budget: float = 0.0
    """> 0: instead of a fixed number of SAE steps per captured delta, run as many as fit in this
    fraction of the RL run's wall time (e.g. 0.05: sae-shards may add about 5%), timed as the run
    goes. The fraction pays for all of sae-shards' work during training (capture, logging,
    checkpoint snapshots, encoding), the SAE steps get what is left; ``summary.json`` reports the
    samples the SAE saw per captured delta and the share used. Timing-dependent, so not
    bit-reproducible. 0 (default): ``sae_steps_per_rl_step`` steps each time."""
    min_samples: int = 8
    """Buffered trainable samples (held-out ones not counted) before the SAE starts training."""
    sae_start_step: int = 0
    """First RL step whose push trains the SAE. Earlier deltas are captured, buffered and saved,
    but not trained on. With ``capture.capacity`` it sets the window of RL steps the SAE learns
    from: e.g. 150 and 150 on a 300-step run train it on steps 1..300 as the buffer rolls, ending
    on steps 151..300 (the early steps' Adam preconditioner is a short average, and directions
    drift)."""
    max_lag: int = 8
    """thread mode: captured deltas the worker may fall behind before RL waits. Each push's
    batches draw on at most ``capture.capacity - (max_lag + 1) x`` the push's samples, the newest
    at that push (RL may overwrite the older ones while the worker is behind); ``min_samples``
    must fit in a full push's window (checked: ``capture.capacity - max_lag - 1`` per step, and
    per event with the step's most events when the trainer's settings give them)."""
    worker_timeout_s: float = field(default=600.0, metadata={UNBOUNDED: True})
    """thread mode: longest time the worker may spend on one captured delta; past it the run
    stops with an error instead of RL waiting forever on a hung SAE step (``.inf``: no limit)."""
    torch_threads: int = 1
    """torch intra-op threads, process-wide (torch's pool is global: the RL thread and the SAE
    worker each use up to this many). Set explicitly: default counts oversubscribe small CPUs."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many RL steps (0: only the final one)."""
    keep_checkpoints: int = 0
    """Shards checkpoints (``checkpoints/step_*``) kept: 0 keeps every one, N >= 2 the newest N
    (``final`` always stays). Either way an older checkpoint drops its optimizer state
    (``training_state.safetensors``, twice the shards' size): only a resume reads it, and only
    from the steps that still have a resume file (the newest two, and the newest TRL saved)."""
    recent_frac: float = 0.0
    """Share of each SAE batch drawn from the newest buffer slots."""
    heldout_every: int = 0
    """Hold out every k-th RL step from SAE training (0: none); held-out samples give
    ``fvu_heldout`` and the held-out figures of ``sae-shards evaluate``."""
    save_samples: bool = False
    """Write every buffered sample to ``run_dir/samples.safetensors`` at the end (for evaluation
    against ground truth; ``capacity * sum(numel) * 4`` bytes: for small models). Per-event
    samples are written materialised (dense), at that same size."""

    def __post_init__(self) -> None:
        check_fields(self, "runner.")
        for name in ("sae_steps_per_rl_step", "min_samples", "max_lag", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"runner.{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.sae_budget <= 10:
            raise ValueError(f"runner.sae_budget={self.sae_budget} must be in [0, 10] (a fraction "
                             "of RL wall time, e.g. 0.05; 0 uses sae_steps_per_rl_step)")
        if not self.worker_timeout_s > 0:
            raise ValueError(f"runner.worker_timeout_s={self.worker_timeout_s} must be > 0")
        if self.sae_start_step < 0:
            raise ValueError(f"runner.sae_start_step={self.sae_start_step} must be >= 0")
        if self.checkpoint_every < 0:
            raise ValueError(f"runner.checkpoint_every={self.checkpoint_every} must be >= 0")
        if self.keep_checkpoints < 0 or self.keep_checkpoints == 1:
            raise ValueError(f"runner.keep_checkpoints={self.keep_checkpoints} must be 0 (keep "
                             "every one) or >= 2 (a resume may fall back to the step before the "
                             "newest)")
        if not 0 <= self.recent_frac <= 1:
            raise ValueError(f"runner.recent_frac={self.recent_frac} must be in [0, 1]")
        if self.heldout_every < 0 or self.heldout_every == 1:
            raise ValueError(f"runner.heldout_every={self.heldout_every} must be 0 (none) or >= 2 "
                             "(1 would hold out every step)")


@dataclass(frozen=True)
class LoggingConfig:
    """Weights & Biases (group ``logging/``)."""

    mode: WandbMode = "offline"
    """``offline`` (default: files under run_dir/wandb), ``online``, or ``disabled``."""
    project: str = "sae-shards"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team/user); null uses the default."""
    name: str | None = None
    """Run name; null uses the run directory's name. In a ``-m`` sweep each job's run is
    named ``NAME-<its directory>``."""
    group: str | None = None
    """W&B group; null puts the jobs of one ``-m`` sweep in a group named after the sweep
    directory (single runs get none)."""
    artifacts: bool = True
    """Upload the final checkpoint as a W&B artifact."""

    def __post_init__(self) -> None:
        check_fields(self, "logging.")


@dataclass(frozen=True)
class JobConfig:
    """The whole ``sae-shards train`` job (``configs/config.yaml``)."""

    run_dir: str = "runs/default"
    """Where everything of the run goes (fixed and explicit; multirun jobs get subdirectories)."""
    seed: int = 0
    """Seed of RL (TRL, the tiny model's build, the prompts) and of the SAE's batch sampling; the
    SAE's initialisation is ``sae.seed``."""
    device: str = "auto"
    """auto (cuda when available), cpu, or cuda[:i]: where RL, the buffer and the SAE live."""
    overwrite: bool = False
    """Replace a run already in run_dir: every file it wrote is removed first."""
    resume: bool = False
    """Continue the run in run_dir from its latest complete checkpoint (policy, optimizer,
    scheduler and RNG through TRL's checkpoint; the SAE, its buffer and logs through ours). On
    the command line ``resume=auto`` (a job a scheduler requeues) is true when run_dir holds a
    checkpoint, else false (``cli.rerun.auto_resume_args``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def _deconv_lost(self) -> tuple[int, str]:
        """The first steps ``capture.source=deconv`` cannot invert under ``rl.extra``'s warmup
        from learning rate 0 (``step_rules.deconv_leading_loss`` reads a script's optimizer):
        step 1, and step 2 with momentum (Adam; an SGD optimizer counted without)."""
        extra = self.rl.extra
        warm = any(isinstance(extra.get(k), (int, float)) and extra.get(k) > 0
                   for k in ("warmup_steps", "warmup_ratio"))
        if self.capture.granularity != "step" or self.capture.source != "deconv" or not warm:
            return 0, ""
        return deconv_warmup_loss(1 if str(extra.get("optim", "")).startswith("sgd") else 2)

    def __post_init__(self) -> None:
        check_fields(self, "")
        if not self.run_dir.strip():
            raise ValueError(EMPTY_RUN_DIR)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r}; use auto, cpu or cuda[:index] (cuda:0)")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed={self.seed} must be between 0 and 2**32 - 1 = {MAX_SEED} "
                             "(it seeds torch, TRL, NumPy and the task)")
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other: resume "
                             "continues the run in run_dir, overwrite deletes it; choose one")
        check_sparse(self.sae)
        check_sae_window(self.capture, self.runner, self._samples_per_step())
        check_sae_trains(self.capture, self.runner, self.rl.max_steps,
                         samples_per_step=self._samples_per_step(), lost=self._deconv_lost())
        self.sae.check_sample_form(sample_form(self.capture.granularity))
        if self.capture.granularity != "step":
            self._check_event_rl()
            if self.model.lora.enabled and self.model.lora.dropout > 0:
                raise ValueError(
                    f"capture.granularity={self.capture.granularity} reads each event's exact "
                    f"gradient of the adapted weights, which model.lora.dropout="
                    f"{self.model.lora.dropout} makes inexact (dropout feeds the adapter another "
                    "input); set it to 0, or capture per step")
        if self.task.n_prompts < self.rl.prompts_per_step:
            raise ValueError(
                f"task.n_prompts={self.task.n_prompts} is fewer than one optimizer step's prompts "
                f"({self.rl.prompts_per_step} = rl.per_device_train_batch_size x "
                "rl.gradient_accumulation_steps / rl.num_generations); raise task.n_prompts")
        if self.rl.trainable is not None and self.model.lora.enabled:
            raise ValueError(TRAINABLE_WITH_LORA)
        if self.capture.source != "update" and self.model.lora.enabled:
            raise ValueError(f"capture.source={self.capture.source} needs dense targets and is not "
                             "supported with model.lora.enabled=true; use capture.source=update")
        if (self.capture.granularity != "step" and self.capture.precondition == "adam"
                and self.model.lora.enabled):
            raise ValueError("capture.precondition=adam is not supported with "
                             "model.lora.enabled=true: Adam keeps no state for the effective "
                             "weight W0 + s B A; use capture.precondition=none or kfac")

    def _samples_per_step(self) -> int:
        """``samples_per_step`` of this run: its prompt groups on every process (``WORLD_SIZE``,
        which ``accelerate launch`` and ``torchrun`` set for each of them)."""
        groups = self.rl.prompts_per_step * max(1, int(os.environ.get("WORLD_SIZE", "1")))
        return samples_per_step(self.capture.granularity, groups, self.rl.num_generations)

    def _check_event_rl(self) -> None:
        """Per-event capture reads each prompt group's gradient in the step that trains on it:
        activation checkpointing only in its non-reentrant form, and one generation per
        optimizer step."""
        g, extra = self.capture.granularity, self.rl.extra
        for key, least in (("num_iterations", 1), ("steps_per_generation", None)):
            value = extra.get(key, least)  # read below, before TRL's own checks (check_recipe)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"rl.extra.{key}={value!r} must be an integer >= 1"
                                 + (" (or null: TRL's default)" if least is None else ""))
        for key in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
            if _as_kwargs(extra.get(key)).get("use_reentrant"):
                raise ValueError(
                    f"capture.granularity={g} does not support rl.extra.{key}.use_reentrant=true "
                    "(the re-run forward of reentrant checkpointing cannot be mapped to prompt "
                    "groups); remove it: non-reentrant checkpointing is supported")
        spread = reused_generations(extra.get("num_iterations", 1),
                                   extra.get("steps_per_generation"),
                                   self.rl.gradient_accumulation_steps)
        if spread:
            how = generation_use(extra.get("num_iterations", 1), extra.get("steps_per_generation"),
                                 self.rl.gradient_accumulation_steps)
            raise ValueError(
                f"capture.granularity={g} needs one generation per optimizer step (each event is "
                f"a prompt group of the step that trains on it); with rl.extra {spread} {how}: "
                "remove them, or use capture.granularity=step")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobConfig":
        return build_dataclass(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def samples_per_step(granularity: Granularity, prompt_groups: int, num_generations: int) -> int:
    """The most samples one optimizer step gives: one per step, or per event one per prompt
    group (``group``) or per completion (``completion``) of the step's ``prompt_groups``."""
    return {"step": 1, "group": prompt_groups,
            "completion": prompt_groups * num_generations}[granularity]


def reused_generations(num_iterations: int, steps_per_generation: int | None,
                       gradient_accumulation_steps: int) -> dict[str, int]:
    """The TRL settings (``{name: value}``) that keep each optimizer step from training once on
    one generation of its own: ``num_iterations`` > 1, ``steps_per_generation`` (None: TRL's
    default, ``gradient_accumulation_steps``) other than ``gradient_accumulation_steps``; {}
    when it does. ``generation_use`` says what they do instead."""
    found = {"num_iterations": num_iterations,
             "steps_per_generation": steps_per_generation or gradient_accumulation_steps}
    normal = {"num_iterations": 1, "steps_per_generation": gradient_accumulation_steps}
    return {k: v for k, v in found.items() if v != normal[k]}


REUSED = "one generation trains several optimizer steps"
"""``generation_use``: TRL's ``num_iterations`` or ``steps_per_generation`` spread a generation
over steps (a step's rollouts are then the whole generation batch its step came from)."""


def generation_use(num_iterations: int, steps_per_generation: int | None,
                   gradient_accumulation_steps: int) -> str:
    """How a TRL config's generations meet its optimizer steps, in words; "" for one fresh
    generation per step. TRL generates every ``steps_per_generation * num_iterations``
    micro-batches and a step takes ``gradient_accumulation_steps`` of them, so a step trains on
    ``gradient_accumulation_steps / (steps_per_generation * num_iterations)`` generations:
    below 1 ``REUSED``; above 1 several generations a step; 1 with ``num_iterations`` > 1 its
    generation several times within the step."""
    spg = steps_per_generation or gradient_accumulation_steps
    per_step = gradient_accumulation_steps / (spg * num_iterations)
    if per_step < 1:
        return REUSED
    if per_step > 1:
        return "each optimizer step trains on several generations"
    if num_iterations > 1:
        return "each optimizer step trains on its generation several times"
    return ""


def generation_use_of(args: Any) -> str:
    """``generation_use`` of a TRL config (or "" for None)."""
    if args is None:
        return ""
    return generation_use(getattr(args, "num_iterations", 1) or 1,
                          getattr(args, "steps_per_generation", None),
                          getattr(args, "gradient_accumulation_steps", 1) or 1)


def generations_reused(args: Any) -> str:
    """``reused_generations`` of a TRL config as ``"name=value"`` text; "" when each step
    trains once on a generation of its own."""
    if args is None:
        return ""
    reused = reused_generations(getattr(args, "num_iterations", 1),
                                getattr(args, "steps_per_generation", None),
                                getattr(args, "gradient_accumulation_steps", 1))
    return ", ".join(f"{k}={v}" for k, v in reused.items())


def sample_form(granularity: Granularity) -> str:
    """The form of a run's SAE samples: ``dense`` per-step updates, ``factored`` per-event
    gradients (``LowRankSAE``'s ``sample_form``)."""
    return "dense" if granularity == "step" else "factored"


def sample_source(granularity: str, source: str | None, precondition: str = "none",
                  normalize: str = "none") -> str:
    """What one SAE sample is, as checkpoints' ``meta.source`` and ``evaluate``'s ``source``
    name it: a per-step run's ``capture.source`` (``update``, ``grad``...); per-event samples
    are gradients, ``grad`` with ``-`` and the preconditioner (``-adam``, ``-kfac``,
    ``-kfac_output``) and ``-unit`` for unit-normalised events."""
    if granularity == "step":
        return str(source)
    return "grad" + "".join(f"-{v}" for v in (precondition, normalize) if v != "none")


def deconv_warmup_loss(lost: int) -> tuple[int, str]:
    """``(lost, why)`` for ``check_sae_trains``: the first ``lost`` steps of a warmup from
    learning rate 0, which ``capture.source=deconv`` cannot invert."""
    return lost, (f"capture.source='deconv' cannot invert the first {lost} step"
                  f"{'s' if lost > 1 else ''}: the learning rate's warmup starts at 0")


def check_sparse(sae: SAEConfig) -> None:
    """Refuse an SAE a run would train with ``sae.k`` equal to ``sae.n_latents``: every latent
    active on every sample, a dense autoencoder whose latents are no sparse shards (audit 151
    F10). A subset of a trained SAE's shards (``ShardSet.subset``) may hold as many as its k."""
    if sae.k == sae.n_latents:
        raise ValueError(f"sae.k={sae.k} equals sae.n_latents: every latent would be active on "
                         "every sample, a dense autoencoder whose latents are no sparse shards; "
                         "lower sae.k or raise sae.n_latents")


def check_sae_trains(capture: CaptureConfig, runner: RunnerConfig, max_steps: int,
                     max_steps_name: str = "rl.max_steps",
                     samples_per_step: int | None = 1, lost: tuple[int, str] = (0, "")) -> None:
    """Raise if a run of ``max_steps`` RL steps ends before its SAE's first step: it starts at
    ``runner.sae_start_step``, and needs ``runner.min_samples`` trainable samples, of which one
    RL step gives at most ``samples_per_step`` (1 per step; per-event capture: the step's
    prompt groups or completions over all processes; None: not known, not checked), held-out
    steps not counted. ``max_steps_name``: how the caller names the step count
    (``rl.max_steps``; a script's trainer ``max_steps``). ``lost``: how many of the first steps
    give no sample, and why (``step_rules.deconv_leading_loss``)."""
    if runner.sae_start_step >= max_steps:
        raise ValueError(
            f"runner.sae_start_step={runner.sae_start_step} is not before the last RL step "
            f"({max_steps_name}={max_steps}), so the SAE would never train; lower it")
    every = runner.heldout_every
    if every > max_steps:  # audit 151 F6: fvu_heldout null, and no word of why
        raise ValueError(
            f"runner.heldout_every={every} holds out no step of a run of {max_steps_name}="
            f"{max_steps} (it holds out steps {every}, {2 * every}, ...), so the held-out figures "
            "would be empty; lower it, or 0 for none")
    n_lost, why_lost = lost  # the first steps; one that is held out is not counted twice
    n_lost -= sum(1 for step in range(1, n_lost + 1) if every and step % every == 0)
    trainable_steps = max(0, max_steps - (max_steps // every if every else 0) - n_lost)
    most = trainable_steps * (samples_per_step or 0)
    if samples_per_step is not None and most < runner.min_samples:
        unit = ("per-step samples (one per RL step" if capture.granularity == "step" else
                f"events at most ({samples_per_step} per RL step with capture.granularity="
                f"{capture.granularity}")
        raise ValueError(
            f"{max_steps_name}={max_steps} gives {most} trainable {unit}"
            + (f", one step in every {every} held out" if every else "")
            + (f"; {why_lost}" if n_lost else "")
            + f"), fewer than runner.min_samples={runner.min_samples}, so the SAE would never "
            f"train; raise {max_steps_name} or lower runner.min_samples")


def check_steps_or_budget(given: Mapping[str, Any], where: str = "") -> None:
    """Raise if the runner fields a user set themselves (``given``: field name to value, the
    ones named on the command line or in ``ShardCallback``'s arguments) hold both a non-zero
    ``sae_budget`` and ``sae_steps_per_rl_step``: a budget sets the SAE's steps, so the fixed
    count would be silently ignored. ``where``: how the caller names the settings' source."""
    if "sae_budget" not in given or "sae_steps_per_rl_step" not in given:
        return
    try:
        budget = float(given["sae_budget"])
    except (TypeError, ValueError):
        return  # RunnerConfig's own check names a bad value
    if budget != 0:
        raise ValueError(
            f"runner.sae_budget={given['sae_budget']} and runner.sae_steps_per_rl_step="
            f"{given['sae_steps_per_rl_step']} are both set{where}: a budget sets how many SAE "
            "steps fit in its share of RL time, so the fixed count would be ignored; drop one "
            "(runner.sae_budget=0 uses the fixed count)")


def flush_every(capacity: int, max_lag: int) -> int:
    """How many captured samples the runner lets wait before encoding them together: fewer
    than any push could overwrite before they are read (RL may be ``max_lag`` pushes ahead)."""
    return max(1, min(64, capacity - max_lag - 2))


def push_room(capacity: int, max_lag: int, threaded: bool) -> int:
    """The most samples one push (one RL step's) may commit without the ring overwriting a
    slot not yet encoded: up to ``flush_every - 1`` wait to be encoded, and a thread worker may
    have ``max_lag`` more pushes queued."""
    free = capacity - (flush_every(capacity, max_lag) - 1)
    return max(1, free // (max_lag + 1) if threaded else free)


def check_sae_window(capture: CaptureConfig, runner: RunnerConfig,
                     samples_per_step: int | None = 1) -> None:
    """Raise if the buffer can never hold ``runner.min_samples`` trainable samples (the SAE
    would never train), or, in thread mode, a queued slot could be overwritten before the
    worker reads it, or a full push's window (``ThreadRunner``: at most ``capture.capacity -
    (runner.max_lag + 1) x`` its samples; a push is one RL step's, at most
    ``samples_per_step``; None: not known, one assumed) cannot hold ``runner.min_samples``
    trainable samples, or a step's events (at most ``samples_per_step``) cannot fit in one push
    (``push_room``)."""
    if runner.concurrency == "thread" and capture.capacity <= runner.max_lag + 1:
        raise ValueError(
            f"capture.capacity={capture.capacity} must exceed runner.max_lag={runner.max_lag} + 1 "
            "in thread mode, so a queued slot is not overwritten before the SAE worker reads it")
    every = runner.heldout_every
    held_out = f" minus one step in every {every}, held out" if every else ""
    trainable = lambda n: n - (n // every if every else 0)  # noqa: E731
    if runner.min_samples > trainable(capture.capacity):
        raise ValueError(
            f"runner.min_samples={runner.min_samples} exceeds the trainable samples the buffer "
            f"can hold ({trainable(capture.capacity)}: capture.capacity={capture.capacity}"
            + held_out + "), so the SAE would never train; lower runner.min_samples or raise "
            "capture.capacity")
    per_push = samples_per_step or 1
    threaded = runner.concurrency == "thread"
    room = push_room(capture.capacity, runner.max_lag, threaded)
    if capture.granularity != "step" and per_push > room:
        enough = next(c for c in range(per_push, (runner.max_lag + 1) * (per_push + 64) + 1)
                      if push_room(c, runner.max_lag, threaded) >= per_push)
        raise ValueError(
            f"capture.granularity={capture.granularity} gives up to {per_push} events per RL "
            f"step, but capture.capacity={capture.capacity} can take at most {room} per step "
            "without overwriting samples the SAE has not read"
            + (f" (runner.concurrency=thread with runner.max_lag={runner.max_lag})"
               if threaded else "")
            + f"; raise capture.capacity to at least {enough}"
            + (" or lower runner.max_lag" if threaded and runner.max_lag else ""))
    window = capture.capacity - (runner.max_lag + 1) * per_push
    if runner.concurrency == "thread" and runner.min_samples > trainable(max(window, 0)):
        of = ("samples RL may" if per_push == 1 else
              f"x {per_push} samples per step (capture.granularity={capture.granularity}) RL may")
        raise ValueError(
            f"runner.min_samples={runner.min_samples} exceeds the trainable samples the thread "
            f"worker may draw for {'a' if per_push == 1 else 'a full'} push "
            f"({trainable(max(window, 0))}: capture.capacity={capture.capacity} less "
            f"(runner.max_lag={runner.max_lag} + 1) {of} overwrite while the worker is behind"
            + held_out + "), so the SAE would never train; lower runner.min_samples or "
            "runner.max_lag, or raise capture.capacity")
