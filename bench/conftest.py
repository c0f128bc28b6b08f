"""Benchmark fixtures. Run: pytest bench --benchmark-only --benchmark-json out/bench.json

Each case records the bytes it must move (extra_info["bytes"], from compass_kernels.benchmarking.models,
whose inputs, peers and timers the suites share with the GPU scripts); bench/report.py turns the JSON into
GB/s, fractions of the copy ceiling and ratios to the peers, and checks them against the baseline.
COMPASS_BENCH_QUICK=1 shrinks the shapes of the suites that adopt bench/quick.py (CI: tests/bench/test_bench_quick.py).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from quick import QUICK  # noqa: E402

# Quick mode checks that the suites run, not their speed: one thread, because on a busy 2-core CI
# machine every OpenMP region of a tiny op can stall for a scheduler slice (~5 ms measured).
torch.set_num_threads(1 if QUICK else os.cpu_count() or 1)


def pytest_report_header(config):
    return "compass bench: quick mode (COMPASS_BENCH_QUICK=1), small shapes" if QUICK else None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _prefault_heap():
    """Grow the heap once before the first case: with bench/run_cpu.sh's GLIBC_TUNABLES, freed
    memory stays in the heap, so later 64-512 MiB outputs reuse faulted-in pages instead of the
    first cases of a run paying page faults round after round (7 -> 19-32 ms medians seen)."""
    if not QUICK:
        torch.empty(2048 << 20, dtype=torch.uint8).fill_(0)
    yield
