"""bench/test_hf_bench.py still runs: quick mode (tiny shapes), timing off, in a subprocess (bench/
has its own conftest and sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import compass_kernels
from helpers import REPO_ROOT

pytest.importorskip("transformers", minversion="5")

ROOT = REPO_ROOT


def test_hf_bench_runs_in_quick_mode():
    pkg_root = str(Path(compass_kernels.__file__).resolve().parents[1])
    env = {**os.environ, "COMPASS_BENCH_QUICK": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench/test_hf_bench.py"), "--benchmark-disable",
         "-p", "no:cacheprovider", "-q"],
        check=False, cwd=ROOT / "bench", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "24 passed" in proc.stdout      # 4 shapes x 3 providers x 2 passes; the floors skip
