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

import asyncio
import contextlib
import inspect
import logging
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedTokenizerBase, TrainerState

from sae_shards.analysis.reward_task import RewardTask, is_conversational
from sae_shards.recipe.tasks import LABEL_COLUMN, MultiSkillTask, Task

logger = logging.getLogger(__name__)

Direction = Mapping[str, Tensor]
"""``{parameter name: tensor of that parameter's shape}``, in parameter units."""

AnyTask = Task | MultiSkillTask | RewardTask
"""What the reward measurements score: a built-in task, or a user's own (``RewardTask``)."""


def check_task(task: Any, what: str) -> None:
    """Raise a ``TypeError`` saying what to give unless ``task`` can be scored."""
    if task is None:
        raise TypeError(f"{what}: task is None; a run of your own TRL script records no reward "
                        "(load_run_models gives None for it): give a RewardTask(prompts, "
                        "reward_funcs) (docs/analysis.md, 'Your own reward')")
    if not (hasattr(task, "dataset") and hasattr(task, "reward_funcs")):
        raise TypeError(f"{what}: task must be a built-in task or a RewardTask, not "
                        f"{type(task).__name__}")


def weights_of(source: nn.Module | Mapping[str, Tensor], what: str) -> Mapping[str, Tensor]:
    """``{name: tensor}`` of a model (its named parameters) or of a mapping as given."""
    if isinstance(source, nn.Module):
        return dict(source.named_parameters(remove_duplicate=False))
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"{what}: give a model or a {{parameter name: tensor}} mapping, not "
                    f"{type(source).__name__}")


def _resolve(
    model: nn.Module, tensors: Mapping[str, Tensor], what: str
) -> dict[str, nn.Parameter]:
    """The parameters ``tensors`` names, after checking every name and shape (raises ValueError).

    Tied parameters are reachable under each of their names; naming one tensor twice is an error
    because the changes would silently compound.
    """
    if not isinstance(tensors, Mapping):
        hint = (" (a Shard: give shard.dense(scaled=False), its unit direction)"
                if hasattr(tensors, "dense") else "")
        raise TypeError(f"{what}: the direction must be a {{parameter name: tensor}} mapping, "
                        f"not {type(tensors).__name__}{hint}")
    params = dict(model.named_parameters(remove_duplicate=False))
    resolved: dict[str, nn.Parameter] = {}
    seen: dict[int, str] = {}
    for name, value in tensors.items():
        if name not in params:
            adapter = (" (an unmerged peft adapter: merge it first, model.merge_and_unload(), "
                       "as load_run_models does; shards name the base model's parameters)"
                       if hasattr(model, "merge_and_unload") else "")
            raise ValueError(
                f"{what}: {name!r} is not a parameter of {type(model).__name__}; "
                f"names must match model.named_parameters() (e.g. {next(iter(params))!r})"
                + adapter)
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


ROUNDING_TOLERANCE = 0.01
"""The share of a weight change that rounding to the parameters' dtype may lose before
``set_weights`` warns (relative Frobenius error of the change actually made)."""

ROLLOUT_SEED = 0
"""The default seed of the prompts drawn (``eval_prompts``) and the completions sampled
(``score_rollouts``); ``analysis.json`` records it (``draws``)."""
CONTROL_SEED = 0
"""The default seed of the norm-matched random control direction (``dose_response``, ``ablate``,
``span.span_effect``); ``analysis.json`` records it (``draws``)."""
N_SAMPLES = 4
"""The default number of completions sampled per prompt (``score_rollouts``)."""


def _rounding(p: Tensor, new: Tensor) -> tuple[float, float]:
    """``(asked, lost)``: the squared norm of the change from ``p`` to ``new`` (fp32) and of
    what rounding ``new`` to ``p``'s dtype loses of it."""
    want = new.to(p.device, torch.float32) - p.float()
    made = new.to(p.device, p.dtype).float() - p.float()
    return (float(want.pow(2).sum(dtype=torch.float64)),
            float((made - want).pow(2).sum(dtype=torch.float64)))


def _warn_rounding(dtype: torch.dtype, asked: float, lost: float, count: int) -> None:
    """Warn when 16-bit parameters cannot hold the change: a direction added to bf16 weights
    keeps 8 significant bits of their sum, so a change smaller than about 2^-9 of a weight
    rounds away and the steering or ablation measures another direction than the one asked.
    ``asked`` / ``lost``: summed over the ``count`` 16-bit parameters (``_rounding``)."""
    if asked > 0 and math.sqrt(lost / asked) > ROUNDING_TOLERANCE:
        logger.warning(
            "the model's %s weights cannot hold this change: rounding loses %.0f%% of it "
            "(relative error of the change made, over %d parameters), so the result measures "
            "another direction than the one asked; convert the model to float32 first "
            "(model.float()), as load_run_models loads it",
            dtype, 100 * math.sqrt(lost / asked), count)


@contextlib.contextmanager
def _changed(params: Mapping[str, nn.Parameter],
             new_value: Callable[[str, nn.Parameter], Tensor]) -> Iterator[None]:
    """Set each of ``params`` to ``new_value(name, param)`` (cast to its dtype) inside the
    block; every touched parameter gets its original bits back on exit, also by exception.

    The new values are made one parameter at a time, each from the parameter's original value
    (none is changed twice: ``_resolve`` refuses tied names), so besides the originals' copy
    only one parameter's new value is held at a time, never a second copy of every weight
    (for a 0.5B model's body, 1.4 GB each)."""
    with torch.no_grad():
        originals = {name: p.detach().clone() for name, p in params.items()}
        low = [p.dtype for p in params.values() if p.dtype in (torch.bfloat16, torch.float16)]
        asked, lost = 0.0, 0.0
        try:
            for name, p in params.items():
                new = new_value(name, p)
                if p.dtype in (torch.bfloat16, torch.float16):
                    a, b = _rounding(p, new)
                    asked, lost = asked + a, lost + b
                p.copy_(new.to(device=p.device, dtype=p.dtype))
                del new
            if low:
                _warn_rounding(low[0], asked, lost, len(low))
            yield
        finally:
            for name, p in params.items():
                p.copy_(originals[name])


@contextlib.contextmanager
def set_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> Iterator[None]:
    """Set the named parameters to ``weights`` (cast to each parameter's dtype) inside the block.

    On exit, also by exception, every touched parameter gets its original bits back.
    """
    params = _resolve(model, weights, "set_weights")
    with _changed(params, lambda name, p: weights[name]):
        yield


def check_alpha(alpha: Any, where: str) -> float:
    """``alpha`` as a float: a finite real number (``ValueError`` naming ``where`` for a string,
    a bool, NaN or an infinity, which torch would take or fail on deep inside)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) and not (
            isinstance(alpha, Tensor) and alpha.numel() == 1):
        raise ValueError(f"{where}: alpha={alpha!r} must be a number")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"{where}: alpha={alpha!r} must be finite")
    return float(alpha)


@contextlib.contextmanager
def add_direction(model: nn.Module, direction: Direction, alpha: float) -> Iterator[None]:
    """Add ``alpha * direction`` to the named parameters inside the block; restore bit-exactly.

    The sum is computed in fp32 and cast back to each parameter's dtype; 16-bit weights that
    cannot hold the change (it rounds away: a small ``alpha``) are warned about. ``alpha`` must
    be a finite number (``ValueError``).
    """
    alpha = check_alpha(alpha, "add_direction")
    params = _resolve(model, direction, "add_direction")
    with _changed(params, lambda name, p: (p.detach().float()
                                           + alpha * direction[name].to(p.device, torch.float32))):
        yield


@contextlib.contextmanager
def remove_direction(
    model: nn.Module, direction: Direction, initial: nn.Module | Mapping[str, Tensor]
) -> Iterator[float]:
    """Remove the shard's part of the cumulative update inside the block; yield its coefficient.

    ``model`` holds the final weights ``theta_T``, ``initial`` the run's initial weights
    ``theta_0`` (at least for the direction's parameters). Over the direction's parameters,
    ``Delta = theta_T - theta_0`` and ``c = <Delta, d> / <d, d>`` (Frobenius inner products summed
    over all of them); the weights become ``theta_T - c * d``. Yields ``c`` in the units of ``d``
    (so for a unit-norm ``d``: parameter units). Restores ``theta_T`` bit-exactly on exit.
    ``initial``: the initial model, or its ``{name: tensor}``.
    """
    params = _resolve(model, direction, "remove_direction")
    initial = weights_of(initial, "remove_direction initial")
    missing = [name for name in params if name not in initial]
    if missing:
        raise ValueError(
            f"remove_direction: initial weights lack {missing}; pass theta_0 for every "
            "parameter of the direction (e.g. from the run's saved initial model)"
        )
    _resolve(model, {name: initial[name] for name in params}, "remove_direction initial")
    c = update_coefficient({name: p for name, p in params.items()}, initial, direction)
    with _changed(params, lambda name, p: (p.detach().float()
                                           - c * direction[name].to(p.device, torch.float32))):
        yield c


def update_coefficient(final: nn.Module | Mapping[str, Tensor],
                       initial: nn.Module | Mapping[str, Tensor], direction: Direction) -> float:
    """``c = <theta_T - theta_0, d> / <d, d>`` over the direction's parameters (float64 sums):
    the projection of a run's cumulative update on the direction, in the units of ``d`` (for a
    shard it holds the decoder bias's and overlapping shards' parts too: compare
    ``RunView.attribution``). ``final`` / ``initial``: models or their ``{name: tensor}``."""
    final = weights_of(final, "update_coefficient final")
    initial = weights_of(initial, "update_coefficient initial")
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
    # scaled in place (the same bits as draw * scale): one copy of the direction's size, not two
    return {
        name: draw.mul_(scale).to(device=direction[name].device, dtype=direction[name].dtype)
        for name, draw in draws.items()
    }


class RewardEstimate(NamedTuple):
    mean: float
    """Mean reward over all completions (the weighted sum over the task's reward functions)."""
    stderr: float
    """Standard error of ``mean`` from the spread of per-prompt means (completions of one prompt
    are correlated, so prompts are the independent units); NaN when there is only one prompt."""
    n: int
    """Number of completions scored."""


class Scored(NamedTuple):
    """Fresh rollouts' rewards and each prompt's context."""

    rewards: Tensor
    """``[n_prompts, n_samples]`` float64, prompt i's completions in row i."""
    labels: list[str] | None
    """Each prompt's context (the task's label column), or None when the task has none."""


def _ignore(*args: Any, **kwargs: Any) -> None:
    """``log_extra`` / ``log_metric`` outside a trainer: nothing to log to."""


def _label_column(task: AnyTask) -> str | None:
    """The column naming each prompt's context: ``RewardTask.label_column``, or the built-in
    tasks' ``task`` column."""
    return task.label_column if isinstance(task, RewardTask) else LABEL_COLUMN


class ScoringError(ValueError):
    """The task's reward cannot score the rollouts (the message says why and what to do)."""


def _not_finite(where: str) -> ScoringError:
    """The error for a policy whose next-token distribution holds inf or NaN (``where``: when it
    was seen), which no sample can be drawn from."""
    return ScoringError(
        f"sampling failed: the policy's next-token probabilities hold inf or NaN ({where}): its "
        "weights are damaged (copy the run's final_model/ and model/ again) or were moved too "
        "far (a large steering alpha)")


class RewardFunctionError(ScoringError):
    """A reward function failed, or returned the wrong number of rewards, when the analysis
    called it as TRL does (its name, the error, and what it was given)."""


def score_rollouts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: AnyTask,
    data: Any,
    n_samples: int = N_SAMPLES,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = ROLLOUT_SEED,
    top_p: float = 1.0,
    top_k: int | None = 0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    training_steps: int | None = None,
    reward_batch: int | None = None,
) -> Scored:
    """Sample ``n_samples`` completions of every prompt of ``data`` (a ``task.dataset(...)``)
    and score them with the task's reward functions, as TRL's GRPO trainer does.

    Generation: one batch, left padding, one ``GenerationConfig`` as TRL builds it (sampling
    with ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, then TRL's
    ``generation_kwargs``; ``shards.run_sampling`` reads a run's own; stopping at the
    tokenizer's and the model's end tokens) under ``torch.manual_seed(seed)`` inside a forked
    RNG (the caller's RNG state is untouched; a reward function's own randomness is not
    seeded); text prompts are tokenized with the tokenizer's special tokens, conversational
    ones through its chat template with the generation prompt (and ``chat_template_kwargs``).
    Completions are cut after their first end token and decoded with
    ``skip_special_tokens=True``. Each reward function gets TRL's keyword arguments
    (``reward_task``'s module docstring; ``trainer_state`` at the end of training,
    ``training_steps``; ``async`` ones are awaited on one event loop thread); rewards
    are weighted (``reward_weights``) and summed over the functions, a missing one (None) left
    out, and a completion no function scored is NaN (unscorable: left out of every mean, as TRL
    leaves it out). A failing function raises :class:`RewardFunctionError`.
    ``reward_batch``: each function is called on consecutive batches of this many completions
    (rounded down to whole prompts, at least one), as TRL calls it once per process's generation
    batch (``shards.run_sampling`` gives the run's own); None: all completions in one call.
    """
    check_task(task, "score_rollouts")
    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError(
            f"n_samples={n_samples} and max_new_tokens={max_new_tokens} must both be >= 1"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (rollouts are sampled)")
    if reward_batch is not None and reward_batch < 1:
        raise ValueError(f"reward_batch={reward_batch} must be >= 1 (or None: one call)")
    columns = {k: list(v) for k, v in (data.to_dict() if hasattr(data, "to_dict")
                                       else dict(data)).items()}
    prompts = columns.pop("prompt")
    for name in ("completion", "completion_ids"):  # TRL does not pass these columns on
        columns.pop(name, None)
    chat = is_conversational(prompts[0])
    if chat and tokenizer.chat_template is None:
        raise ScoringError("the prompts are conversational but the run's tokenizer has no chat "
                         "template; give text prompts or a tokenizer with a chat template")
    texts = ([tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True,
                                            **(chat_template_kwargs or {}))
              for p in prompts] if chat else prompts)
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty)
    completion_ids = _sample(model, tokenizer, texts, chat, n_samples, seed, settings,
                             generation_kwargs)
    texts_out = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    completions = ([[{"role": "assistant", "content": t}] for t in texts_out] if chat
                   else texts_out)

    def repeat(values: list) -> list:
        return [v for v in values for _ in range(n_samples)]

    per_completion = {k: repeat(v) for k, v in columns.items()}
    per_completion.update(prompts=repeat(prompts), completions=completions,
                          completion_ids=completion_ids)
    # TRL calls each function once per generation batch; a batch holds whole prompt groups
    size = (len(completions) if reward_batch is None
            else max(n_samples, reward_batch // n_samples * n_samples))
    rewards = _weighted_rewards(task, per_completion, size, training_steps)
    label_column = _label_column(task)
    labels = ([str(x) for x in columns[label_column]]
              if label_column is not None and label_column in columns else None)
    return Scored(rewards.view(len(prompts), n_samples), labels)


def _sample(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], chat: bool,
            n_samples: int, seed: int, settings: dict[str, Any],
            generation_kwargs: Mapping[str, Any] | None) -> list[list[int]]:
    """``n_samples`` completions of each prompt text (token ids, each cut after its first stop
    token; prompt i's consecutive), sampled as ``score_rollouts`` says under ``seed``."""
    device = next(model.parameters()).device
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                      add_special_tokens=not chat).to(device)
    # TRL's stop tokens: the tokenizer's end token and the model's configured ones
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos = [tokenizer.eos_token_id, *eos]
    # A whole GenerationConfig, as TRL builds one: the model's own sampling defaults (a
    # checkpoint's repetition_penalty, say) do not leak in.
    config = dict(settings, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                  top_k=settings["top_k"] or 0)
    config.update(generation_kwargs or {})  # TRL's generation_kwargs override the rest
    generation = GenerationConfig(**config, num_return_sequences=n_samples)
    was_training = model.training
    model.eval()
    try:
        rng_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            torch.manual_seed(seed)
            # inf/NaN logits: on a GPU torch.multinomial would end in a device-side assert
            if not bool(torch.isfinite(model(**batch).logits[:, -1]).all()):  # [prompts, vocab]
                raise _not_finite("at the prompts' last token")
            try:
                out = model.generate(**batch, generation_config=generation)
            except RuntimeError as e:  # torch.multinomial on inf/NaN probabilities, later on
                if "probability tensor" not in str(e):
                    raise
                raise _not_finite(str(e)) from None
            # [n_prompts * n_samples, prompt_len + new], prompt i's samples consecutive
    finally:
        model.train(was_training)
    new = out[:, batch["input_ids"].shape[1]:].cpu()
    return [_until_stop(row.tolist(), set(eos)) for row in new]


def _weighted_rewards(task: AnyTask, per_completion: dict[str, list], size: int,
                      training_steps: int | None) -> torch.Tensor:
    """Each completion's reward (``[n_completions]`` float64): the task's reward functions,
    each called on consecutive batches of ``size`` completions with TRL's keyword arguments
    (``per_completion``'s columns), weighted and summed; NaN where no function scored it."""
    state = TrainerState(global_step=training_steps or 0, max_steps=training_steps or 0)
    shared = dict(trainer_state=state, log_extra=_ignore, log_metric=_ignore)
    n = len(per_completion["completions"])
    funcs = task.reward_funcs
    weights = getattr(task, "reward_weights", None) or [1.0] * len(funcs)
    per_func = torch.zeros(len(funcs), n, dtype=torch.float64)  # [funcs, completions]
    for i, fn in enumerate(funcs):
        scores = [r for start in range(0, n, size)
                  for r in _call_reward(fn, {k: v[start:start + size]
                                             for k, v in per_completion.items()}, shared)]
        per_func[i] = torch.tensor([math.nan if r is None else float(r) for r in scores],
                                   dtype=torch.float64) * float(weights[i])
    if len(funcs) == 1:
        return per_func[0]  # NaN where the function returned None: unscorable
    rewards = per_func.nansum(dim=0)
    rewards[per_func.isnan().all(dim=0)] = math.nan
    return rewards


def _call_reward(fn: Any, batch: dict[str, list], shared: dict[str, Any]) -> list:
    """``fn``'s rewards for one batch, called as TRL calls it (awaited when it is ``async``):
    ``batch``, one list entry per completion (``prompts``, ``completions``, ``completion_ids``,
    the other columns), and ``shared`` (``trainer_state``, ``log_extra``, ``log_metric``)."""
    name = getattr(fn, "__name__", type(fn).__name__)
    completions = batch["completions"]
    try:
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
                getattr(fn, "__call__", None)):
            scores = asyncio.run_coroutine_threadsafe(fn(**batch, **shared),
                                                      _event_loop()).result()
        else:
            scores = fn(**batch, **shared)
        scores = list(scores)
    except Exception as e:  # noqa: BLE001 - the user's function: name it and what it was given
        given = sorted([*batch, *shared])
        hint = _reward_error_hint(e)
        raise RewardFunctionError(
            f"reward function {name!r} failed when called as TRL calls it, with keyword "
            f"arguments {given}: {type(e).__name__}: {e}{hint}") from e
    if len(scores) != len(completions):
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(scores)} rewards for {len(completions)} "
            "completions; it must return one per completion")
    return scores


def _reward_error_hint(error: Exception) -> str:
    """A likely cause of a reward function's error, when its type and text suggest one."""
    text = str(error)
    if isinstance(error, TypeError) and "unexpected keyword argument" in text:
        return (" (TRL passes a reward function every column of the prompts and arguments of "
                "its own: give it **kwargs)")
    if isinstance(error, TypeError) and "missing" in text and "argument" in text:
        return " (a column it reads missing from the RewardTask's prompts?)"
    if isinstance(error, KeyError):
        return (" (a key it looks up is not there: a column of the RewardTask's prompts, or a "
                "value, such as a context, it does not know?)")
    return ""


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """One event loop on a daemon thread for every async reward call, as TRL runs them: works
    inside a running loop (a notebook), and clients an async reward created once stay on it."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="sae-shards-async-rewards",
                             daemon=True).start()
            _LOOP = loop
    return _LOOP


def _until_stop(ids: list[int], stops: set) -> list[int]:
    """A completion's token ids up to and including its first stop token (TRL's
    ``completion_ids``)."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


def estimate(rewards: Tensor) -> RewardEstimate:
    """Mean and per-prompt standard error of ``rewards [n_prompts, n_samples]``; unscorable
    (NaN) completions are left out, and prompts with none scored."""
    scored = ~rewards.isnan()
    if bool(scored.all()):
        per_prompt = rewards.mean(dim=1)
        mean = float(rewards.mean())
    else:
        keep = scored.any(dim=1)
        per_prompt = (rewards.nan_to_num(0.0).sum(dim=1)[keep]
                      / scored.sum(dim=1)[keep])
        mean = float(rewards[scored].mean()) if bool(scored.any()) else math.nan
    n = per_prompt.numel()
    stderr = float(per_prompt.std() / math.sqrt(n)) if n > 1 else math.nan
    return RewardEstimate(mean, stderr, int(scored.sum()))


def eval_prompts(task: AnyTask, n_prompts: int, seed: int = ROLLOUT_SEED) -> Any:
    """The prompts a dose-response or an ablation scores: ``task.dataset(n_prompts, seed)``,
    cycling through the task's contexts when it has several (a ``multiskill`` task, a
    ``RewardTask`` with a ``label_column``), so every context gets the same share."""
    check_task(task, "eval_prompts")
    labels = list(getattr(task, "labels", ()) or ())
    if len(labels) >= 2:
        return task.dataset(n_prompts, seed, labels=labels)
    return task.dataset(n_prompts, seed)


def prompt_means(*rewards: Tensor) -> list[Tensor]:
    """Each scoring's per-prompt mean reward (``[n]``; ``rewards``: ``[n_prompts, n_samples]``
    scorings of the same prompts), over the prompts every one of them scored at least once
    (unscorable completions are NaN): the paired units of a change."""
    keep = torch.ones(rewards[0].shape[0], dtype=torch.bool)
    for r in rewards:
        keep &= ~r.isnan().all(dim=1)
    return [r[keep].nanmean(dim=1) for r in rewards]


def paired_change(before: Tensor, after: Tensor) -> tuple[float, float]:
    """Mean change ``after - before`` of two scorings of the same prompts and rollout seed
    (``[n_prompts, n_samples]`` each) and its standard error over prompts (each prompt's mean
    change; prompts are the independent units); NaN stderr for one prompt."""
    b, a = prompt_means(before, after)
    diff = a - b
    n = diff.numel()
    if n == 0:
        return math.nan, math.nan
    return float(diff.mean()), float(diff.std() / math.sqrt(n)) if n > 1 else math.nan


def label_rewards(scored: Scored, task: AnyTask,
                  labels: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Each context's rows of ``scored.rewards`` (``[n_prompts_of_it, n_samples]``; ``labels``:
    which, in order; default every context present), a built-in task's reward divided by its
    training reward scale (``multiskill``'s ``reward_scale``), so every context is on the same
    0..1 score. ``{}`` when the prompts carry no context."""
    if scored.labels is None:
        return {}
    present = list(dict.fromkeys(scored.labels))
    scale = getattr(task, "scale", None)
    out = {}
    for label in (present if labels is None else labels):
        rows = torch.tensor([lab == label for lab in scored.labels])
        if not rows.any():
            continue
        r = scored.rewards[rows]
        if scale is not None and scale(label) != 1.0:
            r = r / scale(label)
        out[label] = r
    return out


def by_label(scored: Scored, task: AnyTask,
             labels: Sequence[str] | None = None) -> dict[str, RewardEstimate]:
    """Each context's reward estimate from one :class:`Scored` batch (:func:`label_rewards`)."""
    return {label: estimate(r) for label, r in label_rewards(scored, task, labels).items()}


def mean_reward(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: AnyTask,
    n_prompts: int = 32,
    n_samples: int = N_SAMPLES,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = ROLLOUT_SEED,
    **sampling: Any,
) -> RewardEstimate:
    """Mean task reward of fresh sampled rollouts of ``model`` (reproducible for a fixed seed):
    ``n_samples`` completions of each of the prompts the report scores (:func:`eval_prompts`:
    ``task.dataset(n_prompts, seed)``, cycling through the contexts of a task that has
    several), sampled and scored as :func:`score_rollouts` does (``sampling``: its other
    settings, e.g. ``top_p``; ``shards.run_sampling`` gives a run's own), so it equals the
    report's alpha-0 reward for the same settings. ``task``: a built-in task
    (``load_run_models``) or your own prompts and reward functions (``RewardTask``).
    """
    check_task(task, "mean_reward")
    data = eval_prompts(task, n_prompts, seed)
    return estimate(score_rollouts(model, tokenizer, task, data, n_samples, max_new_tokens,
                                    temperature, seed, **sampling).rewards)


def task_rewards(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: AnyTask,
    labels: Sequence[str],
    n_prompts: int = 8,
    n_samples: int = N_SAMPLES,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = ROLLOUT_SEED,
    **sampling: Any,
) -> dict[str, RewardEstimate]:
    """Mean reward of each context (a multi-task task such as ``multiskill``, or a
    ``RewardTask`` with a ``label_column``), from one batch.

    ``n_prompts`` prompts per label (``task.dataset(n_prompts * len(labels), seed,
    labels=labels)``: the same prompts for the same seed), ``n_samples`` completions each,
    sampled and scored as :func:`score_rollouts` does (``sampling``: its other settings), in one
    ``generate`` call; the reward of a completion is its own prompt's, per context as
    :func:`by_label` gives it (a built-in task's training reward scale divided out).
    Reproducible for a fixed seed.
    """
    check_task(task, "task_rewards")
    labels = list(labels)
    if not labels or n_prompts < 1:
        raise ValueError(f"task_rewards needs labels (got {labels}) and n_prompts >= 1")
    if len(getattr(task, "labels", ()) or ()) < 2:
        raise ValueError(f"task_rewards: {getattr(task, 'name', type(task).__name__)!r} has one "
                         "context; per-context rewards need a multi-task task (multiskill) or "
                         "a RewardTask with a label_column (mean_reward scores one context)")
    data = task.dataset(n_prompts * len(labels), seed, labels=labels)
    scored = score_rollouts(model, tokenizer, task, data, n_samples, max_new_tokens,
                            temperature, seed, **sampling)
    return by_label(scored, task, labels)


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
    shard_by_label: dict[str, list[float]] = field(default_factory=dict)
    """Each context's mean reward along the shard, one per alpha, from the same rollouts
    (``by_label``: a built-in task's reward scale divided out); ``{}`` unless the prompts carry
    at least two contexts."""
    control_by_label: dict[str, list[float]] = field(default_factory=dict)
    """The same along the control."""
    stderr_change_shard: list[float] = field(default_factory=list)
    """Each point's change from alpha 0, paired per prompt (same prompts and rollout seed): its
    standard error over prompts, the resolution of the curve's shape (``[]`` without an alpha
    of 0; 0 at alpha 0 itself)."""
    stderr_change_control: list[float] = field(default_factory=list)
    """The same along the control."""


def check_baseline(baseline: Scored | None, n_prompts: int, reward_kwargs: Mapping[str, Any],
                    caller: str) -> None:
    """A caller's ``baseline`` must score the rollouts ``caller`` scores: ``[n_prompts,
    n_samples]`` (``ValueError`` otherwise)."""
    if baseline is not None and tuple(baseline.rewards.shape) != (n_prompts,
                                                                 reward_kwargs.get("n_samples", 4)):
        raise ValueError(f"baseline scores {tuple(baseline.rewards.shape)} rollouts; {caller} "
                         f"scores n_prompts={n_prompts} prompts: give the baseline of the same "
                         "prompts and settings")


def dose_response(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: AnyTask,
    direction: Direction,
    alphas: Sequence[float],
    control_seed: int = CONTROL_SEED,
    n_prompts: int = 32,
    baseline: Scored | None = None,
    **reward_kwargs: Any,
) -> DoseResponse:
    """Measure the reward along ``alpha * direction`` and along a norm-matched control.

    One control direction (``random_direction_like`` with ``control_seed``) serves every alpha,
    and every point scores the same prompts (:func:`eval_prompts`) with the same
    rollout seed (``reward_kwargs``: ``n_samples``, ``max_new_tokens``, ``temperature``,
    ``seed``, as :func:`score_rollouts` takes them), so the curves differ only through the
    weights. When the prompts carry several contexts, each one's curve comes from the same
    rollouts (``shard_by_label``). ``model`` is restored bit-exactly afterwards.

    Alpha 0 is the model as it is, for the shard and the control alike: it is scored once
    (adding ``0 * direction`` changes no weight's value), or taken from ``baseline``, the
    model's :class:`Scored` on those prompts and settings when the caller already has it
    (one per model serves every shard's curve).
    """
    if not len(alphas):
        raise ValueError("dose_response: alphas is empty; give the points of the curve, e.g. "
                         "(0, 1, 2) (with 0, each point's paired change is taken against it)")
    alphas = [check_alpha(a, "dose_response") for a in alphas]
    data = eval_prompts(task, n_prompts, reward_kwargs.get("seed", ROLLOUT_SEED))
    check_baseline(baseline, n_prompts, reward_kwargs, "dose_response")
    control = random_direction_like(direction, torch.Generator().manual_seed(control_seed))
    points: dict[str, list[Scored]] = {"shard": [], "control": []}
    for alpha in alphas:
        if alpha == 0:  # the unchanged model: one scoring serves both curves
            if baseline is None:
                baseline = score_rollouts(model, tokenizer, task, data, **reward_kwargs)
            points["shard"].append(baseline)
            points["control"].append(baseline)
            continue
        for kind, d in (("shard", direction), ("control", control)):
            with add_direction(model, d, alpha):
                points[kind].append(score_rollouts(model, tokenizer, task, data,
                                                   **reward_kwargs))
    pooled = {kind: [estimate(p.rewards) for p in ps] for kind, ps in points.items()}
    labelled = {kind: [by_label(p, task) for p in ps] for kind, ps in points.items()}
    several = bool(labelled["shard"]) and len(labelled["shard"][0]) >= 2

    zero = [i for i, a in enumerate(alphas) if a == 0]

    def paired(kind: str) -> list[float]:  # each point against alpha 0, prompt by prompt
        if not zero:
            return []
        base = points[kind][zero[0]].rewards
        return [0.0 if i == zero[0] else paired_change(base, p.rewards)[1]
                for i, p in enumerate(points[kind])]

    def curves(kind: str) -> dict[str, list[float]]:
        if not several:
            return {}
        return {label: [point[label].mean for point in labelled[kind]]
                for label in labelled[kind][0]}

    return DoseResponse(
        alphas=[float(a) for a in alphas],
        reward_shard=[p.mean for p in pooled["shard"]],
        stderr_shard=[p.stderr for p in pooled["shard"]],
        reward_control=[p.mean for p in pooled["control"]],
        stderr_control=[p.stderr for p in pooled["control"]],
        n=pooled["shard"][0].n if alphas else 0,
        shard_by_label=curves("shard"),
        control_by_label=curves("control"),
        stderr_change_shard=paired("shard"),
        stderr_change_control=paired("control"),
    )


@dataclass(frozen=True)
class Ablation:
    """The final policy's reward with the run's update along a shard removed, beside the same
    amount of a norm-matched random direction removed."""

    coefficient: float
    """``c = <theta_T - theta_0, d> / <d, d>``: the update along the shard (units of d)."""
    reward_final: float
    """Mean reward of the final weights ``theta_T``."""
    stderr_final: float
    reward_removed: float
    """Mean reward of ``theta_T - c d`` (the run's update along the shard removed)."""
    stderr_removed: float
    reward_control: float
    """Mean reward of ``theta_T - c r``, ``r`` a Gaussian direction of ``d``'s norm."""
    stderr_control: float
    n: int
    """Completions scored per estimate."""
    change_removed: float = math.nan
    """``reward_removed - reward_final``, paired per prompt (:func:`paired_change`)."""
    stderr_change_removed: float = math.nan
    """Its standard error over prompts (the sampling's resolution for this change)."""
    change_control: float = math.nan
    stderr_change_control: float = math.nan
    final_by_label: dict[str, float] = field(default_factory=dict)
    """Each context's reward of the final weights (``by_label``); ``{}`` unless the prompts
    carry at least two contexts. Likewise the ones below."""
    removed_by_label: dict[str, float] = field(default_factory=dict)
    control_by_label: dict[str, float] = field(default_factory=dict)
    stderr_change_removed_by_label: dict[str, float] = field(default_factory=dict)
    """Each context's paired standard error of its change without the shard."""
    n_by_label: dict[str, int] = field(default_factory=dict)
    """Completions scored per context."""
    beyond_control: float = math.nan
    """``reward_removed - reward_control``, paired per prompt: how much more removing the
    shard's part changes the reward than removing the random direction does."""
    stderr_beyond_control: float = math.nan
    """Its standard error over prompts: within noise of 0 (``resolution.within_noise``),
    removing the shard is not told apart from removing any direction of its norm."""
    reward_overshoot: float = math.nan
    """Mean reward of ``theta_T + c d``: the final weights pushed as far again along the shard.
    Near a reward optimum any move of that size along a direction the data varies in costs
    reward, either way; a removal that costs no more than this shows the policy's curvature,
    not what the shard carries (audit 142)."""
    change_overshoot: float = math.nan
    """``reward_overshoot - reward_final``, paired per prompt."""
    stderr_change_overshoot: float = math.nan
    n_prompts: int = 0
    """Prompts scored per estimate: the units of the standard errors (0: not known)."""


def ablate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: AnyTask,
    direction: Direction,
    initial: nn.Module | Mapping[str, Tensor],
    control_seed: int = CONTROL_SEED,
    n_prompts: int = 32,
    baseline: Scored | None = None,
    **reward_kwargs: Any,
) -> Ablation:
    """Score ``model`` (the final weights) as it is, with the shard's part of the run's update
    removed (:func:`remove_direction`, ``initial``: theta_0), with as much added again (the
    overshoot: the cost of moving that far along the shard either way), and with the same
    amount of a norm-matched random direction removed, on the same prompts and rollout seed
    (:func:`eval_prompts`, ``reward_kwargs`` as :func:`score_rollouts` takes them); the changes
    are paired per prompt (:func:`paired_change`).
    ``baseline``: the final weights' :class:`Scored` on those prompts, when the caller already
    has it (one per run serves every shard). ``model`` is restored bit-exactly afterwards."""
    data = eval_prompts(task, n_prompts, reward_kwargs.get("seed", ROLLOUT_SEED))
    check_baseline(baseline, n_prompts, reward_kwargs, "ablate")
    final = baseline if baseline is not None else score_rollouts(model, tokenizer, task, data,
                                                                 **reward_kwargs)
    with remove_direction(model, direction, initial) as c:
        removed = score_rollouts(model, tokenizer, task, data, **reward_kwargs)
    with add_direction(model, direction, c):  # as far again the other way: the curvature
        over = score_rollouts(model, tokenizer, task, data, **reward_kwargs)
    control = random_direction_like(direction, torch.Generator().manual_seed(control_seed))
    with add_direction(model, control, -c):
        ctrl = score_rollouts(model, tokenizer, task, data, **reward_kwargs)
    est = [estimate(s.rewards) for s in (final, removed, ctrl)]
    labelled = [by_label(s, task) for s in (final, removed, ctrl)]
    several = len(labelled[0]) >= 2
    means = [{label: e.mean for label, e in per.items()} if several else {} for per in labelled]
    stderrs, counts = {}, {}
    if several:
        before, after = label_rewards(final, task), label_rewards(removed, task)
        stderrs = {label: paired_change(before[label], after[label])[1] for label in before}
        counts = {label: e.n for label, e in labelled[0].items()}
    removed_change, control_change = (paired_change(final.rewards, s.rewards)
                                      for s in (removed, ctrl))
    beyond, beyond_se = paired_change(ctrl.rewards, removed.rewards)
    over_change = paired_change(final.rewards, over.rewards)
    return Ablation(c, est[0].mean, est[0].stderr, est[1].mean, est[1].stderr, est[2].mean,
                    est[2].stderr, est[0].n, *removed_change, *control_change, *means,
                    stderrs, counts, beyond_control=beyond, stderr_beyond_control=beyond_se,
                    reward_overshoot=estimate(over.rewards).mean,
                    change_overshoot=over_change[0], stderr_change_overshoot=over_change[1],
                    n_prompts=final.rewards.shape[0])
