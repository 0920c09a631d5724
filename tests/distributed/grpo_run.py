"""A tiny GRPO run with two ShardCallbacks (per-step ``update`` and per-event ``group`` capture),
for ``tests/test_distributed.py``.

``--mode ddp``: launched with ``accelerate launch --multi_gpu --num_processes 2``; each rank trains on
4 of the step's 8 completions and also saves the generation batch TRL hands it
(``gen/step{k}-rank{r}.safetensors``).

``--mode replay``: one process trains on all 8 completions per step, TRL's generation replaced by
the DDP run's saved batches (both ranks' rows, in rank order). Everything after generation (the
loss, backward, the optimizer step, the capture) is TRL's and sae-shards' own code, so the two
runs take the same optimizer steps on the same global batches and must capture the same deltas
and events up to floating-point summation order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from trl import GRPOTrainer

from sae_shards.capture.callback import ShardCallback
from sae_shards.recipe.models import load_tokenizer
from sae_shards.recipe.trainers import trl_config

PROMPTS = ["abcdef", "ghijkl", "mnopqr", "stuvwx", "yzabcd", "efghij", "klmnop", "qrstuv"]
"""Prompts of one length (the tokenizer is character level): no left padding, so the replay's
concatenated batch has every token at the position it had on its rank."""
GENERATIONS = 4
COMPLETION_KEYS = ("completion_ids", "completion_mask")
SAVED_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
              "num_items_in_batch")


def varied_reward(completions, **kwargs):
    """Differs between completions of one prompt, so every group has non-zero advantages."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def save_generation(trainer: GRPOTrainer, out: Path) -> None:
    """Wrap TRL's generation to save what it hands this rank, per optimizer step."""
    original = trainer._generate_and_score_completions
    step = [0]

    def generate_and_score(inputs, *args, **kwargs):
        batch = original(inputs, *args, **kwargs)
        step[0] += 1
        rank = trainer.accelerator.process_index
        save_file({k: batch[k].contiguous() for k in SAVED_KEYS},
                  str(out / f"step{step[0]}-rank{rank}.safetensors"))
        return batch

    trainer._generate_and_score_completions = generate_and_score


def replay_generation(trainer: GRPOTrainer, saved: Path, n_ranks: int, pad_id: int) -> None:
    """Replace TRL's generation by the saved batches of every rank, concatenated in rank order."""
    step = [0]

    def generate_and_score(inputs, *args, **kwargs):
        step[0] += 1
        parts = [load_file(str(saved / f"step{step[0]}-rank{r}.safetensors"))
                 for r in range(n_ranks)]
        width = max(p["completion_ids"].shape[1] for p in parts)
        out = {}
        for key in SAVED_KEYS:
            if key == "num_items_in_batch":  # the global count: the same on every rank
                assert all(torch.equal(p[key], parts[0][key]) for p in parts)
                out[key] = parts[0][key]
                continue
            tensors = [p[key] for p in parts]
            if key in COMPLETION_KEYS:  # right-padded per rank: pad to the longest
                fill = pad_id if key == "completion_ids" else 0
                tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)
                           for t in tensors]
            out[key] = torch.cat(tensors)
        return out

    trainer._generate_and_score_completions = generate_and_score


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["ddp", "replay"], required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--saved", type=Path, help="replay: the DDP run's gen/ directory")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--hub-id", action="store_true",
                   help="the policy as a Hub model would be: loaded here, its config naming no "
                        "local directory, so the callback saves (under ZeRO-3: gathers) theta_0")
    p.add_argument("--lora", action="store_true",
                   help="train a peft LoRA adapter (rank 4 on every block matrix, its A drawn "
                        "from seed 0 in both modes)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    n_ranks = 2
    per_device = GENERATIONS if a.mode == "ddp" else GENERATIONS * n_ranks
    tokenizer = load_tokenizer(a.model)
    args = trl_config(dict(max_steps=a.steps, per_device_train_batch_size=per_device,
                           num_generations=GENERATIONS, max_completion_length=6,
                           learning_rate=1e-3, beta=0.0, shuffle_dataset=False, seed=0,
                           disable_tqdm=True), a.out / "trl")
    model = str(a.model)
    if a.hub_id:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.model)
        model.config._name_or_path = "someone/tiny-policy"  # no local directory of that name
    if a.lora:  # the adapter built here, from one seed, so the two modes start from the same A
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(a.model), LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = GRPOTrainer(model=model, reward_funcs=[varied_reward], args=args,
                          processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    if a.mode == "ddp":
        (a.out / "gen").mkdir(parents=True, exist_ok=True)
        save_generation(trainer, a.out / "gen")
    else:
        replay_generation(trainer, a.saved, n_ranks, tokenizer.pad_token_id)
    common = dict(runner={"min_samples": 2, "save_samples": True}, sae={"n_latents": 8},
                  label_column=None, save_model=False, log_to_wandb=False)
    # the per-step run saves the final policy (gathered to rank 0 under ZeRO-3)
    step_cb = ShardCallback(a.out / "run_step", capture={"capacity": 8},
                            **{**common, "save_model": True})
    trainer.add_callback(step_cb)
    trainer.add_callback(ShardCallback(
        a.out / "run_group", capture={"granularity": "group", "event_rank": 128, "capacity": 16},
        **common))
    trainer.train()
    # every rank can tell how the run ended (rank 0 has the whole summary)
    rank = int(os.environ.get("RANK", "0"))
    (a.out / f"summary-rank{rank}.json").write_text(json.dumps(
        {k: step_cb.summary[k] for k in ("interrupted", "rl_steps", "world_size")}))
    if torch.distributed.is_initialized():  # not left to the interpreter's exit, where gloo's
        torch.distributed.destroy_process_group()  # threads can abort a finished rank


if __name__ == "__main__":
    main(sys.argv[1:])
