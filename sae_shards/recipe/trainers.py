"""RL: a TRL GRPO trainer over a local model path, with every rollout recorded.

``build_grpo_trainer`` turns a plain dict of GRPO settings into ``trl.GRPOConfig`` (defaults in
``DEFAULT_GRPO``, found by running on a 2-core CPU) and hands TRL the model as a *path*: TRL loads
the policy from it and, when ``beta > 0``, rebuilds the frozen reference model from the same path.
The task's reward functions are wrapped by the ``RolloutRecorder`` so the capture callback can
write ``rollouts.jsonl`` and per-step reward statistics.

TRL facts this module relies on (1.16):
- ``per_device_train_batch_size`` counts *completions*, not prompts: each optimizer step trains
  on ``per_device_train_batch_size / num_generations`` prompts, each with ``num_generations``
  completions (a GRPO group).
- ``steps_per_generation`` defaults to ``gradient_accumulation_steps``; with both at 1 TRL
  generates, scores and trains once per optimizer step, so the recorder holds exactly one batch
  per reward function per step, scored between ``on_step_begin`` and ``on_step_end``.
  Setting ``steps_per_generation`` above ``gradient_accumulation_steps`` would reuse one
  generation over several optimizer steps, leaving some steps with no fresh rollouts.
- TRL defaults ``gradient_checkpointing`` (transformers 5 calls it ``activation_checkpointing``)
  and ``bf16`` to True; both only cost time on a CPU with tiny models, so they are off here.
- With ``beta > 0`` and a path (not PEFT), TRL loads a second, frozen copy as reference model.
- The dataset is read by ``RepeatSampler`` in chunks of ``generation_batch_size / num_generations``
  prompts (one optimizer step's prompts when ``steps_per_generation`` equals
  ``gradient_accumulation_steps`` and ``num_iterations`` is 1), each repeated ``num_generations``
  times; ``shuffle_dataset=False`` keeps dataset order (and replays it unchanged every epoch),
  which is how a ``scheduled`` task's step schedule reaches the optimizer steps intact. TRL
  shuffles completions only within one generation batch, i.e. within one optimizer step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from sae_shards.recipe.tasks import MultiSkillTask, RolloutRecorder, Task

# Measured on this project's 2-core CPU (torch.set_num_threads(2)), tiny model (hidden 64,
# 2 layers, 93k params), task `letters` (vowels, target_length = max_completion_length = 16):
#   150 steps, qwen2 seed 0: mean reward of the first 20% of steps 0.083, last 20% 0.573
#   (per-10-step means 0.073 -> 0.628, still rising, bit-identical on a rerun); 8.9 s on a quiet
#   machine (~0.06 s/step), 113 s while other jobs shared the two cores.
#   200 steps: qwen2 seeds 1 and 2 and llama seed 0 all go ~0.08 -> ~0.80 (last 10 steps ~0.86).
#   lr 1e-3 saturates (0.97 by step 100); lr 5e-4 reaches 0.94 by step 150.
# For longer runs lower the learning rate (or lengthen completions and target_length) so the
# reward keeps a gradient: once every completion in a group scores 1, GRPO's advantage is zero.
DEFAULT_GRPO: dict[str, Any] = dict(
    learning_rate=3e-4,
    lr_scheduler_type="constant",
    warmup_steps=0,
    max_steps=150,
    per_device_train_batch_size=16,  # completions per step: 2 prompts x 8 generations
    num_generations=8,
    gradient_accumulation_steps=1,
    max_completion_length=16,
    temperature=1.0,
    beta=0.0,  # no KL: no reference model, and the tiny random policy has nothing to preserve
    activation_checkpointing=False,  # TRL defaults it (as gradient_checkpointing) to True
    seed=0,
)
"""GRPO settings under which the tiny model's reward clearly rises in ~2 minutes on 2 CPU cores."""

# Settings build_grpo_trainer owns: W&B and checkpoints are handled by sae-shards, and a run
# logs every step so per-step metrics line up with captured deltas.
_FIXED = dict(report_to="none", save_strategy="no", logging_steps=1)


def grpo_config(grpo_kwargs: dict[str, Any], output_dir: str | Path) -> GRPOConfig:
    """``GRPOConfig`` from ``DEFAULT_GRPO`` updated by ``grpo_kwargs`` plus the fixed settings.

    Raises ``ValueError`` for keys GRPOConfig does not have and for attempts to change the
    settings this module fixes (``report_to``, ``save_strategy``, ``logging_steps``).
    """
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    unknown = sorted(set(grpo_kwargs) - known)
    if unknown:
        raise ValueError(
            f"rl settings {unknown} are not trl.GRPOConfig fields; check their spelling"
        )
    for key, fixed in _FIXED.items():
        if key in grpo_kwargs and grpo_kwargs[key] != fixed:
            raise ValueError(
                f"rl.{key}={grpo_kwargs[key]!r} is not supported: sae-shards fixes {key}={fixed!r} "
                "(it logs to W&B and saves checkpoints itself); remove the key"
            )
    on_cpu = not torch.cuda.is_available()
    settings = {**DEFAULT_GRPO, **grpo_kwargs, **_FIXED}
    if on_cpu:
        if settings.get("bf16") or settings.get("fp16"):
            raise ValueError("rl.bf16/rl.fp16 need a GPU; this machine has none, remove them")
        # TRL defaults bf16 to True; fp32 on CPU is both faster and what the capture assumes.
        settings.update(use_cpu=True, bf16=False)
    return GRPOConfig(output_dir=str(output_dir), **settings)


def prompts_per_step(grpo_kwargs: dict[str, Any]) -> int:
    """Prompts one optimizer step trains on (one process): batch x accumulation / generations."""
    s = {**DEFAULT_GRPO, **grpo_kwargs}
    completions = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
    return completions // s["num_generations"]


def _check_schedule(args: GRPOConfig, train_dataset: Dataset) -> None:
    """A scheduled task's dataset must reach each optimizer step as one single-task group."""
    if args.num_iterations != 1 or args.steps_per_generation != args.gradient_accumulation_steps:
        raise ValueError(
            f"rl.num_iterations={args.num_iterations} and rl.steps_per_generation="
            f"{args.steps_per_generation} would spread one generation over several optimizer "
            "steps; a scheduled task needs num_iterations=1 and steps_per_generation unset "
            "(= gradient_accumulation_steps)"
        )
    group = args.generation_batch_size // args.num_generations  # prompts per optimizer step
    labels = train_dataset["task"]
    mixed = [i // group for i in range(0, len(labels), group) if len(set(labels[i:i + group])) > 1]
    if len(labels) % group or mixed:
        raise ValueError(
            f"train_dataset is not a schedule of {group}-prompt single-task steps (steps "
            f"{mixed[:5]} mix tasks, or {len(labels)} rows is not a multiple of {group}); build "
            f"it with task.step_dataset(n_prompts, prompts_per_step={group}, seed)"
        )


def build_grpo_trainer(
    model_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    task: Task | MultiSkillTask,
    recorder: RolloutRecorder,
    train_dataset: Dataset,
    grpo_kwargs: dict[str, Any],
    callbacks: Sequence[TrainerCallback],
    output_dir: str | Path,
    peft_config: Any = None,
) -> GRPOTrainer:
    """A ``trl.GRPOTrainer`` on the model at ``model_path`` with the task's recorded rewards.

    ``grpo_kwargs`` override ``DEFAULT_GRPO``. The model goes to TRL as a path so it can rebuild
    the reference model from it when ``beta > 0``. Thread counts are the caller's job
    (``torch.set_num_threads``): TRL leaves them alone. For a ``scheduled`` task the dataset is
    read in order (``shuffle_dataset=False``) and checked to give every optimizer step prompts
    of one task.
    """
    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"model path {model_path} has no config.json; build it with "
            "models.build_tiny_model or point at a local transformers model directory"
        )
    missing = {"prompt", "task"} - set(train_dataset.column_names)
    if missing:
        raise ValueError(
            f"train_dataset lacks columns {sorted(missing)}; "
            "build it with task.dataset(n_prompts, seed)"
        )
    if task.scheduled:
        if grpo_kwargs.get("shuffle_dataset", False):
            raise ValueError(
                f"rl.shuffle_dataset=True would break task {task.name!r}'s step schedule; remove it"
            )
        grpo_kwargs = {**grpo_kwargs, "shuffle_dataset": False}
    args = grpo_config(grpo_kwargs, output_dir)
    if task.scheduled:
        _check_schedule(args, train_dataset)
    return GRPOTrainer(
        model=str(model_path),
        reward_funcs=[recorder.wrap(fn) for fn in task.reward_funcs],
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=peft_config,
    )
