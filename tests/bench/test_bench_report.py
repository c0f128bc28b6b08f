"""bench/report.py: ratios from a pytest-benchmark JSON, the baseline check, and --update-baseline
merging (a partial run replaces only the ratios it measured)."""

from __future__ import annotations

import json
import subprocess
import sys
from helpers import REPO_ROOT

ROOT = REPO_ROOT


def _case(impl, kind, median, nbytes=1000):
    return {"extra_info": {"pass_": "quant", "shape": "8x8-bf16", "kind": kind, "impl": impl, "bytes": nbytes},
            "stats": {"median": median}}


def _run(tmp_path, *extra):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"benchmarks": [
        _case("compass", "row", 2.0), _case("compass_kernel", "row", 1.25), _case("eager", "row", 10.0),
        _case("copy", "all", 1.0)]}))
    return subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(bench), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_update_baseline_merges(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"ot/other/speedup_vs_pot_loop": 7.0, "quant/8x8-bf16/row/speedup_vs_eager": 1.0}))
    proc = _run(tmp_path, "--baseline", str(base), "--update-baseline")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(base.read_text())
    assert got["ot/other/speedup_vs_pot_loop"] == 7.0                 # not measured here: kept
    assert got["quant/8x8-bf16/row/speedup_vs_eager"] == 5.0          # measured: replaced (10 / 2)
    assert got["quant/8x8-bf16/row/fraction_of_copy"] == 0.5          # new: added (1 / 2)
    assert got["quant/8x8-bf16/row/kernel_fraction_of_copy"] == 0.8   # the kernel alone (1 / 1.25)


def test_regression_is_reported(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"quant/8x8-bf16/row/speedup_vs_eager": 10.0}))
    proc = _run(tmp_path, "--baseline", str(base))
    assert proc.returncode == 1
    assert "REGRESSION quant/8x8-bf16/row/speedup_vs_eager: 5.00 < 0.75 * 10.00" in proc.stdout
