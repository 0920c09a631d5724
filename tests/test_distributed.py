"""DDP and FSDP2 on 2 CPU processes (gloo), end to end.

DDP (``accelerate launch --multi_gpu``, TRL's own route):

``tests/distributed/grpo_run.py`` trains a tiny GRPO policy for 2 steps on 2 ranks with two
``ShardCallback``s (per-step ``update`` and per-event ``group`` capture), saving the generation
batch each rank trained on; then one process replays those batches (TRL's generation replaced,
everything after it real). The captured deltas and events of the two runs must agree: DDP's
all-reduce and the single process sum the same per-row gradients in a different order.

DeepSpeed ZeRO-3 (``accelerate launch --use_deepspeed --zero_stage 3``, TRL's route; DeepSpeed's
CPU accelerator over gloo): the same two-callback GRPO run, replayed in one process the same way.

FSDP2 (``torchrun``; accelerate shards with FSDP only on accelerators, so TRL's FSDP2 path is
left to scripts/gpu_check.sh): ``tests/distributed/fsdp2_run.py`` shards a tiny LM with
``fully_shard`` and drives the callback from a plain training loop; the captured ``update`` must be
an unsharded copy's update, and the policy (named as a Hub model) is gathered whole at the start
(theta_0) and at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sae_shards.capture import distributed
from sae_shards.capture.event_capture import _check_groups_within_ranks
from sae_shards.core.checkpoint import live_tensors, load_checkpoint
from sae_shards.recipe.models import build_tiny_model, load_tokenizer

SCRIPT = Path(__file__).parent / "distributed" / "grpo_run.py"
FSDP2_SCRIPT = Path(__file__).parent / "distributed" / "fsdp2_run.py"
BEGIN_SCRIPT = Path(__file__).parent / "distributed" / "begin_together.py"
STOP_SCRIPT = Path(__file__).parent / "distributed" / "stop_anywhere.py"
SAME_DIR_SCRIPT = Path(__file__).parent / "distributed" / "same_run_dir.py"
DELTA_RTOL = 1e-4
"""Relative (Frobenius) tolerance of a per-step AdamW update: the gradients agree to ~1e-6 and
Adam's first step divides by |g|, which amplifies the rounding of small entries (measured
1.4e-5)."""
EVENT_RTOL = 1e-5
"""Relative tolerance of one event's gradient (measured 6e-7)."""
launches = pytest.mark.slow
"""The tests that launch processes (tens of seconds each) are slow: left out of the default run,
`python -m pytest -q -m slow` runs them (tests/conftest.py)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path, rc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if "--use_deepspeed" in cmd:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator: gloo, fp32
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    ok = done.returncode == 0 if rc == 0 else done.returncode != 0
    assert ok, f"{cmd[:4]} rc {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _ddp_launch() -> list[str]:
    """``accelerate launch`` of 2 replicated processes (DDP; gloo on CPUs), without its port."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def _zero3_launch() -> list[str]:
    """``accelerate launch`` with DeepSpeed ZeRO-3 on 2 processes (fp32, no offload, gradients
    clipped at TRL's default max_grad_norm as the one-process replay clips them)."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--use_deepspeed",
            "--zero_stage", "3", "--zero3_init_flag", "false", "--offload_optimizer_device",
            "none", "--offload_param_device", "none", "--gradient_clipping", "1.0",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    model = build_tiny_model(root / "model", hidden_size=32, num_layers=2, num_heads=4,
                             intermediate_size=64)
    _run([*_ddp_launch(), "--main_process_port", str(_free_port()),
          str(SCRIPT), "--mode", "ddp", "--model", str(model), "--out", str(root / "ddp")], root)
    _run([sys.executable, str(SCRIPT), "--mode", "replay", "--model", str(model),
          "--out", str(root / "replay"), "--saved", str(root / "ddp" / "gen")], root)
    return {"ddp": root / "ddp", "replay": root / "replay", "model": model}


def _samples(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "samples.safetensors"))


def _worst_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for key in (k for k in a if k.startswith("sample.")):
        assert a[key].shape == b[key].shape, key
        for x, y in zip(a[key], b[key]):
            assert y.norm() > 0, f"{key}: a zero sample"
            worst = max(worst, float((x - y).norm() / y.norm()))
    return worst


@launches
def test_two_ranks_capture_the_one_process_deltas_of_the_same_global_batch(runs):
    ddp, one = _samples(runs["ddp"] / "run_step"), _samples(runs["replay"] / "run_step")
    assert ddp["rl_step"].tolist() == one["rl_step"].tolist() == [1, 2]
    assert _worst_relative_error(ddp, one) < DELTA_RTOL


@launches
def test_per_event_samples_gather_every_ranks_events_exactly_once(runs):
    run = runs["ddp"] / "run_group"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert [len(r["prompts"]) for r in rollouts] == [8, 8]  # both ranks' completions
    for step in (1, 2):
        mine = [e for e in events if e["step"] == step]
        assert [e["event"] for e in mine] == [0, 1]
        assert [e["rows"] for e in mine] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # rank 0, rank 1
    # Rank 1's event is rank 1's prompt: its rows in the (gathered) completion log hold the
    # prompt rank 1 saved from its own generation batch.
    tok = load_tokenizer(runs["model"])
    rank1 = load_file(str(runs["ddp"] / "gen" / "step1-rank1.safetensors"))
    prompt = tok.decode(rank1["prompt_ids"][0], skip_special_tokens=True).replace(" ", "")
    assert {rollouts[0]["prompts"][r] for r in events[1]["rows"]} == {prompt}
    # ... and each event is the one-process event of the same rows (scaled by 1/world_size).
    ddp, one = _samples(run), _samples(runs["replay"] / "run_group")
    assert ddp["rl_step"].tolist() == one["rl_step"].tolist() == [1, 1, 2, 2]
    assert _worst_relative_error(ddp, one) < EVENT_RTOL


@launches
def test_one_run_directory_whose_shards_load(runs):
    for kind, n_samples in (("run_step", 2), ("run_group", 4)):
        run = runs["ddp"] / kind
        summary = json.loads((run / "summary.json").read_text())
        assert summary["captured"] == n_samples and summary["rl_steps"] == 2
        loaded = load_checkpoint(run / "checkpoints" / "final")
        assert loaded.config["meta"]["rl_step"] == 2 and loaded.sae.cfg.n_latents == 8
        assert _rl_log_steps(run) == _rl_log_steps(runs["replay"] / kind)  # one rank writes
    for rank in (0, 1):  # a script's callback.summary says how the run ended on every rank
        assert json.loads((runs["ddp"] / f"summary-rank{rank}.json").read_text()) == {
            "interrupted": False, "rl_steps": 2, "world_size": 2}
    # The SAE trained on the gathered events is the one-process SAE (same seed, same samples).
    # (Not checked for run_step: its samples differ by ~1e-5, and 4 SAE steps on 2 samples
    # amplify that to a few percent.)
    ddp = live_tensors(load_checkpoint(runs["ddp"] / "run_group" / "checkpoints" / "final").sae)
    one = live_tensors(load_checkpoint(runs["replay"] / "run_group" / "checkpoints" / "final").sae)
    for key in ddp:
        assert torch.allclose(ddp[key], one[key], rtol=1e-4, atol=1e-6, equal_nan=True), key


def _rl_log_steps(run: Path) -> list[int]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [row["rl_step"] for row in rows if row["kind"] == "rl"]


@pytest.fixture(scope="module")
def zero3(runs) -> dict[str, Path]:
    root = runs["model"].parent / "zero3"
    _run([*_zero3_launch(), str(SCRIPT), "--mode", "ddp", "--hub-id", "--model",
          str(runs["model"]), "--out", str(root / "run")], runs["model"].parent)
    _run([sys.executable, str(SCRIPT), "--mode", "replay", "--model", str(runs["model"]),
          "--out", str(root / "replay"), "--saved", str(root / "run" / "gen")], root)
    return {"run": root / "run", "replay": root / "replay"}


@launches
def test_zero3_captures_the_one_process_deltas_and_events(zero3, runs):
    """Under ZeRO-3 no rank holds a whole weight: the per-step update is the fp32 master copy
    gathered before and after the step, and it is the one-process update of the same global
    batch (measured 4e-6); per-event samples come from hooks, and are the one-process events
    (measured 3e-7); every completion of both ranks is in exactly one event."""
    for kind, rtol, steps in (("run_step", DELTA_RTOL, [1, 2]),
                              ("run_group", EVENT_RTOL, [1, 1, 2, 2])):
        got, one = _samples(zero3["run"] / kind), _samples(zero3["replay"] / kind)
        assert got["rl_step"].tolist() == one["rl_step"].tolist() == steps
        for key in (k for k in got if k.startswith("sample.")):  # whole weights, not a shard
            assert got[key].shape == one[key].shape and got[key].shape[1:] != (0,), key
        assert _worst_relative_error(got, one) < rtol, kind
        summary = json.loads((zero3["run"] / kind / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["captured"] == len(steps)
        load_checkpoint(zero3["run"] / kind / "checkpoints" / "final")
    events = [json.loads(line)
              for line in (zero3["run"] / "run_group" / "events.jsonl").read_text().splitlines()]
    assert [e["rows"] for e in events] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    # the final policy is gathered from the partitions: the one-process run's final weights
    one = load_file(str(zero3["replay"] / "run_step" / "final_model" / "model.safetensors"))
    _assert_same_weights(zero3["run"] / "run_step" / "final_model", one)
    # the policy named no local directory (as a Hub model): theta_0 was gathered and saved
    _assert_same_weights(zero3["run"] / "run_step" / "model",
                         load_file(str(runs["model"] / "model.safetensors")))
    assert not (zero3["run"] / "run_group" / "model").exists()  # save_model=False there
    from sae_shards.analysis.shards import run_models_missing

    assert run_models_missing(zero3["run"] / "run_step") is None  # analysis has both models


@pytest.fixture(scope="module")
def zero3_lora(runs) -> dict[str, Path]:
    root = runs["model"].parent / "zero3_lora"
    _run([*_zero3_launch(), str(SCRIPT), "--mode", "ddp", "--lora", "--model", str(runs["model"]),
          "--out", str(root / "run")], runs["model"].parent)
    _run([sys.executable, str(SCRIPT), "--mode", "replay", "--lora", "--model",
          str(runs["model"]), "--out", str(root / "replay"), "--saved", str(root / "run" / "gen")],
         root)
    return {"run": root / "run", "replay": root / "replay"}


@launches
def test_zero3_captures_a_lora_adapters_updates_and_events(zero3_lora):
    """A peft LoRA adapter under ZeRO-3: its factors are partitioned too, so each is gathered
    whole (small) before and after the step, and the per-step sample is the one-process
    s (B1 A1 - B0 A0); per-event samples come from the LoRA layers' hooks. Both agree with the
    one-process replay of the same global batches, and the final adapter is gathered whole."""
    for kind, rtol in (("run_step", DELTA_RTOL), ("run_group", EVENT_RTOL)):
        got, one = _samples(zero3_lora["run"] / kind), _samples(zero3_lora["replay"] / kind)
        assert got["rl_step"].tolist() == one["rl_step"].tolist()
        assert len([k for k in got if k.startswith("sample.")]) == 14  # every block matrix
        assert _worst_relative_error(got, one) < rtol, kind
    one = load_file(str(zero3_lora["replay"] / "run_step" / "final_model" /
                        "adapter_model.safetensors"))
    got = load_file(str(zero3_lora["run"] / "run_step" / "final_model" /
                        "adapter_model.safetensors"))
    assert got.keys() == one.keys() and len(got) == 28  # A and B of 14 layers, whole
    for name in got:
        assert torch.allclose(got[name], one[name], rtol=1e-5, atol=1e-6), name


@launches
def test_sae_shards_train_under_deepspeed_zero3_refuses_adam_preconditioning(tmp_path):
    """A setting the recipe cannot honour under ZeRO-3 is refused with the reason (the recipe
    itself runs under ZeRO-3 in the SIGTERM test below: trained, stopped, resumed)."""
    refused = _run([*_zero3_launch(), "-m", "sae_shards.cli", "train", "rl.max_steps=2",
                    "logging=disabled", f"run_dir={tmp_path / 'adam'}",
                    "capture.granularity=group", "capture.precondition=adam"], tmp_path, rc=1)
    assert "capture.precondition=adam is not supported under DeepSpeed ZeRO-3" in refused.stderr
    # a gradient source under ZeRO-2 (DeepSpeed from the launcher, args.deepspeed unset): the
    # gradients are not in param.grad, and every sample was zero, blamed on the rewards (audit
    # 116 B3)
    stage2 = _zero3_launch()
    stage2[stage2.index("--zero_stage") + 1] = "2"
    grad = _run([*stage2, "-m", "sae_shards.cli", "train", "rl.max_steps=2", "logging=disabled",
                 f"run_dir={tmp_path / 'grad'}", "capture.source=grad", "runner.min_samples=2"],
                tmp_path, rc=1)
    assert grad.stderr.count("cannot start: capture.source='grad' is not supported under "
                             "DeepSpeed") == 1, grad.stderr[-3000:]


@launches
def test_fsdp2_update_capture_gathers_the_unsharded_update(runs):
    out = runs["model"].parent / "fsdp2"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", str(_free_port()), str(FSDP2_SCRIPT), "--model", str(runs["model"]),
          "--out", str(out), "--hub-id"], out.parent)
    got = _samples(out / "run")
    ref = load_file(str(out / "reference.safetensors"))
    assert got["rl_step"].tolist() == [1, 2]
    names = [k.removeprefix("sample.") for k in got if k.startswith("sample.")]
    assert len(names) == 4  # q_proj and down_proj of both layers, whole (not one rank's shard)
    for name in names:
        for i, step in enumerate((1, 2)):
            want = ref[f"step{step}.{name}"]
            assert got[f"sample.{name}"][i].shape == want.shape
            assert want.norm() > 0
            assert float((got[f"sample.{name}"][i] - want).norm() / want.norm()) < DELTA_RTOL
    assert json.loads((out / "run" / "summary.json").read_text())["captured"] == 2
    assert load_checkpoint(out / "run" / "checkpoints" / "final").config["meta"]["rl_step"] == 2
    # the final policy, gathered from the shards, is the unsharded copy's final weights
    _assert_same_weights(out / "run" / "final_model",
                         {k.removeprefix("final."): v for k, v in ref.items()
                          if k.startswith("final.")})
    # the policy named no local directory (as a Hub model): theta_0 was gathered from the
    # shards when training began and saved whole
    _assert_same_weights(out / "run" / "model", load_file(str(runs["model"] / "model.safetensors")))


def _assert_same_weights(policy: Path, want: dict[str, torch.Tensor]) -> None:
    """``policy/model.safetensors`` holds exactly the weights of ``want`` (the test models'
    embeddings are not tied, so none is left out), whole and equal up to summation order."""
    saved = load_file(str(policy / "model.safetensors"))
    assert want and set(saved) == set(want), sorted(set(want) ^ set(saved))
    for name, tensor in saved.items():
        assert tensor.shape == want[name].shape, name  # whole, not one rank's shard
        assert torch.allclose(tensor, want[name], rtol=1e-5, atol=1e-6), name


@launches
def test_fsdp2_gathers_a_mixture_of_experts_stacked_update_whole(tmp_path):
    """fully_shard splits a stacked expert tensor [experts, m, n] along its experts: the sample
    is the whole update, every expert's matrix in its place."""
    model = build_tiny_model(tmp_path / "moe", arch="qwen3_moe", hidden_size=32, num_layers=2,
                             num_heads=4, intermediate_size=16)
    out = tmp_path / "fsdp2"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", str(_free_port()), str(FSDP2_SCRIPT), "--model", str(model),
          "--out", str(out), "--targets", "model.layers.*.mlp.experts.down_proj"], tmp_path)
    got = _samples(out / "run")
    ref = load_file(str(out / "reference.safetensors"))
    for layer in (0, 1):
        name = f"model.layers.{layer}.mlp.experts.down_proj"
        for i, step in enumerate((1, 2)):
            whole = torch.stack([got[f"sample.{name}[{e}]"][i] for e in range(4)])
            want = ref[f"step{step}.{name}"]  # [4, 32, 16]
            assert whole.shape == want.shape and want.norm() > 0
            # every expert in its own place (rank 1 holds experts 2 and 3)
            assert float((whole - want).norm() / want.norm()) < DELTA_RTOL


def test_train_ends_the_process_group_it_ran_under(tmp_path):
    """A run on several processes leaves no process group to the interpreter's exit, where
    gloo's threads can abort a finished run (cli.end_process_group, which `sae-shards train`
    calls after its jobs); without one it does nothing."""
    import torch.distributed as dist

    from sae_shards.cli import end_process_group

    end_process_group()  # none: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert dist.is_initialized()
        end_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@launches
def test_sae_shards_train_under_accelerate_launch(tmp_path):
    """The recipe itself on 2 ranks: rank 0 prepares the directory and builds the model first,
    the other rank loads it; one run directory with every rank's events."""
    run = tmp_path / "run"
    launch = _ddp_launch()
    job = ["-m", "sae_shards.cli", "train", "rl.max_steps=3", "logging=disabled",
           f"run_dir={run}", "capture.granularity=group", "runner.min_samples=2"]
    done = _run([*launch, "--main_process_port", str(_free_port()), *job], tmp_path)
    # every trainable weight takes part: DDP is not asked to look for unused ones (it warned)
    assert "find_unused_parameters=True" not in done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rl_steps"] == 3
    assert json.loads((run / "config.json").read_text())["launch"] == (
        "accelerate launch --multi_gpu --num_processes 2")
    # the same launch again: rank 0 refuses (the run exists) and says so once; the other rank
    # stops with it, not with a lost connection
    again = _run([*launch, "--main_process_port", str(_free_port()), *job], tmp_path, rc=1)
    assert again.stderr.count("already holds") == 1, again.stderr[-3000:]
    assert "Connection closed" not in again.stderr and "Error executing job" not in again.stderr
    assert "accelerate launch --multi_gpu --num_processes 2 -m sae_shards.cli train" in again.stderr
    # refused by rank 0's capture as training begins (the optimizer its source needs): every
    # rank stops with it (audit 116 B2: the other rank died of a lost connection, and rank 0's
    # refusal was Hydra's traceback)
    sgd = _run([*launch, "--main_process_port", str(_free_port()), "-m", "sae_shards.cli",
                "train", "rl.max_steps=3", "logging=disabled", f"run_dir={tmp_path / 'sgd'}",
                "runner.min_samples=2", "capture.source=precond", "+rl.extra.optim=sgd"],
               tmp_path, rc=1)
    assert sgd.stderr.count("cannot start: capture.source='precond' needs") == 1, sgd.stderr[-3000:]
    assert "Connection closed" not in sgd.stderr and "Error executing job" not in sgd.stderr
    # a run_dir of each rank's own (audit 135 F8: rank 1 failed on a model path inside its
    # own directory): refused on every rank before anything is written
    own = _run([*launch, "--main_process_port", str(_free_port()), "-m", "sae_shards.cli",
                "train", "rl.max_steps=3", "logging=disabled",
                f"run_dir={tmp_path / 'own'}_${{oc.env:RANK}}", "runner.min_samples=2"],
               tmp_path, rc=1)
    assert "run_dir differs between the run's processes (rank 0: " in own.stderr, \
        own.stderr[-3000:]
    assert not [p for p in tmp_path.glob("own_*/*") if p.name != "cli.log"]  # Hydra's log
    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    for row in rollouts:  # every completion of both ranks in exactly one event of its step
        rows = sorted(r for e in events if e["step"] == row["step"] for r in e["rows"])
        assert rows == list(range(len(row["prompts"])))
    assert summary["events"] == len(events) > 0
    load_checkpoint(run / "checkpoints" / "final")


def _resume_past_damaged_shards(launch: list[str], job: list[str], shards: Path,
                                cwd: Path) -> None:
    """``job`` resumed under ``launch`` with ``shards`` (a checkpoint's sae.safetensors) cut in
    half: rank 0 refuses it as it loads it, inside TRL's train(), and says so once; every rank
    stops with it (audit 113 F2, F9: the other rank died of a lost connection in its first
    generation, or, in a sweep, waited there while rank 0 went on to the next job)."""
    whole = shards.read_bytes()
    shards.write_bytes(whole[: len(whole) // 2])
    done = _run([*launch, "--main_process_port", str(_free_port()), *job, "resume=true"], cwd,
                rc=1)
    assert done.stderr.count(f"cannot resume: {shards}") == 1, done.stderr[-4000:]
    assert "Connection closed" not in done.stderr, done.stderr[-4000:]
    assert "Error executing job" not in done.stderr, done.stderr[-4000:]
    shards.write_bytes(whole)


def _resumed_under_ddp(run: Path, job: list[str], recorded: str, cwd: Path) -> None:
    """A ZeRO-3 run resumed under DDP: refused before TRL loads its checkpoint (config.json's
    ``distribution``), said once, naming the launch it started with. A run that recorded no
    distribution (an earlier version's) is told so when TRL fails to load the checkpoint; both
    were told before that a file of the checkpoint was damaged, and to delete it. Nothing of
    the run changes, config.json's launch and distribution included."""
    kept = {name: (run / name).read_bytes() for name in ("config.json", "rollouts.jsonl")}
    refused = _run([*_ddp_launch(), "--main_process_port", str(_free_port()), *job,
                    "resume=true"], cwd, rc=1)
    assert refused.stderr.count(f"{run} was trained under DeepSpeed ZeRO-3 and is resumed under "
                                "DDP") == 1, refused.stderr[-4000:]
    assert f"resume it with the launch it started with ({recorded})" in refused.stderr
    assert "damaged (a copy's?)" not in refused.stderr
    assert {name: (run / name).read_bytes() for name in kept} == kept
    unrecorded = json.loads(kept["config.json"])
    del unrecorded["distribution"]
    (run / "config.json").write_text(json.dumps(unrecorded))
    told = _run([*_ddp_launch(), "--main_process_port", str(_free_port()), *job,
                 "resume=true"], cwd, rc=1)
    assert ("it was written under DeepSpeed (its global_step*/ holds the weights and the "
            "optimizer), and this launch is not DeepSpeed's" in told.stderr), told.stderr[-4000:]
    assert f"the launch the run started with ({recorded})" in told.stderr
    assert "damaged (a copy's?)" not in told.stderr
    config = json.loads((run / "config.json").read_text())  # the launch kept, none recorded
    assert config["launch"] == recorded and config["distribution"] is None
    assert (run / "rollouts.jsonl").read_bytes() == kept["rollouts.jsonl"]
    (run / "config.json").write_bytes(kept["config.json"])


@launches
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_sigterm_stops_every_rank_with_a_checkpoint_and_the_run_resumes(tmp_path, backend):
    """SIGTERM to the launcher (which forwards it to the workers): every rank stops after the
    same step, TRL's and sae-shards' checkpoints of it are written, and resume=true finishes.
    DDP with per-event capture; ZeRO-3 with its gathered per-step capture."""
    import signal
    import time

    run = tmp_path / "run"
    granularity = "group" if backend == "ddp" else "step"
    job = ["-m", "sae_shards.cli", "train", "rl.max_steps=10", "logging=disabled",
           f"run_dir={run}", f"capture.granularity={granularity}", "runner.min_samples=2"]
    launch = (_ddp_launch() if backend == "ddp"
              else _zero3_launch()[:-2])  # the port is added below
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([*launch, "--main_process_port", str(_free_port()), *job],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        rollouts = run / "rollouts.jsonl"
        while not (rollouts.is_file() and len(rollouts.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "log.txt").read_text()[-4000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    text = (tmp_path / "log.txt").read_text()
    assert "Received data size doesn't match" not in text, text[-4000:]  # no collective mismatch
    assert text.count("SIGTERM: finishing this RL step") == 1, text[-4000:]  # rank 0 says it
    recorded = json.loads((run / "config.json").read_text())["launch"]
    assert recorded.startswith("accelerate launch --multi_gpu" if backend == "ddp" else
                               "accelerate launch --use_deepspeed --zero_stage 3")
    assert f"{recorded} -m sae_shards.cli train" in text  # the printed resume command
    summary = json.loads((run / "summary.json").read_text())
    step = summary["rl_steps"]
    assert summary["interrupted"] and 3 <= step < 10, text[-4000:]
    assert (run / "trl" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert (run / "checkpoints" / f"step_{step:06d}").is_dir()
    assert json.loads((run / "config.json").read_text())["distribution"] == (
        "DDP" if backend == "ddp" else "DeepSpeed ZeRO-3")
    if backend == "zero3":
        _resumed_under_ddp(run, job, recorded, tmp_path)
    if backend == "ddp":
        _resume_past_damaged_shards(
            launch, job, run / "checkpoints" / f"step_{step:06d}" / "sae.safetensors", tmp_path)
        # audit 113 F4: a TRL checkpoint without rank 1's random state resumed without a word
        (run / "trl" / f"checkpoint-{step}" / "rng_state_1.pth").unlink()
        # a later step killed while its checkpoint was written (its resume file alone)
        shutil.copy(run / "resume" / f"step_{step:06d}.safetensors",
                    run / "resume" / f"step_{step + 1:06d}.safetensors")
    done = _run([*launch, "--main_process_port", str(_free_port()), *job, "resume=true"],
                tmp_path)
    if backend == "ddp":  # rank 1's, said by rank 0 (whose log is the run's)
        said = done.stdout + done.stderr
        assert "holds no rng_state_1.pth, the random state of process 1" in said, said[-4000:]
        # said once, by rank 0 (audit 113: every rank said it, rank 1 unlabelled)
        for text in (said, (run / "cli.log").read_text()):
            assert text.count(f"RL step {step + 1}'s checkpoint is incomplete") == 1, text[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rl_steps"] == 10 and not summary["interrupted"]
    from sae_shards.analysis.shards import run_models_missing

    assert run_models_missing(run) is None  # the final policy saved whole (ZeRO-3: gathered)
    rollouts = [json.loads(line)["step"] for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert rollouts == list(range(1, 11))  # no step lost or doubled
    if granularity == "step":
        assert summary["captured"] == 10 and summary["world_size"] == 2
        load_checkpoint(run / "checkpoints" / "final")
        return
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert sorted({e["step"] for e in events}) == list(range(1, 11))
    assert len(events) == len({(e["step"], e["event"]) for e in events})


def test_every_rank_learns_whether_all_began(tmp_path):
    """Audit 113 F2: rank 0 refused a resume while loading its checkpoint (a foreign or damaged
    part) and the other rank, which knew nothing of it, went on into the first generation and
    died there of a lost connection, with a traceback in front of the reason. Now each rank
    learns whether every rank got through: one that did stops naming the one that did not; one
    that did not returns, to raise its own error; rank 0 gets every rank's notes to say."""
    rounds = ["-", "1", "0", "0,1"]  # which ranks fail, round by round, in one launch
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", str(_free_port()), str(BEGIN_SCRIPT), str(tmp_path), *rounds],
         tmp_path)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for i, failing in enumerate(rounds):
        failed = {int(r) for r in failing.split(",") if r != "-"}
        for rank in (0, 1):
            if rank in failed or not failed:  # returns: its own error, if any, is its caller's
                notes = ["note of rank 0", "note of rank 1"] if rank == 0 else []
                assert got[rank][i] == {"notes": notes}, (failing, rank, got)
            else:
                first = min(failed)
                assert got[rank][i] == {"stopped": (
                    f"rank {first} could not begin training, so this rank stops too: "
                    f"ValueError: rank {first}'s file is damaged")}, (failing, rank, got)


def test_every_rank_learns_which_rank_was_asked_to_stop_and_by_what(tmp_path):
    """Audit 119: a stop signalled to rank 1 alone was said by rank 0 as "a stop was asked on
    another process", naming neither the rank nor the signal. One all-reduce tells every rank
    both; the highest signal wins, then the highest rank."""
    rounds = ["-", "1:15", "0:2", "0:0", "0:2,1:15", "0:15,1:15"]
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", str(_free_port()), str(STOP_SCRIPT), str(tmp_path), *rounds],
         tmp_path)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = [None, [15, 1], [2, 0], [0, 0], [15, 1], [15, 1]]
    assert got == [expected, expected]
    from sae_shards.capture.distributed import stop_asked_anywhere

    assert stop_asked_anywhere(None) is None and stop_asked_anywhere(15) == (15, 0)


def test_a_run_dir_of_each_rank_or_a_callback_on_one_rank_is_refused(tmp_path):
    """Audit 135 F1: a script whose run_dir was built from RANK gave each rank its own; under
    resume="auto" rank 0 continued its run and rank 1 started a new one, so DDP paired rank 0's
    steps 5-10 with rank 1's steps 1-6, and the run died in a collective without a word (the
    next launch 'finished' it). Every rank now refuses a run_dir, or a trainer output_dir, that
    differs between the processes, naming each rank's, before anything is resumed or
    trained."""
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", str(_free_port()), str(SAME_DIR_SCRIPT), str(tmp_path)], tmp_path)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # audit 135 F5: a callback on rank 0 only paired its collectives with DDP's on rank 1, and
    # gloo aborted without a word; rank 0 now says what to do, before any collective of its own
    assert got[0].pop("on rank 0 only") == (
        "ShardCallback began training on rank 0 but not on rank(s) 1 within 3 s: add it to the "
        "trainer on every process (rank 0 alone writes the run directory; the others take part "
        "in its collectives, so it must not be guarded by is_main_process)")
    assert got[1].pop("on rank 0 only") == "no callback"
    assert got[0].pop("resume_from on rank 0 only").startswith(  # before resume_from's
        "ShardCallback was asked resume_from on rank 0 but not on rank(s) 1 within 3 s")
    assert got[1].pop("resume_from on rank 0 only") == "no callback"
    assert got[0] == got[1]  # every rank says the same
    runs = f"rank 0: {tmp_path / 'run_0'}, rank 1: {tmp_path / 'run_1'}"
    for when in ("own run_dir, resume_from", "own run_dir, train begins"):
        assert got[0][when] == (f"run_dir differs between the run's processes ({runs}); give "
                                "every process the same run_dir, which rank 0 alone writes (a "
                                "path built from RANK, LOCAL_RANK, the time or the host name "
                                "differs between them)")
    for when in ("own output_dir", "output_dir of each rank, train begins"):
        assert got[0][when].startswith(
            f"the trainer's output_dir differs between the run's processes (rank 0: "
            f"{tmp_path / 'trl_0'}, rank 1: {tmp_path / 'trl_1'}); give every process the same")
    assert got[0]["settings of each rank"] == (
        "ShardCallback's settings differ between the run's processes: capture.granularity "
        "(rank 0: 'step', rank 1: 'group'); sae.k (rank 0: 4, rank 1: 5); give ShardCallback the "
        "same arguments on every process (settings read per rank, e.g. from a file or the "
        "environment, can differ)")
    assert got[0]["shared"] == "nothing"
    assert got[0]["node-local output_dir"] == (
        "the checkpoint to resume from differs between the run's processes (rank 0: 4, rank 1: "
        "None); every process must see the run directory and the trainer's output_dir on one "
        "shared filesystem, where rank 0 saved the checkpoints")
    assert not (tmp_path / "run_1").exists()  # nothing written for the refused runs


def test_begin_together_on_one_process_is_its_own_notes():
    from sae_shards.capture.distributed import begin_together

    assert begin_together(None, ["a note"]) == ["a note"]
    assert begin_together(ValueError("damaged"), []) == []  # its caller raises it


def test_a_resumed_trl_checkpoint_without_its_rng_state_is_named(tmp_path):
    """Audit 113 F4: a TRL checkpoint copied without one process's rng_state_R.pth resumed
    without a word (transformers says it at INFO) and did not end as the uninterrupted run.
    The checkpoint is the one train() was given by path (read from transformers' loop), else
    output_dir's checkpoint of the step."""
    from types import SimpleNamespace

    from sae_shards.capture.trl_checkpoints import missing_rng_state, resumed_checkpoint

    given = tmp_path / "copied" / "checkpoint-4"
    given.mkdir(parents=True)
    own = tmp_path / "out" / "checkpoint-4"
    own.mkdir(parents=True)
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), process_index=1, world_size=2,
                           save_only_model=False)

    def _inner_training_loop(resume_from_checkpoint):  # transformers' loop, as the stack has it
        return resumed_checkpoint(args, 4)

    assert _inner_training_loop(str(given)) == given
    assert _inner_training_loop(None) == own  # resume_from_checkpoint=True: output_dir's
    assert resumed_checkpoint(args, 4) == own
    assert resumed_checkpoint(args, 5) is None
    assert missing_rng_state(given, args) == (
        f"{given} holds no rng_state_1.pth, the random state of process 1: transformers resumes "
        "without it, so that process's generations from here on, and the shards, are not the "
        "uninterrupted run's; to resume exactly, copy the file from the run's own checkpoint "
        "(each process saves its own, on its node's disk)")
    (given / "rng_state_1.pth").write_bytes(b"")
    assert missing_rng_state(given, args) is None
    one = SimpleNamespace(process_index=0, world_size=1, save_only_model=False)
    assert "holds no rng_state.pth, the random state of process 0" in missing_rng_state(given, one)
    assert missing_rng_state(given, SimpleNamespace(**{**vars(one), "save_only_model": True})) \
        is None  # no RNG state is saved at all: warned about apart
    assert missing_rng_state(None, args) is None


@launches
def test_a_two_process_sweep_goes_on_past_a_job_whose_checkpoint_is_refused(tmp_path):
    """Audit 113 F9: a sweep resumed under 2 processes hung when rank 0 refused one job's
    checkpoint as it loaded it: rank 0 went on to the next job while rank 1 was inside the
    refused one's first generation. Both jobs are cut back to their step-2 checkpoint (as a
    kill after step 3 leaves them), one job's shards damaged: it is refused once, on every
    rank, and the other job resumes to its end."""
    sweep = tmp_path / "sweep"
    launch = _ddp_launch()
    job = ["-m", "sae_shards.cli", "train", "-m", "sae.k=2,4", "rl.max_steps=3",
           "runner.checkpoint_every=2", "logging=disabled", f"run_dir={sweep}",
           "runner.min_samples=2"]
    _run([*launch, "--main_process_port", str(_free_port()), *job], tmp_path)
    runs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert len(runs) == 2, runs
    for run in runs:  # killed in step 3's checkpoint (TRL's side unwritten), before the end
        for name in ("summary.json", "activations.safetensors", "checkpoints/final",
                     "final_model", "trl/checkpoint-3"):
            path = run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    _resume_past_damaged_shards(
        launch, job, runs[0] / "checkpoints" / "step_000002" / "sae.safetensors", tmp_path)
    summary = json.loads((runs[1] / "summary.json").read_text())
    assert summary["rl_steps"] == 3 and not summary["interrupted"]
    assert not (runs[0] / "summary.json").exists()


def test_resuming_on_another_number_of_processes_is_refused(tmp_path):
    from sae_shards.capture.callback_args import check_same_world

    (tmp_path / "config.json").write_text(json.dumps({"world_size": 2}))
    with pytest.raises(ValueError, match="trained on 2 process.*resumed on 1.*accelerate launch "
                                         "--multi_gpu --num_processes 2: on CPU too"):
        check_same_world(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"world_size": 1}))
    check_same_world(tmp_path)


def test_resuming_under_another_distribution_is_refused_naming_the_launch(tmp_path):
    """TRL's checkpoint is in the format of the distribution it was trained under (DeepSpeed's
    global_step*/, or the weights and optimizer beside it): a resume under another is refused
    before anything loads (with the record), or told so when loading fails (a run without the
    record), not advised that its checkpoint is damaged."""
    from transformers import Trainer, TrainingArguments

    from sae_shards.capture.callback_args import check_same_world
    from sae_shards.run.job import RefusedOnRankZero, _check_same_distribution, _other_format

    model = build_tiny_model(tmp_path / "model", hidden_size=16, num_layers=1, num_heads=2,
                             intermediate_size=32)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model),
                      args=TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True,
                                             report_to=[]))
    assert distributed.distribution(trainer, 1) == "one process"
    assert distributed.distribution(trainer, 2) == "DDP"
    launch = "accelerate launch --use_deepspeed --zero_stage 3 --num_processes 1"
    config = {"world_size": 1, "launch": launch, "distribution": "DeepSpeed ZeRO-3"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path} was trained under DeepSpeed ZeRO-3 and is resumed under one process: ")
            + ".*nothing of the checkpoint is damaged.*" + re.escape(f"started with ({launch})")):
        check_same_world(tmp_path, trainer)
    check_same_world(tmp_path)  # no trainer (a script's setup(model)): not known, not refused
    # sae-shards train checks it on every rank before TRL loads: rank 0 says why, others stop
    with pytest.raises(ValueError, match="was trained under DeepSpeed ZeRO-3"):
        _check_same_distribution(tmp_path, trainer, main=True)
    with pytest.raises(RefusedOnRankZero, match="was trained under DeepSpeed ZeRO-3"):
        _check_same_distribution(tmp_path, trainer, main=False)
    for recorded in ("one process", None):  # the same, or a run that recorded none
        (tmp_path / "config.json").write_text(json.dumps({**config, "distribution": recorded}))
        check_same_world(tmp_path, trainer)
    checkpoint = tmp_path / "trl" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    assert _other_format(checkpoint, trainer, tmp_path) is None  # its own format: damaged
    (checkpoint / "global_step2").mkdir()
    said = _other_format(checkpoint, trainer, tmp_path)
    assert said.startswith("it was written under DeepSpeed (its global_step*/ holds") and (
        f"resume it with the launch the run started with ({launch})" in said), said
    # a run that records its distribution was checked before training: a failure is damage
    (tmp_path / "config.json").write_text(json.dumps({**config, "distribution": "one process"}))
    assert _other_format(checkpoint, trainer, tmp_path) is None


def test_sae_shards_train_refuses_a_resume_on_another_process_count_before_hydra(
        tmp_path, capsys, monkeypatch):
    """The refusal comes before Hydra writes the run's .hydra/ (nothing written is changed)."""
    from sae_shards.cli import main

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"world_size": 2, "launch": "accelerate launch --use_fsdp --fsdp_version 2 "
                                    "--num_processes 2", "capture": {}, "sae": {}}))
    overrides = "- rl.max_steps=3\n"
    (run / ".hydra" / "overrides.yaml").write_text(overrides)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", f"run_dir={run}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "trained on 2 process(es) and is resumed on 1" in err
    assert "accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2" in err
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["overrides.yaml"]
    assert (run / ".hydra" / "overrides.yaml").read_text() == overrides


def test_a_group_split_between_ranks_is_refused():
    class Args:
        per_device_train_batch_size, steps_per_generation = 2, 1

    class Trainer:
        args, num_generations = Args(), 4

    with pytest.raises(ValueError, match="per_device_train_batch_size x steps_per_generation = 2"):
        _check_groups_within_ranks(Trainer(), "group")
    _check_groups_within_ranks(Trainer(), "completion")  # one row per event: never split


def test_a_rank_other_than_0_says_only_errors_of_its_own_and_labels_its_lines(monkeypatch):
    """Audit 113: under a launch both ranks wrote a resume's warnings into cli.log, rank 1's
    unlabelled (an incomplete checkpoint passed over, twice). On rank 1, sae-shards' records
    below ERROR are unsaid (a level the user set is kept); what it does say, and other
    libraries' warnings, carry its rank. Rank 0 is untouched."""
    import io
    import logging

    from sae_shards.cli.processes import speak_as_rank

    package = logging.getLogger("sae_shards")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level, root_level = package.level, root.level
    formats = {h: h.formatter for h in root.handlers}  # pytest's own: labelled on rank 1 too
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        for rank in ("0", "1"):
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setenv("WORLD_SIZE", "2")
            package.setLevel(logging.NOTSET)
            speak_as_rank()
            speak_as_rank()  # once per sweep job: labelled once
            logging.getLogger("sae_shards.capture.resume").warning("incomplete %s", rank)
            logging.getLogger("sae_shards.cli").error("failed %s", rank)
            logging.getLogger("another_library").warning("theirs %s", rank)
        package.setLevel(logging.INFO)  # the user's own choice: kept on rank 1
        speak_as_rank()
        logging.getLogger("sae_shards.capture").info("chosen")
    finally:
        root.removeHandler(handler)
        root.setLevel(root_level)
        package.setLevel(level)
        for h, fmt in formats.items():
            h.setFormatter(fmt)
    assert stream.getvalue().splitlines() == [
        "WARNING sae_shards.capture.resume: incomplete 0",
        "ERROR sae_shards.cli: failed 0",
        "WARNING another_library: theirs 0",
        "[rank 1] ERROR sae_shards.cli: failed 1",
        "[rank 1] WARNING another_library: theirs 1",
        "[rank 1] INFO sae_shards.capture: chosen"]


def test_a_callback_on_another_rank_gives_the_logger_back_when_it_lets_go(monkeypatch, tmp_path):
    """Audit 119: on a process whose RANK is not 0, ShardCallback lowered sae-shards' logger for
    the rest of the process (a notebook that sets RANK lost every later warning). It is quiet
    while the callback holds the run, heard again once it lets go; a construction that fails
    gives it back at once; a level the user set is never touched."""
    import logging

    import gc

    from sae_shards.capture.callback import ShardCallback

    package = logging.getLogger("sae_shards")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    package.setLevel(logging.NOTSET)
    callback = ShardCallback(tmp_path / "run")
    assert package.level == logging.ERROR  # quiet while it holds the run
    callback.close()
    assert package.level == logging.NOTSET
    callback.close()  # once: a user's level set since is kept
    with pytest.raises(ValueError, match="seed"):
        ShardCallback(tmp_path / "run", seed="0")
    assert package.level == logging.NOTSET
    package.setLevel(logging.INFO)  # the user's own choice
    ShardCallback(tmp_path / "run").close()
    assert package.level == logging.INFO
    monkeypatch.setenv("RANK", "0")  # rank 0 is never quieted
    package.setLevel(logging.NOTSET)
    callback = ShardCallback(tmp_path / "run0")
    assert package.level == logging.NOTSET
    callback.close()
    # Audit 122: two callbacks on one rank; the one left to the garbage collector (its
    # trainer failed, nobody closed it) no longer keeps the logger quiet for good, and the
    # first one to let go does not make the other's run speak
    monkeypatch.setenv("RANK", "1")
    first, second = ShardCallback(tmp_path / "run"), ShardCallback(tmp_path / "run")
    second.close()
    assert package.level == logging.ERROR  # the first still holds its run
    del first
    gc.collect()
    assert package.level == logging.NOTSET
