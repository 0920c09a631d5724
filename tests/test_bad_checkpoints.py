"""Every malformed checkpoint gives a ``CheckpointError`` that names the file and the problem.

One small valid checkpoint (trained for a few steps, so ``input_scale`` > 0, the batch_topk
threshold is set and the training state holds Adam moments) is copied and damaged in one way per
case. ``load_checkpoint`` and ``ShardSet.load`` (and ``load_training_state`` where it reads the
damaged file) must raise ``CheckpointError`` whose message holds the damaged file's path and
matches the problem; never an error from inside torch/safetensors/json, never a silent load.

Decisions the cases pin down:
- SAE tensors must be float32, the only dtype ``save_checkpoint`` writes: float16, bfloat16,
  float64 and integer tensors are rejected, not converted.
- ``input_scale`` 0 means "never trained" and loads (with a NaN threshold); otherwise it must be
  finite and > 0.
- A damaged ``training_state.safetensors`` fails ``load_training_state`` only: the SAE and its
  shards still load for analysis.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_shards.analysis.shards import ShardSet
from sae_shards.core.checkpoint import (CheckpointError, load_checkpoint, load_training_state,
                                        save_checkpoint)
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import TargetSpec
from sae_shards.core.trainer import SAETrainer

from helpers import sparse_safetensors

W, B = "layers.0.mlp.down_proj.weight", "layers.0.norm.weight"  # shapes (6, 4) and (5,)
SAE, CONFIG, STATE = "sae.safetensors", "config.json", "training_state.safetensors"
HEADER = {"format": "sae-shards", "format_version": "1"}
U, V, A, D = f"decoder.{W}.U", f"decoder.{W}.V", f"encoder.{W}.A", f"decoder.{B}.d"
COPY = "ckpt_copy"


def _trained_sae(train_steps: int = 3) -> tuple[LowRankSAE, SAETrainer]:
    targets = [TargetSpec(W, (6, 4), 1), TargetSpec(B, (5,))]
    sae = LowRankSAE(targets, SAEConfig(n_latents=3, rank=1, k=1, sparsity="batch_topk",
                                        batch_size=8))
    trainer = SAETrainer(sae)
    g = torch.Generator().manual_seed(0)
    for _ in range(train_steps):
        trainer.step({W: torch.randn(8, 6, 4, generator=g), B: torch.randn(8, 5, generator=g)})
    return sae, trainer


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    sae, trainer = _trained_sae()
    assert sae.input_scale > 0 and not torch.isnan(sae.threshold)
    return save_checkpoint(tmp_path_factory.mktemp("good") / "ck", sae, trainer.stats.as_tensors(),
                           {"rl_step": 3, "source": "update"}, trainer.state_tensors())


# ---------------------------------------------------------------------------- corruptions


def read_st(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(file, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None], file: str = SAE,
                 metadata: dict[str, str] | None = HEADER):
    """Re-save ``file`` as valid safetensors after ``edit`` changed its tensors in place."""
    def apply(ck: Path) -> None:
        tensors = read_st(ck / file)
        edit(tensors)
        save_file(tensors, ck / file, metadata=metadata)
    return apply


def set_tensor(name: str, make: Callable[[torch.Tensor], torch.Tensor], file: str = SAE):
    def edit(tensors):
        tensors[name] = make(tensors[name])
    return edit_tensors(edit, file)


def drop_tensor(name: str, file: str = SAE):
    return edit_tensors(lambda tensors: tensors.pop(name), file)


def add_tensor(name: str, value: torch.Tensor, file: str = SAE):
    return edit_tensors(lambda tensors: tensors.__setitem__(name, value), file)


def poke(index: tuple[int, ...], value: float):
    """A copy of the tensor with one entry set to ``value``."""
    def make(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t
    return make


def header_edit(edit: Callable[[dict], None], file: str = SAE):
    """Edit the safetensors JSON header in place, keeping the data bytes as they are."""
    def apply(ck: Path) -> None:
        data = (ck / file).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        edit(header)
        raw = json.dumps(header).encode()
        (ck / file).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    return apply


def claim_more_data(header: dict) -> None:
    """The last tensor's byte range reaches 400 bytes past the end of the file."""
    name = max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1])
    header[name]["data_offsets"][1] += 400


def rewrite(file: str, make: Callable[[bytes], bytes]):
    def apply(ck: Path) -> None:
        (ck / file).write_bytes(make((ck / file).read_bytes()))
    return apply


def cut(length: Callable[[bytes], int]):
    return lambda data: data[:length(data)]


def header_len(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def longer_length_field(data: bytes) -> bytes:
    """The 8-byte length field claims a header 1000 bytes longer than the file holds."""
    return (header_len(data) - 8 + 1000).to_bytes(8, "little") + data[8:]


def declared_huge(name: str, file: str = SAE, metadata: dict[str, str] = HEADER):
    """``file`` replaced by a sparse one declaring ``name`` as a [10**5, 10**5] float32 tensor
    (40 GB, the file's length matching): safetensors' own size check passes."""
    return lambda ck: sparse_safetensors(ck / file, {name: [10**5, 10**5]}, metadata)


def remove(file: str):
    return lambda ck: (ck / file).unlink()


def make_dir(file: str):
    def apply(ck: Path) -> None:
        (ck / file).unlink()
        (ck / file).mkdir()
    return apply


def symlink_loop(file: str):
    def apply(ck: Path) -> None:
        (ck / file).unlink()
        (ck / file).symlink_to(file)
    return apply


def text(file: str, content: str | bytes):
    def apply(ck: Path) -> None:
        data = content.encode() if isinstance(content, str) else content
        (ck / file).write_bytes(data)
    return apply


def edit_config(edit: Callable[[dict], object]):
    def apply(ck: Path) -> None:
        cfg = json.loads((ck / CONFIG).read_text())
        edit(cfg)
        (ck / CONFIG).write_text(json.dumps(cfg, indent=2))
    return apply


def cfg_set(*path, value):
    def edit(cfg):
        for key in path[:-1]:
            cfg = cfg[key]
        cfg[path[-1]] = value
    return edit_config(edit)


def cfg_del(*path):
    def edit(cfg):
        for key in path[:-1]:
            cfg = cfg[key]
        del cfg[path[-1]]
    return edit_config(edit)


def config_text(edit: Callable[[str], str]):
    def apply(ck: Path) -> None:
        (ck / CONFIG).write_text(edit((ck / CONFIG).read_text()))
    return apply


def remove_dir(ck: Path) -> None:
    shutil.rmtree(ck)


def dir_is_file(ck: Path) -> None:
    shutil.rmtree(ck)
    ck.write_text("not a checkpoint")


def dir_symlink_loop(ck: Path) -> None:
    shutil.rmtree(ck)
    ck.symlink_to(ck.name)


# (corruption, the file the message names (None: the directory; a pair: the message names both),
#  problem regex, what must fail)
#   "sae": load_checkpoint and ShardSet.load; "all": those and load_training_state;
#   "state": load_training_state only (the SAE still loads for analysis)
def case(id_, corrupt, file, problem, fails="sae"):
    return pytest.param(corrupt, file, problem, fails, id=id_)


CASES = [
    # --- the directory
    case("dir-missing", remove_dir, None, "no such checkpoint directory", "all"),
    case("dir-is-a-file", dir_is_file, None, "not a directory", "all"),
    case("dir-symlink-loop", dir_symlink_loop, None, "cannot be opened", "all"),
    # --- sae.safetensors: the file itself
    case("sae-missing", remove(SAE), SAE, "missing"),
    case("sae-is-a-directory", make_dir(SAE), SAE, "is a directory"),
    case("sae-symlink-loop", symlink_loop(SAE), SAE, "cannot be opened"),
    case("sae-empty", text(SAE, b""), SAE, "cannot be read as safetensors"),
    case("sae-truncated-4", rewrite(SAE, cut(lambda d: 4)), SAE, "cannot be read as safetensors"),
    case("sae-truncated-8", rewrite(SAE, cut(lambda d: 8)), SAE, "cannot be read as safetensors"),
    case("sae-truncated-in-header", rewrite(SAE, cut(lambda d: header_len(d) // 2)), SAE,
         "cannot be read as safetensors"),
    case("sae-truncated-after-header", rewrite(SAE, cut(header_len)), SAE,
         "cannot be read as safetensors"),
    case("sae-truncated-in-data", rewrite(SAE, cut(lambda d: header_len(d) + 10)), SAE,
         "cannot be read as safetensors"),
    case("sae-truncated-last-byte", rewrite(SAE, cut(lambda d: len(d) - 1)), SAE,
         "cannot be read as safetensors"),
    case("sae-trailing-garbage", rewrite(SAE, lambda d: d + b"garbage"), SAE,
         "cannot be read as safetensors"),
    case("sae-random-bytes", text(SAE, random.Random(0).randbytes(300)), SAE,
         "cannot be read as safetensors"),
    case("sae-zero-bytes", text(SAE, bytes(300)), SAE, "cannot be read as safetensors"),
    case("sae-length-field-too-long", rewrite(SAE, longer_length_field), SAE,
         "cannot be read as safetensors"),
    case("sae-header-claims-more-data", header_edit(claim_more_data), SAE,
         "cannot be read as safetensors"),
    case("sae-declares-a-huge-tensor", declared_huge(U), SAE,
         rf"tensor '{U}' is declared with shape \[100000, 100000\] \(10,000,000,000 "
         r"numbers\), more than the largest tensor config.json implies \(24 numbers\)"),
    case("sae-header-not-json", rewrite(SAE, lambda d: d[:8] + b"#" * (header_len(d) - 8)
                                        + d[header_len(d):]), SAE, "cannot be read as safetensors"),
    # --- sae.safetensors: header metadata
    case("sae-no-metadata", edit_tensors(lambda t: None, metadata=None), SAE, "header format"),
    case("sae-format-pt", edit_tensors(lambda t: None, metadata={"format": "pt",
                                                                  "format_version": "1"}),
         SAE, "header format 'pt'"),
    case("sae-format-version-newer", edit_tensors(lambda t: None, metadata={**HEADER,
                                                                            "format_version": "3"}),
         SAE, "newer sae-shards"),
    case("sae-format-version-garbage",
         edit_tensors(lambda t: None, metadata={**HEADER, "format_version": "one"}),
         SAE, "format_version 'one'"),
    # --- sae.safetensors: tensor names, shapes, dtypes
    case("tensor-missing", drop_tensor(U), SAE, r"missing tensors \['decoder\."),
    case("tensor-input-scale-missing", drop_tensor("input_scale"), SAE,
         r"missing tensors \['input_scale'\]"),
    case("tensor-unknown", add_tensor("decoder.other.U", torch.zeros(3, 2, 1)), SAE,
         r"unexpected tensors \['decoder.other.U'\]"),
    case("shape-b-enc", set_tensor("b_enc", lambda t: torch.zeros(4)), SAE,
         r"'b_enc' has shape \(4,\), config.json implies \(3,\)"),
    case("shape-decoder-transposed", set_tensor(U, lambda t: t.transpose(0, 1).contiguous()),
         SAE, r"has shape \(6, 3, 1\)"),
    case("shape-input-scale-1d", set_tensor("input_scale", lambda t: t.reshape(1)), SAE,
         r"'input_scale' has shape \(1,\)"),
    case("dtype-int64", set_tensor("b_enc", lambda t: t.long()), SAE,
         r"dtype torch.int64.*float32"),
    case("dtype-float16", set_tensor(U, lambda t: t.half()), SAE, r"dtype torch.float16.*float32"),
    case("dtype-bfloat16", set_tensor(D, lambda t: t.bfloat16()), SAE, r"bfloat16.*float32"),
    case("dtype-float64", set_tensor("input_scale", lambda t: t.double()), SAE,
         r"float64.*float32"),
    case("dtype-bool", set_tensor(f"b_dec.{B}", lambda t: t > 0), SAE, r"torch.bool.*float32"),
    # --- sae.safetensors: values
    case("nan-decoder-U", set_tensor(U, poke((0, 0, 0), float("nan"))), SAE, f"'{U}'.*non-finite"),
    case("inf-decoder-d", set_tensor(D, poke((1, 2), float("inf"))), SAE, "non-finite"),
    case("inf-encoder-A", set_tensor(A, poke((2, 1, 0), -float("inf"))), SAE, "non-finite"),
    case("nan-b-dec", set_tensor(f"b_dec.{W}", poke((0, 0), float("nan"))), SAE, "non-finite"),
    case("nan-b-enc", set_tensor("b_enc", poke((0,), float("nan"))), SAE, "non-finite"),
    case("input-scale-nan", set_tensor("input_scale", lambda t: torch.tensor(float("nan"))), SAE,
         "input_scale is nan"),
    case("input-scale-inf", set_tensor("input_scale", lambda t: torch.tensor(float("inf"))), SAE,
         "input_scale is inf"),
    case("input-scale-negative", set_tensor("input_scale", lambda t: -t), SAE,
         "input_scale is -"),
    case("input-scale-zero-but-threshold-set", set_tensor("input_scale", lambda t: t * 0), SAE,
         "input_scale is 0.*threshold"),
    case("threshold-inf", set_tensor("threshold", lambda t: torch.tensor(float("inf"))), SAE,
         "threshold is inf"),
    case("threshold-negative", set_tensor("threshold", lambda t: torch.tensor(-0.5)), SAE,
         "threshold is -0.5"),
    case("decoder-not-unit-norm", set_tensor(U, lambda t: t * 3), SAE, "unit norm"),
    case("decoder-zero", edit_tensors(lambda t: [t[k].zero_() for k in (U, D)]), SAE,
         "unit norm"),
    # a squared norm of 1.01 (latent 0 scaled by sqrt(1.01)): beyond the 1e-3 tolerance
    case("decoder-norm-one-percent-off",
         edit_tensors(lambda t: [t[k][0].mul_(1.01 ** 0.5) for k in (U, D)]), SAE,
         r"latents \[0\] have squared norms \[1.01\]"),
    # --- sae.safetensors: latent statistics
    case("stats-density-shape", set_tensor("stats.density", lambda t: torch.zeros(4)), SAE,
         r"'stats.density' has shape \(4,\)"),
    case("stats-mean-abs-act-nan", set_tensor("stats.mean_abs_act", poke((0,), float("nan"))),
         SAE, "'stats.mean_abs_act'.*non-finite"),
    case("stats-fire-count-float", set_tensor("stats.fire_count", lambda t: t.float()), SAE,
         "'stats.fire_count' has dtype torch.float32"),
    case("stats-fire-count-negative", set_tensor("stats.fire_count", poke((1,), -5)), SAE,
         r"'stats.fire_count' has values below 0 \(smallest -5\)"),
    # --- config.json: the file itself
    case("config-missing", remove(CONFIG), CONFIG, "missing", "all"),
    case("config-is-a-directory", make_dir(CONFIG), CONFIG, "is a directory", "all"),
    case("config-symlink-loop", symlink_loop(CONFIG), CONFIG, "cannot be opened", "all"),
    case("config-empty", text(CONFIG, ""), CONFIG, "not valid JSON", "all"),
    case("config-invalid-json", config_text(lambda s: s[: len(s) // 2]), CONFIG, "not valid JSON",
         "all"),
    case("config-not-utf8", text(CONFIG, b'{"format": "\xff\xfe"}'), CONFIG, "UTF-8", "all"),
    case("config-json-list", text(CONFIG, "[1, 2]"), CONFIG, "JSON object, got a list", "all"),
    # audit 147 F1: a RecursionError from deep inside Python's JSON reader
    case("config-nested-too-deep", text(CONFIG, "[" * 50000 + "]" * 50000), CONFIG,
         "not valid JSON \\(nested too deeply to read", "all"),
    case("sae-header-nested-too-deep", rewrite(SAE, lambda d: len(b"[" * 50000 + b"]" * 50000)
                                               .to_bytes(8, "little") + b"[" * 50000 + b"]" * 50000
                                               + d[header_len(d):]),
         SAE, "cannot be read as safetensors"),
    case("config-json-null", text(CONFIG, "null"), CONFIG, "JSON object, got null", "all"),
    case("config-duplicate-key",
         config_text(lambda s: s.replace('"sae": {', '"sae": {"k": 2, ', 1)), CONFIG,
         "key 'k' appears twice", "all"),
    # --- config.json: format and keys
    case("config-missing-format", cfg_del("format"), CONFIG, "not a sae-shards checkpoint", "all"),
    case("config-wrong-format", cfg_set("format", value="other-tool"), CONFIG,
         "not a sae-shards checkpoint", "all"),
    case("config-missing-format-version", cfg_del("format_version"), CONFIG,
         "missing key 'format_version'", "all"),
    case("config-future-format-version", cfg_set("format_version", value=3), CONFIG,
         "version 3 is not supported.*newer sae-shards", "all"),
    case("config-format-version-string", cfg_set("format_version", value="1"), CONFIG,
         "format_version '1'", "all"),
    case("config-format-version-bool", cfg_set("format_version", value=True), CONFIG,
         "format_version True", "all"),
    case("config-missing-sae", cfg_del("sae"), CONFIG, "missing key 'sae'", "all"),
    case("config-missing-targets", cfg_del("targets"), CONFIG, "missing key 'targets'", "all"),
    case("config-unknown-key", cfg_set("extra", value=1), CONFIG, r"unknown keys \['extra'\]",
         "all"),
    case("config-meta-not-object", cfg_set("meta", value=[1]), CONFIG, "'meta' must be", "all"),
    case("meta-rl-step-string", cfg_set("meta", "rl_step", value="x"), CONFIG,
         "meta.rl_step = 'x' must be a count", "all"),
    case("meta-sae-step-nan", cfg_set("meta", "sae_step", value=float("nan")), CONFIG,
         "meta.sae_step = nan must be a count", "all"),
    case("meta-sae-samples-negative", cfg_set("meta", "sae_samples", value=-5), CONFIG,
         "meta.sae_samples = -5 must be a count", "all"),
    case("meta-rl-step-bool", cfg_set("meta", "rl_step", value=True), CONFIG,
         "meta.rl_step = True must be a count", "all"),
    # --- config.json: targets
    case("targets-not-a-list", cfg_set("targets", value={"name": W}), CONFIG,
         "'targets' must be a non-empty list", "all"),
    case("targets-empty", cfg_set("targets", value=[]), CONFIG,
         "'targets' must be a non-empty list", "all"),
    case("target-not-an-object", cfg_set("targets", 0, value=W), CONFIG, r"targets\[0\]", "all"),
    case("target-missing-rank", cfg_del("targets", 1, "rank"), CONFIG,
         r"targets\[1\].*name, rank, shape", "all"),
    case("target-unknown-key", cfg_set("targets", 0, "dtype", value="float32"), CONFIG,
         r"targets\[0\].*name, rank, shape", "all"),
    case("target-name-not-a-string", cfg_set("targets", 0, "name", value=7), CONFIG,
         r"targets\[0\].name", "all"),
    case("target-name-empty", cfg_set("targets", 0, "name", value=""), CONFIG,
         r"targets\[0\].name", "all"),
    case("target-shape-string", cfg_set("targets", 0, "shape", value=["6", 4]), CONFIG,
         r"targets\[0\].shape", "all"),
    case("target-shape-float", cfg_set("targets", 0, "shape", value=[6.0, 4]), CONFIG,
         r"targets\[0\].shape", "all"),
    case("target-shape-not-a-list", cfg_set("targets", 1, "shape", value=5), CONFIG,
         r"targets\[1\].shape", "all"),
    case("target-shape-negative", cfg_set("targets", 0, "shape", value=[-6, 4]), CONFIG,
         r"targets\[0\].*positive sizes", "all"),
    case("target-shape-zero", cfg_set("targets", 1, "shape", value=[0]), CONFIG,
         r"targets\[1\].*positive sizes", "all"),
    case("target-shape-3d", cfg_set("targets", 0, "shape", value=[6, 4, 1]), CONFIG,
         r"targets\[0\].*not supported", "all"),
    case("target-shape-absurd", cfg_set("targets", 0, "shape", value=[10 ** 30, 4]), CONFIG,
         "too large", "all"),
    case("target-rank-zero", cfg_set("targets", 0, "rank", value=0), CONFIG,
         r"targets\[0\].rank", "all"),
    case("target-rank-too-big", cfg_set("targets", 0, "rank", value=5), CONFIG,
         r"targets\[0\].*rank 5 must be between 1 and", "all"),
    case("target-rank-bool", cfg_set("targets", 0, "rank", value=True), CONFIG,
         r"targets\[0\].rank", "all"),
    case("target-names-duplicate", cfg_set("targets", 1, "name", value=W), CONFIG,
         "duplicate target name", "all"),
    # the two files disagree: the message names both
    case("target-renamed", cfg_set("targets", 0, "name", value="layers.9.mlp.down_proj.weight"),
         (SAE, CONFIG), r"missing tensors.*unexpected tensors", "sae"),
    case("target-shape-transposed", cfg_set("targets", 0, "shape", value=[4, 6]), (SAE, CONFIG),
         r"has shape \(3, 6, 1\), config.json implies \(3, 4, 1\); sae.safetensors and "
         r".*config.json disagree: one of the two was edited", "sae"),
    case("sae-n-latents-changed", cfg_set("sae", "n_latents", value=4), (SAE, CONFIG),
         "has shape .*; sae.safetensors and .*config.json disagree", "sae"),  # audit 134 F4
    # --- config.json: the SAE config
    case("sae-config-not-object", cfg_set("sae", value=[3]), CONFIG, "'sae' must be", "all"),
    case("sae-config-unknown-key", cfg_set("sae", "n_latent", value=3), CONFIG,
         r"unknown sae config keys \['n_latent'\]", "all"),
    case("sae-config-k-too-big", cfg_set("sae", "k", value=4), CONFIG, "sae.k=4", "all"),
    case("sae-config-n-latents-string", cfg_set("sae", "n_latents", value="3"), CONFIG,
         "sae.n_latents", "all"),
    case("sae-config-n-latents-absurd", cfg_set("sae", "n_latents", value=10 ** 30), CONFIG,
         "too large", "all"),
    case("sae-config-lr-string", cfg_set("sae", "lr", value="fast"), CONFIG, "sae.lr", "all"),
    case("sae-config-use-b-dec-string", cfg_set("sae", "use_b_dec", value="yes"), CONFIG,
         "sae.use_b_dec", "all"),
    case("sae-config-use-b-dec-int", cfg_set("sae", "use_b_dec", value=1), CONFIG,
         r"sae.use_b_dec = 1 must be .*true or false", "all"),
    case("sae-config-autocast-bf16-int", cfg_set("sae", "autocast_bf16", value=1), CONFIG,
         r"sae.autocast_bf16 = 1 must be .*true or false", "all"),
    case("sae-config-sparsity-unknown", cfg_set("sae", "sparsity", value="dense"), CONFIG,
         "sae.sparsity", "all"),
    case("sae-config-aux-coef-infinite", cfg_set("sae", "aux_coef", value=float("inf")), CONFIG,
         "sae.aux_coef", "all"),
    case("sae-config-seed-float", cfg_set("sae", "seed", value=1.5), CONFIG, "sae.seed", "all"),
    case("sae-config-seed-beyond-64-bits", cfg_set("sae", "seed", value=2 ** 64), CONFIG,
         "sae.seed=18446744073709551616 must be between", "all"),  # named since audit 151 F11
    case("sae-config-aux-k-bool", cfg_set("sae", "aux_k", value=True), CONFIG, "sae.aux_k", "all"),
    # --- training_state.safetensors (read by load_training_state only)
    case("state-truncated", rewrite(STATE, cut(lambda d: len(d) // 2)), STATE,
         "cannot be read as safetensors", "state"),
    case("state-declares-a-huge-tensor", declared_huge("adam.0.exp_avg", STATE), STATE,
         r"tensor 'adam.0.exp_avg' is declared with shape \[100000, 100000\].*more than the "
         r"largest tensor config.json implies", "state"),
    case("state-empty", text(STATE, b""), STATE, "cannot be read as safetensors", "state"),
    case("state-missing", remove(STATE), STATE, "saved without training state", "state"),
    case("state-format-pt", edit_tensors(lambda t: None, STATE, {"format": "pt",
                                                                 "format_version": "1"}),
         STATE, "header format 'pt'", "state"),
    case("state-counters-missing", drop_tensor("trainer.counters", STATE), STATE,
         r"missing tensors \['trainer.counters'\]", "state"),
    case("state-counters-shape", set_tensor("trainer.counters", lambda t: t[:3], STATE), STATE,
         r"'trainer.counters' has shape \(3,\)", "state"),
    case("state-fire-count-shape", set_tensor("trainer.stats.fire_count", lambda t: t[:2], STATE),
         STATE, r"'trainer.stats.fire_count' has shape \(2,\)", "state"),
    case("state-adam-shape", set_tensor("adam.1.exp_avg", lambda t: t[:2], STATE), STATE,
         r"'adam.1.exp_avg' has shape \(2, 6, 1\)", "state"),
    case("state-adam-nan", set_tensor("adam.1.exp_avg_sq", poke((0, 0, 0), float("nan")), STATE),
         STATE, "'adam.1.exp_avg_sq'.*non-finite", "state"),
    case("state-adam-negative-second-moment",
         set_tensor("adam.1.exp_avg_sq", poke((0, 0, 0), -1.0), STATE), STATE,
         r"'adam.1.exp_avg_sq' has values below 0 \(smallest -1", "state"),
    case("state-adam-dtype", set_tensor("adam.0.exp_avg", lambda t: t.half(), STATE), STATE,
         "'adam.0.exp_avg' has dtype torch.float16", "state"),
    case("state-adam-incomplete", drop_tensor("adam.2.step", STATE), STATE,
         r"adam.2.*\['adam.2.step'\]", "state"),
    case("state-adam-unknown-param", add_tensor("adam.99.exp_avg", torch.zeros(3), STATE), STATE,
         r"unexpected tensors \['adam.99.exp_avg'\]", "state"),
]


@pytest.mark.parametrize("corrupt, file, problem, fails", CASES)
def test_corrupt_checkpoint_is_named_in_the_error(good, tmp_path, corrupt, file, problem, fails):
    ck = tmp_path / COPY
    shutil.copytree(good, ck)
    corrupt(ck)
    # the damaged file by its full path; a second file the message blames, by name
    files = () if file is None else (file,) if isinstance(file, str) else file
    names = [str(ck / files[0]) if files else str(ck), *files[1:]]

    loaders = {"load_checkpoint": load_checkpoint, "ShardSet.load": ShardSet.load,
               "load_training_state": load_training_state}
    failing = {"sae": ["load_checkpoint", "ShardSet.load"], "all": list(loaders),
               "state": ["load_training_state"]}[fails]
    for name in failing:
        with pytest.raises(CheckpointError, match=problem) as info:
            loaders[name](ck)
        message = str(info.value)
        for path in names:
            assert path in message, f"{name}: {message!r} does not name {path}"
    if isinstance(file, tuple):
        return  # the two files disagree: see test_training_state_checked_against_config
    for name in set(loaders) - set(failing):
        loaders[name](ck)  # the damage is in a file this loader does not read


@pytest.mark.parametrize("file", [SAE, CONFIG, STATE])
def test_random_byte_damage_never_escapes_as_another_error(good, tmp_path, file):
    """Single-byte damage (in the safetensors header, or anywhere in config.json) either loads
    (a changed value that is still valid, e.g. a digit of the seed) or raises CheckpointError
    naming the file; nothing else escapes."""
    ck = shutil.copytree(good, tmp_path / COPY)
    original = (good / file).read_bytes()
    end = header_len(original) if file != CONFIG else len(original)
    rng = random.Random(file)
    load = load_training_state if file == STATE else load_checkpoint
    errors = 0
    for _ in range(150):
        data = bytearray(original)
        data[rng.randrange(end)] = rng.randrange(256)
        (ck / file).write_bytes(bytes(data))
        try:
            load(ck)
        except CheckpointError as e:
            assert file in str(e)  # a config value the tensors contradict: "config.json implies"
            errors += 1
    assert errors > 50


def test_training_state_checked_against_config(good, tmp_path):
    """Adam moments and per-latent counters must fit the SAE that config.json describes."""
    ck = shutil.copytree(good, tmp_path / COPY)
    cfg_set("sae", "n_latents", value=4)(ck)
    with pytest.raises(CheckpointError, match=r"'adam.0.exp_avg' has shape \(3,\), config.json "
                                              r"implies \(4,\)") as info:
        load_training_state(ck)
    assert str(ck / STATE) in str(info.value)


def test_the_uncorrupted_copy_loads(good, tmp_path):
    ck = shutil.copytree(good, tmp_path / COPY)
    loaded = load_checkpoint(ck)
    assert loaded.sae.n_latents == 3 and float(loaded.sae.input_scale) > 0
    assert len(ShardSet.load(ck)) == 3
    assert int(load_training_state(ck)["trainer.counters"][0]) == 3


def test_an_untrained_sae_loads(tmp_path):
    """input_scale 0 (and a NaN threshold) is what an SAE that never trained saves: it loads."""
    sae, trainer = _trained_sae(train_steps=0)
    ck = save_checkpoint(tmp_path / "ck", sae, trainer.stats.as_tensors(), {},
                         trainer.state_tensors())
    loaded = load_checkpoint(ck)
    assert float(loaded.sae.input_scale) == 0 and torch.isnan(loaded.sae.threshold)
    assert len(ShardSet.load(ck)) == 3
    assert "adam.0.exp_avg" not in load_training_state(ck)


def test_a_checkpoint_without_stats_loads(tmp_path):
    sae, _ = _trained_sae()
    ck = save_checkpoint(tmp_path / "ck", sae)
    assert load_checkpoint(ck).stats == {}


def test_loading_never_unpickles(good, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    load_checkpoint(good)
    ShardSet.load(good)
    load_training_state(good)


def test_enough_corruptions():
    assert len(CASES) >= 30
    assert len({p.id for p in CASES}) == len(CASES)
