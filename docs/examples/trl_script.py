"""A plain TRL script with sae-shards added in one line (marked below).

    python docs/examples/trl_script.py --model /path/to/local/causal-lm --run-dir runs/example
    python docs/examples/trl_script.py --model runs/default/model --run-dir runs/example  # the
        # tiny model `sae-shards train` saved (no download)
    python docs/examples/trl_script.py --model ... --run-dir runs/example_rloo --algorithm rloo
    sae-shards analyze runs/example --task docs/examples/trl_script.py:reward_task

Everything else is ordinary TRL: a local model directory, a dataset with a ``task`` column,
and a reward function. The reward function passes each completion's task to TRL's completion
log (``log_extra``), so the run directory records which context every rollout came from.
``reward_task`` hands the prompts and the reward back to the analysis, which cannot store code:
with it the report measures what each shard does to the reward, per context.
"""

import argparse
import random

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from sae_shards import ShardCallback


def reward_vowels_or_digits(prompts, completions, task, log_extra=None, **kwargs):
    """Prompts starting with "v" reward vowels, the others digits (per character, capped)."""
    if log_extra is not None:
        log_extra("task", task)
    chars = {"vowels": "aeiou", "digits": "0123456789"}
    return [min(sum(c in chars[t] for c in text) / 8, 1.0) for text, t in zip(completions, task)]


def make_dataset() -> Dataset:
    """64 prompts, each "v ..." (reward vowels) or "d ..." (reward digits), with a task column."""
    rng = random.Random(0)
    tasks = [rng.choice(["vowels", "digits"]) for _ in range(64)]
    return Dataset.from_dict({"prompt": [f"{t[0]} {rng.randint(0, 999)}" for t in tasks],
                              "task": tasks})


def reward_task():
    """For ``sae-shards analyze RUN --task docs/examples/trl_script.py:reward_task``."""
    from sae_shards import RewardTask

    return RewardTask(make_dataset(), [reward_vowels_or_digits], label_column="task")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="local transformers causal-LM directory")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--algorithm", choices=["grpo", "rloo"], default="grpo")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)

    dataset = make_dataset()
    config_cls, trainer_cls = ((GRPOConfig, GRPOTrainer) if args.algorithm == "grpo"
                               else (RLOOConfig, RLOOTrainer))
    config = config_cls(output_dir=f"{args.run_dir}-trl", max_steps=args.steps,
                        learning_rate=3e-4, per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=8, beta=0.0, use_cpu=True, bf16=False,
                        report_to="none", logging_steps=1, disable_tqdm=True,
                        save_strategy="steps", save_steps=20)  # TRL's side of a resume
    trainer = trainer_cls(model=args.model, reward_funcs=reward_vowels_or_digits, args=config,
                          train_dataset=dataset)
    trainer.add_callback(ShardCallback(run_dir=args.run_dir))  # <- the one added line
    trainer.train()


if __name__ == "__main__":
    main()
