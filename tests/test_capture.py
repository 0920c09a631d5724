"""DeltaCapture inside a real transformers.Trainer run on a tiny causal LM (CPU, a few steps)."""

import json
import math

import pytest
import torch
from helpers import PATTERNS, captured_in_order, lora_model, make_buffer, tiny_lm, token_data
from transformers import Trainer, TrainerCallback, TrainingArguments

from sae_shards.capture.buffer import StepMeta
from sae_shards.capture.delta import DeltaCapture, lora_matmul_note, warn_lora_matmul_precision
from sae_shards.capture.selection import LoraTarget, select_targets

MAX_STEPS = 4


def train(model, callbacks, tmp_path, grad_accum: int = 1, max_grad_norm: float = 1.0,
          learning_rate: float = 1e-2) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=MAX_STEPS,
        per_device_train_batch_size=2, gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        optim="adamw_torch", max_grad_norm=max_grad_norm, logging_steps=1, save_strategy="no",
        lr_scheduler_type="constant", seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_data(), callbacks=callbacks)
    trainer.train()
    return trainer


class Recorder(TrainerCallback):
    """Independent record: fp32 copies of tensors (from ``read()``) before training and after
    every optimizer step, and the gradients the optimizer consumed."""

    def __init__(self, read, params=()):
        self.read, self.params = read, dict(params)
        self.states, self.grads, self.step_begins = [], [], 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.states.append(self.read())

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_begins += 1

    def on_optimizer_step(self, args, state, control, **kwargs):  # after the step, before zero_grad
        self.grads.append({n: p.grad.detach().float().clone() for n, p in self.params.items()})

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append(self.read())


def dense_reader(targets):
    return lambda: {n: p.detach().float().clone() for n, p in targets.items()}


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_update_capture_equals_parameter_change_exactly(tmp_path, grad_accum):
    model = tiny_lm()
    targets = select_targets(model, PATTERNS)
    assert sorted(targets) == [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight", "model.norm.weight",
    ]
    buffer = make_buffer(targets)
    pushed = []
    meta_fn = lambda step: StepMeta(step, reward_mean=-step)  # noqa: E731
    capture = DeltaCapture(targets, buffer, meta_fn=meta_fn, on_push=pushed.append)
    recorder = Recorder(dense_reader(targets))
    train(model, [capture, recorder], tmp_path, grad_accum=grad_accum)

    assert recorder.step_begins == MAX_STEPS  # one on_step_begin per optimizer step in 5.23
    samples, steps = captured_in_order(buffer)
    assert steps == list(range(1, MAX_STEPS + 1)) and len(pushed) == MAX_STEPS
    assert buffer.metadata(pushed[-1]).reward_mean == -MAX_STEPS
    for t, sample in enumerate(samples):
        before, after = recorder.states[t], recorder.states[t + 1]
        for name, delta in sample.items():
            assert torch.equal(delta, after[name] - before[name]), (t, name)
            assert delta.abs().max() > 1e-4  # the weights really moved
    assert capture.n_captured == MAX_STEPS and capture.n_zero == 0 and capture.n_nonfinite == 0


def test_bf16_weights_are_said_to_round_the_update_away(tmp_path, caplog):
    """bf16 weights keep what survives rounding of a small step: the capture records exactly
    that (what the weights did) and says so; fp32 weights are not warned about."""
    import logging

    model = tiny_lm().to(torch.bfloat16)
    targets = select_targets(model, PATTERNS[:1])
    buffer = make_buffer(targets)
    recorder = Recorder(dense_reader(targets))
    capture = DeltaCapture(targets, buffer)
    with caplog.at_level(logging.WARNING, logger="sae_shards.capture.delta"):
        train(model, [capture, recorder], tmp_path, learning_rate=1e-5)
    (said,) = [r.getMessage() for r in caplog.records if "round" in r.getMessage()]
    assert capture.precision_note == said  # summary.json repeats it
    assert said.startswith("capture.source=update: 2 of the targets (model.layers.0.self_attn."
                           "q_proj.weight, model.layers.1.self_attn.q_proj.weight) are stored in "
                           "bfloat16") and "bf16=True" in said
    samples, _ = captured_in_order(buffer)
    for t, sample in enumerate(samples):  # exactly what the bf16 weights did: mostly nothing
        for name, delta in sample.items():
            assert torch.equal(delta, recorder.states[t + 1][name] - recorder.states[t][name])
            assert float((delta == 0).float().mean()) > 0.5
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_shards.capture.delta"):
        fp32 = tiny_lm()
        fp32_targets = select_targets(fp32, PATTERNS[:1])
        fp32_capture = DeltaCapture(fp32_targets, make_buffer(fp32_targets))
        train(fp32, [fp32_capture], tmp_path)
    assert not [r for r in caplog.records if "round" in r.getMessage()]
    assert fp32_capture.precision_note is None


def test_lora_products_in_tf32_are_said_to_be_inexact():
    """A LoRA target's update is a product of its factors: under TF32 (transformers' tf32=True
    on a GPU) its entries keep about 10 bits, which the run says with the fix; full fp32
    products, or no LoRA target, say nothing. The GPU's case is this note on a GPU's flags
    (``warn_lora_matmul_precision``); a CPU's LoRA targets are never flagged."""
    note = lora_matmul_note(4, "tf32")
    assert note.startswith("capture.source=update: the 4 LoRA targets' updates are matrix "
                           "products of their factors, which torch computes in tf32 here")
    assert "about 1e-3 of its size" in note and "tf32=False" in note and "'ieee'" in note
    assert "about 1e-2 of its size" in lora_matmul_note(1, "bf16")
    assert lora_matmul_note(4, "ieee") is None and lora_matmul_note(0, "tf32") is None
    targets = select_targets(lora_model(), ["*layers.*.self_attn.q_proj.weight"])
    assert all(isinstance(t, LoraTarget) for t in targets.values())
    assert warn_lora_matmul_precision(targets) is None  # on the CPU


def test_only_a_gpus_lora_targets_are_flagged_under_tf32(monkeypatch):
    """Audit 114 M43: which targets warn_lora_matmul_precision counts (a GPU's, at the GPU's
    precision) was untested: the CPU's were never flagged at the CPU's default precision,
    whatever it selected. The GPU is stood in for by the factors' device."""
    import types

    import sae_shards.capture.delta as delta

    targets = select_targets(lora_model(), ["*layers.*.self_attn.q_proj.weight"])
    asked = []
    monkeypatch.setattr(delta, "fp32_matmul", lambda device: asked.append(device) or "tf32")
    assert warn_lora_matmul_precision(targets) is None  # a CPU's products: not flagged
    monkeypatch.setattr(LoraTarget, "A", property(
        lambda self: types.SimpleNamespace(device=torch.device("cuda"))))
    note = warn_lora_matmul_precision(targets)
    assert note == lora_matmul_note(len(targets), "tf32") and len(targets) == 2
    assert asked == [torch.device("cuda")]  # the GPU's precision is the one read


def test_the_capture_carries_its_lora_precision_note_to_the_summary(tmp_path, monkeypatch):
    """Audit 114 M44: the note reached summary.json only through the update capture's
    precision_note, which no test read (a GPU's LoRA run under TF32 would have said nothing)."""
    import sae_shards.capture.delta as delta

    model = lora_model()
    targets = select_targets(model, ["*layers.*.self_attn.q_proj.weight"])
    monkeypatch.setattr(delta, "warn_lora_matmul_precision",
                        lambda given: "the LoRA note" if set(given) == set(targets) else None)
    capture = DeltaCapture(targets, make_buffer(targets))
    train(model, [capture], tmp_path)
    assert capture.precision_note == "the LoRA note"


def test_update_capture_bf16_storage_rounds_the_fp32_delta(tmp_path):
    model = tiny_lm()
    targets = select_targets(model, PATTERNS[:1])
    buffer = make_buffer(targets, dtype=torch.bfloat16)
    recorder = Recorder(dense_reader(targets))
    train(model, [DeltaCapture(targets, buffer), recorder], tmp_path)
    samples, _ = captured_in_order(buffer)
    for t, sample in enumerate(samples):
        for name, delta in sample.items():
            exact = recorder.states[t + 1][name] - recorder.states[t][name]
            assert torch.equal(delta, exact.to(torch.bfloat16).float())


def test_grad_capture_equals_clipped_gradient(tmp_path):
    model = tiny_lm()
    targets = select_targets(model, PATTERNS)
    buffer = make_buffer(targets)
    max_norm = 1e-2
    recorder = Recorder(lambda: {}, params=model.named_parameters())
    trainer = train(
        model, [DeltaCapture(targets, buffer, source="grad"), recorder], tmp_path,
        grad_accum=2, max_grad_norm=max_norm,
    )
    pre_clip = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(pre_clip) == MAX_STEPS and min(pre_clip) > 10 * max_norm  # clipping was active
    samples, steps = captured_in_order(buffer)
    assert steps == list(range(1, MAX_STEPS + 1))
    for sample, grads in zip(samples, recorder.grads):
        full_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
        assert full_norm <= max_norm * (1 + 1e-5)
        for name, g in sample.items():
            assert torch.equal(g, grads[name]), name


def lora_reader(model, targets):
    """fp32 (A, B) factors and the merged effective weight of every LoRA target."""

    def read():
        out = {}
        for name, t in targets.items():
            A, B = t.A.detach().float().clone(), t.B.detach().float().clone()
            base = t.layer.get_base_layer().weight.detach().float()
            merged = base + t.layer.get_delta_weight(t.adapter)
            out[name] = (A, B, merged.detach().float().clone())
        return out

    return read


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_lora_capture_is_effective_dense_delta(tmp_path, grad_accum):
    model = lora_model()
    targets = select_targets(model, ["*layers.*.self_attn.q_proj.weight"])
    assert sorted(targets) == [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    ]
    assert all(isinstance(t, LoraTarget) and t.shape == (32, 32) for t in targets.values())
    scale = targets["model.layers.0.self_attn.q_proj.weight"].scaling
    assert scale == 8 / 4
    buffer = make_buffer(targets)
    recorder = Recorder(lora_reader(model, targets))
    train(model, [DeltaCapture(targets, buffer), recorder], tmp_path, grad_accum=grad_accum)

    samples, steps = captured_in_order(buffer)
    assert steps == list(range(1, MAX_STEPS + 1))
    for t, sample in enumerate(samples):
        for name, delta in sample.items():
            (A0, B0, W0), (A1, B1, W1) = recorder.states[t][name], recorder.states[t + 1][name]
            exact = scale * (B1.double() @ A1.double() - B0.double() @ A0.double())  # [32, 32]
            size = exact.abs().max()
            assert size > 1e-4  # the adapter really moved
            # errors relative to the delta's size: fp32 rounding is ~1e-7 of it
            assert (delta.double() - exact).abs().max() < 1e-6 * size
            assert (delta - scale * (B1 @ A1 - B0 @ A0)).abs().max() < 1e-5 * size
            assert (delta - (W1 - W0)).abs().max() < 1e-5 * size  # merged weights, fp32


def test_both_lora_update_writers_give_the_scaled_change_of_the_effective_weight():
    """``lora_update`` (ZeRO-3: factors gathered whole) and ``write_lora_update`` (into a slot)
    each give ``s * (B1 A1 - B0 A0)``, the scaling included (s = 2 here)."""
    from types import SimpleNamespace

    from sae_shards.capture.update_writer import SqNorm, lora_update, write_lora_update

    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    a1 = a0 + 1e-2 * torch.randn(4, 12, generator=g)
    b1 = b0 + 1e-2 * torch.randn(10, 4, generator=g)
    want = 2.0 * (b1 @ a1 - b0 @ a0).double()
    got = lora_update(a0, b0, a1, b1, 2.0)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)
    target = SimpleNamespace(A=a1, B=b1, scaling=2.0)  # only the factors and s are read
    view, norm = torch.empty(10, 12), SqNorm()
    write_lora_update(target, a0.clone(), b0.clone(), None, None, view, norm)
    assert torch.allclose(view.double(), want, rtol=1e-4, atol=1e-6)
    assert norm.value() == pytest.approx(float(want.norm()), rel=1e-4)  # the sample's norm


def test_lora_rejects_unadapted_weight_and_grad_source():
    model = lora_model()
    with pytest.raises(ValueError, match=r"k_proj\.weight.*no LoRA adapter.*target_modules"):
        select_targets(model, ["*layers.0.self_attn.k_proj.weight"])
    targets = select_targets(model, ["*q_proj.weight"])
    with pytest.raises(ValueError, match="source='grad' is not supported for LoRA"):
        DeltaCapture(targets, make_buffer(targets), source="grad")


def test_pattern_matching_nothing_lists_names():
    model = tiny_lm()
    with pytest.raises(ValueError) as err:
        select_targets(model, ["*q_proj.weight", "*attn.qkv.weight"])
    msg = str(err.value)
    assert "'*attn.qkv.weight' matches no parameter" in msg
    # every kind of name, each layer's once as layers.* (the first 8 names were all of layer
    # 0's first sub-block; the MLP's and the final norm's were hidden behind "+N more")
    assert "model.embed_tokens.weight" in msg and "model.layers.*.mlp.down_proj.weight" in msg
    assert "model.norm.weight" in msg and "layers.0." not in msg and "more)" not in msg
    assert "patterns match whole" not in msg  # it was a glob
    with pytest.raises(ValueError, match=r"'q_proj' matches no parameter of \w+ \(patterns "
                                         r"match whole parameter names: '\*q_proj\*' matches"):
        select_targets(model, ["q_proj"])  # a module's name, as peft's target_modules take


def test_frozen_parameters_are_not_targets():
    model = tiny_lm()
    model.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="embed_tokens.weight are frozen"):
        select_targets(model, ["*embed_tokens.weight"])


def test_buffer_must_match_targets():
    model = tiny_lm()
    targets = select_targets(model, PATTERNS[:1])
    other = make_buffer(select_targets(model, PATTERNS[1:2]))
    with pytest.raises(ValueError, match="do not match"):
        DeltaCapture(targets, other)
    with pytest.raises(ValueError, match="capture.source 'adam_moment'"):
        DeltaCapture(targets, make_buffer(targets), source="adam_moment")


def test_targets_from_another_model_are_rejected(tmp_path):
    targets = select_targets(tiny_lm(), PATTERNS[:1])
    with pytest.raises(ValueError, match="not parameters of the trained model"):
        train(tiny_lm(), [DeltaCapture(targets, make_buffer(targets))], tmp_path)


class SetGradEntry(TrainerCallback):
    """Sets ``grad[0, 0]`` of one parameter to ``value`` before the optimizer of step ``step``."""

    def __init__(self, param, step, value):
        self.param, self.step, self.value = param, step, value

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.param.grad[0, 0] = self.value


def test_nonfinite_sample_is_skipped_and_counted(tmp_path):
    model = tiny_lm()
    targets = select_targets(model, PATTERNS[:1])
    buffer = make_buffer(targets)
    capture = DeltaCapture(targets, buffer, source="grad")
    param = next(iter(targets.values()))
    # nan in the gradient capture sees, repaired before the optimizer so later steps stay finite
    spoil, repair = SetGradEntry(param, 2, math.nan), SetGradEntry(param, 2, 0.0)
    train(model, [spoil, capture, repair], tmp_path, max_grad_norm=0.0)
    _, steps = captured_in_order(buffer)
    assert steps == [1, 3, 4] and capture.n_nonfinite == 1 and capture.n_captured == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_events_pieces_norm_and_skips(monkeypatch, tmp_path, dtype):
    """``update`` driven through its events: pieces that do not divide the targets, the norm
    accumulated while writing, the slot claimed at on_step_begin with fp32 storage, and
    non-finite, zero and outlier samples."""
    from transformers import TrainerControl, TrainerState

    import sae_shards.capture.update_writer as update_writer

    monkeypatch.setattr(update_writer, "CHUNK", 7)  # several pieces per target, a short last one
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(5, 6, generator=gen))
    model.b = torch.nn.Parameter(torch.randn(11, generator=gen))
    targets = dict(model.named_parameters())
    buffer = make_buffer(targets, capacity=3, dtype=dtype)
    capture = DeltaCapture(targets, buffer, outlier_ratio=10.0)
    args = TrainingArguments(tmp_path, report_to=[])
    state, control = TrainerState(), TrainerControl()
    capture.on_train_begin(args, state, control, model=model)
    in_slot = dtype == torch.float32
    assert all((s == ()) == in_slot for s in capture._snapshots.values())

    def step(change) -> dict[str, torch.Tensor]:
        before = {n: p.detach().clone() for n, p in targets.items()}
        n_before = len(buffer)
        capture.on_step_begin(args, state, control)
        assert len(buffer) == n_before - (in_slot and n_before == buffer.capacity)
        with torch.no_grad():
            for p in targets.values():
                change(p)
        state.global_step += 1
        capture.on_step_end(args, state, control)
        return {n: (p.detach() - before[n]).to(dtype) for n, p in targets.items()}

    for i in range(5):  # slots 0, 1, 2, 0, 1
        expect = step(lambda p: p.add_(torch.randn(p.shape, generator=gen) * 1e-3))
        slot = (buffer.chronological_slots()[-1]).item()
        got = buffer.gather([slot])
        assert all(torch.equal(got[n][0], expect[n].float()) for n in targets)
        stored = torch.cat([expect[n].float().flatten() for n in targets])
        assert capture.last_norm == pytest.approx(stored.norm().item(), rel=1e-6)
    assert capture.n_captured == 5 and buffer.n_pushed == 5
    next_slot = buffer._next
    step(lambda p: p.view(-1)[-1].fill_(math.nan) if p.dim() == 1 else None)
    assert capture.n_nonfinite == 1 and buffer.n_pushed == 5 and buffer._next == next_slot
    with torch.no_grad():
        model.b.view(-1)[-1] = 0.0
    step(lambda p: p.add_(1.0))  # a norm ~1e3 times the running RMS
    assert capture.n_outliers == 1 and buffer.n_pushed == 5
    step(lambda p: None)
    assert capture.n_zero == 1 and capture.last_norm == 0.0 and buffer.n_pushed == 6
    assert len(buffer) == 3 and buffer._writing is None


def test_outlier_reference_is_a_mean_then_a_slow_ema_of_accepted_norms():
    """NormOutliers: the reference is the plain mean of the first 50 accepted squared norms, then
    an EMA of rate 0.02; the test starts at the 5th sample, and a flagged sample leaves the
    reference as it was."""
    from sae_shards.capture.outliers import NormOutliers

    out = NormOutliers(ratio=3.0)  # one sample a step, as per-step capture tests them
    assert [out.is_outlier(n, i) for i, n in enumerate((1.0, 1.0, 1.0, 20.0, 100.0))] == (
        [False] * 4 + [True])
    out = NormOutliers(ratio=3.0)
    for i, n in enumerate([1.0, 2.0, 3.0, 4.0] + [1.0] * 46):
        assert not out.is_outlier(n, i)
    mean = out.sq_norm_mean
    assert mean == pytest.approx((1 + 4 + 9 + 16 + 46) / 50)
    assert out.is_outlier(10.0, 50) and out.n_norms == 50  # over 3 x rms 1.23: skipped, not counted
    assert out.sq_norm_mean == mean and out.last_rms == pytest.approx(math.sqrt(mean))
    for i in range(10):
        assert not out.is_outlier(2.0, 51 + i)
    assert out.sq_norm_mean == pytest.approx(4 - (4 - mean) * 0.98 ** 10)


def _flags(out, steps):
    """Each step's flags: ``steps`` is a list of steps, each a list of its samples' norms."""
    return [[out.is_outlier(n, i) for n in norms] for i, norms in enumerate(steps, 1)]


def test_a_run_whose_first_steps_change_nothing_keeps_its_later_updates():
    """Audit 104 F15: after four all-zero updates (a sparse reward not yet earned) the reference
    was 0 and every later update was skipped for the rest of the run; after steps of weight
    decay alone, every update of the learning that followed (160x larger). Zeros are left out
    of the test and the reference; a new scale is taken after PATIENCE consecutive steps each
    with a flagged sample (audit 109 F2: events 100x larger than others of their step, step
    after step, were flagged for the whole run when counted only in wholly flagged steps); a
    wild step, all of its events, and a burst shorter than PATIENCE are left out (audit 107
    F2, 109 F3), a step between them breaks the streak (109 F4), and a saved reference of 0
    (an earlier version's) recovers after PATIENCE steps."""
    from sae_shards.capture.outliers import PATIENCE, NormOutliers

    assert PATIENCE == 3
    out = NormOutliers(ratio=100.0)
    assert not any(sum(_flags(out, [[0.0]] * 5 + [[0.0224], [0.0168], [0.02], [0.03]]), []))
    for before in (4, 60):  # decay-only steps, then the first reward earned
        out = NormOutliers(ratio=100.0)
        flags = [f for step in _flags(out, [[1.4e-4]] * before + [[0.0224]] * 10) for f in step]
        assert flags == [False] * before + [True] * PATIENCE + [False] * (10 - PATIENCE)
        assert out.rms == pytest.approx(0.0224)  # the learning's scale (audit 110 F2)
    events = NormOutliers(ratio=100.0)  # per event: 8 events a step
    normal, wild = [1.0] * 8, [1e3] * 8
    flags = _flags(events, [normal] * 25 + [wild, normal, wild, wild, normal, wild])
    assert not any(sum(flags[:25], []))
    assert [all(step) for step in flags[25:]] == [True, False, True, True, False, True]
    assert not any(sum(flags[26:27] + flags[29:30], []))  # two wild steps were not a new scale
    mixed = [1e-3] * 4 + [1.0] * 4  # small events first, then large ones 1000x their size
    flags = _flags(NormOutliers(ratio=100.0), [mixed] * 10)
    assert [sum(step) for step in flags] == [4] * PATIENCE + [0] * (10 - PATIENCE)
    gap = NormOutliers(ratio=100.0)  # a wild step, a step of zeros only, two wild steps
    flags = _flags(gap, [normal] * 10 + [wild, [0.0] * 8, wild, wild, normal])
    assert [all(step) for step in flags[10:]] == [True, False, True, True, False]
    assert gap.rms == pytest.approx(1.0)  # the zeros' step broke the streak (audit 110 F3)
    again = NormOutliers(ratio=100.0)  # a new scale, then a jump from it: PATIENCE steps again
    flags = _flags(again, [normal] * 10 + [wild] * PATIENCE + [[1e6] * 8] * (PATIENCE + 1))
    assert [all(step) for step in flags[10:]] == [True] * 2 * PATIENCE + [False]  # 110 F4
    assert again.rms == pytest.approx(1e6)

    stuck = NormOutliers(ratio=100.0)  # an earlier version's saved state after four zeros
    stuck.load_state({"sq_norm_mean": 0.0, "n_norms": 4})
    assert [all(f) for f in _flags(stuck, [[0.02]] * 5)] == [True] * PATIENCE + [False] * 2


def test_the_outlier_test_resumes_mid_streak():
    """A resume between two wholly flagged steps goes on as the uninterrupted run: the streak and
    the flagged norms are part of the saved state."""
    from sae_shards.capture.outliers import NormOutliers

    wild = [[400.0] * 4, [500.0] * 4, [600.0] * 4, [700.0, 7e4, 700.0, 700.0], [1.0] * 4]
    steps = [[1.0] * 4] * 10 + wild + [[1e5] * 4]
    whole = NormOutliers(ratio=100.0)
    expected = _flags(whole, steps)
    # the three wild steps became the scale; the 100x event of the step after them did not
    assert [sum(f) for f in expected[10:]] == [4, 4, 4, 1, 0, 4]
    for split in range(10, len(steps)):  # every resume point, the streak's middle included
        first = NormOutliers(ratio=100.0)
        head = _flags(first, steps[:split])
        resumed = NormOutliers(ratio=100.0)
        resumed.load_state(json.loads(json.dumps(first.state())))  # as the resume file holds it
        tail = [[resumed.is_outlier(n, i) for n in norms]
                for i, norms in enumerate(steps[split:], split + 1)]
        assert head + tail == expected, split
        assert resumed.sq_norm_mean == whole.sq_norm_mean, split


# ---- found by mutation testing (audit 121): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

class _StopAtFirstStep:
    """A callback that stops ``train()`` in the middle of its first step (after the capture took
    its snapshot), as an exception from the script's own callback or a KeyboardInterrupt would."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                raise KeyboardInterrupt("stopped mid-step")

        return Stop()


def test_a_train_stopped_mid_step_does_not_leave_the_next_train_a_stale_snapshot(tmp_path):
    """D19: ``DeltaCapture._reset`` forgets a step a previous ``train()`` stopped in the middle
    of: the next ``train()`` with the same capture records exact updates from its first step."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers import PATTERNS, captured_in_order, make_buffer, tiny_lm
    from test_capture import Recorder, dense_reader, train

    from sae_shards.capture.delta import DeltaCapture
    from sae_shards.capture.selection import select_targets

    model = tiny_lm()
    targets = select_targets(model, PATTERNS)
    buffer = make_buffer(targets)
    capture = DeltaCapture(targets, buffer)
    with pytest.raises(KeyboardInterrupt):
        train(model, [capture, _StopAtFirstStep()], tmp_path / "a")
    recorder = Recorder(dense_reader(targets))
    train(model, [capture, recorder], tmp_path / "b")
    samples, steps = captured_in_order(buffer)
    assert steps == [1, 2, 3, 4]
    for t, sample in enumerate(samples):
        for name, delta in sample.items():
            assert torch.equal(delta, recorder.states[t + 1][name] - recorder.states[t][name])


def test_write_updates_with_a_snapshot_apart_from_the_slot():
    """U09: ``write_updates`` diffs a small fp32 target in place only when the slot holds its
    snapshot; with the snapshot kept apart (DeltaCapture does so when some target lives on
    another device than the buffer: ``_snap_in_slot`` False for all) the slot gets
    ``theta_after - snapshot`` exactly, whatever it held before."""
    from sae_shards.capture.update_writer import SqNorm, write_updates

    gen = torch.Generator().manual_seed(0)
    theta_before = torch.randn(4, 6, generator=gen)
    target = torch.nn.Parameter(theta_before + 1e-3 * torch.randn(4, 6, generator=gen))
    snap = (theta_before.clone(),)
    view = torch.full((4, 6), 7.0)  # the reused slot's older sample
    norm = SqNorm()
    with torch.no_grad():  # as DeltaCapture.on_step_end calls it
        write_updates([(target, snap, view)], norm)
    assert torch.equal(view, target.detach() - theta_before)
    assert norm.value() == pytest.approx(float((target.detach() - theta_before).norm()), rel=1e-5)
