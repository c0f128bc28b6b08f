"""Benchmark fixtures. Run: pytest bench --benchmark-only --benchmark-json out/bench.json

Each case records the bytes it must move (extra_info["bytes"]); bench/report.py turns the JSON into
GB/s, fractions of the copy ceiling and ratios to the peers, and checks them against the baseline.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
