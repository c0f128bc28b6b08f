"""Launch ``compass train`` under torchrun (or in one process) for the distributed tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

STEPS = 4
# the default recipe (aux loss, z-loss) with the aux-loss-free bias update on, two micro-batches a step
CFG = {"model": {"preset": "tiny", "router_bias_rate": 1e-3},
       "stages": [{"name": "general", "steps": STEPS, "rows": 4, "grad_accum": 2, "seq_len": 64,
                   "warmup_steps": 1}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, name, world, *extra, cfg=CFG, check=True):
    """``compass train`` in ``world`` processes (torchrun) or one (world 0); returns the process."""
    cfg_file = tmp_path / f"cfg-{name}.json"
    cfg_file.write_text(json.dumps(cfg))
    args = ["-m", "compass_model.cli", "train", "--config", str(cfg_file), "--stages", "general", "--no-eval",
            "--no-progress", "--out", str(tmp_path / name), *extra]
    if world:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-port", str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


