"""The device paths, on CPU and on CUDA: the ring buffer with bf16 storage, the SAE, and the thread
runner in a real TRL GRPO run (per step and per event).

Every test is marked ``gpu`` and runs once per device: the ``cpu`` case in the normal suite, the
``cuda`` case wherever ``torch.cuda.is_available()`` (``scripts/gpu_check.sh`` runs
``pytest -m gpu``). Nothing is mocked: real buffer, real SAE, real TRL trainer; the one probe
(``ThreadProbe``) wraps the buffer's own ``sample`` to note which thread and CUDA stream drew
each SAE batch.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from hydra import compose, initialize_config_dir

from sae_shards.analysis.shards import RunView
from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.core.checkpoint import load_checkpoint
from sae_shards.core.metrics import match_directions
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.synthetic import PlantedConfig, PlantedStream
from sae_shards.core.targets import TargetSpec
from sae_shards.core.trainer import SAETrainer
from sae_shards.run.job import start

pytestmark = pytest.mark.gpu

NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False): scripts/gpu_check.sh runs " \
          "this case on a GPU machine"
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))
DEVICES = ["cpu", CUDA]
BF16_UNIT = 2.0**-8
"""bf16 keeps 8 significant bits: round to nearest moves a value by at most this share of it."""

RL_STEPS = 6
GROUPS_PER_STEP = 2
"""The default job's GRPO step: 16 completions in groups of ``rl.num_generations`` = 8."""


def on(device: str) -> torch.device:
    """The device with its index (``cuda`` -> ``cuda:0``), as tensors report it."""
    return torch.empty(0, device=device).device


# ---- (a) the ring buffer on the device, bf16 storage -------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_buffer_on_device_round_trips_within_bf16_rounding(device):
    targets = [TargetSpec("w", (48, 32)), TargetSpec("b", (16,))]
    buf = DeltaRingBuffer(targets, capacity=4, device=device, dtype=torch.bfloat16)
    assert buf.memory_bytes == 4 * (48 * 32 + 16) * 2
    g = torch.Generator(device=device).manual_seed(0)
    sources = []
    for step in range(1, 7):  # wraps around: slots hold steps 3..6
        delta = {t.name: 1e-5 * torch.randn(t.shape, generator=g, device=device)
                 for t in targets}  # fp32, at RL update scale
        slot, views = buf.begin_write()
        for name, view in views.items():
            assert view.device == on(device) and view.dtype == torch.bfloat16  # the storage itself
            view.copy_(delta[name])
        buf.commit(slot, StepMeta(step))
        sources.append(delta)

    slots = buf.chronological_slots()
    assert [buf.metadata(int(s)).global_step for s in slots] == [3, 4, 5, 6]
    out = buf.gather(slots)
    for t in targets:
        got, want = out[t.name], torch.stack([d[t.name] for d in sources[2:]])
        assert got.device == on(device) and got.dtype == torch.float32
        assert torch.equal(got, want.bfloat16().float())  # exactly the bf16 rounding
        assert ((got - want).abs() <= BF16_UNIT * want.abs()).all()
        assert not torch.equal(got, want)  # rounded: the storage really is bf16
    drawn = buf.sample(8, torch.Generator().manual_seed(0))
    assert drawn.batch["w"].device == on(device) and drawn.batch["w"].shape == (8, 48, 32)
    assert set(drawn.slots.tolist()) <= set(slots.tolist())


def _side_stream(device: str) -> contextlib.AbstractContextManager:
    """The reader's own CUDA stream (what the SAE worker should run on); nothing on CPU."""
    return torch.cuda.stream(torch.cuda.Stream()) if device == "cuda" else contextlib.nullcontext()


@pytest.mark.parametrize("device", DEVICES)
def test_reader_on_another_thread_and_stream_never_sees_a_torn_slot(device):
    """RL writes on its stream while a reader thread gathers on its own stream: every row read
    is one whole committed sample (slot ``s`` holds the constant ``step``), never a slot that is
    being overwritten. On CUDA only the buffer's CUDA events order the two streams."""
    shape = (2048, 4096) if device == "cuda" else (256, 64)  # on CUDA, kernels long enough to race
    targets = [TargetSpec("w", shape), TargetSpec("b", (64,))]
    buf = DeltaRingBuffer(targets, capacity=4, device=device, dtype=torch.bfloat16)
    n_steps, seen, errors = 200, [], []
    done = threading.Event()

    def read() -> None:
        try:
            with _side_stream(device):
                while not done.is_set() or not seen:
                    if len(buf) == 0:
                        continue
                    batch = buf.sample(4, torch.Generator().manual_seed(len(seen))).batch
                    for name, x in batch.items():  # [4, *shape]: each row one constant
                        lo, hi = x.flatten(1).amin(1), x.flatten(1).amax(1)  # [4]
                        if not torch.equal(lo, hi):
                            errors.append(f"{name}: torn rows, values {lo.tolist()}..{hi.tolist()}")
                        seen.extend(lo.tolist())
        except BaseException as e:  # reported in the main thread
            errors.append(repr(e))

    reader = threading.Thread(target=read, name="reader")
    reader.start()
    try:
        for step in range(1, n_steps + 1):  # bf16 holds integers up to 256 exactly
            slot, views = buf.begin_write()
            for view in views.values():  # in pieces: a slow write, with gaps a reader could hit
                for piece in view.chunk(16):
                    piece.fill_(float(step))
            buf.commit(slot, StepMeta(step))
    finally:
        done.set()
        reader.join(timeout=60)
    assert not reader.is_alive(), "the reader thread hung"
    assert not errors, errors[:3]
    assert seen and set(seen) <= set(range(1, n_steps + 1))


# ---- (b) the SAE trains on the device ----------------------------------------------------------


@pytest.mark.parametrize("form", ["dense", "factored"])
@pytest.mark.parametrize("device", DEVICES)
def test_sae_trains_on_device_from_a_bf16_buffer(device, form):
    """A planted stream pushed through a bf16 buffer on the device; the SAE, its Adam state and
    statistics live there, its loss falls and it finds the planted directions."""
    stream = PlantedStream(PlantedConfig(n_directions=6, noise_frac=0.1, seed=0))
    T = 8  # factored rows per matrix target (>= stream.min_event_rank())
    buf = DeltaRingBuffer(stream.targets, capacity=256, device=device, dtype=torch.bfloat16,
                          event_rank=T if form == "factored" else None)
    g = torch.Generator().manual_seed(1)
    for step in range(256):
        s = (stream.sample_factored(1, g, T) if form == "factored" else stream.sample(1, g)).sample
        buf.push({k: v[0].to(device) for k, v in s.items()}, StepMeta(step + 1))
    sae = LowRankSAE(stream.targets, SAEConfig(n_latents=12, k=2, lr=3e-3, batch_size=32, seed=0),
                     sample_form=form).to(device)
    trainer = SAETrainer(sae)
    draw = torch.Generator().manual_seed(2)
    fvu = [trainer.step(buf.sample(32, draw).batch).fvu for _ in range(150)]

    assert all(p.device == on(device) for p in sae.parameters())
    assert all(b.device == on(device) for b in sae.buffers())
    adam = [v for st in trainer.optimizer.state.values() for v in st.values()
            if torch.is_tensor(v) and v.dim() > 0]
    assert adam and all(v.device == on(device) for v in adam)
    assert trainer.stats.fire_count.device == on(device)
    first, last = sum(fvu[:5]) / 5, sum(fvu[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert match_directions(sae, stream.directions).mmcs >= 0.9

    # resumed from its state as a checkpoint holds it (on the CPU): fused Adam on CUDA needs
    # its step counter on the device, and the resumed trainer steps as the original does
    saved = {k: v.detach().cpu() for k, v in trainer.state_tensors().items()}
    weights = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
    again = LowRankSAE(stream.targets, sae.cfg, sample_form=form).to(device)
    again.load_state_dict(weights)
    resumed = SAETrainer(again)
    resumed.load_state_tensors(saved)
    assert all(st["step"].device == on(device) for st in resumed.optimizer.state.values())
    batch = buf.sample(32, torch.Generator().manual_seed(3)).batch
    trainer.step(batch), resumed.step(batch)
    for (name, a), b in zip(sae.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


# ---- (c) the thread runner in a real GRPO run --------------------------------------------------


class ThreadProbe:
    """Wraps ``buffer.sample`` (the real draw) to note which thread, and on CUDA which stream,
    drew each SAE batch."""

    def __init__(self, buffer: DeltaRingBuffer) -> None:
        self.threads: list[str] = []
        self.streams: list[int] = []
        real = buffer.sample

        def sample(*args: Any, **kwargs: Any):
            self.threads.append(threading.current_thread().name)
            if buffer.device.type == "cuda":
                self.streams.append(torch.cuda.current_stream(buffer.device).cuda_stream)
            return real(*args, **kwargs)

        buffer.sample = sample


class ThreadRun(NamedTuple):
    run_dir: Path
    summary: dict[str, Any]
    probe: ThreadProbe
    rl_stream: int | None
    """The RL thread's CUDA stream (None on CPU)."""
    devices: dict[str, torch.device]
    """Where the policy, the buffer and the SAE were."""
    buffer_dtype: torch.dtype


def thread_run(device: str, granularity: str, run_dir: Path) -> ThreadRun:
    """``sae-shards train``'s own pipeline (``run.job.start``) with the thread runner, bf16
    storage and a checkpoint mid-run, for ``RL_STEPS`` GRPO steps on ``device``."""
    overrides = [
        f"device={device}", f"rl.max_steps={RL_STEPS}", "task.n_prompts=16", "logging=disabled",
        "runner.concurrency=thread", "runner.min_samples=2", "runner.sae_steps_per_rl_step=2",
        "runner.checkpoint_every=3", "sae.n_latents=16", "capture.storage_dtype=bfloat16",
        f"capture.granularity={granularity}"]
    if device == "cpu":  # TRL turns bf16 autocast on whenever a GPU exists, even with use_cpu
        overrides.append("+rl.extra.bf16=false")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=overrides))
    rl, callback, _ = start(cfg, run_dir)
    parts = callback.parts
    probe = ThreadProbe(parts.buffer)
    rl_stream = (torch.cuda.current_stream(parts.buffer.device).cuda_stream
                 if device == "cuda" else None)
    try:
        rl.trainer.train()
    finally:
        callback.close()
    devices = {"policy": next(rl.trainer.model.parameters()).device,
               "buffer": parts.buffer.device, "sae": parts.sae.device}
    return ThreadRun(run_dir, callback.summary, probe, rl_stream, devices, parts.buffer.dtype)


@pytest.fixture(scope="module")
def thread_runs(tmp_path_factory):
    """``get(device, granularity)``: one ``thread_run`` per pair, shared by the tests below."""
    cache: dict[tuple[str, str], ThreadRun] = {}

    def get(device: str, granularity: str) -> ThreadRun:
        if (device, granularity) not in cache:
            out = tmp_path_factory.mktemp(f"thread_{device}_{granularity}")
            cache[device, granularity] = thread_run(device, granularity, out)
        return cache[device, granularity]

    return get


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_devices(run: ThreadRun, device: str) -> None:
    assert {k: d.type for k, d in run.devices.items()} == dict.fromkeys(run.devices, device)
    assert run.buffer_dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_thread_runner_per_step_capture_on_device(thread_runs, device):
    run = thread_runs(device, "step")
    _check_devices(run, device)
    s = run.summary
    assert s["rl_steps"] == RL_STEPS and s["captured"] == RL_STEPS
    assert s["zero_samples"] == s["nonfinite_samples"] == s["outlier_samples"] == 0
    # pushes 2..6 find min_samples=2 buffered: 2 SAE steps each, every one done by the worker
    assert s["sae_steps"] == 2 * (RL_STEPS - 1)
    assert run.probe.threads and set(run.probe.threads) == {"sae-worker"}

    final = load_checkpoint(run.run_dir / "checkpoints" / "final")
    assert len(final.sae.targets) == 14 and final.config["meta"]["rl_step"] == RL_STEPS
    assert final.sae.input_scale > 0
    mid = load_checkpoint(run.run_dir / "checkpoints" / "step_000003")  # written after wait_idle
    assert mid.config["meta"]["rl_step"] == 3
    view = RunView(run.run_dir)
    steps, acts = view.timeline()
    assert steps.tolist() == list(range(1, RL_STEPS + 1))  # one sample per RL step, in order
    assert acts.shape == (RL_STEPS, 16) and (acts != 0).sum(1).eq(final.sae.cfg.k).all()
    assert sorted(view.rollouts) == list(range(1, RL_STEPS + 1))
    assert len(view.sae_metrics) == s["sae_steps"]


@pytest.mark.parametrize("device", DEVICES)
def test_thread_runner_per_event_capture_on_device(thread_runs, device):
    run = thread_runs(device, "group")
    _check_devices(run, device)
    s = run.summary
    events = _read_jsonl(run.run_dir / "events.jsonl")
    # every prompt group of every step is accounted for: captured or skipped, and why
    skipped = (s["zero_advantage_events"] + s["zero_samples"] + s["nonfinite_samples"]
               + s["outlier_samples"])
    assert s["captured"] + skipped == RL_STEPS * GROUPS_PER_STEP
    assert len(events) == s["events"] == s["captured"] >= RL_STEPS
    assert s["sae_steps"] >= 2 and s["sae_steps"] % 2 == 0
    assert set(run.probe.threads) == {"sae-worker"}

    final = load_checkpoint(run.run_dir / "checkpoints" / "final")
    assert final.config["sample_form"] == "factored" and final.sae.input_scale > 0
    view = RunView(run.run_dir)
    assert view.per_event
    steps, _ = view.timeline()
    pairs = list(zip(steps.tolist(), view.sample_events().tolist()))
    assert pairs == [(e["step"], e["event"]) for e in events]  # every event once, in order
    top = view.top_events(int(view.density().argmax()), k=1)
    assert top and top[0]["prompt"] and len(top[0]["completions"]) == 8


@pytest.mark.parametrize("device", DEVICES)
def test_thread_worker_trains_off_the_rl_thread_and_stream(thread_runs, device):
    """The SAE's batches are drawn by the worker thread, never the RL thread; on CUDA on a
    stream other than RL's, so SAE kernels do not queue behind (or in front of) RL's."""
    run = thread_runs(device, "step")
    assert run.probe.threads and set(run.probe.threads) == {"sae-worker"}
    if device == "cuda":
        assert run.probe.streams and run.rl_stream not in run.probe.streams, (
            f"SAE batches drawn on CUDA stream(s) {sorted(set(run.probe.streams))}, the RL "
            f"thread's is {run.rl_stream}")
