"""Eager per-call overhead of the Python <-> C++ kernel boundary on CPU: tiny calls (T = 1..16 rows,
H = 64) where the kernel itself costs well under a microsecond, so the time is the launcher's Python,
the marshalling of the arguments into the compiled module and the output allocations.

Each case calls a backend launcher (the function an op runs in eager mode once it has validated its
arguments) with the CPU backend. Run: pytest bench/test_boundary_bench.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from compass_kernels import _ext, fp8, routing, use_backend

H, E, K = 64, 8, 2
ROWS = [1, 4, 16]

pytestmark = pytest.mark.skipif(_ext.cpu_module is None, reason="compass_kernels._cpu not built")


def _inputs(T):
    ids = torch.rand(T, E).argsort(dim=1)[:, :K].contiguous()
    probs = torch.softmax(torch.randn(T, K), -1)
    x = torch.randn(T, H)
    row, tpe, off = routing._route_impl(ids, E, -1, 1)
    y = routing._permute_impl(x, row, off, tpe, T * K)
    return ids, probs, x, row, tpe, off, y


def _case(name, T):
    ids, probs, x, row, tpe, off, y = _inputs(T)
    R = T * K
    return {
        "route": (routing._route_impl, (ids, E, -1, 1)),
        "permute": (routing._permute_impl, (x, row, off, tpe, R)),
        "unpermute": (routing._unpermute_impl, (y, row, probs)),
        "unpermute_bwd": (routing._unpermute_bwd_impl, (x, y, row, off, tpe, probs)),
        "quantize_fp8": (fp8._quantize_impl, (x, "row", 128, torch.float8_e4m3fn)),
    }[name]


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("op", ["route", "permute", "unpermute", "unpermute_bwd", "quantize_fp8"])
def test_tiny_call(benchmark, op, T):
    fn, args = _case(op, T)
    benchmark.group = f"boundary-{op}"
    benchmark.extra_info.update(op=op, T=T, H=H)
    with use_backend("cpu"):
        out = benchmark(fn, *args)
        ref_backend = "torch"
        with use_backend(ref_backend):
            ref = fn(*args)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.float(), b.float()
        torch.testing.assert_close(a, b)
