"""The main job end to end: real TRL GRPO, capture, ring buffer, SAE, checkpoints, W&B offline."""

import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import load_file

from transformers import TrainerCallback

from sae_shards.capture.event_sites import trl_fuses_lm_head
from sae_shards.core.checkpoint import load_checkpoint
from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.run.config import (CaptureConfig, JobConfig, LoggingConfig, LoraSettings,
                                   ModelConfig, RLConfig)
from sae_shards.run.job import (JobSetupError, build_rl, resolve_device, run_config, run_job,
                                shard_callback)
from sae_shards.recipe.models import load_model_and_tokenizer
from sae_shards.run.tracking import RunLogger

sys.path.insert(0, str(Path(__file__).parent))
from helpers import offline_run  # noqa: E402

SHORT = ["rl.max_steps=12", "runner.min_samples=4", "runner.sae_steps_per_rl_step=2",
         "runner.checkpoint_every=5", "task.n_prompts=64"]


def _job(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return job_config_from_hydra(compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize("concurrency", ["inline", "thread"])
def test_short_job_writes_loadable_shards(tmp_path, concurrency):
    run_dir = tmp_path / concurrency
    summary = run_job(_job([*SHORT, f"runner.concurrency={concurrency}"]), run_dir)

    # every push processed: (12 - 4 + 1) pushes with a full enough buffer, 2 SAE steps each
    assert summary["rl_steps"] == 12 and summary["captured"] == 12
    assert summary["sae_steps"] == 9 * 2
    # the checkpoint loads, and its targets are exactly the captured parameters
    loaded = load_checkpoint(run_dir / "checkpoints" / "final")
    model = load_model_and_tokenizer(run_dir / "model").model
    params = dict(model.named_parameters())
    assert len(loaded.sae.targets) == 14  # 2 layers x (4 attention + 3 MLP) matrices
    for t in loaded.sae.targets:
        assert tuple(params[t.name].shape) == t.shape
    assert loaded.config["meta"]["rl_step"] == 12
    assert loaded.sae.input_scale > 0
    with safe_open(run_dir / "checkpoints" / "final" / "sae.safetensors", "pt") as f:
        assert f.get_tensor("b_enc").shape == (64,)
    # every runner.checkpoint_every steps, and at the last step (TRL saves there too)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "final", "step_000005", "step_000010", "step_000012"]

    # rollouts: one row per RL step, with the prompts, completions, rewards and labels
    rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(len(r["completions"]) == len(r["rewards"]) == 16 for r in rows)
    assert rows[0]["tasks"][0] == "letters" and rows[0]["prompts"][0].startswith("<A>")

    # activations: every buffered sample under the final SAE, online ones once the SAE had data
    acts = load_file(run_dir / "activations.safetensors")
    assert acts["final.rl_step"].tolist() == list(range(1, 13))
    assert acts["final.indices"].shape == (12, 4)
    assert (acts["final.values"] != 0).sum(1).eq(4).all()
    assert acts["online.rl_step"].numel() >= 1

    # W&B offline run: TRL and SAE metrics on their own step axes, the artifact logged
    run = offline_run(run_dir)
    assert {"train/reward", "sae/fvu", "sae/l0", "rl/step", "sae/step", "sae/rl_step"} <= run["keys"]
    assert run["metrics"]["sae/*"] == "sae/step" and run["metrics"]["train/*"] == "rl/step"
    assert run["artifacts"] == [f"shards-{concurrency}"]
    # its config is config.json's: the task as the run resolved it (target_length, from
    # rl.max_completion_length), the versions, the launch (one process here)
    recorded = json.loads((run_dir / "config.json").read_text())
    assert {k: v for k, v in run["config"].items() if k != "_wandb"} == recorded
    assert run["config"]["task"]["target_length"] == 16 and run["config"]["world_size"] == 1
    assert run["config"]["versions"]["torch"] == torch.__version__


def test_existing_run_dir_is_not_overwritten(tmp_path):
    (tmp_path / "checkpoints" / "final").mkdir(parents=True)
    with pytest.raises(JobSetupError, match=r"already holds a run.*overwrite=true"):
        run_job(_job([*SHORT, "logging=disabled"]), tmp_path)
    assert (tmp_path / "checkpoints" / "final").is_dir()


def test_wandb_failure_does_not_stop_logging_calls(tmp_path, caplog):
    (tmp_path / "wandb").write_text("a file where W&B wants its directory")
    logger = RunLogger.start(LoggingConfig(mode="offline"), tmp_path, {"a": 1})
    assert logger.n_failures == 1 and logger.run is None
    logger.log_sae({"fvu": 0.5}, 1)  # no-ops after a failed init, never raises
    logger.finish()
    assert "W&B init failed" in caplog.text


@pytest.mark.parametrize("variable, value", [("WANDB_MODE", "disabled"), ("WANDB_DISABLED", "true")])
def test_wandb_turned_off_in_the_environment_is_off(tmp_path, monkeypatch, variable, value):
    """WANDB_MODE=disabled (a shell's or cluster's way to turn W&B off for every tool) was
    overridden by logging.mode=offline: every run still wrote W&B files and a W&B process."""
    monkeypatch.setenv(variable, value)
    logger = RunLogger.start(LoggingConfig(mode="offline"), tmp_path, {"a": 1})
    assert logger.run is None and not (tmp_path / "wandb").exists()
    monkeypatch.delenv(variable)
    logger = RunLogger.start(LoggingConfig(mode="offline"), tmp_path, {"a": 1})
    assert logger.run is not None
    logger.finish()


@pytest.mark.slow  # a Hydra sweep of subprocesses, run twice (~25 s)
def test_multirun_sweep(tmp_path, capsys):
    sweep = ["-m", "sae.k=2,4,8", "rl.max_steps=4", "runner.min_samples=2", "task.n_prompts=16",
             "logging=disabled", f"run_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "sae_shards.cli", "train", *sweep],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is_gradient_checkpointing" not in proc.stderr  # TRL's, about transformers: dropped
    # transformers' bars for each model loaded or saved, between the log lines: dropped
    assert "Writing model shards" not in proc.stderr and "Loading weights" not in proc.stderr
    for k in (2, 4, 8):
        (job_dir,) = tmp_path.glob(f"*sae.k={k}*")  # named after the job's overrides
        loaded = load_checkpoint(job_dir / "checkpoints" / "final")
        assert loaded.sae.cfg.k == k
        acts = load_file(job_dir / "activations.safetensors")
        assert acts["final.indices"].shape[1] == k
    # the sweep again with resume=true: a finished job is skipped, untouched; a job that never
    # started (here: its directory removed) is started; other threads name the same jobs
    (done,) = tmp_path.glob("*sae.k=2*")
    (missing,) = tmp_path.glob("*sae.k=4*")
    shutil.rmtree(missing)
    # a job killed before its first checkpoint was whole: what it wrote is replaced; it was
    # refused ("already holds a run") on every resume of the sweep (audit 133 F6)
    (early,) = tmp_path.glob("*sae.k=8*")
    for name in ("summary.json", "checkpoints", "resume", "trl", "final_model",
                 "activations.safetensors"):
        shutil.rmtree(early / name) if (early / name).is_dir() else (early / name).unlink()
    before = (done / "summary.json").read_text()
    proc = subprocess.run([sys.executable, "-m", "sae_shards.cli", "train", *sweep, "resume=true",
                           "runner.torch_threads=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{done} finished (4 RL steps) earlier: skipped" in proc.stdout
    assert (done / "summary.json").read_text() == before
    assert load_checkpoint(missing / "checkpoints" / "final").sae.cfg.k == 4
    assert (f"{missing}: no checkpoint of this job in the sweep (it never started, or the "
            "earlier command named it otherwise): started from the beginning") in proc.stdout
    assert (f"{early}: no checkpoint of this job in the sweep (it stopped before its first "
            "checkpoint was written whole: what it wrote is replaced): started from the "
            "beginning") in proc.stdout
    assert load_checkpoint(early / "checkpoints" / "final").sae.cfg.k == 8
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
        [done.name, missing.name, early.name])
    # a single run into the sweep's directory is refused before Hydra writes there, and a plain
    # overwrite=true too: it would mix with the jobs, and the sweep could not be resumed
    # (in this process: the refusals come before anything a real process would add)
    from sae_shards.cli import main as cli_main

    listing = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    for extra in ([], ["overwrite=true"]):
        assert cli_main(["train", "rl.max_steps=4", "logging=disabled", f"run_dir={tmp_path}",
                         *extra]) == 2
        err = capsys.readouterr().err
        assert "holds a sweep (multirun.yaml" in err, err[-3000:]
        assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_lora_job_captures_effective_delta(tmp_path):
    summary = run_job(_job([*SHORT, "model=tiny_lora", "logging=disabled",
                            "model.lora.target_modules=[q_proj]",
                            "capture.targets=[*layers.*.self_attn.q_proj.weight]"]), tmp_path)
    assert summary["captured"] == 12 and summary["zero_samples"] < 12
    loaded = load_checkpoint(tmp_path / "checkpoints" / "final")
    assert [t.name for t in loaded.sae.targets] == [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    assert loaded.config["meta"]["lora"] is True
    # analysis: the final policy is the base with the adapter merged (the effective weights)
    from html import escape

    from sae_shards.analysis.report import analyze
    from sae_shards.analysis.shards import load_run_models

    models = load_run_models(tmp_path)
    initial, final = (dict(m.named_parameters()) for m in (models.initial, models.final))
    assert initial.keys() == final.keys()
    changed = {n for n in initial if not torch.equal(initial[n], final[n])}
    assert changed == {f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)}  # adapted
    html = analyze(tmp_path, tmp_path / "report.html", n_shards=1, n_prompts=4,
                   alphas=(0.0, 1.0)).read_text()
    # the shards' parameters are all the run changed: the span's reference is the run itself
    assert json.loads((tmp_path / "analysis.json").read_text())["together"]["whole_is_run"]
    assert escape("(= theta_0: the shards' parameters are all the run changed)") in html
    assert "Needs the run's initial and final model" not in html
    assert "<img" in html.split('id="dose-response"')[1]  # the merged policy was steered
    assert "a LoRA adapter is trained" in html


@pytest.mark.parametrize("override,targets", [
    ("rl=rloo", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"]),
    ("model.arch=gpt2", ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                         "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]),
])
def test_rloo_and_gpt2_jobs_capture_every_block_matrix(tmp_path, override, targets):
    summary = run_job(_job([*SHORT, override, "logging=disabled"]), tmp_path)
    assert summary["captured"] == 12 and summary["zero_samples"] < 12 and summary["sae_steps"] > 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rl"]["algorithm"] == ("rloo" if override == "rl=rloo" else "grpo")
    loaded = load_checkpoint(tmp_path / "checkpoints" / "final")
    names = [t.name for t in loaded.sae.targets]
    assert names[:len(targets)] == targets and len(names) == 2 * len(targets)  # both layers
    assert all(n.replace(".0.", ".1.", 1) in names for n in targets)


def test_a_batch_topk_run_is_analysed(tmp_path, capsys):
    """batch_topk's codes vary in width from sample to sample: its run's activation log is read
    (it was refused as "copied in from another run" for not holding sae.k per row)."""
    from sae_shards import RunView
    from sae_shards.cli import main as cli_main

    run_job(_job([*SHORT, "sae.sparsity=batch_topk", "logging=disabled"]), tmp_path)
    view = RunView(tmp_path)
    widths = (view.activations["final.values"] != 0).sum(1)  # [samples]
    assert view.activations["final.indices"].shape[1] != 4 or widths.unique().numel() > 1
    assert cli_main(["analyze", str(tmp_path), "--no-dose", "--shards", "2"]) == 0, \
        capsys.readouterr().err[-2000:]
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    assert len(analysis["shards"]) >= 2  # two detailed, beside the always-on ones
    assert all(0 < e["density"] <= 1 and e["top_steps"] for e in analysis["shards"].values())


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """The README's default job: reward rises and the SAE's FVU falls (about 2 minutes)."""
    summary = run_job(_job(["logging=disabled"]), tmp_path)
    assert summary["rl_steps"] == 150
    assert summary["reward_last"] > summary["reward_first"] + 0.2, summary
    assert summary["fvu_last"] < summary["fvu_first"] - 0.2, summary


class _TruthRecorder(TrainerCallback):
    """Independent record of each optimizer step's real parameter change (added before capture)."""

    def __init__(self, params):
        self.params, self.before, self.deltas = params, None, []

    def on_step_begin(self, args, state, control, **kwargs):
        if self.before is None:  # fires once per optimizer step; guard anyway
            self.before = {n: p.detach().float().clone() for n, p in self.params.items()}

    def on_step_end(self, args, state, control, **kwargs):
        self.deltas.append({n: p.detach().float() - self.before[n] for n, p in self.params.items()})
        self.before = None


@pytest.mark.parametrize("accumulation", [1, 2])
def test_grpo_capture_equals_parameter_change(tmp_path, accumulation):
    cfg = _job([*SHORT, "logging=disabled", "rl.max_steps=4",
                f"rl.gradient_accumulation_steps={accumulation}",
                "rl.per_device_train_batch_size=8"])
    rl = build_rl(cfg, tmp_path, resolve_device("cpu"))
    callback = shard_callback(cfg, tmp_path / "shards", save_model=False)  # the job's capture
    callback.setup(rl.trainer.model, rl.trainer)
    targets, buffer = callback.parts.targets, callback.parts.buffer
    truth = _TruthRecorder(targets)
    rl.trainer.add_callback(truth)
    rl.trainer.add_callback(callback)
    rl.trainer.train()
    assert len(truth.deltas) == 4 == len(buffer)
    for slot, want in zip(buffer.chronological_slots().tolist(), truth.deltas):
        got = buffer.gather([slot])
        for name in targets:
            assert torch.equal(got[name][0], want[name]), name
        assert any(bool(v.abs().sum() > 0) for v in want.values())  # the weights really moved


def test_a_multi_character_tokenizer_gets_a_target_length_in_characters(tmp_path):
    """model=hf_path with a tokenizer of whole words: the task's target is the completion
    budget in characters (with 16 characters the untrained model's first completions would
    already score 1, and GRPO would see no reward differences), and analysis rebuilds the same
    task from the run."""
    from transformers import AutoModelForCausalLM

    from sae_shards.analysis.shards import load_run_models
    from sae_shards.recipe.models import build_tiny_model, load_tokenizer
    from sae_shards.recipe.tasks import default_target_length

    model_dir = build_tiny_model(tmp_path / "tiny")
    tokenizer = load_tokenizer(model_dir)
    tokenizer.add_tokens(["the ", "and ", "rain", "ed ", "ing ", "er", "th", "re", "ou", "ea"])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.resize_token_embeddings(len(tokenizer))
    words_dir = tmp_path / "words"
    model.save_pretrained(str(words_dir))
    tokenizer.save_pretrained(str(words_dir))
    cfg = _job([*SHORT, "logging=disabled", "model=hf_path", f"model.path={words_dir}",
                "rl.max_completion_length=16"])
    rl = build_rl(cfg, tmp_path / "run", resolve_device("cpu"))
    task = rl.trainer.reward_funcs[0].__self__
    assert task.target_length == default_target_length(16, tokenizer) > 16
    run = tmp_path / "done"  # a run directory as the job writes it: config, initial and final
    (run / "final_model").mkdir(parents=True)
    model.save_pretrained(str(run / "final_model"))
    tokenizer.chat_template = "{{ messages[0]['content'] }}"  # set in a script: saved with the
    tokenizer.save_pretrained(str(run / "final_model"))      # final policy, not in model.path
    (run / "config.json").write_text(json.dumps(run_config(cfg, rl.task.target_length)))
    models = load_run_models(run)
    assert models.task.target_length == task.target_length
    assert models.tokenizer.chat_template == tokenizer.chat_template  # the one training used


SETUP_ERRORS = [
    # the policy directory is checked with the config: a config error, nothing written
    ("model=hf_path model.path=/no/such/model", r"config error: model path /no/such/model is not "
                                                r"a directory"),
    ("model=hf_path model.path={encoder}", r"config error: model path .* was saved as BertModel "
                                           r"\(config.json architectures\), not as a causal LM "
                                           r".*AutoModelForCausalLM"),
    ("model=hf_path model.path={run}", r"config error: model path .* is a sae-shards run "
                                       r"directory, not a model; the policy it trained is "
                                       r".*final_model"),
    # the rest need the model built (its memory) or the run directory read
    ("capture.capacity=100000000", r"capture.capacity|bf16|bfloat16"),
    ("sae.n_latents=100000000", r"(?s)the SAE needs more than .* To fit:\n  - sae.n_latents="
                                r"\d+, with this batch"),
    ("sae.batch_size=10000000", r"(?s)the SAE needs more than .* sae.batch_size=\d+, with these "
                                r"latents"),
    ("resume=true", r"resume=true but run_dir=.* holds no resumable run"),
    # refused by the capture as training begins, with the trainer's optimizer in hand (audit
    # 116 B2: Hydra's traceback; under a launch the other rank died of a lost connection)
    ("capture.source=precond +rl.extra.optim=sgd", r"capture.source='precond' needs "
                                                   r"torch.optim.Adam/AdamW, but .*SGD"),
]


def _setup_error_case(tmp_path: Path, i: int) -> tuple[list[str], str, Path]:
    """The ``sae-shards train`` arguments of ``SETUP_ERRORS[i]``, its message and its run_dir."""
    run = tmp_path / "a_run"  # what a run directory holds at its top, for model.path={run}
    (run / "final_model").mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text("{}")
    run_dir = tmp_path / str(i)  # an empty run directory (resume=true needs one to exist)
    run_dir.mkdir()
    override, message = SETUP_ERRORS[i]
    encoder = tmp_path / "encoder"  # a bare encoder saved with its tokenizer: no LM head
    if "{encoder}" in override:
        from transformers import BertConfig, BertModel

        from sae_shards.recipe.models import build_tokenizer

        tokenizer = build_tokenizer()
        BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=32)).save_pretrained(encoder)
        tokenizer.save_pretrained(encoder)
    return ["train", *override.format(run=run, encoder=encoder).split(), "logging=disabled",
            f"run_dir={run_dir}"], message, run_dir


def _assert_refused(rc: int, err: str, message: str, run_dir: Path) -> None:
    assert rc == 2, err[-2000:]
    assert re.search(message, err), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    if "config error:" in message:  # refused with the config: the empty run_dir left empty
        assert "sae-shards: config error: model path" in err, err[-2000:]
        assert not list(run_dir.iterdir())
    else:  # a resume's refusal is said as one
        said = "cannot resume" if "resume=true" in message else "cannot start"
        assert f"sae-shards: {said}:" in err, err[-2000:]
        assert not (run_dir / "checkpoints").exists()


def test_a_setup_error_ends_a_real_process_cleanly(tmp_path):
    """A real `sae-shards train` process: exit 2 with its message, no traceback, nothing
    trained (the other cases run in-process, below: most of a process is its imports)."""
    args, message, run_dir = _setup_error_case(tmp_path, 2)
    done = subprocess.run([sys.executable, "-m", "sae_shards.cli", *args], capture_output=True,
                          text=True, timeout=300)
    _assert_refused(done.returncode, done.stderr, message, run_dir)


@pytest.mark.parametrize("i", range(len(SETUP_ERRORS)), ids=[o for o, _ in SETUP_ERRORS])
def test_setup_errors_are_reported_cleanly(tmp_path, capsys, i):
    from sae_shards.cli import main

    args, message, run_dir = _setup_error_case(tmp_path, i)
    rc = main(args)
    _assert_refused(rc, capsys.readouterr().err, message, run_dir)


def test_a_job_refused_at_setup_leaves_no_wandb_run(tmp_path, capsys):
    """The SAE too large for memory is found once the model is built; the job's offline W&B
    run starts after that, so a refused job leaves no failed run behind."""
    from sae_shards.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "sae.n_latents=100000000", "logging=offline",
                 f"run_dir={run_dir}"]) == 2
    assert "sae-shards: cannot start: the SAE needs more than" in capsys.readouterr().err
    assert (run_dir / "model").is_dir()  # it got as far as building the policy
    assert not (run_dir / "wandb").exists()


@pytest.mark.parametrize("override,message", [
    ("+task.options.bogus=1", r"\['task.options.bogus'\] are not options of task 'letters'"),
    ("task.options.target_char=xyz", r"\['task.options.target_char'\] are not options"),
    ("+rl.extra.save_steps=3", r"\['save_steps'\] are set by sae-shards from "
                               r"runner.checkpoint_every"),
    ("rl.extra.bogus_field=1", r"\['rl.extra.bogus_field'\] are not trl.GRPOConfig fields"),
    # values TRL took only to fail deep inside the run, after files were written (audit 143)
    ("+rl.extra.weight_decay=abc", r"rl.extra.weight_decay='abc': trl.GRPOConfig takes float"),
    ("+rl.extra.max_grad_norm=null", r"rl.extra.max_grad_norm=None: trl.GRPOConfig takes float"),
    ("+rl.extra.num_iterations=0", r"rl.extra.num_iterations=0 must be >= 1"),
    pytest.param("+rl.extra.use_vllm=true", r"rl.extra.use_vllm=true needs vLLM, which is not "
                                            r"installed", marks=pytest.mark.skipif(
        importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")),
    ("+rl.extra.optim=adamw", r"rl.extra.optim='adamw' is not one of trl.GRPOConfig's choices "
                              r"there: .*adamw_torch"),
    ("+rl.extra.num_train_epochs=3", r"rl.extra.num_train_epochs has no effect: sae-shards "
                                     r"train always sets rl.max_steps"),
    ("task=multiskill task.options.schedule=weekly",
     r"task.options.schedule='weekly' is not one of \['random'"),
    # a target per-event hooks cannot split (the readout's norm), from the meta policy
    ("capture=readout capture.granularity=group", r"per-event capture target 'model.norm.weight'"
                                                  r" is the 'weight' of a Qwen2RMSNorm"),
    # per-task reward scales that TRL's default per-group std scaling would cancel
    ("task=multiskill task.options.reward_scale={B:2.0}",
     r"task.options.reward_scale has no effect under rl scale_rewards='group'"),
    # refused only once the tiny model was built (.hydra, .lock and model/ left behind)
    ("rl.trainable=[model.layers.*] model=tiny_lora",
     r"rl.trainable cannot be combined with model.lora.enabled=true"),
    # a reward the tiny model cannot earn: every reward 0, and the run trained to its end
    ("task.options.target_chars='é'", r"task.options.target_chars: the policy's tokenizer "
                                      r"writes none of the characters that earn the reward"),
    ("rl.extra.fp16=true device=cpu", r"rl.extra.fp16=true needs a GPU: this run trains on "
                                      r"the CPU"),
    # a decoder bias per event (was refused only once the policy was built)
    ("capture.granularity=group sae.use_b_dec=true",
     r"sae.use_b_dec=true is not supported with factored \(per-event\) samples"),
    # bf16 autocast and Adam's preconditioner under LoRA, per event (audit 139 F1: refused
    # once the policy was built, model/ and trl/ written)
    ("capture.granularity=group sae.autocast_bf16=true",
     r"sae.autocast_bf16=true is not supported with factored \(per-event\) samples"),
    ("model=tiny_lora capture.granularity=group capture.precondition=adam",
     r"capture.precondition=adam is not supported with model.lora.enabled=true"),
    # the policy's parameter names, from its config on the meta device (no model loaded)
    ("capture.targets=[*no_such_weight*]", r"'\*no_such_weight\*' matches no .*model.layers.\*"),
    ("rl.trainable=[model.layer.*]", r"rl.trainable pattern 'model.layer.\*' matches no "
                                     r"parameter .*model.layers.0"),
    ("rl.trainable=[model.layers.0.*] capture.targets=[model.layers.1.mlp.down_proj.weight]",
     r"'model.layers.1.mlp.down_proj.weight' matches parameters that never change: .* "
     r"include them in rl.trainable"),
    ("model.lora.enabled=true model.lora.target_modules=[query_key_value]",
     r"model.lora.target_modules=\['query_key_value'\]: \['query_key_value'\] name no linear "
     r"layer of Qwen2ForCausalLM; its linear layers are named \[.*'q_proj'"),
    # one name the model has and one it lacks: peft would adapt the first alone, silently
    ("model=tiny_lora model.lora.target_modules=[q_proj,foo]",
     r"\['foo'\] name no linear layer of .*'v_proj'"),
    # a target LoRA does not adapt (the policy wrapped in the job's adapter on the meta device)
    ("model=tiny_lora model.lora.target_modules=[q_proj,v_proj] "
     "capture.targets=[*mlp.down_proj.weight]",
     r"'\*mlp.down_proj.weight' matches parameters that never change: .* add their modules to "
     r"the LoRA target_modules"),
    # a norm's gain under LoRA: no adapter can take it (audit 137 F8: the advice above, which
    # was then refused as 'name no linear layer')
    ("model=tiny_lora capture.targets=[model.layers.*.input_layernorm.weight]",
     r"'model.layers.\*.input_layernorm.weight' matches parameters that never change: .* leave "
     r"them out: they are not weight matrices, and LoRA adapts only those"),
])
def test_task_options_and_trl_settings_are_config_errors_before_anything_is_written(
        tmp_path, capsys, override, message):
    """Keys passed on to the task and to TRL, and the parameter patterns, are checked with the
    rest of the config: a single run and a sweep are refused before a model is built or a
    directory made."""
    from sae_shards.cli import main

    for sweep in ([], ["-m", "seed=1,2"]):
        run_dir = tmp_path / f"r{len(sweep)}"
        assert main(["train", *sweep, *override.split(), "logging=disabled",
                     f"run_dir={run_dir}"]) == 2
        err = capsys.readouterr().err
        assert "sae-shards: config error:" in err and re.search(message, err), err[-2000:]
        assert "(no job was started)" in err or not sweep
        assert not run_dir.exists()
        assert not [h for h in logging.getLogger().handlers  # no cli.log handler left behind
                    if str(run_dir) in str(getattr(h, "baseFilename", ""))]


@pytest.mark.skipif(not trl_fuses_lm_head(), reason="this TRL runs lm_head as a module")
def test_the_lm_head_per_event_is_a_config_error_before_anything_is_written(tmp_path, capsys):
    """TRL's fused LM head never calls lm_head's module, so per-event hooks on it see nothing: a
    run that captured only it once trained to its end with zero events. Now refused with the
    config, from the policy's config alone."""
    from sae_shards.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "capture.granularity=group", "capture.targets=[lm_head.weight]",
                 "logging=disabled", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"sae-shards: config error: per-event capture target lm_head.weight belongs "
                     r"to the LM head .*\(capture.granularity=step\)", err), err[-2000:]
    assert not run_dir.exists()


def test_a_run_that_failed_before_its_first_step_does_not_block_a_retry(tmp_path):
    from sae_shards.run import rundir

    # what a failed start leaves: its config, empty logs
    (tmp_path / rundir.CONFIG).write_text('{"capture": {}, "sae": {}}')
    for name in (rundir.ROLLOUTS, rundir.EVENTS, rundir.METRICS):
        (tmp_path / name).touch()
    (tmp_path / rundir.CHECKPOINTS).mkdir()
    assert rundir.prepare_run_dir(tmp_path, overwrite=False) == tmp_path
    (tmp_path / rundir.ROLLOUTS).write_text('{"step": 1}\n')  # one logged step: a run
    with pytest.raises(FileExistsError, match=r"already holds a run \(rollouts.jsonl\)"):
        rundir.prepare_run_dir(tmp_path, overwrite=False)


def test_a_lock_file_linked_out_of_the_run_is_refused_and_its_target_untouched(tmp_path):
    """A run directory from elsewhere whose .lock is a symbolic link to a file outside it (a
    shell's rc file): preparing the run refuses it, naming the link, and writes nothing through
    it (before, the target was truncated and overwritten with the holder's pid)."""
    from sae_shards.run import rundir

    precious = tmp_path / "bashrc"
    precious.write_text("export PATH=...\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK).symlink_to(precious)
    with pytest.raises(FileExistsError, match=rf"{run / rundir.LOCK} is a symbolic link \(to "
                                              rf"{precious}\).*remove the link"):
        rundir.prepare_run_dir(run, overwrite=False, resume=True)
    assert precious.read_text() == "export PATH=...\n"
    with pytest.raises(JobSetupError, match="is a symbolic link"):  # said without a traceback
        run_job(_job([f"run_dir={run}", "resume=true"]), run)
    assert precious.read_text() == "export PATH=...\n"


def test_a_fresh_start_never_appends_through_a_log_linked_out_of_the_run(tmp_path):
    """A run directory from elsewhere whose logs are symbolic links out of it, to an empty file
    (not an earlier run's results) or to nothing: a fresh start removes the links, never their
    targets, so the run's logs are its own files (before, it appended through them)."""
    from sae_shards.run import rundir

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "empty.jsonl").touch()
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.ROLLOUTS).symlink_to(outside / "empty.jsonl")
    (run / rundir.METRICS).symlink_to(outside / "missing.jsonl")  # dangling
    rundir.prepare_run_dir(run, overwrite=False)
    rundir.release_run_dir(run)
    assert not (run / rundir.ROLLOUTS).is_symlink() and not (run / rundir.METRICS).is_symlink()
    rundir.JsonLines(run / rundir.ROLLOUTS).append({"step": 1})
    rundir.JsonLines(run / rundir.METRICS).append({"rl_step": 1})
    assert (outside / "empty.jsonl").read_text() == "" and sorted(
        p.name for p in outside.iterdir()) == ["empty.jsonl"]
    assert rundir.read_jsonl(run / rundir.ROLLOUTS) == [{"step": 1}]


def test_one_process_writes_a_run_dir_at_a_time(tmp_path):
    """A live process holding the run directory (e.g. the workers of an accelerate launch whose
    launcher was killed) makes a second start or resume refuse, naming it; once it dies, even
    by kill -9, the directory is free. The holder itself may prepare it again."""
    from sae_shards.run import rundir

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom sae_shards.run import rundir\n"
         f"rundir.prepare_run_dir({str(run)!r}, overwrite=False)\nprint('held', flush=True)\n"
         "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for resume in (False, True):
            with pytest.raises(rundir.RunDirBusy, match=rf"written by another process \(pid "
                               rf"{holder.pid} on .*pgrep -af sae_shards.cli lists those of "
                               r"sae-shards train"):
                rundir.prepare_run_dir(run, overwrite=True, resume=resume)
        (run / rundir.ROLLOUTS).write_text('{"step": 1}\n')  # nothing was removed or written
        (run / rundir.CONFIG).write_text('{"capture": {}, "sae": {}}')  # (a run writes it first)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(FileExistsError, match="already holds a run"):  # free, and refused as usual
        rundir.prepare_run_dir(run, overwrite=False)
    assert rundir.prepare_run_dir(run, overwrite=True) == run  # the refusal let the lock go
    assert not (run / rundir.ROLLOUTS).exists()
    assert rundir.prepare_run_dir(run, overwrite=True) == run  # held by this process: again
    busy = subprocess.run([sys.executable, "-c", "from sae_shards.run import rundir\n"
                           f"rundir.prepare_run_dir({str(run)!r}, overwrite=True)"],
                          capture_output=True, text=True)
    assert busy.returncode != 0 and "RunDirBusy" in busy.stderr
    rundir.release_run_dir(run)  # holds in one process are counted: one of two let go
    still = subprocess.run([sys.executable, "-c", "from sae_shards.run import rundir\n"
                            f"rundir.prepare_run_dir({str(run)!r}, overwrite=True)"],
                           capture_output=True, text=True)
    assert still.returncode != 0 and "RunDirBusy" in still.stderr
    rundir.release_run_dir(run)
    free = subprocess.run([sys.executable, "-c", "from sae_shards.run import rundir\n"
                           f"rundir.prepare_run_dir({str(run)!r}, overwrite=True)"],
                          capture_output=True, text=True)
    assert free.returncode == 0, free.stderr


def test_a_saved_models_run_records_no_tiny_model_shape(tmp_path):
    """config.json (and the W&B config) of a model.path run recorded the tiny model's arch
    qwen2 and hidden_size 64 for any saved model (a Llama one, say): left out now."""
    from sae_shards.recipe.models import build_tiny_model

    path = build_tiny_model(tmp_path / "llama", arch="llama")
    recorded = run_config(_job(["model=hf_path", f"model.path={path}"]))["model"]
    assert recorded["path"] == str(path.resolve())
    assert not {"arch", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "readout_scale"} & recorded.keys()
    assert run_config(_job([]))["model"]["arch"] == "qwen2"  # the tiny model's are its own


def test_a_model_directory_is_never_taken_for_a_run_dir(tmp_path, capsys):
    """run_dir pointing at a model folder (run_dir=model.path, a slip) is refused before anything
    is written or removed, with or without overwrite: its config.json survives."""
    from sae_shards.cli import main
    from sae_shards.recipe.models import build_tiny_model
    from sae_shards.run import rundir

    model = build_tiny_model(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    for extra in ([], ["overwrite=true"], ["resume=true"], ["-m", "sae.k=2,4"]):
        rc = main(["train", f"run_dir={model}", "model=hf_path", f"model.path={model}",
                   "rl.max_steps=2", "runner.min_samples=1", "logging.mode=disabled", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "holds a model or another tool's files (config.json of a model" in err
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    assert not (model / rundir.LOCK).exists() and not (model / rundir.HYDRA).exists()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"\(adapter_config.json\)"):
        rundir.prepare_run_dir(adapter, overwrite=True)



def test_a_resume_that_is_neither_a_flag_nor_auto_names_auto(tmp_path, capsys):
    """Audit 143 F7: resume=maybe was told 'expected bool', though resume=auto is taken too."""
    from sae_shards.cli import main

    assert main(["train", "resume=maybe", f"run_dir={tmp_path / 'run'}"]) == 2
    assert ("sae-shards: config error: resume='maybe': expected true, false or auto"
            in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("plant, named", [
    ({"config.json": '{"experiment": "my notes", "lr": 0.1}'},
     "a config.json that is not a sae-shards run's"),
    ({"config.json": "not json"}, "a config.json that is not JSON"),
    ({"checkpoints/checkpoint-500/model.safetensors": "w", "wandb/offline-run-1/run.wandb": "x"},
     "checkpoints/ with checkpoint-500 (not a run's step or final checkpoint)"),
    ({"wandb/offline-run-1/run.wandb": "x", "metrics.jsonl": '{"loss": 1}\n'},
     "wandb/, metrics.jsonl without a config.json: a run writes its config.json first, so these "
     "are another tool's files, or a copy of a run that lost its config.json (copy it again"),
])
def test_a_directory_of_the_users_own_files_is_never_written_over(tmp_path, capsys, plant,
                                                                   named):
    """Audit 143 F1, F2: a config.json of the user's own was silently replaced by the run's, and
    a project directory with another trainer's checkpoints/ was called 'a run', which
    overwrite=true and resume=auto then deleted with the user's wandb/. Both are refused now,
    by plain starts, overwrite and resume=auto alike, and nothing there changes."""
    from sae_shards.cli import main
    from sae_shards.run import rundir

    project = tmp_path / "project"
    for name, text in {**plant, "train.py": "print(1)"}.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    for extra in ([], ["overwrite=true"], ["resume=auto"]):
        rc = main(["train", f"run_dir={project}", "rl.max_steps=2", "runner.min_samples=1",
                   "logging.mode=disabled", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and named in err and "not a sae-shards run" in err, (extra, err)
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before
    with pytest.raises(FileExistsError, match=re.escape(named)):  # a script's ShardCallback
        rundir.prepare_run_dir(project, overwrite=True)
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before
    # beside a run's config.json an entry of checkpoints/ is the user's, in a run all the same
    # (audit 144: a ShardSet saved as checkpoints/top2 made the run's resume refused)
    run = tmp_path / "run"
    (run / "checkpoints" / "top2").mkdir(parents=True)
    (run / "config.json").write_text('{"capture": {}, "sae": {}}')
    assert rundir.foreign_files(run) == []
    # an unreadable config.json (another user's run, a dangling link) is not called "not JSON":
    # the permission check that follows names the cause (audit 144 F4)
    (run / "config.json").unlink()
    (run / "config.json").symlink_to(tmp_path / "gone.json")
    assert rundir.foreign_files(run) == []


def test_the_planted_benchmarks_shared_final_model_is_its_own(tmp_path):
    """Audit 149 F2: run_planted writes one RL run's final_model/ at the top of a directory
    with no config.json, beside the captures' run directories that link to it; the rule that
    a run writes its config.json first refused every second sweep into the same --runs."""
    from sae_shards.run import rundir

    top = tmp_path / "planted"
    (top / "final_model").mkdir(parents=True)
    (top / "final_model" / "model.safetensors").write_text("w")
    capture = top / "body-event"
    capture.mkdir()
    (capture / "config.json").write_text('{"capture": {}, "sae": {}}')
    assert rundir.foreign_files(top) == ["final_model/ without a config.json: a run writes "
                                         "its config.json first, so these are another tool's "
                                         "files, or a copy of a run that lost its config.json "
                                         "(copy it again from the run)"]
    (capture / "final_model").symlink_to(Path("..") / "final_model")
    assert rundir.foreign_files(top) == []
    (capture / "config.json").write_text('{"model_type": "qwen2"}')  # no run's: not shared
    assert rundir.foreign_files(top) != []


def test_overwrite_removes_the_runs_config_last(tmp_path, monkeypatch):
    """Audit 143 F1b: a run writes its wandb/ and logs only after its config.json, so beside no
    config.json they are the user's (refused above). A removal killed half-way must leave the
    config.json, or the run's own wandb/ would then be refused as foreign."""
    import shutil

    from sae_shards.run import rundir

    run = tmp_path / "run"
    (run / "wandb" / "offline-run-1").mkdir(parents=True)
    (run / "wandb" / "offline-run-1" / "run.wandb").write_text("x")
    (run / "metrics.jsonl").write_text('{"loss": 1}\n')
    (run / "config.json").write_text('{"capture": {}, "sae": {}}')

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        rundir.prepare_run_dir(run, overwrite=True)
    monkeypatch.undo()
    assert (run / "config.json").is_file() and rundir.foreign_files(run) == []
    rundir.prepare_run_dir(run, overwrite=True)
    rundir.release_run_dir(run)
    assert not any((run / name).exists() for name in ("config.json", "wandb", "metrics.jsonl"))

def _broken_model(tmp_path: Path, how: str) -> Path:
    """The tiny model saved, then broken as a user's directory can be."""
    from sae_shards.recipe.models import TOKENIZER_FILES, build_tiny_model

    path = build_tiny_model(tmp_path / how)
    if how == "no_tokenizer":
        for name in (*TOKENIZER_FILES, "special_tokens_map.json"):
            (path / name).unlink(missing_ok=True)
    elif how == "no_eos":
        config = json.loads((path / "tokenizer_config.json").read_text())
        config.update(eos_token=None, pad_token=None)
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        (path / "special_tokens_map.json").unlink(missing_ok=True)
    elif how == "small_embedding":
        config = json.loads((path / "config.json").read_text())
        config["vocab_size"] = 8  # as if tokens were added to the tokenizer without a resize
        (path / "config.json").write_text(json.dumps(config))
    elif how == "no_weights":
        (path / "model.safetensors").unlink()
    elif how == "no_architectures":  # a config saved alone (LlamaConfig(...).save_pretrained)
        config = json.loads((path / "config.json").read_text())
        del config["architectures"]
        (path / "config.json").write_text(json.dumps(config))
    elif how.startswith("truncated"):  # a partial copy: header cut, or the last bytes missing
        weights = path / "model.safetensors"
        size = 1000 if how == "truncated_header" else weights.stat().st_size - 100
        with open(weights, "r+b") as f:
            f.truncate(size)
    return path


@pytest.mark.parametrize("how, message", [
    ("no_tokenizer", r"has no tokenizer files \(none of tokenizer.json, .*save the tokenizer"),
    ("no_eos", r"has neither an eos_token nor a pad_token: .*tokenizer_config.json"),
    ("small_embedding", r"has \d+ tokens but the model embeds 8 .*resize_token_embeddings"),
    # a partial copy was safetensors' bare error from inside TRL, a traceback (and in a sweep,
    # exit 1 after the other jobs, without naming the file)
    ("truncated_header", r"model.safetensors: cannot be read as safetensors \(.*invalid header "
                         r"length\); the file is truncated or damaged — copy or download the "
                         r"model directory .* again"),
    ("truncated_data", r"model.safetensors: cannot be read as safetensors \(.*file not fully "
                       r"covered\); the file is truncated"),
    # both passed every check and died inside TRL with a traceback
    ("no_weights", r"model path .*no_weights has no weight files \(model.safetensors, .*save the "
                   r"model there with save_pretrained"),
    ("no_architectures", r"its config.json names no model class \(architectures\), from which "
                         r"TRL picks the class to load"),
])
def test_a_broken_model_directory_is_a_config_error_before_anything_is_written(
        tmp_path, capsys, how, message):
    """The policy directory is checked with the config: one run, or the sweep job naming it,
    is refused before a directory is made (these were 'cannot start' errors once the run
    directory, .hydra/ and trl/ were written)."""
    from sae_shards.cli import main

    path = _broken_model(tmp_path, how)
    run_dir = tmp_path / "run"
    for sweep in ([], ["-m", f"model.path={path},{path}"]):
        rc = main(["train", "model=hf_path", f"model.path={path}", *sweep, "logging=disabled",
                   f"run_dir={run_dir}"])
        err = capsys.readouterr().err
        assert rc == 2 and "sae-shards: config error:" in err, err[-2000:]
        assert re.search(message, err) and "Traceback" not in err, err[-2000:]
        assert not run_dir.exists()


def test_lora_settings_given_with_lora_off_are_warned_about(tmp_path, capfd):
    """``model.lora.r=4`` without ``model.lora.enabled=true`` trains the full weights: said,
    naming what was typed; not with LoRA on, nor for a preset's own values with LoRA turned
    off (``model=tiny_lora model.lora.enabled=false``). Refused runs keep it cheap."""
    from sae_shards.cli import main

    def warnings(*overrides):  # Hydra's console handler says it (Hydra replaces caplog's)
        main(["train", *overrides, "sae.k=0", "logging=disabled",  # refused after the check
              f"run_dir={tmp_path / 'r'}"])
        out, err = capfd.readouterr()
        return [line.split(" - ", 1)[1] for line in (out + err).splitlines()
                if "given, but model.lora.enabled=false" in line]

    (said,) = warnings("model.lora.r=4", "model.lora.target_modules=[q_proj]")
    assert said.startswith("model.lora.r=4, model.lora.target_modules=[q_proj] given, but "
                           "model.lora.enabled=false"), said
    assert warnings() == [] and warnings("model=tiny_lora") == []
    assert warnings("model=tiny_lora", "model.lora.r=2") == []
    assert warnings("model=tiny_lora", "model.lora.enabled=false") == []
    assert warnings("~model.lora.dropout") == []  # a deletion gives nothing
    (said,) = warnings("model.lora={r:4}")
    assert said.startswith("model.lora={r:4} given") and said.endswith(
        "add model.lora.enabled=true to train one")


def test_lora_settings_reach_peft():
    from sae_shards.run.job import _peft_config

    lora = LoraSettings(enabled=True, r=4, alpha=32.0, dropout=0.0, rslora=True,
                        target_modules=["q_proj", "v_proj"])
    peft = _peft_config(JobConfig(model=ModelConfig(lora=lora)))
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, peft.use_rslora) == (4, 32.0, 0.0, True)
    assert sorted(peft.target_modules) == ["q_proj", "v_proj"]
    assert _peft_config(JobConfig()) is None


def test_the_tiny_model_is_built_with_the_jobs_seed_and_readout(tmp_path):
    import json

    from sae_shards.recipe.models import BUILD_SETTINGS_FILE
    from sae_shards.run.job import prepare_model

    cfg = JobConfig(seed=3, model=ModelConfig(readout_scale=4.0))
    path = prepare_model(cfg, tmp_path)
    settings = json.loads((path / BUILD_SETTINGS_FILE).read_text())
    assert settings["seed"] == 3 and settings["readout_scale"] == 4.0


def test_config_json_records_the_resolved_model_and_task(tmp_path, monkeypatch):
    from sae_shards.recipe.models import build_tiny_model
    from sae_shards.run.config import TINY_ONLY
    from sae_shards.run.job import run_config

    model = build_tiny_model(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    saved = run_config(JobConfig(model=ModelConfig(path="m")), target_length=7)
    assert saved["model"]["path"] == str(model.resolve())  # absolute: analysis runs elsewhere
    assert not set(TINY_ONLY) & set(saved["model"]) and saved["model"]["fingerprint"]
    assert saved["task"]["target_length"] == 7
    tiny = run_config(JobConfig(), built=model)
    assert tiny["model"]["path"] is None and tiny["model"]["arch"] == "qwen2"
    assert tiny["model"]["fingerprint"] == saved["model"]["fingerprint"]


def test_build_rl_keeps_the_users_target_length_and_the_jobs_seed(tmp_path):
    import torch

    from sae_shards.recipe.tasks import build_task
    from sae_shards.run.job import build_rl

    cfg = JobConfig.from_dict({"seed": 5, "task": {"n_prompts": 16, "options": {"target_length": 3}},
                               "rl": {"max_steps": 2, "per_device_train_batch_size": 8,
                                      "num_generations": 4, "max_completion_length": 8},
                               "runner": {"min_samples": 1, "checkpoint_every": 0},
                               "logging": {"mode": "disabled"}})
    rl = build_rl(cfg, tmp_path, torch.device("cpu"))
    assert rl.task.target_length == 3
    assert list(rl.trainer.train_dataset["prompt"]) == list(
        build_task("letters", target_length=3).dataset(16, 5)["prompt"])


def test_a_sweeps_next_job_is_checked_without_the_last_jobs_frozen_parameters():
    """check_targets reuses one meta policy across a sweep's jobs: the previous job's
    rl.trainable must not stay applied (the readout frozen by job 1 is a target of job 2)."""
    from sae_shards.run.job import check_targets

    check_targets(JobConfig(rl=RLConfig(trainable=["model.layers.*"])))
    check_targets(JobConfig(capture=CaptureConfig(targets=["lm_head.weight"])))
    with pytest.raises(ValueError, match="lm_head"):
        check_targets(JobConfig(rl=RLConfig(trainable=["model.layers.*"]),
                                capture=CaptureConfig(targets=["lm_head.weight"])))


def test_a_new_runs_model_left_by_a_failed_start_is_rebuilt_not_refused(tmp_path):
    """Audit 151 F5: a start refused after the tiny model was built (a TRL setting refused at
    trainer setup) left run_dir/model/, and the corrected rerun with another seed or model size
    was refused until the user deleted it by hand. A new run rebuilds it (the build is
    deterministic: nothing is lost); a resume still refuses a model of other settings."""
    import dataclasses

    from sae_shards.recipe.models import BUILD_SETTINGS_FILE, build_tiny_model
    from sae_shards.run.job import prepare_model

    run = tmp_path / "run"
    build_tiny_model(run / "model", seed=0)
    cfg = dataclasses.replace(JobConfig(run_dir=str(run)), seed=1)
    assert prepare_model(cfg, run) == run / "model"
    assert json.loads((run / "model" / BUILD_SETTINGS_FILE).read_text())["seed"] == 1
    resumed = dataclasses.replace(cfg, seed=2, resume=True)
    with pytest.raises(ValueError, match="holds a tiny model built with"):
        prepare_model(resumed, run)
    assert json.loads((run / "model" / BUILD_SETTINGS_FILE).read_text())["seed"] == 1
