"""RL: a TRL GRPO or RLOO trainer over a local model path, for the built-in recipe.

``build_trainer`` turns the job's ``RLConfig`` settings into ``trl.GRPOConfig`` / ``trl.RLOOConfig``
and hands TRL the model as a *path*: TRL loads the policy from it and, when ``beta > 0``, rebuilds
the frozen reference model from the same path. The rollouts each step trains on are read back by
``capture.rollouts`` from TRL's own completion log; the built-in tasks' reward functions log each
completion's task label there (``log_extra("task", ...)``).

TRL facts this module relies on (1.16, the same for GRPO and RLOO):
- ``per_device_train_batch_size`` counts *completions*, not prompts: each optimizer step trains
  on ``per_device_train_batch_size / num_generations`` prompts, each with ``num_generations``
  completions (a group).
- ``steps_per_generation`` defaults to ``gradient_accumulation_steps``; with ``num_iterations``
  1, TRL generates, scores and trains once per optimizer step, so its completion log holds the
  rollouts of exactly the step being taken. Larger ``steps_per_generation`` reuses one
  generation over several optimizer steps.
- TRL defaults ``gradient_checkpointing`` (transformers 5 calls it ``activation_checkpointing``)
  and ``bf16`` to True; both only cost time on a CPU with tiny models, so they are off here.
- With ``beta > 0`` and a path (not PEFT), TRL loads a second, frozen copy as reference model.
- The optimizer is created in ``train()`` from the parameters with ``requires_grad``, so
  ``freeze_except`` applied to ``trainer.model`` after the trainer is built and before it trains
  (``build_trainer``'s ``trainable``) keeps every other parameter out of the optimizer: frozen
  parameters get no gradient, no Adam state and no weight decay, and stay bit-identical.
- The dataset is read by ``RepeatSampler`` in chunks of ``generation_batch_size / num_generations``
  prompts, each repeated ``num_generations`` times; ``shuffle_dataset=False`` keeps dataset order
  (and replays it unchanged every epoch), which is how a ``scheduled`` task's step schedule reaches
  the optimizer steps intact. TRL shuffles completions only within one generation batch.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import importlib.util
import logging
import typing
from pathlib import Path
from typing import Any, Sequence

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from sae_shards.capture.selection import is_expert_stack
from sae_shards.recipe.models import meta_model
from sae_shards.recipe.tasks import MultiSkillTask, Task
from sae_shards.run.config import (TRAINABLE_WITH_LORA, Algorithm, RLConfig, generation_use_of,
                                    generations_reused)
from sae_shards.run.schema import closest

log = logging.getLogger(__name__)

TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}

DEFAULT_GRPO: dict[str, Any] = dict(
    **RLConfig().trl_kwargs(),  # measured defaults: see RLConfig
    lr_scheduler_type="constant",
    warmup_steps=0,
    activation_checkpointing=False,  # TRL defaults it (as gradient_checkpointing) to True
    # Without checkpointing transformers asks DDP to look for unused parameters, an extra
    # autograd traversal per step that every rank warns about: every trainable weight of a
    # causal LM takes part in its forward (frozen ones, rl.trainable, are not DDP's concern).
    ddp_find_unused_parameters=False,
    seed=0,
)
"""Settings under which the tiny model's reward clearly rises in ~2 minutes on 2 CPU cores
(beta 0: no reference model; the tiny random policy has nothing to preserve)."""

# Settings build_trainer owns: W&B is handled by sae-shards, and a run logs every step so
# per-step metrics line up with captured deltas.
_FIXED = dict(report_to="none", logging_steps=1)
_CHECKPOINTING = ("save_strategy", "save_steps", "save_total_limit", "save_only_model")
"""Set from ``runner.checkpoint_every`` (``checkpointing``): TRL saves at the steps sae-shards
does, so every checkpoint of the run can be resumed from."""


def checkpointing(every: int) -> dict[str, Any]:
    """TRL settings that save its checkpoint (policy, optimizer, scheduler, RNG) every ``every``
    optimizer steps (0: never), keeping the newest two (one may be cut short by a kill)."""
    if not every:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": every, "save_total_limit": 2,
            "save_only_model": False}


def check_trl_settings(grpo_kwargs: dict[str, Any], algorithm: Algorithm = "grpo",
                       new_run: bool = True) -> None:
    """Refuse keys that ``algorithm``'s TRL config class does not have and attempts to change
    the settings sae-shards fixes (``ValueError``); ``trl_config`` takes what passes. Cheap:
    ``sae-shards train`` calls it on every job's config before anything is written. A
    ``new_run`` has its values checked too (``_check_trl_values``); a resume continues with the
    values its run recorded, which an earlier version took."""
    config_cls = TRAINERS[algorithm][0]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(grpo_kwargs) - known)
    if unknown:  # rl's own fields are TRL's: what is unknown came in rl.extra
        own = {f.name for f in dataclasses.fields(RLConfig)}  # set as rl.<name>, not in extra
        named = [f"rl.extra.{k}" + (f" (did you mean rl.{'' if close in own else 'extra.'}"
                                    f"{close}?)" if close else "")
                 for k in unknown for close in [closest(k, known)]]
        raise ValueError(f"rl settings {named} are not trl.{config_cls.__name__} fields; check "
                         "their spelling")
    owned = sorted(set(grpo_kwargs) & set(_CHECKPOINTING))
    if owned:
        raise ValueError(f"rl settings {owned} are set by sae-shards from "
                         "runner.checkpoint_every (TRL saves when sae-shards does); remove them")
    for key, fixed in _FIXED.items():
        if key in grpo_kwargs and grpo_kwargs[key] != fixed:
            raise ValueError(
                f"rl.{key}={grpo_kwargs[key]!r} is not supported: sae-shards fixes {key}={fixed!r} "
                "(it logs to W&B and saves checkpoints itself); remove the key"
            )
    if new_run:
        _check_trl_values(grpo_kwargs, config_cls)


def check_trl_config(grpo_kwargs: dict[str, Any], output_dir: str | Path,
                     algorithm: Algorithm = "grpo", checkpoint_every: int = 0) -> None:
    """Build the TRL config a new run would train with (``trl_config``: it writes nothing) and
    raise its own refusals (``generation_batch_size`` not a multiple of the batch...) as a
    ``ValueError`` naming the settings, before anything is written; and refuse an evaluation
    schedule, which ``sae-shards train``'s trainer (no eval dataset) fails on (audit 151 F5)."""
    strategy = str(getattr(grpo_kwargs.get("eval_strategy"), "value",
                           grpo_kwargs.get("eval_strategy", "no")))
    if strategy != "no":
        raise ValueError(f"rl.extra.eval_strategy={strategy!r}: sae-shards train gives the "
                         "trainer no eval dataset to evaluate on; remove it")
    try:
        trl_config(grpo_kwargs, output_dir, algorithm, checkpoint_every)
    except (ValueError, TypeError) as e:
        raise ValueError(f"trl.{TRAINERS[algorithm][0].__name__} refused the settings "
                         f"(rl.<name> or rl.extra.<name>): {e}") from None


def _check_trl_values(grpo_kwargs: dict[str, Any], config_cls: type) -> None:
    """Refuse values that TRL would take only to fail deep inside the run, after files are
    written (audit 143): a number or flag field given another type (``weight_decay=abc`` failed
    in torch's fused AdamW at the first step), ``num_iterations`` below 1 (0 trained no step and
    ended as a finished run) and ``use_vllm`` without vLLM installed. Fields of other types are
    TRL's to judge (their annotations do not always say what it takes)."""
    hints = typing.get_type_hints(config_cls)
    for key, value in grpo_kwargs.items():
        want = _plain_type(hints.get(key))
        if want is not None and not (_fits(value, want) if value is not None
                                     else _optional(hints.get(key))):
            raise ValueError(f"rl.extra.{key}={value!r}: trl.{config_cls.__name__} takes "
                             f"{want.__name__ if isinstance(want, type) else want}"
                             f"{' or null' if _optional(hints.get(key)) else ''} there")
        named = _enum_of(hints.get(key))
        if named is not None and isinstance(value, str) and value not in named:
            raise ValueError(f"rl.extra.{key}={value!r} is not one of trl.{config_cls.__name__}'s "
                             f"choices there: {', '.join(sorted(named))}")
    if "num_train_epochs" in grpo_kwargs:
        raise ValueError("rl.extra.num_train_epochs has no effect: sae-shards train always sets "
                         "rl.max_steps, which transformers takes over it; set rl.max_steps to "
                         "the steps you want (epochs x task.n_prompts / prompts per step)")
    if grpo_kwargs.get("num_iterations", 1) < 1:
        raise ValueError(f"rl.extra.num_iterations={grpo_kwargs['num_iterations']} must be >= 1 "
                         "(each generation is trained on num_iterations times; 0 trains no step)")
    if grpo_kwargs.get("use_vllm") and importlib.util.find_spec("vllm") is None:
        raise ValueError("rl.extra.use_vllm=true needs vLLM, which is not installed here "
                         "(pip install trl[vllm]); remove it to generate with transformers")


def _enum_of(hint: Any) -> set[str] | None:
    """The values of the enum in a field's annotation (``optim``: ``OptimizerNames | str``),
    which transformers takes by value; None for a field without one."""
    for arg in (*typing.get_args(hint), hint):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return {str(m.value) for m in arg}
    return None


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _plain_type(hint: Any) -> type | None:
    """``bool``, ``int`` or ``float`` when a field's annotation is that type (or it or None),
    else None (another type, or a union of several: not checked here)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _optional(hint) else [hint]
    return args[0] if len(args) == 1 and args[0] in (bool, int, float) else None


def _fits(value: Any, want: type) -> bool:
    """Whether ``value`` is a ``want`` (an int is a float; a bool is neither)."""
    if want is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if want is int else isinstance(value, (int, float))


def check_precision(settings: dict[str, Any]) -> bool:
    """Whether TRL settings ``settings`` train on the CPU (``use_cpu``, or no GPU here); raise
    ``ValueError`` for fp16 there, which transformers has no mixed precision for."""
    on_cpu = bool(settings.get("use_cpu")) or not torch.cuda.is_available()
    if on_cpu and settings.get("fp16"):
        raise ValueError("rl.extra.fp16=true needs a GPU: this run trains on the CPU (no GPU, "
                         "or device=cpu), where transformers has no fp16 mixed precision; "
                         "remove it, or ask for bf16 autocast with rl.extra.bf16=true")
    return on_cpu


def trl_config(grpo_kwargs: dict[str, Any], output_dir: str | Path,
               algorithm: Algorithm = "grpo", checkpoint_every: int = 0) -> GRPOConfig | RLOOConfig:
    """``GRPOConfig``/``RLOOConfig`` from ``DEFAULT_GRPO`` updated by ``grpo_kwargs`` plus the
    fixed settings and TRL checkpoints every ``checkpoint_every`` steps (``checkpointing``).

    Raises ``ValueError`` for keys the config class does not have and for attempts to change the
    settings this module fixes (``report_to``, ``logging_steps``, the checkpointing ones).
    """
    check_trl_settings(grpo_kwargs, algorithm, new_run=False)  # values: check_recipe's
    defaults = dict(DEFAULT_GRPO)
    if "gradient_checkpointing" in grpo_kwargs:  # its old name: the default must not override it
        defaults.pop("activation_checkpointing")
    settings = {**defaults, **grpo_kwargs, **_FIXED, **checkpointing(checkpoint_every)}
    on_cpu = check_precision(settings)
    if on_cpu:
        # TRL defaults bf16 to True; fp32 is faster on a CPU with tiny models, and bf16
        # autocast (fp32 weights) only when asked for
        settings.update(use_cpu=True, bf16=bool(grpo_kwargs.get("bf16", False)))
    return TRAINERS[algorithm][0](output_dir=str(output_dir), **settings)


def _check_schedule(args: GRPOConfig | RLOOConfig, train_dataset: Dataset,
                    task: MultiSkillTask) -> None:
    """A scheduled task's dataset must reach each optimizer step as the step it was built as:
    one single-task run of prompts (``random``, ``blocks``) or exactly the mix ``step_mixes``
    gives (``mixed``; also catches a dataset built for another number of prompts per step)."""
    reused = generations_reused(args)
    if reused:
        raise ValueError(
            f"with rl.extra {reused} {generation_use_of(args)}; a scheduled task needs "
            "num_iterations=1 and steps_per_generation unset (= gradient_accumulation_steps)"
        )
    group = args.generation_batch_size // args.num_generations  # prompts per optimizer step
    labels = list(train_dataset["task"])
    if task.schedule == "mixed":
        n_steps = len(labels) // group
        planned = [label for step in task.step_mixes(max(n_steps, 1), group) for label in step]
        if len(labels) % group or labels != planned[:len(labels)] or not n_steps:
            raise ValueError(
                f"train_dataset is not the mixed schedule of task {task.name!r} in {group}-prompt "
                f"steps ({len(labels)} rows); build it with task.step_dataset(n_prompts, "
                f"prompts_per_step={group}, seed)")
        return
    mixed = [i // group for i in range(0, len(labels), group) if len(set(labels[i:i + group])) > 1]
    if len(labels) % group or mixed:
        raise ValueError(
            f"train_dataset is not a schedule of {group}-prompt single-task steps (steps "
            f"{mixed[:5]} mix tasks, or {len(labels)} rows is not a multiple of {group}); build "
            f"it with task.step_dataset(n_prompts, prompts_per_step={group}, seed)"
        )


def check_reward_scale(grpo_kwargs: dict[str, Any], algorithm: Algorithm = "grpo") -> None:
    """``_check_reward_scale`` on the settings ``trl_config`` would give (``grpo_kwargs`` over
    ``DEFAULT_GRPO`` over the config class's defaults), without building the config: cheap
    enough for ``sae-shards train``'s checks before anything is written."""
    config_cls = TRAINERS[algorithm][0]
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)
                if f.default is not dataclasses.MISSING}
    settings = {**defaults, **DEFAULT_GRPO, **grpo_kwargs}
    _check_reward_scale(settings.get("scale_rewards", "none"),
                        settings.get("multi_objective_aggregation", "sum_then_normalize"))


def _check_reward_scale(scaling: str, aggregation: str) -> None:
    """Per-task reward scales must reach the advantages: GRPO's per-group std scaling would
    divide each group's factor out again. (RLOO keeps them: its advantage is a completion's
    reward minus the mean of the group's others, at most normalised over the whole batch.)
    ``scaling``, ``aggregation``: TRL's ``scale_rewards`` and ``multi_objective_aggregation``."""
    if scaling == "group" or aggregation == "normalize_then_sum":
        raise ValueError(
            f"task.options.reward_scale has no effect under rl scale_rewards={scaling!r} / "
            f"multi_objective_aggregation={aggregation!r}: TRL divides each group's rewards by "
            "their own std, which cancels a per-task factor; set rl.extra.scale_rewards=none "
            "(advantage = reward - group mean) or batch, or drop task.options.reward_scale")


def freeze_except(model: torch.nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Let RL change only the parameters whose names match a glob in ``patterns`` (``fnmatch``
    over ``model.named_parameters()`` names, e.g. ``model.layers.*``): every other parameter gets
    ``requires_grad=False``. ``None`` keeps everything trainable. Returns the trainable names.

    Every pattern must match at least one parameter, else ``ValueError`` naming
    ``rl.trainable``, the pattern and some parameter names. Call it before the optimizer is
    created (``build_trainer`` does, between building the trainer and ``train()``).
    """
    names = [name for name, _ in model.named_parameters()]
    if patterns is None:
        return names
    if not patterns:
        raise ValueError("rl.trainable is empty; give glob patterns over parameter names, or "
                         "null to train every parameter")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:6]) + (f" ... (+{len(names) - 6} more)" if len(names) > 6
                                            else "")
            raise ValueError(f"rl.trainable pattern {pattern!r} matches no parameter of "
                             f"{type(model).__name__}; its parameters are named like {shown}")
    kept = []
    for name, param in model.named_parameters():
        train = any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        param.requires_grad_(train)
        if train:
            kept.append(name)
    return kept


def build_trainer(
    model_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    task: Task | MultiSkillTask,
    train_dataset: Dataset,
    grpo_kwargs: dict[str, Any],
    callbacks: Sequence[TrainerCallback],
    output_dir: str | Path,
    peft_config: Any = None,
    algorithm: Algorithm = "grpo",
    checkpoint_every: int = 0,
    trainable: Sequence[str] | None = None,
    trust_remote_code: bool = False,
) -> GRPOTrainer | RLOOTrainer:
    """A ``trl.GRPOTrainer`` or ``trl.RLOOTrainer`` on the model at ``model_path`` with the
    task's rewards.

    ``grpo_kwargs`` override ``DEFAULT_GRPO``. The model goes to TRL as a path so it can rebuild
    the reference model from it when ``beta > 0``. Thread counts are the caller's job
    (``torch.set_num_threads``): TRL leaves them alone. For a ``scheduled`` task the dataset is
    read in order (``shuffle_dataset=False``) and checked to give every optimizer step prompts
    of one task (or the planned mix of tasks, schedule ``mixed``). ``trainable`` (glob
    patterns; None: every parameter) selects the parameters RL may change (``freeze_except``);
    it cannot be combined with ``peft_config`` (LoRA already trains its adapters only).
    ``trust_remote_code``: TRL loads a model that needs its own code (``auto_map``) by running
    the Python files of ``model_path`` (``model.trust_remote_code``).
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
    if trust_remote_code:
        grpo_kwargs = {**grpo_kwargs, "trust_remote_code": True}
    args = trl_config(grpo_kwargs, output_dir, algorithm, checkpoint_every)
    if task.scheduled:
        _check_schedule(args, train_dataset, task)
    if getattr(task, "scaled", False):
        _check_reward_scale(getattr(args, "scale_rewards", "none"),
                            getattr(args, "multi_objective_aggregation", "sum_then_normalize"))
    if trainable is not None and peft_config is not None:
        raise ValueError(TRAINABLE_WITH_LORA)
    if peft_config is not None:
        check_lora_modules(model_path, lora_modules(peft_config),
                           trust_remote_code=trust_remote_code)
    trainer = TRAINERS[algorithm][1](
        model=str(model_path),
        reward_funcs=list(task.reward_funcs),
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=peft_config,
    )
    freeze_except(trainer.model, trainable)  # before train() builds the optimizer
    return trainer


ALL_LINEAR = "all-linear"
"""peft's shorthand for ``target_modules``: every linear layer but the output layer
(``model.lora.target_modules=[all-linear]``)."""


def lora_modules(peft_config: Any) -> list[str]:
    """A peft config's ``target_modules`` as a sorted list (``[ALL_LINEAR]`` for the shorthand,
    which peft keeps as a string)."""
    modules = peft_config.target_modules
    return [modules] if isinstance(modules, str) else sorted(modules)


def check_lora_modules(model: str | Path | torch.nn.Module, target_modules: Sequence[str],
                       warn: bool = True, trust_remote_code: bool = False) -> None:
    """Refuse ``model.lora.target_modules`` that capture cannot follow, before the model
    loads (``model``: its directory, or the policy built on the meta device): a name no
    ``nn.Linear`` of the model has (peft would adapt the others silently,
    or fail when none matches), or one naming a GPT-2-style ``Conv1D`` layer (peft adapts it
    with ``fan_in_fan_out``, which capture does not support). A name matches a module whose
    name is it or ends with ``.`` + it, as in peft. A mixture of experts' stacked expert
    tensors ``[experts, m, n]`` are no linear layers: LoRA leaves them frozen, which the
    refusal says and an accepted setting logs as a warning (with ``warn``).
    ``trust_remote_code``: a directory's own code (``auto_map``) builds its meta model."""
    modules, stacked = _matrix_modules(model, trust_remote_code)
    named = model if isinstance(model, (str, Path)) else type(model).__name__
    # the names to suggest: not lm_head, which TRL does not adapt
    linear = sorted({n.rsplit(".", 1)[-1] for n, kind in modules.items()
                     if kind == "Linear"} - {"lm_head"})

    def matches(target: str, kind: str) -> bool:
        return any(k == kind and (n == target or n.endswith(f".{target}"))
                   for n, k in modules.items())

    field_ = f"model.lora.target_modules={list(target_modules)}"
    if list(target_modules) == [ALL_LINEAR]:  # peft adapts these (and Conv1D layers too)
        convs = sorted({n.rsplit(".", 1)[-1] for n, kind in modules.items() if kind == "Conv1D"})
        target_modules = linear + convs
        if not target_modules:
            raise ValueError(f"{field_}: {named} has no linear layer to adapt"
                             f"{_frozen_experts(stacked, '; ')}")
    conv = [t for t in target_modules if matches(t, "Conv1D")]
    if conv:
        raise ValueError(
            f"{field_}: {conv} are Conv1D layers (GPT-2 style) of {named}, which peft "
            "adapts with fan_in_fan_out, and capture follows LoRA on nn.Linear layers only; "
            "train this model without LoRA (model.lora.enabled=false: capture takes the "
            "Conv1D weights themselves) or use a model with nn.Linear layers (qwen2, llama)")
    missing = [t for t in target_modules if not matches(t, "Linear")]
    if missing:
        convs = sorted({n.rsplit(".", 1)[-1] for n, kind in modules.items() if kind == "Conv1D"})
        also = (f"; its Conv1D layers {convs} (GPT-2 style) cannot take a LoRA adapter that "
                "capture follows (fan_in_fan_out): train it without LoRA" if convs else "")
        have = (f"its linear layers are named {linear} (give model.lora.target_modules=[...] "
                "with those names)" if linear else "it has no other linear layer to adapt")
        raise ValueError(f"{field_}: {missing} name no linear layer of {named}; {have}{also}"
                         f"{_frozen_experts(stacked, '; ')}")
    if stacked and warn:
        log.warning("model.lora.enabled=true: %s", _frozen_experts(stacked, ""))


def _frozen_experts(stacked: Sequence[str], lead: str) -> str:
    """What LoRA does to a mixture of experts' stacked tensors: leaves them frozen."""
    if not stacked:
        return ""
    return (f"{lead}its {len(stacked)} stacked expert tensors [experts, m, n] ({stacked[0]}, "
            "...) are no linear layers: LoRA leaves them frozen, so RL changes no expert and "
            "capture sees none; train without LoRA (model.lora.enabled=false) to capture them")


def _matrix_modules(model: str | Path | torch.nn.Module, trust_remote_code: bool = False
                    ) -> tuple[dict[str, str], list[str]]:
    """``{module name: "Linear" | "Conv1D"}`` for a model's matrix layers, and the names of its
    stacked expert tensors (3-D parameters outside conv layers); a model directory is built
    from its config alone, on the meta device."""
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    if isinstance(model, (str, Path)):
        config = AutoConfig.from_pretrained(model, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
        model = meta_model(config, trust_remote_code)
    modules = {name: "Linear" if isinstance(m, torch.nn.Linear) else "Conv1D"
               for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    stacked = [name for name, p in model.named_parameters() if is_expert_stack(model, name, p)]
    return modules, stacked
