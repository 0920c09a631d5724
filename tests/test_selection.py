"""Default targets and weight layouts by module type, across families and with LoRA."""

from __future__ import annotations

import fnmatch

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

from sae_shards.capture.selection import (
    LoraTarget,
    block_lists,
    default_targets,
    glob_escape,
    output_axis,
    select_targets,
    weight_layout,
)
from sae_shards.recipe.models import tiny_model_and_tokenizer

LLAMA_LIKE = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
GPT2 = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def _expected(prefix: str, leaves: list[str], n_layers: int = 2) -> list[str]:
    return [f"{prefix}.{i}.{leaf}.weight" for i in range(n_layers) for leaf in leaves]


@pytest.mark.parametrize("arch, prefix, leaves, axis", [
    ("qwen2", "model.layers", LLAMA_LIKE, 0),
    ("llama", "model.layers", LLAMA_LIKE, 0),
    ("gpt2", "transformer.h", GPT2, 1),
])
def test_default_targets_by_module_type(arch, prefix, leaves, axis):
    model, _ = tiny_model_and_tokenizer(arch=arch)
    targets = default_targets(model)
    assert block_lists(model) == [prefix]
    assert targets == _expected(prefix, leaves)  # no embeddings, lm_head, norms or biases
    assert list(select_targets(model, targets)) == targets  # usable as capture.targets as is
    assert {output_axis(model, n) for n in targets} == {axis}


def test_output_axis_follows_the_layer_type():
    model, _ = tiny_model_and_tokenizer(arch="gpt2")
    c_proj = model.transformer.h[0].attn.c_proj
    assert weight_layout(c_proj) == "in_out" and c_proj.weight.shape == (64, 64)  # square
    assert output_axis(model, "transformer.h.0.mlp.c_proj.weight") == 1  # [128 in, 64 out]
    assert output_axis(model, "lm_head.weight") == 0  # an nn.Linear outside the blocks
    assert weight_layout(nn.Linear(3, 2)) == "out_in"
    assert weight_layout(Conv1D(2, 3)) == "in_out"
    assert weight_layout(nn.LayerNorm(3)) is None
    with pytest.raises(ValueError, match=r"'transformer.ln_f.weight' is not the weight of an "
                                         r"nn.Linear or Conv1D.*c_attn"):
        output_axis(model, "transformer.ln_f.weight")


def test_lora_default_targets_are_the_adapted_base_weights():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model_and_tokenizer(arch="qwen2")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    targets = default_targets(peft_model)
    assert targets == _expected("model.layers", ["self_attn.q_proj", "mlp.down_proj"])
    selected = select_targets(peft_model, targets)
    assert list(selected) == targets
    assert all(isinstance(t, LoraTarget) for t in selected.values())
    assert {output_axis(peft_model, n) for n in targets} == {0}


@pytest.mark.parametrize("setting,fix", [({"use_dora": True}, "use_dora=False"),
                                         ({"lora_bias": True}, "lora_bias=False")])
def test_a_lora_variant_capture_cannot_follow_is_refused_saying_what_to_set(setting, fix):
    """DoRA and lora_bias were refused naming the setting but not what to do (audit 104 F5a)."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model_and_tokenizer(arch="qwen2")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], **setting))
    with pytest.raises(NotImplementedError, match=rf"q_proj.weight: capture does not support "
                                                  rf".* set {fix} in the LoraConfig"):
        select_targets(peft_model, default_targets(peft_model))


def test_a_modules_to_save_layer_is_named_as_the_merged_model_names_it():
    """lm_head trained beside a LoRA adapter (modules_to_save): its trained copy is the target,
    under ``lm_head.weight`` (analysis's merged model's name); the frozen original is neither
    a target nor a 'frozen' match."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model_and_tokenizer(arch="qwen2")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"],
                                                  modules_to_save=["lm_head"]))
    trained = peft_model.base_model.model.lm_head.modules_to_save["default"].weight
    for pattern in ("lm_head.weight", "*lm_head*"):
        assert list(select_targets(peft_model, [pattern])) == ["lm_head.weight"]
        assert select_targets(peft_model, [pattern])["lm_head.weight"] is trained
    assert output_axis(peft_model, "lm_head.weight") == 0
    assert "lm_head" not in " ".join(default_targets(peft_model))  # never in the defaults


def test_nothing_capturable_or_no_blocks_is_an_error():
    model, _ = tiny_model_and_tokenizer(arch="llama")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no block matrix.*capture.targets to explicit globs, "
                                         r"e.g. '\*mlp.down_proj.weight' once they train"):
        default_targets(model)
    # only the readout trains: the example is a matrix that does (a block's, the example it
    # gave, was then refused as frozen; audit 132 F4)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"e.g. \['lm_head.weight'\], which train"):
        default_targets(model)
    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"no transformer block list.*capture.targets"):
        default_targets(flat)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.experts = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(2))


class _MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(_Block() for _ in range(2))
        self.head = nn.Linear(4, 10)


def test_block_list_is_the_outermost_one():
    model = _MoE()
    assert block_lists(model) == ["blocks"]  # not each block's list of experts
    assert default_targets(model) == [
        f"blocks.{i}.{leaf}.weight" for i in range(2)
        for leaf in ("attn", "experts.0", "experts.1")
    ]


def test_glob_escape_matches_exactly_the_name():
    name = "odd[0].w*?"
    pattern = glob_escape(name)
    assert fnmatch.fnmatchcase(name, pattern)
    assert not fnmatch.fnmatchcase("odd0.wxy", pattern)
    pattern = glob_escape("experts.a?b.weight")  # a ModuleDict key's ?: not any character
    assert fnmatch.fnmatchcase("experts.a?b.weight", pattern)
    assert not [other for other in ("experts.axb.weight", "experts.a[b.weight",
                                    "experts.a*b.weight") if fnmatch.fnmatchcase(other, pattern)]
    assert glob_escape("model.layers.0.mlp.down_proj.weight") == (
        "model.layers.0.mlp.down_proj.weight")


def test_default_targets_name_the_mixture_of_experts_parameters_they_leave_out(caplog):
    """A mixture of experts' router and stacked experts ([experts, m, n], not nn.Linear) are no
    default targets: the run says so instead of leaving most of the block's update out in
    silence; attention-only models say nothing."""
    import logging

    from transformers import MixtralConfig, MixtralForCausalLM

    moe = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, head_dim=8))
    with caplog.at_level(logging.WARNING, logger="sae_shards.capture.selection"):
        names = default_targets(moe)
    assert len(names) == 8 and all("self_attn" in n for n in names)
    said = caplog.text
    assert "leave out 6 trainable block parameters" in said
    assert "model.layers.0.mlp.gate.weight [4, 32]" in said
    assert "model.layers.1.mlp.experts.down_proj [4, 32, 64]" in said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_shards.capture.selection"):
        assert default_targets(moe) == names  # resolved again: said once per model
    assert "leave out" not in caplog.text
    model, _ = tiny_model_and_tokenizer(seed=0)
    with caplog.at_level(logging.WARNING, logger="sae_shards.capture.selection"):
        default_targets(model)
    assert "leave out" not in caplog.text


def test_a_tied_readout_is_named_by_the_tensor_it_is_tied_to():
    """A tied lm_head's weight is the input embedding's, listed once under the embedding's
    name: capture=readout's 'lm_head.weight' says so and names it."""
    model, _ = tiny_model_and_tokenizer(seed=0)
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to model.embed_tokens.weight "
                                         r"\(the same tensor, named once\); name "
                                         r"model.embed_tokens.weight"):
        select_targets(model, ["lm_head.weight"])
    assert list(select_targets(model, ["model.embed_tokens.weight"])) == [
        "model.embed_tokens.weight"]


def test_a_lora_adapter_sharded_by_fsdp2_is_refused_as_lora_under_fsdp2(tmp_path):
    """A peft adapter's weight as a DTensor got the generic "looks sharded" refusal, which says
    FSDP2 is supported; it now says LoRA is not, under FSDP2, and what to run instead."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from helpers import one_process_group
    from sae_shards.capture.selection import check_not_sharded

    with one_process_group():
        mesh = init_device_mesh("cpu", (1,))
        weight = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 8), mesh, [Replicate()]))
        name = "base_model.model.layers.0.q_proj.lora_A.default.weight"
        with pytest.raises(ValueError, match=r"is a LoRA adapter's, sharded by FSDP2: LoRA is "
                                             r"not supported under FSDP2"):
            check_not_sharded([(name, weight)])
        with pytest.raises(ValueError, match="looks sharded"):
            check_not_sharded([("layers.0.q_proj.weight", weight)])


def test_a_zero3_partitioned_parameter_is_targeted_by_its_whole_shape():
    """Under DeepSpeed ZeRO-3 a partitioned parameter's local shape is (0,) and its whole one
    ``ds_shape``: the SAE's targets are built from the whole (audit 124, SE02; the distributed
    tests reach it only when slow)."""
    import torch

    from sae_shards.capture.selection import full_shape, target_shapes

    p = nn.Parameter(torch.empty(0))
    p.ds_shape = torch.Size([4, 8])
    assert full_shape(p) == (4, 8)
    assert target_shapes({"w": p, "v": nn.Parameter(torch.zeros(3, 2))}) == {
        "w": (4, 8), "v": (3, 2)}


def test_a_scripts_lora_on_a_conv1d_layer_is_refused_by_target_selection():
    """A script's own peft model with LoRA on GPT-2's Conv1D layers (peft's fan_in_fan_out: the
    adapter's B A is the transpose of the weight's layout) never passes the recipe's check:
    target selection refuses it, instead of capturing a delta in the wrong layout (audit 124,
    E05)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model_and_tokenizer(arch="gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own note that it sets fan_in_fan_out
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_proj"],
                                                      fan_in_fan_out=True))
    with pytest.raises(NotImplementedError, match=r"a LoRA adapter on a Conv1D layer \(GPT-2 "
                                                  r"style, peft's fan_in_fan_out\)"):
        select_targets(peft_model, ["transformer.h.0.attn.c_proj.weight"])
