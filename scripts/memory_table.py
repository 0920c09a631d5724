"""Memory arithmetic for docs/scaling.md: buffer, SAE and per-event factors at 0.5B, 7B and 70B.

    python -m scripts.memory_table [--latents 256] [--sae-rank 1] [--event-rank 64] [--slots 64]

Each model is built from its transformers config on the meta device (no weights, no download);
the targets are the project's defaults (every block's attention and MLP matrices,
``selection.default_targets``), sized with the same functions the buffer and the memory check use.
Figures are bytes of tensors, before allocator overheads.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from sae_shards.capture.memory import slot_numel
from sae_shards.capture.selection import default_targets, select_targets, target_shapes
from sae_shards.core.targets import make_targets

MODELS = {
    "Qwen2.5-0.5B": Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                tie_word_embeddings=True),
    "Qwen2.5-7B": Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
    "Llama-3-70B": LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                               num_key_value_heads=8, intermediate_size=28672, vocab_size=128256),
}
"""The published shapes of three model sizes (hidden, layers, heads, KV heads, MLP, vocabulary)."""
GB = 1e9


def rows(latents: int, sae_rank: int, event_rank: int, slots: int) -> list[dict[str, float]]:
    out = []
    for name, config in MODELS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        targets = select_targets(model, default_targets(model))
        specs = make_targets(target_shapes(targets), rank=sae_rank)
        dense = slot_numel(specs)  # entries of one delta
        factored = slot_numel(specs, event_rank)  # entries of one event's factors
        per_latent = sum(2 * t.rank * sum(t.shape) for t in specs)  # encoder + decoder factors
        n_params = sum(p.numel() for p in model.parameters())
        out.append({
            "model": name, "params": n_params, "targets": len(specs), "delta": dense,
            "delta_bf16_gb": 2 * dense / GB, "buffer_dense_gb": slots * 2 * dense / GB,
            "event_bf16_gb": 2 * factored / GB, "buffer_event_gb": slots * 2 * factored / GB,
            "sae_params": latents * per_latent,
            # fp32 weights + Adam's two moments + one gradient
            "sae_train_gb": 4 * 4 * latents * per_latent / GB,
            # the decoder bias, the targets' full size: trained per step (fp32 + Adam + grad);
            # a per-event SAE has none
            "b_dec_step_gb": 4 * 4 * dense / GB,
            "fsdp_shard_gb": 4 * dense / 8 / GB,  # fp32 snapshot of one rank's shard of 8
        })
    return out


def table(latents: int, sae_rank: int, event_rank: int, slots: int) -> str:
    lines = [
        f"SAE: {latents} latents of rank {sae_rank}; events of rank {event_rank}; buffers of "
        f"{slots} slots, bf16.",
        "",
        "| model | parameters | captured matrices | entries per delta | one delta (bf16) | "
        "dense buffer | one event (bf16) | event buffer | SAE parameters | SAE training "
        "(fp32 + Adam + grad) | decoder bias, per step (none per event) | update snapshot per rank, "
        "FSDP2 over 8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(latents, sae_rank, event_rank, slots):
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['targets']} | "
            f"{r['delta'] / 1e9:.3g}B | {r['delta_bf16_gb']:.2f} GB | "
            f"{r['buffer_dense_gb']:.0f} GB | {r['event_bf16_gb']:.3f} GB | "
            f"{r['buffer_event_gb']:.1f} GB | {r['sae_params'] / 1e9:.2f}B | "
            f"{r['sae_train_gb']:.1f} GB | {r['b_dec_step_gb']:.1f} GB | "
            f"{r['fsdp_shard_gb']:.2f} GB |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", type=int, default=256)
    p.add_argument("--sae-rank", type=int, default=1)
    p.add_argument("--event-rank", type=int, default=64)
    p.add_argument("--slots", type=int, default=64)
    a = p.parse_args(argv)
    text = table(a.latents, a.sae_rank, a.event_rank, a.slots)
    print(text)
    return text


if __name__ == "__main__":
    main()
