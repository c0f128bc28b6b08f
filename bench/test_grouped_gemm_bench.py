"""Grouped GEMM on CPU fp32: ours vs a loop of torch.mm + torch.cat, torch._grouped_mm, and one dense
GEMM with the same FLOPs (the ceiling). efficiency = dense time / grouped time (bench/report.py).

Shapes: the Compass expert (E=16, M=16384, K=2048, N=1408) and its transpose (K=1408, N=2048, the
down projection), and a fine-grained one (E=128, M=16384, K=1024, N=256); uniform and skewed groups.
COMPASS_BENCH_QUICK=1: tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

import compass_kernels as ck
from compass_kernels.benchmarking.inputs import group_sizes, offsets_of
from compass_kernels.benchmarking.models import gemm_flops
from compass_kernels.benchmarking.peers import mm_cat
from quick import pick

SHAPES = {"compass_up": pick((16, 16384, 2048, 1408), (16, 256, 32, 24)),
          "compass_down": pick((16, 16384, 1408, 2048), (16, 256, 24, 32)),
          "fine": pick((128, 16384, 1024, 256), (128, 512, 16, 8))}


def _inputs(shape, kind):
    E, M, K, N = SHAPES[shape]
    x = torch.randn(M, K)
    w = torch.randn(E, K, N) / K**0.5
    return x, w, offsets_of(group_sizes(M, E, kind))   # skewed: Zipf 1.5 loads, as skewed routing produces


IMPLS = {
    "compass": lambda x, w, o: ck.grouped_gemm(x, w, o),
    "mm_cat": mm_cat,
    "torch_grouped_mm": lambda x, w, o: torch._grouped_mm(x, w, offs=o[1:].int()),
}


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLS) + ["dense"])
def test_grouped_gemm(benchmark, impl, shape, kind):
    E, M, K, N = SHAPES[shape]
    x, w, offsets = _inputs(shape, kind)
    benchmark.group = f"gemm-{shape}-{kind}"
    benchmark.extra_info.update(flops=gemm_flops(M, K, N), impl=impl, shape=shape, kind=kind, pass_="gemm")
    if impl == "dense":  # one GEMM of the same FLOPs into a preallocated output: the ceiling
        out = torch.empty(M, N)
        benchmark.pedantic(torch.mm, args=(x, w[0]), kwargs={"out": out}, rounds=3, warmup_rounds=1)
        return
    y = benchmark.pedantic(IMPLS[impl], args=(x, w, offsets), rounds=3, warmup_rounds=1)
    if impl == "compass":
        torch.testing.assert_close(y, mm_cat(x, w, offsets), rtol=1e-4, atol=1e-4)
