"""SAEWorkLoop: when the SAE trains, on which buffered steps (no RL: the buffer is fed directly)."""

import threading

import pytest

import torch

from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.run.config import RunnerConfig
from sae_shards.capture.runner import SAEWorkLoop
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import TargetSpec
from sae_shards.core.trainer import SAETrainer

TARGETS = [TargetSpec("w", (6, 5), rank=1), TargetSpec("b", (4,))]


def feed(cfg: RunnerConfig, n_steps: int, capacity: int = 8):
    """Push steps 1..n_steps (every 4th held out) through a loop; returns the loop, the pushes
    that trained the SAE and, per such push, the RL steps of the slots its batches drew."""
    buffer = DeltaRingBuffer(TARGETS, capacity=capacity, device="cpu")
    drawn: list[int] = []
    sample = buffer.sample

    def recording_sample(*args, **kwargs):  # the real draw, its RL steps noted
        out = sample(*args, **kwargs)
        drawn.extend(buffer.metadata(int(s)).global_step for s in out.slots)
        return out

    buffer.sample = recording_sample
    trainer = SAETrainer(LowRankSAE(TARGETS, SAEConfig(n_latents=4, k=1, batch_size=4)))
    loop = SAEWorkLoop(trainer, buffer, cfg, torch.Generator().manual_seed(0))
    seen, draws = [], {}
    g = torch.Generator().manual_seed(1)
    for step in range(1, n_steps + 1):
        delta = {t.name: torch.randn(t.shape, generator=g) for t in TARGETS}
        before, drawn[:] = trainer.n_steps, []
        loop.process(buffer.push(delta, StepMeta(step, heldout=step % 4 == 0)))
        if trainer.n_steps > before:
            seen.append(step)
            draws[step] = sorted(set(drawn))
    return loop, seen, draws


def test_sae_starts_at_sae_start_step_and_min_samples():
    loop, seen, _ = feed(RunnerConfig(sae_steps_per_rl_step=3, min_samples=2, sae_start_step=6), 12)
    assert seen == [6, 7, 8, 9, 10, 11, 12]  # held-out pushes (8, 12) still train on the others
    assert loop.trainer.n_steps == 3 * 7
    assert loop.trainer.stats.n_samples == 3 * 7 * 4  # each SAE step draws sae.batch_size = 4
    loop, seen, _ = feed(RunnerConfig(sae_steps_per_rl_step=1, min_samples=5, sae_start_step=2), 12)
    assert seen[0] == 6  # steps 1, 2, 3, 5, 6 are the first five trainable ones


def test_windowed_sae_trains_only_on_the_last_capacity_steps():
    # capacity 8, start 10: the push of step s trains on trainable steps in (s - 8, s] only
    loop, seen, draws = feed(
        RunnerConfig(sae_steps_per_rl_step=20, min_samples=1, sae_start_step=10), 24)
    assert seen == list(range(10, 25))
    for step, steps in draws.items():
        window = [s for s in range(step - 7, step + 1) if s % 4 != 0]
        assert steps == window, (step, steps)  # 20 batches of 4 hit every slot of the window
    assert list(loop.activations.rl_step) == list(range(11, 25))  # once the SAE has data


def hung_thread_runner(capacity: int):
    """A thread runner (max_lag 1, timeout 0.5 s) whose SAE step never returns until the
    returned event is set; and its buffer."""
    from sae_shards.capture.runner import ThreadRunner

    buffer = DeltaRingBuffer(TARGETS, capacity=capacity, device="cpu")
    trainer = SAETrainer(LowRankSAE(TARGETS, SAEConfig(n_latents=4, k=1, batch_size=4)))
    loop = SAEWorkLoop(trainer, buffer, RunnerConfig(max_lag=1), torch.Generator().manual_seed(0))
    hang = threading.Event()
    loop.process = lambda *push: hang.wait(30)
    return ThreadRunner(loop, max_lag=1, timeout_s=0.5), buffer, hang


def test_a_hung_worker_stops_the_run_instead_of_blocking_rl():
    import time

    from sae_shards.capture.runner import SAEWorkerError

    runner, _, hang = hung_thread_runner(capacity=16)
    start = time.monotonic()
    with pytest.raises(SAEWorkerError, match=r"runner.worker_timeout_s=0.5"):
        for slot in range(10):  # the queue fills; RL must not wait forever
            runner.on_push(slot)
    assert time.monotonic() - start < 5
    hang.set()


def test_rl_waiting_to_overwrite_a_held_sample_stops_on_a_hung_worker():
    """RL may also wait in the buffer, for a sample the worker may still draw: a hung worker
    stops it there too, within the timeout, and the held sample is never overwritten."""
    import time

    from sae_shards.capture.runner import SAEWorkerError

    runner, buffer, hang = hung_thread_runner(capacity=5)
    delta = {t.name: torch.ones(t.shape) for t in TARGETS}
    runner.on_push(buffer.push(delta, StepMeta(1)))  # held: commits 0.. (a ring of 5, reserve 2)
    start = time.monotonic()
    with pytest.raises(SAEWorkerError, match=r"runner.worker_timeout_s=0.5"):
        for step in range(2, 9):  # one large push: its 5th write would overwrite step 1
            buffer.push(delta, StepMeta(step))
    assert time.monotonic() - start < 5
    assert buffer.metadata(0).global_step == 1 and buffer.n_pushed == 5
    hang.set()


def test_rl_waiting_on_a_held_sample_stops_on_a_late_worker_that_keeps_reading():
    """A worker past the timeout that still reads the buffer (each of its gathers wakes the
    waiting writer) stops RL within the timeout too, not only once the worker is done."""
    import time

    from sae_shards.capture.runner import SAEWorkerError

    runner, buffer, hang = hung_thread_runner(capacity=5)

    def reads_until_set(*push):  # SAE steps that go on past the timeout, reading the buffer
        while not hang.wait(0.005):
            buffer.gather([0])

    runner.loop.process = reads_until_set
    delta = {t.name: torch.ones(t.shape) for t in TARGETS}
    runner.on_push(buffer.push(delta, StepMeta(1)))  # held: commit 0
    threading.Timer(5, hang.set).start()  # the worker ends after 5 s at most
    start = time.monotonic()
    with pytest.raises(SAEWorkerError, match=r"runner.worker_timeout_s=0.5"):
        for step in range(2, 9):  # the 5th write would overwrite step 1
            buffer.push(delta, StepMeta(step))
    assert time.monotonic() - start < 3
    assert buffer.metadata(0).global_step == 1
    hang.set()


def test_a_lagging_worker_reads_each_push_s_own_samples_not_later_ones():
    """Pushes of two events on a ring of 5 (max_lag 1): a push's own first sample lies outside
    the window its batches draw from, yet the worker reads it (its metadata, its encoding), so
    RL must not overwrite it while the worker is behind. (Before, with a slow worker, 37 of 39
    pushes found another step's samples in their slots.)"""
    import time

    from sae_shards.capture.runner import ThreadRunner

    buffer = DeltaRingBuffer(TARGETS, capacity=5, device="cpu")
    cfg = RunnerConfig(concurrency="thread", max_lag=1, min_samples=1, sae_steps_per_rl_step=1)
    trainer = SAETrainer(LowRankSAE(TARGETS, SAEConfig(n_latents=4, k=1, batch_size=2)))
    loop = SAEWorkLoop(trainer, buffer, cfg, torch.Generator().manual_seed(0))
    assert loop.room(threaded=True) == 2
    process, seen = loop.process, []

    def slow(slots, window):
        time.sleep(0.02)
        seen.append({buffer.metadata(s).global_step for s in slots})
        return process(slots, window)

    loop.process = slow
    runner = ThreadRunner(loop, cfg.max_lag, timeout_s=30)
    for step in range(1, 21):
        delta = {t.name: torch.full(t.shape, float(step)) for t in TARGETS}
        runner.on_push([buffer.push(delta, StepMeta(step, event=e)) for e in range(2)])
    runner.finish()
    assert seen == [{step} for step in range(1, 21)]


def test_sae_budget_grants_steps_worth_its_share_of_rl_time():
    """Pure accounting, on a clock the test moves: 100 ms of RL per push, SAE steps of 10 ms,
    budget 0.2 -> 20 ms per push -> about two steps per push, and spent time is charged."""
    from sae_shards.capture.runner import SAEBudget

    now = [0.0]
    budget = SAEBudget(0.2, clock=lambda: now[0])
    granted = []
    for _ in range(50):
        started = now[0]
        n = budget.steps(started)
        now[0] += 0.010 * n  # the SAE steps take 10 ms each
        budget.spent(started, n, 0.010 * n)
        granted.append(n)
        now[0] += 0.100  # RL's own step
    assert granted[0] == 1  # the first push measures a step
    # 49 intervals of credit, less the first push's unpaid step and the rounding down
    assert sum(granted[1:]) == pytest.approx(0.2 * 0.100 * 49 / 0.010, abs=3)
    sae_time, rl_time = 0.010 * sum(granted), 0.100 * 50
    assert sae_time / rl_time == pytest.approx(0.2, abs=0.01)
    debt = SAEBudget(0.2, clock=lambda: now[0])  # a costly push (e.g. encoding) puts it in debt
    debt.spent(now[0], 1, 0.010)
    start = now[0]
    now[0] += 1.0
    debt.spent(start, 0, 0.0)
    now[0] += 0.100
    assert debt.steps(now[0]) == 0 and debt.step_s == pytest.approx(0.010)  # estimate kept
    charged = SAEBudget(0.2, clock=lambda: now[0])  # SAE work between pushes is paid for too
    charged.spent(now[0], 1, 0.010)
    charged.charge(0.05)  # a 50 ms activation flush before a checkpoint
    now[0] += 0.05 + 0.100  # ... then 100 ms of RL
    assert charged.steps(now[0]) == 0  # 20 ms earned, 50 ms owed (the flush earned nothing)
    assert charged.credit_s == pytest.approx(0.2 * 0.100 - 0.05)
    idle = SAEBudget(0.2, clock=lambda: now[0])  # a long pause buys no burst
    idle.spent(now[0], 1, 0.01)
    now[0] += 1000.0
    assert idle.steps(now[0]) == idle.cap_steps


def test_a_budget_the_hooks_alone_overspend_is_told_once_the_sae_stalls():
    """The hooks' time over a streak of pushes without an SAE step (20 ms a push against 100 ms
    of RL: 20%) exceeds a 5% budget: the work loop says so once, at the 20th push, naming
    runner.sae_budget and the share; at 2 ms a push (2%) it says nothing. On a clock the test
    moves; the SAE steps themselves are not run (``steps`` is asked, as ``process`` asks)."""
    import logging

    from sae_shards.capture.runner import STARVED_PUSHES, SAEBudget

    for hooks_s, told in ((0.020, True), (0.002, False)):
        now = [0.0]
        buffer = DeltaRingBuffer(TARGETS, capacity=8, device="cpu")
        loop = SAEWorkLoop(SAETrainer(LowRankSAE(TARGETS, SAEConfig(n_latents=4, k=1))), buffer,
                           RunnerConfig(sae_budget=0.05), torch.Generator().manual_seed(0))
        loop.budget = SAEBudget(0.05, clock=lambda: now[0])
        loop.budget.spent(now[0], 1, 0.050)  # the first push: one 50 ms step, measured
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("sae_shards.capture.runner").addHandler(handler)
        try:
            for push in range(1, 41):
                loop.budget.charge(hooks_s)  # capture and logging on the RL thread
                now[0] += hooks_s + 0.100  # ... and RL's own step
                n = loop.budget.steps(now[0])
                loop._note_granted(n)
                if told:
                    assert n == 0  # 5 ms earned a push, 20 owed: never a step
                    assert len(records) == (push >= STARVED_PUSHES), push
        finally:
            logging.getLogger("sae_shards.capture.runner").removeHandler(handler)
        assert loop.budget.starved() is told
        if told:
            text = records[0].getMessage()
            assert text.startswith("runner.sae_budget=0.05 does not cover sae-shards' own work")
            assert "took 20% of RL time" in text and "no step for the last 20 captured" in text
        else:
            assert not records and loop.budget.hooks_share() == pytest.approx(0.02)


@pytest.mark.parametrize("budget, starved", [(0.01, True), (0.9, False)])
def test_a_run_whose_budget_its_capture_alone_exceeds_says_so(tmp_path, budget, starved):
    """Per-event capture on the tiny job costs sae-shards about a quarter of RL time on the RL
    thread (its hooks inside RL's forward and backward included): a budget of 1% leaves the SAE
    no step after its first, and the run says so while it runs and in summary.json's warning,
    naming runner.sae_budget (before, it ended with fvu 1.000 -> 1.000 and no word); 90% covers
    it, trains, and says nothing of the kind."""
    import json

    from sae_shards.cli import main

    run = tmp_path / "run"
    assert main(["train", f"run_dir={run}", "capture.granularity=group", "rl.max_steps=40",
                 f"runner.sae_budget={budget}", "logging=disabled"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    told = [line for line in (run / "cli.log").read_text().splitlines()  # the run's own log
            if "[sae_shards.capture.runner]" in line and "does not cover" in line]
    if starved:
        assert summary["sae_steps"] <= 2, summary
        assert summary["warning"].startswith(
            f"runner.sae_budget={budget:g} does not cover sae-shards' own work"), summary
        assert len(told) == 1 and "no step for the last 20 captured deltas" in told[0]
    else:
        assert not told and summary["sae_steps"] > 10, summary  # 29 when measured
        assert "does not cover" not in (summary.get("warning") or "")


def test_the_budget_pays_for_the_callbacks_own_work_and_the_inline_sae_once(monkeypatch):
    """``runner.sae_budget`` bounds all of sae-shards' time on the RL thread: each hook's capture
    and logging (5 + 2 ms a step here) is charged beside the inline SAE steps (10 ms each), whose
    time the hook does not charge a second time. On a clock the test moves: 100 ms of RL per step,
    budget 0.2 -> 20 ms a step in all, 13 of them left for SAE steps."""
    import threading
    import types

    from sae_shards.capture import callback_hooks
    from sae_shards.capture.runner import SAEBudget

    now = [0.0]
    monkeypatch.setattr(callback_hooks, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    budget = SAEBudget(0.2, clock=lambda: now[0])
    granted = []

    class Hooks:
        parts = types.SimpleNamespace(loop=types.SimpleNamespace(budget=budget))

        @callback_hooks.paid
        def on_step_end(self):
            now[0] += 0.005  # capture
            started = now[0]  # the inline push: SAEWorkLoop.process
            n = budget.steps(started)
            now[0] += 0.010 * n
            budget.spent(started, n, 0.010 * n)
            granted.append(n)
            now[0] += 0.002  # rollouts and metrics lines

    hooks = Hooks()
    for _ in range(200):
        hooks.on_step_end()
        now[0] += 0.100  # RL's own step
    assert budget.paid_s == pytest.approx(200 * 0.007 + 0.010 * sum(granted))
    assert budget.paid_s / (200 * 0.100) == pytest.approx(0.2, abs=0.01)
    assert sum(granted) / 200 == pytest.approx(1.3, abs=0.05)
    assert budget.earned_from_s == pytest.approx(199 * 0.100)  # the hooks' time earned nothing
    seen = []  # what another thread pays is not this thread's
    worker = threading.Thread(target=lambda: (budget.charge(1.0),
                                              seen.append(budget.paid_in_this_thread())))
    before = budget.paid_in_this_thread()
    worker.start()
    worker.join()
    assert seen == [1.0] and budget.paid_in_this_thread() == before


def _budget_with_a_worker(rl_waits: bool, waits_are_charged: bool = False):
    """200 pushes under budget 0.2 on a clock the test moves: hooks of 7 ms, 100 ms of RL a
    step, the worker's SAE steps (10 ms each) on a thread of their own, run beside RL's step or,
    ``rl_waits``, while RL waits for them (reported as ``waited``, or ``waits_are_charged``: as
    hook time, what the callback did before). The budget and the steps granted per push."""
    import threading

    from sae_shards.capture.runner import SAEBudget

    now = [0.0]
    budget = SAEBudget(0.2, clock=lambda: now[0])
    granted = []

    def push():  # the worker's SAEWorkLoop.process
        started = now[0]
        n = budget.steps(started)
        now[0] += 0.010 * n
        budget.spent(started, n, 0.010 * n)
        granted.append(n)

    for _ in range(200):
        now[0] += 0.007  # the hook's capture, queue put and logging on the RL thread
        budget.charge(0.007)
        worker = threading.Thread(target=push)
        waited_from = now[0]
        worker.start()
        worker.join()
        if rl_waits:
            (budget.charge if waits_are_charged else budget.waited)(now[0] - waited_from)
            now[0] += 0.100
        else:
            now[0] += 0.100 - 0.010 * granted[-1]  # the rest of RL's own step
    return budget, granted


def test_a_thread_worker_gets_the_inline_share_of_rl_time():
    """``runner.sae_budget`` means the same in both runners: RL time earns credit while a thread
    worker trains beside it (its time is paid, not subtracted from RL's). The inline case above
    on a thread -> 1.3 steps a push, as inline. Earning from the worker's idle gaps instead gave
    ~1.04 (the 10 ms a step it trains would not count as RL time)."""
    budget, granted = _budget_with_a_worker(rl_waits=False)
    assert sum(granted) / 200 == pytest.approx(1.3, abs=0.05)
    assert budget.earned_from_s == pytest.approx(199 * 0.100)
    assert budget.paid_s / budget.earned_from_s == pytest.approx(0.2, abs=0.01)


def test_a_wait_for_the_thread_worker_is_not_paid_twice():
    """When RL waits for a thread worker (a full queue, a checkpoint's wait_idle), the worker's
    time is paid once, by its own ``process``, and the wait earns nothing, as an inline push:
    1.3 steps a push again. Charging the wait as hook time too (before) paid for it twice."""
    budget, granted = _budget_with_a_worker(rl_waits=True)
    assert sum(granted) / 200 == pytest.approx(1.3, abs=0.05)
    assert budget.paid_s == pytest.approx(200 * 0.007 + 0.010 * sum(granted))
    assert budget.waited_s == pytest.approx(0.010 * sum(granted))
    assert budget.earned_from_s == pytest.approx(199 * 0.100)
    _, twice = _budget_with_a_worker(rl_waits=True, waits_are_charged=True)
    assert sum(twice) / 200 == pytest.approx(0.65, abs=0.05)


def test_the_thread_runner_tells_the_budget_how_long_rl_waited_for_its_worker():
    """ThreadRunner reports RL's waits for a slow worker to the budget: a full queue
    (max_lag 1) and ``wait_idle``; none of it is paid on the RL thread."""
    import time

    from sae_shards.capture.runner import ThreadRunner

    buffer = DeltaRingBuffer(TARGETS, capacity=8, device="cpu")
    cfg = RunnerConfig(concurrency="thread", max_lag=1, min_samples=1, sae_budget=0.1)
    trainer = SAETrainer(LowRankSAE(TARGETS, SAEConfig(n_latents=4, k=1, batch_size=2)))
    loop = SAEWorkLoop(trainer, buffer, cfg, torch.Generator().manual_seed(0))
    process = loop.process
    loop.process = lambda slots, window: (time.sleep(0.05), process(slots, window))
    runner = ThreadRunner(loop, cfg.max_lag, timeout_s=30)
    for step in range(1, 5):  # the third push finds the queue full behind a busy worker
        runner.on_push(buffer.push({t.name: torch.full(t.shape, float(step)) for t in TARGETS},
                                   StepMeta(step)))
    runner.wait_idle()
    runner.finish()
    assert loop.budget.waited_s > 0.1  # 4 pushes of 50 ms each, pushed at once
    assert loop.budget.paid_in_this_thread() == 0.0  # the RL thread paid nothing of it


def test_the_end_of_run_encode_copies_at_most_encode_chunk_mib_of_the_buffer():
    """The final timeline encodes the whole buffer: a large model's dense slots are gathered
    (and scaled) a few at a time, as ``sae.encode_chunk_mib`` allows, not 64 at a time (64 slots
    of a 0.5B model's delta are 92 GB in fp32), with the same codes."""
    from dataclasses import replace

    from sae_shards.capture.runner import encode_buffer

    targets = [TargetSpec("w", (256, 256), rank=1)]
    buffer = DeltaRingBuffer(targets, capacity=12, device="cpu")
    g = torch.Generator().manual_seed(0)
    for step in range(1, 11):
        buffer.push({t.name: torch.randn(t.shape, generator=g) for t in targets}, StepMeta(step))
    sae = LowRankSAE(targets, SAEConfig(n_latents=8, k=2, batch_size=4))
    SAETrainer(sae).step(buffer.sample(4, torch.Generator().manual_seed(1)).batch)
    assert sae.input_scale > 0
    gathered, gather = [], buffer.gather
    buffer.gather = lambda slots: gathered.append(len(slots)) or gather(slots)

    whole = encode_buffer(sae, buffer, 1).tensors("final")
    assert gathered == [10]
    gathered.clear()
    sae.cfg = replace(sae.cfg, encode_chunk_mib=1)  # a slot's two fp32 copies: 0.5 MiB
    parts = encode_buffer(sae, buffer, 1).tensors("final")
    assert gathered == [2] * 5
    assert parts.keys() == whole.keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)


def test_the_activation_log_merges_its_blocks_and_keeps_every_sample():
    """A long run adds thousands of small blocks of codes; the log merges them (64 at a time)
    and gives back every sample, in order, as the plain concatenation would (widths vary
    under batch_topk: padded with value-0 entries)."""
    from sae_shards.capture.runner import ActivationLog, stack_codes
    from sae_shards.core.sparsity import SparseCodes

    gen = torch.Generator().manual_seed(0)
    log, added = ActivationLog(), []
    for i in range(300):
        n, width = 1 + i % 3, 2 + i % 4
        codes = SparseCodes(torch.randint(16, (n, width), generator=gen),
                            torch.randn(n, width, generator=gen))
        log.add([i] * n, 1000 + i, codes, events=list(range(n)))
        added.append(codes)
    assert len(log.codes) <= 300 // 64 + 64 and len(log) == sum(c.indices.shape[0] for c in added)
    got, want = log.tensors("online"), stack_codes(added)
    assert torch.equal(got["online.indices"], want.indices)
    assert torch.equal(got["online.values"], want.values)
    assert got["online.rl_step"].tolist() == [i for i in range(300) for _ in range(1 + i % 3)]
    assert got["online.event"].tolist() == [e for i in range(300) for e in range(1 + i % 3)]
    again = ActivationLog.from_tensors(got, "online")
    assert all(torch.equal(again.tensors("online")[k], v) for k, v in got.items())
    assert ActivationLog().tensors("x")["x.rl_step"].shape == (0,)


def test_the_thread_runner_trains_the_same_sae_however_far_rl_gets_ahead():
    """Two thread runs of the same pushes: in one RL waits for the worker after every push, in
    the other the worker dawdles, so RL runs max_lag pushes ahead and wraps the ring under it.
    Each push's batches draw on the buffer as it was at that push: the same SAE, bit for bit."""
    import time

    from sae_shards.capture.runner import ThreadRunner

    def run(worker_dawdles: bool) -> tuple[dict[str, torch.Tensor], list[int]]:
        buffer = DeltaRingBuffer(TARGETS, capacity=8, device="cpu")
        trainer = SAETrainer(LowRankSAE(TARGETS, SAEConfig(n_latents=4, k=1, batch_size=4)))
        cfg = RunnerConfig(concurrency="thread", sae_steps_per_rl_step=3, min_samples=2, max_lag=3)
        loop = SAEWorkLoop(trainer, buffer, cfg, torch.Generator().manual_seed(0))
        process = loop.process
        if worker_dawdles:
            loop.process = lambda *push: (time.sleep(0.02), process(*push))
        runner = ThreadRunner(loop, cfg.max_lag, timeout_s=30)
        g = torch.Generator().manual_seed(1)
        for step in range(1, 31):
            delta = {t.name: torch.randn(t.shape, generator=g) for t in TARGETS}
            runner.on_push(buffer.push(delta, StepMeta(step, heldout=step % 5 == 0)))
            if not worker_dawdles:
                runner.wait_idle()
        runner.finish()
        return ({k: v.clone() for k, v in trainer.sae.state_dict().items()},
                list(loop.activations.sae_step))

    steady, steady_log = run(worker_dawdles=False)
    behind, behind_log = run(worker_dawdles=True)
    assert steady_log == behind_log
    assert steady.keys() == behind.keys()
    same = lambda a, b: torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)  # noqa: E731
    assert [k for k in steady if not same(steady[k], behind[k])] == []


def _ended_worse_than_the_mean(runner: RunnerConfig, fvu: float = 1.5,
                               precision_note: str | None = None) -> str | None:
    """``summary.json``'s warning for an SAE whose last FVU is ``fvu`` (stand-ins for the run's
    parts: 10 SAE steps); ``precision_note``: the capture's (16-bit targets)."""
    from types import SimpleNamespace as NS

    from sae_shards.capture.summary import run_summary

    stats = NS(dead_frac=lambda dead_after: None, fire_count=torch.zeros(4), n_samples=40)
    trainer = NS(n_steps=10, n_rejected_nonfinite=0, n_skipped_zero=0, n_skipped_degenerate=0,
                 stats=stats)
    parts = NS(trainer=trainer, sae=NS(cfg=SAEConfig(n_latents=4, k=1)),
               loop=NS(last_rl_step=20, budget=None))
    capture = NS(n_captured=20, n_zero=0, n_nonfinite=0, n_outliers=0, n_skipped=0,
                 precision_note=precision_note)
    return run_summary(parts, capture, runner, [0.5] * 20, [fvu] * 10, {}).get("warning")


def test_a_16_bit_targets_note_reaches_the_summary_beside_another_warning():
    """Said only in the start-up log before: a reader of summary.json and the report learns
    that the captured updates are what survived bf16 rounding."""
    note = "capture.source=update: 2 of the targets (...) are stored in bfloat16"
    assert _ended_worse_than_the_mean(RunnerConfig(), fvu=0.5) is None
    assert _ended_worse_than_the_mean(RunnerConfig(), fvu=0.5, precision_note=note) == note
    both = _ended_worse_than_the_mean(RunnerConfig(), precision_note=note)
    assert "worse than their mean" in both and both.endswith(f". Also: {note}")


def test_an_sae_worse_than_the_mean_under_a_budget_is_told_to_raise_the_budget():
    """With ``runner.sae_budget`` the budget sets the SAE's steps and ``sae_steps_per_rl_step``
    is not used: the warning names the budget, not the field that would change nothing."""
    fixed = _ended_worse_than_the_mean(RunnerConfig())
    assert "worse than their mean" in fixed and "runner.sae_steps_per_rl_step)" in fixed
    budget = _ended_worse_than_the_mean(RunnerConfig(sae_budget=0.3))
    assert "a larger runner.sae_budget=0.3" in budget
    assert "runner.sae_steps_per_rl_step is not used with a budget" in budget


EXITS_WITH_A_BUSY_WORKER = """
import threading, torch
from sae_shards.capture.buffer import DeltaRingBuffer, StepMeta
from sae_shards.capture.runner import SAEWorkLoop, ThreadRunner
from sae_shards.core.sae import LowRankSAE
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import TargetSpec
from sae_shards.core.trainer import SAETrainer
from sae_shards.run.config import RunnerConfig

torch.set_num_threads(1)
targets = [TargetSpec("w", (6, 5), rank=1)]
buffer = DeltaRingBuffer(targets, capacity=16, device="cpu")
trainer = SAETrainer(LowRankSAE(targets, SAEConfig(n_latents=4, k=1, batch_size=4)))
loop = SAEWorkLoop(trainer, buffer, RunnerConfig(max_lag=2), torch.Generator().manual_seed(0))
started, a = threading.Event(), torch.randn(256, 256)

def slow_sae_step(*push):  # torch ops that release the GIL, ~0.5 s in all
    started.set()
    for _ in range(200):
        a @ a

loop.process = slow_sae_step
runner = ThreadRunner(loop, max_lag=2, timeout_s=60)
for step in (1, 2):
    runner.on_push(buffer.push({"w": torch.randn(6, 5)}, StepMeta(step)))
started.wait(10)
raise RuntimeError("trainer.train() raised")
"""


def test_a_script_that_fails_while_the_worker_trains_exits_with_its_error_not_an_abort():
    """A script's trainer.train() that raises (a reward function's bug, a second SIGTERM) ends
    the process without ShardCallback.close(). The thread worker, still inside torch, used to
    be ended by the interpreter's exit: SIGABRT ('terminate called without an active
    exception', exit status 134, a core dump where enabled) after the script's traceback. An
    atexit hook now stops it first: the script's own error and exit status 1."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", EXITS_WITH_A_BUSY_WORKER], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.rstrip().endswith("RuntimeError: trainer.train() raised")
    assert "terminate called" not in done.stderr


# ---- found by mutation testing (audit 121): each test below fails under a mutant of the code
# ---- that the rest of this file let pass

SMALL = [TargetSpec("w", (4, 3), rank=1), TargetSpec("b", (5,))]  # sample_of's shapes


def sample_of(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), float(step)), "b": torch.full((5,), float(step))}


def test_a_push_holds_the_samples_still_waiting_to_be_encoded():
    """RN01: ``first_read`` (what a thread-runner push holds in the ring) covers the samples of
    earlier pushes still waiting in ``_pending`` to be encoded (up to ``flush_every - 1``), not only
    the push's batch window: capacity 20, max_lag 1, pushes of 2 events (push_room allows 2)."""
    from sae_shards.capture.runner import SAEWorkLoop
    from sae_shards.core.sae import LowRankSAE
    from sae_shards.core.sae_config import SAEConfig
    from sae_shards.core.trainer import SAETrainer
    from sae_shards.run.config import RunnerConfig, flush_every, push_room

    cfg = RunnerConfig(max_lag=1)
    assert push_room(20, 1, threaded=True) == 2
    buffer = DeltaRingBuffer(SMALL, capacity=20, device="cpu")
    trainer = SAETrainer(LowRankSAE(SMALL, SAEConfig(n_latents=4, k=1, batch_size=4)))
    loop = SAEWorkLoop(trainer, buffer, cfg, torch.Generator().manual_seed(0))
    for _ in range(100):
        buffer.push(sample_of(1), StepMeta(1))
    window = buffer.window(reserve=(cfg.max_lag + 1) * 2)
    pending_from = window.end - 2 - (flush_every(20, 1) - 1)  # the oldest sample not yet encoded
    assert loop.first_read(window, 2) <= pending_from < window.start


def test_last_rl_step_never_goes_back():
    """RN03: ``reached`` is called by the RL thread for every step and by a lagging worker for the
    steps it processes: ``last_rl_step`` (checkpoints' and summary's rl_step) never goes back."""
    from sae_shards.capture.runner import SAEWorkLoop
    from sae_shards.core.sae import LowRankSAE
    from sae_shards.core.sae_config import SAEConfig
    from sae_shards.core.trainer import SAETrainer
    from sae_shards.run.config import RunnerConfig

    buffer = DeltaRingBuffer(SMALL, capacity=8, device="cpu")
    trainer = SAETrainer(LowRankSAE(SMALL, SAEConfig(n_latents=4, k=1, batch_size=4)))
    loop = SAEWorkLoop(trainer, buffer, RunnerConfig(), torch.Generator().manual_seed(0))
    loop.reached(5)  # the RL thread
    loop.process(buffer.push(sample_of(3), StepMeta(3)))  # the worker, two pushes behind
    assert loop.last_rl_step == 5


def test_the_online_log_encodes_each_sample_under_the_sae_it_arrived_at():
    """RN06: before a push's SAE steps, the samples so far are encoded (the ``online`` activation
    log: each sample under the SAE as it was when it arrived), not later under a trained-on SAE."""
    from sae_shards.capture.runner import SAEWorkLoop
    from sae_shards.core.sae import LowRankSAE
    from sae_shards.core.sae_config import SAEConfig
    from sae_shards.core.trainer import SAETrainer
    from sae_shards.run.config import RunnerConfig

    buffer = DeltaRingBuffer(SMALL, capacity=64, device="cpu")  # flush_every: 60
    trainer = SAETrainer(LowRankSAE(SMALL, SAEConfig(n_latents=4, k=1, batch_size=4)))
    cfg = RunnerConfig(min_samples=1, sae_start_step=0, sae_steps_per_rl_step=1)
    loop = SAEWorkLoop(trainer, buffer, cfg, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    arrived = {}  # RL step -> the SAE's step count when its sample arrived
    for step in range(1, 9):
        arrived[step] = trainer.n_steps
        loop.process(buffer.push({t.name: torch.randn(t.shape, generator=g) for t in SMALL},
                                 StepMeta(step)))
    loop.flush_activations()
    logged = dict(zip(loop.activations.rl_step, loop.activations.sae_step))
    assert len(logged) >= 4 and trainer.n_steps >= 4
    assert logged == {step: arrived[step] for step in logged}


def test_the_thread_worker_releases_each_pushs_hold():
    """``ThreadRunner`` holds the samples a push's worker may read (``buffer.hold``) and the
    worker releases the hold when done with the push; a hold left behind makes RL wait forever
    to overwrite the ring once it wraps, with the worker idle, so no timeout fires (audit 124,
    RN07: the suite hung). Three rings' worth of pushes, RL waiting for the worker after each,
    must finish at once."""
    from sae_shards.capture.runner import ThreadRunner

    buffer = DeltaRingBuffer(SMALL, capacity=8, device="cpu")
    trainer = SAETrainer(LowRankSAE(SMALL, SAEConfig(n_latents=4, k=1, batch_size=4)))
    cfg = RunnerConfig(concurrency="thread", max_lag=2, min_samples=2, sae_steps_per_rl_step=1)
    loop = SAEWorkLoop(trainer, buffer, cfg, torch.Generator().manual_seed(0))
    runner = ThreadRunner(loop, cfg.max_lag, timeout_s=30)
    done = []

    def rl():
        for step in range(1, 25):
            runner.on_push(buffer.push(sample_of(step), StepMeta(step)))
            runner.wait_idle()
        done.append(True)

    thread = threading.Thread(target=rl, daemon=True)
    thread.start()
    thread.join(timeout=20)
    stuck = thread.is_alive()
    if stuck:  # unblock it, so the test ends either way
        buffer.release_all()
        thread.join(timeout=20)
    runner.finish()
    assert not stuck, "RL waited on a hold the idle worker never released"
    assert done and loop.last_rl_step == 24 and trainer.n_steps > 0
