"""What ``ShardCallback`` reads from a TRL trainer: the settings ``config.json`` records (how
completions were sampled, what sizes and moves each step, LoRA, reward weights), the samples one
optimizer step gives, and a watch on TRL's logs for steps whose rewards all tied.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from typing import Any

import torch

from sae_shards.capture import distributed
from sae_shards.run.config import generations_reused, samples_per_step

log = logging.getLogger(__name__)


SAMPLING_ARGS = ("max_completion_length", "max_new_tokens", "num_generations", "temperature",
                 "top_p", "top_k", "min_p", "repetition_penalty", "chat_template_kwargs",
                 "generation_kwargs")
"""The TRL config fields that say how completions were sampled, recorded in ``config.json``'s
``rl`` (``analysis.shards.run_sampling`` reads them back; ``max_new_tokens``: the online DPO
trainers' name for the completion length)."""


def lora_settings(model: torch.nn.Module) -> dict[str, Any]:
    """A PEFT model's trained LoRA adapter settings, named as ``model.lora`` of
    ``sae-shards train`` (``enabled``, ``r``, ``alpha``, ``target_modules``, ``dropout``,
    ``rslora``); ``{"enabled": True}`` when its config cannot be read."""
    configs = getattr(model, "peft_config", None) or {}
    cfg = configs.get(getattr(model, "active_adapter", None)) or next(iter(configs.values()), None)
    if cfg is None:
        return {"enabled": True}
    modules = getattr(cfg, "target_modules", None)
    return {"enabled": True, "r": getattr(cfg, "r", None),
            "alpha": getattr(cfg, "lora_alpha", None),
            "target_modules": (sorted(modules) if isinstance(modules, (set, list, tuple))
                               else modules),
            "dropout": getattr(cfg, "lora_dropout", None),
            "rslora": getattr(cfg, "use_rslora", None)}


def reward_weights(trainer: Any | None) -> list[float] | None:
    """The trainer's reward weights (TRL's ``reward_weights``, 1 per function by default)."""
    weights = getattr(trainer, "reward_weights", None)
    return [float(w) for w in weights.tolist()] if weights is not None else None


DATASET_ROWS_HASHED = 64
"""How many rows, evenly spaced over the dataset, ``dataset_record`` hashes."""

DATASET_READS = 3
"""How many times ``dataset_record`` reads those rows: a digest is recorded only when every read
gave the same (a random transform that rarely changes a row reads alike twice more often)."""


def dataset_record(dataset: Any) -> dict[str, Any] | None:
    """What identifies the trainer's training dataset in ``config.json``'s ``rl.dataset``, so
    that a script resumed on another one is refused (another length, other columns) or warned
    about (other rows, another order: ``rows_changed``) instead of training the rest of the run
    on it without a word: its row count, its columns, and a SHA-256 of up to ``DATASET_ROWS_HASHED`` evenly spaced rows (None when the rows read
    differently each time, or cannot be read by index or hashed). None for a dataset without a
    length (an iterable dataset: not checked)."""
    try:
        n = len(dataset)
    except (TypeError, NotImplementedError):
        return None
    try:
        digests = {_rows_digest(dataset, n) for _ in range(DATASET_READS)}
    except Exception:  # noqa: BLE001 — rows it cannot read or hash: no digest, and the run
        digests = {None}  # goes on (this record must never stop one)
    names = getattr(dataset, "column_names", None)
    return {"rows": n, "columns": list(names) if isinstance(names, (list, tuple)) else None,
            # a dataset whose rows read differently each time (a random transform) is
            # recorded without one: no resume could match it
            "digest": digests.pop() if len(digests) == 1 else None}


def without_digest(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """``record`` (``dataset_record``) as a resume compares it with the run's: its row count and
    columns (another length or other columns are refused), not its digest (``rows_changed``)."""
    return None if record is None else {k: v for k, v in record.items() if k != "digest"}


def rows_changed(now: dict[str, Any] | None, recorded: Any) -> str | None:
    """``"hash A -> B"`` when a resumed script's dataset (``now``) hashes otherwise than the
    run's ``recorded`` one; None when they match or either has no digest (rows that read
    differently each time may read alike three times in one process and not in the other).
    Warned about and recorded, not refused: the same script may render its prompts otherwise
    another day (a chat template that writes today's date)."""
    theirs = recorded.get("digest") if isinstance(recorded, dict) else None
    mine = now.get("digest") if now else None
    return f"hash {theirs} -> {mine}" if theirs and mine and theirs != mine else None


def _rows_digest(dataset: Any, n: int) -> str:
    """SHA-256 (16 hex digits) of ``dataset``'s rows 0 and ``n - 1`` and evenly spaced ones
    between them, ``DATASET_ROWS_HASHED`` in all (every row of a smaller dataset)."""
    m = min(n, DATASET_ROWS_HASHED)
    digest = hashlib.sha256()
    for i in range(m):
        row = dataset[i * (n - 1) // max(m - 1, 1)]
        digest.update(json.dumps(_hashable(row), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _hashable(value: Any) -> Any:
    """``value`` as JSON whose text depends only on its content: a tensor or array by its
    dtype, shape and bytes; an object without a content-only form (an image, a callable) by
    its type name alone (its ``repr`` may name a memory address, which differs per process)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _hashable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hashable(v) for v in value]
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return [str(value.dtype), list(value.shape),
                hashlib.sha256(data.numpy().tobytes()).hexdigest()]
    if getattr(getattr(value, "dtype", None), "kind", None) == "O":  # numpy objects: their
        return _hashable(value.tolist())  # bytes are pointers, other in every process
    if hasattr(value, "tobytes") and hasattr(value, "dtype"):  # a numpy array or scalar
        return [str(value.dtype), list(getattr(value, "shape", ())),
                hashlib.sha256(value.tobytes()).hexdigest()]
    return type(value).__name__


def reward_names(trainer: Any | None) -> list[str] | None:
    """The names of the trainer's reward functions (TRL's ``reward_func_names``: a function's
    or class's name, a reward model's id), in order."""
    names = getattr(trainer, "reward_func_names", None)
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def trainer_samples_per_step(args: Any, granularity: str) -> int | None:
    """The most samples one optimizer step of a TRL trainer gives: 1 per step; per event, its
    prompt groups (``generation_batch_size / num_generations``, over all processes) or their
    completions. None when the trainer's config does not say (or reuses generations, which
    per-event capture refuses)."""
    if granularity == "step":
        return 1
    total = getattr(args, "generation_batch_size", None)
    k = getattr(args, "num_generations", None)
    if not (isinstance(total, int) and isinstance(k, int) and k > 0) or generations_reused(args):
        return None
    return samples_per_step(granularity, total // k, k)


def reward_batch(args: Any) -> int | None:
    """The completions TRL's GRPO/RLOO trainer scores per reward call on one process: its
    ``generation_batch_size`` (over all processes) over the world size; None without one."""
    total = getattr(args, "generation_batch_size", None)
    return int(total) // distributed.world_size() if isinstance(total, int) and total else None


def trained_steps(trainer: Any, args: Any) -> int | None:
    """The RL steps the trainer trains: ``args.max_steps``, or, for an epoch-based run (TRL's
    ``max_steps=-1`` with ``num_train_epochs``), the count transformers resolved into
    ``trainer.state.max_steps`` when ``train()`` began (``args.max_steps`` before that)."""
    steps = getattr(args, "max_steps", None)
    if isinstance(steps, int) and steps > 0:
        return steps
    resolved = getattr(getattr(trainer, "state", None), "max_steps", None)
    return resolved if isinstance(resolved, int) and resolved > 0 else steps


STEP_ARGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
             "num_iterations", "learning_rate", "beta", "seed", "loss_type", "scale_rewards",
             "max_grad_norm", "importance_sampling_level", "mask_truncated_completions",
             # the learning-rate schedule (a resume with another one jumps the step size)
             "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
             # the optimizer (transformers restores its saved param groups: a new weight decay
             # or beta would be ignored while the script says otherwise)
             "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
             # GRPO's clipping and token selection
             "epsilon", "epsilon_high", "delta", "top_entropy_quantile")
"""The trainer's settings that size and move each RL step, recorded in ``config.json``'s ``rl``
so that a resume with other values is refused naming them (TRL itself only warns). A field
the trainer's config lacks (another trainer or version) is recorded as null; a run recorded
before a field was added is not checked on it."""

SAME_OPTIM = {"adamw_torch_fused": "adamw_torch"}
"""Optimizer names recorded as one: the same algorithm in another kernel."""


def step_settings(args: Any) -> dict[str, Any]:
    """``STEP_ARGS`` of a trainer's config as ``config.json`` records them: an enum (TRL's
    ``SchedulerType``, ``OptimizerNames``) as its value, so a refusal reads as the script wrote
    it; None where the config lacks the field. With them ``num_train_epochs`` for an
    epoch-based run (``max_steps`` -1; null otherwise, where transformers ignores it)."""
    def plain(value: Any) -> Any:
        return value.value if isinstance(value, enum.Enum) else value

    settings = {key: plain(getattr(args, key, None)) for key in STEP_ARGS}
    # transformers' default optim is adamw_torch_fused on torch >= 2.8, adamw_torch below: one
    # algorithm, which a resume under another torch must not be refused for (audit 140)
    settings["optim"] = SAME_OPTIM.get(settings["optim"], settings["optim"])
    steps = getattr(args, "max_steps", None)
    epochs = not (isinstance(steps, int) and steps > 0)  # an epoch-based run: its epochs count
    return {**settings,
            # named beside the max_steps they resolve to (audit 138: a resume with other
            # epochs was refused as "rl.max_steps: 24 in the run, 48 now", a field never set)
            "num_train_epochs": getattr(args, "num_train_epochs", None) if epochs else None}


TIED_METRIC = "frac_reward_zero_std"
"""TRL's (GRPO and RLOO) share of prompt groups whose rewards all tied, per logged step."""


class TiedRewardsWatch:
    """Warns once when every prompt group's rewards tied in ``after`` consecutive logged steps:
    the advantages are then zero, the policy's update carries no reward signal (only the KL
    term and weight decay move it), and no shard can find what RL reinforced."""

    def __init__(self, after: int = 5) -> None:
        self.after = after
        self.first: int | None = None  # the first step of the current run of tied steps
        self.count = 0
        self.warned = False
        self.varied = False  # some earlier logged step had a group whose rewards differed

    def observe(self, frac_tied: float | None, step: int) -> None:
        if frac_tied is None or self.warned:
            return
        if frac_tied < 1.0:
            self.first, self.count, self.varied = None, 0, True
            return
        self.first = step if self.first is None else self.first
        self.count += 1
        if self.count >= self.after:
            self.warned = True
            log.warning(
                "every prompt group's rewards tied in %d logged steps in a row (steps %d-%d, "
                "TRL's %s = 1): the advantages are zero, so the policy's updates carry no "
                "reward signal and the shards cannot find one. Check the reward: every "
                "completion scoring the same (saturated, e.g. a target any completion reaches, "
                "or never earned) gives this; for sae-shards train's tasks see "
                "task.options.target_length%s", self.count, self.first, step, TIED_METRIC,
                ". Rewards that differed in earlier steps, as here, and then tie everywhere can "
                "also be a policy that collapsed, every completion alike: a learning rate too "
                "high for it (the trainer's learning_rate; sae-shards train: rl.learning_rate)"
                if self.varied else "")


def model_id(model: torch.nn.Module) -> str:
    """The model's Hub id or directory, else (a model built in the script) its class; a PEFT
    model by its base model's class, which is what a reader needs to rebuild it."""
    config = getattr(model, "config", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(config, "_name_or_path", "") or type(base).__name__)
