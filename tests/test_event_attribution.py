"""Which completions, tasks and numbers an event's gradient is made of (per-event capture): an
event's labels and input factors are its own rows'; a group that moves (a KL term, rows of
advantage 0 among others) is kept and the step's events still sum to its gradient; events are
fp32 under a bf16 policy; the step's events reach the SAE as one push, at unit norm when asked,
and never more than the buffer's room; what would make the hooks' gradients wrong is refused.
(Audit 128's mutation testing: each test fails under a mutant the suite let live.)"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.core import events as ev
from sae_shards.core.targets import TargetSpec

PROMPTS = ["abc", "hello there", "xy", "the quick fox", "a", "zz top", "go go go", "q"]


def _varied_reward(completions, **kwargs):
    return [float(sum(map(ord, c)) % 7) for c in completions]


def _flat_for_z_reward(prompts, completions, **kwargs):
    return [1.0 if p.startswith("z") else float(sum(map(ord, c)) % 7)
            for p, c in zip(prompts, completions)]


def _grpo(tmp_path, reward=_varied_reward, prompts=PROMPTS, steps=1, grad_accum=1, **trl_kwargs):
    from datasets import Dataset

    from sae_shards.recipe.models import tiny_model_and_tokenizer
    from sae_shards.recipe.trainers import TRAINERS, trl_config

    model, tokenizer = tiny_model_and_tokenizer("qwen2", hidden_size=32, num_layers=2, num_heads=4,
                                                intermediate_size=64, seed=0)
    if trl_kwargs.get("beta"):  # TRL loads the reference model from the policy's directory
        from transformers import AutoModelForCausalLM

        model.save_pretrained(tmp_path / "model")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    kwargs = dict(max_steps=steps, per_device_train_batch_size=8, num_generations=4,
                  gradient_accumulation_steps=grad_accum, max_completion_length=6,
                  max_grad_norm=0.0, learning_rate=1e-3, beta=0.0)
    kwargs.update(trl_kwargs)
    args = trl_config(kwargs, tmp_path / "trl", "grpo")
    return TRAINERS["grpo"][1](model=model, reward_funcs=[reward], args=args,
                               processing_class=tokenizer,
                               train_dataset=Dataset.from_dict({"prompt": list(prompts)}))


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _recorder(trainer):
    """An installed ``EventRecorder`` on layer 0's q_proj, and the targets it records."""
    from sae_shards.capture.event_hooks import EventRecorder
    from sae_shards.capture.selection import select_targets

    targets = select_targets(trainer.model, [Q_PROJ])
    recorder = EventRecorder(trainer.model, targets, trainer, event_rank=128)
    recorder.install()
    return recorder, targets


def _train(trainer, recorder, targets) -> "_Drive":
    """Train ``trainer`` with ``recorder``: each step's events and gradients, in ``_Drive``."""
    drive = _Drive(recorder, dict(targets))
    trainer.add_callback(drive.callback)
    trainer.train()
    recorder.remove()
    return drive


def _sum_error(events, grad, targets) -> float:
    """How far a step's events' summed gradient is from ``grad``, relative to its norm."""
    spec = TargetSpec(Q_PROJ, tuple(targets[Q_PROJ].shape))
    total = sum(ev.materialize(e.factors[Q_PROJ], spec) for e in events)
    return float((total - grad).norm() / grad.norm())


class _Drive:
    """Drives one EventRecorder per optimizer step and keeps param.grad (unclipped)."""

    def __init__(self, recorder, params):
        from transformers import TrainerCallback

        self.recorder, self.params, self.events, self.grads = recorder, params, [], []
        drive = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                drive.recorder.start_step()

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                drive.events.append(drive.recorder.finish_step())
                drive.grads.append({n: p.grad.detach().clone() for n, p in drive.params.items()})

        self.callback = _CB()



def _state(step):
    return types.SimpleNamespace(global_step=step, is_world_process_zero=True, max_steps=step)


def test_an_events_task_labels_are_its_own_completions_not_the_steps():
    """An event whose completions are all task A is labelled A alone, though the step's log
    (the other group) holds task B too."""
    from sae_shards.capture.event_capture import _event_meta
    from sae_shards.capture.event_hooks import Event

    step = StepMeta(3, task_labels=("A", "B"))
    row = {"prompts": ["p"] * 4, "tasks": ["A", "A", "B", "B"], "rewards": [1.0, 0.0, 2.0, 3.0]}
    assert _event_meta(step, Event(0, (0, 1), {}, 1.0, 0.0), row, 1.0).task_labels == ("A",)
    assert _event_meta(step, Event(1, (2, 3), {}, 1.0, 0.0), row, 1.0).task_labels == ("B",)


def test_each_events_input_factors_are_the_tokens_of_its_own_rows(tmp_path):
    """The input side R of an event on layers.0 q_proj (Qwen2: the normed embedding of each
    position's token, whatever its position) holds only tokens of the event's own rows (its
    prompt and completions). The sum test cannot see positions filed under another group of
    the same step: the sum is the same."""
    from sae_shards.capture.event_hooks import ROW_KEY

    trainer = _grpo(tmp_path)
    name = Q_PROJ
    recorder, targets = _recorder(trainer)  # before the wrapper below: it sees the rows' ids
    batches = []
    inner = trainer._generate_and_score_completions

    def keep(inputs, *args, **kwargs):
        out = inner(inputs, *args, **kwargs)
        if isinstance(out, dict) and ROW_KEY in out:
            batches.append({k: out[k].detach().clone()
                            for k in (ROW_KEY, "prompt_ids", "completion_ids")})
        return out

    trainer._generate_and_score_completions = keep
    model = trainer.model.model
    with torch.no_grad():  # the weights of the step's forwards (before its optimizer step)
        table = model.layers[0].input_layernorm(model.embed_tokens.weight[None])[0]  # [V, n]
    drive = _train(trainer, recorder, targets)
    (events,), (batch,) = drive.events, batches
    assert len(events) == 2
    m = targets[name].shape[0]
    local = {int(r): i for i, r in enumerate(batch[ROW_KEY])}
    for e in events:
        tokens = torch.cat([torch.cat([batch["prompt_ids"][local[r]],
                                       batch["completion_ids"][local[r]]]) for r in e.rows])
        allowed = table[tokens.unique()]  # [k, n]
        R = e.factors[name][:, m:]  # [T, n] inputs of the event's positions
        assert R.shape[0] > 0
        dist = torch.cdist(R, allowed).min(1).values / allowed.norm(dim=1).mean()
        assert float(dist.max()) < 1e-2, (e.group, e.rows, float(dist.max()))


def test_zero_advantage_groups_are_kept_when_a_kl_term_moves_them(tmp_path):
    """GRPO with beta > 0: a group whose rewards tied has advantage 0 but its KL term still
    moves the policy (after step 1, once policy and reference differ): its event is kept and the
    step's events still sum to the step's gradient."""
    prompts = ["zebra", "abc"]  # each step: the tied "zebra" group and the "abc" one
    trainer = _grpo(tmp_path, reward=_flat_for_z_reward, prompts=prompts, steps=2, beta=0.5,
                    learning_rate=1e-2)
    recorder, targets = _recorder(trainer)
    drive = _train(trainer, recorder, targets)
    assert recorder.n_zero_advantage == 0
    events = drive.events[-1]
    assert _sum_error(events, drive.grads[-1][Q_PROJ], targets) < 1e-5
    assert len(events) == 2 and min(e.abs_advantage for e in events) == 0.0, (
        "the tied group's event (its KL gradient) is missing")


def test_a_bf16_policys_events_are_taken_in_fp32(tmp_path):
    """A bf16 policy: the hooks see bf16 inputs and output gradients; each event's factors are
    fp32 (design: the diff / factors are always taken in fp32), and still sum to the step's
    gradient within bf16's own rounding of that gradient."""
    trainer = _grpo(tmp_path)
    trainer.model.to(torch.bfloat16)
    (events,) = _train(trainer, *_recorder(trainer)).events
    assert events and all(e.factors[Q_PROJ].dtype == torch.float32 for e in events)


def _two_tied_rows_reward(completions, **kwargs):
    """Rewards 0, 1, 2, 1 within each group of 4: rows 1 and 3 have advantage exactly 0."""
    return [(0.0, 1.0, 2.0, 1.0)[i % 4] for i in range(len(completions))]


def test_a_group_with_some_zero_advantage_rows_is_kept_whatever_their_order(tmp_path):
    """Rows of advantage 0 inside a moving group (GRPO, beta=0): the group is an event, whichever
    of its rows the shuffled micro-batch lists last, and the step's events sum to its gradient."""
    for seed in range(3):
        trainer = _grpo(tmp_path / str(seed), reward=_two_tied_rows_reward, seed=seed)
        recorder, targets = _recorder(trainer)
        drive = _train(trainer, recorder, targets)
        (events,), (grads,) = drive.events, drive.grads
        assert recorder.n_zero_advantage == 0 and len(events) == 2, seed
        assert _sum_error(events, grads[Q_PROJ], targets) < 1e-5, seed


def test_a_steps_events_reach_the_sae_runner_as_one_push():
    """EventCapture.on_step_end commits each event, then hands the runner the step's slots at
    once: the SAE trains runner.sae_steps_per_rl_step per RL step, not per event."""
    from sae_shards.capture.event_capture import EventCapture
    from sae_shards.capture.event_hooks import Event
    from sae_shards.run.config import CaptureConfig

    spec = TargetSpec("w", (4, 3))
    cfg = CaptureConfig(granularity="group", event_rank=2)
    buffer = DeltaRingBuffer([spec], capacity=8, device="cpu", event_rank=2)
    pushes = []
    capture = EventCapture({}, [spec], buffer, cfg, trainer=object(), on_push=pushes.append)
    capture.recorder = object()  # installed (on_step_end reads the step's events it gathered)
    gen = torch.Generator().manual_seed(0)
    capture._events = [Event(g, (g,), {"w": torch.randn(2, 7, generator=gen)}, 1.0, 0.5)
                       for g in range(3)]
    capture.on_step_end(types.SimpleNamespace(world_size=1), _state(1), None)
    assert pushes == [[0, 1, 2]] and len(buffer) == 3


def _capture_with_events(n, **kwargs):
    from sae_shards.capture.event_capture import EventCapture
    from sae_shards.capture.event_hooks import Event
    from sae_shards.run.config import CaptureConfig

    spec = TargetSpec("w", (4, 3))
    cfg = CaptureConfig(granularity="group", event_rank=2, **kwargs.pop("cfg", {}))
    buffer = DeltaRingBuffer([spec], capacity=8, device="cpu", event_rank=2)
    capture = EventCapture({}, [spec], buffer, cfg, trainer=object(), **kwargs)
    capture.recorder = object()
    gen = torch.Generator().manual_seed(0)
    events = [Event(g, (g,), {"w": 3.0 * torch.randn(2, 7, generator=gen)}, 1.0, 0.5)
              for g in range(n)]
    capture._events = list(events)
    return capture, buffer, spec, events


def test_unit_normalised_events_are_written_at_norm_one():
    capture, buffer, spec, events = _capture_with_events(3, cfg={"normalize": "unit"})
    capture.on_step_end(types.SimpleNamespace(world_size=1), _state(1), None)
    slots = buffer.gather([0, 1, 2])["w"]
    for slot, e in zip(slots, events):
        assert float(ev.sq_norm(slot, spec)) == pytest.approx(1.0, rel=1e-5)
        assert buffer.metadata(e.group).norm == pytest.approx(
            float(ev.sq_norm(e.factors["w"], spec)) ** 0.5, rel=1e-5)  # the norm before


def test_a_step_with_more_events_than_the_buffers_room_is_refused():
    capture, buffer, _, _ = _capture_with_events(3, room=2)
    with pytest.raises(ValueError, match="has 3 events but the ring buffer can take at most 2"):
        capture.on_step_end(types.SimpleNamespace(world_size=1), _state(1), None)
    assert len(buffer) == 0


def test_per_event_capture_refuses_fp16_loss_scaling():
    """With a GradScaler the hooks would see scaled output gradients (every event off by the
    loss scale, which changes step to step): refused, naming fp16."""
    from sae_shards.capture.event_sites import check_supported

    model = nn.Linear(3, 2)
    trainer = types.SimpleNamespace(
        model=model, _generate_and_score_completions=None, compute_loss=None, num_generations=4,
        accelerator=types.SimpleNamespace(scaler=object()), args=types.SimpleNamespace())
    with pytest.raises(ValueError, match="fp16 loss scaling"):
        check_supported(model, trainer)
    trainer.accelerator.scaler = None
    check_supported(model, trainer)


def test_checkpointing_without_an_explicit_use_reentrant_is_refused():
    """transformers' layers checkpoint through functools.partial(checkpoint, **kwargs); a
    partial that does not pass use_reentrant gets torch's reentrant default: refused (ES03)."""
    import functools

    from torch.utils.checkpoint import checkpoint

    from sae_shards.capture.event_sites import check_checkpointing

    model = nn.Sequential(nn.Linear(2, 2))
    layer = model[0]
    layer.gradient_checkpointing = True
    layer._gradient_checkpointing_func = functools.partial(checkpoint)
    trainer = types.SimpleNamespace(args=types.SimpleNamespace())
    with pytest.raises(ValueError, match="layers use reentrant checkpointing"):
        check_checkpointing(model, trainer)
    layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    check_checkpointing(model, trainer)
