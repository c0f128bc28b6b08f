"""`torchrun ... compass train --ep N` on gloo: the same losses as one process (fp32, 1e-4), dense
checkpoints equal to the single-process ones, and a time-sliced EP run (--stop-after, then
--resume) continues exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

CFG = {"model": {"preset": "tiny", "aux_loss_coef": 0.0},
       "stages": [{"name": "general", "steps": 5, "rows": 4, "seq_len": 64, "warmup_steps": 1}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tmp_path, name, ep, *extra):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CFG))
    args = ["-m", "compass_model.cli", "train", "--config", str(cfg), "--stages", "general", "--no-eval",
            "--no-progress", "--out", str(tmp_path / name), *extra]
    if ep > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ep), "--master-port", str(_free_port()),
               *args, "--ep", str(ep)]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def _weights(tmp_path, name):
    return load_file(tmp_path / name / "checkpoints" / "general" / "step-000005" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep_train")
    return tmp, _train(tmp, "ep1", 1), _train(tmp, "ep2", 2)


def _check_same(tmp, one, many, name):
    assert [r["step"] for r in many] == list(range(5))
    for a, b in zip(one, many):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
    w1, wn = _weights(tmp, "ep1"), _weights(tmp, name)
    assert set(w1) == set(wn)                               # the EP checkpoint is the dense model
    for k in w1:
        torch.testing.assert_close(wn[k], w1[k], rtol=1e-3, atol=1e-5, msg=k)


def test_ep2_matches_one_process(runs):
    tmp, one, two = runs
    _check_same(tmp, one, two, "ep2")


@pytest.mark.slow
def test_ep4_matches_one_process(runs):
    tmp, one, _ = runs
    _check_same(tmp, one, _train(tmp, "ep4", 4), "ep4")


def test_ep_stop_and_resume(runs):
    tmp, _, full = runs
    _train(tmp, "sliced", 2, "--stop-after", "2")
    part = json.loads((tmp / "sliced" / "metrics.jsonl").read_text().splitlines()[-1])
    assert part["step"] == 1
    resumed = _train(tmp, "sliced", 2, "--resume")
    assert [r["step"] for r in resumed] == list(range(5))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
