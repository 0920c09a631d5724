"""Capture sources ``precond`` and ``deconv`` in real transformers.Trainer runs (tiny LM, CPU).

``precond`` is checked against Adam's preconditioned gradient recomputed (float64) from the
clipped gradient and the optimizer state. ``deconv`` is checked against the same inversion done
with Adam's moments (exact up to fp32 rounding of the weights), against ``precond`` (which it
estimates), and against the clipped gradient under SGD with momentum (where it is exact).
"""

import pytest
import torch
from helpers import PATTERNS, captured_in_order, lora_model, make_buffer, tiny_lm, token_data
from transformers import Trainer, TrainerCallback, TrainingArguments

from sae_shards.capture.buffer import StepMeta
from sae_shards.capture.delta import DeltaCapture
from sae_shards.capture.selection import select_targets
from sae_shards.capture.step_rules import deconv_leading_loss


def train(model, callbacks, tmp_path, max_steps=4, optimizers=(None, None), **kw) -> Trainer:
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=max_steps,
        per_device_train_batch_size=2, learning_rate=1e-2, optim="adamw_torch", logging_steps=1,
        save_strategy="no", lr_scheduler_type="constant", seed=0, disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **kw})
    trainer = Trainer(model=model, args=args, train_dataset=token_data(), callbacks=callbacks,
                      optimizers=optimizers)
    trainer.train()
    return trainer


class GradTruth(TrainerCallback):
    """Independent float64 record per step of the clipped gradient the optimizer consumes (and
    of the largest |weight| of each target before the step)."""

    def __init__(self, params):
        self.params = dict(params)
        self.grads, self.theta_max = [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # after clipping
        self.grads.append({n: p.grad.double().clone() for n, p in self.params.items()})
        self.theta_max.append({n: float(p.detach().abs().max()) for n, p in self.params.items()})


class AdamTruth(GradTruth):
    """Also, from the optimizer's state after its step (float64): ``precond``
    ``g_t / P_t`` with ``P_t = sqrt(v_t / (1 - beta2^t)) + eps``, and what ``deconv`` must give,
    ``(m_t / P_t - beta1 m_{t-1} / P_{t-1}) / (1 - beta1)``."""

    def __init__(self, params):
        super().__init__(params)
        self.precond, self.deconv = [], []
        self._m_over_p = {}  # m_{t-1} / P_{t-1}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        adam = optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
        assert isinstance(adam, torch.optim.AdamW)
        precond, deconv = {}, {}
        for name, p in self.params.items():
            group = next(g for g in adam.param_groups if any(q is p for q in g["params"]))
            (beta1, beta2), eps, s = group["betas"], group["eps"], adam.state[p]
            denom = (s["exp_avg_sq"].double() / (1 - beta2 ** int(s["step"]))).sqrt() + eps
            precond[name] = self.grads[-1][name] / denom
            m_over_p = s["exp_avg"].double() / denom
            deconv[name] = (m_over_p - beta1 * self._m_over_p.get(name, 0)) / (1 - beta1)
            self._m_over_p[name] = m_over_p
        self.precond.append(precond)
        self.deconv.append(deconv)


class ZeroGrads(TrainerCallback):
    """Zero every gradient before the optimizer of step ``step`` (as when all rewards are equal)."""

    def __init__(self, model, step):
        self.model, self.step = model, step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            for p in self.model.parameters():
                p.grad.zero_()


def cosine(x: dict, y: dict) -> float:
    """Cosine over all targets together, in float64."""
    a = torch.cat([v.double().flatten() for v in x.values()])
    b = torch.cat([y[n].double().flatten() for n in x])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_precond_equals_adam_state_recomputation(tmp_path, grad_accum):
    model = tiny_lm()
    targets = select_targets(model, PATTERNS)  # model.norm.weight sits in the no-decay group
    fp32, bf16 = make_buffer(targets), make_buffer(targets, dtype=torch.bfloat16)
    capture = DeltaCapture(targets, fp32, source="precond")
    truth = AdamTruth(targets)
    trainer = train(
        model, [ZeroGrads(model, step=3), truth, capture,
                DeltaCapture(targets, bf16, source="precond")],
        tmp_path, gradient_accumulation_steps=grad_accum, max_grad_norm=1e-2, weight_decay=0.1,
    )
    pre_clip = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert min(h for h in pre_clip if h > 0) > 1e-1  # clipping was active
    samples, steps = captured_in_order(fp32)
    assert steps == [1, 2, 3, 4] and capture.n_captured == 4
    for t, (sample, want) in enumerate(zip(samples, truth.precond)):
        for name, got in sample.items():
            torch.testing.assert_close(got.double(), want[name], rtol=1e-6, atol=0)
            if t != 2:  # not simply the gradient, nor zero
                g = truth.grads[t][name]
                assert (got.double() - g).abs().max() > 0.5 * g.abs().max(), (t, name)
    assert all(bool((x == 0).all()) for x in samples[2].values())  # step 3 had zero gradients
    assert capture.n_zero == 1
    for sample, rounded in zip(samples, captured_in_order(bf16)[0]):  # fp32 scratch path
        for name, got in rounded.items():
            assert torch.equal(got, sample[name].to(torch.bfloat16).float()), name


def test_deconv_estimates_precond_under_adamw_schedule(tmp_path):
    model = tiny_lm()
    targets = select_targets(model, PATTERNS)
    sources = ("precond", "deconv", "update")
    n = 40
    buffers = {s: make_buffer(targets, n) for s in sources}
    captures = {s: DeltaCapture(targets, buffers[s], source=s) for s in sources}
    truth = AdamTruth(targets)
    # linear warmup from lr 0 (step 1 moves nothing, step 2 has no previous update), then decay
    trainer = train(model, [truth, *captures.values()], tmp_path, max_steps=n,
                    learning_rate=3e-3, lr_scheduler_type="linear", warmup_steps=2,
                    weight_decay=0.1)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[0] == 0.0 and len(lrs) == n and all(a != b for a, b in zip(lrs, lrs[1:]))
    precond, p_steps = captured_in_order(buffers["precond"])
    deconv, d_steps = captured_in_order(buffers["deconv"])
    update, _ = captured_in_order(buffers["update"])
    assert p_steps == list(range(1, n + 1)) and d_steps == list(range(3, n + 1))
    assert captures["deconv"].n_skipped == 2
    beta1, eps = 0.9, torch.finfo(torch.float32).eps
    for sample, t in zip(deconv, d_steps):  # the inversion itself, against Adam's state
        alpha, beta = (1 - beta1**t) / (1 - beta1), beta1 * (1 - beta1 ** (t - 1)) / (1 - beta1)
        for name, got in sample.items():
            # only fp32 rounding of the weights after each step, divided by that step's lr
            theta = truth.theta_max[t - 1][name]
            tol = 2 * eps * theta * (alpha / lrs[t - 1] + beta / lrs[t - 2])
            err = (got.double() - truth.deconv[t - 1][name]).abs().max()
            assert err < tol, (t, name, float(err), tol)
    # Against precond it is an estimate, exact only while P_t = P_{t-1}. Early on Adam's bias-
    # corrected v is a running mean over t steps, so P moves by ~1/t per step: cosine ~0.94 at
    # t = 3, above 0.99 once t >= 30 on this run.
    cosines = {step: cosine(d, precond[step - 1]) for d, step in zip(deconv, d_steps)}
    raw = [-cosine(update[step - 1], precond[step - 1]) for step in d_steps]
    late = [c for step, c in cosines.items() if step >= 30]
    low, mean = min(cosines.values()), sum(cosines.values()) / len(cosines)
    print(f"deconv vs precond cosine: min {low:.4f} (t >= 30: {min(late):.4f}) mean {mean:.4f}; "
          f"-update vs precond: min {min(raw):.3f}")
    assert min(late) > 0.99 and low > 0.9, cosines
    assert min(raw) < 0.7  # the momentum really made the update differ from precond


def test_deconv_recovers_sgd_momentum_gradient_exactly(tmp_path):
    model = tiny_lm()
    targets = select_targets(model, PATTERNS)
    lr, mu = 0.1, 0.9
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=mu, weight_decay=0.05)
    factor = lambda step: 1 / (1 + 0.3 * step)  # noqa: E731  (the lr changes every step)
    schedule = torch.optim.lr_scheduler.LambdaLR(sgd, factor)
    fp32, bf16 = make_buffer(targets), make_buffer(targets, dtype=torch.bfloat16)
    capture = DeltaCapture(targets, fp32, source="deconv")
    truth = GradTruth(targets)
    train(model, [truth, capture, DeltaCapture(targets, bf16, source="deconv")], tmp_path,
          max_steps=6, optimizers=(sgd, schedule), max_grad_norm=1.0)
    samples, steps = captured_in_order(fp32)
    assert steps == list(range(1, 7)) and capture.n_skipped == 0
    eps = torch.finfo(torch.float32).eps
    for t, sample in enumerate(samples):
        for name, got in sample.items():
            g = truth.grads[t][name]
            # only fp32 rounding of the weights after each step, divided by that step's lr
            theta = truth.theta_max[t][name]
            tol = eps * theta * (1 / (lr * factor(t)) + (mu / (lr * factor(t - 1)) if t else 0))
            err = (got.double() - g).abs().max()
            assert err < tol, (t, name, float(err), tol)
            assert g.abs().max() > 100 * tol  # so the bound means something
    for sample, rounded in zip(samples, captured_in_order(bf16)[0]):  # fp32 scratch path
        for name, got in rounded.items():
            assert torch.equal(got, sample[name].to(torch.bfloat16).float()), name


class SkipStep(TrainerCallback):
    """Undoes optimizer step ``step`` before the capture reads it, weights and momentum, as a
    GradScaler that found an inf leaves them (fp16 loss scaling; it needs a GPU to happen)."""

    def __init__(self, model, sgd, step):
        self.model, self.sgd, self.step, self.saved = model, sgd, step, None

    @torch.no_grad()
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.saved = ([p.clone() for p in self.model.parameters()],
                          {p: s["momentum_buffer"].clone() for p, s in self.sgd.state.items()})

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        if self.saved is not None:
            weights, momenta = self.saved
            for p, w in zip(self.model.parameters(), weights):
                p.copy_(w)
            for p, m in momenta.items():
                self.sgd.state[p]["momentum_buffer"].copy_(m)
            self.saved = None


def test_deconv_skips_a_step_the_optimizer_skipped_and_the_one_after(tmp_path, caplog):
    """A step that changed no weight is no step of the optimizer's rule: inverting it gave a
    sample of norm ~ the others' for a step that did nothing, and a wrong one after it."""
    import logging

    model = tiny_lm()
    targets = select_targets(model, PATTERNS)
    lr, mu = 0.1, 0.9
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=mu)
    schedule = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)
    buffer = make_buffer(targets)
    capture = DeltaCapture(targets, buffer, source="deconv")
    truth = GradTruth(targets)
    with caplog.at_level(logging.WARNING, logger="sae_shards.capture.delta"):
        train(model, [truth, SkipStep(model, sgd, 3), capture], tmp_path, max_steps=6,
              optimizers=(sgd, schedule), max_grad_norm=1.0)
    samples, steps = captured_in_order(buffer)
    assert steps == [1, 2, 5, 6] and capture.n_skipped == 2
    assert "step 3: no deconv sample (no weight changed: the optimizer skipped" in caplog.text
    assert "step 4: no deconv sample (the previous update is unknown" in caplog.text
    eps = torch.finfo(torch.float32).eps
    for sample, t in zip(samples, steps):  # still the gradient, exactly, after the skip
        for name, got in sample.items():
            g, theta = truth.grads[t - 1][name], truth.theta_max[t - 1][name]
            assert (got.double() - g).abs().max() < eps * theta * (1 + mu) / lr, (t, name)


@pytest.mark.parametrize("source,make,message", [
    ("precond", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
     r"'precond' needs torch.optim.Adam/AdamW, but .* is torch\.optim\.sgd\.SGD"),
    ("deconv", lambda ps: torch.optim.RMSprop(ps, lr=0.1),
     r"'deconv' needs torch.optim.Adam/AdamW or torch.optim.SGD, but .*RMSprop"),
    ("precond", lambda ps: torch.optim.AdamW(ps, amsgrad=True), r"AdamW with amsgrad"),
    ("deconv", lambda ps: torch.optim.Adam(ps, weight_decay=0.1), r"Adam with L2 weight_decay"),
    ("deconv", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
])
def test_unsupported_optimizer_is_named(tmp_path, source, make, message):
    model = tiny_lm()
    targets = select_targets(model, PATTERNS[:1])
    optimizer = make(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    capture = DeltaCapture(targets, make_buffer(targets), source=source)
    with pytest.raises(ValueError, match=message):
        train(model, [capture], tmp_path, optimizers=(optimizer, schedule))


@pytest.mark.parametrize("source", ["precond", "deconv"])
def test_lora_rejects_optimizer_sources(source):
    targets = select_targets(lora_model(), ["*q_proj.weight"])
    with pytest.raises(ValueError, match=f"source='{source}' is not supported for LoRA"):
        DeltaCapture(targets, make_buffer(targets), source=source)


def _w_and_b() -> tuple[torch.nn.Module, torch.Generator]:
    """A module of two parameters, ``w [5, 6]`` and ``b [11]``, and the generator that drew
    them, for its gradients."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(5, 6, generator=gen))
    model.b = torch.nn.Parameter(torch.randn(11, generator=gen))
    return model, gen


def test_a_target_without_a_gradient_this_step_is_zero_not_an_older_sample(tmp_path):
    """``grad``: a target no gradient reached this step (grad None: transformers zeroes
    gradients to None, and a layer or expert may go unused) is written as zeros, not left
    holding the sample the reused ring slot held before."""
    from transformers import TrainerControl, TrainerState

    model, gen = _w_and_b()
    targets = dict(model.named_parameters())
    buffer = make_buffer(targets, capacity=1)  # every step reuses slot 0
    capture = DeltaCapture(targets, buffer, source="grad")
    args, state, control = TrainingArguments(tmp_path, report_to=[]), TrainerState(), TrainerControl()
    capture.on_train_begin(args, state, control, model=model)
    for step, with_b in ((1, True), (2, False)):
        model.w.grad = torch.randn(5, 6, generator=gen)
        model.b.grad = torch.randn(11, generator=gen) if with_b else None
        capture.on_step_begin(args, state, control)
        capture.on_pre_optimizer_step(args, state, control)
        capture.on_optimizer_step(args, state, control)
        state.global_step = step
        capture.on_step_end(args, state, control)
        got = buffer.gather([0])
        assert torch.equal(got["w"][0], model.w.grad)
        assert torch.equal(got["b"][0], model.b.grad if with_b else torch.zeros(11)), step


def test_adams_step_counts_are_read_together():
    """``precond`` reads every target's Adam step count each step: plain floats as they are,
    tensors (fused Adam keeps them on the parameter's device) in one read per device (audit 108
    F4: one host sync per target per step on a GPU), each name keeping its own count."""
    from sae_shards.capture.delta import steps_on_host

    got = steps_on_host({"a": 3.0, "b": torch.tensor(4.0), "c": torch.tensor(7.0),
                         "d": torch.tensor(2.0, dtype=torch.float64)})
    assert got == {"a": 3.0, "b": 4.0, "c": 7.0, "d": 2.0}
    assert steps_on_host({}) == {}


# ---- found by mutation testing (audit 121): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

def test_precond_target_without_adam_state_is_zero_in_a_bf16_slot(tmp_path):
    """D17: ``precond``, bf16 storage (the gradient is kept in an fp32 scratch, not in the slot):
    a target Adam holds no state for (no gradient ever reached it) is written as zeros, not left
    holding the sample the reused ring slot held before."""
    from transformers import TrainerControl, TrainerState

    model, gen = _w_and_b()
    targets = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    buffer = make_buffer(targets, capacity=1, dtype=torch.bfloat16)  # every step reuses slot 0
    buffer.push({"w": torch.ones(5, 6), "b": torch.ones(11)}, StepMeta(0))  # an older sample
    capture = DeltaCapture(targets, buffer, source="precond")
    args, state, control = TrainingArguments(tmp_path, report_to=[]), TrainerState(), TrainerControl()
    capture.on_train_begin(args, state, control, model=model, optimizer=opt)
    model.w.grad = torch.randn(5, 6, generator=gen)
    model.b.grad = None  # no gradient reached b: AdamW keeps no state for it
    capture.on_step_begin(args, state, control)
    capture.on_pre_optimizer_step(args, state, control)
    opt.step()
    assert not opt.state.get(model.b)
    capture.on_optimizer_step(args, state, control)
    state.global_step = 1
    capture.on_step_end(args, state, control)
    got = buffer.gather([0])
    assert torch.equal(got["b"][0], torch.zeros(11))
    assert got["w"][0].abs().max() > 0


@pytest.mark.parametrize("option, said", [
    (dict(momentum=0.9, dampening=0.5), "dampening != 0"),
    (dict(momentum=0.9, nesterov=True), "nesterov=True"),
    (dict(momentum=0.9, maximize=True), "maximize=True"),
])
def test_deconv_refuses_sgd_options_it_cannot_invert(option, said):
    """SR07: ``deconv`` inverts torch's SGD momentum only without dampening (and Nesterov, and
    maximize): such a param group is refused by name, not inverted into wrong samples."""
    from sae_shards.capture.step_rules import step_rule

    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = torch.optim.SGD([p], lr=0.1, **option)
    with pytest.raises(ValueError, match=said):
        step_rule(opt, {"w": p}, "deconv")


@pytest.mark.parametrize("make, warmup, lost", [
    (lambda p: torch.optim.AdamW(p, lr=1e-3), 2, 2),
    (lambda p: torch.optim.AdamW(p, lr=1e-3), 0, 0),
    (lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9), 3, 2),
    (lambda p: torch.optim.SGD(p, lr=1e-3), 3, 1),
])
def test_deconv_counts_the_first_steps_a_warmup_from_zero_loses(make, warmup, lost):
    """Read from the learning rate the scheduler set before step 1, as at on_train_begin: a
    warmup from 0 loses step 1 and, with momentum, step 2 (whose previous update is unknown)."""
    from transformers import get_scheduler

    optimizer = make([torch.nn.Parameter(torch.ones(3))])
    get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=10)
    n, why = deconv_leading_loss(optimizer)
    assert n == lost and (why.startswith(f"capture.source='deconv' cannot invert the first {lost}")
                          if lost else why == "")
