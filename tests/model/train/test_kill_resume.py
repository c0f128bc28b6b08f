"""A `compass train` process killed with SIGKILL mid-stage resumes with --resume: no finished step is
lost or repeated, and the resumed steps equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ARGS = ["train", "--preset", "tiny", "--stages", "general", "--steps", "40", "--no-eval", "--no-progress"]


def _cmd(out: Path, *extra):
    return [sys.executable, "-m", "compass_model.cli", *ARGS, "--out", str(out), *extra]


def _records(out: Path):
    """The complete lines of metrics.jsonl: while the trainer appends, a read can end mid-line."""
    p = out / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().split("\n")[:-1]] if p.exists() else []


def test_sigkill_then_resume(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    subprocess.run(_cmd(full), check=True, env=env, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(_records(killed)) < 12 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_records(killed))
    assert 0 < done_before < 40, done_before
    subprocess.run(_cmd(killed, "--resume"), check=True, env=env, capture_output=True, timeout=300)
    ref, got = _records(full), _records(killed)
    assert [r["step"] for r in got] == list(range(40))                   # none lost, none twice
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]          # bit-identical continuation
