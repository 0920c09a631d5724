import math
import threading

import pytest
import torch

from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.capture.memory import buffer_memory_bytes, check_buffer_memory, default_memory_budget
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
    with pytest.raises(ValueError, match="float16"):
        check_buffer_memory(big, 10, torch.float16, budget_bytes=needed)


def test_default_budget_is_a_fraction_of_free_memory():
    budget = default_memory_budget("cpu", fraction=0.5)
    assert 0 < budget
    assert default_memory_budget("cpu", fraction=0.25) <= budget
