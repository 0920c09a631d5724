"""Shared test setup."""

import logging
import os
import shutil

import pytest
import torch

SLOW_HINT = ("tests marked slow (end-to-end: distributed launches, Hydra sweeps, the learning "
             "checks of the default job and of per-event planted capture, the kill-and-resume "
             "runs of the thread runner and of per-event capture, gpu_check.sh's CPU smoke run) "
             "were left out of this default run; `python -m pytest -q -m slow` runs them, "
             "`python -m pytest -q tests` runs everything (CI runs both halves)")


def _default_run(config: pytest.Config) -> bool:
    """No test paths and no ``-m`` given: the default suite, which leaves the slow tests out.
    Naming a file, a test or ``tests`` runs what is named; ``-m`` picks by mark."""
    return (config.args_source == pytest.Config.ArgsSource.TESTPATHS
            and not config.option.markexpr)


HEAVY_FIRST = ("test_resume.py", "test_callback.py", "test_write_failures.py",
               "test_planted_events.py", "test_evaluate.py", "test_job.py",
               "test_event_pipeline.py", "test_cli.py", "test_configs.py")
"""The longest files of the default run (150 s down to 30 s of one worker's time, measured with
--durations=0), handed to the xdist workers first (each file goes to one worker, in collection
order): the short files then fill the end, instead of one worker running a long file alone at
the end while the other idles."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # stable: the same order on every worker, as xdist requires
    items.sort(key=lambda item: HEAVY_FIRST.index(item.path.name)
               if item.path.name in HEAVY_FIRST else len(HEAVY_FIRST))
    if not _default_run(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if _default_run(config):
        terminalreporter.write_line(SLOW_HINT)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_session():
    # Tiny tensors: extra threads only add synchronisation, and on a loaded 2-core machine they
    # slow the suite several-fold. The product sets its thread counts explicitly too. Session
    # scope, so session fixtures (short_run_dir) also run on one thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Per test: one thread, and whatever thread count a test (or the code it runs) sets is undone
    # afterwards, so it cannot slow the tests that follow.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _sae_shards_logging_restored():
    # A test that plays a rank other than 0 (RANK=1) runs code that quiets sae-shards' logger
    # and labels the root handlers for the rest of the process, as a real rank should: undone
    # afterwards, so the tests that follow still see sae-shards' records.
    from sae_shards.capture import distributed

    package, root = logging.getLogger("sae_shards"), logging.getLogger()
    level, formats = package.level, {h: h.formatter for h in root.handlers}
    holds = distributed._quiet_holds
    yield
    package.setLevel(level)
    distributed._quiet_holds = holds
    for handler, fmt in formats.items():
        handler.setFormatter(fmt)


@pytest.fixture(scope="session")
def short_run_dir(tmp_path_factory):
    """A finished 12-step run of the real job (tiny model, 16 latents), shared by analysis tests
    (which only read it, or copy it first). Under xdist the workers share one run: the first to
    need it trains it under a file lock, the others wait for it and read the same directory (each
    worker trained its own, ~13 s, before)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process (-n 0)
        return _train_short_run(tmp_path_factory.mktemp("short_run"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the same for every worker of this session
    out, done = shared / "short_run", shared / "short_run.done"
    with FileLock(str(shared / "short_run.lock")):
        if not done.is_file():  # none yet, or a worker failed halfway: train it (again)
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            _train_short_run(out)
            done.touch()
    return out


def _train_short_run(out):
    from hydra import compose, initialize_config_dir

    from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
    from sae_shards.run.job import run_job

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "rl.max_steps=12", "runner.min_samples=4", "runner.sae_steps_per_rl_step=2",
            "task.n_prompts=64", "logging=disabled", "sae.n_latents=16"]))
    run_job(cfg, out)
    return out
