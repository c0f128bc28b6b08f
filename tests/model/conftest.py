"""Model tests run single-threaded: at d_model = 64 every matmul is ~10 us of work, and two OpenMP
threads spinning on a shared 2-core machine made a training step 10x slower (0.4 s vs 0.04 s)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
