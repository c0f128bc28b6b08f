"""Triton routing kernels against a small torch reference.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set here unless the
environment already chose); with TRITON_INTERPRET=0 on a CUDA machine the same tests run the
compiled kernels on the GPU. Data movement (route, permute, unrouted grad_y) is compared
bit-exactly; weighted sums against a float64 reference within a worst-case rounding bound.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from compass_kernels.triton import routing  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"


# ----------------------------------------------------------------------------------------------
# Reference (inline for now; to be swapped for compass_kernels.routing's *_ref). Each returns
# what the kernel writes, computed the obvious way, in float64 where arithmetic is involved.
# ----------------------------------------------------------------------------------------------

def route_ref(ids: torch.Tensor, E: int, capacity: int | None, align: int):
    T, k = ids.shape
    flat = ids.reshape(-1).tolist()
    seen = [0] * E
    rank = []
    for e in flat:
        if 0 <= e < E:
            rank.append(seen[e])
            seen[e] += 1
        else:
            rank.append(-1)
    tpe = [c if capacity is None else min(c, capacity) for c in seen]
    seg = [-(-n // align) * align for n in tpe]
    offsets = [0]
    for s in seg:
        offsets.append(offsets[-1] + s)
    rows = [offsets[e] + r if r >= 0 and (capacity is None or r < capacity) else -1
            for e, r in zip(flat, rank)]
    return (torch.tensor(rows, dtype=torch.int64).reshape(T, k),
            torch.tensor(tpe, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64))


def permute_ref(x: torch.Tensor, row_id_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    T, k = row_id_map.shape
    out = torch.zeros(num_rows, x.shape[1], dtype=x.dtype)
    for t in range(T):
        for j in range(k):
            if row_id_map[t, j] >= 0:
                out[row_id_map[t, j]] = x[t]
    return out


def unpermute_ref(y, row_id_map, probs):
    """(out, sum_abs) in float64: sum_j w_j y[row_j] and sum_j |w_j y[row_j]|."""
    rows = row_id_map.clamp(min=0)
    live = (row_id_map >= 0).double()
    w = live if probs is None else probs.double() * live
    terms = w[..., None] * y.double()[rows]  # [T, k, H]
    return terms.sum(1), terms.abs().sum(1)


def unpermute_bwd_ref(grad_out, y, row_id_map, probs, num_rows):
    """grad_y, grad_probs, sum |g y| per (t, j), in float64."""
    T, k = row_id_map.shape
    g = grad_out.double()
    grad_y = torch.zeros(num_rows, grad_out.shape[1], dtype=torch.float64)
    grad_probs = torch.zeros(T, k, dtype=torch.float64)
    gp_abs = torch.zeros(T, k, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            r = int(row_id_map[t, j])
            if r < 0:
                continue
            grad_y[r] = g[t] if probs is None else probs[t, j].double() * g[t]
            if y is not None:
                grad_probs[t, j] = (g[t] * y[r].double()).sum()
                gp_abs[t, j] = (g[t] * y[r].double()).abs().sum()
    return grad_y, grad_probs, gp_abs


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    a, e = actual.cpu(), expected.cpu()
    assert a.shape == e.shape and a.dtype == e.dtype
    ints = routing._INT_VIEW[a.element_size()]
    assert torch.equal(a.view(ints), e.view(ints)), "bitwise mismatch"


def assert_within_rounding(actual, ref64, sum_abs64, n_terms: int, acc_eps: float) -> None:
    """|actual - ref| <= eps_out/2 |ref| + 1.01 n_terms eps_acc sum|terms| (+ tiny): one rounding
    of the result to its dtype (half an ulp) plus the worst case of n_terms roundings in the
    accumulator's precision. Tight enough that accumulating fp16 in fp16 fails.
    Interpreter gap: its fp32 -> bf16 cast truncates instead of rounding to nearest, so bf16 gets
    a whole ulp there (the GPU's cvt.rn is half an ulp)."""
    eps_out = torch.finfo(actual.dtype).eps
    rounding = eps_out if (INTERPRET and actual.dtype == torch.bfloat16) else eps_out / 2
    bound = (rounding * ref64.abs() + 1.01 * n_terms * acc_eps * sum_abs64
             + torch.finfo(actual.dtype).tiny)
    err = (actual.cpu().double() - ref64).abs()
    assert torch.isfinite(actual.cpu()).all()
    assert (err <= bound).all(), f"max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}"


def acc_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def make_ids(T, k, E, gen, int_dtype=torch.int64, skew=False, unrouted=True):
    if skew:  # most slots on expert 0: one big segment, several empty experts
        ids = torch.where(torch.rand(T, k, generator=gen) < 0.8, 0,
                          torch.randint(0, E, (T, k), generator=gen))
    else:
        ids = torch.randint(0, E, (T, k), generator=gen)
    if unrouted and T * k > 0:  # -1 (no expert) and out-of-range ids are both unrouted
        ids[torch.rand(T, k, generator=gen) < 0.1] = -1
        ids[torch.rand(T, k, generator=gen) < 0.03] = E + 3
    return ids.to(int_dtype).to(DEVICE)


def run_route(ids, E, capacity, align, workspace=None):
    T, k = ids.shape
    row_id_map = torch.full((T, k), -7, dtype=torch.int64, device=DEVICE)  # poison
    tpe = torch.full((E,), -7, dtype=torch.int64, device=DEVICE)
    offsets = torch.full((E + 1,), -7, dtype=torch.int64, device=DEVICE)
    routing.route(ids, E, -1 if capacity is None else capacity, align, row_id_map, tpe,
                  offsets, workspace)
    return row_id_map, tpe, offsets


def num_rows_for(T, k, E, align):
    return T * k + E * (align - 1) + 3  # a static upper bound plus 3 tail rows to zero


def random_bits(shape, dtype, gen):
    """Arbitrary bit patterns (NaNs and infs included): a movement test must preserve them."""
    size = torch.empty(0, dtype=dtype).element_size()
    ints = routing._INT_VIEW[size]
    info = torch.iinfo(ints)
    bits = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64)
    return bits.to(ints).view(dtype)


def poisoned(shape, dtype):
    """Every byte 0x55, so rows a kernel forgets to write show up."""
    rows, cols = shape
    return torch.full((rows, cols * dtype.itemsize), 0x55, dtype=torch.uint8,
                      device=DEVICE).view(dtype)


# ----------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------

ROUTE_POLICIES = [(None, 1), (3, 1), (None, 8), (2, 4)]  # (capacity, align)


@pytest.mark.parametrize("T", [0, 1, 13, 97])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("E", [1, 4, 16, 128])
def test_route(T, k, E):
    gen = torch.Generator().manual_seed(T * 1000 + k * 10 + E)
    ids = make_ids(T, k, E, gen, int_dtype=torch.int32 if (T + k) % 2 else torch.int64)
    for capacity, align in ROUTE_POLICIES:
        got = run_route(ids, E, capacity, align)
        want = route_ref(ids.cpu(), E, capacity, align)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w), (capacity, align)


@pytest.mark.parametrize("capacity", [None, 0, 5])
def test_route_skewed_and_large_E(capacity):
    gen = torch.Generator().manual_seed(1)
    for T, k, E in [(97, 2, 16), (13, 8, 1024), (40, 3, 1000)]:
        ids = make_ids(T, k, E, gen, skew=True)
        got = run_route(ids, E, capacity, 4)
        for g, w in zip(got, route_ref(ids.cpu(), E, capacity, 4)):
            assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("tile,max_chunks", [(64, 4096), (64, 5), (4096, 3)])
def test_route_multi_block_chunks(monkeypatch, tile, max_chunks):
    """Small tiles and few chunks: the count/assign loops over several blocks per chunk and the
    scan loops over several chunk tiles, as they do at T = 64K on the GPU."""
    monkeypatch.setattr(routing, "_ROUTE_TILE", tile)
    monkeypatch.setattr(routing, "_ROUTE_MAX_CHUNKS", max_chunks)
    gen = torch.Generator().manual_seed(2)
    for T, k, E, capacity in [(97, 2, 16, None), (97, 8, 4, 30), (50, 3, 128, None)]:
        ids = make_ids(T, k, E, gen)
        ws = torch.full((routing.route_workspace_numel(T, k, E),), -9, dtype=torch.int64,
                        device=DEVICE)
        got = run_route(ids, E, capacity, 2, workspace=ws)
        for g, w in zip(got, route_ref(ids.cpu(), E, capacity, 2)):
            assert torch.equal(g.cpu(), w)


# ----------------------------------------------------------------------------------------------
# permute
# ----------------------------------------------------------------------------------------------

SHAPES = [  # (T, H, k, E, capacity, align)
    (0, 7, 2, 4, None, 4),
    (1, 1, 1, 1, None, 1),
    (13, 7, 2, 4, 3, 1),
    (13, 130, 8, 16, None, 8),
    (97, 64, 2, 16, None, 1),
    (97, 130, 8, 128, 4, 2),
]


def make_plan(T, k, E, capacity, align, gen):
    ids = make_ids(T, k, E, gen)
    row_id_map, tpe, offsets = run_route(ids, E, capacity, align)
    return row_id_map, tpe, offsets, num_rows_for(T, k, E, align)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_permute(shape, dtype):
    T, H, k, E, capacity, align = shape
    gen = torch.Generator().manual_seed(T + H + k + E)
    row_id_map, tpe, offsets, num_rows = make_plan(T, k, E, capacity, align, gen)
    x_wide = random_bits((T, H + 5), dtype, gen).to(DEVICE)
    x = x_wide[:, :H]  # row stride > H
    out = poisoned((num_rows, H), dtype)
    routing.permute(x, row_id_map, offsets, tpe, out)
    assert_bits_equal(out, permute_ref(x.cpu(), row_id_map.cpu(), num_rows))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float64, torch.int32, torch.uint8])
def test_permute_any_element_size(dtype):
    T, H, k, E, capacity, align = 13, 130, 2, 4, 3, 4
    gen = torch.Generator().manual_seed(3)
    row_id_map, tpe, offsets, num_rows = make_plan(T, k, E, capacity, align, gen)
    if dtype.is_floating_point:
        x = random_bits((T, H), dtype, gen).to(DEVICE)
    else:
        x = torch.randint(0, 200, (T, H), generator=gen).to(dtype).to(DEVICE)
    out = poisoned((num_rows, H), dtype)
    routing.permute(x, row_id_map, offsets, tpe, out)
    assert_bits_equal(out, permute_ref(x.cpu(), row_id_map.cpu(), num_rows))


# ----------------------------------------------------------------------------------------------
# unpermute and its backward
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("with_probs", [True, False])
def test_unpermute(shape, dtype, with_probs):
    T, H, k, E, capacity, align = shape
    gen = torch.Generator().manual_seed(T * 7 + H + k)
    row_id_map, tpe, offsets, num_rows = make_plan(T, k, E, capacity, align, gen)
    y = torch.randn(num_rows, H + 3, generator=gen).to(dtype).to(DEVICE)[:, :H]
    probs = torch.rand(T, k, generator=gen).to(DEVICE) if with_probs else None
    out = poisoned((T, H), dtype)
    routing.unpermute(y, row_id_map, probs, out)
    ref, sum_abs = unpermute_ref(y.cpu(), row_id_map.cpu(), None if probs is None else probs.cpu())
    assert_within_rounding(out, ref, sum_abs, k, acc_eps(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("with_probs", [True, False])
def test_unpermute_bwd(shape, dtype, with_probs):
    T, H, k, E, capacity, align = shape
    gen = torch.Generator().manual_seed(T * 11 + H + k)
    row_id_map, tpe, offsets, num_rows = make_plan(T, k, E, capacity, align, gen)
    grad_out = torch.randn(T, H + 2, generator=gen).to(dtype).to(DEVICE)[:, :H]
    y = torch.randn(num_rows, H, generator=gen).to(dtype).to(DEVICE) if with_probs else None
    probs = torch.rand(T, k, generator=gen).to(DEVICE) if with_probs else None
    grad_y = poisoned((num_rows, H), dtype)
    grad_probs = torch.full((T, k), 123.0, device=DEVICE) if with_probs else None
    routing.unpermute_bwd(grad_out, y, row_id_map, offsets, tpe, probs, grad_y, grad_probs)
    gy_ref, gp_ref, gp_abs = unpermute_bwd_ref(
        grad_out.cpu(), None if y is None else y.cpu(), row_id_map.cpu(),
        None if probs is None else probs.cpu(), num_rows)
    if with_probs:
        assert_within_rounding(grad_y, gy_ref, gy_ref.abs(), 1, acc_eps(dtype))
        assert_within_rounding(grad_probs, gp_ref, gp_abs, H, acc_eps(dtype))
    else:  # a pure copy
        assert_bits_equal(grad_y, gy_ref.to(dtype))


def test_unpermute_bwd_grad_probs_without_probs():
    """grad_probs requested with probs None: grad_y is still a bit-exact copy."""
    T, H, k, E = 13, 7, 2, 4
    gen = torch.Generator().manual_seed(4)
    row_id_map, tpe, offsets, num_rows = make_plan(T, k, E, None, 2, gen)
    grad_out = torch.randn(T, H, generator=gen).to(DEVICE)
    y = torch.randn(num_rows, H, generator=gen).to(DEVICE)
    grad_y = poisoned((num_rows, H), torch.float32)
    grad_probs = torch.full((T, k), 123.0, device=DEVICE)
    routing.unpermute_bwd(grad_out, y, row_id_map, offsets, tpe, None, grad_y, grad_probs)
    gy_ref, gp_ref, gp_abs = unpermute_bwd_ref(grad_out.cpu(), y.cpu(), row_id_map.cpu(), None,
                                               num_rows)
    assert_bits_equal(grad_y, gy_ref.float())
    assert_within_rounding(grad_probs, gp_ref, gp_abs, H, acc_eps(torch.float32))
