"""GPU tests: every GPU backend against the reference on CUDA tensors, CUDA graphs, compile.

Skipped without a CUDA device. Run on a GPU machine with TRITON_INTERPRET=0 (bench/gpu_check.sh).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import compass_kernels as ck
from compass_kernels import _backend
from compass_kernels.grouped_gemm_ref import grouped_gemm_ref, grouped_gemm_wgrad_ref
from compass_kernels.routing_ref import permute_ref, route_ref, unpermute_bwd_ref, unpermute_ref
from helpers import make_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
gg = importlib.import_module("compass_kernels.grouped_gemm")
DEV = "cuda"


def _gpu_backends(op):
    return [b for b in ("cuda", "triton") if _backend.backend_status(b, "cuda")[0]
            and b in _backend._registry.impls.get(op, ())]


@pytest.mark.parametrize("backend", _gpu_backends("route") or ["none"])
@pytest.mark.parametrize("T,k,E,kind,capacity,align", [
    (0, 2, 16, "uniform", None, 1), (1, 2, 16, "uniform", None, 1), (4099, 2, 16, "skewed", None, 1),
    (40009, 8, 128, "skewed", 300, 16), (777, 4, 16, "holes", 5, 8), (100003, 2, 16, "one", None, 1),
    (1000, 2, 1500, "uniform", None, 1),
])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_route_permute_unpermute(backend, T, k, E, kind, capacity, align, ids_dtype):
    if backend == "none":
        pytest.skip("no GPU backend built")
    ids = make_ids(T, k, E, kind, dtype=ids_dtype).to(DEV)
    x = torch.randn(T, 257, device=DEV, dtype=torch.bfloat16)
    probs = torch.rand(T, k, device=DEV)
    with ck.use_backend(backend):
        plan = ck.route(ids, E, capacity=capacity, align=align)
        for _ in range(2):  # deterministic
            again = ck.route(ids, E, capacity=capacity, align=align)
            assert torch.equal(again.row_id_map, plan.row_id_map)
        xp, pp = ck.permute(x, plan, probs=probs)
        out = ck.unpermute(xp, plan, probs)
    row, tpe, off = route_ref(ids.cpu(), E, capacity, align)
    assert torch.equal(plan.row_id_map.cpu(), row) and torch.equal(plan.tokens_per_expert.cpu(), tpe)
    assert torch.equal(plan.expert_offsets.cpu(), off)
    assert torch.equal(xp.cpu(), permute_ref(x.cpu(), row, plan.num_rows))
    assert torch.equal(out.cpu(), unpermute_ref(xp.cpu(), row, probs.cpu()))  # same order, no FMA
    g = torch.randn(T, 257, device=DEV, dtype=torch.bfloat16)
    with ck.use_backend(backend):
        gy, gp = torch.ops.compass.unpermute_bwd(g, xp, plan.row_id_map, plan.expert_offsets,
                                                 plan.tokens_per_expert, probs)
    ry, rp = unpermute_bwd_ref(g.cpu(), xp.cpu(), row, probs.cpu())
    assert torch.equal(gy.cpu(), ry)
    torch.testing.assert_close(gp.cpu(), rp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", _gpu_backends("permute") or ["none"])
def test_routing_cuda_graph_capture(backend):
    if backend == "none":
        pytest.skip("no GPU backend built")
    T, E, k, H = 4096, 16, 2, 512
    ids = make_ids(T, k, E, "skewed").to(DEV)
    x = torch.randn(T, H, device=DEV)
    probs = torch.rand(T, k, device=DEV)
    with ck.use_backend(backend):
        def step():
            plan = ck.route(ids, E, align=8)
            return ck.unpermute(ck.permute(x, plan), plan, probs)
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        ids.copy_(make_ids(T, k, E, "uniform").to(DEV))  # new routing, same graph
        graph.replay()
        torch.cuda.synchronize()
        want = step()
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("backend", _gpu_backends("grouped_gemm") or ["none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("sizes", [[0, 0, 0], [1000, 0, 37, 3000], [1, 2, 3, 5, 7, 11, 13, 17], [5000]])
def test_grouped_gemm(backend, dtype, trans_b, sizes):
    if backend == "none":
        pytest.skip("no GPU backend built")
    E, K, N = len(sizes), 256, 384
    M = sum(sizes) + 9                                          # 9 rows past the groups: must be zero
    offsets = torch.tensor([0] + sizes, device=DEV).cumsum(0)
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    w = (torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)).to(DEV, dtype) / K**0.5
    with ck.use_backend(backend):
        y = ck.grouped_gemm(x, w, offsets, trans_b=trans_b)
        dy = torch.randn(M, N, device=DEV, dtype=dtype)
        dw = gg._wgrad_op(x, dy, offsets, E, trans_b)
    exact = grouped_gemm_ref(x.double(), w.double(), offsets, trans_b)
    plain = grouped_gemm_ref(x, w, offsets, trans_b).double()
    assert (y.double() - exact).abs().max() <= 2 * (plain - exact).abs().max() + 1e-3
    assert y[-9:].eq(0).all()
    wexact = grouped_gemm_wgrad_ref(x.double(), dy.double(), offsets, E, trans_b)
    wplain = grouped_gemm_wgrad_ref(x, dy, offsets, E, trans_b).double()
    assert (dw.double() - wexact).abs().max() <= 2 * (wplain - wexact).abs().max() + 1e-3


@pytest.mark.skipif("cuda" not in _gpu_backends("grouped_gemm"), reason="compass_kernels._cuda not built")
@pytest.mark.parametrize("tile", ["128x128", "128x256"])
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_cuda_tiles(tile, trans_b, monkeypatch):
    """Both compiled forward tiles (forced with COMPASS_GEMM_TILE) on ragged groups, N not a
    multiple of 256, rows past the last group."""
    monkeypatch.setenv("COMPASS_GEMM_TILE", tile)
    sizes, K, N = [300, 0, 1, 129, 700], 192, 392
    E, M = len(sizes), sum(sizes) + 5
    offsets = torch.tensor([0] + sizes, device=DEV).cumsum(0)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)).to(DEV, torch.bfloat16) / K**0.5
    with ck.use_backend("cuda"):
        y = ck.grouped_gemm(x, w, offsets, trans_b=trans_b)
    exact = grouped_gemm_ref(x.double(), w.double(), offsets, trans_b)
    plain = grouped_gemm_ref(x, w, offsets, trans_b).double()
    assert (y.double() - exact).abs().max() <= 2 * (plain - exact).abs().max() + 1e-3
    assert y[-5:].eq(0).all()


def test_moe_chain_compiles_fullgraph_on_gpu():
    E, k, H, F = 16, 2, 256, 512
    w1 = torch.randn(E, H, F, device=DEV, dtype=torch.bfloat16) / H**0.5

    def moe(x, ids, probs):
        plan = ck.route(ids, E)
        h = ck.grouped_gemm(ck.permute(x, plan), w1, plan.expert_offsets)
        return ck.unpermute(torch.relu(h)[:, :H], plan, probs)

    x = torch.randn(1024, H, device=DEV, dtype=torch.bfloat16)
    ids = make_ids(1024, k, E, "skewed").to(DEV)
    probs = torch.rand(1024, k, device=DEV)
    torch._dynamo.reset()
    out = torch.compile(moe, fullgraph=True)(x, ids, probs)
    torch.testing.assert_close(out, moe(x, ids, probs))
