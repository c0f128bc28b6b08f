"""unpermute: the fused weighted combine and its backward, against references and by gradcheck."""

from __future__ import annotations

import os

import pytest
import torch

import compass_kernels as ck
from compass_kernels.routing_ref import unpermute_bwd_ref, unpermute_ref
from helpers import cpu_backends, make_ids

SHAPES = [
    # (T, H, k, E, kind, capacity, align)
    (0, 8, 2, 16, "uniform", None, 1),
    (1, 1, 1, 1, "uniform", None, 1),
    (13, 7, 2, 16, "uniform", None, 1),
    (31, 130, 2, 16, "skewed", None, 4),
    (29, 33, 8, 128, "uniform", None, 1),
    (17, 9, 8, 8, "uniform", None, 1),           # k = E
    (23, 5, 2, 4, "one", None, 1),
    (23, 5, 4, 16, "holes", 3, 2),                # -1 slots, dropped tokens, padding
    (23, 64, 2, 16, "empty", None, 8),
]
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _case(T, H, k, E, kind, capacity, align, dtype, probs_dtype=torch.float32):
    plan = ck.route(make_ids(T, k, E, kind), E, capacity=capacity, align=align)
    y = torch.randn(plan.num_rows, H).to(dtype)
    probs = torch.rand(T, k).to(probs_dtype)
    return plan, y, probs


def _naive_lowp(y, plan, probs):
    """What plain PyTorch does in the low precision: gather, multiply, sum, all in y's dtype."""
    rows = plan.row_id_map
    ys = torch.cat([y, y.new_zeros(1, y.shape[1])])[torch.where(rows >= 0, rows, y.shape[0])]
    return (ys * probs.to(y.dtype)[..., None]).sum(1)


def _definition(y, plan, probs):
    out = torch.zeros(plan.num_tokens, y.shape[1], dtype=torch.float64)
    for t in range(plan.num_tokens):
        for j in range(plan.topk):
            r = int(plan.row_id_map[t, j])
            if r >= 0:
                out[t] += float(probs[t, j]) * y[r].double()
    return out


@pytest.mark.parametrize("T,H,k,E,kind,capacity,align", SHAPES)
def test_unpermute_ref_definition(T, H, k, E, kind, capacity, align):
    plan, y, probs = _case(T, H, k, E, kind, capacity, align, torch.float64, torch.float64)
    torch.testing.assert_close(unpermute_ref(y, plan.row_id_map, probs), _definition(y, plan, probs))
    torch.testing.assert_close(unpermute_ref(y, plan.row_id_map), _definition(y, plan, torch.ones(T, k)))


@pytest.mark.parametrize("with_probs", [True, False])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("T,H,k,E,kind,capacity,align", SHAPES)
def test_unpermute_matches_reference(kernel_backend, T, H, k, E, kind, capacity, align, dtype, with_probs):
    plan, y, probs = _case(T, H, k, E, kind, capacity, align, dtype)
    probs = probs if with_probs else None
    got = ck.unpermute(y, plan, probs)
    want = unpermute_ref(y, plan.row_id_map, probs)
    assert got.dtype == dtype and got.shape == (T, H)
    if kernel_backend == "cpu":
        # Same slot order, separate multiply and add, fp32 accumulator: bit-identical.
        assert torch.equal(got, want)
        return
    if kernel_backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest: allow 1 ulp.
        assert ((got.double() - want.double()).abs() <= want.double().abs() * 2**-7 + 1e-30).all()
        return
    # Other backends may reduce the k slots in another order: within ~2x the error of plain
    # PyTorch in the low precision, measured against a float64 oracle.
    exact = unpermute_ref(y.double(), plan.row_id_map, None if probs is None else probs.double())
    naive = _naive_lowp(y, plan, probs if probs is not None else torch.ones(T, k))
    tol = 2 * (naive.double() - exact).abs().max().item() if T else 0.0
    assert (got.double() - exact).abs().max().item() <= tol + 1e-6 if T else got.numel() == 0


@pytest.mark.parametrize("probs_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_unpermute_mixed_probs_dtype(kernel_backend, probs_dtype):
    plan, y, probs = _case(41, 19, 2, 16, "skewed", None, 4, torch.bfloat16, probs_dtype)
    got = ck.unpermute(y, plan, probs)
    torch.testing.assert_close(got, unpermute_ref(y, plan.row_id_map, probs), rtol=1.6e-2, atol=1e-2)


def test_unpermute_non_contiguous(kernel_backend):
    plan, y, probs = _case(21, 16, 2, 8, "uniform", None, 2, torch.float32)
    wide = torch.randn(plan.num_rows, 40)
    wide[:, 5:21] = y
    torch.testing.assert_close(ck.unpermute(wide[:, 5:21], plan, probs), unpermute_ref(y, plan.row_id_map, probs))


@pytest.mark.parametrize("T,H,k,E,kind,capacity,align", SHAPES)
def test_unpermute_backward_matches_reference(kernel_backend, T, H, k, E, kind, capacity, align):
    plan, y, probs = _case(T, H, k, E, kind, capacity, align, torch.float32)
    g = torch.randn(T, H)
    got_y, got_p = unpermute_bwd_ref(g, y, plan.row_id_map, probs)  # reference first, to compare shapes
    y.requires_grad_(True)
    probs.requires_grad_(True)
    gy, gp = torch.autograd.grad(ck.unpermute(y, plan, probs), (y, probs), g)
    torch.testing.assert_close(gy, got_y, rtol=0, atol=0)            # a scaled copy: exact
    torch.testing.assert_close(gp, got_p, rtol=1e-5, atol=1e-5)      # a dot product: order may differ
    # padding and tail rows get exactly zero gradient
    live = torch.zeros(plan.num_rows, dtype=torch.bool)
    live[plan.row_id_map[plan.row_id_map >= 0]] = True
    assert gy[~live].eq(0).all()
    # unweighted combine: the gradient is a plain dispatch
    (gy1,) = torch.autograd.grad(ck.unpermute(y, plan), y, g)
    assert torch.equal(gy1, ck.permute(g, plan))


@pytest.mark.parametrize("kind,capacity,align", [("uniform", None, 1), ("holes", 3, 4), ("one", None, 1)])
def test_gradcheck_fp64(kind, capacity, align):
    plan = ck.route(make_ids(9, 3, 6, kind), 6, capacity=capacity, align=align)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(9, 3, dtype=torch.float64, requires_grad=True)
    # dispatch -> a nonlinear "expert" -> weighted combine
    torch.autograd.gradcheck(lambda x, p: ck.unpermute(torch.tanh(ck.permute(x, plan)), plan, p), (x, probs))


def test_gradcheck_fp64_kernel(kernel_backend):
    plan = ck.route(make_ids(7, 2, 4, "holes"), 4, capacity=3, align=2)
    y = torch.randn(plan.num_rows, 3, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(7, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda y, p: ck.unpermute(y, plan, p), (y, probs))


def test_unpermute_end_to_end_identity(kernel_backend):
    """permute then unpermute with weights summing to one over routed slots returns x."""
    T, H, E, k = 57, 24, 16, 2
    x = torch.randn(T, H, dtype=torch.float64)
    plan = ck.route(make_ids(T, k, E, "skewed"), E, align=8)
    probs = torch.softmax(torch.randn(T, k, dtype=torch.float64), -1)
    torch.testing.assert_close(ck.unpermute(ck.permute(x, plan), plan, probs), x)


def _lane_order_dots(g, y, row_id_map):
    """<g[t], y[row(t, j)]> in fp32 as the cpu kernel sums it: 16 lane sums over the first
    H - H % 16 elements in order, each step a product then an add, halved pairwise 8, 4, 2, 1,
    plus a scalar sum of the last H % 16 in order; 0 for unrouted slots. Bit for bit, unlike a
    torch dot."""
    T, k = row_id_map.shape
    H = g.shape[1]
    gf, yf = g.float(), y.float()
    rows = row_id_map.clamp(min=0)
    part = torch.zeros(T, k, 16)
    for i in range(0, H - H % 16, 16):
        part = part + gf[:, None, i:i + 16] * yf[rows, i:i + 16]
    for half in (8, 4, 2, 1):
        part = part[..., :half] + part[..., half:2 * half]
    tail = torch.zeros(T, k)
    for i in range(H - H % 16, H):
        tail = tail + gf[:, None, i] * yf[rows, i]
    return torch.where(row_id_map >= 0, part[..., 0] + tail, 0.0)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="compass_kernels._cpu not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("H", [77, 2048])
def test_unpermute_backward_cpu_bits(dtype, H):
    """Cached sizes (ordinary stores; the 16-bit types on their AVX-512 loops where the CPU has
    them): grad_y is the reference's, bit for bit, and grad_probs the lane-order sum's, with and
    without a scalar tail (H = 77)."""
    T, k, E = 300, 5, 8
    with ck.use_backend("cpu"):
        plan = ck.route(make_ids(T, k, E, "holes"), E)
        y = torch.randn(plan.num_rows, H).to(dtype).requires_grad_(True)
        probs = torch.rand(T, k, requires_grad=True)
        g = torch.randn(T, H).to(dtype)
        gy, gp = torch.autograd.grad(ck.unpermute(y, plan, probs), (y, probs), g)
    want_y, _ = unpermute_bwd_ref(g, y.detach(), plan.row_id_map, probs.detach())
    assert torch.equal(gy, want_y)
    assert torch.equal(gp, _lane_order_dots(g, y.detach(), plan.row_id_map))


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="compass_kernels._cpu not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unpermute_backward_streaming_rows(dtype):
    """grad_y of >= 32 MiB with rows of a multiple of 64 bytes leaves the cpu kernel through
    non-temporal stores (x86), with and without probs: the same values as the reference."""
    T, H, k, E = 4500 * (4 // dtype.itemsize), 1024, 2, 16
    with ck.use_backend("cpu"):
        plan = ck.route(make_ids(T, k, E, "holes"), E, align=8)
        y = torch.randn(plan.num_rows, H).to(dtype).requires_grad_(True)
        probs = torch.rand(T, k, requires_grad=True)
        g = torch.randn(T, H).to(dtype)
        assert plan.num_rows * H * dtype.itemsize >= 32 << 20
        gy, gp = torch.autograd.grad(ck.unpermute(y, plan, probs), (y, probs), g)
        want_y, want_p = unpermute_bwd_ref(g, y.detach(), plan.row_id_map, probs.detach())
        torch.testing.assert_close(gy, want_y, rtol=0, atol=0)
        torch.testing.assert_close(gp, want_p.to(gp.dtype), rtol=1e-4, atol=1e-3)
        assert torch.equal(gp, _lane_order_dots(g, y.detach(), plan.row_id_map))
        (gy1,) = torch.autograd.grad(ck.unpermute(y, plan), y, g)      # no probs: a plain dispatch
        torch.testing.assert_close(gy1, ck.permute(g, plan), rtol=0, atol=0)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="compass_kernels._cpu not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [2, 5, 8])
def test_unpermute_streaming_rows_bit_exact(k, dtype):
    """An fp32, bf16 or fp16 output of >= 32 MiB in rows of a multiple of 64 bytes leaves the cpu
    kernel through non-temporal stores (x86 with AVX-512): whole rows for <= 4 routed slots,
    2048-element chunks past 4 (k = 5: a group of 4 and one of 1; H leaves a last chunk of one
    64-byte store). -1 slots, tokens with no slot, a -0 weight, NaN and -0 payloads and, for the
    16-bit types, sums near their largest value: the reference's bits (NaN where it has NaN)."""
    T, E = 4100, 16
    H = 2048 + 64 // dtype.itemsize if dtype == torch.float32 else 4096 + 64 // dtype.itemsize
    ids = make_ids(T, k, E, "holes")
    ids[7] = -1                                                     # the empty sum
    with ck.use_backend("cpu"):
        plan = ck.route(ids, E)
        y = torch.randn(plan.num_rows, H).to(dtype)
        y[3, :100], y[5, 17] = -0.0, float("nan")
        if dtype != torch.float32:
            y[9, :8] = torch.finfo(dtype).max
        probs = torch.rand(T, k)
        probs[0, 0] = -0.0
        assert T * H * dtype.itemsize >= 32 << 20
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        for p in (probs, None):
            got, want = ck.unpermute(y, plan, p), unpermute_ref(y, plan.row_id_map, p)
            # NaN: torch's own fp32 -> bf16 casts disagree on its bits (0x7FC0 scalar, 0xFFFF vectorised)
            nan = want.isnan()
            assert nan.any() and torch.equal(got.isnan(), nan)
            assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan])
