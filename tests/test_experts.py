"""A mixture of experts' stacked expert tensors ``[experts, m, n]`` (transformers 5 keeps every
expert of a layer in one parameter): captured whole per step, factored per expert by the SAE
(``name[e]``), put back whole for analysis; refused per event, with what to do instead."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from sae_shards import RunView, ShardSet
from sae_shards.analysis.interventions import add_direction, remove_direction
from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.capture.selection import check_stacked, default_targets, select_targets
from sae_shards.cli import main
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import (TargetSpec, expand_stacked, make_targets, split_stacked,
                                     stack_slices, stack_targets)
from sae_shards.recipe.models import tiny_model_and_tokenizer
from sae_shards.run import rundir

EXPERTS = "model.layers.0.mlp.experts"


def test_a_stacked_target_is_one_matrix_target_per_expert_for_the_sae():
    specs = [TargetSpec("a.w", (4, 6)), TargetSpec("e.down", (3, 4, 5), rank=2),
             TargetSpec("b.bias", (4,))]
    sae_specs = expand_stacked(specs)
    assert [(t.name, t.shape, t.rank) for t in sae_specs] == [
        ("a.w", (4, 6), 1), ("e.down[0]", (4, 5), 2), ("e.down[1]", (4, 5), 2),
        ("e.down[2]", (4, 5), 2), ("b.bias", (4,), 1)]
    assert stack_targets(sae_specs) == specs  # a checkpoint's targets, as captured
    # sizes agree both ways: the memory checks may take either list
    assert specs[1].numel == sum(t.numel for t in sae_specs[1:4])
    assert specs[1].factored_numel == sum(t.factored_numel for t in sae_specs[1:4])

    x = {"a.w": torch.randn(2, 4, 6), "e.down": torch.randn(2, 3, 4, 5),
         "b.bias": torch.randn(2, 4)}
    split = split_stacked(x, specs)
    assert list(split) == [t.name for t in sae_specs]
    for e in range(3):
        assert torch.equal(split[f"e.down[{e}]"], x["e.down"][:, e])
        assert split[f"e.down[{e}]"].data_ptr() == x["e.down"][:, e].data_ptr()  # a view
    whole = stack_slices({k: v[0] for k, v in split.items()})
    assert list(whole) == ["a.w", "e.down", "b.bias"]
    assert all(torch.equal(whole[k], x[k][0]) for k in x)

    with pytest.raises(ValueError, match=r"'e.down': experts \[0, 2\] do not cover"):
        stack_slices({"e.down[0]": torch.zeros(4, 5), "e.down[2]": torch.zeros(4, 5)})
    with pytest.raises(ValueError, match="expert 2 follows expert 0"):
        stack_targets([sae_specs[1], sae_specs[3]])
    with pytest.raises(ValueError, match=r"rank 5 must be between 1 and min\(4, 3\)"):
        TargetSpec("e.up", (2, 4, 3), rank=5)
    assert make_targets({"e.up": (2, 4, 3)}, rank=8)[0].rank == 3  # one global rank is capped
    with pytest.raises(ValueError, match="reach the SAE whole; give it targets.expand_stacked"):
        LowRankSAE(specs, SAEConfig(n_latents=4, k=2))


def test_the_buffer_stores_experts_whole_and_hands_the_sae_one_view_per_expert():
    specs = [TargetSpec("e.down", (3, 4, 5)), TargetSpec("a.w", (4, 6))]
    buffer = DeltaRingBuffer(specs, capacity=4, device="cpu")
    assert [t.name for t in expand_stacked(buffer.targets)] == ["e.down[0]", "e.down[1]", "e.down[2]", "a.w"]
    pushed = [{"e.down": torch.randn(3, 4, 5), "a.w": torch.randn(4, 6)} for _ in range(3)]
    for step, delta in enumerate(pushed, 1):
        buffer.push(delta, StepMeta(global_step=step))
    got = buffer.gather([0, 2])
    assert list(got) == [t.name for t in expand_stacked(buffer.targets)]
    for e in range(3):
        assert torch.equal(got[f"e.down[{e}]"], torch.stack([pushed[0]["e.down"][e],
                                                             pushed[2]["e.down"][e]]))
    drawn = buffer.sample(5, torch.Generator().manual_seed(0))
    for row, slot in enumerate(drawn.slots.tolist()):
        assert torch.equal(drawn.batch["e.down[1]"][row], pushed[slot]["e.down"][1])
    # resume files hold the parameter whole, under its own name
    tensors, info = buffer.state()
    assert tuple(tensors["buffer.e.down"].shape) == (3, 3, 4, 5)
    again = DeltaRingBuffer(specs, capacity=4, device="cpu")
    again.load_state(tensors, info)
    assert torch.equal(again.gather([1])["e.down[2]"], buffer.gather([1])["e.down[2]"])
    with pytest.raises(ValueError, match="cannot be stored per event; capture them per step"):
        DeltaRingBuffer(specs, capacity=4, device="cpu", event_rank=2)


def test_default_targets_take_the_experts_per_step_and_leave_them_out_per_event(caplog):
    model = tiny_model_and_tokenizer("qwen3_moe", hidden_size=16, num_heads=2,
                                     intermediate_size=8).model
    stacked = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
               for p in ("gate_up_proj", "down_proj")]
    with caplog.at_level(logging.WARNING):
        per_event = default_targets(model)
    assert not set(stacked) & set(per_event)
    assert "cannot be captured per event: capture per step (capture.granularity=step)" in caplog.text
    assert "model.layers.0.mlp.experts.down_proj [4, 16, 8]" in caplog.text
    per_step = default_targets(model, stacked=True)
    assert set(stacked) <= set(per_step)
    order = [n for n, _ in model.named_parameters()]
    assert per_step == sorted(per_step, key=order.index)  # parameter order
    assert not any("mlp.gate." in n for n in per_step)  # the router: named explicitly only
    targets = select_targets(model, per_step)
    assert tuple(targets[f"{EXPERTS}.down_proj"].shape) == (4, 16, 8)
    with pytest.raises(ValueError, match=r"down_proj is a stacked expert tensor, captured whole"):
        select_targets(model, [f"{EXPERTS}.down_proj[2]"])  # one expert cannot be named
    with pytest.raises(ValueError, match=r"capture.granularity=group cannot record per event .*"
                                         r"capture them per step \(capture.granularity=step\)"):
        check_stacked(targets, "group")
    check_stacked(select_targets(model, per_event), "group")  # nothing stacked: fine


def test_a_conv_kernel_is_not_taken_for_a_stack_of_experts(caplog):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.conv = torch.nn.Conv1d(4, 4, 3)  # [4, 4, 3], 3-D as well
            self.experts = torch.nn.Module()
            self.experts.down = torch.nn.Parameter(torch.zeros(2, 4, 4))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    with caplog.at_level(logging.WARNING):
        assert default_targets(Model(), stacked=True) == [
            "layers.0.proj.weight", "layers.0.experts.down", "layers.1.proj.weight",
            "layers.1.experts.down"]
    assert "layers.0.conv.weight [4, 4, 3]" in caplog.text  # left out, named
    assert "Stacked expert tensors" not in caplog.text  # and not taken for experts


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("moe") / "run"
    assert main(["train", f"run_dir={run}", "model.arch=qwen3_moe", "rl.max_steps=10",
                 "runner.min_samples=2", "runner.sae_steps_per_rl_step=2", "task.n_prompts=32",
                 "logging=disabled", "sae.n_latents=16", "runner.save_samples=true",
                 "runner.checkpoint_every=5", "runner.heldout_every=0"]) == 0
    return run


def test_a_moe_run_captures_every_experts_whole_update(moe_run):
    summary = json.loads((moe_run / "summary.json").read_text())
    assert summary["captured"] == 10 and summary["n_targets"] == 12  # 4 attention + 2 stacked
    samples = load_file(moe_run / rundir.SAMPLES)
    # (transformers saves the experts one by one, under other names, and fuses them on loading)
    final, initial = (dict(AutoModelForCausalLM.from_pretrained(moe_run / d).named_parameters())
                      for d in ("final_model", "model"))
    # the ten per-step updates of every expert add up to what RL changed in it, exactly
    for p in ("gate_up_proj", "down_proj"):
        name = f"{EXPERTS}.{p}"
        summed = torch.stack([samples[f"sample.{name}[{e}]"].double().sum(0) for e in range(4)])
        change = final[name].detach().double() - initial[name].detach().double()
        assert change.abs().max() > 0
        torch.testing.assert_close(summed, change, rtol=0, atol=1e-6)


def test_moe_shards_apply_to_the_model_whole_and_analyze_reads_the_run(moe_run, capsys):
    shards = ShardSet.from_run(moe_run)
    assert f"{EXPERTS}.down_proj[3]" in shards.target_names
    assert len(shards.target_names) == 2 * (4 + 2 * 4)  # every expert a target of the SAE
    direction = shards[0].dense(scaled=False)
    model = AutoModelForCausalLM.from_pretrained(moe_run / "final_model")
    params = dict(model.named_parameters())
    assert {k: tuple(v.shape) for k, v in direction.items()} == {
        k: tuple(params[k].shape) for k in direction}
    norm = sum(float(v.double().pow(2).sum()) for v in direction.values()) ** 0.5
    assert norm == pytest.approx(1.0, abs=1e-5)
    down = f"{EXPERTS}.down_proj"
    before = params[down].detach().clone()
    with add_direction(model, direction, 2.0):
        torch.testing.assert_close(params[down].detach(), before + 2.0 * direction[down])
    initial = AutoModelForCausalLM.from_pretrained(moe_run / "model")
    theta0 = dict(initial.named_parameters())
    # c = <theta_T - theta_0, d> over every parameter the shard spans, experts whole
    expected = sum(float(((params[k] - theta0[k]).detach().double() * d.double()).sum())
                   for k, d in direction.items())
    with remove_direction(model, direction, initial) as c:
        assert c == pytest.approx(expected, rel=1e-4, abs=1e-9) and c != 0
        torch.testing.assert_close(params[down].detach(), before - c * direction[down])
    assert torch.equal(params[down].detach(), before)

    # whole or per expert, a sample encodes the same; the mean update comes whole
    whole = {k: v[None] for k, v in direction.items()}
    per_expert = split_stacked(whole, stack_targets(shards.sae.targets))
    assert torch.equal(shards.encode(whole).indices, shards.encode(per_expert).indices)
    assert tuple(shards.decoder_bias()[down].shape) == tuple(params[down].shape)

    # a step checkpoint's buffer (stored whole) is read back per expert, as the end of the run
    assert RunView(moe_run, 10).activations.keys() == RunView(moe_run).activations.keys()
    torch.testing.assert_close(RunView(moe_run, 10).activations["final.values"],
                               RunView(moe_run).activations["final.values"])

    assert main(["analyze", str(moe_run), "--shards", "2"]) == 0
    analysis = json.loads((moe_run / "analysis.json").read_text())
    html = (moe_run / "report.html").read_text()
    assert "Per-target norms of the" in html and "experts combined" in html
    assert "12 parameters (24 matrices: each expert of a stacked one)" in html
    entry = next(iter(analysis["shards"].values()))
    assert "ablation" in entry and "dose_response" in entry
    # what each expert's part of the shard writes to the residual stream, per expert
    lens = {r["target"] for r in entry["logit_lens"]}
    assert {f"model.layers.{i}.mlp.experts.down_proj[{e}]" for i in (0, 1) for e in range(4)} \
        <= lens


def test_experts_named_for_per_event_capture_are_a_config_error(tmp_path, capsys):
    """Found from the model's config on the meta device: nothing is built or written."""
    run = tmp_path / "run"
    assert main(["train", f"run_dir={run}", "model.arch=qwen3_moe", "rl.max_steps=4",
                 "runner.min_samples=2", "task.n_prompts=32", "logging=disabled",
                 "capture.granularity=group", "capture.targets=[*experts.down_proj]"]) == 2
    err = capsys.readouterr().err
    assert "stacked expert tensors [experts, m, n] (model.layers.0.mlp.experts.down_proj" in err
    assert "capture them per step (capture.granularity=step)" in err
    assert "sae-shards: config error:" in err and "Traceback" not in err
    assert not run.exists()


def test_a_moe_directory_is_taken_for_the_policys_initial_weights_until_an_expert_changes(
        tmp_path):
    """transformers stores the experts one by one on disk and stacks them on loading; the files
    are compared in their own layout, so a user's MoE run names its directory instead of
    saving theta_0 again, and a change to any one expert is still seen."""
    from sae_shards.capture.initial_model import loaded_from
    from sae_shards.recipe.models import build_tiny_model

    folder = build_tiny_model(tmp_path / "moe", arch="qwen3_moe", hidden_size=16, num_heads=2,
                              intermediate_size=8)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in load_file(
        folder / "model.safetensors")
    for edit in (None, ("down_proj", (2, 0, 0)), ("gate_up_proj", (3, 15, 5))):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if edit is None:
            assert loaded_from(model) == str(folder.resolve())
            continue
        with torch.no_grad():  # gate_up_proj row 15: the up half of expert 3
            getattr(model.model.layers[1].mlp.experts, edit[0])[edit[1]] += 1e-3
        assert loaded_from(model) is None


def test_the_reports_norms_combine_each_stacked_tensors_experts():
    from sae_shards.analysis.plots import per_parameter_norms

    names = ["a.w", "e.down[0]", "e.down[1]", "b.w", "e.up[0]", "e.up[1]"]
    norms = torch.tensor([[0.1, 0.3, 0.4, 0.2, 0.0, 0.6], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    got_names, got = per_parameter_norms(names, norms)
    assert got_names == ["a.w", "e.down", "b.w", "e.up"]
    torch.testing.assert_close(got, torch.tensor([[0.1, 0.5, 0.2, 0.6], [1.0, 0.0, 0.0, 0.0]]))


class _StopAt(TrainerCallback):
    def __init__(self, shards, step: int) -> None:
        self.shards, self.step = shards, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.shards.request_stop()


def _moe_script_run(model_dir: Path, tmp_path: Path, name: str, stop_at: int | None = None,
                    resume: bool = False):
    """A user's GRPO script on a tiny MoE with ShardCallback (8 steps, every sample saved)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from sae_shards import ShardCallback
    from sae_shards.recipe.tasks import build_task

    torch.manual_seed(0)
    callback = ShardCallback(run_dir=tmp_path / name, runner={"min_samples": 2,
                                                               "save_samples": True},
                             sae={"n_latents": 8}, resume=resume)
    task = build_task("letters", target_length=8)
    config = GRPOConfig(output_dir=str(tmp_path / f"trl_{name}"), max_steps=8,
                        learning_rate=3e-3, seed=3, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=8, use_cpu=True, bf16=False,
                        report_to="none", save_strategy="no", logging_steps=1,
                        disable_tqdm=True)
    stop = [_StopAt(callback, stop_at)] if stop_at else []
    GRPOTrainer(model=str(model_dir), reward_funcs=task.reward_funcs, args=config,
                train_dataset=Dataset.from_dict(task.dataset(64).to_dict()),
                callbacks=[callback, *stop]).train(resume_from_checkpoint=resume or None)
    return callback


def test_a_stopped_moe_run_resumes_with_its_experts_trained_weights(tmp_path, caplog):
    """transformers' resume leaves the stacked experts at their initial weights (it reloads the
    checkpoint without its weight conversion); the callback puts the checkpoint's back, so the
    captured updates still add up to what RL changed."""
    from sae_shards.recipe.models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "moe", arch="qwen3_moe", hidden_size=32,
                                 num_heads=2, intermediate_size=16)
    first = _moe_script_run(model_dir, tmp_path, "cut", stop_at=4)
    assert first.summary["interrupted"] and first.summary["rl_steps"] == 4
    with caplog.at_level(logging.WARNING):
        again = _moe_script_run(model_dir, tmp_path, "cut", resume=True)
    assert again.summary["rl_steps"] == 8
    assert "sae-shards loaded them from the checkpoint" in caplog.text
    samples = load_file(tmp_path / "cut" / rundir.SAMPLES)
    assert samples["rl_step"].tolist() == list(range(1, 9))
    final = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "final_model")
                 .named_parameters())
    initial = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    for name in (f"{EXPERTS}.down_proj", f"{EXPERTS}.gate_up_proj",
                 "model.layers.0.self_attn.o_proj.weight"):
        if name.endswith("]") or name.endswith(".weight"):
            summed = samples[f"sample.{name}"].double().sum(0)
        else:
            summed = torch.stack([samples[f"sample.{name}[{e}]"].double().sum(0)
                                  for e in range(4)])
        change = (final[name] - initial[name]).detach().double()
        assert change.abs().max() > 0
        torch.testing.assert_close(summed, change, rtol=0, atol=1e-6, msg=name)


def test_the_report_reads_the_experts_a_shard_is_largest_on():
    from sae_shards.analysis.report import LENS_EXPERTS, _strongest_experts

    size = [0.1, 3.0, 0.2, 2.0, 5.0, 0.3]  # experts 4, 1, 3 and 5 are the largest
    norms = {"o.weight": 0.5, "o.bias": 0.1, **{f"e.down[{i}]": s for i, s in enumerate(size)}}
    assert LENS_EXPERTS == 4
    assert _strongest_experts(list(norms), norms) == ["o.weight", "o.bias", "e.down[1]", "e.down[3]",
                                         "e.down[4]", "e.down[5]"]
