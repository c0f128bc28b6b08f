"""quantize_fp8 / dequantize_fp8 / smooth_scales: the reference against a plain loop, every compiled
backend bit for bit against the reference, casts at the rounding boundaries, saturation, SQNR, NaN,
errors, opcheck. The grouped GEMM, permute and compile: test_fp8_gemm.py."""

from __future__ import annotations

import importlib

import pytest
import torch

import compass_kernels as ck
from compass_kernels.fp8_ref import FP8_MAX, GRANULARITIES, dequantize_fp8_ref, quantize_fp8_ref, scale_shape

from helpers import bits, skip_missing_triton

fp8 = importlib.import_module("compass_kernels.fp8")

FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
IN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [
    (1, 1),
    (1, 300),            # M = 1, K not a multiple of 128
    (7, 129),
    (130, 257),          # partial blocks and tiles in both dims
    (3, 2, 129),         # batched
    (2, 3, 5, 40),       # rank 4
    (0, 5),              # M = 0
    (4, 0),              # K = 0
]


def spanning(shape, dtype=torch.float32, lo=-3.0, hi=3.0) -> torch.Tensor:
    """Random signs and magnitudes log-uniform in [10^lo, 10^hi], a few all-zero rows."""
    mag = 10.0 ** (torch.rand(shape) * (hi - lo) + lo)
    x = torch.where(torch.rand(shape) < 0.5, -mag, mag)
    if len(shape) >= 2 and shape[-2] > 2:
        x[..., 1, :] = 0.0
    return x.to(dtype)


def assert_bitexact(got, want) -> None:
    (gd, gs), (wd, ws) = got, want
    assert gd.dtype == wd.dtype and gd.shape == wd.shape and gs.shape == ws.shape and gs.dtype == torch.float32
    mismatch = bits(gd) != bits(wd)
    assert not mismatch.any(), f"{int(mismatch.sum())} codes differ, first at {mismatch.nonzero()[0].tolist()}"
    assert torch.equal(bits(gs), bits(ws)), (gs, ws)


def loop_oracle(x, granularity, bs, dtype):
    """One group at a time, by slicing: independent of the reference's padding and reshapes."""
    fmax = torch.tensor(FP8_MAX[dtype])
    xf = x.float()
    *lead, M, K = xf.shape
    data = torch.empty(xf.shape, dtype=dtype)
    scale = torch.empty(scale_shape(xf.shape, granularity, bs))
    rb = {"tensor": max(M, 1), "row": 1, "block": 1, "block2d": bs}[granularity]
    cb = {"tensor": max(K, 1), "row": max(K, 1), "block": bs, "block2d": bs}[granularity]
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in lead]).reshape(-1, len(lead)).tolist() if lead else [[]]:
        xi, di, si = xf[tuple(idx)], data[tuple(idx)], scale[tuple(idx)]
        for i, r0 in enumerate(range(0, max(M, 1), rb)):
            for j, c0 in enumerate(range(0, max(K, 1), cb)):
                g = xi[r0: r0 + rb, c0: c0 + cb]
                if granularity in ("row", "block") and M == 0 or granularity in ("block", "block2d") and K == 0 \
                        or granularity == "block2d" and M == 0:
                    continue
                amax = g.abs().max() if g.numel() else torch.tensor(0.0)
                s = torch.clamp(amax, min=1e-12) / fmax
                di[r0: r0 + rb, c0: c0 + cb] = (g / s).clamp(-fmax, fmax).to(dtype)
                if granularity == "tensor":
                    si.fill_(s)
                elif granularity == "row":
                    si[r0] = s
                elif granularity == "block":
                    si[r0, j] = s
                else:
                    si[i, j] = s
    return data, scale


# ---------------------------------------------------------------------------------------------
# the reference


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", [(1, 300), (7, 129), (3, 2, 40), (0, 5), (4, 0)], ids=str)
def test_reference_matches_loop(shape, granularity, dtype):
    x = spanning(shape)
    bs = 16
    assert_bitexact(quantize_fp8_ref(x, granularity, bs, dtype), loop_oracle(x, granularity, bs, dtype))


# ---------------------------------------------------------------------------------------------
# compiled backends against the reference, bit for bit


@pytest.mark.parametrize("in_dtype", IN_DTYPES, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_bitexact(kernel_backend, shape, granularity, in_dtype):
    skip_missing_triton(kernel_backend)
    x = spanning(shape, in_dtype)
    cases = [(dtype, bs) for dtype in FP8_DTYPES for bs in (128, 16)]
    if kernel_backend == "triton":
        # The interpreter runs a Python pass per program (~50x the CPU kernel's time here): one
        # format and block size per input dtype; tests/kernels/triton/test_fp8_triton.py goes deeper.
        cases = [cases[IN_DTYPES.index(in_dtype)]]
    for dtype, bs in cases:
        q = ck.quantize_fp8(x, granularity=granularity, block_size=bs, dtype=dtype)
        assert (q.granularity, q.block_size) == (granularity, bs)
        assert_bitexact((q.data, q.scale), quantize_fp8_ref(x, granularity, bs, dtype))


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_bitexact_large(kernel_backend, in_dtype):
    """Past 256 KiB the CPU kernel runs OpenMP-parallel (rows split across threads, each row
    prefetching the next): the small shapes above run it single-threaded."""
    if kernel_backend == "triton":
        pytest.skip("interpreter time; the Triton kernels' grids do not change with size")
    x = spanning((3, 300, 260), in_dtype)
    for granularity in GRANULARITIES:
        q = ck.quantize_fp8(x, granularity=granularity)
        assert_bitexact((q.data, q.scale), quantize_fp8_ref(x, granularity, 128, torch.float8_e4m3fn))


def test_quantize_streaming_codes_bitexact(kernel_backend):
    """Codes of >= 32 MiB in rows of a multiple of 64 bytes leave the cpu kernel through
    non-temporal stores (cpu/streaming.h; row and 1 x 128 block in the row pipeline, and the
    tensor granularity's cast pass), odd M so the threads' row ranges differ in length, an inf and
    a NaN row on the general cast between streamed rows."""
    if kernel_backend != "cpu":
        pytest.skip("the streaming threshold is the cpu kernel's; other backends run the small shapes")
    x = spanning((4097, 8192), torch.bfloat16)
    assert x.shape[0] * x.shape[1] >= 32 << 20
    for granularity in ("row", "block", "tensor"):
        q = ck.quantize_fp8(x, granularity=granularity)
        assert_bitexact((q.data, q.scale), quantize_fp8_ref(x, granularity, 128, torch.float8_e4m3fn))
    x[1000, 77], x[3001, 4000] = float("inf"), float("nan")
    for granularity in ("row", "block"):
        q = ck.quantize_fp8(x, granularity=granularity)
        assert_bitexact((q.data, q.scale), quantize_fp8_ref(x, granularity, 128, torch.float8_e4m3fn))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_quantize_float64_is_fp32_first(kernel_backend, granularity):
    skip_missing_triton(kernel_backend)
    x = spanning((9, 70), torch.float64)
    q = ck.quantize_fp8(x, granularity=granularity, block_size=32)
    assert_bitexact((q.data, q.scale), quantize_fp8_ref(x.float(), granularity, 32, torch.float8_e4m3fn))


def test_quantize_strided_inputs(kernel_backend):
    """A row stride wider than K, a transposed (copied) input and an expanded batch."""
    skip_missing_triton(kernel_backend)
    wide = spanning((3, 8, 150))
    cases = [wide[:, :, 17:117], wide[1].t(), spanning((1, 5, 33)).expand(3, 5, 33), wide[:, 2:3, :]]
    for x in cases:
        for granularity in GRANULARITIES:
            q = ck.quantize_fp8(x, granularity=granularity, block_size=32)
            assert_bitexact((q.data, q.scale), quantize_fp8_ref(x, granularity, 32, torch.float8_e4m3fn))


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
def test_cast_at_rounding_boundaries(kernel_backend, dtype):
    """With amax = fmax the scale is exactly 1, so the codes are the cast itself: every code, every
    midpoint between neighbours (ties to even) and the three floats either side of it, subnormals
    and -0 included, every bfloat16 value in range, against torch's own float -> fp8 cast. (The
    cpu kernel takes its in-range cast here, common/fp8.h, checked exhaustively when written.)"""
    skip_missing_triton(kernel_backend)
    fmax = FP8_MAX[dtype]
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[grid.isfinite()].unique().double()                                  # sorted, +-0 merged
    mids = ((grid[1:] + grid[:-1]) / 2).float()
    near = [mids]
    up, down = mids, mids
    for _ in range(3):
        up, down = up.nextafter(torch.tensor(float("inf"))), down.nextafter(torch.tensor(-float("inf")))
        near += [up, down]
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    vals = torch.cat([grid.float(), torch.tensor([-0.0]), *near, every_bf16[every_bf16.isfinite()],
                      torch.rand(4096) * 2 * fmax - fmax])
    x = torch.cat([torch.tensor([fmax]), vals[vals.abs() <= fmax]])[None]             # [1, n]
    q = ck.quantize_fp8(x, granularity="row", dtype=dtype)
    assert q.scale.item() == 1.0
    assert torch.equal(bits(q.data), bits(x.to(dtype)))


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_saturation(kernel_backend, granularity, dtype):
    """Huge values (up to 3e38) and results that round past fmax saturate to +-fmax: never NaN or inf."""
    skip_missing_triton(kernel_backend)
    fmax = FP8_MAX[dtype]
    x = spanning((5, 200), lo=30.0, hi=38.0)
    x[0, 3], x[4, 150] = 3e38, -3.4e38
    q = ck.quantize_fp8(x, granularity=granularity, block_size=64, dtype=dtype)
    codes = q.data.float()
    assert codes.isfinite().all() and codes.abs().max().item() == fmax
    assert q.data[4, 150].float().item() == -fmax                       # the amax of every granularity
    assert_bitexact((q.data, q.scale), quantize_fp8_ref(x, granularity, 64, dtype))


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("granularity", ["row", "block"])
def test_round_trip_sqnr(kernel_backend, granularity, in_dtype):
    """torchao's criterion for casts: >= 25 dB for e4m3 (measured ~31). e5m2 keeps one mantissa bit
    fewer, ~6 dB less (measured ~25), so it gets 19 dB."""
    skip_missing_triton(kernel_backend)
    x = (torch.randn(64, 1000) * torch.logspace(-2, 2, 1000)).to(in_dtype)            # column outliers
    for dtype, floor in ((torch.float8_e4m3fn, 25.0), (torch.float8_e5m2, 19.0)):
        q = ck.quantize_fp8(x, granularity=granularity, dtype=dtype)
        xf, err = x.double(), ck.dequantize_fp8(q, torch.float64) - x.double()
        sqnr = 10 * torch.log10(xf.pow(2).sum() / err.pow(2).sum()).item()
        assert sqnr >= floor, (dtype, sqnr)


def test_nan_is_visible(kernel_backend):
    skip_missing_triton(kernel_backend)
    x = torch.randn(2, 6, 300)
    x[1, 2, 200] = float("nan")
    for granularity, where in (("tensor", (1,)), ("row", (1, 2)), ("block", (1, 2, 1)), ("block2d", (1, 0, 1))):
        q = ck.quantize_fp8(x, granularity=granularity)
        assert q.data[1, 2, 200].float().isnan()
        nan_scales = q.scale.isnan().nonzero().tolist()
        assert nan_scales == [list(where)], (granularity, nan_scales)
        assert not q.data[0].float().isnan().any()                   # other groups untouched
        assert_bitexact((q.data, q.scale), quantize_fp8_ref(x, granularity, 128, torch.float8_e4m3fn))


def test_zeros_and_tiny(kernel_backend):
    """All-zero groups give zero codes with the floor scale 1e-12 / fmax; nothing divides by zero."""
    skip_missing_triton(kernel_backend)
    x = torch.zeros(3, 130)
    x[2, :] = 1e-30
    for granularity in GRANULARITIES:
        q = ck.quantize_fp8(x, granularity=granularity)
        assert (q.data.float() == 0).all()
        assert torch.equal(q.scale, torch.full_like(q.scale, torch.tensor(1e-12) / 448))


def test_batched_equals_per_matrix(kernel_backend):
    """Leading dims are a batch: quantizing [E, N, K] at once equals quantizing each expert alone."""
    skip_missing_triton(kernel_backend)
    w = spanning((3, 70, 100))
    for granularity in GRANULARITIES:
        q = ck.quantize_fp8(w, granularity=granularity, block_size=32)
        for e in range(3):
            qe = ck.quantize_fp8(w[e], granularity=granularity, block_size=32)
            assert_bitexact((q.data[e], q.scale[e]), (qe.data, qe.scale))


# ---------------------------------------------------------------------------------------------
# dequantize, Fp8Tensor, smooth_scales


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_dequantize(granularity):
    x = spanning((2, 140, 300))
    q = ck.quantize_fp8(x, granularity=granularity)
    exact = dequantize_fp8_ref(q.data, q.scale, granularity, 128, torch.float64)
    assert torch.equal(ck.dequantize_fp8(q, torch.float64), exact)            # fp8 x fp32 is exact in fp64
    got = q.dequantize()
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), exact, rtol=2**-24, atol=0)
    assert ck.dequantize_fp8(q, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_tensor_fields():
    q = ck.quantize_fp8(torch.randn(4, 10, 300), granularity="block2d", block_size=64, dtype=torch.float8_e5m2)
    assert q.shape == (4, 10, 300) and q.dtype == torch.float8_e5m2 and q.device.type == "cpu"
    assert q.scale.shape == (4, 1, 5) and q.fmax == 57344.0 and q.dim() == 3
    with pytest.raises(ValueError, match=r"Fp8Tensor.scale must have shape \(4, 1, 5\)"):
        ck.Fp8Tensor(q.data, q.scale[:, :, :4], "block2d", 64)
    with pytest.raises(TypeError, match=r"Fp8Tensor.data must be a float8_e4m3fn or float8_e5m2 tensor"):
        ck.Fp8Tensor(q.data.float(), q.scale, "block2d", 64)
    with pytest.raises(TypeError, match=r"Fp8Tensor.scale must be a float32 tensor"):
        ck.Fp8Tensor(q.data, q.scale.double(), "block2d", 64)
    with pytest.raises(ValueError, match=r"granularity must be one of"):
        ck.Fp8Tensor(q.data, q.scale, "tile", 64)


def test_smooth_scales():
    a, w = torch.rand(64) * 10, torch.rand(64)
    a[3], w[5] = 0.0, 0.0
    s = ck.smooth_scales(a, w)
    assert s.dtype == torch.float32 and s.shape == (64,) and s.isfinite().all() and (s > 0).all()
    ok = (a > 1e-5) & (w > 1e-5)
    torch.testing.assert_close(s[ok].double() ** 2, a[ok].double() / w[ok].double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ck.smooth_scales(a, w, alpha=1.0), a.clamp(min=1e-5))
    # The product is unchanged: (X / s) @ (W * s)^T == X @ W^T.
    X, W = torch.randn(8, 64, dtype=torch.float64), torch.randn(16, 64, dtype=torch.float64)
    sd = s.double()
    torch.testing.assert_close((X / sd) @ (W * sd).t(), X @ W.t())


# ---------------------------------------------------------------------------------------------
# errors, registration


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"granularity must be one of 'tensor', 'row', 'block', 'block2d', got 'col'"):
        ck.quantize_fp8(x, granularity="col")
    with pytest.raises(TypeError, match=r"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got torch.int8"):
        ck.quantize_fp8(x, dtype=torch.int8)
    with pytest.raises(TypeError, match=r"x must be float32, bfloat16, float16 or float64, got torch.int32"):
        ck.quantize_fp8(x.int())
    with pytest.raises(ValueError, match=r"x must have rank >= 2 \[..., M, K\], got shape \(8,\)"):
        ck.quantize_fp8(x[0])
    with pytest.raises(ValueError, match=r"block_size must be an int >= 1, got 0"):
        ck.quantize_fp8(x, granularity="block", block_size=0)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        ck.quantize_fp8([[1.0]])
    with pytest.raises(TypeError, match=r"q must be an Fp8Tensor"):
        ck.dequantize_fp8(x)
    with pytest.raises(ValueError, match=r"act_amax and weight_amax must have the same shape"):
        ck.smooth_scales(torch.rand(4), torch.rand(5))
    with pytest.raises(ValueError, match=r"alpha must be a float in \[0, 1\], got 1.5"):
        ck.smooth_scales(torch.rand(4), torch.rand(4), alpha=1.5)
    with pytest.raises(ValueError, match=r"act_amax must be 1-D \[K\]"):
        ck.smooth_scales(torch.rand(4, 1), torch.rand(4))


@pytest.mark.skipif(not fp8._CPU_QUANT, reason="compass_kernels._cpu has no quantize_fp8")
def test_cpu_entry_point_checks():
    m = fp8._ext.cpu
    x = torch.randn(4, 8)
    d, s = torch.empty(4, 8, dtype=torch.float8_e4m3fn), torch.empty(4)
    sizes = {"B": 1, "M": 4, "K": 8, "stride_b": 32, "block_size": 128, "scale": s}
    with pytest.raises(ValueError, match=r"granularity must be 0 \(tensor\), 1 \(row\), 2 \(block\) or 3"):
        m.quantize_fp8(x=x, granularity=7, data=d, **sizes)
    with pytest.raises(ValueError, match=r"out_dtype must be float8_e4m3fn or float8_e5m2, got code 0"):
        m.quantize_fp8(x=x, granularity=1, data=torch.empty(4, 8), **sizes)
    with pytest.raises(ValueError, match=r"stride_m must be >= H = 8"):
        m.quantize_fp8(x=x.as_strided((4, 8), (4, 1)), granularity=1, data=d, **sizes)
    with pytest.raises(ValueError, match=r"x must be float32, bfloat16 or float16, got code 1 \(float64\)"):
        m.quantize_fp8(x=x.double(), granularity=1, data=d, **sizes)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_opcheck_quantize(granularity):
    for x in (torch.randn(5, 40), torch.randn(2, 3, 17).to(torch.bfloat16)):
        torch.library.opcheck(fp8._quantize_op.op, (x, granularity, 16, torch.float8_e4m3fn))
    torch.library.opcheck(fp8._quantize_op.op, (torch.randn(3, 9), granularity, 128, torch.float8_e5m2))
