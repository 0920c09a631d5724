"""Shared test setup."""

import pytest
import torch


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


@pytest.fixture(scope="session")
def short_run_dir(tmp_path_factory):
    """A finished 12-step run of the real job (tiny model, 16 latents), shared by analysis tests."""
    from hydra import compose, initialize_config_dir

    from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
    from sae_shards.run.job import run_job

    out = tmp_path_factory.mktemp("short_run")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "rl.max_steps=12", "runner.min_samples=4", "runner.sae_steps_per_rl_step=2",
            "task.n_prompts=64", "logging=disabled", "sae.n_latents=16"]))
    run_job(cfg, out)
    return out
