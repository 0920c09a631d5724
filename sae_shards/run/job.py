"""The main job: TRL GRPO -> fp32 delta capture -> ring buffer -> concurrent SAE -> shards on disk.

``run_job(cfg, run_dir)`` is everything ``sae-shards train`` does below Hydra. Run directory::

    run_dir/
      config.json                 the resolved JobConfig
      model/                      the built-in tiny model, initial weights (model.path null)
      final_model/                the policy after RL (with LoRA: the adapter)
      checkpoints/step_XXXXXX/    every runner.checkpoint_every RL steps (see checkpoint.py)
      checkpoints/final/          at the end
      activations.safetensors     per captured sample: RL step, latent indices, values
      rollouts.jsonl              per RL step: prompts, completions, rewards, task labels
      metrics.jsonl               TRL and SAE figures per step (also in W&B)
      summary.json                first/last reward and FVU, counters, sizes, wall time
      wandb/                      the offline W&B run
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta, check_buffer_memory, default_memory_budget
from sae_shards.capture.delta import DeltaCapture
from sae_shards.capture.selection import select_targets, target_shapes
from sae_shards.core.checkpoint import save_checkpoint, save_file_atomic
from sae_shards.core.metrics import evaluate_heldout
from sae_shards.run.config import JobConfig
from sae_shards.recipe.models import build_tiny_model, load_tokenizer
from sae_shards.recipe.trainers import build_grpo_trainer, prompts_per_step
from sae_shards.capture.runner import ActivationLog, SAEWorkLoop, make_runner
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.targets import TargetSpec, make_targets
from sae_shards.recipe.tasks import RolloutRecorder, build_task
from sae_shards.core.trainer import SAETrainer
from sae_shards.run.tracking import RunLogger

log = logging.getLogger(__name__)

STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu")
    return device


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier run's results unless ``overwrite=true``."""
    earlier = [p for p in ("checkpoints", "rollouts.jsonl", "activations.safetensors")
               if (run_dir / p).exists()]
    if earlier and not overwrite:
        raise FileExistsError(
            f"run_dir={run_dir} already holds a run ({', '.join(earlier)}); choose a new "
            "run_dir=... or pass overwrite=true to replace it")
    run_dir.mkdir(parents=True, exist_ok=True)


class RolloutLog:
    """Drains the reward recorder once per RL step into rollouts.jsonl and the step's StepMeta."""

    def __init__(self, path: Path, recorder: RolloutRecorder, heldout_every: int = 0) -> None:
        self.path = path
        self.recorder = recorder
        self.heldout_every = heldout_every
        self.rewards: dict[int, float] = {}  # rl step -> mean total reward
        path.write_text("")

    def step_meta(self, global_step: int) -> StepMeta:
        heldout = bool(self.heldout_every) and global_step % self.heldout_every == 0
        records = self.recorder.drain()
        if not records:
            return StepMeta(global_step, heldout=heldout)
        first = records[0]
        same = all(len(r["rewards"]) == len(first["rewards"]) for r in records)
        # One record per reward function for one generation batch: TRL sums them per completion.
        totals = ([sum(rs) for rs in zip(*(r["rewards"] for r in records))] if same
                  else [x for r in records for x in r["rewards"]])
        row = {
            "step": global_step, "prompts": first["prompts"], "completions": first["completions"],
            "rewards": totals, "tasks": first["tasks"],
            "reward_funcs": {r["reward_func"]: r["rewards"] for r in records},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        mean = statistics.fmean(totals)
        std = statistics.pstdev(totals) if len(totals) > 1 else 0.0
        self.rewards[global_step] = mean
        labels = tuple(sorted(set(first["tasks"] or ())))
        return StepMeta(global_step, mean, std, labels, heldout)


class LoggingCallback(TrainerCallback):
    """TRL's logs and the SAE's step figures to W&B and metrics.jsonl, from the RL thread, and a
    one-line console progress report every ``print_every`` RL steps."""

    def __init__(self, logger: RunLogger, loop: SAEWorkLoop, path: Path, print_every: int) -> None:
        self.logger = logger
        self.loop = loop
        self.path = path
        self.print_every = print_every
        self.fvu: list[float] = []
        self.last_reward = math.nan
        path.write_text("")

    def _write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self.last_reward = numeric.get("reward", self.last_reward)
        self.logger.log_rl(numeric, state.global_step)
        self._write({"kind": "rl", "rl_step": state.global_step, **numeric})

    def on_step_end(self, args, state, control, **kwargs):
        self.flush()
        step = state.global_step
        if step % self.print_every == 0 or step == state.max_steps:
            fvu = self.fvu[-1] if self.fvu else math.nan
            log.info("RL step %d/%d  reward %.3f  |  SAE step %d  fvu %.3f",
                     step, state.max_steps, self.last_reward, self.loop.trainer.n_steps, fvu)

    def flush(self) -> None:
        for rec in self.loop.pop_records():
            m = {k: v for k, v in rec.metrics.__dict__.items()}
            self.fvu.append(m["fvu"])
            self.logger.log_sae(m, rec.sae_step)
            self._write({"kind": "sae", "sae_step": rec.sae_step, "rl_step": rec.rl_step, **m})


def _peft_config(cfg: JobConfig):
    if not cfg.model.lora.enabled:
        return None
    from peft import LoraConfig

    lc = cfg.model.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, target_modules=list(lc.target_modules),
                      lora_dropout=lc.dropout, use_rslora=lc.rslora, task_type="CAUSAL_LM")


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


class RLSetup(NamedTuple):
    trainer: Any  # trl.GRPOTrainer
    recorder: RolloutRecorder
    model_path: Path


def build_rl(cfg: JobConfig, run_dir: Path, device: torch.device) -> RLSetup:
    """The model (built or local), the task and the GRPO trainer, with no sae-shards callbacks."""
    m = cfg.model
    model_path = Path(m.path) if m.path else build_tiny_model(
        run_dir / "model", m.arch, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size,
        seed=cfg.seed)
    tokenizer = load_tokenizer(model_path)
    # The letters reward divides by target_length: tie it to the completion budget by default.
    task = build_task(cfg.task.name, **{"target_length": cfg.rl.max_completion_length,
                                        **cfg.task.options})
    recorder = RolloutRecorder()
    grpo_kwargs = {**cfg.rl.grpo_kwargs(), "seed": cfg.seed}
    if device.type == "cpu":
        grpo_kwargs.update(use_cpu=True)
    if task.scheduled:  # one optimizer step = one task: the dataset lists the steps in order
        dataset = task.step_dataset(cfg.task.n_prompts, prompts_per_step(grpo_kwargs), cfg.seed)
    else:
        dataset = task.dataset(cfg.task.n_prompts, cfg.seed)
    trainer = build_grpo_trainer(
        model_path, tokenizer, task, recorder, dataset,
        grpo_kwargs, callbacks=[], output_dir=run_dir / "trl", peft_config=_peft_config(cfg))
    return RLSetup(trainer, recorder, model_path)


class CaptureSetup(NamedTuple):
    targets: dict  # {name: Parameter | LoraTarget}
    specs: list[TargetSpec]
    buffer: DeltaRingBuffer


# fp32 copies of the targets the capture callback keeps besides the buffer (snapshot, previous
# momentum-free step), per source; bf16 storage adds one fp32 scratch.
WORKING_COPIES = {"update": 1, "grad": 0, "precond": 1, "deconv": 2}


def build_capture(cfg: JobConfig, model: torch.nn.Module, device: torch.device) -> CaptureSetup:
    """Targets from the trained model and the ring buffer, its memory checked before allocation
    (the budget left after the capture's own working copies of the targets)."""
    targets = select_targets(model, list(cfg.capture.targets))
    specs = make_targets(target_shapes(targets), rank=cfg.sae.rank)
    dtype = STORAGE[cfg.capture.storage_dtype]
    copies = WORKING_COPIES[cfg.capture.source] + (dtype != torch.float32)
    working = copies * 4 * sum(t.numel for t in specs)
    budget = default_memory_budget(device, cfg.capture.memory_fraction) - working
    check_buffer_memory(specs, cfg.capture.capacity, dtype, budget, device)
    return CaptureSetup(targets, specs, DeltaRingBuffer(specs, cfg.capture.capacity, device, dtype))


class JobSetupError(RuntimeError):
    """The job could not start (bad model path, targets matching nothing, buffer too large...).

    Raised before any training; the message says what is wrong and how to fix it."""


SETUP_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError)


def run_job(cfg: JobConfig, run_dir: Path) -> dict[str, Any]:
    """Run the whole job into ``run_dir``; returns the summary (also written to summary.json)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    try:
        prepare_run_dir(run_dir, cfg.overwrite)
        device = resolve_device(cfg.device)
        torch.set_num_threads(cfg.runner.torch_threads)
        torch.manual_seed(cfg.seed)
        rl = build_rl(cfg, run_dir, device)
        trainer = rl.trainer
        targets, specs, buffer = build_capture(cfg, trainer.model, device)
    except SETUP_ERRORS as e:  # user-fixable: reported without a traceback by the CLI
        raise JobSetupError(str(e)) from e
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    sae = LowRankSAE(specs, cfg.sae).to(device)
    sae_trainer = SAETrainer(sae)
    sizes = {"n_targets": len(specs), "delta_numel": sum(t.numel for t in specs),
             "sae_factored_params": sae.factored_param_count(),
             "dense_sae_params": sae.dense_param_count(), "buffer_bytes": buffer.memory_bytes}
    log.info("targets: %d tensors, %d entries; SAE %d factored weights vs %d dense; buffer %.1f MiB",
             sizes["n_targets"], sizes["delta_numel"], sizes["sae_factored_params"],
             sizes["dense_sae_params"], sizes["buffer_bytes"] / 2**20)

    m = cfg.model
    meta = {"source": cfg.capture.source, "model_id": str(m.path or f"tiny-{m.arch}"),
            "run_dir": str(run_dir), "lora": m.lora.enabled}

    def checkpoint(name: str, rl_step: int) -> Path:
        return save_checkpoint(run_dir / "checkpoints" / name, sae, sae_trainer.stats.as_tensors(),
                               {**meta, "rl_step": rl_step, "sae_step": sae_trainer.n_steps},
                               sae_trainer.state_tensors())

    logger = RunLogger(cfg.logging, run_dir, {**cfg.to_dict(), **sizes})
    loop = SAEWorkLoop(sae_trainer, buffer, cfg.runner,
                       torch.Generator().manual_seed(cfg.seed), checkpoint)
    runner = make_runner(loop, cfg.runner)
    rollouts = RolloutLog(run_dir / "rollouts.jsonl", rl.recorder, cfg.runner.heldout_every)
    capture = DeltaCapture(targets, buffer, cfg.capture.source, meta_fn=rollouts.step_meta,
                           on_push=runner.on_push)
    logging_cb = LoggingCallback(logger, loop, run_dir / "metrics.jsonl",
                                 print_every=max(1, cfg.rl.max_steps // 10))
    trainer.add_callback(capture)
    trainer.add_callback(logging_cb)
    # TRL's progress bar prints every step's full log dict; our one-line report replaces it.
    trainer.remove_callback(ProgressCallback)

    # --- train; the worker is always stopped, and an SAE failure surfaces here
    try:
        trainer.train()
    finally:
        runner.finish()
    logging_cb.flush()
    # The fine-tuned policy (LoRA: the adapter), so analysis can compare it with the initial model.
    trainer.save_model(str(run_dir / "final_model"))
    final = checkpoint("final", loop.last_rl_step)
    _save_activations(run_dir / "activations.safetensors", loop, sae, buffer)
    if cfg.runner.save_samples:
        save_samples(run_dir / "samples.safetensors", buffer)
    heldout = _heldout_slots(buffer)
    fvu_heldout = (evaluate_heldout(sae, [buffer.gather(c) for c in heldout.split(256)]).fvu
                   if heldout.numel() >= 2 and sae.input_scale > 0 else math.nan)

    rewards = [rollouts.rewards[s] for s in sorted(rollouts.rewards)]
    fifth = max(1, len(rewards) // 5)
    tenth = max(1, len(logging_cb.fvu) // 10)
    summary = {
        "rl_steps": len(rewards), "sae_steps": sae_trainer.n_steps,
        "reward_first": _mean(rewards[:fifth]), "reward_last": _mean(rewards[-fifth:]),
        "fvu_first": _mean(logging_cb.fvu[:tenth]), "fvu_last": _mean(logging_cb.fvu[-tenth:]),
        "fvu_heldout": fvu_heldout, "heldout_samples": int(heldout.numel()),
        "captured": capture.n_captured, "zero_samples": capture.n_zero,
        "nonfinite_samples": capture.n_nonfinite,
        "sae_rejected_nonfinite": sae_trainer.n_rejected_nonfinite,
        "sae_skipped_zero": sae_trainer.n_skipped_zero,
        "dead_frac": float(sae_trainer.stats.dead_mask(cfg.sae.dead_after).float().mean()),
        "final_checkpoint": str(final), "wall_s": time.perf_counter() - t0, **sizes,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.summary(summary)
    logger.log_artifact(final, f"shards-{run_dir.name}", {"rl_step": loop.last_rl_step})
    logger.finish()
    return summary


def _save_activations(path: Path, loop: SAEWorkLoop, sae: LowRankSAE,
                      buffer: DeltaRingBuffer) -> None:
    """Online activations (SAE at capture time) plus the buffered samples under the final SAE."""
    final = ActivationLog()
    if sae.input_scale > 0:
        slots = buffer.chronological_slots()
        for chunk in slots.split(64):
            x = sae.to_scaled(buffer.gather(chunk))
            steps = [buffer.metadata(s).global_step for s in chunk.tolist()]
            final.add(steps, loop.trainer.n_steps, sae.encode(x))
    tensors = {**loop.activations.tensors("online"), **final.tensors("final"),
               "input_scale": sae.input_scale.detach().cpu().reshape(())}
    save_file_atomic(tensors, path, "sae-shards-activations")


def _heldout_slots(buffer: DeltaRingBuffer) -> torch.Tensor:
    slots = buffer.chronological_slots()
    return slots[torch.tensor([buffer.metadata(s).heldout for s in slots.tolist()], dtype=torch.bool)]


def save_samples(path: Path, buffer: DeltaRingBuffer) -> None:
    """Every buffered sample (fp32, oldest first) with its RL step, held-out flag and task label.

    Tensors: ``sample.<target>`` [S, *shape], ``rl_step`` [S], ``heldout`` [S]; the header
    metadata holds ``task_labels`` (JSON list of each sample's labels).
    """
    slots = buffer.chronological_slots()
    metas = [buffer.metadata(s) for s in slots.tolist()]
    parts = [buffer.gather(c) for c in slots.split(256)]
    tensors = {f"sample.{t.name}": torch.cat([p[t.name] for p in parts]) for t in buffer.targets}
    tensors["rl_step"] = torch.tensor([m.global_step for m in metas], dtype=torch.long)
    tensors["heldout"] = torch.tensor([m.heldout for m in metas], dtype=torch.bool)
    save_file_atomic(tensors, path, "sae-shards-samples",
                     {"task_labels": json.dumps([list(m.task_labels) for m in metas])})
