"""The memory a policy's first training step allocates (gradients, optimizer state), estimated
when the capture sizes its buffer and SAE, against what a real Trainer's first step allocated."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from sae_shards.capture.policy_memory import pending_policy_memory, size
from sae_shards.recipe.models import build_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


class _Measure(TrainerCallback):
    """Estimates at on_train_begin; at the first on_optimizer_step (the step done, gradients
    not yet cleared) the bytes of gradients and optimizer state that exist."""

    def __init__(self, model):
        self.model, self.trainer = model, None
        self.at_begin = self.grads = self.state = self.state_at_begin = self.after = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_begin = pending_policy_memory(self.model, self.trainer, "cpu")
        self.state_at_begin = self._state()  # Adagrad makes its state when it is built

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.grads is not None:
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
        self.state = self._state()

    def _state(self) -> int:
        return sum(v.numel() * v.element_size() for s in self.trainer.optimizer.state.values()
                   for v in s.values() if torch.is_tensor(v) and v.ndim > 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.after is None:  # the state exists now; the gradients were set to None
            self.after = pending_policy_memory(self.model, self.trainer, "cpu")


def _trainer(tiny_model, out_dir, optim: str, lora: bool):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ids = tok(["abcabc" * 4] * 8)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(out_dir), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, use_cpu=True, report_to="none",
                             save_strategy="no", disable_tqdm=True, optim=optim)
    measure = _Measure(model)
    trainer = Trainer(model=model, args=args, callbacks=[measure],
                      train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    measure.trainer = trainer
    return trainer, measure


@pytest.mark.parametrize("optim,lora", [("adamw_torch", False), ("adamw_torch_fused", True),
                                        ("adagrad", False), ("sgd", False)])
def test_the_estimate_is_what_the_first_step_allocates(tiny_model, tmp_path, optim, lora):
    """Before training (no optimizer yet: from ``args.optim``) the estimate equals the gradients
    and state the first step allocated, to the byte; at on_train_begin (the optimizer built) it
    leaves out the state that exists already (Adagrad's); LoRA counts the adapters alone. After
    the step no state is pending."""
    trainer, measure = _trainer(tiny_model, tmp_path, optim, lora)
    before = pending_policy_memory(trainer.model, trainer, "cpu")
    assert trainer.optimizer is None and before.optimizer == optim
    trainer.train()
    got = measure.at_begin
    assert got.optimizer == type(trainer.optimizer.optimizer).__name__  # inside accelerate's
    assert measure.grads > 0 and (measure.state > 0) == (optim != "sgd")  # sgd: no momentum
    assert (before.gradients, before.optimizer_state) == (measure.grads, measure.state)
    assert (got.gradients, got.optimizer_state) == (measure.grads,
                                                    measure.state - measure.state_at_begin)
    assert (measure.state_at_begin > 0) == (optim == "adagrad")  # only what is not there counts
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    assert measure.grads == 4 * trainable and (trainable < total / 10) == lora
    assert measure.after.optimizer_state == 0


def test_what_it_cannot_estimate_adds_nothing():
    """A lower bound: no trainer counts the gradients alone, an optimizer it does not know adds no
    state, parameters on another device and frozen ones count nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    alone = pending_policy_memory(model, None, "cpu")
    assert (alone.gradients, alone.optimizer_state) == (4 * (8 * 4 + 4), 0)

    class Unknown(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

    class Holder:
        optimizer = Unknown(model.parameters())

    assert pending_policy_memory(model, Holder(), "cpu").optimizer_state == 0
    Holder.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert pending_policy_memory(model, Holder(), "cpu").optimizer_state == 2 * 4 * (8 * 4 + 4)
    assert pending_policy_memory(model, Holder(), "meta").total == 0


def test_the_capture_sizes_itself_without_what_the_first_step_will_take(tiny_model, tmp_path):
    """A buffer too large for free memory is refused at the start, and the refusal says that free
    memory was counted less the gradients and AdamW state the policy's first step allocates
    (before, the check read free memory as if they would never exist)."""
    from sae_shards import ShardCallback

    trainer, _ = _trainer(tiny_model, tmp_path / "trl", "adamw_torch", lora=False)
    expected = pending_policy_memory(trainer.model, trainer, "cpu")  # from args.optim
    trainer.add_callback(ShardCallback(run_dir=tmp_path / "run", record_rollouts=False,
                                       runner={"min_samples": 2}, capture={"capacity": 10**7}))
    with pytest.raises(ValueError, match=r"capture.capacity") as err:
        trainer.train()
    assert expected.total > 0 and expected.optimizer == "adamw_torch"
    said = (f"Free memory was counted less what the policy's first training step will "
            f"allocate: {size(expected.total)} (gradients {size(expected.gradients)}, AdamW "
            f"state {size(expected.optimizer_state)}).")
    assert said in str(err.value)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_pending_memory_counts_only_gradients_not_yet_allocated():
    """A parameter that already holds a gradient (a model trained before in the script)
    allocates none in the first step (audit 128 PM01)."""
    model = torch.nn.Linear(8, 4)
    model.weight.grad = torch.zeros_like(model.weight)  # e.g. a model trained before in the script
    pending = pending_policy_memory(model, None, "cpu")
    assert pending.gradients == model.bias.numel() * 4
