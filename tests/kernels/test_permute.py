"""permute: bit-exact dispatch on every backend, any dtype, padding rows zero, gradients."""

from __future__ import annotations

import pytest
import torch

import compass_kernels as ck
from compass_kernels.routing_ref import permute_ref
from helpers import cpu_backends, make_ids

SHAPES = [
    # (T, H, k, E, kind, capacity, align)
    (0, 8, 2, 16, "uniform", None, 1),
    (1, 1, 1, 1, "uniform", None, 1),
    (13, 7, 2, 16, "uniform", None, 1),
    (31, 130, 2, 16, "skewed", None, 4),
    (29, 33, 8, 128, "uniform", None, 1),
    (17, 9, 8, 8, "uniform", None, 1),          # k = E
    (23, 5, 2, 4, "one", None, 1),
    (23, 5, 4, 16, "holes", 3, 2),               # -1 slots, capacity drop, align padding
    (23, 64, 2, 16, "empty", None, 8),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.int32]


def _x(T, H, dtype):
    x = torch.randn(T, H) * 4
    return x.to(dtype) if dtype != torch.int32 else (x * 1000).to(torch.int32)


def _dense_oracle(x, plan):
    """Row by row, from the definition."""
    out = torch.zeros(plan.num_rows, x.shape[1], dtype=torch.float64)
    for t in range(plan.num_tokens):
        for j in range(plan.topk):
            r = int(plan.row_id_map[t, j])
            if r >= 0:
                out[r] = x[t].double()
    return out


@pytest.mark.parametrize("T,H,k,E,kind,capacity,align", SHAPES)
def test_permute_ref_definition(T, H, k, E, kind, capacity, align):
    x = torch.randn(T, H, dtype=torch.float64)
    plan = ck.route(make_ids(T, k, E, kind), E, capacity=capacity, align=align)
    assert torch.equal(permute_ref(x, plan.row_id_map, plan.num_rows), _dense_oracle(x, plan))


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,H,k,E,kind,capacity,align", SHAPES)
def test_permute_bit_exact(kernel_backend, T, H, k, E, kind, capacity, align, dtype):
    x = _x(T, H, dtype)
    plan = ck.route(make_ids(T, k, E, kind), E, capacity=capacity, align=align)
    got = ck.permute(x, plan)
    want = permute_ref(x, plan.row_id_map, plan.num_rows)
    assert got.dtype == dtype and got.shape == (plan.num_rows, H)
    assert torch.equal(_bits(got), _bits(want))


def test_permute_nan_payload_and_probs(kernel_backend):
    x = torch.randn(19, 6)
    x[3, 2] = float("nan")
    x[4, 1] = float("-inf")
    probs = torch.rand(19, 2)
    plan = ck.route(make_ids(19, 2, 16, "holes"), 16, align=4)
    xp, pp = ck.permute(x, plan, probs=probs)
    assert torch.equal(_bits(xp), _bits(permute_ref(x, plan.row_id_map, plan.num_rows)))
    want_pp = permute_ref(probs.reshape(-1, 1), plan.row_id_map.reshape(-1, 1), plan.num_rows).reshape(-1)
    assert torch.equal(pp, want_pp)


@pytest.mark.parametrize("layout", ["row_stride", "transposed", "sliced"])
def test_permute_non_contiguous(kernel_backend, layout):
    base = torch.randn(40, 24)
    x = {"row_stride": base[:, 3:19], "transposed": torch.randn(16, 40).t(), "sliced": base[::2, :16]}[layout]
    T = x.shape[0]
    plan = ck.route(make_ids(T, 2, 16, "skewed"), 16, align=2)
    assert torch.equal(ck.permute(x, plan), permute_ref(x.contiguous(), plan.row_id_map, plan.num_rows))


def test_permute_grad_fp64():
    x = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(11, 4, dtype=torch.float64, requires_grad=True)
    plan = ck.route(make_ids(11, 4, 8, "holes"), 8, capacity=5, align=2)
    torch.autograd.gradcheck(lambda x, p: ck.permute(x, plan, probs=p), (x, probs))


def test_permute_grad_matches_reference(kernel_backend):
    x = torch.randn(37, 12, requires_grad=True)
    plan = ck.route(make_ids(37, 2, 16, "holes"), 16, capacity=4, align=4)
    g = torch.randn(plan.num_rows, 12)
    (gx,) = torch.autograd.grad(ck.permute(x, plan), x, g)
    with ck.use_backend("torch"):
        (gx_ref,) = torch.autograd.grad(ck.permute(x, plan), x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


def test_permute_64bit_offsets():
    """num_rows * H > 2^31 elements: byte offsets must be computed in 64 bits."""
    T, H = 2**15 + 3, 2**15 + 1                                     # 2 * T * H > 2^31 int8 elements
    x = torch.randint(-128, 127, (T, H), dtype=torch.int8)
    ids = torch.stack([torch.arange(T) % 2, torch.arange(T) % 2 + 2], dim=1)  # last rows land past 2^31
    plan = ck.route(ids, 4)
    out = ck.permute(x, plan)
    assert out.shape[0] * H > 2**31
    for t in (0, 1, T // 2, T - 2, T - 1):
        for j in range(2):
            assert torch.equal(out[plan.row_id_map[t, j]], x[t])


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="compass_kernels._cpu not built")
def test_permute_streaming_rows_bit_exact():
    """An output of >= 32 MiB with rows of a multiple of 64 bytes leaves the cpu kernel through
    non-temporal stores (x86): the same bytes as the reference, -1 slots skipped, padding zero."""
    T, H, k, E = 4500, 1024, 2, 16
    x = torch.randn(T, H)
    ids = make_ids(T, k, E, "holes")
    with ck.use_backend("cpu"):
        plan = ck.route(ids, E, align=8)
        out = ck.permute(x, plan)
    assert out.numel() * 4 >= 32 << 20
    assert torch.equal(out.view(torch.int32), permute_ref(x, plan.row_id_map, plan.num_rows).view(torch.int32))
