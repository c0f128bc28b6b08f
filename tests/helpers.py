"""Test helpers: the repository root, routing patterns and a plain-loop oracle for route."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compass_kernels import _backend
from compass_kernels.benchmarking.inputs import topk_ids as make_ids  # noqa: F401 - the tests' routing patterns

REPO_ROOT = Path(__file__).resolve().parents[1]   # the checkout these tests belong to


def run_python(code: str) -> str:
    """stdout of ``python -c code`` in a fresh interpreter at the repository root (fails on a nonzero exit)."""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a conftest.py to run its folder's tests single-threaded: at d_model = 64 every
    matmul is ~10 us of work, and two OpenMP threads spinning on a shared 2-core machine made a
    training step 10x slower (0.4 s vs 0.04 s). Module scope: it also covers module fixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cpu_backends() -> list[str]:
    """Backends that serve CPU tensors in this process (triton only under TRITON_INTERPRET=1)."""
    return [b for b in ("torch", "cpu", "triton") if _backend.backend_status(b, "cpu")[0]]


def route_oracle(topk_ids: torch.Tensor, E: int, capacity=None, align: int = 1):
    """A plain Python loop: the independent oracle for route (and for route_ref itself)."""
    T, k = topk_ids.shape
    ids = topk_ids.tolist()
    count = [0] * E
    rank = [[-1] * k for _ in range(T)]
    for t in range(T):
        for j in range(k):
            e = ids[t][j]
            if e >= 0:
                rank[t][j] = count[e]
                count[e] += 1
    kept = [c if capacity is None else min(c, capacity) for c in count]
    off = [0]
    for e in range(E):
        off.append(off[-1] + (kept[e] + align - 1) // align * align)
    row = [[-1] * k for _ in range(T)]
    for t in range(T):
        for j in range(k):
            e = ids[t][j]
            if e >= 0 and (capacity is None or rank[t][j] < capacity):
                row[t][j] = off[e] + rank[t][j]
    return (torch.tensor(row, dtype=torch.int64).reshape(T, k), torch.tensor(kept, dtype=torch.int64),
            torch.tensor(off, dtype=torch.int64))


def skip_missing_triton(backend: str) -> None:
    """Skip a Triton-backend case when the Triton FP8 kernels are not built."""
    import importlib

    if backend == "triton" and not importlib.import_module("compass_kernels.fp8")._TRITON:
        pytest.skip("compass_kernels.triton.fp8 is not built yet")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a 1- or 4-byte tensor (for bit-exact comparisons)."""
    return t.view({1: torch.uint8, 4: torch.int32}[t.element_size()])
