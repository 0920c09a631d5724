"""EventRecorder on real TRL GRPO steps (tiny models, CPU): the events of a step sum to the step's
gradient before clipping, for Linear (Qwen2) and Conv1D (GPT-2) weights, biases and LoRA."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from packaging.version import Version
from transformers import TrainerCallback

from sae_shards.capture.event_hooks import ROW_KEY, EventRecorder
from sae_shards.capture.selection import LoraTarget, default_targets, select_targets
from sae_shards.core import events as ev
from sae_shards.core.targets import TargetSpec
from sae_shards.recipe.models import tiny_model_and_tokenizer
from sae_shards.recipe.trainers import trl_config

RTOL = 1e-5
"""Relative tolerance (Frobenius) of the event sum against param.grad, fp32."""
PROMPTS = ["abc", "hello there", "xy", "the quick fox", "a", "zz top", "go go go", "q"]
EXACT_RANK = 128
"""Above any event's positions here (4 completions x (<= 14 prompt + 6 completion tokens))."""
BIAS = {"qwen2": "model.layers.0.self_attn.q_proj.bias", "gpt2": "transformer.h.0.attn.c_attn.bias",
        "opt": "model.decoder.layers.0.fc1.bias"}


def varied_reward(completions, **kwargs):
    """Differs between completions of one prompt, so advantages are non-zero."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def flat_for_z_reward(prompts, completions, **kwargs):
    """Constant for prompts starting with 'z' (their groups get advantage 0)."""
    return [1.0 if p.startswith("z") else float(sum(map(ord, c)) % 7)
            for p, c in zip(prompts, completions)]


def grpo_trainer(tmp_path, arch="qwen2", grad_accum=1, lora=False, reward=varied_reward,
                 steps=1, prompts=PROMPTS, algorithm="grpo", **trl_kwargs):
    from datasets import Dataset

    from sae_shards.recipe.trainers import TRAINERS

    model, tokenizer = (_tiny_opt() if arch == "opt" else
                        tiny_model_and_tokenizer(arch, hidden_size=32, num_layers=2, num_heads=4,
                                                 intermediate_size=64, seed=0))
    args = trl_config(dict(max_steps=steps, per_device_train_batch_size=8, num_generations=4,
                           gradient_accumulation_steps=grad_accum, max_completion_length=6,
                           max_grad_norm=0.0, learning_rate=1e-3, beta=0.0, **trl_kwargs),
                      tmp_path / "trl", algorithm)
    peft_config = None
    if lora:
        import peft

        peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj"])
    trainer_cls = TRAINERS[algorithm][1]
    return trainer_cls(model=model, reward_funcs=[reward], args=args, processing_class=tokenizer,
                       train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
                       peft_config=peft_config)


def _tiny_opt():
    """A random tiny OPT: its decoder layer runs fc1/fc2 on positions flattened to [B*S, d]."""
    from transformers import OPTConfig, OPTForCausalLM

    from sae_shards.recipe.models import build_tokenizer

    tokenizer = build_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OPTForCausalLM(OPTConfig(
            vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64, **ids))
    model.generation_config.update(**ids)
    return model, tokenizer


class Probe(TrainerCallback):
    """Drives the recorders and copies ``param.grad`` (unclipped: max_grad_norm=0) and the
    parameters themselves (the LoRA chain rule needs the step's A and B) per step."""

    def __init__(self, recorders, params):
        self.recorders, self.params = recorders, dict(params)
        self.events, self.grads, self.values = [[] for _ in recorders], [], []

    def on_step_begin(self, args, state, control, **kwargs):
        for r in self.recorders:
            r.start_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for out, r in zip(self.events, self.recorders):
            out.append(r.finish_step())
        self.grads.append({n: p.grad.detach().clone() for n, p in self.params.items()})
        self.values.append({n: p.detach().clone() for n, p in self.params.items()})


def run(trainer, targets, **recorder_kwargs):
    """Train with one EventRecorder; (events, grads, parameter values) per step, and it."""
    recorder = EventRecorder(trainer.model, targets, trainer, **recorder_kwargs)
    recorder.install()
    params = {n: p for n, p in targets.items() if not isinstance(p, LoraTarget)}
    for n, t in targets.items():
        if isinstance(t, LoraTarget):
            params[f"{n}/A"], params[f"{n}/B"] = t.A, t.B
    probe = Probe([recorder], params)
    trainer.add_callback(probe)
    trainer.train()
    recorder.remove()
    return probe.events[0], probe.grads, probe.values, recorder


def event_sum(events, name, shape):
    spec = TargetSpec(name, shape)
    return sum(ev.materialize(e.factors[name], spec) for e in events)


def rel_err(x, y):
    return float((x - y).norm() / y.norm())


def dense_targets(trainer, arch):
    model = trainer.model
    return select_targets(model, default_targets(model) + [BIAS[arch]])


def assert_sums_match(events, grads, targets, values=None, rtol=RTOL):
    for name, t in targets.items():
        if isinstance(t, LoraTarget):
            X = event_sum(events, name, t.shape)  # [out, in]
            s = t.scaling
            A, B = values[f"{name}/A"], values[f"{name}/B"]  # [r, in], [out, r]
            assert rel_err(s * B.T @ X, grads[f"{name}/A"]) < rtol, name
            assert rel_err(s * X @ A.T, grads[f"{name}/B"]) < rtol, name
        else:
            assert rel_err(event_sum(events, name, tuple(t.shape)), grads[name]) < rtol, name


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("arch,lora", [("qwen2", False), ("gpt2", False), ("qwen2", True),
                                       ("opt", False)])
def test_events_sum_to_the_step_gradient(tmp_path, arch, lora, grad_accum):
    """OPT runs its MLP on positions flattened to [B*S, d]: they are mapped back to rows."""
    trainer = grpo_trainer(tmp_path, arch, grad_accum, lora=lora, steps=2)
    model = trainer.model
    targets = (select_targets(model, ["*q_proj.weight", "*v_proj.weight"]) if lora
               else dense_targets(trainer, arch))
    steps, grads, values, recorder = run(trainer, targets, event_rank=EXACT_RANK)
    n_groups = 2 * grad_accum  # 8 completions per micro-batch, 4 per group
    for events, grad, value in zip(steps, grads, values):
        assert [e.group for e in events] == sorted(e.group for e in events)
        assert 0 < len(events) <= n_groups
        assert all(len(e.rows) == 4 and e.kept_energy == 1.0 for e in events)
        assert all(e.advantage == pytest.approx(0.0, abs=1e-5) for e in events)  # group means
        assert_sums_match(events, grad, targets, value)
        for e in events:  # factors are fp32, at most event_rank rows
            for name, x in e.factors.items():
                assert x.dtype == torch.float32
                if x.ndim == 2:
                    assert 0 < x.shape[0] <= recorder.event_rank
                else:
                    assert x.shape == tuple(targets[name].shape)
    assert recorder.n_events == sum(map(len, steps))


def test_rloo_and_chunked_forwards_sum_to_the_step_gradient(tmp_path):
    """RLOO goes through the same seams; a loss that runs the model in chunks of 3 rows (8 rows:
    3 + 3 + 2) is mapped row by row."""
    trainer = grpo_trainer(tmp_path, "qwen2", grad_accum=2, algorithm="rloo")
    original = trainer._get_per_token_logps_and_entropies

    def chunked(model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        return original(model, input_ids, attention_mask, logits_to_keep, 3, **kwargs)

    trainer._get_per_token_logps_and_entropies = chunked
    sizes = []  # rows of each grad-enabled forward
    trainer.model.register_forward_pre_hook(
        lambda m, args, kw: sizes.append(kw["input_ids"].shape[0]) if torch.is_grad_enabled()
        else None, with_kwargs=True)
    targets = dense_targets(trainer, "qwen2")
    (events,), (grad,), _, recorder = run(trainer, targets, event_rank=EXACT_RANK)
    assert sizes == [3, 3, 2, 3, 3, 2]
    assert len(events) + recorder.n_zero_advantage == 4
    assert_sums_match(events, grad, targets)


def test_dropping_prompt_positions_breaks_the_sum(tmp_path):
    """The exactness test can fail: prompt tokens carry gradient through attention."""
    trainer = grpo_trainer(tmp_path, "qwen2", grad_accum=1)
    targets = select_targets(trainer.model, ["*layers.0.self_attn.q_proj.weight"])
    recorder = EventRecorder(trainer.model, targets, trainer)
    recorder._skip_prompt_positions = True
    recorder.install()
    probe = Probe([recorder], targets)
    trainer.add_callback(probe)
    trainer.train()
    (events,), (grad,) = probe.events[0], probe.grads
    name, p = next(iter(targets.items()))
    err = rel_err(event_sum(events, name, tuple(p.shape)), grad[name])
    assert err > 1e-3, err


def test_dropping_a_micro_batch_breaks_the_sum(tmp_path):
    """The exactness test can fail: with accumulation 2, a recorder that misses the step's second
    micro-batch (its compute_loss runs outside the recorder's step) no longer sums to the step's
    gradient."""
    trainer = grpo_trainer(tmp_path, "qwen2", grad_accum=2)
    targets = select_targets(trainer.model, ["*layers.0.self_attn.q_proj.weight"])
    recorder = EventRecorder(trainer.model, targets, trainer, event_rank=EXACT_RANK)
    recorder.install()
    recording = trainer.compute_loss  # the recorder's wrapper
    calls = []

    def second_unseen(model, inputs, *args, **kwargs):
        calls.append(1)
        if len(calls) % 2:
            return recording(model, inputs, *args, **kwargs)
        recorder._in_step = False
        try:
            return recording(model, inputs, *args, **kwargs)
        finally:
            recorder._in_step = True

    trainer.compute_loss = second_unseen
    probe = Probe([recorder], targets)
    trainer.add_callback(probe)
    trainer.train()
    (events,), (grad,) = probe.events[0], probe.grads
    name, p = next(iter(targets.items()))
    assert len(calls) == 2
    err = rel_err(event_sum(events, name, tuple(p.shape)), grad[name])
    assert err > 1e-2, err


def test_completion_granularity_sums_to_the_same_gradient(tmp_path):
    trainer = grpo_trainer(tmp_path, "qwen2", grad_accum=2)
    targets = dense_targets(trainer, "qwen2")
    (events,), (grad,), _, recorder = run(trainer, targets, granularity="completion")
    assert all(len(e.rows) == 1 and e.group == e.rows[0] for e in events)  # <= 20 rows each
    assert len(events) > 4
    assert_sums_match(events, grad, targets)
    # its work inside the forward and backward is timed (runner.sae_budget pays for it), once
    taken = recorder.take_hook_seconds()
    assert taken > 0 and recorder.take_hook_seconds() == 0.0


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_small_event_rank_is_the_best_low_rank_approximation(tmp_path, grad_accum):
    """Two recorders on one step: event_rank 256 (exact) and 3. Cut once (grad_accum 1) an
    event is the best rank-3 approximation of its gradient, with the kept energy of the SVD; cut
    at each of 2 micro-batches (memory stays bounded) it is close to it."""
    trainer = grpo_trainer(tmp_path, "qwen2", grad_accum=grad_accum)
    targets = select_targets(trainer.model, ["*layers.1.mlp.down_proj.weight",
                                             "*layers.0.self_attn.q_proj.weight"])
    full = EventRecorder(trainer.model, targets, trainer, event_rank=256)
    small = EventRecorder(trainer.model, targets, trainer, event_rank=3)
    full.install()
    small.install()
    probe = Probe([full, small], targets)
    trainer.add_callback(probe)
    trainer.train()
    small.remove()
    full.remove()
    (exact,), (cut,) = probe.events
    assert [e.rows for e in exact] == [e.rows for e in cut] and len(exact) == 2 * grad_accum
    once = grad_accum == 1
    for e_full, e_cut in zip(exact, cut):
        assert e_full.kept_energy == 1.0 and e_cut.kept_energy < 1.0
        kept = []
        for name, p in targets.items():
            spec = TargetSpec(name, tuple(p.shape))
            X = ev.materialize(e_full.factors[name], spec).double()  # [m, n]
            assert e_full.factors[name].shape[0] > 3  # the event has more positions than 3
            assert e_cut.factors[name].shape == (3, sum(p.shape))
            U, S, Vh = torch.linalg.svd(X)
            best = (U[:, :3] * S[:3]) @ Vh[:3]
            Xk = ev.materialize(e_cut.factors[name], spec).double()
            if once:
                assert rel_err(Xk, best) < 1e-4, name
                kept.append(float(S[:3].pow(2).sum() / S.pow(2).sum()))
            else:
                assert (X - Xk).norm() < 1.1 * (X - best).norm(), name
                kept.append(float(Xk.pow(2).sum() / X.pow(2).sum()))
        if once:
            assert e_cut.kept_energy == pytest.approx(min(kept), rel=1e-4)
        else:  # an estimate: cut energy over kept plus cut energy
            assert e_cut.kept_energy == pytest.approx(min(kept), abs=0.1)


def test_zero_advantage_groups_are_skipped_and_counted(tmp_path):
    prompts = ["zebra", "abc", "zoo", "hello"] * 2  # one step: 2 groups, the first flat
    trainer = grpo_trainer(tmp_path, "qwen2", grad_accum=2, reward=flat_for_z_reward,
                           prompts=prompts)
    targets = dense_targets(trainer, "qwen2")
    (events,), (grad,), _, recorder = run(trainer, targets, event_rank=EXACT_RANK)
    assert recorder.n_zero_advantage == 2  # "zebra" and "zoo" groups
    assert len(events) == 2 and recorder.n_events == 2
    assert all(abs(e.advantage) < 1e-5 and e.kept_energy == 1.0 for e in events)
    assert_sums_match(events, grad, targets)  # skipped groups had no gradient


def test_covariances_sum_over_all_positions(tmp_path):
    trainer = grpo_trainer(tmp_path, "gpt2", grad_accum=2)
    targets = select_targets(trainer.model, ["transformer.h.0.attn.c_attn.weight"])
    (events,), _, _, recorder = run(trainer, targets, track_covariance=True,
                                   event_rank=EXACT_RANK)
    name, p = next(iter(targets.items()))
    m = p.shape[0]
    S_l, S_r, count = recorder.covariances()[name]
    L = torch.cat([e.factors[name][:, :m] for e in events])  # exact: no event is cut
    R = torch.cat([e.factors[name][:, m:] for e in events])
    assert count == L.shape[0]
    assert rel_err(S_l, L.T @ L) < RTOL and rel_err(S_r, R.T @ R) < RTOL


def test_norm_weight_target_is_refused(tmp_path):
    trainer = grpo_trainer(tmp_path, "qwen2")
    targets = select_targets(trainer.model, ["model.norm.weight"])
    with pytest.raises(ValueError, match=r"'model.norm.weight' is the 'weight' of a Qwen2RMSNorm; "
                                         r"per-event capture supports the weights and biases"):
        EventRecorder(trainer.model, targets, trainer)
    with pytest.raises(ValueError, match="granularity='prompt' is not supported"):
        EventRecorder(trainer.model, targets, trainer, granularity="prompt")


@pytest.mark.parametrize("arch,lora", [("qwen2", False), ("gpt2", False), ("qwen2", True)])
def test_events_under_activation_checkpointing_equal_those_without(tmp_path, arch, lora):
    """TRL turns activation checkpointing on by default (non-reentrant in transformers 5): the
    layers re-run inside backward, and the hooks must neither refuse nor count them twice."""
    def events_and_grads(checkpointing):
        trainer = grpo_trainer(tmp_path / str(checkpointing), arch, lora=lora, steps=2,
                               gradient_checkpointing=checkpointing)
        targets = (select_targets(trainer.model, ["*q_proj.weight", "*v_proj.weight"]) if lora
                   else dense_targets(trainer, arch))
        out = run(trainer, targets, event_rank=EXACT_RANK)
        layers = [m for m in trainer.model.modules() if hasattr(m, "gradient_checkpointing")]
        assert any(m.gradient_checkpointing for m in layers) == checkpointing
        return targets, out

    targets, (steps, grads, values, _) = events_and_grads(True)
    _, (plain, _, _, _) = events_and_grads(False)
    for events, grad, value, ref in zip(steps, grads, values, plain):
        assert_sums_match(events, grad, targets, value)
        assert [e.rows for e in events] == [e.rows for e in ref]
        for e, r in zip(events, ref):
            for name in targets:
                spec = TargetSpec(name, tuple(targets[name].shape))
                x, y = ev.materialize(e.factors[name], spec), ev.materialize(r.factors[name], spec)
                assert rel_err(x, y) < RTOL, name


@pytest.mark.parametrize("how", ["args", "model"])
def test_reentrant_checkpointing_is_refused(tmp_path, how):
    kwargs = {"use_reentrant": True}
    extra = (dict(gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
             if how == "args" else {})
    trainer = grpo_trainer(tmp_path, "qwen2", **extra)
    if how == "model":
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    targets = select_targets(trainer.model, ["*q_proj.weight"])
    with pytest.raises(ValueError, match=r"only with use_reentrant=False .*"
                                         + ("checkpointing_kwargs has use_reentrant=True"
                                            if how == "args" else "layers use reentrant")):
        EventRecorder(trainer.model, targets, trainer).install()


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()]


def test_remove_leaves_model_and_trainer_untouched(tmp_path):
    trainer = grpo_trainer(tmp_path, "qwen2")
    model = trainer.model
    targets = dense_targets(trainer, "qwen2")
    ids = torch.randint(10, 40, (2, 7))
    before_hooks, before_attrs = _hook_counts(model), set(vars(trainer))
    before = model(input_ids=ids).logits
    recorder = EventRecorder(model, targets, trainer)
    recorder.install()
    assert _hook_counts(model) != before_hooks
    assert {"compute_loss", "_generate_and_score_completions"} <= set(vars(trainer))
    recorder.remove()
    assert _hook_counts(model) == before_hooks and set(vars(trainer)) == before_attrs
    assert torch.equal(model(input_ids=ids).logits, before)


def test_forward_outside_compute_loss_during_a_step_is_an_error(tmp_path):
    trainer = grpo_trainer(tmp_path, "qwen2")
    targets = select_targets(trainer.model, ["*q_proj.weight"])
    recorder = EventRecorder(trainer.model, targets, trainer)
    recorder.install()
    recorder.start_step()
    with pytest.raises(RuntimeError, match="outside compute_loss"):
        trainer.model(input_ids=torch.randint(10, 40, (2, 5)))
    with torch.no_grad():  # no-grad forwards (generation, reference log-probs) are ignored
        trainer.model(input_ids=torch.randint(10, 40, (2, 5)))
    with pytest.raises(RuntimeError, match=f"no '{ROW_KEY}'"):
        trainer.compute_loss(trainer.model, {"advantages": torch.zeros(2)})
    recorder.remove()


@pytest.mark.skipif(
    Version(importlib.metadata.version("trl")) < Version("1.15"),
    reason="TRL before 1.15 has no fused LM head: lm_head runs as a module, its events are read")
@pytest.mark.parametrize("patterns", [["lm_head.weight", "*layers.0.mlp.up_proj.weight"],
                                      ["lm_head.weight"]])  # no target's module runs at all
def test_a_target_used_outside_its_module_is_an_error_not_zero_events(tmp_path, patterns):
    """TRL's fused LM head (1.15 on) multiplies by lm_head.weight directly: the module never
    runs, so its per-event gradients would silently read as zero. The recorder stops at the
    first step, also when that module is the only target's (it once took that for a step with
    no forward, and a whole run trained with zero events); resolve_targets refuses it sooner."""
    from sae_shards.capture.pipeline import resolve_targets

    trainer = grpo_trainer(tmp_path, "qwen2")
    targets = select_targets(trainer.model, patterns)
    with pytest.raises(ValueError, match=r"lm_head.weight belongs to the LM head \(Linear\): "
                                         r"TRL .* fused LM head"):
        resolve_targets(trainer.model, patterns, "group")
    assert resolve_targets(trainer.model, patterns, "step").keys() == targets.keys()
    with pytest.raises(ValueError, match=r"lm_head.weight.*never ran"):
        run(trainer, targets, event_rank=EXACT_RANK)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_dropout_makes_events_approximate_and_says_so(dropout, caplog):
    """Dropout feeds a LoRA adapter inputs the hooks never see: warned about (exact at 0)."""
    import peft

    from sae_shards.capture.event_capture import _lora_dropout_note

    model, _ = tiny_model_and_tokenizer("qwen2", hidden_size=32, num_layers=1, num_heads=4,
                                        intermediate_size=64, seed=0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_dropout=dropout,
                                                       target_modules=["q_proj"]))
    with caplog.at_level("WARNING", logger="sae_shards"):
        note = _lora_dropout_note(select_targets(model, ["*q_proj.weight"]), "group")
    said = "lora_dropout=0.1: each event's gradient of the adapted weights is approximate"
    assert (said in caplog.text) == (dropout > 0) == (note is not None and said in note)


def test_an_events_slot_holds_its_factors_and_zeros_after_them():
    """_fill: fewer factor rows than the slot's: the rest zeroed (the slot may hold an older,
    longer event); more rows than a slot capped at min(m, n): re-cut exactly, not dropped."""
    import math

    from sae_shards.capture.event_capture import _fill

    spec = TargetSpec("w", (2, 5))
    g = torch.Generator().manual_seed(0)
    view = torch.full((2, 7), 9.0)
    short = torch.randn(1, 7, generator=g)
    _fill(view, short, spec)
    assert torch.equal(view[:1], short) and not view[1:].any()
    long = torch.randn(4, 7, generator=g)  # rank <= 2: two rows hold X = L^T R exactly
    _fill(view, long, spec)
    torch.testing.assert_close(ev.materialize(view, spec), ev.materialize(long, spec),
                               rtol=1e-5, atol=1e-5)
    assert math.isclose(float(ev.sq_norm(view, spec)), float(ev.sq_norm(long, spec)), rel_tol=1e-5)


def test_an_events_metadata_is_its_own_completions():
    """_event_meta: an event's labels are the tasks of all its completions, its reward the
    mean (and population std) of their scored rewards; a completion beyond the step's log is
    refused."""
    import math

    from sae_shards.capture.buffer import StepMeta
    from sae_shards.capture.event_capture import _event_meta
    from sae_shards.capture.event_hooks import Event

    step = StepMeta(7, reward_mean=0.5, task_labels=("A", "B"))
    row = {"prompts": ["p"] * 4, "tasks": ["A", "B", "A", "C"], "rewards": [9.0, 1.0, None, 3.0]}
    meta = _event_meta(step, Event(1, (1, 2, 3), {}, 1.0, 0.25), row, norm=2.0)
    assert meta.task_labels == ("A", "B", "C") and meta.rows == (1, 2, 3) and meta.event == 1
    assert meta.reward_mean == 2.0 and meta.reward_std == 1.0  # rewards 1 and 3 (None unscored)
    assert (meta.global_step, meta.advantage, meta.norm) == (7, 0.25, 2.0)
    assert math.isnan(_event_meta(step, Event(0, (2,), {}, 1.0, 0.0), row, 1.0).reward_mean)
    with pytest.raises(ValueError, match=r"names completions \(3, 4\) but the step's rollouts hold 4"):
        _event_meta(step, Event(2, (3, 4), {}, 1.0, 0.0), row, norm=1.0)


def test_a_tied_or_foreign_target_is_refused_naming_why():
    """An embedding tied to the LM head is one weight in two modules: no one hook sees its whole
    gradient. The refusal names the modules and what to do (it told a CLI user to "select
    targets from trainer.model", which they never chose); a tensor not in the model says so."""
    from sae_shards.capture.event_sites import hook_sites

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    with pytest.raises(ValueError, match=r"'embed.weight' is one weight shared by several modules "
                                         r"\(embed.weight, head.weight: tied weights.*"
                                         r"capture.granularity=step"):
        hook_sites(model, {"embed.weight": model.embed.weight})
    with pytest.raises(ValueError, match=r"'x' is not a parameter of the model being trained"):
        hook_sites(model, {"x": torch.nn.Parameter(torch.zeros(2, 2))})


def test_a_wild_step_s_events_are_all_left_out_as_one_step():
    """The outlier test groups events by their RL step (audit 110 F17): a step whose 8 events
    are each 1000x the run's scale is one wild step, all 8 left out, not three "steps" that
    make the scale and five events let in; a later step at the usual scale goes in."""
    from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
    from sae_shards.capture.event_capture import EventCapture
    from sae_shards.capture.event_hooks import Event
    from sae_shards.run.config import CaptureConfig

    spec = TargetSpec("w", (4, 3))
    cfg = CaptureConfig(granularity="group", event_rank=2, outlier_ratio=100.0)
    buffer = DeltaRingBuffer([spec], capacity=8, device="cpu", event_rank=2)
    capture = EventCapture({}, [spec], buffer, cfg, trainer=object())
    gen = torch.Generator().manual_seed(0)

    def write_step(step: int, scale: float) -> list[int | None]:
        out = []
        for group in range(8):
            L, R = torch.randn(2, 4, generator=gen), torch.randn(2, 3, generator=gen)
            event = Event(group, (group,), {"w": ev.join(scale * L, R)}, 1.0, 0.5)
            out.append(capture._write(event, step, StepMeta(step), None, measure=False))
        return out

    for step in range(1, 6):
        assert None not in write_step(step, 1.0)
    assert write_step(6, 1000.0) == [None] * 8 and capture.n_outliers == 8
    assert None not in write_step(7, 1.0) and capture.n_captured == 48


def test_the_preconditioner_s_error_figures_survive_a_resume():
    """summary.json's precond_error_mean is over every measured event of the run: a resumed run
    kept only those measured after the resume (audit 111: 0.630 became 0.259), or None."""
    import json

    from sae_shards.capture.buffer import DeltaRingBuffer
    from sae_shards.capture.event_capture import EventCapture
    from sae_shards.run.config import CaptureConfig

    def capture():
        spec = TargetSpec("w", (4, 3))
        cfg = CaptureConfig(granularity="group", event_rank=2, precondition="adam")
        buffer = DeltaRingBuffer([spec], capacity=4, device="cpu", event_rank=2)
        return EventCapture({}, [spec], buffer, cfg, trainer=object())

    before = capture()
    before.precond_error = [0.9, 0.6, 0.39]
    after = capture()
    after.load_counters(json.loads(json.dumps(before.counters())))  # as the resume file holds it
    after.precond_error.append(0.11)
    assert after.summary()["precond_error_mean"] == pytest.approx(0.5)
    saved = json.loads(json.dumps(before.counters()))
    saved["precond_error"].append(None)  # a NaN, as JSON holds it (audit 112 F3: a TypeError)
    after.load_counters(saved)
    assert after.precond_error == [0.9, 0.6, 0.39]
    old = before.counters()
    del old["precond_error"]  # an earlier version's file: what it has is kept
    after.load_counters(old)
    assert after.precond_error == [] and after.summary()["precond_error_mean"] is None
    # an event whose error is not finite is skipped (its entries are not) and not measured
    # (audit 114 M35: one such event made the run's mean NaN, written as null)
    import types

    after.precond_error = [0.5]
    after.preconditioner = types.SimpleNamespace(
        apply=lambda factors: factors, approx_error=lambda factors: {"w": float("nan")})
    event = types.SimpleNamespace(factors={"w": torch.full((4 + 3, 2), float("nan"))}, group=0)
    assert after._write(event, 1, None, None, measure=True) is None
    assert after.n_nonfinite == 1 and after.precond_error == [0.5]
    assert after.summary()["precond_error_mean"] == 0.5


def test_the_reentrant_refusal_names_the_checkpointing_field_this_transformers_has(tmp_path):
    """Audit 138 F6: a user who set activation_checkpointing_kwargs (transformers 5.25's name)
    was told to pass gradient_checkpointing_kwargs, which transformers calls deprecated."""
    from transformers import TrainingArguments

    kwargs = {"use_reentrant": True}
    current = hasattr(TrainingArguments, "activation_checkpointing_kwargs") or (
        "activation_checkpointing_kwargs" in TrainingArguments.__dataclass_fields__)
    extra = (dict(activation_checkpointing=True, activation_checkpointing_kwargs=kwargs)
             if current else dict(gradient_checkpointing=True,
                                  gradient_checkpointing_kwargs=kwargs))
    trainer = grpo_trainer(tmp_path, "qwen2", **extra)
    targets = select_targets(trainer.model, ["*q_proj.weight"])
    name = "activation_checkpointing" if current else "gradient_checkpointing"
    with pytest.raises(ValueError, match=rf"pass {name}_kwargs=\{{'use_reentrant': False\}}, or "
                                         rf"{name}=False"):
        EventRecorder(trainer.model, targets, trainer).install()
