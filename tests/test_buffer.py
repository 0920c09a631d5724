import math
import threading

import pytest
import torch

from sae_shards.capture.buffer import DeltaRingBuffer, SampleWindow, StepMeta
from sae_shards.capture.memory import (SAE_BOUND_RATIO, buffer_memory_bytes, check_buffer_memory,
                                      check_checkpoint_host_memory, check_sae_memory,
                                      checkpoint_host_bytes, default_memory_budget, sae_min_bytes)
from sae_shards.core.targets import TargetSpec

TARGETS = [TargetSpec("w", (4, 3), rank=1), TargetSpec("b", (5,))]


def sample_of(step: int) -> dict[str, torch.Tensor]:
    """A sample whose every entry names its step, so rows can be traced back."""
    return {"w": torch.full((4, 3), float(step)), "b": torch.full((5,), float(step))}


def test_wraparound_keeps_newest_in_order():
    buf = DeltaRingBuffer(TARGETS, capacity=5, device="cpu")
    for step in range(1, 5 + 3 + 1):  # capacity + 3 pushes
        buf.push(sample_of(step), StepMeta(step, reward_mean=step / 10, task_labels=(f"t{step}",)))
    assert len(buf) == 5 and buf.n_pushed == 8
    order = buf.chronological_slots()
    assert order.tolist() == [3, 4, 0, 1, 2]  # slots 0..2 were overwritten by steps 6..8
    assert [buf.metadata(int(s)).global_step for s in order] == [4, 5, 6, 7, 8]
    for slot in order.tolist():
        meta = buf.metadata(slot)
        assert meta.reward_mean == pytest.approx(meta.global_step / 10)
        assert math.isnan(meta.reward_std)
        assert meta.task_labels == (f"t{meta.global_step}",)
    batch, slots = buf.sample(64, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([buf.metadata(int(s)).global_step for s in slots], dtype=torch.float32)
    assert torch.equal(batch["w"][:, 0, 0], steps) and torch.equal(batch["b"][:, 0], steps)
    assert set(steps.tolist()) == {4.0, 5.0, 6.0, 7.0, 8.0}


def test_bf16_storage_round_trip():
    buf = DeltaRingBuffer(TARGETS, capacity=3, device="cpu", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    delta = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(5, generator=gen)}
    delta = {n: x * 1e-5 for n, x in delta.items()}  # RL-sized deltas
    buf.push(delta, StepMeta(1))
    assert buf.memory_bytes == 3 * (12 + 5) * 2 == buffer_memory_bytes(TARGETS, 3, torch.bfloat16)
    out = buf.sample(2).batch
    for name, x in delta.items():
        assert out[name].dtype == torch.float32
        expected = x.to(torch.bfloat16).float().expand_as(out[name])
        assert torch.equal(out[name], expected)
        assert not torch.equal(out[name][0], x)  # the rounding really happened


def test_slot_being_written_is_never_sampled():
    buf = DeltaRingBuffer(TARGETS, capacity=3, device="cpu")
    for step in (1, 2, 3):
        buf.push(sample_of(step), StepMeta(step))
    slot, views = buf.begin_write()  # overwrites slot 0 (step 1)
    assert slot == 0 and len(buf) == 2
    views["w"].fill_(float("nan"))
    slots = buf.sample(500, generator=torch.Generator().manual_seed(0)).slots
    assert 0 not in slots.tolist() and set(slots.tolist()) == {1, 2}
    with pytest.raises(KeyError, match="slot 0"):
        buf.metadata(0)
    with pytest.raises(RuntimeError, match="one writer"):
        buf.begin_write()
    views["w"].fill_(4.0)
    views["b"].fill_(4.0)
    buf.commit(slot, StepMeta(4))
    assert buf.chronological_slots().tolist() == [1, 2, 0]
    assert not buf.sample(500).batch["w"].isnan().any()


def test_gather_reads_committed_slots_only():
    buf = DeltaRingBuffer(TARGETS, capacity=3, device="cpu")
    for step in (1, 2):
        buf.push(sample_of(step), StepMeta(step))
    out = buf.gather([1, 0, 1])
    assert out["w"].shape == (3, 4, 3) and out["b"][:, 0].tolist() == [2.0, 1.0, 2.0]
    with pytest.raises(KeyError, match=r"\[2\]"):
        buf.gather([0, 2])


def test_abort_leaves_slot_empty_and_reuses_it():
    buf = DeltaRingBuffer(TARGETS, capacity=3, device="cpu")
    buf.push(sample_of(1), StepMeta(1))
    slot, _ = buf.begin_write()
    buf.abort(slot)
    assert len(buf) == 1 and buf.n_pushed == 1
    assert buf.push(sample_of(2), StepMeta(2)) == slot


def test_concurrent_sampling_sees_only_whole_samples():
    buf = DeltaRingBuffer(TARGETS, capacity=4, device="cpu")
    buf.push(sample_of(0), StepMeta(0))
    bad, stop = [], threading.Event()

    def sampler():
        while not stop.is_set():
            batch, _ = buf.sample(8)
            # A torn or half-written slot would mix values within a row.
            for x in batch.values():
                rows = x.flatten(1)
                if not torch.equal(rows, rows[:, :1].expand_as(rows)):
                    bad.append(rows)

    thread = threading.Thread(target=sampler)
    thread.start()
    for step in range(1, 300):
        slot, views = buf.begin_write()
        views["w"].fill_(float("nan"))  # garbage while in the write state
        views["b"].fill_(float("nan"))
        views["w"].fill_(float(step))
        views["b"].fill_(float(step))
        buf.commit(slot, StepMeta(step))
    stop.set()
    thread.join()
    assert not bad


def test_recent_frac_draws_first_rows_from_newest():
    buf = DeltaRingBuffer(TARGETS, capacity=10, device="cpu")
    for step in range(1, 11):
        buf.push(sample_of(step), StepMeta(step))
    gen = torch.Generator().manual_seed(0)
    batch, _ = buf.sample(20, gen, recent_frac=0.25, recent_window=2)
    steps = batch["b"][:, 0]
    assert set(steps[:5].tolist()) <= {9.0, 10.0}  # round(0.25 * 20) = 5 recent rows first
    assert len(set(steps[5:].tolist())) > 2


def test_empty_buffer_sample_error():
    buf = DeltaRingBuffer(TARGETS, capacity=2, device="cpu")
    with pytest.raises(RuntimeError, match="empty DeltaRingBuffer"):
        buf.sample(4)


def test_push_shape_mismatch_names_target_and_frees_slot():
    buf = DeltaRingBuffer(TARGETS, capacity=2, device="cpu")
    with pytest.raises(ValueError, match=r"'w'.*\(3, 4\).*\(4, 3\)"):
        buf.push({"w": torch.zeros(3, 4), "b": torch.zeros(5)}, StepMeta(1))
    buf.push(sample_of(1), StepMeta(1))  # the failed push released the writer
    assert len(buf) == 1


def test_memory_check_message():
    big = [TargetSpec("layers.0.mlp.w", (1024, 1024)), TargetSpec("layers.0.norm", (1024,))]
    needed = buffer_memory_bytes(big, 1000, torch.float32)
    assert needed == 1000 * (1024 * 1024 + 1024) * 4
    budget = needed // 3
    assert check_buffer_memory(big, 1000, torch.float32, budget_bytes=needed) == needed
    with pytest.raises(ValueError) as err:
        check_buffer_memory(big, 1000, torch.float32, budget_bytes=budget)
    msg = str(err.value)
    per_slot = (1024 * 1024 + 1024) * 4
    assert f"{needed / 1024**3:.3f} GiB" in msg and f"{budget / 1024**3:.3f} GiB" in msg
    assert f"capture.storage_dtype=bfloat16: {needed / 2 / 1024**3:.3f} GiB (still too large)" in msg
    assert f"capture.capacity={budget // per_slot}:" in msg
    assert "capture.targets" in msg and "layers.0.mlp.w" in msg
    # a capacity below runner.min_samples would be refused in turn: suggested with it lowered
    small = budget // per_slot // 50
    with pytest.raises(ValueError, match=rf"capture.capacity={small} with runner.min_samples="
                                         rf"{small} \(now 500: the SAE starts"):
        check_buffer_memory(big, 1000, torch.float32, budget_bytes=small * per_slot + 1,
                            min_samples=500)
    with pytest.raises(ValueError, match="float16"):
        check_buffer_memory(big, 10, torch.float16, budget_bytes=needed)


def test_sae_memory_check_names_values_that_fit():
    """An SAE whose lower bound (directions with gradients and Adam moments, a batch, the
    encoder's activations, the loss's Grams) exceeds what is free is refused before anything is
    allocated; the n_latents and batch_size it suggests have a bound SAE_BOUND_RATIO times
    below it, and one more does not."""
    specs = [TargetSpec("layers.0.mlp.w", (1024, 512), rank=2), TargetSpec("layers.0.b", (1024,))]
    weights = 2 * 1000 * (2 * (1024 + 512) + 1024)
    dense = 1024 * 512 + 1024  # the decoder bias: trained (with gradient and moments) or none
    floats = (4 * weights + 64 * dense + 64 * 1000 * 1024 * 2 + 2 * (1000 * 2) ** 2)
    need = sae_min_bytes(specs, 1000, 64)
    assert need == 4 * (floats + 4 * dense) == sae_min_bytes(specs, 1000, 64, b_dec=True)
    assert sae_min_bytes(specs, 1000, 64, b_dec=False) == 4 * floats
    check_sae_memory(specs, 1000, 64, need, "cpu")  # exactly enough
    budget = need * 3 // 4
    with pytest.raises(ValueError, match=r"the SAE needs more than .* sae.n_latents=1000 and "
                                         r"sae.batch_size=64 .* besides the buffer") as err:
        check_sae_memory(specs, 1000, 64, budget, "cpu")
    msg = str(err.value)
    assert f"sae.use_b_dec=false: no decoder bias, {16 * dense / 2**30:.3f} GiB less" in msg
    latents = int(msg.split("sae.n_latents=")[2].split(",")[0])
    samples = int(msg.split("sae.batch_size=")[2].split(",")[0])
    assert 1 <= latents < 1000 and 1 <= samples < 64
    room = budget // SAE_BOUND_RATIO
    assert sae_min_bytes(specs, latents, 64) <= room < sae_min_bytes(specs, latents + 1, 64)
    assert sae_min_bytes(specs, 1000, samples) <= room < sae_min_bytes(specs, 1000, samples + 1)


def test_checkpoint_host_memory_check():
    """An accelerator run's step checkpoint copies the full buffer and the SAE with both Adam
    moments to host memory; when that cannot fit the run is refused at setup (not killed at its
    first checkpoint), with a capacity whose copy fits."""
    specs = [TargetSpec("layers.0.mlp.w", (1024, 512), rank=2), TargetSpec("layers.0.b", (1024,))]
    per_slot = buffer_memory_bytes(specs, 1, torch.float32)
    weights = 2 * 100 * (2 * (1024 + 512) + 1024) + 100
    dense = 1024 * 512 + 1024
    need = checkpoint_host_bytes(specs, 100, 50, torch.float32)
    assert need == 50 * per_slot + 12 * (weights + dense)
    assert checkpoint_host_bytes(specs, 100, 50, torch.float32, b_dec=False) == need - 12 * dense
    check_checkpoint_host_memory(need, need, "cuda:0", 50, per_slot)  # exactly enough
    available = need - 20 * per_slot - 1
    with pytest.raises(ValueError, match=r"from cuda:0 to host memory") as err:
        check_checkpoint_host_memory(need, available, "cuda:0", 50, per_slot)
    msg = str(err.value)
    assert f"{need / 2**30:.3f} GiB" in msg and f"{available / 2**30:.3f} GiB" in msg
    assert "runner.checkpoint_every=0" in msg and "save_strategy='no'" in msg
    room = int(msg.split("capture.capacity=")[1].split(":")[0])
    assert room == 29
    assert checkpoint_host_bytes(specs, 100, room, torch.float32) <= available
    assert checkpoint_host_bytes(specs, 100, room + 1, torch.float32) > available
    with pytest.raises(ValueError, match="even 2 slots do not fit"):
        check_checkpoint_host_memory(need, 12 * (weights + dense), "cuda:0", 50, per_slot)


def test_default_budget_is_a_fraction_of_free_memory():
    budget = default_memory_budget("cpu", fraction=0.5)
    assert 0 < budget
    assert default_memory_budget("cpu", fraction=0.25) <= budget


class _PausedGather:
    """Patch ``Tensor.index_select`` (the batch gather) and ``Tensor.to`` (the early copy of a
    slot the writer takes soon) so a gather in ``thread_name`` stops inside them until
    ``release`` is set (``started`` tells the test it is there)."""

    def __init__(self, monkeypatch, thread_name: str, methods=("index_select", "to")) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        for method in methods:
            monkeypatch.setattr(torch.Tensor, method, self._paused(
                getattr(torch.Tensor, method), thread_name))

    def _paused(self, original, thread_name: str):
        def method(tensor, *args, **kwargs):
            if threading.current_thread().name == thread_name:
                self.started.set()
                assert self.release.wait(30), "the test never released the gather"
            return original(tensor, *args, **kwargs)

        return method


def test_writer_is_not_blocked_by_a_gather_in_progress(monkeypatch):
    buf = DeltaRingBuffer(TARGETS, capacity=16, device="cpu")
    for step in (1, 2):  # slots 0 and 1; the next write goes to slot 2
        buf.push(sample_of(step), StepMeta(step))
    paused = _PausedGather(monkeypatch, "sae-reader")
    got = {}
    reader = threading.Thread(target=lambda: got.update(buf.sample(16)._asdict()),
                              name="sae-reader")
    reader.start()
    try:
        assert paused.started.wait(30)
        # The reader is inside its gather (and holds slots 0 and 1): the writer goes on.
        for step in (3, 4):
            assert buf.push(sample_of(step), StepMeta(step)) == step - 1
        assert reader.is_alive() and not paused.release.is_set()
        assert len(buf) == 4 and buf.chronological_slots().tolist() == [0, 1, 2, 3]
    finally:
        paused.release.set()
        reader.join()
    assert set(got["slots"].tolist()) <= {0, 1}  # drawn before slots 2 and 3 were committed
    for name, x in got["batch"].items():
        expect = (got["slots"] + 1).float().view(-1, *[1] * (x.dim() - 1)).expand_as(x)
        assert torch.equal(x, expect), name


def test_slot_being_read_is_not_overwritten_until_the_read_ends(monkeypatch):
    buf = DeltaRingBuffer(TARGETS, capacity=2, device="cpu")
    for step in (1, 2):  # full: the next write overwrites slot 0
        buf.push(sample_of(step), StepMeta(step))
    paused = _PausedGather(monkeypatch, "sae-reader")
    got, wrote = {}, threading.Event()
    reader = threading.Thread(target=lambda: got.update(gathered=buf.gather([0])),
                              name="sae-reader")

    def write():
        slot, views = buf.begin_write()
        for name, view in views.items():
            view.copy_(sample_of(3)[name])
        wrote.set()
        buf.commit(slot, StepMeta(3))

    writer = threading.Thread(target=write)
    reader.start()
    try:
        assert paused.started.wait(30)
        writer.start()
        # begin_write waits for the reader of slot 0; however long we wait, it must not write.
        assert not wrote.wait(0.5)
        assert writer.is_alive() and buf.metadata(1).global_step == 2
    finally:
        paused.release.set()
        reader.join()
        writer.join(30)
    assert wrote.is_set() and not writer.is_alive()
    assert all(torch.equal(x[0], sample_of(1)[n]) for n, x in got["gathered"].items())
    assert buf.metadata(0).global_step == 3 and torch.equal(buf.gather([0])["b"][0],
                                                            sample_of(3)["b"])


def test_concurrent_reads_and_writes_keep_rows_whole_across_targets():
    """A row's targets come from one sample: no write lands between the gathers of two targets
    (the old lock held the whole gather; now the slots' read marks must)."""
    targets = [TargetSpec("w", (64, 64), rank=1), TargetSpec("b", (4096,))]
    buf = DeltaRingBuffer(targets, capacity=3, device="cpu")
    fill = lambda views, value: [v.fill_(value) for v in views.values()]  # noqa: E731
    slot, views = buf.begin_write()
    fill(views, 0.0)
    buf.commit(slot, StepMeta(0))
    bad, stop, n_reads = [], threading.Event(), [0]

    def sampler():
        while not stop.is_set():
            batch, slots = buf.sample(32)
            w, b = batch["w"].flatten(1), batch["b"]
            first = w[:, :1]
            if not (torch.equal(w, first.expand_as(w)) and torch.equal(b, first.expand_as(b))):
                bad.append(slots)
            n_reads[0] += 1

    thread = threading.Thread(target=sampler)
    thread.start()
    try:
        for step in range(1, 400):
            slot, views = buf.begin_write()
            fill(views, float("nan"))  # garbage while in the write state
            fill(views, float(step))
            buf.commit(slot, StepMeta(step))
    finally:
        stop.set()
        thread.join()
    assert not bad and n_reads[0] > 0


def test_gather_releases_the_writers_next_slot_first(monkeypatch):
    buf = DeltaRingBuffer(TARGETS, capacity=8, device="cpu")
    for step in range(1, 9):  # full: the next write overwrites slot 0
        buf.push(sample_of(step), StepMeta(step))
    paused = _PausedGather(monkeypatch, "sae-reader", methods=("index_select",))
    got = {}
    reader = threading.Thread(target=lambda: got.update(gathered=buf.gather([5, 0, 5, 0])),
                              name="sae-reader")
    reader.start()
    try:
        assert paused.started.wait(30)  # slot 0 is copied out; the gather of slot 5 is paused
        assert buf.push(sample_of(9), StepMeta(9)) == 0
        assert reader.is_alive() and not paused.release.is_set()
    finally:
        paused.release.set()
        reader.join()
    for name, x in got["gathered"].items():
        assert torch.equal(x, torch.stack([sample_of(s)[name] for s in (6, 1, 6, 1)])), name
    assert buf.metadata(0).global_step == 9


@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_sampled_rows_match_their_slots(capacity):
    buf = DeltaRingBuffer(TARGETS, capacity=capacity, device="cpu", dtype=torch.bfloat16)
    for step in range(1, 2 * capacity + 1):
        buf.push(sample_of(step), StepMeta(step))
    batch, slots = buf.sample(64, torch.Generator().manual_seed(0))
    for name, x in batch.items():
        assert x.dtype == torch.float32
        expect = torch.stack([sample_of(buf.metadata(s).global_step)[name] for s in slots.tolist()])
        assert torch.equal(x, expect), name


def test_resume_state_of_a_wrapped_ring_with_an_aborted_slot_restores_every_sample():
    """After the ring wrapped, an aborted write (a non-finite or outlier sample) leaves a hole:
    the committed slots are no longer a prefix. The resume state (written as JSON, NaN as null)
    brings back each slot's own sample, its held-out mark and its unknown (NaN) reward."""
    import json

    from sae_shards.run.rundir import strict_json

    buf = DeltaRingBuffer(TARGETS, capacity=4, device="cpu")
    for step in range(1, 7):  # slots 0, 1 hold steps 5, 6; slots 2, 3 steps 3, 4
        reward = math.nan if step == 5 else step / 10
        buf.push(sample_of(step), StepMeta(step, reward_mean=reward, heldout=step == 4))
    slot, _ = buf.begin_write()  # slot 2 (step 3) is dropped: a hole at 2
    buf.abort(slot)
    assert buf._filled.tolist() == [True, True, False, True]
    tensors, info = buf.state()
    info = json.loads(json.dumps(strict_json(info)))

    back = DeltaRingBuffer(TARGETS, capacity=4, device="cpu")
    back.load_state(tensors, info)
    assert back.chronological_slots().tolist() == [3, 0, 1]
    for s, step in ((3, 4), (0, 5), (1, 6)):
        assert back.gather([s])["w"][0, 0, 0].item() == step, s
        assert back.metadata(s).global_step == step
    assert math.isnan(back.metadata(0).reward_mean) and back.metadata(1).reward_mean == 0.6
    assert back.metadata(3).heldout and back.n_trainable == 2
    drawn = back.sample(64, torch.Generator().manual_seed(0)).slots
    assert 3 not in drawn.tolist()  # the held-out step is still never trained on


def test_a_window_draws_the_buffer_as_it_was_at_its_push():
    buf = DeltaRingBuffer(TARGETS, capacity=6, device="cpu")
    for step in range(1, 9):  # steps 3..8 in the ring (steps 1 and 2 overwritten)
        buf.push(sample_of(step), StepMeta(step, heldout=step == 5))
    window = buf.window(reserve=2)  # commits 4..7 (steps 5..8), less held-out step 5
    assert window == SampleWindow(4, 8) and buf.n_trainable_in(window) == 3
    buf.hold(window.start)
    buf.push(sample_of(9), StepMeta(9))  # overwrites step 3: outside the window
    assert buf.n_trainable_in(window) == 3 and buf.n_trainable == 5
    batch, slots = buf.sample(64, torch.Generator().manual_seed(0), window=window)
    assert set(batch["b"][:, 0].tolist()) == {6.0, 7.0, 8.0}  # never step 9, pushed after it
    # the whole ring as it is now, resumed: the window's commits are found again
    tensors, info = buf.state()
    again = DeltaRingBuffer(TARGETS, capacity=6, device="cpu")
    again.load_state(tensors, info)
    assert again.n_trainable_in(window) == 3 and again.window(0) == SampleWindow(3, 9)


def test_the_writer_waits_rather_than_overwrite_a_held_window():
    buf = DeltaRingBuffer(TARGETS, capacity=4, device="cpu")
    for step in range(1, 5):
        buf.push(sample_of(step), StepMeta(step))
    window = buf.window(reserve=1)  # commits 1..3: the next write (over commit 0) may go on
    buf.hold(window.start)
    buf.push(sample_of(5), StepMeta(5))
    wrote, polls = threading.Event(), []
    buf.on_wait = lambda: polls.append(1)
    writer = threading.Thread(target=lambda: (buf.push(sample_of(6), StepMeta(6)), wrote.set()))
    writer.start()
    assert not wrote.wait(0.3) and polls  # commit 1 is held: it waits, and says so meanwhile
    assert buf.metadata(1).global_step == 2
    buf.release(window.start)
    writer.join(5)
    assert wrote.is_set() and buf.metadata(1).global_step == 6


def test_a_writer_stopped_while_waiting_claims_no_slot():
    buf = DeltaRingBuffer(TARGETS, capacity=2, device="cpu")
    for step in (1, 2):
        buf.push(sample_of(step), StepMeta(step))
    buf.hold(buf.window(reserve=0).start)

    def stop():
        raise RuntimeError("the SAE worker failed")

    buf.on_wait = stop
    with pytest.raises(RuntimeError, match="worker failed"):
        buf.begin_write()
    assert len(buf) == 2 and buf.metadata(0).global_step == 1  # nothing dropped or claimed
    buf.release_all()
    assert buf.push(sample_of(3), StepMeta(3)) == 0


# ---- found by mutation testing (audit 121): each test below fails under a mutant of the code
# ---- that the rest of this file let pass


def test_recent_rows_are_round_of_recent_frac_times_batch():
    """B04: ``n_recent = round(recent_frac * batch_size)`` (documented in ``sample``): 0.35 x 10
    is 3.5, rounded to 4 recent rows, all from the single newest slot (recent_window=1)."""
    buf = DeltaRingBuffer(TARGETS, capacity=400, device="cpu")
    for step in range(1, 401):
        buf.push(sample_of(step), StepMeta(step))
    for seed in range(5):
        batch, _ = buf.sample(10, torch.Generator().manual_seed(seed), recent_frac=0.35,
                              recent_window=1)
        steps = batch["b"][:, 0].tolist()
        assert steps[:4] == [400.0] * 4, (seed, steps)
        assert steps[4:].count(400.0) < 6  # the rest from the whole buffer
