"""The kernels' demo CLI: runs in this process (no re-exec), keeps freed memory in glibc's heap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

glibc = pytest.mark.skipif(sys.platform != "linux" or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
                           reason="mallopt settings are glibc's")


def _python(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


_FAULTS = """
import ctypes, resource, sys
from compass_kernels.cli import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "system")
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
n = 64 << 20   # above glibc's largest mmap threshold (32 MiB)
faults = []
for _ in range(4):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(*faults)
"""


@glibc
def test_keep_freed_memory_reuses_large_blocks():
    mode, *faults = _python(_FAULTS, "keep").split()
    assert mode == "mallopt"
    assert max(map(int, faults[1:])) < 1000, faults     # reused: no new pages
    mode, *faults = _python(_FAULTS, "system").split()
    assert min(map(int, faults)) > 8000, faults         # 64 MiB of fresh 4 KiB pages


def test_keep_freed_memory_leaves_the_users_tunables(monkeypatch):
    from compass_kernels.cli import keep_freed_memory

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    assert keep_freed_memory() == "GLIBC_TUNABLES"


def test_demo_runs_in_this_process():
    out = _python("import os, sys\n"
                  "def no_exec(*a):\n"
                  "    raise AssertionError('the demo re-executed python')\n"
                  "os.execve = os.execv = no_exec\n"
                  "from compass_kernels.cli import main\n"
                  "sys.exit(main(['demo', '--tokens', '64', '--hidden', '32', '--reps', '1']))\n")
    assert "malloc: " in out and "MISMATCH" not in out and out.count(" ok") == 4, out
