"""sort_chunks on CPU fp32: ours vs the Megatron-style peer (torch.split + torch.cat in the sorted
order, which reads the chunk sizes on the host) and a copy of the same bytes (the ceiling).

The EP shape: after the token all-to-all at EP 8 with 16 experts, 8 source ranks x 2 local experts =
16 chunks, T = 16384 received rows, H = 2048. COMPASS_BENCH_QUICK=1: tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

import compass_kernels as ck
from compass_kernels.benchmarking.inputs import group_sizes
from compass_kernels.benchmarking.models import sort_chunks_bytes
from compass_kernels.benchmarking.peers import split_cat
from quick import pick

R, H, S = pick(16384, 256), pick(2048, 32), 16


def _chunks(kind):
    sizes = group_sizes(R, S, kind)
    # received order is (rank, local expert); expert-contiguous order is (local expert, rank)
    order = torch.arange(S).reshape(8, 2).t().reshape(-1)
    return sizes, order


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("impl", ["compass", "split_cat", "copy"])
def test_sort_chunks(benchmark, impl, kind):
    x = torch.randn(R, H)
    sizes, order = _chunks(kind)
    benchmark.group = f"sort_chunks-{kind}"
    benchmark.extra_info.update(bytes=sort_chunks_bytes(R, H, 4, S), impl=impl, shape=f"R{R}H{H}S{S}", kind=kind,
                                pass_="op")
    if impl == "copy":
        dst = torch.empty_like(x)
        benchmark.pedantic(dst.copy_, args=(x,), rounds=7, warmup_rounds=1)
        return
    fn = (lambda: ck.sort_chunks(x, sizes, order)) if impl == "compass" else (lambda: split_cat(x, sizes, order))
    out = benchmark.pedantic(fn, rounds=7, warmup_rounds=1)
    assert torch.equal(out, split_cat(x, sizes, order))
