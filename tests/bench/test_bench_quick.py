"""The benchmark suites still run: bench/ in quick mode (COMPASS_BENCH_QUICK=1, tiny shapes), timing off.

A subprocess, because bench/ has its own conftest and sys.path; a few seconds in all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import compass_kernels
from helpers import REPO_ROOT

ROOT = REPO_ROOT
QUICK_SUITES = ["bench/test_moe_layer_bench.py", "bench/test_routing_bench.py",      # suites that read
                "bench/test_grouped_gemm_bench.py", "bench/test_sort_chunks_bench.py",  # bench/quick.py
                "bench/test_fp8_bench.py"]


@pytest.mark.parametrize("suite", QUICK_SUITES)
def test_bench_suite_runs_in_quick_mode(suite):
    # The child imports the compass_kernels this process imported; run from bench/, so that a source
    # checkout without the built module cannot shadow an installed package (python -m puts the
    # working directory first on sys.path).
    pkg_root = str(Path(compass_kernels.__file__).resolve().parents[1])
    env = {**os.environ, "COMPASS_BENCH_QUICK": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / suite), "--benchmark-disable", "-p", "no:cacheprovider"],
        check=False, cwd=ROOT / "bench", env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "quick mode" in proc.stdout                     # the report header: the conftest saw the variable
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
