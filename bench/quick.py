"""Quick mode for the benchmark suites: ``COMPASS_BENCH_QUICK=1`` shrinks the shapes so a whole suite
runs in seconds (CI runs it with ``--benchmark-disable`` so the suites never rot). A suite adopts it
with ``from quick import QUICK, pick`` and ``T = pick(8192, 64)``."""

from __future__ import annotations

import os

QUICK = os.environ.get("COMPASS_BENCH_QUICK", "0").strip().lower() not in ("", "0", "false", "no")


def pick(full, quick):
    """``quick`` in quick mode, else ``full``."""
    return quick if QUICK else full
