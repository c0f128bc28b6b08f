"""grouped_gemm_fp8 against the dequantized fp64 product and full precision (DeepGEMM's calc_diff),
permute of an Fp8Tensor (bit-exact), errors, opcheck and torch.compile(fullgraph=True)."""

from __future__ import annotations

import importlib

import pytest
import torch

import compass_kernels as ck
from compass_kernels.fp8_ref import grouped_gemm_fp8_ref
from compass_kernels.grouped_gemm_ref import grouped_gemm_ref
from compass_kernels.routing_ref import permute_ref
from helpers import bits, cpu_backends, make_ids, skip_missing_triton

fp8 = importlib.import_module("compass_kernels.fp8")


@pytest.fixture(params=cpu_backends())
def backend_all(request):
    """Every backend serving CPU tensors here (the torch reference included), forced for the test."""
    skip_missing_triton(request.param)
    with ck.use_backend(request.param):
        yield request.param

GRANS = [("row", "row"), ("block", "block2d"), ("row", "block2d"), ("block", "row")]
CASES = [
    # (M, K, N, group sizes, start row)
    (0, 64, 16, [0, 0, 0], 0),                # M = 0, all groups empty
    (1, 200, 24, [1], 0),                     # M = 1, K not a multiple of the block
    (37, 100, 40, [5, 0, 20, 12], 0),         # an empty group, no alignment
    (41, 64, 17, [3, 7, 11], 13),             # rows before offsets[0] and past offsets[-1] zero
    (70, 160, 48, [70], 0),                   # everything in one group
]


def _offsets(sizes, start=0):
    return torch.tensor([start] + sizes, dtype=torch.int64).cumsum(0)


def _operands(M, K, N, sizes, start, grans, bs, dtype=torch.float8_e4m3fn):
    x = torch.randn(M, K) * torch.logspace(-1, 1, K)                   # per-channel spread
    w = torch.randn(len(sizes), N, K) / K**0.5
    q_x = ck.quantize_fp8(x, granularity=grans[0], block_size=bs, dtype=dtype)
    q_w = ck.quantize_fp8(w, granularity=grans[1], block_size=bs, dtype=dtype)
    return x, w, q_x, q_w, _offsets(sizes, start)


def _ref(q_x, q_w, offsets, bs, out_dtype, acc_dtype):
    return grouped_gemm_fp8_ref(q_x.data, q_x.scale, q_x.granularity, q_w.data, q_w.scale, q_w.granularity,
                                offsets, bs, out_dtype, acc_dtype)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's criterion: 1 - 2 sum(xy) / sum(x^2 + y^2)."""
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


# Relative spacing of out_dtype: one ulp of v is at most |v| * this (or the subnormal step).
_ULP = {torch.bfloat16: (2.0**-7, 0.0), torch.float16: (2.0**-10, 2.0**-24), torch.float32: (2.0**-23, 0.0)}


def assert_faithful(y, q_x, q_w, offsets, bs):
    """Each element within one out_dtype ulp of the exact (fp64) product of the dequantized operands,
    plus the worst-case fp32 dot-product error K * 2^-24 * (|x| |w|^T): a faithfully rounded,
    fp32-accumulated result, whatever the summation order or the rounding of the final cast."""
    exact = _ref(q_x, q_w, offsets, bs, torch.float64, torch.float64)
    xd, wd = q_x.dequantize(torch.float64).abs(), q_w.dequantize(torch.float64).abs()
    bound_fp32 = q_x.shape[1] * 2.0**-24 * grouped_gemm_ref(xd, wd, offsets, trans_b=True)
    rel, sub = _ULP[y.dtype]
    tol = rel * exact.abs() + sub + 2 * bound_fp32
    bad = (y.double() - exact).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} elements off, first at {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("grans", GRANS, ids="-".join)
@pytest.mark.parametrize("M,K,N,sizes,start", CASES)
def test_grouped_gemm_fp8_vs_dequantized_fp64(backend_all, M, K, N, sizes, start, grans, out_dtype):
    if backend_all == "triton" and out_dtype != (torch.float32, torch.bfloat16)[GRANS.index(grans) % 2]:
        pytest.skip("interpreter time: triton runs one output dtype per granularity pair here "
                    "(tests/kernels/triton/test_fp8_triton.py covers the rest)")
    bs = 32
    x, w, q_x, q_w, offsets = _operands(M, K, N, sizes, start, grans, bs)
    y = ck.grouped_gemm_fp8(q_x, q_w, offsets, out_dtype=out_dtype)
    assert y.shape == (M, N) and y.dtype == out_dtype
    assert_faithful(y, q_x, q_w, offsets, bs)
    outside = torch.ones(M, dtype=torch.bool)
    outside[int(offsets[0]): int(offsets[-1])] = False
    assert y[outside].eq(0).all()


@pytest.mark.parametrize("grans", [("row", "row"), ("block", "block2d")], ids="-".join)
def test_grouped_gemm_fp8_vs_full_precision(backend_all, grans):
    """calc_diff < 1e-3 against the fp64 product of the unquantized operands (DeepGEMM's test)."""
    sizes = [50, 0, 93, 113]                                   # no 128-row alignment
    M, K, N = sum(sizes), 384, 64
    x = torch.randn(M, K)
    w = torch.randn(len(sizes), N, K) / K**0.5
    offsets = _offsets(sizes)
    q_x = ck.quantize_fp8(x, granularity=grans[0])
    q_w = ck.quantize_fp8(w, granularity=grans[1])
    y = ck.grouped_gemm_fp8(q_x, q_w, offsets)                  # bf16 out
    full = grouped_gemm_ref(x.double(), w.double(), offsets, trans_b=True)
    assert calc_diff(y, full) < 1e-3


def test_grouped_gemm_fp8_e5m2(backend_all):
    x, w, q_x, q_w, offsets = _operands(37, 100, 40, [5, 0, 20, 12], 0, ("row", "row"), 128, torch.float8_e5m2)
    assert_faithful(ck.grouped_gemm_fp8(q_x, q_w, offsets, out_dtype=torch.float32), q_x, q_w, offsets, 128)


# ---------------------------------------------------------------------------------------------
# permute of an Fp8Tensor


@pytest.mark.parametrize("granularity", ["row", "block", "tensor"])
def test_permute_fp8_bitexact(backend_all, granularity):
    T, K, E, k = 29, 300, 6, 2
    ids = make_ids(T, k, E, "holes")
    plan = ck.route(ids, E, align=4)                            # padding rows too
    q = ck.quantize_fp8(torch.randn(T, K), granularity=granularity)
    probs = torch.rand(T, k)
    qp, pp = ck.permute(q, plan, probs=probs)
    assert isinstance(qp, ck.Fp8Tensor) and qp.granularity == granularity and qp.shape == (plan.num_rows, K)
    assert torch.equal(bits(qp.data), bits(permute_ref(q.data, plan.row_id_map, plan.num_rows)))
    if granularity == "tensor":
        assert qp.scale is q.scale
    else:
        want = permute_ref(q.scale.reshape(T, -1), plan.row_id_map, plan.num_rows).reshape(qp.scale.shape)
        assert torch.equal(bits(qp.scale), bits(want))
    assert torch.equal(pp, ck.permute(torch.randn(T, 1), plan, probs=probs)[1])
    # Each row keeps its scale: dequantize after permute == permute after dequantize.
    assert torch.equal(qp.dequantize(), permute_ref(q.dequantize(), plan.row_id_map, plan.num_rows))
    assert isinstance(ck.permute(q, plan), ck.Fp8Tensor)


def test_permute_fp8_needs_row_scales():
    plan = ck.route(make_ids(8, 2, 4), 4)
    q = ck.quantize_fp8(torch.randn(8, 16), granularity="block2d", block_size=4)
    with pytest.raises(ValueError, match=r"'row' or 'block'\), got shape \(8, 16\) with granularity 'block2d'"):
        ck.permute(q, plan)


# ---------------------------------------------------------------------------------------------
# errors, registration, compile


def test_bad_inputs():
    x, w, off = torch.randn(8, 32), torch.randn(2, 16, 32), torch.tensor([0, 3, 8])
    qx, qw = ck.quantize_fp8(x, block_size=16), ck.quantize_fp8(w, block_size=16)
    qxb = ck.quantize_fp8(x, granularity="block", block_size=16)
    with pytest.raises(TypeError, match=r"q_x must be an Fp8Tensor \(from quantize_fp8\), got Tensor"):
        ck.grouped_gemm_fp8(x, qw, off)
    with pytest.raises(ValueError, match=r"q_x must be quantized with granularity 'row' or 'block', got 'block2d'"):
        ck.grouped_gemm_fp8(ck.quantize_fp8(x, granularity="block2d"), qw, off)
    with pytest.raises(ValueError, match=r"q_w must be quantized with granularity 'row' or 'block2d', got 'tensor'"):
        ck.grouped_gemm_fp8(qx, ck.quantize_fp8(w, granularity="tensor"), off)
    with pytest.raises(ValueError, match=r"q_w must be 3-D \[E, N, K\], got shape \(16, 32\)"):
        ck.grouped_gemm_fp8(qx, ck.quantize_fp8(w[0]), off)
    with pytest.raises(ValueError, match=r"q_x \[M, K\] has K = 32 but q_w \[E, N, K\] has K = 16"):
        ck.grouped_gemm_fp8(qx, ck.quantize_fp8(w[:, :, :16]), off)
    with pytest.raises(TypeError, match=r"q_x and q_w must have the same FP8 dtype"):
        ck.grouped_gemm_fp8(qx, ck.quantize_fp8(w, dtype=torch.float8_e5m2), off)
    with pytest.raises(TypeError, match=r"out_dtype must be torch.bfloat16, torch.float16 or torch.float32"):
        ck.grouped_gemm_fp8(qx, qw, off, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"offsets must be 1-D with E \+ 1 = 3 entries"):
        ck.grouped_gemm_fp8(qx, qw, torch.tensor([0, 8]))
    with pytest.raises(TypeError, match=r"offsets must be int64"):
        ck.grouped_gemm_fp8(qx, qw, off.int())
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing"):
        ck.grouped_gemm_fp8(qx, qw, torch.tensor([0, 5, 3]))
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, M\] = \[0, 8\]"):
        ck.grouped_gemm_fp8(qx, qw, torch.tensor([0, 5, 9]))
    with pytest.raises(ValueError, match=r"q_x and q_w must share the block size, got 16 \(q_x\) and 32"):
        ck.grouped_gemm_fp8(qxb, ck.quantize_fp8(w, granularity="block2d", block_size=32), off)


def test_opcheck_grouped_gemm_fp8():
    for grans in GRANS:
        x, w, q_x, q_w, offsets = _operands(37, 100, 40, [5, 0, 20, 12], 0, grans, 32)
        args = (q_x.data, q_x.scale, grans[0], q_w.data, q_w.scale, grans[1], offsets, 32, torch.bfloat16)
        # test_schema compares the inputs before and after with allclose, which has no float8 kernel
        # on CPU ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'): the other three run.
        torch.library.opcheck(fp8._gemm_fp8_op.op, args,
                              test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def _fp8_moe(x, ids, probs, q_w, num_experts):
    """A whole FP8 expert layer: route, quantize per 1x128 block, permute codes and scales together,
    FP8 grouped GEMM, weighted combine."""
    plan = ck.route(ids, num_experts)
    q = ck.quantize_fp8(x, granularity="block")
    qp = ck.permute(q, plan)
    y = ck.grouped_gemm_fp8(qp, q_w, plan.expert_offsets, out_dtype=torch.float32)
    return ck.unpermute(torch.relu(y), plan, probs)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_compile_fullgraph(backend):
    E, K, N = 4, 200, 24
    q_w = ck.quantize_fp8(torch.randn(E, N, K) / K**0.5, granularity="block2d")
    with ck.use_backend(None if backend == "auto" else backend):
        torch._dynamo.reset()
        compiled = torch.compile(_fp8_moe, fullgraph=True, dynamic=True)
        for T in (19, 33):
            x, ids, probs = torch.randn(T, K), make_ids(T, 2, E, "skewed"), torch.rand(T, 2)
            torch.testing.assert_close(compiled(x, ids, probs, q_w, E), _fp8_moe(x, ids, probs, q_w, E))
        x = torch.randn(3, 7, 130)
        quant = torch.compile(lambda x: ck.quantize_fp8(x, granularity="block", block_size=32).dequantize(),
                              fullgraph=True)
        torch.testing.assert_close(quant(x), ck.quantize_fp8(x, granularity="block", block_size=32).dequantize())
