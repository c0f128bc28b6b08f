"""profiling/moe_breakdown.py on tiny shapes: the stage table, the JSON summary and the Chrome trace."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

ROOT = REPO_ROOT
STAGES = ["router", "permute", "expert_fc1", "activation", "expert_fc2", "unpermute", "other"]


@pytest.fixture(scope="module")
def breakdown(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof")
    cmd = [sys.executable, str(ROOT / "profiling" / "moe_breakdown.py"), "--tokens", "96", "--d-model", "32",
           "--ffn", "16", "--experts", "8", "--top-k", "2", "--iters", "2", "--threads", "1",
           "--trace", str(out / "trace.json"), "--json", str(out / "summary.json")]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "summary.json").read_text()), out / "trace.json"


def test_printed_table_names_every_stage(breakdown):
    stdout, _, _ = breakdown
    names = [line.split()[0].rstrip("*") for line in stdout.splitlines() if line.split()]
    for stage in STAGES:
        assert stage in names, stdout


def test_summary_stages_and_shares(breakdown):
    _, summary, _ = breakdown
    assert set(summary["paths"]) == {"naive", "fused"}
    for path, res in summary["paths"].items():
        assert list(res["stages"]) == STAGES, path
        shares = [s["share"] for s in res["stages"].values()]
        assert all(0.0 <= s <= 1.0 for s in shares), (path, shares)
        assert sum(shares) == pytest.approx(1.0, abs=1e-6), path
        assert res["total_ms"] > 0
        for stage in STAGES[:-1]:                         # every staged range was recorded
            assert res["stages"][stage]["ms"] > 0, (path, stage)
    assert summary["max_rel_diff"] < 1e-4                # both paths compute the same layer
    assert summary["shape"]["experts"] == 8 and summary["findings"]["naive_largest_stage"] in STAGES


def test_chrome_trace_has_the_nvtx_range_names(breakdown):
    _, _, trace = breakdown
    names = {ev.get("name") for ev in json.loads(trace.read_text())["traceEvents"]}
    assert {"compass.naive", "compass.fused", *STAGES[:-1]} <= names
