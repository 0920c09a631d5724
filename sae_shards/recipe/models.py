"""Models: build a tiny random causal LM with a local character-level tokenizer, or load one.

Nothing here touches the network. ``build_tiny_model`` writes a complete transformers model
directory (``config.json``, weights, tokenizer files) so that TRL can rebuild the reference model
from the *path* when ``beta > 0``; ``load_model_and_tokenizer`` reads any local causal-LM directory.

The tokenizer is character level: one token per lowercase letter, digit, space and punctuation
mark, plus the task tags ``<A>``..``<H>`` as single tokens and
``<pad>``/``<bos>``/``<eos>``/``<unk>``.
A character-level vocabulary keeps rewards that count characters exactly aligned with the tokens
the policy chooses, so a tiny model can learn them quickly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, get_args

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3MoeConfig,
)
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING,
                                                    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

from sae_shards.core import json_read
from sae_shards.core.checkpoint import process_umask, usual_file_modes
from sae_shards.core.checkpoint_checks import damaged, opened_safetensors
from sae_shards.run.config import Arch
from sae_shards.run.rundir import CONFIG, FINAL_MODEL

log = logging.getLogger(__name__)

ARCHS: tuple[str, ...] = get_args(Arch)
"""Architectures ``build_tiny_model`` can build (gpt2 keeps matrices in ``Conv1D``: [in, out];
qwen3_moe keeps its experts stacked, ``[experts, m, n]``)."""

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}
TASK_TAGS = tuple(f"<{c}>" for c in "ABCDEFGH")
"""Task tags, one token each (tasks put them at the start of prompts)."""
CHARS = string.ascii_lowercase + string.digits + " \n" + string.punctuation
"""Every plain character the tokenizer knows; anything else becomes ``<unk>``."""

BUILD_SETTINGS_FILE = "sae_shards_build.json"
"""Written last into a built model dir; a dir is reused only when these settings match."""
BUILD_FORMAT = 2
"""Bump when the tokenizer or the build recipe changes, so old cached builds are not reused
(2: the vocabulary spelt byte-level, ``build_tokenizer``). A run directory's own build of an
earlier format is reused all the same when resumed: the run trained with it."""
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""``tokenizer_class`` values that mean "just the tokenizer.json" (see ``load_tokenizer``)."""
MAX_POSITIONS = 256
"""Context length of the tiny models (prompt + completion stay far below it)."""


class ModelAndTokenizer(NamedTuple):
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: ids 0-3 special, then the task tags, then ``CHARS``.

    Each character is spelt in the vocabulary as byte-level BPE spells it (``" "`` is ``Ġ``,
    ``"\\n"`` is ``Ċ``; other characters of ``CHARS`` as themselves), with a byte-level
    pre-tokenizer and decoder: transformers 5's ``AutoTokenizer`` (and so TRL, loading a script's
    policy directory) rebuilds the tokenizer of a ``qwen2`` directory as ``Qwen2Tokenizer``, a
    byte-level BPE over the saved vocabulary, and this spelling makes that give the same ids as
    ``tokenizer.json`` does for every text of ``CHARS`` and tags (it drops what ours maps to
    ``<unk>``)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    spelt = [byte_level.pre_tokenize_str(c)[0][0] for c in CHARS]
    vocab_tokens = [*SPECIAL_TOKENS.values(), *TASK_TAGS, *spelt]
    vocab = {tok: i for i, tok in enumerate(vocab_tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    # Every character (newlines too) is its own pre-token, spelt byte-level, so WordLevel maps
    # it to its id (or <unk>).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"), byte_level])
    # Byte-level decoding concatenates the pieces and spells them back (WordLevel's default
    # decoding would join them with spaces).
    tok.decoder = decoders.ByteLevel()
    # Tags are added (not special) tokens: matched whole before splitting, and kept when TRL
    # decodes completions with skip_special_tokens=True.
    tok.add_tokens([AddedToken(t, normalized=False) for t in TASK_TAGS])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL_TOKENS.values()])
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=MAX_POSITIONS,
    )


def _model_config(
    arch: str,
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
) -> PretrainedConfig:
    """A transformers config for ``arch`` sized as given, wired to the tokenizer's special ids."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Untied: the readout (lm_head) is reported apart from the body, so keep it its own tensor.
        tie_word_embeddings=False,
    )
    match arch:
        case "qwen2":
            return Qwen2Config(**common)
        case "llama":
            return LlamaConfig(**common)
        case "qwen3_moe":  # every block a mixture of experts, the experts stacked [E, m, n]
            return Qwen3MoeConfig(**common, head_dim=hidden_size // num_heads, num_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=intermediate_size,
                                  decoder_sparse_step=1, norm_topk_prob=True)
        case "gpt2":
            return GPT2Config(
                vocab_size=common["vocab_size"],
                n_embd=hidden_size,
                n_layer=num_layers,
                n_head=num_heads,
                n_inner=intermediate_size,
                n_positions=MAX_POSITIONS,
                # No dropout, like the other tiny models: the policy that samples is the one scored.
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=common["bos_token_id"],
                eos_token_id=common["eos_token_id"],
                pad_token_id=common["pad_token_id"],
                tie_word_embeddings=common["tie_word_embeddings"],
            )
        case other:
            raise ValueError(f"model.arch={other!r} is not supported; choose one of {list(ARCHS)}")


def tiny_model_and_tokenizer(
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
    readout_scale: float = 1.0,
) -> ModelAndTokenizer:
    """The random tiny model and its tokenizer, in memory (``build_tiny_model`` saves them).

    ``readout_scale`` multiplies the initial ``lm_head`` weights (transformers initialises them
    at std 0.02). With a small readout the logits barely depend on the hidden state, so a policy
    whose readout and final norm are frozen (``rl.trainable`` = the body) cannot move its output
    distribution far; a larger readout lets the body alone carry a task."""
    if hidden_size % num_heads != 0:
        raise ValueError(
            f"model.hidden_size={hidden_size} must be divisible by model.num_heads={num_heads}"
        )
    if not readout_scale > 0:
        raise ValueError(f"model.readout_scale={readout_scale} must be > 0 (1: the usual init)")
    tokenizer = build_tokenizer()
    config = _model_config(arch, tokenizer, hidden_size, num_layers, num_heads, intermediate_size)
    # The init draws from torch's global RNG; fork it so the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if readout_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(readout_scale)
    # Generation must stop at our eos and pad with our pad.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return ModelAndTokenizer(model, tokenizer)


def meta_model(config: Any, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM of ``config`` on the meta device: modules and parameter names, no memory.
    Under a DeepSpeed ZeRO-3 launch transformers would build it partitioned, through
    ``deepspeed.zero.Init``, and then fail to initialise weights that have no data; a meta model
    is never partitioned (transformers' own ``set_zero3_state`` says it is built already)."""
    from transformers import modeling_utils
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    unpartitioned = getattr(modeling_utils, "set_zero3_state", None)
    if unpartitioned is None:  # a transformers without it: said, not skipped in silence
        if is_deepspeed_zero3_enabled():
            log.warning("this transformers has no modeling_utils.set_zero3_state, so under "
                        "DeepSpeed ZeRO-3 the policy cannot be built on the meta device: the "
                        "capture targets are checked when the model has loaded, not before")
        unpartitioned = contextlib.nullcontext
    with torch.device("meta"), unpartitioned():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def meta_policy(path: str | Path | None, arch: str = "qwen2", hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
                trust_remote_code: bool = False) -> PreTrainedModel | None:
    """The policy's modules and parameter names without its weights: the model directory's
    config (``path``) or the tiny model's (``arch`` and sizes), built on the meta device (a 7B
    config in ~2 s, no memory). None where no causal LM can be built from the config alone (no
    config.json, a model needing its own code without ``trust_remote_code``, not a causal LM):
    the checks on the loaded model say why."""
    try:
        if path is not None:
            config = AutoConfig.from_pretrained(path, local_files_only=True,
                                                trust_remote_code=trust_remote_code)
        else:
            config = _model_config(arch, build_tokenizer(), hidden_size, num_layers, num_heads,
                                   intermediate_size)
        return meta_model(config, trust_remote_code)
    except Exception as e:  # reported by the checks on the loaded model, in their own terms
        log.debug("no meta policy from %s: %s", path or arch, e)
        return None


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
    readout_scale: float = 1.0,
    rebuild: bool = False,
) -> Path:
    """Build a random tiny causal LM plus tokenizer and save both into ``out_dir``; return it
    (``readout_scale``: see ``tiny_model_and_tokenizer``). ``rebuild``: a build of other
    settings in ``out_dir`` is replaced rather than refused (a new run's ``model/`` left by a
    start that failed: the build is deterministic, so nothing is lost).

    Deterministic given the settings. If ``out_dir`` already holds a build with the same settings
    it is reused as is; a non-empty ``out_dir`` holding anything else is an error (never
    silently overwritten).
    """
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is not supported; choose one of {list(ARCHS)}")
    out_dir = Path(out_dir)
    settings = dict(
        format=BUILD_FORMAT,
        arch=arch,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        seed=seed,
    )
    if readout_scale != 1.0:  # absent at 1, so builds made before the option stay reusable
        settings["readout_scale"] = readout_scale
    settings_path = out_dir / BUILD_SETTINGS_FILE
    if settings_path.is_file():
        found = json_read.loads(settings_path.read_text())
        if found == settings or (isinstance(found.get("format"), int)
                                 and found["format"] < BUILD_FORMAT
                                 and {**found, "format": BUILD_FORMAT} == settings):
            return out_dir  # an earlier format's build: a run resumed keeps its own model
        if rebuild:
            log.info("%s: replacing the tiny model a start that failed built with %s",
                     out_dir, found)
            shutil.rmtree(out_dir)
        else:
            raise ValueError(
                f"{out_dir} holds a tiny model built with {found}, not the requested {settings}; "
                "delete that directory or build into another out_dir (sae-shards train: another "
                "run_dir)"
            )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(
            f"{out_dir} is not empty and holds no {BUILD_SETTINGS_FILE}; refusing to overwrite it. "
            "Choose an empty or new out_dir (sae-shards train: another run_dir)"
        )

    model, tokenizer = tiny_model_and_tokenizer(
        arch, hidden_size, num_layers, num_heads, intermediate_size, seed, readout_scale
    )

    # Write into a temporary sibling and rename, so a crash never leaves a half-written model
    # that a later call would mistake for a finished one.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o777 & ~process_umask())  # mkdtemp makes it private; a model is for others too
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    usual_file_modes(tmp)  # safetensors made the weights 0600
    (tmp / BUILD_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked above)
    shutil.move(str(tmp), str(out_dir))
    return out_dir


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tokenizer_config.json")
"""A saved tokenizer has at least one of these."""


def _check_model_dir(path: Path) -> None:
    """Raise a clear error unless ``path`` looks like a save_pretrained model directory."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"model path {path} is not a directory; give a local transformers model directory "
            "(written by save_pretrained): model.path=DIR for sae-shards train (model.path=null "
            "for its built-in tiny model), or one built with build_tiny_model(DIR)"
        )
    if (path / FINAL_MODEL).is_dir() and (path / CONFIG).is_file():
        raise FileNotFoundError(
            f"model path {path} is a sae-shards run directory, not a model; the policy it "
            f"trained is {path / FINAL_MODEL}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model path {path} has no config.json; it must be a directory written by "
            "save_pretrained (config.json, weights and tokenizer files)"
        )


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
"""How transformers saves a model's weights (whole, or sharded with an index)."""


def check_model_files(folder: Path, advice: str) -> None:
    """Every ``*.safetensors`` file at the top of a model directory opens (its header agrees
    with its size; no tensor is read) and every ``*.json`` file parses to an object: a
    truncated or damaged copy raises ``CheckpointError`` naming the file and ``advice`` (what to
    do), where transformers would raise safetensors' or json's error from deep inside
    ``from_pretrained``."""
    for file in sorted(folder.glob("*.safetensors")):
        with opened_safetensors(file, advice):
            pass
    for file in sorted(folder.glob("*.json")):
        try:
            if not isinstance(json_read.loads(file.read_bytes()), dict):  # every one HF writes
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise damaged(file, e, advice) from None


TRUST_REMOTE_CODE_OPT_IN = ("--trust-remote-code (sae-shards analyze / evaluate), "
                            "trust_remote_code=True (Python) or model.trust_remote_code=true "
                            "(sae-shards train)")
"""The ways a user opts in to running a model directory's own Python code (off by default)."""


def remote_code_files(path: Path) -> list[str]:
    """The Python files of ``path`` that its ``config.json`` ``auto_map`` names (``mod.Class``
    is ``mod.py``; a class in another repository, ``repo--mod.Class``, is named with it)."""
    try:
        auto_map = json_read.loads((path / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(auto_map, dict):
        return []
    refs = [ref for value in auto_map.values()
            for ref in (value if isinstance(value, list) else [value]) if isinstance(ref, str)]
    return sorted({f"{ref.rpartition('.')[0]}.py" for ref in refs if "." in ref})


def _refused_remote_code(path: Path) -> ValueError:
    """The error for a model directory that needs its own code, loaded without the opt-in."""
    files = ", ".join(str(path / f) for f in remote_code_files(path)) or "its code"
    return ValueError(
        f"model path {path} needs Python code of its own to load: config.json's auto_map names "
        f"{files}, which sae-shards never runs unless you opt in (a model directory may come "
        "with a shared run, and its code would run with your permissions). Read that code; if "
        f"you trust it, opt in with {TRUST_REMOTE_CODE_OPT_IN}; otherwise use a model "
        "transformers implements (e.g. qwen2, llama)")


def _is_own_causal_lm(config: PretrainedConfig, trust_remote_code: bool) -> bool:
    """Whether a config loaded with its own code (``trust_remote_code``) maps to a causal LM
    class of that code (``auto_map``'s ``AutoModelForCausalLM``)."""
    return trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None)
                                                           or {})


def check_causal_lm(path: str | Path, trust_remote_code: bool = False) -> None:
    """Refuse a model directory that does not hold a causal language model with its LM head,
    from its ``config.json`` alone: a model type without one (``type(config)`` not in
    transformers' causal-LM mapping, nor an ``auto_map`` ``AutoModelForCausalLM`` of the
    directory's own code), or one saved as another class (``architectures``, e.g.
    ``BertModel``, a bare encoder), which TRL would load as that class and fail deep inside.
    A directory needing its own code (``auto_map``) is refused unless ``trust_remote_code``:
    with it, transformers imports and runs that code here."""
    path = Path(path)
    _check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
    except ValueError as e:  # transformers' own words would say to pass trust_remote_code=True
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise _refused_remote_code(path) from None
        # e.g. a config.json without model_type: transformers' words name neither the file
        # nor the setting
        raise ValueError(f"model path {path}: transformers cannot read its config.json ({e}); "
                         "it must be a model directory written by save_pretrained") from None
    own = _is_own_causal_lm(config, trust_remote_code)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not own:
        raise ValueError(
            f"model path {path} holds a {type(config).__name__} "
            f"(model_type={config.model_type!r}), which is not a causal language model; "
            "use a decoder-only LM (e.g. qwen2, llama)"
            + ("; a model of its own code needs an auto_map entry AutoModelForCausalLM in its "
               "config.json" if trust_remote_code else "")
        )
    saved_as = list(getattr(config, "architectures", None) or [])
    lm_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if saved_as and not any(name in lm_classes or name.endswith(("ForCausalLM", "LMHeadModel"))
                            for name in saved_as):
        raise ValueError(
            f"model path {path} was saved as {', '.join(saved_as)} (config.json architectures), "
            f"not as a causal LM with its LM head "
            f"({MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)}); save the model "
            "loaded with AutoModelForCausalLM there (AutoModelForCausalLM.from_pretrained(...)"
            ".save_pretrained(DIR))")


def check_policy_dir(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Everything ``build_rl`` asks of a policy directory before loading its weights: a causal
    LM (``check_causal_lm``) whose ``config.json`` names its class (``architectures``, from
    which TRL picks the class to load), weight files that are there and whole
    (``check_model_files``), a tokenizer that loads with an eos or pad token
    (``load_tokenizer``, returned) and ids the model embeds (``check_vocab``). ``sae-shards
    train`` asks it before anything is written (``job.check_recipe``)."""
    path = Path(path)
    check_causal_lm(path, trust_remote_code)
    again = (f"copy or download the model directory {path} again (a partial copy or download "
             "leaves a short file)")
    check_model_files(path, again)
    if not any(f for pattern in WEIGHT_FILES for f in path.glob(pattern)):
        raise FileNotFoundError(
            f"model path {path} has no weight files (model.safetensors, sharded "
            "model-*.safetensors, or pytorch_model.bin): save the model there with "
            f"save_pretrained(DIR), or {again}")
    config = json_read.loads((path / "config.json").read_text())
    if not config.get("architectures"):
        raise ValueError(
            f"model path {path}: its config.json names no model class (architectures), from "
            "which TRL picks the class to load; save the model loaded with "
            "AutoModelForCausalLM there (AutoModelForCausalLM.from_pretrained(...)"
            ".save_pretrained(DIR)), or add e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    check_vocab(path, tokenizer, trust_remote_code)
    return tokenizer


def load_tokenizer(path: str | Path, model_dir: bool = True,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local model directory (no network); set a pad token if missing.
    ``model_dir=False``: a directory of tokenizer files without a model (a LoRA run's saved
    adapter beside its tokenizer). ``trust_remote_code``: a tokenizer of the directory's own
    code (``tokenizer_config.json``'s ``auto_map``) is imported and run.

    transformers 5 overrides the class named in ``tokenizer_config.json`` for some model types
    (qwen2 among them: ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``) and rebuilds the tokenizer
    as a byte-level Qwen2Tokenizer over its vocabulary; the tiny models built before
    ``BUILD_FORMAT`` 2 spelt a space as itself, which that drops. So a directory that asks for
    the generic backend gets exactly the ``tokenizer.json`` it ships; anything else goes
    through ``AutoTokenizer``.
    """
    path = Path(path)
    if model_dir:
        _check_model_dir(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model path {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): "
            "save the tokenizer beside the model (tokenizer.save_pretrained(DIR))")
    config_file = path / "tokenizer_config.json"
    declared = None
    if config_file.is_file():
        declared = json_read.loads(config_file.read_text()).get("tokenizer_class")
    if declared in GENERIC_TOKENIZER_CLASSES and (path / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True,
                                                            trust_remote_code=trust_remote_code)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    if len(tokenizer) < 2:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} token(s): its files do "
                         "not describe a vocabulary (a tokenizer_config.json without "
                         "tokenizer.json or vocab files?); save the model's real tokenizer there")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer in {path} has neither an eos_token nor a pad_token: completions "
                "stop at eos and batches pad with pad; set eos_token (and pad_token) in its "
                "tokenizer_config.json")
        # Padding positions are masked out, so reusing eos is safe (TRL does the same).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_vocab(path: str | Path, tokenizer: PreTrainedTokenizerBase,
                trust_remote_code: bool = False) -> None:
    """Refuse a tokenizer whose ids the model at ``path`` cannot embed (tokens added to the
    tokenizer without ``resize_token_embeddings``), before any forward pass would index past
    the embedding."""
    config = AutoConfig.from_pretrained(path, local_files_only=True,
                                        trust_remote_code=trust_remote_code)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model embeds "
            f"{vocab} (config.json vocab_size): resize the model's embeddings to the tokenizer "
            "(model.resize_token_embeddings(len(tokenizer))) and save both again")


def load_model_and_tokenizer(
    path: str | Path, dtype: torch.dtype = torch.float32, safetensors_only: bool = False,
    tokenizer_dir: str | Path | None = None, trust_remote_code: bool = False,
) -> ModelAndTokenizer:
    """Load a local transformers causal LM directory (no network); set a pad token if missing.
    ``safetensors_only``: refuse a directory whose weights are not safetensors (analysis reads
    run directories, whose ``pytorch_model.bin`` would be unpickled) with ``FileNotFoundError``.
    ``tokenizer_dir``: where the tokenizer is, when not beside the weights.
    ``trust_remote_code``: a model (or tokenizer) that needs its own code (``auto_map``) is
    loaded by importing and running the Python files beside it; off, it is refused
    (``check_causal_lm``). Only for a directory whose code you have read and trust."""
    path = Path(path)
    check_causal_lm(path, trust_remote_code)
    if safetensors_only and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"model path {path} has no safetensors weights (model.safetensors): weights saved "
            "as a pickle (pytorch_model.bin) are never loaded; save the model again with "
            "save_pretrained(DIR), whose default is safetensors")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code,
        **({"use_safetensors": True} if safetensors_only else {}))
    tokenizer = (load_tokenizer(path, trust_remote_code=trust_remote_code) if tokenizer_dir is None
                 else load_tokenizer(tokenizer_dir, model_dir=False,
                                     trust_remote_code=trust_remote_code))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ModelAndTokenizer(model, tokenizer)
