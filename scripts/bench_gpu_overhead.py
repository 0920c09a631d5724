"""Overhead of capture + the concurrent SAE on a Qwen2.5-0.5B-shaped model, on one GPU.

    python -m scripts.bench_gpu_overhead                  # CUDA, 0.5B shape (not yet timed)
    python -m scripts.bench_gpu_overhead --tiny           # CPU smoke run of the same path (seconds)
    python -m scripts.bench_gpu_overhead --steps 40 --out runs/table.md sae.batch_size=4

The model is built from a ``Qwen2Config`` with the real Qwen2.5-0.5B shape (hidden 896, 24 layers,
14 heads, 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings) and random weights: nothing
is downloaded. Its tokenizer is the project's character-level one widened to the whole
vocabulary (every extra id decodes to a short letter string), so sampled completions are text
the ``letters`` reward can score and advantages are not all zero. Every block's attention and MLP
matrices are captured (168 matrices, 358M entries per delta) into a 64-slot bf16 ring buffer.

Every mode builds the same job (``run.job.build_rl``; Hydra overrides as for ``sae-shards
train``; same seed) in a fresh run directory and times ``trainer.train()``; the modes run one
after another in this process, after an untimed warm-up run (CUDA context, kernels):

- ``rl``: GRPO alone, no sae-shards callback;
- ``capture``: plus the job's ``ShardCallback`` capturing every delta, its SAE never started;
- ``budget``: plus the SAE (``runner.concurrency``, thread by default) with ``runner.sae_budget``
  (``--budget``, 0.05): as many SAE steps as fit in that share of RL wall time;
- ``fixed``: plus the SAE with ``runner.sae_steps_per_rl_step`` steps per captured delta.

Reported per mode: the whole ``train()`` (including the callback's end-of-run writes and the
worker's backlog), the median wall time of one optimizer step (step 2 on, from one
``on_step_end`` to the next, the RL thread's CUDA stream synchronised), the SAE's steps and
training samples per captured delta, and peak GPU memory (``torch.cuda.max_memory_allocated``).
A mode that runs out of GPU memory is reported as such (where: which RL step, or the end of the
run) and the others still run. ``--tiny`` shrinks the model (hidden 64, 2 layers, vocabulary 1024)
and the run so the code path is exercised on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import itertools
import logging
import platform
import statistics
import string
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import transformers
from hydra import compose, initialize_config_dir
from tokenizers import models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, TrainerCallback

from sae_shards.capture.callback import ShardCallback
from sae_shards.capture.runner import encode_chunk_slots
from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.recipe.models import build_tokenizer
from sae_shards.run.config import JobConfig, RunnerConfig
from sae_shards.run.job import build_rl, shard_callback
from sae_shards.run.tracking import RunLogger

QWEN2_5_0_5B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                    max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=True)
"""Qwen2.5-0.5B's shape (its config.json); weights are random."""
TINY = dict(QWEN2_5_0_5B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, vocab_size=1024, max_position_embeddings=512)
"""``--tiny``: the same architecture, small enough for a CPU smoke run."""

MODES = {
    "rl": "GRPO alone",
    "capture": "+ capture into the ring buffer, SAE never started",
    "budget": "+ SAE with runner.sae_budget",
    "fixed": "+ SAE with runner.sae_steps_per_rl_step fixed steps",
}

BENCH = ["logging=disabled", "rl.learning_rate=1e-6", "rl.max_completion_length=64",
         "task.n_prompts=256", "capture.capacity=64", "capture.storage_dtype=bfloat16",
         "runner.concurrency=thread", "runner.checkpoint_every=0", "sae.batch_size=8"]
"""The 0.5B run: a 64-slot bf16 buffer, no checkpoints (TRL's would write ~6 GB each), an SAE
batch of 8 (one fp32 batch of 358M-entry samples is 11 GiB)."""
TINY_RUN = ["rl.learning_rate=1e-3", "rl.max_completion_length=8", "task.n_prompts=32",
            "runner.min_samples=2", "sae.n_latents=16", "sae.batch_size=8"]
"""``--tiny``: the SAE starts after two captured deltas, so every mode does its work in 4 steps."""


# ---- the model --------------------------------------------------------------------------------


def letter_strings() -> Any:
    """``aa, ab, ..., zz, aaa, ...``: distinct strings for the widened vocabulary."""
    for n in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            yield "".join(letters)


def full_vocab_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The project's character-level tokenizer, its vocabulary widened to ``vocab_size`` ids:
    prompts still encode character by character, and every id a random policy samples decodes to
    text (ids past the base vocabulary are letter strings), as with a real tokenizer."""
    tokenizer = build_tokenizer()
    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)  # ids 0..len-1: specials, tags, characters
    extra = dict(zip(letter_strings(), range(len(vocab), vocab_size)))
    backend.model = models.WordLevel({**vocab, **extra}, unk_token=tokenizer.unk_token)
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"widened tokenizer has {len(tokenizer)} ids, want {vocab_size}")
    return tokenizer


def build_model_dir(out: Path, shape: dict[str, Any], seed: int = 0) -> tuple[Path, int]:
    """A Qwen2 causal LM of ``shape`` with random fp32 weights and its tokenizer, saved to ``out``
    for TRL to load by path; returns the directory and the parameter count."""
    tokenizer = full_vocab_tokenizer(shape["vocab_size"])
    config = Qwen2Config(**shape, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())  # tied embeddings counted once


# ---- one mode ---------------------------------------------------------------------------------


class StepClock(TrainerCallback):
    """When each optimizer step ended (after every callback before it, the capture and the push
    to the SAE runner included); on CUDA the RL thread's stream is synchronised first, so queued
    kernels count and an SAE worker on a stream of its own does not."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.ends.append(time.perf_counter())

    def median_step_s(self) -> float:
        """Median time between consecutive step ends (the first step's setup left out)."""
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        return statistics.median(gaps) if gaps else float("nan")


def runner_for(cfg: JobConfig, mode: str, budget: float) -> RunnerConfig | None:
    """The callback's runner settings in ``mode`` (None: no callback)."""
    r = cfg.runner
    match mode:
        case "rl":
            return None
        case "capture":
            return dataclasses.replace(r, sae_budget=0.0, sae_start_step=cfg.rl.max_steps + 1)
        case "budget":
            return dataclasses.replace(r, sae_budget=budget)
        case "fixed":
            return dataclasses.replace(r, sae_budget=0.0)
    raise SystemExit(f"unknown mode {mode!r}: use {', '.join(MODES)}")


def _out_of_memory(error: BaseException | None) -> bool:
    """True when ``error`` or its cause chain (the SAE worker's error wraps its own) is a CUDA
    out-of-memory error."""
    while error is not None:
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return True
        error = error.__cause__ or error.__context__
    return False


def run_mode(cfg: JobConfig, mode: str, run_dir: Path, device: torch.device,
             budget: float) -> dict[str, Any]:
    """Build the job for ``mode``, time its ``trainer.train()``, and return the row's figures
    (``sizes``: the callback's target and buffer sizes)."""
    torch.set_num_threads(cfg.runner.torch_threads)
    torch.manual_seed(cfg.seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    left_over = torch.cuda.memory_allocated(device) if cuda else 0
    rl = build_rl(cfg, run_dir, device)
    runner = runner_for(cfg, mode, budget)
    callback: ShardCallback | None = None
    if runner is not None:
        callback = shard_callback(cfg, run_dir / "shards", runner=runner, save_model=False,
                                  logger=RunLogger())
        callback.setup(rl.trainer.model, rl.trainer)
        rl.trainer.add_callback(callback)
    clock = StepClock(device)
    rl.trainer.add_callback(clock)
    note = ""
    start = time.perf_counter()
    try:
        rl.trainer.train()  # thread runner: on_train_end waits for the worker's backlog
    except Exception as e:
        if not _out_of_memory(e):
            raise
        where = "the end of the run" if len(clock.ends) == cfg.rl.max_steps else \
            f"RL step {len(clock.ends) + 1}"
        note = f"out of GPU memory at {where}"
    finally:
        if callback is not None:
            callback.close()
    total = time.perf_counter() - start
    if left_over > 2**29:
        note = "; ".join(filter(None, [note, f"{left_over / 2**30:.1f} GiB left by earlier modes"]))
    parts = callback.parts if callback is not None else None
    captured = callback.capture.n_captured if callback is not None else 0
    return {
        "mode": mode, "total_s": total, "step_s": clock.median_step_s(),
        "steps_done": len(clock.ends),
        "sae_steps": parts.trainer.n_steps if parts else 0,
        "per_slot": parts.trainer.stats.n_samples / max(captured, 1) if parts else 0.0,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "sizes": dict(callback.sizes) if callback is not None else None, "note": note,
    }


# ---- the report -------------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _ratio(x: float, base: float | None) -> str:
    return f"{x / base:.2f}x" if base and x == x else "n/a"


def machine_line(device: torch.device) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
             if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})")
    return f"{when}; torch {torch.__version__}; {where}"


def header(cfg: JobConfig, shape: dict[str, Any], n_params: int, rows: list[dict[str, Any]],
           device: torch.device, budget: float) -> list[str]:
    """What was run, and the memory arithmetic that explains the peaks."""
    sizes = next((r["sizes"] for r in rows if r["sizes"]), None)
    rl, sae, cap = cfg.rl, cfg.sae, cfg.capture
    lines = [
        machine_line(device), "",
        f"Model: Qwen2 shape hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads ({shape['num_key_value_heads']} KV), MLP "
        f"{shape['intermediate_size']}, vocabulary {shape['vocab_size']}, tied embeddings: "
        f"{_count(n_params)} parameters, random fp32 weights. GRPO: {rl.max_steps} steps, "
        f"{rl.per_device_train_batch_size} completions of {rl.max_completion_length} tokens per "
        f"step in groups of {rl.num_generations}, lr {rl.learning_rate:g}.",
        f"Capture: {cap.source}, {cap.capacity}-slot {cap.storage_dtype} buffer; SAE "
        f"{sae.n_latents} latents, k {sae.k}, rank {sae.rank}, batch {sae.batch_size}; runner "
        f"{cfg.runner.concurrency}; budget mode runner.sae_budget={budget:g}, fixed mode "
        f"{cfg.runner.sae_steps_per_rl_step} SAE steps per captured delta (from RL step "
        f"{cfg.runner.min_samples}, once runner.min_samples deltas are buffered).",
    ]
    if sizes:
        entries = sizes["delta_numel"]
        # slots the end of the run encodes at once, as fp32 plus a scaled copy
        filled = min(cap.capacity, rl.max_steps,
                     encode_chunk_slots(entries, sae.encode_chunk_mib))
        lines.append(
            f"Targets: {sizes['n_targets']} matrices, {_count(entries)} entries per delta; buffer "
            f"{_gib(sizes['buffer_bytes'])} GiB; SAE {_count(sizes['sae_factored_params'])} "
            f"weights (a dense SAE: {_count(sizes['dense_sae_params'])}). One fp32 SAE batch "
            f"is {_gib(sae.batch_size * entries * 4)} GiB; the end of the run encodes the "
            f"buffered deltas {filled} at a time, fp32 plus a scaled copy: "
            f"{_gib(2 * filled * entries * 4)} GiB.")
    return lines


def table(rows: list[dict[str, Any]]) -> list[str]:
    base = next((r for r in rows if r["mode"] == "rl" and not r["note"]), None)
    lines = [
        "| mode | what | RL loop s | s / RL step (median) | SAE steps | samples / slot "
        "| peak GPU mem GiB | overhead (loop) | overhead (step) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {MODES[r['mode']]} | {r['total_s']:.1f} | {r['step_s']:.3f} | "
            f"{r['sae_steps']} | {r['per_slot']:.1f} | {_gib(r['peak_bytes'])} | "
            f"{_ratio(r['total_s'], base and base['total_s'])} | "
            f"{_ratio(r['step_s'], base and base['step_s'])} | {r['note']} |")
    return lines


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for sae-shards train "
                        "(applied after the benchmark's own)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model of the same architecture on CPU: a smoke run")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (--tiny default)")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per mode "
                        "(default 24; --tiny 4)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed GRPO steps before the modes (default 2; --tiny 1; 0: none)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of "
                        f"{', '.join(MODES)}")
    parser.add_argument("--budget", type=float, default=0.05,
                        help="runner.sae_budget of the budget mode")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    return parser.parse_args(argv)


SMALL_GPU_BYTES = 130e9
"""Below this much device memory the 64-slot buffer of the 0.5B run is refused by the buffer's
memory check (on an 80 GB H100 it needs 42.7 GiB of a 35.6 GiB budget); 16 slots fit."""


def capacity_override(device: torch.device, tiny: bool, given: Sequence[str]) -> list[str]:
    """``capture.capacity=16`` for the 0.5B run on a GPU with less than ``SMALL_GPU_BYTES``,
    unless the overrides name a capacity; else nothing (``BENCH``'s 64 slots)."""
    if tiny or device.type != "cuda" or any(o.startswith("capture.capacity=") for o in given):
        return []
    total = torch.cuda.get_device_properties(device).total_memory
    return ["capture.capacity=16"] if total < SMALL_GPU_BYTES else []


def job_config(model_dir: Path, device: torch.device, args: argparse.Namespace,
               steps: int) -> JobConfig:
    overrides = [*BENCH, *(TINY_RUN if args.tiny else []), f"model.path={model_dir}",
                 f"device={device}", f"rl.max_steps={steps}",
                 *capacity_override(device, args.tiny, args.overrides)]
    if device.type == "cpu":  # TRL turns bf16 autocast on whenever a GPU exists, even with use_cpu
        overrides.append("+rl.extra.bf16=false")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return job_config_from_hydra(compose("config", overrides=[*overrides, *args.overrides]))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars (a model load and save per mode) and no "the SAE never trained" warning
    (the capture mode's SAE never trains by design) while the benchmark runs."""
    summary_log = logging.getLogger("sae_shards.capture.summary")
    level, bars = summary_log.level, transformers.utils.logging.is_progress_bar_enabled()
    summary_log.setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        summary_log.setLevel(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; print and return the markdown report."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (torch.cuda.is_available() is False): run this on a GPU "
                         "machine, or use --tiny for the CPU smoke run")
    modes = args.modes.split(",")
    for mode in modes:
        runner_for(JobConfig(), mode, args.budget)  # unknown modes fail before the model is built
    steps = args.steps or (4 if args.tiny else 24)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.tiny else 2)
    shape = TINY if args.tiny else QWEN2_5_0_5B
    t0 = time.perf_counter()
    with quiet(), tempfile.TemporaryDirectory(prefix="bench_gpu_overhead.") as tmp:
        tmp = Path(tmp)
        model_dir, n_params = build_model_dir(tmp / "model", shape)
        cfg = job_config(model_dir, device, args, steps)
        print(f"model built in {time.perf_counter() - t0:.0f} s", flush=True)
        if warmup:
            short = dataclasses.replace(  # RL alone: no SAE, so no samples needed
                cfg, rl=dataclasses.replace(cfg.rl, max_steps=warmup),
                runner=dataclasses.replace(cfg.runner, min_samples=1))
            run_mode(short, "rl", tmp / "warmup", device, args.budget)
        rows = []
        for mode in modes:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(run_mode(cfg, mode, tmp / mode, device, args.budget))
            r = rows[-1]
            print(f"{mode}: {r['total_s']:.1f} s, {r['step_s']:.3f} s/step, {r['sae_steps']} SAE "
                  f"steps, peak {_gib(r['peak_bytes'])} GiB {r['note']}", flush=True)
    text = "\n".join([*header(cfg, shape, n_params, rows, device, args.budget), "",
                      *table(rows), "", f"Total wall time {time.perf_counter() - t0:.0f} s."])
    print("\n" + text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
