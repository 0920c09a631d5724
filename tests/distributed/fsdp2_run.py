"""FSDP2 ``update`` capture on 2 CPU processes (``torchrun``, gloo), for ``tests/test_distributed.py``.

accelerate runs FSDP only on accelerators, so TRL's FSDP2 path cannot run on a CPU; here torch's
own ``fully_shard`` shards a tiny causal LM and a plain training loop calls the ``ShardCallback``
hooks in the order ``transformers.Trainer`` does. Every rank trains on the same batch, so FSDP2's
averaged gradient is the one-process gradient: rank 0 also trains an unsharded copy of the model
and saves its per-step deltas (``reference.safetensors``) beside the run directory.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments

from sae_shards.capture.callback import ShardCallback

STEPS = 2
TARGETS = ["model.layers.*.self_attn.q_proj.weight", "model.layers.*.mlp.down_proj.weight"]


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad()


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated globs")
    p.add_argument("--hub-id", action="store_true",
                   help="the policy's config names no local directory (as a Hub model's would), "
                        "so the callback gathers theta_0 from the shards and saves it to model/")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    if a.hub_id:
        model.config._name_or_path = "someone/tiny-policy"  # no local directory of that name
    reference = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    args = TrainingArguments(output_dir=str(a.out / "trl"), use_cpu=True, report_to="none")
    state = TrainerState(max_steps=STEPS, is_world_process_zero=rank == 0,
                         is_local_process_zero=rank == 0)
    control = TrainerControl()
    callback = ShardCallback(a.out / "run", targets=a.targets.split(","), runner={"min_samples": 1,
                             "save_samples": True}, sae={"n_latents": 8}, label_column=None,
                             save_model=True, log_to_wandb=False)  # final policy: gathered
    callback.on_train_begin(args, state, control, model=model)
    gen = torch.Generator().manual_seed(0)
    ref_deltas = {}
    for k in range(1, STEPS + 1):
        batch = torch.randint(4, 40, (4, 12), generator=gen)  # the same on every rank
        callback.on_step_begin(args, state, control)
        model(input_ids=batch, labels=batch).loss.backward()
        callback.on_pre_optimizer_step(args, state, control)
        opt.step()
        callback.on_optimizer_step(args, state, control)
        opt.zero_grad()
        state.global_step = k
        callback.on_step_end(args, state, control)
        before = {n: q.detach().clone() for n, q in reference.named_parameters()}
        step(reference, ref_opt, batch)
        for n, q in reference.named_parameters():
            ref_deltas[f"step{k}.{n}"] = q.detach() - before[n]
    callback.on_train_end(args, state, control, model=model)
    if rank == 0:  # the unsharded copy's deltas, and its final weights
        ref_deltas.update({f"final.{n}": q.detach() for n, q in reference.named_parameters()})
        save_file({k: v.contiguous() for k, v in ref_deltas.items()},
                  str(a.out / "reference.safetensors"))
    dist.destroy_process_group()


def _exit_now() -> None:
    """End the process once everything is written, without the interpreter's teardown: there
    gloo's worker threads can abort a finished rank ("terminate called without an active
    exception", exit -6; pytorch/pytorch#190489, which ``cli.end_process_group`` also works
    around), as rank 1 did after a finished run in two CI runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
    _exit_now()
