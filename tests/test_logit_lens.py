"""Logit lens on constructed components whose answer is known."""

import copy
import html

import pytest
import torch

from sae_shards.analysis.logit_lens import (
    FinalNormNotFound,
    find_final_norm,
    norm_gain,
    logit_lens,
    split_writers,
    write_directions,
    write_side,
    writer_targets,
)
from sae_shards.recipe.models import tiny_model_and_tokenizer

DOWN = "model.layers.1.mlp.down_proj.weight"  # [d_model=64, d_in=128]
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
C_PROJ = "transformer.h.0.attn.c_proj.weight"  # GPT-2 Conv1D, SQUARE [d_in=64, d_model=64]
MLP_C_PROJ = "transformer.h.1.mlp.c_proj.weight"  # Conv1D [d_in=128, d_model=64]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    return model, tokenizer


def _token_write(model, tokenizer, token):
    """Unit write direction along the unembedding row of ``token``: [d_model, 1]."""
    row = model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)].detach()
    return (row / row.norm()).unsqueeze(1)


def _v(n, seed=0):
    v = torch.rand(n, 1, generator=torch.Generator().manual_seed(seed)) + 0.1  # all positive
    return v / v.norm()


def test_token_row_direction_promotes_that_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    u, v = _token_write(model, tokenizer, "e"), _v(128)
    results = logit_lens(model, tokenizer, {DOWN: 2.5 * u @ v.T}, top_k=5)
    assert len(results) == 1  # rank 1: one write direction
    (res,) = results
    assert res.target == DOWN and res.index == 0
    assert res.singular_value == pytest.approx(2.5, rel=1e-5)
    assert res.promoted[0][0] == "e"
    assert len(res.promoted) == len(res.suppressed) == 5
    assert res.promoted[0][1] > res.promoted[1][1] and res.suppressed[0][1] < 0
    assert res.suppressed[0][0] != "e"


def test_factored_equals_dense(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    gen = torch.Generator().manual_seed(1)
    U, V = torch.randn(64, 3, generator=gen), torch.randn(128, 3, generator=gen)
    dense = logit_lens(model, tokenizer, {DOWN: U @ V.T})
    factored = logit_lens(model, tokenizer, {DOWN: (U, V)})
    assert len(dense) == len(factored) == 3
    for a, b in zip(dense, factored):
        assert a.singular_value == pytest.approx(b.singular_value, rel=1e-6)
        assert [t for t, _ in a.promoted] == [t for t, _ in b.promoted]
        assert [t for t, _ in a.suppressed] == [t for t, _ in b.suppressed]
        for (_, x), (_, y) in zip(a.promoted + a.suppressed, b.promoted + b.suppressed):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-6)
    left_d, s_d = write_directions(U @ V.T)
    left_f, s_f = write_directions((U, V))
    torch.testing.assert_close(left_d, left_f)
    torch.testing.assert_close(s_d, s_f)


def test_negated_write_side_suppresses_the_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    u, v = _token_write(model, tokenizer, "e"), _v(128)
    for component in (-u @ v.T, (-u, v)):
        (res,) = logit_lens(model, tokenizer, {DOWN: component}, top_k=3)
        assert res.suppressed[0][0] == "e"
        assert "e" not in [t for t, _ in res.promoted]


def test_final_norm_scale_is_applied(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    u, v = _token_write(model, tokenizer, "e"), _v(64)
    gain = torch.ones(64)
    gain[u[:, 0].abs().argmax()] = -50.0  # flips the dominant coordinate: 'e' loses the top
    (plain,) = logit_lens(model, tokenizer, {O_PROJ: (u, v)}, top_k=3)
    (scaled,) = logit_lens(model, tokenizer, {O_PROJ: (u, v)}, top_k=3, final_norm=gain)
    assert plain.promoted[0][0] == "e"
    assert scaled.promoted[0][0] != "e"


def test_non_writers_are_skipped_and_writer_free_input_is_an_error(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    u, v = _token_write(model, tokenizer, "e"), _v(128)
    q = "model.layers.0.self_attn.q_proj.weight"
    results = logit_lens(model, tokenizer, {q: torch.randn(64, 64), DOWN: (u, v)})
    assert [r.target for r in results] == [DOWN]
    assert split_writers([q, DOWN], writer_targets(model)).skipped == [q]
    with pytest.raises(ValueError, match="down_proj"):
        logit_lens(model, tokenizer, {q: torch.randn(64, 64)})
    # A user-given glob makes q_proj a writer (shape permitting).
    custom = logit_lens(model, tokenizer, {q: (u, _v(64))}, writers=["*q_proj.weight"])
    assert [r.target for r in custom] == [q]


def test_wrong_orientation_names_the_target(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match=r"down_proj.weight' has shape \(128, 64\) but the "
                                         r"parameter has shape \(64, 128\)"):
        logit_lens(model, tokenizer, {DOWN: torch.randn(128, 64)})


@pytest.mark.parametrize("component", [torch.randn(64, 64), torch.randn(64, 5),
                                       (torch.randn(64, 1), torch.randn(7, 1))],
                         ids=["square", "narrow", "factored"])
def test_a_component_of_another_matrix_is_refused(model_and_tokenizer, component):
    """Right on the d_model side, wrong on the other: read from another matrix, not this one."""
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match=r"down_proj.weight' has .* but the parameter has shape "
                                         r"\(64, 128\)"):
        logit_lens(model, tokenizer, {DOWN: component})


def test_a_shard_is_read_as_its_unit_factors_and_a_zero_one_refused(model_and_tokenizer):
    from sae_shards.analysis.shards import ShardSet
    from sae_shards.core.sae import LowRankSAE
    from sae_shards.core.sae_config import SAEConfig
    from sae_shards.core.targets import make_targets

    model, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    targets = make_targets({DOWN: (64, 128), O_PROJ: (64, 64), "model.norm.weight": (64,)}, 2)
    shards = ShardSet(LowRankSAE(targets, SAEConfig(n_latents=4, k=1, rank=2)), {}, {})
    shard = shards[1]
    direct = logit_lens(model, tokenizer, shard, top_k=4, writers=[DOWN, O_PROJ])
    factors = {n: f for n, f in shard.factors().items() if n != "model.norm.weight"}
    assert [(r.target, r.promoted_ids) for r in direct] == [
        (r.target, r.promoted_ids) for r in logit_lens(model, tokenizer, factors, top_k=4)]
    never_fired = shard.dense()  # scaled by a typical activation it never had: all zeros
    assert all(not v.any() for v in never_fired.values())
    with pytest.raises(ValueError, match=r"every writer component is all zeros.* give the Shard "
                                         r"itself, or shard.dense\(scaled=False\)"):
        logit_lens(model, tokenizer, never_fired)
    with pytest.raises(TypeError, match="components must be a Shard or a"):
        logit_lens(model, tokenizer, [shard])


def test_writers_found_by_module_type_and_execution_order(model_and_tokenizer):
    model, _ = model_and_tokenizer
    assert writer_targets(model) == [
        f"model.layers.{i}.{w}.weight"
        for i in range(2) for w in ("self_attn.o_proj", "mlp.down_proj")
    ]
    gpt2, _ = tiny_model_and_tokenizer(arch="gpt2")
    assert writer_targets(gpt2) == [
        f"transformer.h.{i}.{w}.{p}"
        for i in range(2) for w in ("attn.c_proj", "mlp.c_proj") for p in ("weight", "bias")
    ]
    assert find_final_norm(gpt2) is gpt2.transformer.ln_f


def _tiny(model_type: str, **sizes):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=48, **sizes)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_the_final_norm_is_the_module_whose_output_the_unembedding_reads():
    """Found by name only, LFM2's final norm (``embedding_norm``) and RecurrentGemma's
    (``final_norm``) were not found, and ``sae-shards analyze`` ended in a traceback with no
    report (audit 105). A head reading something else than a norm's output falls back on the
    names; a model with no final norm at all (post-norm OPT, OPT-350m's layout) is refused."""
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64)
    lfm2 = _tiny("lfm2", **common, layer_types=["conv", "full_attention"], block_ff_dim=64,
                 block_auto_adjust_ff_dim=False)
    assert find_final_norm(lfm2) is lfm2.model.embedding_norm
    gemma = _tiny("recurrent_gemma", **common, head_dim=8, lru_width=32,
                  block_types=["recurrent", "attention"], attention_window_size=16)
    assert find_final_norm(gemma) is gemma.model.final_norm

    llama = _tiny("llama", **common)
    # an operation of the model's own between the norm and the head: the name decides
    assert find_final_norm(llama) is llama.model.norm
    hook = llama.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 1.0,))
    try:
        assert find_final_norm(llama) is llama.model.norm
        llama.model.add_module("ln_f", copy.deepcopy(llama.model.norm))  # two such names
        with pytest.raises(FinalNormNotFound, match=r"cannot tell the final norm of "
                           r"LlamaForCausalLM: .* 2 \(model.norm, model.ln_f\) are named"):
            find_final_norm(llama)
    finally:
        hook.remove()
    assert find_final_norm(llama) is llama.model.norm  # what the head reads settles the names

    opt = _tiny("opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                word_embed_proj_dim=32, do_layer_norm_before=False)
    assert writer_targets(opt)  # the lens has writers to read, but no final norm to read them by
    with pytest.raises(FinalNormNotFound, match="cannot tell the final norm of OPTForCausalLM"):
        find_final_norm(opt)


@pytest.fixture(scope="module")
def gpt2_and_tokenizer():
    return tiny_model_and_tokenizer(arch="gpt2", seed=0)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_square_conv1d_is_read_on_its_write_side(gpt2_and_tokenizer):
    """Conv1D weight is [in, out] (y = x W): a planted W = a u^T writes along u, not along a."""
    model, tokenizer = gpt2_and_tokenizer
    u = _token_write(model, tokenizer, "e")[:, 0]  # [d_model] write direction (output side)
    a = torch.randn(64, generator=torch.Generator().manual_seed(5))
    a = a - (a @ u) * u
    a = a / a.norm()  # [d_in] input-side direction: another unit vector, orthogonal to u
    layer = copy.deepcopy(model.transformer.h[0].attn.c_proj)
    with torch.no_grad():  # ground truth: a layer with weight a u^T writes along u
        layer.weight.copy_(torch.outer(a, u))
        out = layer(torch.randn(3, 64)) - layer.bias  # [3, d_model]
    assert all(abs(_cos(row, u)) > 0.999 for row in out)
    for component in (3.0 * torch.outer(a, u), (3.0 * a[:, None], u[:, None])):
        (res,) = logit_lens(model, tokenizer, {C_PROJ: component}, top_k=3)
        assert res.target == C_PROJ and res.singular_value == pytest.approx(3.0, rel=1e-5)
        assert abs(_cos(res.direction, u)) > 0.99
        assert "e" in (res.promoted[0][0], res.suppressed[0][0])
        # The old behaviour read the left side, as if the weight were [d_model, d_in]: it finds a.
        wrong, _ = write_directions(write_side(component, 0))  # [d_model, 1]
        assert abs(_cos(wrong[:, 0], u)) < 0.01


def test_rectangular_conv1d_and_writer_bias(gpt2_and_tokenizer):
    model, tokenizer = gpt2_and_tokenizer
    u, a = _token_write(model, tokenizer, "z"), _v(128, seed=2)  # [64, 1], [128, 1]
    bias = MLP_C_PROJ.replace(".weight", ".bias")
    results = logit_lens(model, tokenizer, {MLP_C_PROJ: (a, u), bias: -u[:, 0]}, top_k=3)
    assert [r.target for r in results] == [MLP_C_PROJ, bias]
    assert results[0].promoted[0][0] == "z"  # sign kept: +u promotes z
    assert results[1].suppressed[0][0] == "z"  # a bias is its own direction: -u suppresses z
    with pytest.raises(ValueError, match=r"mlp.c_proj.weight' has shape \(64, 128\) but the "
                                         r"parameter has shape \(128, 64\)"):
        logit_lens(model, tokenizer, {MLP_C_PROJ: torch.randn(64, 128)})
    with pytest.raises(ValueError, match=r"mlp.c_proj.bias' writes vectors of size 128 but the "
                                         r"model's d_model is 64"):
        logit_lens(model, tokenizer, {bias: torch.randn(128)})


def test_writer_that_is_not_a_matrix_layer_is_an_error(gpt2_and_tokenizer):
    model, tokenizer = gpt2_and_tokenizer
    with pytest.raises(ValueError, match=r"'transformer.wte.weight' is not the weight of an nn"):
        logit_lens(model, tokenizer, {"transformer.wte.weight": torch.randn(82, 64)},
                   writers=["*wte.weight"])


def test_lens_through_a_lora_model(model_and_tokenizer):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj"]))
    assert writer_targets(peft_model) == writer_targets(model_and_tokenizer[0])
    u, v = _token_write(model, tokenizer, "e"), _v(64)
    (res,) = logit_lens(peft_model, tokenizer, {O_PROJ: (u, v)}, top_k=3)
    assert res.promoted[0][0] == "e"


def test_tokens_that_are_part_of_a_character_keep_their_own_spelling():
    """A byte-level BPE vocabulary holds tokens that are bytes of a multi-byte character; decoded
    alone each is U+FFFD. The lens shows the vocabulary's spelling, so they stay distinct."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sae_shards.analysis.logit_lens import token_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["héllo wörld ✓ café"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    partial = [i for i in range(len(tok)) if tok.decode([i]) == "\ufffd"]
    assert len(partial) > 10  # every lone continuation byte, at least
    texts = [token_text(tok, i) for i in partial]
    assert "\ufffd" not in "".join(texts) and len(set(texts)) == len(texts)
    assert token_text(tok, tok.convert_tokens_to_ids("h")) == "h"  # whole characters: decoded


@pytest.mark.parametrize("d_model", [6, 7])
def test_the_final_norms_gain_is_measured_not_read_from_its_weight(d_model):
    """LayerNorm (with a bias) and RMSNorm scale by ``weight``; Gemma's RMSNorm by
    ``1 + weight``, whose weight starts at zero (reading it gave every logit exactly 0)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(d_model, generator=g), torch.randn(d_model, generator=g)
    layer, rms, gemma = torch.nn.LayerNorm(d_model), Qwen2RMSNorm(d_model), GemmaRMSNorm(d_model)
    with torch.no_grad():
        for norm in (layer, rms, gemma):
            norm.weight.copy_(weight)
        layer.bias.copy_(bias)
    for norm, gain in ((layer, weight), (rms, weight), (gemma, 1 + weight)):
        torch.testing.assert_close(norm_gain(norm, d_model), gain, rtol=1e-5, atol=1e-6)


def test_a_gemma_models_lens_uses_its_one_plus_weight_gain(model_and_tokenizer):
    from transformers import GemmaConfig, GemmaForCausalLM

    _, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    gemma = GemmaForCausalLM(GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with torch.no_grad():
        gemma.model.norm.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    component = {"model.layers.0.self_attn.o_proj.weight": torch.randn(32, 32)}
    (lens,) = logit_lens(gemma, tokenizer, component, top_k=3)[:1]
    (given,) = logit_lens(gemma, tokenizer, component, top_k=3,
                          final_norm=1 + gemma.model.norm.weight)[:1]
    (read,) = logit_lens(gemma, tokenizer, component, top_k=3,
                         final_norm=gemma.model.norm.weight)[:1]
    assert [t for t, _ in lens.promoted] == [t for t, _ in given.promoted]
    assert [v for _, v in lens.promoted] == pytest.approx([v for _, v in given.promoted], rel=1e-4)
    assert [t for t, _ in lens.promoted] != [t for t, _ in read.promoted]


def _post_norm_model(kind, vocab):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    if kind == "olmo2":
        return Olmo2ForCausalLM(Olmo2Config(**shape))
    return Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=8))


@pytest.mark.parametrize("kind", ["olmo2", "gemma2"])
def test_a_post_norm_writer_is_read_through_its_norm(model_and_tokenizer, kind):
    """OLMo2 and Gemma2 normalise each sub-block's output before the residual add: the probe
    finds that norm for every writer (and none in Qwen2, whose post_attention_layernorm is the
    MLP's pre-norm), and the lens applies its gain: W_U (g_final * g_post * u)."""
    from sae_shards.analysis.logit_lens import writer_post_norms

    tiny, tokenizer = model_and_tokenizer
    assert writer_post_norms(tiny) == {}
    model = _post_norm_model(kind, len(tokenizer))
    layers = model.model.layers
    post = writer_post_norms(model)
    assert post == {**{f"model.layers.{i}.self_attn.o_proj.weight":
                       layers[i].post_attention_layernorm for i in range(2)},
                    **{f"model.layers.{i}.mlp.down_proj.weight":
                       layers[i].post_feedforward_layernorm for i in range(2)}}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers:
            layer.post_feedforward_layernorm.weight.copy_(torch.rand(32, generator=g) * 4 - 1)
    name = "model.layers.1.mlp.down_proj.weight"
    component = torch.randn(32, 64, generator=g)
    (res,) = logit_lens(model, tokenizer, {name: component}, top_k=4)[:1]
    final = norm_gain(find_final_norm(model), 32)
    g_post = norm_gain(layers[1].post_feedforward_layernorm, 32)
    logits = model.lm_head.weight.detach() @ (final * g_post * res.direction.float())
    want = logits.topk(4).indices.tolist()
    assert list(res.promoted_ids) == want
    assert [v for _, v in res.promoted] == pytest.approx(logits[want].tolist(), rel=1e-4)
    (skipped,) = logit_lens(model, tokenizer, {name: component}, top_k=4, post_norms={})[:1]
    assert list(skipped.promoted_ids) != want  # the norm's gain changes the answer
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["down_proj"]))
    assert {k: type(v) for k, v in writer_post_norms(adapted).items()} == \
        {k: type(v) for k, v in post.items()}  # followed through the LoRA layer's sum


def test_one_expert_of_a_stacked_down_projection_is_read_like_a_linear_writer():
    model, tokenizer = tiny_model_and_tokenizer("qwen3_moe", seed=0)  # experts [4, 64, 128]
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    down = "model.layers.1.mlp.experts.down_proj"
    writers = writer_targets(model)
    assert [f"{down}[{e}]" for e in range(4)] == [w for w in writers if w.startswith(down)]
    assert not any("gate_up_proj" in w for w in writers)  # its output is not d_model
    u, v = _token_write(model, tokenizer, "e"), _v(128)
    (res,) = logit_lens(model, tokenizer, {f"{down}[2]": 1.5 * u @ v.T}, top_k=3)
    assert res.target == f"{down}[2]" and res.promoted[0][0] == "e"
    assert res.singular_value == pytest.approx(1.5, rel=1e-5)
    with pytest.raises(ValueError, match=r"has shape \(128, 64\) but the parameter has shape "
                                         r"\(64, 128\)"):
        logit_lens(model, tokenizer, {f"{down}[2]": v @ u.T})
    # the whole stacked tensor, or an expert it does not have, is no writer
    with pytest.raises(ValueError, match="no component targets a residual-stream writer"):
        logit_lens(model, tokenizer, {f"{down}[4]": u @ v.T})


def test_a_top_k_that_is_no_positive_int_is_named():
    """top_k=-1 failed inside torch.topk."""
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    params = dict(model.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match=rf"logit_lens: top_k={bad!r} must be a positive int"):
            logit_lens(model, tokenizer, {name: torch.ones_like(params[name])}, top_k=bad)


def test_a_projection_before_the_unembedding_is_named_as_why_there_is_no_lens(
        model_and_tokenizer):
    """OPT-350m's layout: the blocks write 64 features, project_out maps them to the 32 the
    unembedding reads. No writer is found, and the report said "No writer targets." under every
    shard, as if the shards touched no output projection; it now says why."""
    from transformers import OPTConfig, OPTForCausalLM

    from sae_shards.analysis.logit_lens import no_writers_reason
    from sae_shards.analysis.report import lens_gap

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=40, hidden_size=64, word_embed_proj_dim=32,
                                   num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                   do_layer_norm_before=False, max_position_embeddings=32))
    assert writer_targets(opt) == []
    why = no_writers_reason(opt)
    assert why.startswith("the unembedding reads 32 features but the blocks' output projections "
                          "write 64") and "project_out" in why, why
    assert lens_gap(opt) == why
    # the Linear feeding the unembedding is no final norm (audit 110 F9): no [32] weight feeds it
    with pytest.raises(FinalNormNotFound, match="cannot tell the final norm of OPTForCausalLM"):
        find_final_norm(opt)
    model, _ = model_and_tokenizer  # writers found: no reason, a shard without one is told apart
    assert writer_targets(model) and no_writers_reason(model) is None
    assert lens_gap(model).startswith("no part of this shard is on a residual-stream writer")
    from sae_shards.analysis.report import _lens_html

    assert f"<p>No logit lens: {html.escape(why)}.</p>" in _lens_html(3, [], {}, why)


def test_each_direction_of_a_writer_has_its_own_singular_value(model_and_tokenizer):
    """Audit 117 L08: a component of two directions (singular values 3 and 1): each row of the
    lens reports its own, not the top one."""
    model, tokenizer = model_and_tokenizer
    name = "model.layers.0.mlp.down_proj.weight"
    W = dict(model.named_parameters())[name]
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(W.shape[0], 2, generator=g))[0]
    v = torch.linalg.qr(torch.randn(W.shape[1], 2, generator=g))[0]
    component = 3.0 * u[:, :1] @ v[:, :1].T + 1.0 * u[:, 1:] @ v[:, 1:].T
    found = logit_lens(model, tokenizer, {name: component}, top_k=2)
    assert [round(r.singular_value, 4) for r in found] == [3.0, 1.0]


def test_a_post_norm_writers_bias_is_read_through_the_same_norm():
    """logit_lens: a writer's bias passes through the same post-norm as its weight before the
    residual add (OLMo2 with attention biases), so its tokens are W_U (g_final * g_post * b)."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from sae_shards.analysis.logit_lens import find_final_norm, logit_lens, norm_gain

    _, tokenizer = tiny_model_and_tokenizer(seed=0)
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(Olmo2Config(vocab_size=len(tokenizer), hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         attention_bias=True))
    layer = model.model.layers[1]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.post_attention_layernorm.weight.copy_(torch.rand(32, generator=g) * 4 - 1)
    name = "model.layers.1.self_attn.o_proj.bias"
    bias = torch.randn(32, generator=g)
    (res,) = logit_lens(model, tokenizer, {name: bias}, top_k=4)
    final = norm_gain(find_final_norm(model), 32)
    g_post = norm_gain(layer.post_attention_layernorm, 32)
    logits = model.lm_head.weight.detach() @ (final * g_post * res.direction.float())
    want = logits.topk(4).indices.tolist()
    assert list(res.promoted_ids) == want
    assert [v for _, v in res.promoted] == pytest.approx(logits[want].tolist(), rel=1e-4)
