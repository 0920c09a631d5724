"""TRL wiring: a short real GRPO/RLOO run on a tiny model; each optimizer step's rollouts are read
back from TRL's completion log (``capture.rollouts``), as ``ShardCallback`` reads them."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from sae_shards.capture.rollouts import TRLRollouts
from sae_shards.recipe.models import build_tiny_model, load_model_and_tokenizer
from sae_shards.recipe.tasks import build_task
from sae_shards.recipe.trainers import (DEFAULT_GRPO, build_trainer, check_lora_modules,
                                         trl_config)

# Small and fast: 2 prompts x 4 generations per step, 8-token completions.
FAST = dict(max_steps=4, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
            disable_tqdm=True)


class StepProbe(TrainerCallback):
    """Reads the step's rollouts at every step end, as ``ShardCallback`` does."""

    def __init__(self) -> None:
        self.rollouts: TRLRollouts | None = None
        self.events: list[tuple[str, int]] = []
        self.read: list = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.events.append(("begin", state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("end", state.global_step))
        self.read.append(self.rollouts.read(state.global_step))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    return path, load_model_and_tokenizer(path).tokenizer


def _trainer(tiny, tmp_path, algorithm="grpo", trainable=None, **overrides):
    path, tokenizer = tiny
    task = build_task("letters", target_length=FAST["max_completion_length"])
    probe = StepProbe()
    trainer = build_trainer(path, tokenizer, task, task.dataset(64, seed=0),
                            {**FAST, **overrides}, [probe], tmp_path / "out", algorithm=algorithm,
                            trainable=trainable)
    probe.rollouts = TRLRollouts(trainer)
    return trainer, probe


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_short_run_reads_one_batch_per_step(tiny, tmp_path, algorithm):
    trainer, probe = _trainer(tiny, tmp_path, algorithm)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    steps = FAST["max_steps"]
    # on_step_begin/on_step_end fire once per optimizer step, and the rollouts of step t are
    # generated and scored between them (gradient_accumulation_steps = steps_per_generation = 1).
    assert probe.events == [e for t in range(steps) for e in (("begin", t), ("end", t + 1))]
    n, g = FAST["per_device_train_batch_size"], FAST["num_generations"]
    completions = []
    for t, got in enumerate(probe.read, start=1):
        row = got.row
        assert row["step"] == t and list(row["reward_funcs"]) == ["char_class_reward"]
        assert len(row["prompts"]) == len(row["completions"]) == len(row["rewards"]) == n
        assert row["tasks"] == ["letters"] * n and got.labels == ("letters",)
        assert row["rewards"] == row["reward_funcs"]["char_class_reward"]  # one function, weight 1
        assert all(0.0 <= r <= 1.0 for r in row["rewards"])
        assert got.reward_mean == pytest.approx(sum(row["rewards"]) / n)
        # groups: each prompt appears num_generations times in a row; advantages sum to ~0
        assert all(len(set(row["prompts"][i:i + g])) == 1 for i in range(0, n, g))
        assert all(abs(sum(row["advantages"][i:i + g])) < 1e-4 for i in range(0, n, g))
        completions.append(row["completions"])
    assert len({tuple(c) for c in completions}) == steps  # a fresh generation every step
    logged = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logged) == steps  # logging_steps=1
    assert [h["reward"] for h in logged] == pytest.approx([r.reward_mean for r in probe.read])
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_beta_builds_reference_model_from_path(tiny, tmp_path):
    trainer, _ = _trainer(tiny, tmp_path, beta=0.04)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    for p, r in zip(trainer.model.parameters(), trainer.ref_model.parameters()):
        assert torch.equal(p, r) and p.data_ptr() != r.data_ptr()  # a copy loaded from the path


def test_config_is_cpu_fp32_and_quiet(tmp_path):
    args = trl_config({}, tmp_path)
    if not torch.cuda.is_available():
        assert args.use_cpu and not args.bf16
    assert args.report_to in ([], "none", ["none"]) and args.save_strategy == "no"
    assert args.logging_steps == 1 and args.learning_rate == DEFAULT_GRPO["learning_rate"]
    assert args.steps_per_generation == 1
    assert not args.activation_checkpointing  # off by default on this recipe
    # asked for under either name, it is on (the default under the new name does not win)
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        assert trl_config({name: True}, tmp_path).activation_checkpointing, name
    if not torch.cuda.is_available():  # bf16 autocast only when asked; fp16 named, refused
        assert trl_config({"bf16": True}, tmp_path).bf16
        with pytest.raises(ValueError, match=r"rl.extra.fp16=true needs a GPU.* rl.extra.bf16=true"):
            trl_config({"fp16": True}, tmp_path)


def test_trl_values_are_checked_for_a_new_run_and_a_resume_keeps_its_own():
    """A new run's rl.extra values are checked against TRL's config class (audit 143 F11); a
    resume continues with the values its run recorded, which an earlier version took (audit 144
    F6: a run started with num_train_epochs could not be resumed)."""
    from sae_shards.recipe.trainers import check_trl_settings

    for settings in ({"num_train_epochs": 3}, {"logging_first_step": 1}):
        with pytest.raises(ValueError, match=r"rl.extra\."):
            check_trl_settings(settings)
        check_trl_settings(settings, new_run=False)


def test_config_errors_name_the_key(tmp_path):
    # the closest field named as it is set (audit 115 F1; audit 116 U1: rl's own are rl.<name>)
    with pytest.raises(ValueError, match=r"\['rl.extra.learning_rat \(did you mean "
                                         r"rl.learning_rate\?\)'\] are not trl.GRPOConfig fields"):
        trl_config({"learning_rat": 1e-3}, tmp_path)
    with pytest.raises(ValueError, match=r"\['rl.extra.num_iteration \(did you mean "
                                         r"rl.extra.num_iterations\?\)'\]"):
        trl_config({"num_iteration": 2}, tmp_path)
    with pytest.raises(ValueError, match=r"rl.report_to='wandb'.*remove the key"):
        trl_config({"report_to": "wandb"}, tmp_path)


def test_missing_model_path_is_named(tiny, tmp_path):
    _, tokenizer = tiny
    task = build_task("letters")
    with pytest.raises(FileNotFoundError, match="nowhere has no config.json"):
        build_trainer(tmp_path / "nowhere", tokenizer, task, task.dataset(4), {}, [],
                      tmp_path / "out")


def test_lora_run_trains_adapters_only(tiny, tmp_path):
    from peft import LoraConfig

    path, tokenizer = tiny
    task = build_task("letters", target_length=FAST["max_completion_length"])
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    trainer = build_trainer(
        path, tokenizer, task, task.dataset(32), {**FAST, "max_steps": 2, "beta": 0.04},
        [], tmp_path / "out", peft_config=lora,
    )
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert trainer.ref_model is None  # TRL disables the adapter to get reference logprobs
    trainer.train()
    assert trainer.state.global_step == 2


def test_lora_target_modules_capture_cannot_follow_are_refused(tmp_path):
    """A name the model lacks beside one it has (peft would adapt the other alone), and a
    GPT-2 Conv1D layer (peft's fan_in_fan_out, which capture does not follow): refused before
    the model loads, naming the field and the layers the model has."""
    gpt2 = build_tiny_model(tmp_path / "gpt2", arch="gpt2")
    with pytest.raises(ValueError, match=r"target_modules=\['c_attn'\]: \['c_attn'\] are Conv1D "
                                         r"layers .*model.lora.enabled=false"):
        check_lora_modules(gpt2, ["c_attn"])
    with pytest.raises(ValueError, match=r"\['q_proj'\] name no linear layer .* no other linear layer .*Conv1D "
                                         r"layers \['c_attn', 'c_fc', 'c_proj'\]"):
        check_lora_modules(gpt2, ["q_proj"])
    qwen = build_tiny_model(tmp_path / "qwen", arch="qwen2")
    with pytest.raises(ValueError, match=r"\['foo'\] name no linear layer of .*'q_proj'"):
        check_lora_modules(qwen, ["q_proj", "foo"])
    check_lora_modules(qwen, ["q_proj", "self_attn.v_proj"])  # peft's suffix match
    # peft's all-linear shorthand: any family's linear layers, without typing their names; on
    # GPT-2 it would adapt the Conv1D layers, which capture cannot follow
    check_lora_modules(qwen, ["all-linear"])
    with pytest.raises(ValueError, match=r"target_modules=\['all-linear'\]: \['c_attn', "
                                         r"'c_fc', 'c_proj'\] are Conv1D layers"):
        check_lora_modules(gpt2, ["all-linear"])


def test_all_linear_lora_reaches_peft_and_its_adapted_layers_are_the_targets():
    """``model.lora.target_modules=[all-linear]`` is handed to peft as its shorthand (a string;
    as a list it would be a module named 'all-linear'), and the job's meta policy, adapted by
    peft, resolves every block matrix as a capture target."""
    from hydra import compose, initialize_config_dir

    from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
    from sae_shards.run.job import _peft_config, check_recipe

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "model=tiny_lora", "model.lora.target_modules=[all-linear]", "logging=disabled"]))
    assert _peft_config(cfg).target_modules == "all-linear"
    check_recipe(cfg)  # the default targets (every block matrix) are all adapted


def test_lora_on_a_mixture_of_experts_says_the_experts_stay_frozen(tmp_path, caplog):
    """The experts' stacked tensors are no linear layers: naming their projections is refused
    with that said, and an accepted setting warns that RL changes no expert."""
    moe = build_tiny_model(tmp_path / "moe", arch="qwen3_moe")
    with pytest.raises(ValueError, match=r"\['down_proj'\] name no linear layer .*its 4 stacked "
                                         r"expert tensors .*LoRA leaves them frozen"):
        check_lora_modules(moe, ["down_proj"])
    with caplog.at_level("WARNING", logger="sae_shards.recipe.trainers"):
        check_lora_modules(moe, ["q_proj"])
    assert "RL changes no expert" in caplog.text and "experts.gate_up_proj" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sae_shards.recipe.trainers"):
        check_lora_modules(build_tiny_model(tmp_path / "qwen", arch="qwen2"), ["q_proj"])
    assert "expert" not in caplog.text


# ---------------------------------------------------------------------------- rl.trainable
BODY = ["model.layers.*"]


def test_trainable_freezes_everything_else_and_it_stays_put(tiny, tmp_path):
    trainer, _ = _trainer(tiny, tmp_path, trainable=BODY, max_steps=2, learning_rate=1e-3)
    params = dict(trainer.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if n.startswith("model.layers.")}
    frozen = set(params) - trainable
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= frozen
    before = {n: p.detach().clone() for n, p in params.items()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.equal(params[n], before[n]) for n in frozen)  # bit for bit
    moved = [n for n in trainable if not torch.equal(params[n], before[n])]
    assert len(moved) == len(trainable)  # every body matrix and norm took the RL steps
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(params[n]) for n in trainable}


def test_trainable_patterns_are_checked_against_the_model(tiny, tmp_path):
    from sae_shards.recipe.trainers import freeze_except

    with pytest.raises(ValueError, match=r"rl.trainable pattern 'model.blocks.\*' matches no "
                                         r"parameter of .*named like model.embed_tokens.weight"):
        _trainer(tiny, tmp_path, trainable=[*BODY, "model.blocks.*"])
    with pytest.raises(ValueError, match="rl.trainable is empty"):
        freeze_except(torch.nn.Linear(2, 2), [])
    layer = torch.nn.Linear(2, 2)
    assert freeze_except(layer, None) == ["weight", "bias"] and layer.bias.requires_grad
    assert freeze_except(layer, ["w*"]) == ["weight"] and not layer.bias.requires_grad


def test_trainable_is_not_for_lora(tiny, tmp_path):
    from peft import LoraConfig

    path, tokenizer = tiny
    task = build_task("letters", target_length=FAST["max_completion_length"])
    with pytest.raises(ValueError, match="rl.trainable cannot be combined with model.lora"):
        build_trainer(path, tokenizer, task, task.dataset(8), FAST, [], tmp_path / "out",
                      peft_config=LoraConfig(r=2, target_modules=["q_proj"]), trainable=BODY)


# ---- found by mutation testing (audit 121): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

class _FakeTRL:
    """Holds ``_logs`` as TRL's GRPOTrainer does (here a plain, ever-growing list per column) and
    a ``_generate_and_score_completions`` that logs one generation of ``inputs`` (numbers)."""

    def __init__(self, processes: int = 1, log_extra: bool = False) -> None:
        import types

        self._logs = {"prompt": [], "completion": [], "rewards": {"f": [], "g": []},
                      "advantages": [], "extra": {}}
        self.reward_func_names = ["f", "g"]
        self.reward_weights = torch.tensor([1.0, 2.0])
        self.model = types.SimpleNamespace(training=True)
        self.accelerator = types.SimpleNamespace(num_processes=processes)
        self.processes = processes
        self.extra_per_call: dict[str, list] | None = None
        if log_extra:
            self._log_completion_extra = self._log_extra

    def _log_extra(self, column, values):
        self._logs["extra"].setdefault(column, []).extend(values)

    def _generate_and_score_completions(self, inputs, f=None, g=None, extra=None):
        rows = [x for _ in range(self.processes) for x in inputs]  # gathered from every process
        self._logs["prompt"] += [f"p{x}" for x in rows]
        self._logs["completion"] += [f"c{x}" for x in rows]
        self._logs["rewards"]["f"] += list(f) * self.processes if f else [float(x) for x in rows]
        self._logs["rewards"]["g"] += list(g) * self.processes if g else [0.5] * len(rows)
        self._logs["advantages"] += [0.0] * len(rows)
        for column, values in (extra or {}).items():
            self._log_completion_extra(column, values)  # the wrapped one, as reward functions do
        return {"prompt_ids": torch.zeros(len(inputs), 3)}


def _installed(**kw):
    from sae_shards.capture.rollouts import TRLRollouts

    trainer = _FakeTRL(**kw)
    rollouts = TRLRollouts(trainer)
    rollouts.install()
    return trainer, rollouts


def test_rollout_rewards_are_trls_weighted_totals():
    """RO01: a step's ``rewards`` are TRL's weighted sums over the reward functions."""
    trainer, rollouts = _installed()
    trainer._generate_and_score_completions([1, 2])
    got = rollouts.read(1)
    assert got.row["rewards"] == [1.0 + 2 * 0.5, 2.0 + 2 * 0.5]
    assert got.reward_mean == pytest.approx(2.5)


def test_a_nan_reward_is_left_out_of_the_total_and_the_mean():
    """RO05: a function that could not score a completion (NaN in TRL's log) is left out of its
    total, and a completion no function scored is None, out of the mean."""
    trainer, rollouts = _installed()
    nan = float("nan")
    trainer._generate_and_score_completions([1, 2, 3], f=[1.0, nan, nan], g=[1.0, 2.0, nan])
    got = rollouts.read(1)
    assert got.row["rewards"] == [3.0, 4.0, None]
    assert got.row["reward_funcs"]["f"] == [1.0, None, None]
    assert got.reward_mean == pytest.approx(3.5) and got.reward_std == pytest.approx(0.5)


def test_reward_std_is_the_population_std():
    """RO06: ``reward_std`` is the population standard deviation of the scored totals."""
    trainer, rollouts = _installed()
    trainer._generate_and_score_completions([1, 2], g=[0.0, 0.0])
    assert rollouts.read(1).reward_std == pytest.approx(0.5)


def test_a_step_reads_its_own_generation_not_the_logs_oldest():
    """RO02: TRL's log may still hold earlier generations: a step's row is the last rows."""
    trainer, rollouts = _installed()
    trainer._generate_and_score_completions([1, 2])
    rollouts.read(1)
    trainer._generate_and_score_completions([3, 4])
    assert rollouts.read(2).row["prompts"] == ["p3", "p4"]


def test_evaluation_generations_do_not_reach_a_steps_rollouts():
    """RO03: a generation made in eval mode (evaluation) is not the step's training batch."""
    trainer, rollouts = _installed()
    trainer._generate_and_score_completions([1, 2])
    trainer.model.training = False
    trainer._generate_and_score_completions([8, 9])  # evaluation, appended to the same log
    trainer.model.training = True
    assert rollouts.read(1).row["prompts"] == ["p1", "p2"]


def test_a_step_that_trains_on_two_generations_records_both():
    """RO04: steps_per_generation below gradient_accumulation_steps: both generations."""
    trainer, rollouts = _installed()
    trainer._generate_and_score_completions([1, 2])
    trainer._generate_and_score_completions([3, 4])
    assert rollouts.read(1).row["prompts"] == ["p1", "p2", "p3", "p4"]


def test_rollouts_hold_every_processs_completions():
    """RO07: the log is gathered from every process: a step's row holds all of them."""
    trainer, rollouts = _installed(processes=2)
    trainer._generate_and_score_completions([1, 2])
    trainer._generate_and_score_completions([3, 4])
    rollouts.read(1)
    trainer._generate_and_score_completions([5, 6])
    assert rollouts.read(2).row["prompts"] == ["p5", "p6", "p5", "p6"]


def test_labels_with_a_missing_one_give_no_labels():
    """RO08: a completion without a label (None logged) makes the step carry no labels."""
    trainer, rollouts = _installed(log_extra=True)
    trainer._generate_and_score_completions([1, 2], extra={"task": ["A", None]})
    got = rollouts.read(1)
    assert got.row["tasks"] is None and got.labels == ()


def test_a_label_column_logged_for_too_few_completions_is_left_out():
    """RO09: a column with fewer values than completions cannot be matched to them: dropped."""
    trainer, rollouts = _installed(log_extra=True)
    trainer._generate_and_score_completions([1, 2, 3], extra={"task": ["A", "B"]})
    got = rollouts.read(1)
    assert got.row["tasks"] is None and got.labels == ()
    trainer._generate_and_score_completions([4, 5], extra={"task": ["A", "B"]})
    assert rollouts.read(2).row["tasks"] == ["A", "B"]


def test_every_typed_rl_setting_reaches_trl(tmp_path):
    """rl.beta, rl.temperature, ... are TRL's own fields: each must reach trl.GRPOConfig."""
    from sae_shards.recipe.trainers import trl_config
    from sae_shards.run.config import RLConfig

    rl = RLConfig(beta=0.04, temperature=0.7, learning_rate=1e-3, max_completion_length=12,
                  per_device_train_batch_size=8, num_generations=4, max_steps=3)
    kwargs = rl.trl_kwargs()
    assert {"beta", "temperature", "learning_rate", "max_completion_length", "num_generations",
            "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps"} <= set(kwargs)
    assert "trainable" not in kwargs and "algorithm" not in kwargs
    args = trl_config(kwargs, tmp_path / "trl")
    assert (args.beta, args.temperature, args.learning_rate) == (0.04, 0.7, 1e-3)


def test_trl_keeps_a_constant_lr_and_two_full_checkpoints(tmp_path):
    """The measured defaults use a constant lr (a linear decay would end at 0: the last steps'
    captured updates vanish); every TRL checkpoint keeps its optimizer (a resume reads it), and
    the newest two are kept (one may be cut short by a kill)."""
    from sae_shards.recipe.trainers import trl_config

    args = trl_config({}, tmp_path / "trl", checkpoint_every=5)
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "constant"
    assert args.warmup_steps == 0
    assert args.save_strategy in ("steps", getattr(args.save_strategy, "STEPS", "steps"))
    assert args.save_steps == 5 and args.save_total_limit == 2 and args.save_only_model is False


def test_trainable_patterns_are_a_union():
    """rl.trainable=[a, b]: a parameter matching any one pattern trains (the docs' "Glob
    patterns ... selecting what RL may change"); the readout stays frozen unless named."""
    from sae_shards.recipe.models import tiny_model_and_tokenizer
    from sae_shards.recipe.trainers import freeze_except

    model, _ = tiny_model_and_tokenizer()
    kept = freeze_except(model, ["model.layers.0.*", "model.norm.*"])
    names = [n for n, _ in model.named_parameters()]
    want = [n for n in names if n.startswith("model.layers.0.") or n == "model.norm.weight"]
    assert kept == want and want
    assert [n for n, p in model.named_parameters() if p.requires_grad] == want
    assert not model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad


def test_the_opt_in_to_a_models_own_code_reaches_trl(tmp_path, monkeypatch):
    """model.trust_remote_code=true: TRL itself loads the policy from the path, so the opt-in
    must reach it (else transformers refuses the model the user opted in to)."""
    import shutil

    from helpers import own_code_cache, plant_own_code
    from sae_shards.recipe.models import build_tiny_model, load_tokenizer
    from sae_shards.recipe.tasks import build_task
    from sae_shards.recipe.trainers import build_trainer

    own_code_cache(monkeypatch, tmp_path / "modules")
    path = tmp_path / "own"
    shutil.copytree(build_tiny_model(tmp_path / "tiny"), path)
    marker = tmp_path / "ran"
    plant_own_code(path, marker)
    tokenizer = load_tokenizer(path, trust_remote_code=True)
    task = build_task("letters", target_length=8)
    trainer = build_trainer(path, tokenizer, task, task.dataset(16, seed=0),
                            dict(max_steps=1, per_device_train_batch_size=4, num_generations=4,
                                 max_completion_length=8, disable_tqdm=True),
                            [], tmp_path / "out", trust_remote_code=True)
    assert type(trainer.model).__name__ == "PlantedForCausalLM" and marker.exists()
