"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tiny tensors: extra threads only add synchronisation, and on a loaded 2-core machine they
    # slow the suite several-fold. The product sets its thread counts explicitly too.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
