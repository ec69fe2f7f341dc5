"""Benchmark setup: one intra-op thread (the machine's cores are shared), restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run each case on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
