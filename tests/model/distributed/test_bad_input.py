"""Bad input for distributed training: a world that is not dp x ep, experts that do not split over
ep, a rank killed mid-step (the run ends with an error, no hang), resuming with another preset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compass_model.train.parallel import check_layout

from train_runs import CFG, free_port, launch


def test_check_layout_errors():
    check_layout(2, 2, 4, 16)
    with pytest.raises(ValueError, match=r"--dp 2 x --ep 2 = 4 ranks, but torchrun started 2 processes"):
        check_layout(2, 2, 2)
    with pytest.raises(ValueError, match=r"num_experts \(16\) must be divisible by the expert-parallel size \(3\)"):
        check_layout(1, 3, 3, 16)
    with pytest.raises(ValueError, match="--dp must be an int >= 1"):
        check_layout(0, 2, 0)


def test_world_not_dp_times_ep(tmp_path):
    r = launch(tmp_path, "bad", 2, "--dp", "2", "--ep", "2", check=False)
    assert r.returncode != 0
    assert "--dp 2 x --ep 2 = 4 ranks, but torchrun started 2 processes" in r.stderr


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


def test_rank_killed_mid_run_ends_the_run(tmp_path):
    """SIGKILL one of two training ranks after its first step: torchrun stops the other and exits
    with an error naming the failed rank, well inside the time limit (no hang in a collective)."""
    cfg = json.loads(json.dumps(CFG))
    cfg["stages"][0]["steps"] = 200
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "compass_model.cli", "train", "--config", str(cfg_file), "--stages", "general", "--no-eval",
           "--no-progress", "--out", str(out), "--ep", "2"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=90)
        assert time.monotonic() - t0 < 90
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "SIGKILL" in err or "Signal 9" in err, err[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) < 200


def test_resume_with_another_preset(tmp_path):
    one = json.loads(json.dumps(CFG))
    one["stages"][0]["steps"] = 2
    launch(tmp_path, "run", 0, "--stop-after", "1", cfg=one)
    other = json.loads(json.dumps(one))
    other["model"]["d_model"] = 32
    r = launch(tmp_path, "run", 0, "--resume", cfg=other, check=False)
    assert r.returncode != 0
    assert "belongs to a run with another model config or seed (d_model 64 -> 32" in r.stderr, r.stderr[-2000:]
