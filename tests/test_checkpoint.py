"""Checkpoint directories: exact round trip, atomic replace, and clear errors on damage."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_shards.core.checkpoint import (CheckpointError, live_tensors, load_checkpoint,
                                   load_training_state, read_safetensors, save_checkpoint,
                                   sae_tensors)
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SPARSITY_MODES, SAEConfig
from sae_shards.core.targets import TargetSpec, make_targets
from sae_shards.core.synthetic import PlantedConfig, PlantedStream
from sae_shards.core.trainer import SAETrainer

from helpers import sparse_safetensors


@pytest.fixture(scope="module")
def trained():
    stream = PlantedStream(PlantedConfig(n_directions=4, seed=1))
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=8, k=2, rank=2, sparsity="batch_topk"))
    trainer = SAETrainer(sae)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        trainer.step(stream.sample(16, g).sample)
    return stream, sae, trainer


def test_round_trip_is_exact(trained, tmp_path):
    stream, sae, trainer = trained
    meta = {"source": "update", "rl_step": 7, "model_id": "tiny"}
    save_checkpoint(tmp_path / "ck", sae, trainer.stats.as_tensors(), meta, trainer.state_tensors())
    loaded = load_checkpoint(tmp_path / "ck")
    want, got = sae_tensors(sae), sae_tensors(loaded.sae)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]) or (want[k].isnan().all() and got[k].isnan().all()), k
    assert loaded.config["meta"] == meta
    assert loaded.config["sae"] == sae.cfg.to_dict()
    assert torch.equal(loaded.stats["stats.fire_count"], trainer.stats.fire_count)
    x = sae.to_scaled(stream.sample(4, torch.Generator().manual_seed(5)).sample)
    assert torch.equal(sae.encode(x).values, loaded.sae.encode(x).values)
    state = load_training_state(tmp_path / "ck")
    assert torch.equal(state["trainer.counters"], trainer.state_tensors()["trainer.counters"])
    # plain safetensors reads it, and the header carries the format version
    with safe_open(tmp_path / "ck" / "sae.safetensors", "pt") as f:
        assert f.metadata()["format_version"] == "2"
        assert "decoder.layers.0.mlp.down_proj.weight.U" in f.keys()


@pytest.mark.parametrize("sparsity", SPARSITY_MODES)
@pytest.mark.parametrize("form,use_b_dec", [("dense", True), ("dense", False), ("factored", None)])
def test_a_checkpoint_names_every_parameter_and_buffer_of_the_sae(sparsity, form, use_b_dec):
    """``live_tensors`` is written by hand: a parameter or buffer added to the SAE and not named
    there would be neither saved nor missed on load (a resume would silently reset it)."""
    targets = [TargetSpec("w", (6, 5), rank=2), TargetSpec("b", (4,))]
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2, sparsity=sparsity, use_b_dec=use_b_dec),
                     form)
    saved = list(live_tensors(sae).values())
    for name, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
        assert any(tensor is t for t in saved), f"{name} is not in the checkpoint"


@pytest.mark.parametrize("form,use_b_dec", [("dense", False), ("factored", None)])
def test_an_unused_decoder_bias_is_not_held_and_old_zeros_still_load(form, use_b_dec, tmp_path):
    """Without a decoder bias the SAE allocates none and its checkpoint has no ``b_dec.*`` (per
    event they would be the targets' full size: 26 GB at 7B). Checkpoints written before held
    zeros there: they load, the zeros dropped; a nonzero one is a named error."""
    targets = [TargetSpec("w", (6, 5), rank=2), TargetSpec("b", (4,))]
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2, use_b_dec=use_b_dec), form)
    assert sae.b_dec is None
    assert not any(t.numel() == 30 for t in [*sae.parameters(), *sae.buffers()])  # no [6, 5]
    save_checkpoint(tmp_path / "new", sae)
    tensors = load_file(tmp_path / "new" / "sae.safetensors")
    assert not [k for k in tensors if k.startswith("b_dec")]
    assert load_checkpoint(tmp_path / "new").sae.b_dec is None
    # format version 2: a reader of version 1 says "written by a newer sae-shards", not "damaged"
    assert json.loads((tmp_path / "new" / "config.json").read_text())["format_version"] == 2

    old = tmp_path / "old"
    save_checkpoint(old, sae)  # then rewritten the way format version 1 held it
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "format_version": 1}))
    legacy = {**tensors, "b_dec.w": torch.zeros(6, 5), "b_dec.b": torch.zeros(4)}
    save_file(legacy, old / "sae.safetensors", metadata={"format": "sae-shards",
                                                          "format_version": "1"})
    loaded = load_checkpoint(old).sae
    assert loaded.b_dec is None
    for k, v in sae_tensors(loaded).items():
        assert torch.equal(v, tensors[k]) or (v.isnan().all() and tensors[k].isnan().all()), k

    legacy["b_dec.w"] = legacy["b_dec.w"].clone().index_fill_(0, torch.tensor([2]), 1e-3)
    save_file(legacy, old / "sae.safetensors", metadata={"format": "sae-shards",
                                                          "format_version": "1"})
    with pytest.raises(CheckpointError, match=r"b_dec.w is nonzero, but config.json describes "
                                              r"an SAE without a decoder bias"):
        load_checkpoint(old)


def test_paths_may_be_strings(trained, tmp_path):
    _, sae, _ = trained
    save_checkpoint(str(tmp_path / "ck"), sae, meta={"rl_step": 1})
    assert load_checkpoint(str(tmp_path / "ck")).config["meta"] == {"rl_step": 1}
    tensors, header = read_safetensors(str(tmp_path / "ck" / "sae.safetensors"))
    assert header["format_version"] == "2" and set(tensors) == set(sae_tensors(sae))
    with pytest.raises(CheckpointError, match="missing"):
        read_safetensors(str(tmp_path / "nothing.safetensors"))


def test_a_tensor_declared_beyond_memory_is_refused_before_it_is_read(tmp_path):
    """A sparse file declaring a [10**6, 10**6] float32 tensor (4 TB; the data offsets match the
    file's length, so safetensors' size check passes) is refused from its header, naming the
    file and the tensor: safetensors' mmap of it failed with a RuntimeError, and a smaller one
    (a few GB) loaded, to be allocated whole by the first check that read it. Every reader of a
    run directory's safetensors goes through read_safetensors (activations, samples, resume)."""
    file = sparse_safetensors(tmp_path / "activations.safetensors",
                              {"final.values": [10**6, 10**6]}, {"format_version": "2"})
    with pytest.raises(CheckpointError, match=(
            rf"{file}: tensor 'final.values' is declared with shape \[1000000, 1000000\] "
            r"\(1,000,000,000,000 numbers, 3,725.3 GiB\), more than this machine's memory "
            r"\([\d,.]+ GiB\): it cannot be read here.*a sparse file")):
        read_safetensors(file)


def test_a_file_this_process_may_not_map_is_named_not_raised_from_inside_safetensors(tmp_path):
    """Under an address-space limit (ulimit -v) that leaves 1 GiB, a 4 GiB tensor (within the
    machine's memory, so the header check lets it through) fails safetensors' memory map with a
    MemoryError: a CheckpointError naming the file and the limit, in a process of its own."""
    import subprocess
    import sys

    file = sparse_safetensors(tmp_path / "activations.safetensors", {"final.values": [2**15, 2**15]},
                              {"format_version": "2"})
    code = (
        "import resource, sys\n"
        "from sae_shards.core.checkpoint import CheckpointError, read_safetensors\n"
        "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    read_safetensors({str(file)!r})\n"
        "except CheckpointError as e:\n"
        "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"{file}: cannot be mapped into memory (")
    assert "ulimit -v" in done.stdout


def test_a_copied_snapshot_is_not_moved_by_later_training(tmp_path):
    """``checkpoint_files(copy=True)`` is what a background write holds while the SAE trains
    on: every tensor of it, the SAE's own included, is its own memory, unchanged by later steps."""
    from sae_shards.core.checkpoint import checkpoint_files

    stream = PlantedStream(PlantedConfig(n_directions=4, seed=1))
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=8, k=2, rank=2))
    trainer = SAETrainer(sae)
    g = torch.Generator().manual_seed(0)
    trainer.step(stream.sample(16, g).sample)
    snap = checkpoint_files(sae, trainer.stats.as_tensors(), copy=True,
                            training_state=trainer.state_tensors())
    frozen = {k: v.clone() for k, v in {**snap.sae, **snap.training_state}.items()}
    live = {v.untyped_storage().data_ptr() for v in live_tensors(sae).values()}
    assert not live & {v.untyped_storage().data_ptr() for v in snap.sae.values()}
    for _ in range(3):
        trainer.step(stream.sample(16, g).sample)
    moved = [k for k, v in {**snap.sae, **snap.training_state}.items()
             if not torch.equal(torch.nan_to_num(v), torch.nan_to_num(frozen[k]))]
    assert not moved, moved
    # and the live SAE did move: the test would see an aliased snapshot
    assert not torch.equal(live_tensors(sae)[next(k for k in frozen if "decoder" in k)],
                           frozen[next(k for k in frozen if "decoder" in k)])


def test_failed_write_keeps_previous_checkpoint(trained, tmp_path):
    _, sae, trainer = trained
    save_checkpoint(tmp_path / "ck", sae, meta={"rl_step": 1})
    with pytest.raises(ValueError, match="stats."):
        save_checkpoint(tmp_path / "ck", sae, stats={"density": torch.zeros(8)}, meta={"rl_step": 2})
    assert load_checkpoint(tmp_path / "ck").config["meta"] == {"rl_step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary leftovers
    save_checkpoint(tmp_path / "ck", sae, meta={"rl_step": 3})  # replacing works
    assert load_checkpoint(tmp_path / "ck").config["meta"] == {"rl_step": 3}


def test_malformed_checkpoints_name_file_and_problem(trained, tmp_path):
    _, sae, _ = trained
    good = save_checkpoint(tmp_path / "good", sae)

    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nope")

    missing = save_checkpoint(tmp_path / "missing", sae)
    (missing / "sae.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing/sae.safetensors: missing"):
        load_checkpoint(missing)

    truncated = save_checkpoint(tmp_path / "truncated", sae)
    data = (truncated / "sae.safetensors").read_bytes()
    (truncated / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated/sae.safetensors: cannot be read.*truncated"):
        load_checkpoint(truncated)

    version = save_checkpoint(tmp_path / "version", sae)
    cfg = json.loads((version / "config.json").read_text())
    cfg["format_version"] = 99
    (version / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"version/config.json: .*version 99 is not supported"):
        load_checkpoint(version)

    shape = save_checkpoint(tmp_path / "shape", sae)
    tensors = load_file(shape / "sae.safetensors")
    tensors["b_enc"] = torch.zeros(9)
    save_file(tensors, shape / "sae.safetensors", metadata={"format": "sae-shards", "format_version": "1"})
    with pytest.raises(CheckpointError, match=r"'b_enc' has shape \(9,\), config.json implies \(8,\)"):
        load_checkpoint(shape)

    assert load_checkpoint(good).sae.n_latents == 8


# ---- found by mutation testing (audit 120): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

def _random_batch(targets, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(b, *t.shape, generator=g) for t in targets}


def _trained(seed=0):
    targets = make_targets({"w": (12, 7), "b": (6,)}, rank=2)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2, rank=2))
    tr = SAETrainer(sae)
    tr.step(_random_batch(targets, 8, seed))
    return sae, tr


def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path):
    from sae_shards.core.checkpoint import CheckpointError, load_training_state, save_checkpoint
    sae, tr = _trained()
    path = tmp_path / "final"
    save_checkpoint(path, sae, training_state=tr.state_tensors())
    save_checkpoint(path, sae)  # no training state this time
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "sae.safetensors"]
    with pytest.raises(CheckpointError):
        load_training_state(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # nothing left beside it


def test_checkpoint_files_are_readable_by_the_group(tmp_path):
    import os
    import stat
    from sae_shards.core.checkpoint import save_checkpoint
    sae, _ = _trained()
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "final", sae)
    finally:
        os.umask(old)
    for f in path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_save_file_atomic_leaves_only_the_file(tmp_path):
    import os
    from sae_shards.core.checkpoint import read_tensors, save_file_atomic
    path = tmp_path / "acts.safetensors"
    save_file_atomic({"a": torch.ones(3)}, path, "sae-shards")
    save_file_atomic({"a": torch.zeros(3)}, path, "sae-shards")
    assert os.listdir(tmp_path) == ["acts.safetensors"]
    assert read_tensors(path)["a"].sum() == 0


def test_failed_writes_leave_no_temporary_files(tmp_path, monkeypatch):
    import os
    import sae_shards.core.checkpoint as ck
    sae, _ = _trained()

    def full_disk(tensors, path, metadata):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck, "_save_tensors", full_disk)
    with pytest.raises(OSError):
        ck.save_file_atomic({"a": torch.ones(3)}, tmp_path / "acts.safetensors", "sae-shards")
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path / "final", sae)
    assert os.listdir(tmp_path) == []


def test_negative_trainer_counters_are_refused(tmp_path):
    from sae_shards.core.checkpoint import CheckpointError, load_training_state, save_checkpoint
    sae, tr = _trained()
    state = tr.state_tensors()
    state["trainer.counters"] = torch.tensor([1, -3, 0, 8])
    path = save_checkpoint(tmp_path / "final", sae, training_state=state)
    with pytest.raises(CheckpointError, match="trainer.counters"):
        load_training_state(path)
