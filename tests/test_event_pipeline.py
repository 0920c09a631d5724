"""Per-event samples through the pipeline: config checks, the factored ring buffer, one push per
RL step with many events, and a real GRPO run (``ShardCallback`` and ``sae-shards train``) whose
run directory names the events behind each shard."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.capture.memory import buffer_memory_bytes, check_buffer_memory
from sae_shards.capture.runner import SAEWorkLoop
from sae_shards.core import events as ev
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import TargetSpec
from sae_shards.core.trainer import SAETrainer
from sae_shards.run import rundir
from sae_shards.run.config import CaptureConfig, RunnerConfig

TARGETS = [TargetSpec("w", (6, 5), rank=1), TargetSpec("b", (4,))]


def event_sample(seed: int, T: int = 3, rank: int = 4) -> dict[str, torch.Tensor]:
    """Factors of one event with ``T`` real rows, zero-padded to ``rank`` rows."""
    g = torch.Generator().manual_seed(seed)
    L, R = torch.randn(T, 6, generator=g), torch.randn(T, 5, generator=g)
    w = torch.cat([ev.join(L, R), torch.zeros(rank - T, 11)])
    return {"w": w, "b": torch.randn(4, generator=g)}


@pytest.mark.parametrize("overrides, message", [
    ({"granularity": "step", "precondition": "adam"}, r"capture.precondition=adam applies to per-event"),
    ({"granularity": "step", "normalize": "unit"}, r"capture.normalize=unit applies to per-event"),
    ({"granularity": "group", "source": "grad"}, r"capture.source=grad applies to .*granularity=step"),
    ({"granularity": "group", "event_rank": 0}, r"capture.event_rank=0 must be >= 1"),
])
def test_event_settings_are_checked_early(overrides, message):
    with pytest.raises(ValueError, match=message):
        CaptureConfig(**overrides)


def test_factored_buffer_stores_event_rank_rows_and_event_metadata():
    buf = DeltaRingBuffer(TARGETS, capacity=3, device="cpu", event_rank=4)
    assert buf.memory_bytes == 3 * (4 * 11 + 4) * 4 == buffer_memory_bytes(TARGETS, 3,
                                                                            torch.float32, 4)
    with pytest.raises(ValueError, match=r"target 'w': pushed delta has shape \(6, 5\)"):
        buf.push({"w": torch.zeros(6, 5), "b": torch.zeros(4)}, StepMeta(1))
    for i in range(4):  # one wrap-around
        buf.push(event_sample(i), StepMeta(i + 1, event=i % 2, rows=(2 * i, 2 * i + 1),
                                           advantage=0.5 - i, norm=float(i)))
    out = buf.gather(buf.chronological_slots())
    assert out["w"].shape == (3, 4, 11)
    assert torch.equal(out["w"][-1], event_sample(3)["w"])
    metas = [buf.metadata(int(s)) for s in buf.chronological_slots()]
    assert [(m.global_step, m.event, m.rows) for m in metas] == [
        (2, 1, (2, 3)), (3, 0, (4, 5)), (4, 1, (6, 7))]
    # resume state round trip keeps the event fields (NaN written as null)
    tensors, info = buf.state()
    info = json.loads(json.dumps({**info, "meta": [
        None if m is None else {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                for k, v in m.items()} for m in info["meta"]]}))
    again = DeltaRingBuffer(TARGETS, capacity=3, device="cpu", event_rank=4)
    again.load_state(tensors, info)
    assert [again.metadata(int(s)) for s in again.chronological_slots()] == metas


def test_memory_error_counts_factored_slots():
    need = buffer_memory_bytes(TARGETS, 10, torch.float32, 4)
    assert check_buffer_memory(TARGETS, 10, torch.float32, need, event_rank=4) == need
    with pytest.raises(ValueError, match=r"10 slots x 48 entries"):
        check_buffer_memory(TARGETS, 10, torch.float32, need - 1, event_rank=4)


def test_one_push_per_rl_step_trains_once_and_records_every_event():
    buf = DeltaRingBuffer(TARGETS, capacity=32, device="cpu", event_rank=4)
    sae = LowRankSAE(TARGETS, SAEConfig(n_latents=8, k=2, batch_size=4), sample_form="factored")
    trainer = SAETrainer(sae)
    cfg = RunnerConfig(sae_steps_per_rl_step=3, min_samples=4, checkpoint_every=0)
    loop = SAEWorkLoop(trainer, buf, cfg, torch.Generator().manual_seed(0))
    assert loop.room(threaded=False) == 32 - (loop._flush_at - 1)
    for step in range(1, 6):  # 3 events per step
        slots = [buf.push(event_sample(10 * step + e), StepMeta(step, event=e)) for e in range(3)]
        loop.process(slots)
    # the first push buffered 3 < min_samples=4 events and did not train; the 4 others did
    assert trainer.n_steps == 3 * 4
    loop.flush_activations()
    log = loop.activations
    # pushes before the SAE's first step are not encoded (there is no SAE to encode them yet)
    assert list(zip(log.rl_step, log.event)) == [(s, e) for s in range(3, 6) for e in range(3)]


# ---- the real job ---------------------------------------------------------------------------

EVENT_ARGS = ["capture.granularity=group", "rl.max_steps=8", "runner.checkpoint_every=4",
              "runner.min_samples=4", "runner.sae_steps_per_rl_step=2", "task.n_prompts=32",
              "sae.n_latents=16", "logging=disabled", "seed=2"]


def _train(run_dir, *extra):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "sae_shards.cli", "train", *EVENT_ARGS,
                             *extra, f"run_dir={run_dir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, rc=0):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == rc, err[-3000:]
    return out


@pytest.fixture(scope="module")
def event_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("events") / "run"
    _finish(_train(run))
    return run


def test_a_cut_event_is_said_once_and_the_run_counts_its_cuts_and_clipped_steps(tmp_path):
    """Events with more positions than capture.event_rank are approximated: the run warns once,
    and its closing lines and summary.json count the cuts; they also count the steps TRL clipped
    (the events are gradients before clipping), as the metrics log's grad_norm says."""
    run = tmp_path / "run"
    proc = _train(run, "capture.event_rank=1", "rl.max_steps=3", "runner.checkpoint_every=0",
                  "+rl.extra.max_grad_norm=0.001")  # every step clipped (grad_norm ~0.8)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["truncated_events"] >= 2 and summary["kept_energy_min"] < 1.0
    # what the buffer's capacity means in RL steps: 2 prompt groups a step
    assert ("the buffer's 256 slots hold the events of at least the last 128 RL step(s), at up "
            "to 2 event(s) a step (capture.granularity=group)") in out + err
    said = (out + err).count("than capture.event_rank=1 on a target")
    assert said == 1, (out + err)[-3000:]
    assert f"{summary['truncated_events']} cut to capture.event_rank (smallest kept energy" in out
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "rl" and "grad_norm" in r]
    assert summary["grad_norm_steps"] == len(logged) == 3
    assert summary["max_grad_norm"] == 0.001
    assert all(r["grad_norm"] > 0.001 for r in logged) and summary["clipped_steps"] == 3
    assert "3 of the 3 steps with a logged grad_norm clipped at max_grad_norm=0.001" in out


def test_clip_figures_count_the_logged_steps_over_max_grad_norm():
    from sae_shards.capture.summary import clip_figures

    rows = [{"kind": "rl", "rl_step": 1, "grad_norm": 2.0}, {"kind": "sae", "grad_norm": 9.0},
            {"kind": "rl", "rl_step": 2, "grad_norm": 0.5}, {"kind": "rl", "rl_step": 3},
            {"kind": "rl", "rl_step": 4, "grad_norm": float("nan")},
            {"kind": "rl", "rl_step": 5, "grad_norm": 1.5}]
    assert clip_figures(rows, 1.0) == {"max_grad_norm": 1.0, "grad_norm_steps": 3,
                                       "clipped_steps": 2}
    for off in (None, 0.0):  # no clipping: nothing clipped, the steps still counted
        assert clip_figures(iter(rows), off) == {"max_grad_norm": None, "grad_norm_steps": 3,
                                                 "clipped_steps": 0}


def test_group_granularity_job_names_the_events_behind_each_shard(event_run):
    from sae_shards.analysis.shards import RunView
    from sae_shards.cli import main

    run = event_run
    summary = json.loads((run / "summary.json").read_text())
    groups = 8 * 16 // 8  # steps x completions per step / num_generations
    assert summary["granularity"] == "group"
    assert summary["events"] + summary["zero_advantage_events"] + summary["zero_samples"] == groups
    assert summary["events"] >= groups // 2 and summary["sae_steps"] > 0
    assert summary["truncated_events"] == 0  # every event kept whole (kept_energy 1.0, below)
    assert summary["grad_norm_steps"] == 8 and summary["max_grad_norm"] == 1.0
    records = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert len(records) == summary["events"]
    rollouts = {json.loads(line)["step"]: json.loads(line)
                for line in (run / "rollouts.jsonl").read_text().splitlines()}
    for r in records:  # a group is one prompt's 8 completions, named by their rollout rows
        assert len(r["rows"]) == 8 and r["rows"] == list(range(8 * r["event"], 8 * r["event"] + 8))
        prompts = {rollouts[r["step"]]["prompts"][i] for i in r["rows"]}
        assert len(prompts) == 1
        rewards = [rollouts[r["step"]]["rewards"][i] for i in r["rows"]]
        assert r["reward"] == pytest.approx(sum(rewards) / 8)
        advantages = [rollouts[r["step"]]["advantages"][i] for i in r["rows"]]
        assert r["advantage"] == pytest.approx(sum(advantages) / 8, abs=1e-6)
        assert r["abs_advantage"] == pytest.approx(sum(map(abs, advantages)) / 8, rel=1e-5)
        assert r["abs_advantage"] > 0  # events with all-zero advantages were skipped
        assert r["norm"] > 0 and r["kept_energy"] == pytest.approx(1.0)

    view = RunView(run)
    assert view.per_event
    events = view.sample_events()
    assert set(events.tolist()) <= {0, 1} and events.numel() == summary["events"]
    busiest = int(view.density().argmax())
    top = view.top_events(busiest, k=3)
    assert top and all(len(t["completions"]) == 8 for t in top)
    for t in top:
        row = rollouts[t["rl_step"]]
        assert t["prompt"] == row["prompts"][t["rows"][0]]
        assert t["completions"] == [row["completions"][i] for i in t["rows"]]
        assert t["advantages"] == [row["advantages"][i] for i in t["rows"]]
    # top steps are distinct steps, each at its strongest event (there are 2 events a step)
    steps_top = view.top_steps(busiest, k=8)
    assert len({t["rl_step"] for t in steps_top}) == len(steps_top) >= 2
    acts = view.timeline()[1][:, busiest]
    for t in steps_top:
        mine = acts[view.timeline()[0] == t["rl_step"]]
        assert abs(t["activation"]) == float(mine.abs().max()) and t["event"] in (0, 1)
    # the checkpoint names what its samples are (was "update")
    assert view.shards.meta["source"] == "grad"
    assert main(["analyze", str(run), "--shards", "2", "--no-dose"]) == 0
    html = (run / "report.html").read_text()
    assert 'id="events"' in html and "mean |advantage|" in html
    analysis = json.loads((run / "analysis.json").read_text())
    shard = analysis["top_shards"][0]
    assert analysis["shards"][str(shard)]["top_events"][0]["rows"]


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r.pop("step"), r"events.jsonl:1: an event without 'step'"),
    (lambda r: r.update(event=[r["event"]]), r"events.jsonl:1: event is list \[0\], expected an "
                                             r"integer"),
    (lambda r: r.update(rows=[-1]), r"events.jsonl:1: rows holds -1, not a completion's index"),
    (lambda r: r.update(rows=[10 ** 6]), r"events.jsonl: event \d+ of RL step \d+ names "
                                         r"completion 1000000, but rollouts.jsonl logs 16"),
])
def test_an_events_log_of_another_shape_is_refused_naming_it(event_run, tmp_path, edit, problem):
    """events.jsonl rows without their step, with an event id of another type, or with rows that
    are no completion of their step (a negative index silently picked the last one): RunView
    names the file, instead of a KeyError, TypeError or IndexError from inside it."""
    import shutil

    from sae_shards.analysis.shards import RunView
    from sae_shards.core.checkpoint import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(event_run, run)
    rows = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    for row in rows:
        edit(row)
    (run / "events.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(CheckpointError, match=rf"{run}/{problem}.*copy (it|both) again"):
        view = RunView(run)
        for shard in range(len(view.shards)):
            view.top_events(shard)


def test_a_copy_without_its_events_log_or_summary_says_so(event_run, tmp_path, caplog):
    """A per-event run copied without events.jsonl was analysed as a per-step run without a
    word (its top events became whole steps), and one without summary.json was called killed
    or still running. Both are said now."""
    import shutil

    from sae_shards.analysis.report import analyze
    from sae_shards.analysis.shards import RunView

    copy = tmp_path / "copy"
    shutil.copytree(event_run, copy)
    (copy / "events.jsonl").unlink()
    (copy / "summary.json").unlink()
    assert not RunView(event_run).lacks_events
    view = RunView(copy)
    assert view.lacks_events and "this per-event run lacks events.jsonl" in caplog.text
    page = analyze(copy, dose=False).read_text()
    assert "this copy of the run lacks events.jsonl" in page
    assert "this copy of the finished run lacks summary.json: recomputed from its logs" in page


@pytest.mark.slow  # three runs (~40 s); per-step capture's kill and resume stay in the default
def test_a_killed_per_event_run_resumes_to_the_same_shards(tmp_path):
    """kfac's running covariances and the unit norm's outlier-free path survive a kill too."""
    from safetensors.torch import load_file

    from sae_shards.analysis.shards import RunView

    extra = ("capture.precondition=kfac", "capture.normalize=unit")
    event_run = tmp_path / "uninterrupted"
    _finish(_train(event_run, *extra))
    run = tmp_path / "run"
    proc = _train(run, *extra)
    deadline = 300
    import time

    t0 = time.monotonic()
    # both sides of step 4 on disk: TRL's, and the shards checkpoint that sae-shards writes on a
    # background thread (renamed into place after its resume file; killing before it is done
    # leaves no resumable step, which resume=true rightly refuses)
    # (TRL's trainer_state.json is written last and not atomically: killed while it is written,
    # step 4 is torn and resume=true rightly refuses the run; wait until it parses)
    while not (rundir.trl_finished(run / "trl", 4)
               and (run / "checkpoints" / "step_000004" / "sae.safetensors").exists()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() - t0 < deadline
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    # read before it is resumed: the newest checkpoint's buffer of events, re-encoded
    view = RunView(run)
    step = int(view.checkpoint.removeprefix("step_"))
    steps, acts = view.timeline()
    events = view.activations["final.event"]
    assert view.recovered == "killed" and steps.numel() > 0 and int(steps.max()) <= step
    assert (events >= 0).all() and (acts != 0).any(1).all()  # per-event samples, all encoded
    top = view.top_events(int(acts.abs().sum(0).argmax()), 2)
    assert top and all(t["rl_step"] <= step and t["completions"] for t in top)
    _finish(_train(run, *extra, "resume=true"))
    for name in ("checkpoints/final/sae.safetensors", "activations.safetensors"):
        a, b = load_file(event_run / name), load_file(run / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name}: {key}")
    for log in ("events.jsonl", "rollouts.jsonl"):
        assert (event_run / log).read_text() == (run / log).read_text()


def test_heldout_figures_of_factored_samples_equal_the_materialised_ones():
    from sae_shards.core.metrics import evaluate_heldout
    from sae_shards.core.synthetic import PlantedConfig, PlantedStream

    stream = PlantedStream(PlantedConfig())
    g = torch.Generator().manual_seed(0)
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=16, k=3), sample_form="factored")
    trainer = SAETrainer(sae)
    for _ in range(50):
        trainer.step(stream.sample_factored(32, g, T=6).sample)
    batches = [stream.sample_factored(32, g, T=6).sample for _ in range(2)]
    got = evaluate_heldout(sae, batches)
    # reference: materialise, reconstruct densely (no decoder bias), FVU and ML2R about zero
    x = {t.name: torch.cat([ev.materialize(b[t.name], t) for b in batches]) / sae.input_scale
         for t in stream.targets}
    codes = sae.encode(sae.to_scaled({k: torch.cat([b[k] for b in batches]) for k in x}))
    with torch.no_grad():
        rec = sae.decode(codes, with_bias=False)
    sq = lambda d: sum(v.flatten(1).pow(2).sum(1) for v in d.values())  # noqa: E731
    resid = sq({k: x[k] - rec[k] for k in x})
    assert got.fvu == pytest.approx(float(resid.sum() / sq(x).sum()), rel=1e-4)
    assert got.ml2r == pytest.approx(float((sq(rec).sqrt() / sq(x).sqrt()).mean()), rel=1e-4)
    assert 0 < got.fvu < 0.9 and got.l0 == 3
