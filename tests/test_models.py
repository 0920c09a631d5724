"""Tiny model builder and loader: architectures, save/load fidelity, tokenizer, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, ViTConfig

from sae_shards.recipe.models import (
    ARCHS,
    BUILD_SETTINGS_FILE,
    CHARS,
    MAX_POSITIONS,
    TASK_TAGS,
    build_tiny_model,
    build_tokenizer,
    load_model_and_tokenizer,
    load_tokenizer,
    tiny_model_and_tokenizer,
)

PROMPT = "<A> hello, world 42!"


def _logits(model: torch.nn.Module, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits  # [1, seq, vocab]


@pytest.mark.parametrize("arch", ARCHS)
def test_build_save_load_keeps_logits(tmp_path, arch):
    path = build_tiny_model(tmp_path / arch, arch=arch, seed=3)
    assert (path / "config.json").is_file() and (path / BUILD_SETTINGS_FILE).is_file()
    loaded, tokenizer = load_model_and_tokenizer(path)
    in_memory, _ = tiny_model_and_tokenizer(arch=arch, seed=3)
    assert loaded.config.model_type == arch
    ids = tokenizer(PROMPT)["input_ids"]
    torch.testing.assert_close(_logits(loaded, ids), _logits(in_memory, ids), rtol=0, atol=0)


def test_build_is_deterministic_and_seeded(tmp_path):
    a, _ = load_model_and_tokenizer(build_tiny_model(tmp_path / "a", seed=0))
    b, _ = load_model_and_tokenizer(build_tiny_model(tmp_path / "b", seed=0))
    c, _ = load_model_and_tokenizer(build_tiny_model(tmp_path / "c", seed=1))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_build_reuses_same_settings_and_refuses_others(tmp_path):
    path = build_tiny_model(tmp_path / "m")
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_model(tmp_path / "m") == path
    assert weights.stat().st_mtime_ns == before  # reused, not rewritten
    with pytest.raises(ValueError, match="not the requested"):
        build_tiny_model(tmp_path / "m", hidden_size=32)
    # a run made by an earlier version resumes with its own build (it trained with it)
    settings = json.loads((path / BUILD_SETTINGS_FILE).read_text())
    (path / BUILD_SETTINGS_FILE).write_text(json.dumps({**settings, "format": 1}))
    assert build_tiny_model(tmp_path / "m") == path
    assert weights.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="not the requested"):
        build_tiny_model(tmp_path / "m", seed=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        build_tiny_model(tmp_path / "other")


def test_unknown_arch_names_field_and_choices(tmp_path):
    with pytest.raises(ValueError, match=r"model.arch='gpt9'.*qwen2.*llama.*gpt2"):
        build_tiny_model(tmp_path / "m", arch="gpt9")


def test_gpt2_is_sized_as_asked_with_conv1d_matrices(tmp_path):
    from transformers.pytorch_utils import Conv1D

    model, tokenizer = load_model_and_tokenizer(
        build_tiny_model(tmp_path / "g", arch="gpt2", hidden_size=32, num_layers=3, num_heads=2,
                         intermediate_size=48)
    )
    assert type(model).__name__ == "GPT2LMHeadModel" and len(model.transformer.h) == 3
    block = model.transformer.h[0]
    assert all(isinstance(m, Conv1D) for m in (block.attn.c_attn, block.attn.c_proj,
                                                block.mlp.c_fc, block.mlp.c_proj))
    assert block.attn.c_attn.weight.shape == (32, 96)  # [in, out]: q, k, v side by side
    assert block.mlp.c_fc.weight.shape == (32, 48) and block.mlp.c_proj.weight.shape == (48, 32)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()  # untied
    assert model.transformer.wpe.weight.shape[0] == MAX_POSITIONS
    config = model.config
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.0, 0.0, 0.0)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():  # generation runs with our special ids
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids["input_ids"].shape[1] + 4


def test_tokenizer_round_trips_prompt_with_tag(tmp_path):
    _, tokenizer = load_model_and_tokenizer(build_tiny_model(tmp_path / "m"))
    ids = tokenizer(PROMPT)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["<bos>", "<A>", "Ġ"]  # bos, then the tag as ONE token (a space
    # is spelt byte-level)
    assert len(ids) == 1 + 1 + len(PROMPT) - len("<A>")  # one token per other character
    assert tokenizer.unk_token_id not in ids
    # TRL decodes completions with skip_special_tokens=True: tags must survive, bos/eos must not.
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == PROMPT
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in TASK_TAGS)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_own_loading_gives_the_same_tokens(tmp_path, arch):
    """A script loading the tiny model's directory as TRL does (AutoTokenizer: transformers 5
    rebuilds a qwen2 directory's tokenizer as Qwen2Tokenizer, a gpt2 one's as GPT2Tokenizer)
    gets the ids and text the run's own loader gives, spaces and newlines included."""
    path = build_tiny_model(tmp_path / arch, arch=arch)
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    for text in (PROMPT, CHARS, "x\n\n y  z", "<B><C> a b<eos>"):
        ids = ours(text)["input_ids"]
        assert theirs(text)["input_ids"] == ids, (type(theirs).__name__, text)
        assert ours.unk_token_id not in ids
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(
            ids, skip_special_tokens=True)


def test_in_memory_tokenizer_matches_saved_one(tmp_path):
    saved = load_tokenizer(build_tiny_model(tmp_path / "m"))
    fresh = build_tokenizer()
    assert saved.get_vocab() == fresh.get_vocab()
    assert saved(PROMPT)["input_ids"] == fresh(PROMPT)["input_ids"]
    assert (saved.pad_token, saved.padding_side) == ("<pad>", "left")


def test_load_errors_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*not a directory.*build_tiny_model"):
        load_model_and_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json"):
        load_model_and_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json"):
        load_tokenizer(tmp_path / "empty")
    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"vit holds a ViTConfig.*not a causal language model"):
        load_model_and_tokenizer(tmp_path / "vit")
    # a config.json transformers cannot read: named, with what the directory must be (it was
    # transformers' text alone, naming neither the setting nor the fix; audit 132 F3)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"foo": 1}')
    with pytest.raises(ValueError, match=r"model path .*odd: transformers cannot read its "
                                         r"config.json \(.*model_type.*\); it must be a model "
                                         r"directory written by save_pretrained"):
        load_model_and_tokenizer(tmp_path / "odd")


def test_readout_scale_multiplies_lm_head_init_only(tmp_path):
    plain, _ = tiny_model_and_tokenizer(seed=2)
    scaled, _ = tiny_model_and_tokenizer(seed=2, readout_scale=10.0)
    for (name, a), b in zip(plain.named_parameters(), scaled.parameters()):
        factor = 10.0 if name == "lm_head.weight" else 1.0
        torch.testing.assert_close(b, a * factor, rtol=0, atol=0, msg=name)
    path = build_tiny_model(tmp_path / "s", seed=2, readout_scale=10.0)
    loaded, _ = load_model_and_tokenizer(path)
    assert torch.equal(loaded.lm_head.weight, scaled.lm_head.weight)
    assert build_tiny_model(tmp_path / "s", seed=2, readout_scale=10.0) == path  # reused
    with pytest.raises(ValueError, match="not the requested"):
        build_tiny_model(tmp_path / "s", seed=2)  # readout_scale 1 is another build
    with pytest.raises(ValueError, match="model.readout_scale=0 must be > 0"):
        tiny_model_and_tokenizer(readout_scale=0)


def test_the_meta_policy_is_built_whole_under_a_deepspeed_zero3_config():
    """Under a ZeRO-3 launch transformers builds a model through deepspeed.zero.Init and then
    fails to initialise weights without data ('Cannot copy out of meta tensor'): meta_policy
    returned None and every ZeRO-3 run skipped its target checks. meta_model builds it whole,
    on the meta device, and leaves transformers' ZeRO-3 state as it was."""
    import gc

    pytest.importorskip("deepspeed")
    from transformers import modeling_utils
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from sae_shards.recipe.models import meta_policy

    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3},
                               "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        policy = meta_policy(None)  # the tiny model's config
        assert policy is not None
        weight = next(policy.parameters())
        assert weight.device.type == "meta" and weight.dim() == 2 and not hasattr(weight, "ds_id")
        assert modeling_utils._is_ds_init_called is False  # restored after the build
    finally:
        del zero3
        gc.collect()
    assert not is_deepspeed_zero3_enabled()


def test_tiny_model_pads_left_and_stops_at_its_eos(tmp_path):
    from sae_shards.recipe.models import build_tiny_model, load_model_and_tokenizer

    path = build_tiny_model(tmp_path / "m")
    model, tokenizer = load_model_and_tokenizer(path)
    assert tokenizer.padding_side == "left"  # decoder-only generation pads on the left
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id  # the pad comes first
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.config.num_key_value_heads == model.config.num_attention_heads
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_a_known_model_type_with_its_own_code_is_loaded_without_running_it(tmp_path,
                                                                                  monkeypatch):
    """A qwen2 directory whose config.json also names a causal-LM class of its own code
    (auto_map) loads with transformers' own Qwen2 class: the code is never imported without the
    opt-in (trust_remote_code is not hard-wired on in from_pretrained)."""
    import json
    import shutil

    from helpers import own_code_cache
    from sae_shards.recipe.models import build_tiny_model, load_model_and_tokenizer

    own_code_cache(monkeypatch, tmp_path / "modules")
    path = tmp_path / "m"
    shutil.copytree(build_tiny_model(tmp_path / "tiny"), path)
    marker = tmp_path / "ran"
    (path / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import Qwen2ForCausalLM\n\n\n"
        "class EvilForCausalLM(Qwen2ForCausalLM):\n    pass\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    model, _ = load_model_and_tokenizer(path)
    assert type(model).__name__ == "Qwen2ForCausalLM" and not marker.exists()
