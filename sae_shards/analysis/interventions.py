"""Interventions: move a model's weights along a shard and measure the reward that follows.

A *direction* here is a plain ``{parameter name: tensor of that parameter's shape}`` dict in
parameter units (a shard's decoder direction mapped back through the SAE's input scale), so this
module knows nothing of the SAE classes. Names are those of ``model.named_parameters()``.

Every weight change is a context manager that restores the touched parameters **bit-exactly** on
exit, also when the body raises: it keeps a copy of the original values and copies them back
(subtracting the change again would not give the same bits under float rounding). All names and
shapes are checked before anything is modified.

``dose_response`` is the steering measurement of the design: fresh rollouts scored by the task's
reward functions with ``alpha * shard`` added, beside a norm-matched random direction (the
control), with the same rollout seed at every alpha so differences come from the weights alone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from sae_shards.recipe.tasks import Task

Direction = Mapping[str, Tensor]
"""``{parameter name: tensor of that parameter's shape}``, in parameter units."""


def _resolve(
    model: nn.Module, tensors: Mapping[str, Tensor], what: str
) -> dict[str, nn.Parameter]:
    """The parameters ``tensors`` names, after checking every name and shape (raises ValueError).

    Tied parameters are reachable under each of their names; naming one tensor twice is an error
    because the changes would silently compound.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    resolved: dict[str, nn.Parameter] = {}
    seen: dict[int, str] = {}
    for name, value in tensors.items():
        if name not in params:
            raise ValueError(
                f"{what}: {name!r} is not a parameter of {type(model).__name__}; "
                f"names must match model.named_parameters() (e.g. {next(iter(params))!r})"
            )
        param = params[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"{what}: {name!r} has shape {tuple(value.shape)} but the parameter has shape "
                f"{tuple(param.shape)}"
            )
        if id(param) in seen:
            raise ValueError(
                f"{what}: {name!r} and {seen[id(param)]!r} are the same (tied) parameter; "
                "give it under one name only"
            )
        seen[id(param)] = name
        resolved[name] = param
    return resolved


@contextlib.contextmanager
def set_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> Iterator[None]:
    """Set the named parameters to ``weights`` (cast to each parameter's dtype) inside the block.

    On exit, also by exception, every touched parameter gets its original bits back.
    """
    params = _resolve(model, weights, "set_weights")
    with torch.no_grad():
        originals = {name: p.detach().clone() for name, p in params.items()}
        try:
            for name, p in params.items():
                p.copy_(weights[name].to(device=p.device, dtype=p.dtype))
            yield
        finally:
            for name, p in params.items():
                p.copy_(originals[name])


@contextlib.contextmanager
def add_direction(model: nn.Module, direction: Direction, alpha: float) -> Iterator[None]:
    """Add ``alpha * direction`` to the named parameters inside the block; restore bit-exactly.

    The sum is computed in fp32 and cast back to each parameter's dtype (bf16 weights included).
    """
    params = _resolve(model, direction, "add_direction")
    with torch.no_grad():
        shifted = {
            name: p.detach().float() + alpha * direction[name].to(p.device, torch.float32)
            for name, p in params.items()
        }
    with set_weights(model, shifted):
        yield


@contextlib.contextmanager
def remove_direction(
    model: nn.Module, direction: Direction, initial: Mapping[str, Tensor]
) -> Iterator[float]:
    """Remove the shard's part of the cumulative update inside the block; yield its coefficient.

    ``model`` holds the final weights ``theta_T``, ``initial`` the run's initial weights
    ``theta_0`` (at least for the direction's parameters). Over the direction's parameters,
    ``Delta = theta_T - theta_0`` and ``c = <Delta, d> / <d, d>`` (Frobenius inner products summed
    over all of them); the weights become ``theta_T - c * d``. Yields ``c`` in the units of ``d``
    (so for a unit-norm ``d``: parameter units). Restores ``theta_T`` bit-exactly on exit.
    """
    params = _resolve(model, direction, "remove_direction")
    missing = [name for name in params if name not in initial]
    if missing:
        raise ValueError(
            f"remove_direction: initial weights lack {missing}; pass theta_0 for every "
            "parameter of the direction (e.g. from the run's saved initial model)"
        )
    _resolve(model, {name: initial[name] for name in params}, "remove_direction initial")
    c = update_coefficient({name: p for name, p in params.items()}, initial, direction)
    with torch.no_grad():
        removed = {name: p.detach().float() - c * direction[name].to(p.device, torch.float32)
                   for name, p in params.items()}
    with set_weights(model, removed):
        yield c


def update_coefficient(final: Mapping[str, Tensor], initial: Mapping[str, Tensor],
                       direction: Direction) -> float:
    """``c = <theta_T - theta_0, d> / <d, d>`` over the direction's parameters (float64 sums):
    the direction's share of a run's cumulative update, in the units of ``d``."""
    with torch.no_grad():
        dd, dot = 0.0, 0.0
        for name, d in direction.items():
            d32 = d.to(final[name].device, torch.float32)
            delta = final[name].detach().float() - initial[name].to(d32.device, torch.float32)
            dd += float(d32.pow(2).sum(dtype=torch.float64))
            dot += float((delta * d32).sum(dtype=torch.float64))
    if dd == 0.0:
        raise ValueError("the direction is all zeros; it has no share of the update")
    return dot / dd


def direction_norm(direction: Direction) -> float:
    """Total Frobenius norm over all parameters of ``direction``."""
    squares = (float(d.float().pow(2).sum(dtype=torch.float64)) for d in direction.values())
    return math.sqrt(sum(squares))


def random_direction_like(direction: Direction, generator: torch.Generator) -> dict[str, Tensor]:
    """A Gaussian direction with ``direction``'s names, shapes, dtypes and total Frobenius norm.

    The norm-matched control: drawn on the CPU from ``generator`` (so the same seed gives the same
    control on any device), then moved to each tensor's device.
    """
    draws = {
        name: torch.randn(d.shape, generator=generator, dtype=torch.float32)
        for name, d in direction.items()
    }
    target, drawn = direction_norm(direction), direction_norm(draws)
    if drawn == 0.0:  # only for an empty or zero-sized direction
        raise ValueError("random_direction_like: the direction has no entries")
    scale = target / drawn
    return {
        name: (draw * scale).to(device=direction[name].device, dtype=direction[name].dtype)
        for name, draw in draws.items()
    }


class RewardEstimate(NamedTuple):
    mean: float
    """Mean reward over all completions (sum over the task's reward functions)."""
    stderr: float
    """Standard error of ``mean`` from the spread of per-prompt means (completions of one prompt
    are correlated, so prompts are the independent units); NaN when there is only one prompt."""
    n: int
    """Number of completions scored."""


def _rollout_rewards(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    prompts: Sequence[str],
    labels: Sequence[str],
    n_samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> Tensor:
    """Rewards ``[n_prompts, n_samples]`` (float64) of fresh rollouts; see :func:`mean_reward`."""
    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError(
            f"n_samples={n_samples} and max_new_tokens={max_new_tokens} must both be >= 1"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (rollouts are sampled)")
    prompts, labels = list(prompts), list(labels)
    device = next(model.parameters()).device
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    eos = model.generation_config.eos_token_id
    was_training = model.training
    model.eval()
    try:
        rng_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
            )  # [n_prompts * n_samples, prompt_len + new], prompt i's samples consecutive
    finally:
        model.train(was_training)
    completions = tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    rep_prompts = [p for p in prompts for _ in range(n_samples)]
    rep_labels = [label for label in labels for _ in range(n_samples)]
    rewards = torch.zeros(len(completions), dtype=torch.float64)
    for fn in task.reward_funcs:
        rewards += torch.tensor(
            [float(r) for r in fn(rep_prompts, completions, task=rep_labels)], dtype=torch.float64
        )
    return rewards.view(len(prompts), n_samples)


def mean_reward(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    n_prompts: int = 32,
    n_samples: int = 4,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
) -> RewardEstimate:
    """Mean task reward of fresh sampled rollouts of ``model`` (reproducible for a fixed seed).

    Prompts are ``task.dataset(n_prompts, seed)``; each gets ``n_samples`` completions, sampled
    in one batch as TRL's GRPO does (tokenizer with its special tokens, left padding, plain
    temperature sampling: top_k=0, top_p=1). Sampling runs under ``torch.manual_seed(seed)``
    inside a forked RNG, so the caller's RNG state is untouched. Completions are decoded with
    ``skip_special_tokens=True`` and scored by every reward function of the task
    (``fn(prompts, completions, task=labels)``), summed.
    """
    data = task.dataset(n_prompts, seed)
    rewards = _rollout_rewards(model, tokenizer, task, data["prompt"], data["task"], n_samples,
                               max_new_tokens, temperature, seed)
    per_prompt = rewards.mean(dim=1)
    stderr = float(per_prompt.std() / math.sqrt(n_prompts)) if n_prompts > 1 else math.nan
    return RewardEstimate(mean=float(rewards.mean()), stderr=stderr, n=rewards.numel())


def task_rewards(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Any,
    labels: Sequence[str],
    n_prompts: int = 8,
    n_samples: int = 4,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, RewardEstimate]:
    """Mean reward of each task label (a multi-task task such as ``multiskill``), from one batch.

    ``n_prompts`` prompts per label (``task.dataset(n_prompts * len(labels), seed,
    labels=labels)``: the same prompts for the same seed), ``n_samples`` completions each,
    sampled and scored as :func:`mean_reward` does, in one ``generate`` call; the reward of a
    completion is its own prompt's task's reward, divided by the task's training reward scale
    (``multiskill``'s ``reward_scale``) so that every task is measured on the same 0..1 score.
    Reproducible for a fixed seed.
    """
    labels = list(labels)
    if not labels or n_prompts < 1:
        raise ValueError(f"task_rewards needs labels (got {labels}) and n_prompts >= 1")
    data = task.dataset(n_prompts * len(labels), seed, labels=labels)
    rewards = _rollout_rewards(model, tokenizer, task, data["prompt"], data["task"], n_samples,
                               max_new_tokens, temperature, seed)
    scale = getattr(task, "scale", None)  # multiskill's reward_scale: report the plain score
    out = {}
    for label in labels:
        rows = torch.tensor([lab == label for lab in data["task"]])
        if scale is not None and scale(label) != 1.0:
            rewards[rows] /= scale(label)
        per_prompt = rewards[rows].mean(dim=1)
        stderr = float(per_prompt.std() / math.sqrt(len(per_prompt))) if len(per_prompt) > 1 \
            else math.nan
        out[label] = RewardEstimate(float(rewards[rows].mean()), stderr,
                                    int(rows.sum()) * n_samples)
    return out


@dataclass(frozen=True)
class DoseResponse:
    """Reward versus steering strength for a shard and its norm-matched random control."""

    alphas: list[float]
    """Steering strengths; the weights at ``alpha`` are ``theta + alpha * direction``."""
    reward_shard: list[float]
    """Mean reward with ``alpha * direction`` added, one per alpha."""
    stderr_shard: list[float]
    """Standard error of each ``reward_shard`` entry."""
    reward_control: list[float]
    """Mean reward with ``alpha * control`` added (control: Gaussian, same total norm)."""
    stderr_control: list[float]
    """Standard error of each ``reward_control`` entry."""
    n: int
    """Completions scored per point."""


def dose_response(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    direction: Direction,
    alphas: Sequence[float],
    control_seed: int = 0,
    **reward_kwargs: Any,
) -> DoseResponse:
    """Measure ``mean_reward`` along ``alpha * direction`` and along a norm-matched control.

    One control direction (``random_direction_like`` with ``control_seed``) serves every alpha,
    and every point uses the same rollout seed (``reward_kwargs``, passed to ``mean_reward``), so
    the curves differ only through the weights. ``model`` is restored bit-exactly afterwards.
    """
    control = random_direction_like(direction, torch.Generator().manual_seed(control_seed))
    shard_points: list[RewardEstimate] = []
    control_points: list[RewardEstimate] = []
    for alpha in alphas:
        with add_direction(model, direction, alpha):
            shard_points.append(mean_reward(model, tokenizer, task, **reward_kwargs))
        with add_direction(model, control, alpha):
            control_points.append(mean_reward(model, tokenizer, task, **reward_kwargs))
    return DoseResponse(
        alphas=[float(a) for a in alphas],
        reward_shard=[p.mean for p in shard_points],
        stderr_shard=[p.stderr for p in shard_points],
        reward_control=[p.mean for p in control_points],
        stderr_control=[p.stderr for p in control_points],
        n=shard_points[0].n if shard_points else 0,
    )
