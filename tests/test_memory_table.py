"""scripts/memory_table.py (the memory arithmetic of docs/scaling.md): sizes from the real configs
and the buffer's own slot arithmetic, checked against counts worked out by hand."""

from scripts.memory_table import rows


def test_sizes_match_the_published_shapes():
    by_model = {r["model"]: r for r in rows(latents=256, sae_rank=1, event_rank=64, slots=64)}
    small = by_model["Qwen2.5-0.5B"]
    # 24 layers x (q, o: 896x896; k, v: 128x896; gate, up, down: 4864x896)
    per_layer = 2 * 896 * 896 + 2 * 128 * 896 + 3 * 4864 * 896
    assert small["targets"] == 24 * 7 and small["delta"] == 24 * per_layer == 357_826_560
    assert small["params"] == 494_032_768  # Qwen2.5-0.5B, tied embeddings
    sum_mn = 24 * (2 * 1792 + 2 * 1024 + 3 * 5760)  # sum of (m + n) over the matrices
    assert abs(small["event_bf16_gb"] - 64 * sum_mn * 2 / 1e9) < 1e-12
    assert small["sae_params"] == 256 * 2 * sum_mn
    # the decoder bias is the targets' full size: 4 fp32 copies trained (none per event)
    assert small["b_dec_step_gb"] == 16 * small["delta"] / 1e9
    # 7B: 28 layers, hidden 3584, 4 KV heads of 128, MLP 18944
    big = by_model["Qwen2.5-7B"]
    assert big["delta"] == 28 * (2 * 3584**2 + 2 * 512 * 3584 + 3 * 18944 * 3584)
    assert by_model["Llama-3-70B"]["targets"] == 80 * 7
