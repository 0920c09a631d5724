"""ShardSet and RunView on a real (short) run: round trip, factored geometry, run-level views."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sae_shards.core.checkpoint import CheckpointError, sae_tensors
from sae_shards.recipe.models import load_model_and_tokenizer
from sae_shards.analysis.shards import RunView, ShardSet

from helpers import edited_copy, tree_bytes


@pytest.fixture
def run_dir(short_run_dir):
    return short_run_dir


def test_round_trip_identical_tensors_and_metadata(run_dir):
    ck = run_dir / "checkpoints" / "final"
    shards = ShardSet.from_run(run_dir)
    loaded = sae_tensors(shards.sae)
    with safe_open(ck / "sae.safetensors", "pt") as f:
        on_disk = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("stats.")}
        stats = {k: f.get_tensor(k) for k in f.keys() if k.startswith("stats.")}
    assert loaded.keys() == on_disk.keys()
    for k in loaded:
        assert torch.equal(loaded[k], on_disk[k]) or (loaded[k].isnan().all() and on_disk[k].isnan().all()), k
    assert all(torch.equal(shards.stats[k], v) for k, v in stats.items())
    assert shards.config == json.loads((ck / "config.json").read_text())
    assert shards.meta["rl_step"] == 12 and shards.meta["source"] == "update"


def test_container_and_dense_shards(run_dir):
    shards = ShardSet.from_run(run_dir)
    params = dict(load_model_and_tokenizer(run_dir / "model").model.named_parameters())
    assert len(shards) == 16 and len(list(shards)) == 16 and shards[-1].index == 15
    with pytest.raises(IndexError):
        shards[16]
    busiest = max(shards, key=lambda s: s.density)  # a shard that fired
    unit = busiest.dense(scaled=False)
    assert set(unit) == set(shards.target_names)
    assert all(unit[n].shape == params[n].shape for n in unit)
    total = sum(float(v.pow(2).sum()) for v in unit.values())
    assert total == pytest.approx(1.0, abs=1e-5)
    scaled = busiest.dense()
    c = busiest.typical_coefficient()
    assert c > 0 and torch.allclose(scaled[shards.target_names[0]], unit[shards.target_names[0]] * c)


def test_match_follows_each_shard_to_its_nearest_in_another_set(run_dir, tmp_path):
    shards = ShardSet.from_run(run_dir)
    assert [m.index for m in shards.match(shards)] == list(range(16))
    assert all(m.cosine == pytest.approx(1.0, abs=1e-5) for m in shards.match(shards))
    # another set: the same directions in reverse order, every other one negated
    other = ShardSet.load(shards.save(tmp_path / "copy"))
    with torch.no_grad():
        for tf in other.sae.factors:
            for j, f in enumerate(tf.factors("decoder")):  # U and V (or d) of every latent
                sign = torch.tensor([1.0, -1.0] * 8).view(-1, *[1] * (f.ndim - 1))
                f.copy_(f.flip(0) * (sign if j == 0 else 1.0))
    got = shards.match(other)
    assert [m.index for m in got] == list(range(15, -1, -1))
    assert [round(m.cosine) for m in got] == [1.0 if (15 - i) % 2 == 0 else -1.0 for i in range(16)]
    cos = shards.cosine_matrix(other).abs()
    assert all(abs(m.cosine) == pytest.approx(float(cos[i].max())) for i, m in enumerate(got))


def test_matching_two_runs_of_one_sae_seed_warns_that_they_start_alike(run_dir, tmp_path,
                                                                        caplog):
    """-m seed=0,1 leaves sae.seed at 0: across the seeds every shard matched its namesake, 58
    of 64 at |cos| > 0.9, by construction (the shared initial decoder). Said when two runs'
    shards are matched; not between checkpoints of one run, nor across sae.seed."""
    import dataclasses

    shards = ShardSet.from_run(run_dir)
    shards.match(shards)  # one run with itself
    assert "started from the same initialisation" not in caplog.text
    other = ShardSet.load(shards.save(tmp_path / "copy"))
    shards.match(other)  # the run's own shards, saved elsewhere: the same run_id
    assert "started from the same initialisation" not in caplog.text
    other.config["meta"] = {**other.meta, "run_dir": str(tmp_path / "another_run"),
                            "run_id": "another run"}
    shards.match(other)
    assert "started from the same initialisation (sae.seed=0)" in caplog.text
    caplog.clear()
    # two checkpoints of one run that was moved and resumed (each names where it ran)
    moved = ShardSet.from_run(run_dir, "final")
    moved.config["meta"] = {**moved.meta, "run_dir": str(tmp_path / "moved_here")}
    shards.match(moved)
    assert "started from the same initialisation" not in caplog.text
    other.sae.cfg = dataclasses.replace(other.sae.cfg, seed=1)
    shards.match(other)
    assert "started from the same initialisation" not in caplog.text


def test_a_rollout_log_that_stops_before_the_checkpoint_is_warned_about(run_dir, tmp_path,
                                                                         caplog):
    """A copy taken while the run wrote, or cut short: the report's rewards covered fewer steps
    than the shards were trained on, as if they were the run's."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    RunView(copy)
    assert "stops at RL step" not in caplog.text
    rows = (copy / "rollouts.jsonl").read_text().splitlines(keepends=True)
    (copy / "rollouts.jsonl").write_text("".join(rows[:-2]))
    last = json.loads(rows[-3])["step"]
    RunView(copy)
    assert (f"rollouts.jsonl stops at RL step {last}, before this checkpoint's step "
            f"{last + 2}") in caplog.text


def test_a_policy_left_behind_at_the_trainers_output_dir_is_said_with_the_way_to_bring_it(
        tmp_path):
    """A script's run moved away from its trainer's output_dir: analyze said only that there
    was no policy; it names the recorded output_dir and where to copy the checkpoint."""
    from sae_shards.analysis.shards import _refused_trl_policy

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"rl": {"output_dir": str(tmp_path / "gone")}}))
    assert _refused_trl_policy(run, 30) == (
        f" (nor at the trainer's output_dir, {tmp_path / 'gone'}, which config.json's "
        f"rl.output_dir records: the run was moved away from it? copy its checkpoint-30/ into "
        f"{run / 'trl'}/)")
    # the output_dir is there, without the step's checkpoint (audit 138 F3: save_total_limit
    # removed it, and analyze guessed the run had moved)
    (tmp_path / "kept").mkdir()
    (run / "config.json").write_text(json.dumps({"rl": {"output_dir": str(tmp_path / "kept")}}))
    said = _refused_trl_policy(run, 30)
    assert "no longer holds checkpoint-30/: the trainer's save_total_limit, or a cleanup" in said
    assert "moved away" not in said and "copy its" not in said
    (run / "config.json").write_text(json.dumps({"rl": {"output_dir": str(run / "trl")}}))
    assert _refused_trl_policy(run, 30) == ""  # sae-shards train's: inside the run


def test_another_initial_model_given_for_a_tiny_model_run_is_refused(run_dir, tmp_path):
    """A sae-shards train run's own tiny model (model/) had no fingerprint, so --initial-model
    naming other weights was used without a word (shard coefficients changed sign)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sae_shards.analysis.shards import run_models_missing

    assert json.loads((run_dir / "config.json").read_text())["model"]["fingerprint"]
    assert run_models_missing(run_dir) is None
    other = tmp_path / "other"
    shutil.copytree(run_dir / "model", other)
    assert run_models_missing(run_dir, initial=other) is None  # the same weights elsewhere
    tensors = load_file(other / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    assert "are not the ones the run started from" in run_models_missing(run_dir, initial=other)


def test_a_truncated_activation_log_is_told_to_go_not_to_read_another_checkpoint(
        run_dir, tmp_path, capsys):
    """A truncated activations.safetensors was told to read another checkpoint (--checkpoint
    step_N), which opens the same file and fails the same way; deleting it is what works."""
    import shutil

    from sae_shards.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    acts = copy / "activations.safetensors"
    acts.write_bytes(acts.read_bytes()[:200])
    assert main(["analyze", str(copy), "--no-dose"]) == 2
    err = capsys.readouterr().err
    assert "delete it: analysis then rebuilds the newest checkpoint's timeline from its resume " \
           "file (resume/)" in err and "--checkpoint step_XXXXXX" not in err
    acts.unlink()
    assert main(["analyze", str(copy), "--no-dose"]) == 0  # the advice works


def test_another_runs_final_policy_is_not_paired_with_the_shards(run_dir, tmp_path):
    """A final_model/ copied in from another run (a copy assembled by hand) was paired with
    these shards without a word: the coefficients and every intervention changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sae_shards.analysis.shards import run_models_missing

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["final_model_fingerprint"] and run_models_missing(copy) is None
    weights = copy / "final_model" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, weights, metadata={"format": "pt"})
    assert "the final policy at" in run_models_missing(copy)
    assert "differ from summary.json's final_model_fingerprint" in run_models_missing(copy)
    summary["final_model_fingerprint"] = None  # a run of an earlier version: not checked
    (copy / "summary.json").write_text(json.dumps(summary))
    assert run_models_missing(copy) is None


def test_factored_geometry_matches_dense(run_dir):
    shards = ShardSet.from_run(run_dir)
    flat = torch.stack([torch.cat([v.flatten() for v in s.dense(scaled=False).values()]) for s in shards])
    torch.testing.assert_close(shards.cosine_matrix(), flat @ flat.T, atol=1e-5, rtol=1e-4)
    norms = shards.target_norms()
    assert norms.shape == (16, len(shards.target_names))
    torch.testing.assert_close(norms.pow(2).sum(1), torch.ones(16), atol=1e-5, rtol=0)
    first = shards.target_names[0]
    assert shards[2].target_norms()[first] == pytest.approx(
        float(shards[2].dense(scaled=False)[first].norm()), rel=1e-4)
    bias = shards.decoder_bias()
    assert torch.allclose(bias[first], shards.sae.b_dec[0].detach() * shards.sae.input_scale)
    with pytest.warns(DeprecationWarning, match="not the updates' mean"):
        assert torch.equal(shards.mean_update()[first], bias[first])  # the earlier name


def test_two_checkpoints_compare_and_shards_save(run_dir, tmp_path):
    """cosine_matrix(other): each final shard against each earlier one, as the dense
    directions give it; save writes what load reads."""
    final = ShardSet.from_run(run_dir)
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name != "final")
    early = ShardSet.from_run(run_dir, steps[0])

    def flat(s):
        return torch.stack([torch.cat([v.flatten() for v in x.dense(scaled=False).values()])
                            for x in s])

    torch.testing.assert_close(final.cosine_matrix(early), flat(final) @ flat(early).T,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(final.cosine_matrix(final), final.cosine_matrix(),
                               atol=1e-6, rtol=1e-5)
    out = final.save(tmp_path / "mine")
    again = ShardSet.load(out)
    assert torch.equal(again.cosine_matrix(), final.cosine_matrix())
    assert again.meta == final.meta and again.stats.keys() == final.stats.keys()


def test_a_subset_keeps_the_chosen_shards_and_saves(run_dir, tmp_path):
    """subset: the chosen shards, in the order given, with their directions, encoder, biases and
    statistics; saved and loaded back unchanged; a subset of a subset names the original
    indices; bad choices are named."""
    full = ShardSet.from_run(run_dir)
    picked = [5, 0, 13]
    part = full.subset([5, full[0], -3])
    assert len(part) == 3 and part.sae.cfg.k == min(full.sae.cfg.k, 3)
    torch.testing.assert_close(part.cosine_matrix(), full.cosine_matrix()[picked][:, picked],
                               atol=1e-6, rtol=1e-5)
    for i, j in enumerate(picked):
        for name, d in part[i].dense(scaled=False).items():
            assert torch.equal(d, full[j].dense(scaled=False)[name])
        assert part[i].typical_coefficient() == full[j].typical_coefficient()
    x = {n: 1e-3 * torch.randn(2, *t.shape, generator=torch.Generator().manual_seed(0))
         for n, t in zip(full.target_names, full.sae.targets)}
    pre_full = full.sae.encode_pre(full.sae.to_scaled(x))[:, picked]
    torch.testing.assert_close(part.sae.encode_pre(part.sae.to_scaled(x)), pre_full)
    again = ShardSet.load(part.save(tmp_path / "three"))
    assert torch.equal(again.cosine_matrix(), part.cosine_matrix())
    assert again.meta["subset_of"] == {"path": str(full.path), "indices": picked,
                                       "n_latents": 16}
    assert full.subset(slice(0, 4)).subset([3, 1]).meta["subset_of"] == {
        "path": str(full.path), "indices": [3, 1], "n_latents": 16}
    assert again.subset([2]).meta["subset_of"]["indices"] == [13]
    with pytest.raises(ValueError, match=r"shards repeated in \[5, 5\]"):
        full.subset([5, 5])
    with pytest.raises(IndexError, match="shard index 16 out of range for 16 shards"):
        full.subset([16])
    with pytest.raises(ValueError, match="choose at least one shard"):
        full.subset([])
    # a Shard names a direction of its own set: another set's index would be another direction
    assert full[ShardSet.load(full.path)[3]].index == 3  # the same checkpoint, loaded again
    with pytest.raises(ValueError, match=r"Shard\(5 of 16\) is a shard of ShardSet\(16 shards.* "
                                         r"not of ShardSet\(3 shards"):
        part[full[5]]
    with pytest.raises(ValueError, match="is a shard of"):
        full.subset([part[0]])
    with pytest.raises(TypeError, match="not bool"):
        full[True]


def test_run_view_joins_steps_with_rollouts(run_dir):
    view = RunView(run_dir)
    steps, acts = view.timeline()
    assert steps.tolist() == list(range(1, 13)) and acts.shape == (12, 16)
    assert ((acts != 0).sum(1) == 4).all()  # k = 4 active shards per captured step
    shard = int(acts.abs().sum(0).argmax())
    top = view.top_steps(shard, k=3)
    assert len(top) == 3
    assert abs(top[0]["activation"]) == pytest.approx(float(acts[:, shard].abs().max()))
    assert top[0]["rollout"]["step"] == top[0]["rl_step"]
    assert len(top[0]["rollout"]["completions"]) == 16
    assert view.density()[shard] > 0
    # re-encoding a buffered delta is not possible after the run, but the SAE's encode is:
    x = {n: torch.zeros(1, *t.shape) for n, t in zip(view.shards.target_names, view.shards.sae.targets)}
    assert view.shards.encode({n: v + 1e-6 for n, v in x.items()}).indices.shape == (1, 4)


def test_malformed_run_dir_errors(tmp_path, run_dir):
    with pytest.raises(CheckpointError, match=r"no checkpoint \(neither final/ nor step_XXXXXX/\)"):
        ShardSet.from_run(tmp_path)
    broken = tmp_path / "copy"
    import shutil

    shutil.copytree(run_dir, broken)
    (broken / "rollouts.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=r"rollouts.jsonl:2: not valid JSON .*; the log "
                                              r"was edited or damaged: copy it again from the run"):
        RunView(broken)
    (broken / "config.json").write_text('{"capture": ')  # torn by an editor or a full disk
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON .*; the file was "
                                              r"edited or damaged: copy it again from the run"):
        RunView(broken)
    # nested deeper than Python's JSON reader recurses: its RecursionError was a bare traceback
    deep = "[" * 50000 + "]" * 50000  # (audit 147 F1)
    (broken / "config.json").write_text(deep)
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON \(nested too deep"):
        RunView(broken)
    (broken / "config.json").write_text((run_dir / "config.json").read_text())
    (broken / "rollouts.jsonl").write_text('{"step": 1}\n' + deep + '\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=r"rollouts.jsonl:2: not valid JSON \(nested"):
        RunView(broken)


def test_a_checkpoint_from_another_run_is_refused_by_the_run_view(run_dir, tmp_path):
    """final/ replaced by a whole, valid checkpoint of an SAE with fewer latents (another run's):
    the run's activation log names latents it does not have, and RunView says so."""
    import dataclasses
    import shutil

    from sae_shards.core.checkpoint import load_checkpoint, save_checkpoint
    from sae_shards.core.sae import LowRankSAE

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    loaded = load_checkpoint(other / "checkpoints" / "final")
    smaller = LowRankSAE(loaded.sae.targets, dataclasses.replace(loaded.sae.cfg, n_latents=8))
    smaller.input_scale = loaded.sae.input_scale
    shutil.rmtree(other / "checkpoints" / "final")
    save_checkpoint(other / "checkpoints" / "final", smaller, meta=loaded.config["meta"])
    assert len(ShardSet.from_run(other)) == 8  # a valid checkpoint on its own
    with pytest.raises(CheckpointError, match=r"activations.safetensors: its final activations "
                                              r"name latents up to 1[0-5], 4 per sample, but "
                                              r"checkpoint final has 8 latents"):
        RunView(other)


@pytest.mark.parametrize("name, make, problem", [
    ("final.indices", lambda t: t.float(), r"final.indices is float32 \[12, 4\], expected integer"),
    ("final.indices", lambda t: t[:, 0].contiguous(), r"final.indices is int64 \[12\]"),
    ("final.values", lambda t: t[:-1].contiguous(), r"final.values is float32 \[11, 4\]"),
    ("final.values", lambda t: t.long(), r"final.values is int64 \[12, 4\], expected float32"),
    ("final.values", lambda t: torch.full_like(t, float("nan")), r"final.values holds NaN"),
    ("final.rl_step", lambda t: t[:-1].contiguous(), r"final.indices is int64 \[12, 4\], "
                                                     r"expected integer \[11, W\]"),
    ("final.rl_step", lambda t: t.float(), r"final.rl_step is float32 \[12\], expected integer"),
    ("online.event", lambda t: t[:-1].contiguous(), r"online.event is int64 \[7\]"),
])
def test_activations_whose_tensors_disagree_are_refused_naming_the_file(run_dir, tmp_path, name,
                                                                       make, problem):
    """activations.safetensors with a tensor of another dtype or row count than its neighbours
    (a damaged or hand-made file): RunView names the file and the tensor, instead of torch's
    scatter error from timeline(), or NaN figures."""
    other = edited_copy(run_dir, tmp_path / "other", "activations.safetensors",
                        lambda tensors, _: tensors.__setitem__(name, make(tensors[name])))
    file = other / "activations.safetensors"
    with pytest.raises(CheckpointError, match=rf"{file}: {problem}.*copy it again from the run"):
        RunView(other).timeline()


@pytest.mark.parametrize("edit, problem", [
    (lambda c: c.update(model=[1]), r"model is list \[1\], expected an object or null"),
    (lambda c: c["model"].update(path=5), r"model.path is int 5, expected a string or null"),
    (lambda c: c.update(task="x"), r"task is str 'x', expected an object or null"),
    (lambda c: c["task"].update(options=[1]), r"task.options is list \[1\], expected an object"),
    (lambda c: c["rl"].update(output_dir=5), r"rl.output_dir is int 5, expected a string"),
])
def test_a_config_json_entry_of_the_wrong_type_is_refused_naming_it(run_dir, tmp_path, edit,
                                                                    problem):
    """config.json with an entry that loading the run's models indexes of another type (edited
    by hand, or another tool's file): RunView and load_run_models name the file and the entry,
    instead of an AttributeError or TypeError from deep inside them."""
    import shutil

    from sae_shards.analysis.shards import load_run_models

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    config = json.loads((other / "config.json").read_text())
    edit(config)
    (other / "config.json").write_text(json.dumps(config))
    match = rf"{other / 'config.json'}: {problem}.*copy it again from the run"
    with pytest.raises(CheckpointError, match=match):
        RunView(other)
    with pytest.raises(CheckpointError, match=match):
        load_run_models(other)


@pytest.mark.parametrize("log, edit, problem", [
    ("rollouts.jsonl", lambda r: r.update(step=str(r["step"])),
     r":1: step is str '1', expected an integer"),
    ("rollouts.jsonl", lambda r: r.update(rewards=["a"] * len(r["rewards"])),
     r":1: rewards holds 'a', neither a number nor null"),
    ("rollouts.jsonl", lambda r: r.update(tasks=5), r":1: tasks is int 5, expected a list"),
    ("metrics.jsonl", lambda r: r.update(rl_step="x"), r":1: rl_step is str 'x', expected an "
                                                        r"integer"),
    ("metrics.jsonl", lambda r: r.update(fvu="x") if "fvu" in r else None,
     r":\d+: fvu is str 'x', expected a number"),
])
def test_a_log_row_of_another_shape_is_refused_naming_the_file_and_line(run_dir, tmp_path, log,
                                                                        edit, problem):
    """rollouts.jsonl or metrics.jsonl rows whose fields RunView reads hold another type (an
    edited log, or another tool's): RunView names the file and line, instead of a TypeError
    from statistics or a comparison, or reading on with a step that is a string."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    rows = [json.loads(line) for line in (other / log).read_text().splitlines()]
    for row in rows:
        edit(row)
    (other / log).write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(CheckpointError, match=rf"{other / log}{problem}; .*copy it again from "
                                              "the run"):
        RunView(other, 12)


class _Planted:
    """A pickle that, when unpickled, creates the file it names."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_the_final_policy_is_refused_never_loaded(run_dir, tmp_path):
    """final_model/ whose weights were swapped for a pytorch_model.bin (a pickle nobody in the
    run wrote): the run has no models, run_models_missing says why, and nothing is unpickled;
    analyze writes the report without the parts that need the policy (it stopped, and wrote
    none, when load_run_models raised while run_models_missing saw nothing missing)."""
    import shutil

    from sae_shards.analysis.shards import load_run_models, run_models_missing
    from sae_shards.cli import main

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    marker = tmp_path / "unpickled"
    (other / "final_model" / "model.safetensors").unlink()
    torch.save({"lm_head.weight": _Planted(marker)}, other / "final_model" / "pytorch_model.bin")
    why = run_models_missing(other)
    assert re.search(r"no safetensors weights in .*final_model: weights saved as a pickle "
                     r"\(pytorch_model.bin\) are never loaded from a run", why or ""), why
    assert load_run_models(other) is None
    assert main(["analyze", str(other), "--shards", "1", "--n-prompts", "2"]) == 0
    assert "model: no safetensors weights in" in (
        other / "report.html").read_text()
    assert not marker.exists()


def test_a_torn_last_log_line_is_dropped_and_a_torn_middle_line_named(run_dir, tmp_path):
    import shutil

    from sae_shards.core.checkpoint import CheckpointError

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    rollouts = copy / "rollouts.jsonl"
    whole = rollouts.read_text()
    rollouts.write_text(whole + '{"step": 13, "prompts": ["<A> ab')  # killed mid-write
    assert sorted(RunView(copy).rollouts) == list(range(1, 13))
    lines = whole.splitlines()
    rollouts.write_text("\n".join(lines[:3] + ['{"step": 4, "pro'] + lines[4:]) + "\n")
    with pytest.raises(CheckpointError, match=r"rollouts.jsonl:4: not valid JSON"):
        RunView(copy)


def test_the_api_names_what_a_reader_gets_wrong(run_dir, tmp_path):
    """A run directory handed to ShardSet.load, a checkpoint directory to from_run, a tab
    completion's trailing slash, a negative k: each answered in the reader's terms."""
    from numpy import int64 as np_int

    from sae_shards.analysis.shards import checkpoint_name, load_run_models

    with pytest.raises(CheckpointError, match=r"is a run directory: load its shards with "
                                              r"ShardSet.from_run\(.*\) or a checkpoint such as "
                                              r".*checkpoints/final$"):
        ShardSet.load(run_dir)
    # a run still training has no final/ yet: its newest checkpoint is named (final/ was)
    import shutil

    training = tmp_path / "training"
    (training / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.json", training / "config.json")
    step = "checkpoints/step_000012"
    shutil.copytree(run_dir / step, training / step)
    with pytest.raises(CheckpointError, match=r"or a checkpoint such as .*training/checkpoints/"
                                              r"step_000012$"):
        ShardSet.load(training)
    with pytest.raises(CheckpointError, match=r"is a checkpoint directory, not a run: load it "
                                              r"with ShardSet.load"):
        ShardSet.from_run(run_dir / "checkpoints" / "final")
    view = RunView(run_dir, "final/")
    assert view.checkpoint == "final" and ShardSet.from_run(run_dir, "checkpoints/final/").path
    assert RunView(run_dir, str(run_dir / "checkpoints" / "final")).checkpoint == "final"
    elsewhere = tmp_path / "other" / "checkpoints" / "final"  # another run's: never this one's
    with pytest.raises(CheckpointError, match=r"is not one of .* checkpoints"):
        RunView(run_dir, str(elsewhere))
    for outside in ("..", ".", "checkpoints/.."):  # checkpoints/ itself, or the run: no name
        with pytest.raises(CheckpointError, match=r"names no checkpoint of .*: give its name"):
            RunView(run_dir, outside)
    assert repr(view) == f"RunView({str(run_dir)!r}, checkpoint='final': 12 samples)"
    # an RL step names its checkpoint; a saved shard set is not read as a checkpoint of /tmp's
    assert checkpoint_name(run_dir, 7) == "step_000007" == checkpoint_name(run_dir, np_int(7))
    assert ShardSet.from_run(run_dir, 12).path.name == "step_000012"  # the last step's
    with pytest.raises(CheckpointError, match=r"no checkpoint 'step_000007' \(it has \['final', "
                                              r"'step_000012'\]\)"):
        load_run_models(run_dir, 7)
    for wrong in (True, -3, 1.5):
        with pytest.raises(TypeError, match=r"its RL step as an int >= 0"):
            RunView(run_dir, wrong)
    view.shards.save(tmp_path / "saved")
    with pytest.raises(CheckpointError, match=r"saved is a checkpoint directory, not a run: load "
                                              r"it with ShardSet.load\('[^']*'\)$"):
        RunView(tmp_path / "saved")
    import numpy as np

    assert len(view.top_steps(0, k=np.int64(2))) <= 2
    with pytest.raises(ValueError, match=r"k=-1: how many to list"):
        view.top_steps(0, k=-1)
    assert view.top_steps(0, k=0) == []
    assert repr(view.shards[3]) == "Shard(3 of 16)" and repr(view.shards).startswith("ShardSet(16 ")
    # typical_coefficient over the final timeline: one checkpoint, one scale
    steps, acts = view.timeline()
    busiest = int((acts != 0).sum(0).argmax())
    active = acts[:, busiest][acts[:, busiest] != 0].abs()
    assert view.typical_coefficient(busiest) == pytest.approx(
        float(active.mean()) * view.shards.input_scale)
    # metrics.jsonl feeds only the SAE curves: a run without it is still read
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").unlink()
    assert RunView(tmp_path / "run").sae_metrics == []


def test_a_policy_that_is_not_a_causal_lm_is_named_not_loaded(run_dir, tmp_path):
    """A reward model's run (trl.RewardTrainer: a sequence classifier) has no LM head for the
    logit lens or sampling: said as the reason, where loading it raised deep inside."""
    import shutil

    from sae_shards.analysis.shards import run_models_missing

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "final_model" / "config.json").read_text())
    config["architectures"] = ["Qwen2ForSequenceClassification"]
    (copy / "final_model" / "config.json").write_text(json.dumps(config))
    said = run_models_missing(copy)
    assert said.startswith("the policy is not a causal language model (model path "
                           f"{copy / 'final_model'} was saved as Qwen2ForSequenceClassification")


def test_a_checkpoint_without_its_policy_names_the_newest_one_with(run_dir, tmp_path):
    """Killed between TRL's save and sae-shards' (or with TRL saving less often): the newest
    shard checkpoint has no policy, and the reason names the checkpoint that has one."""
    import shutil

    from sae_shards.analysis.shards import run_models_missing

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / "final_model")
    shutil.rmtree(run / "trl" / "checkpoint-12")  # TRL's side of the newest step is missing
    for step in (6, 12):
        shutil.copytree(run / "checkpoints" / "final", run / "checkpoints" / f"step_{step:06d}",
                        dirs_exist_ok=True)
    (run / "trl" / "checkpoint-6").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):  # a policy analysis can load
        shutil.copy(run / "model" / name, run / "trl" / "checkpoint-6" / name)
    why = run_models_missing(run, "step_000012")
    assert "nor a TRL checkpoint-12" in why and "--checkpoint step_000006" in why
    assert "--checkpoint" not in (run_models_missing(run, "step_000006") or "")


def test_run_sampling_reads_the_online_dpo_trainers_completion_length(tmp_path):
    """trl's online DPO trainers name the completion length max_new_tokens."""
    from sae_shards.analysis.shards import run_sampling

    (tmp_path / "config.json").write_text(json.dumps(
        {"rl": {"max_completion_length": None, "max_new_tokens": 6, "temperature": 0.9}}))
    assert run_sampling(tmp_path) == {"max_new_tokens": 6, "temperature": 0.9}


def test_a_subset_of_a_batch_topk_sae_keeps_its_inference_threshold():
    """batch_topk encodes with the learnt threshold: a subset without it (NaN) would fall back to
    batch top-k and give other activations than the full SAE's."""
    from sae_shards.core.sae import LowRankSAE
    from sae_shards.core.sae_config import SAEConfig
    from sae_shards.core.targets import make_targets
    from sae_shards.core.trainer import SAETrainer

    targets = make_targets({"w": (6, 5), "b": (4,)}, rank=1)
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2, sparsity="batch_topk"))
    trainer = SAETrainer(sae)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        trainer.step({t.name: torch.randn(16, *t.shape, generator=g) for t in targets})
    full = ShardSet(sae, {"meta": {}}, trainer.stats.as_tensors())
    part = full.subset([0, 3, 5])
    assert not torch.isnan(full.sae.threshold)
    assert torch.equal(part.sae.threshold, full.sae.threshold)


def test_task_mix_gives_each_label_of_a_sample_an_equal_part(run_dir):
    """RunView.task_mix: a sample of several labels gives each an equal part of its
    |activation| (checked against a direct sum, with labels handed in)."""
    view = RunView(run_dir)
    _, acts = view.timeline()
    shard = int(acts.abs().sum(0).argmax())
    a = acts[:, shard].abs()
    labels = [("x", "y") if i % 2 else ("x",) for i in range(a.numel())]
    mix = view.task_mix(shard, labels=labels)
    y = float(a[1::2].sum()) / 2
    assert y > 0 and mix == pytest.approx({"x": 1 - y / float(a.sum()), "y": y / float(a.sum())})


def test_attribution_is_the_signed_sum_of_a_shards_activations(run_dir):
    """A shard whose activations are negative pushes the update the other way: its attribution
    is the signed sum (x input_scale), not the sum of |activation|."""
    view = RunView(run_dir)
    steps, acts = view.timeline()
    shard = int(acts.sum(0).argmin())
    assert float(acts[:, shard].sum()) < 0  # a shard the run uses with the minus sign
    got = view.attribution(shard)
    assert got.total == pytest.approx(float(acts[:, shard].double().sum()) * view.shards.input_scale)
    assert (got.samples, got.first_step, got.last_step) == (
        steps.numel(), int(steps.min()), int(steps.max()))


def test_saving_shards_never_replaces_a_run_or_other_files(run_dir, tmp_path):
    """ShardSet.save replaces its directory whole: view.shards.save(run) once left the run with
    config.json and sae.safetensors alone, save('notes') deleted the notes in it, and a subset
    saved to the run's checkpoints/final replaced its SAE. Each is refused now, nothing
    touched; shards saved earlier are replaced only with overwrite=True."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = tree_bytes(run)
    view = RunView(run)
    with pytest.raises(FileExistsError, match=r"holds a run directory \(.*\), which saving would "
                                              r"replace; save the shards to a new or empty"):
        view.shards.save(run, overwrite=True)
    with pytest.raises(FileExistsError, match=r"final is in checkpoints/ of the run in .*run, "
                                              r"which the run itself writes"):
        view.shards.subset([1, 0]).save(run / "checkpoints" / "final", overwrite=True)
    # a new folder among them too: overwrite=true would remove it with the run (audit 144),
    # and one inside a checkpoint, or in resume/ or trl/: a resume prunes them (audit 147 F9)
    for inside in (run / "checkpoints" / "top2", run / "checkpoints" / "final" / "top2",
                   run / "resume" / "top2", run / "trl" / "top2", run / "final_model" / "x" / "y"):
        with pytest.raises(FileExistsError, match=rf"{inside.name} is in {inside.relative_to(run).parts[0]}/ "
                                                  r"of the run in .*run, which the run itself"):
            view.shards.subset([1, 0]).save(inside)
    assert tree_bytes(run) == before and not (run / "checkpoints" / "top2").exists()
    # a run's folder that is a link (checkpoints/ on another disk) is the run's all the same
    elsewhere = tmp_path / "other_disk"
    (run / "checkpoints").rename(elsewhere)
    (run / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match=r"top2 is in checkpoints/ of the run in"):
        view.shards.subset([1, 0]).save(run / "checkpoints" / "final" / "top2")
    (run / "checkpoints").unlink()
    elsewhere.rename(run / "checkpoints")
    beside = view.shards.subset([1, 0]).save(run / "top2")  # beside them: no run's folder
    assert ShardSet.load(beside).meta["subset_of"]["indices"] == [1, 0]
    shutil.rmtree(beside)
    # other files, even a config.json under the checkpoint's own names (a model's: not shards
    # saved earlier, audit 147 F2)
    for folder, name, text in (("notes", "important.txt", "mine"),
                               ("model_like", "config.json", '{"model_type": "qwen2"}')):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text(text)
        with pytest.raises(FileExistsError, match=rf"{folder} holds other files \({name}\)"):
            view.shards.save(tmp_path / folder, overwrite=True)
        assert (tmp_path / folder / name).read_text() == text
    with pytest.raises(FileExistsError, match=r"overwrite='no'; give True or False"):
        view.shards.save(tmp_path / "new", overwrite="no")
    # new, empty, or earlier shards with overwrite=True
    (tmp_path / "empty").mkdir()
    view.shards.save(tmp_path / "empty")
    mine = view.shards.save(tmp_path / "mine")
    with pytest.raises(FileExistsError, match=r"mine already holds shards; pass overwrite=True"):
        view.shards.subset([0]).save(mine)
    assert len(ShardSet.load(mine)) == len(view.shards)
    assert len(ShardSet.load(view.shards.subset([0]).save(mine, overwrite=True))) == 1


def test_a_report_is_never_written_over_a_runs_own_file(run_dir, tmp_path, capsys):
    """analyze --out RUN/rollouts.jsonl wrote the report over the run's log (the next analyze
    then failed on it); --out naming a directory was told to free disk space. Both refused
    before any work; an earlier report is replaced as before."""
    import shutil

    from sae_shards.analysis.report import analyze
    from sae_shards.cli import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = tree_bytes(run)
    assert main(["analyze", str(run), "--out", str(run / "rollouts.jsonl"), "--no-dose"]) == 2
    assert "rollouts.jsonl exists and is not a sae-shards report: the report would replace it" \
        in capsys.readouterr().err
    assert main(["analyze", str(run), "--out", str(run / "checkpoints"), "--no-dose"]) == 2
    assert "checkpoints is a directory; give the report's file, e.g. " in capsys.readouterr().err
    with pytest.raises(FileExistsError, match=r"config.json exists and is not a sae-shards"):
        analyze(run, run / "config.json", dose=False)
    assert tree_bytes(run) == before
    out = tmp_path / "out" / "r.html"
    out.parent.mkdir()
    for _ in range(2):  # a report over an earlier one
        assert main(["analyze", str(run), "--out", str(out), "--no-dose", "--shards", "1"]) == 0


def test_reports_of_several_runs_in_one_folder_keep_their_figures_apart(run_dir, tmp_path,
                                                                          capsys):
    """analyze --out cmp/a.html then --out cmp/b.html wrote one cmp/analysis.json, the second
    run's, over the first's, and it did not say which run it held: each report's figures are
    now NAME.analysis.json, recording the run directory and its settings; a file there that is
    not such figures is refused, before any work."""
    import shutil

    from sae_shards.cli import main

    runs = [tmp_path / name for name in ("a", "b")]
    for run in runs:
        shutil.copytree(run_dir, run)
    cmp = tmp_path / "cmp"
    for run in runs:
        assert main(["analyze", str(run), "--out", str(cmp / f"{run.name}.html"), "--no-dose",
                     "--shards", "1"]) == 0
    assert sorted(p.name for p in cmp.iterdir()) == [
        "a.analysis.json", "a.html", "b.analysis.json", "b.html"]
    for run in runs:
        figures = json.loads((cmp / f"{run.name}.analysis.json").read_text())
        assert figures["run"]["run_dir"] == str(run.resolve())
        assert figures["config"] == json.loads((run / "config.json").read_text())
    (cmp / "c.analysis.json").write_text("my notes")
    capsys.readouterr()
    assert main(["analyze", str(runs[0]), "--out", str(cmp / "c.html"), "--no-dose"]) == 2
    assert ("c.analysis.json, which exists and is not a sae-shards analysis; give the report "
            "another name") in capsys.readouterr().err
    assert (cmp / "c.analysis.json").read_text() == "my notes" and not (cmp / "c.html").exists()
    # another run's directory: its own report and figures would be replaced
    assert main(["analyze", str(runs[0]), "--out", str(runs[1] / "report.html"),
                 "--no-dose"]) == 2
    assert (f"--out {runs[1] / 'report.html'} is in the directory of another run ({runs[1]}): "
            f"a report of {runs[0]} does not belong there") in capsys.readouterr().err
    # inside a run's own checkpoint: its resume prunes it (audit 147 F9)
    inside = runs[1] / "checkpoints" / "final" / "cmp.html"
    assert main(["analyze", str(runs[0]), "--out", str(inside), "--no-dose"]) == 2
    assert (f"--out {inside} is in checkpoints/ of the run in {runs[1].resolve()}, which the run "
            "itself writes") in capsys.readouterr().err and not inside.exists()


def test_a_copy_without_final_or_resume_files_is_not_told_to_read_them(run_dir, tmp_path,
                                                                         capsys):
    """A finished run copied without checkpoints/final and resume/: analyze said it read "its
    newest checkpoint with a resume file" (there was none) and advised analysing final, the
    checkpoint the copy lacks."""
    import shutil

    from sae_shards.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "final")
    shutil.rmtree(copy / "resume")
    assert main(["analyze", str(copy), "--no-dose"]) == 2
    err = capsys.readouterr().err
    assert "lacks checkpoints/final: its newest checkpoint)" in err
    assert "analyse final instead" not in err and "with a resume file)" not in err
    assert "copy checkpoints/final/ from the run" in err


def test_a_copy_without_its_summary_still_warns_of_an_fvu_above_one(run_dir, tmp_path):
    """The figures recomputed for a copy without summary.json (or a killed run) dropped the
    warning of an SAE reconstructing worse than the samples' mean."""
    import shutil

    from sae_shards.analysis.report import checkpoint_figures
    from sae_shards.capture.summary import worse_than_mean

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "summary.json").unlink()
    figures, own = checkpoint_figures(RunView(copy), {})
    assert not own and figures["fvu_last"] > 1, "the short run's SAE ends above FVU 1"
    assert figures["warning"] == worse_than_mean(figures["fvu_last"], figures["sae_steps"])
    assert figures["warning"].startswith("the SAE reconstructs its samples worse than their mean")


def test_a_policy_whose_weights_give_nan_probabilities_is_named_not_a_traceback(run_dir, tmp_path,
                                                                                capsys, caplog):
    """A bit flipped in final_model/ (an exponent: 0.007 -> 2e36) ended analyze with torch's
    multinomial traceback. The run's record of its final policy (summary.json) catches it first,
    and the report leaves the interventions out; a run without that record (an earlier
    version's) gets a one-line error saying what is wrong and what to do, and the earlier
    report is kept."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sae_shards.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    weights = copy / "final_model" / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("o_proj.weight"))
    tensors[name][0, 0] = 2.4e36
    save_file(tensors, weights, metadata={"format": "pt"})
    assert main(["analyze", str(copy), "--n-prompts", "1", "--shards", "1"]) == 0
    assert "is not the one the run saved" in caplog.text
    assert "is not the one the run saved" in (copy / "report.html").read_text()
    capsys.readouterr()
    summary = json.loads((copy / "summary.json").read_text())
    summary["final_model_fingerprint"] = None
    (copy / "summary.json").write_text(json.dumps(summary))
    (copy / "report.html").write_text("<title>sae-shards report: earlier</title>")
    assert main(["analyze", str(copy), "--n-prompts", "1", "--shards", "1"]) == 2
    err = capsys.readouterr().err
    assert "sae-shards: cannot analyze" in err
    assert "sampling failed: the policy's next-token probabilities hold inf or NaN" in err
    assert "RuntimeError: probability tensor" not in err  # torch's traceback's last line
    assert (copy / "report.html").read_text() == "<title>sae-shards report: earlier</title>"


@pytest.mark.parametrize("key, value, problem", [
    ("temperature", -1, "is not a number > 0"), ("top_p", 1.5, "is not a number in [0, 1]"),
    ("generation_kwargs", "x", "is not a mapping"),
    # audit 134 F3: these two were converted by int() before the check (a bare ValueError
    # traceback; 16.7 silently cut to 16)
    ("max_completion_length", "sixteen", "is not an int >= 1"),
    ("max_completion_length", 16.7, "is not an int >= 1"),
    ("reward_batch", "eight", "is not an int >= 1")])
def test_a_hand_edited_sampling_setting_is_named_in_config_json(run_dir, tmp_path, capsys, key,
                                                                value, problem):
    """rl.temperature=-1 edited into config.json ended analyze with a traceback from deep in the
    report (score_rollouts' own check), not naming the file."""
    import shutil

    from sae_shards.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["rl"][key] = value
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["analyze", str(copy), "--n-prompts", "1", "--shards", "1"]) == 2
    err = capsys.readouterr().err
    assert f"config.json: rl.{key}={value!r} {problem}; the file was edited" in err
    assert "Traceback" not in err


def test_every_summary_key_is_documented(run_dir):
    """docs/usage.md's summary.json table names every key a run writes (eleven were named
    nowhere, and reward_first/last and fvu_first/last did not say they are means of a part)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    table = text.split("`summary.json` holds")[1].split("\n\n")[1]
    documented = {key for row in table.splitlines()[2:]
                  for key in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) <= documented, sorted(set(summary) - documented)
    assert {"granularity", "events", "zero_advantage_events", "truncated_events",
            "kept_energy_min", "precond_error_mean", "budget_used", "max_grad_norm",
            "grad_norm_steps", "clipped_steps"} <= documented  # per event


# RunView's reads, on timelines where they differ (audit 117: the short run's every fired shard
# fires on every sample, one sample per step, so "active on some" and "active on all", distinct
# and repeated steps, could not be told apart)
def _negative_shard(view):
    """A shard the run used with the minus sign (negative activation summed), its timeline."""
    _, acts = view.timeline()
    s = int(acts.sum(0).argmin())
    assert float(acts[:, s].sum()) < 0
    return s, acts


def test_a_negative_shard_counts_in_density_and_ranks_its_steps_by_size(run_dir):
    """Audit 117 S02, S10: density counts negative activations (the report's density column
    and always-on tag); top_steps ranks by |activation|, so a shard used with the minus sign
    lists its strongest steps first, not its weakest."""
    view = RunView(run_dir)
    s, acts = _negative_shard(view)
    assert torch.equal(view.density(), (acts != 0).float().mean(0))
    a, steps = acts[:, s], view.timeline()[0]
    top = view.top_steps(s, k=1)[0]
    assert abs(top["activation"]) == pytest.approx(float(a.abs().max()))
    assert top["rl_step"] == int(steps[int(a.abs().argmax())])


def _synthetic_timeline(view):
    """The view's final timeline replaced by 20 samples, two per RL step: latents 0 and 1 fire
    together on samples 0-9 (1 negative), latent 2 on every sample (always on), latent 3 on
    samples 0-4 (RL steps 1-3)."""
    n = 20
    values = torch.zeros(n, 4)
    g = torch.Generator().manual_seed(0)
    values[:10, 0] = 1.0 + torch.rand(10, generator=g)
    values[:10, 1] = -(0.5 + torch.rand(10, generator=g))
    values[:, 2] = 0.3 + 0.1 * torch.rand(n, generator=g)
    values[:5, 3] = 2.0
    view.activations = {"final.rl_step": torch.arange(n) // 2 + 1,
                        "final.indices": torch.tensor([[0, 1, 2, 3]] * n),
                        "final.values": values}
    return view.timeline()[1]


def test_runview_on_a_timeline_of_repeated_steps_and_rare_shards(run_dir):
    """Audit 117 S03, S06, S12, S29: families leave out the always-on (drift) shard; a shard's
    typical coefficient averages the samples it fired on; top_steps gives one row per RL step
    (several samples of one step, as per event) and stops where the shard did not fire."""
    view = RunView(run_dir)
    acts = _synthetic_timeline(view)
    members = [j for family in view.families().members for j in family]
    assert members and 0 in members and 2 not in members
    assert view.typical_coefficient(1) == pytest.approx(
        float(acts[:10, 1].abs().mean()) * view.shards.input_scale, rel=1e-6)
    steps = [row["rl_step"] for row in view.top_steps(0, k=5)]
    assert len(steps) == 5 and len(set(steps)) == 5
    rows = view.top_steps(3, k=5)
    assert [r["rl_step"] for r in rows] == [1, 2, 3] and all(r["activation"] != 0 for r in rows)


def test_task_mix_lists_the_largest_share_first(run_dir):
    """Audit 117 S09: the report prints a shard's contexts in task_mix's order."""
    view = RunView(run_dir)
    _, acts = view.timeline()
    s = int(acts.abs().sum(0).argmax())
    labels = [("x",) if i % 3 else ("y",) for i in range(acts.shape[0])]
    shares = list(view.task_mix(s, labels=labels).values())
    assert len(shares) == 2 and shares == sorted(shares, reverse=True) and shares[0] != shares[1]


def test_a_step_checkpoint_keeps_its_own_steps_logs(run_dir):
    """Audit 117 S19, S20: read at checkpoint step_000012, the rollouts and RL metrics of RL
    step 12 and the SAE metrics of the checkpoint's own SAE step are part of the view."""
    view = RunView(run_dir, 12)
    assert view.up_to[0] == 12
    assert max(view.rollouts) == 12 and max(r["rl_step"] for r in view.rl_metrics) == 12
    assert view.up_to[1] is not None
    assert max(r["sae_step"] for r in view.sae_metrics) == view.up_to[1]


def test_each_event_sample_has_its_own_events_context_and_rank(run_dir):
    """Audit 117 S28, S14: in a per-event run (here the synthetic timeline, sample i being event
    i % 2 of its step, events of tasks A and B), each sample's context is its own event's, and
    top_events ranks by |activation| (a negative shard's strongest event first; signed, its
    first would be an inactive sample and it would get none)."""
    view = RunView(run_dir)
    acts = _synthetic_timeline(view)
    view.activations["final.event"] = torch.arange(acts.shape[0]) % 2
    view.events = {(int(s), int(e)): {"step": int(s), "event": int(e), "rows": [],
                                      "tasks": ["A"] if e == 0 else ["B"]}
                   for s, e in zip(view.activations["final.rl_step"].tolist(),
                                   view.activations["final.event"].tolist())}
    assert view.sample_labels()[:4] == [("A",), ("B",), ("A",), ("B",)]
    assert view.top_events(1, k=1)[0]["activation"] == pytest.approx(float(acts[:, 1].min()))


def test_a_preconditioned_runs_activations_are_no_parameter_update(run_dir, tmp_path):
    """Audit 117 S27: with capture.precondition set the samples are not in parameter units, so
    RunView gives no attribution of the update."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["capture"]["precondition"] = "adam"
    (run / "config.json").write_text(json.dumps(config))
    view = RunView(run)
    assert view.samples_are_updates is False and view.attribution(0) is None


def test_a_shards_typical_coefficient_is_in_parameter_units(short_run_dir):
    """Shard.typical_coefficient (and so Shard.dense()'s default scale): the SAE's running mean
    |activation| times input_scale, parameter units, near RunView's consistent figure."""
    from sae_shards.analysis.shards import RunView

    view = RunView(short_run_dir)
    _, acts = view.timeline()
    s = int(acts.abs().sum(0).argmax())
    shard = view.shards[s]
    scale = view.shards.input_scale
    assert abs(math.log10(scale)) > 1  # parameter updates are far from unit size
    mean_abs = float(view.shards.stats["stats.mean_abs_act"][s])
    assert shard.typical_coefficient() == pytest.approx(mean_abs * scale, rel=1e-6)
    ratio = shard.typical_coefficient() / view.typical_coefficient(s)
    assert 0.2 < ratio < 5, ratio
    unit, scaled = shard.dense(scaled=False), shard.dense()
    for name in unit:
        torch.testing.assert_close(scaled[name], unit[name] * shard.typical_coefficient())
