"""GPU tests of the CUTLASS sm_90a grouped GEMMs (FP8 row / block scales and bf16), CUDA graphs and
the MoE layer's autograd. Skipped without a CUDA device; the FP8 and bf16 CUTLASS tests need the
built ``_cuda`` module and a Hopper GPU (bench/gpu_check.sh runs them there).

FP8 accuracy: Hopper's FP8 tensor cores keep ~14 bits inside each k-tile, so the element bound is
the tensor-core one of tests/fp8_bounds.py, plus DeepGEMM's calc_diff < 1e-3 and exact zeros
outside the groups.
"""

from __future__ import annotations

import pytest
import torch

import compass_kernels as ck
from compass_kernels import _ext
from compass_kernels.fp8 import GRANULARITY_CODES
from compass_kernels.fp8_ref import grouped_gemm_fp8_ref
from compass_kernels.grouped_gemm_ref import grouped_gemm_ref
from fp8_bounds import calc_diff, fp8_accumulation_bound

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"


def _hopper_cuda() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
            and _ext.cuda_module is not None and hasattr(_ext.cuda_module, "grouped_gemm_fp8"))


needs_cutlass = pytest.mark.skipif(not _hopper_cuda(), reason="needs compass_kernels._cuda on a Hopper GPU")


def _offsets(kind: str, M: int, E: int, gen) -> list[int]:
    """head: rows before the first group, an empty group, a one-row group, tail rows after the
    last; sparse: E groups of which ~40% are empty over all M rows."""
    if kind == "head":
        inner = M - 7 - 5
        cuts = sorted(torch.randint(0, inner, (E - 3,), generator=gen).tolist())
        sizes = [cuts[0]] + [b - a for a, b in zip(cuts, cuts[1:])] + [inner - cuts[-1] - 1]
        sizes = [sizes[0], 0, 1] + sizes[1:]  # an empty and a one-row group
        off = [7]
        for s in sizes:
            off.append(off[-1] + s)
        assert len(off) == E + 1 and off[-1] == M - 5
        return off
    live = torch.rand(E, generator=gen) >= 0.4
    live[0] = True
    w = torch.rand(E, generator=gen) * live
    sizes = (w / w.sum() * M).floor().long()
    sizes[int(live.nonzero()[0])] += M - int(sizes.sum())
    return [0] + sizes.cumsum(0).tolist()


def _fp8_case(xg, wg, M, K, N, E, kind, seed=0):
    gen = torch.Generator().manual_seed(seed + M + K + N + E)
    x = torch.randn(M, K, generator=gen)
    w = torch.randn(E, N, K, generator=gen) / K**0.5
    off = torch.tensor(_offsets(kind, M, E, gen) if M else [0] * (E + 1), dtype=torch.int64)
    qx = ck.quantize_fp8(x.to(DEV), granularity=xg)
    qw = ck.quantize_fp8(w.to(DEV), granularity=wg)
    return qx, qw, off.to(DEV)


def _check_fp8(y, qx, qw, off):
    xg, wg = qx.granularity, qw.granularity
    d = lambda t: t.cpu()  # noqa: E731
    o = d(off)
    ref = grouped_gemm_fp8_ref(d(qx.data), d(qx.scale), xg, d(qw.data), d(qw.scale), wg, o, 128,
                               torch.float64, torch.float64)
    ref_abs = grouped_gemm_fp8_ref(d(qx.data).float().abs().to(qx.data.dtype), d(qx.scale), xg,
                                   d(qw.data).float().abs().to(qw.data.dtype), d(qw.scale), wg, o, 128,
                                   torch.float64, torch.float64)
    got = y.cpu().double()
    assert torch.isfinite(got).all()
    bound = fp8_accumulation_bound(qx.shape[1], ref_abs, tensor_core=True) + 2.0**-8 * ref.abs() + 1e-30
    err = (got - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}"
    if ref.abs().sum() > 0:
        assert calc_diff(got, ref) < 1e-3
    outside = torch.cat([got[: int(o[0])], got[int(o[-1]):]])
    assert outside.eq(0).all(), "rows outside the groups must be exact zeros"


@needs_cutlass
@pytest.mark.parametrize("grans", [("row", "row"), ("block", "block2d")], ids="-".join)
@pytest.mark.parametrize("K,N", [(2048, 1408), (336, 400), (2048, 400), (336, 1408)])
@pytest.mark.parametrize("E,kind", [(8, "head"), (128, "sparse")])
def test_cutlass_fp8(grans, K, N, E, kind):
    xg, wg = grans
    qx, qw, off = _fp8_case(xg, wg, 4096, K, N, E, kind)
    served = _ext.cuda_module.grouped_gemm_fp8_supported(GRANULARITY_CODES[xg], GRANULARITY_CODES[wg], K, N,
                                                        _ext.dtype_code(torch.bfloat16))
    if (K, N) == (2048, 1408):
        assert served, f"the CUTLASS {xg}/{wg} instance must serve the Compass shape"
    with ck.use_backend("cuda"):
        y = ck.grouped_gemm_fp8(qx, qw, off)
        again = ck.grouped_gemm_fp8(qx, qw, off)
    assert torch.equal(y, again), "two runs must be bit-equal"
    _check_fp8(y, qx, qw, off)


@needs_cutlass
@pytest.mark.parametrize("grans", [("row", "row"), ("block", "block2d")], ids="-".join)
@pytest.mark.parametrize("M,K", [(0, 2048), (300, 0)])
def test_cutlass_fp8_empty(grans, M, K):
    xg, wg = grans
    E, N = 4, 1408
    x = torch.randn(M, K, device=DEV)
    w = torch.randn(E, N, K, device=DEV)
    off = torch.tensor([0, M // 3, M // 3, M // 2, M], device=DEV)
    qx, qw = ck.quantize_fp8(x, granularity=xg), ck.quantize_fp8(w, granularity=wg)
    with ck.use_backend("cuda"):
        y = ck.grouped_gemm_fp8(qx, qw, off)
    assert y.shape == (M, N) and y.eq(0).all()


@needs_cutlass
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("E,K,N", [(8, 200, 1408), (128, 1024, 256), (16, 2048, 1408)])
def test_cutlass_bf16_head_rows_and_odd_k(trans_b, E, K, N):
    """offsets[0] > 0, K not a multiple of 64, E = 128, an empty and a one-row group, tail rows."""
    gen = torch.Generator().manual_seed(E + K)
    M = 3000
    off = torch.tensor(_offsets("head", M, E, gen) if E <= 16 else _offsets("sparse", M, E, gen), device=DEV)
    if E > 16:  # shift the sparse groups to start after 11 head rows
        off = (off.clamp(max=M - 11) + 11).clone()
        off[0] = 11
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)).to(DEV, torch.bfloat16) / K**0.5
    assert _ext.cuda_module.grouped_gemm_supported(_ext.dtype_code(torch.bfloat16), trans_b, K, N)
    with ck.use_backend("cuda"):
        y = ck.grouped_gemm(x, w, off, trans_b=trans_b)
    exact = grouped_gemm_ref(x.double(), w.double(), off, trans_b)
    plain = grouped_gemm_ref(x, w, off, trans_b).double()
    assert (y.double() - exact).abs().max() <= 2 * (plain - exact).abs().max() + 1e-3
    o = off.tolist()
    assert y[: o[0]].eq(0).all() and y[o[-1]:].eq(0).all()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_grouped_gemm_cuda_graph_replay_with_new_offsets(backend):
    if not ck._backend.backend_status(backend, "cuda")[0]:
        pytest.skip(f"{backend} backend not available")
    E, M, K, N = 16, 2048, 512, 384
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(E, K, N, device=DEV, dtype=torch.bfloat16) / K**0.5
    off = torch.linspace(0, M, E + 1, device=DEV).long()
    with ck.use_backend(backend):
        ck.grouped_gemm(x, w, off)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ck.grouped_gemm(x, w, off)
        new = torch.tensor([5] + sorted(torch.randint(5, M - 3, (E - 1,)).tolist()) + [M - 3], device=DEV)
        off.copy_(new)  # new groups, same graph
        graph.replay()
        torch.cuda.synchronize()
        want = ck.grouped_gemm(x, w, off)
    assert torch.equal(y, want)


def test_moe_layer_autograd_on_gpu():
    from compass_model.config import CompassConfig
    from compass_model.moe import MoE

    torch.manual_seed(0)
    cfg = CompassConfig(d_model=256, num_experts=16, top_k=2, expert_ffn_dim=512)
    m = MoE(cfg).to(DEV)
    x = torch.randn(1024, 256, device=DEV, requires_grad=True)
    out = m(x)
    y = out[0] if isinstance(out, tuple) else out
    y.float().square().mean().backward()
    with ck.use_backend("torch"):
        x2 = x.detach().clone().requires_grad_(True)
        m2 = MoE(cfg).to(DEV)
        m2.load_state_dict(m.state_dict())
        out2 = m2(x2)
        y2 = out2[0] if isinstance(out2, tuple) else out2
        y2.float().square().mean().backward()
    torch.testing.assert_close(y, y2, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, x2.grad, rtol=5e-2, atol=1e-3)
    for (name, p), p2 in zip(m.named_parameters(), m2.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p2.grad, rtol=5e-2, atol=1e-3, msg=name)
