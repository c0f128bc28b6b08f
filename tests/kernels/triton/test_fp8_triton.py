"""Triton FP8 kernels (compass_kernels.triton.fp8) against the references of fp8_ref.

Quantization must match quantize_fp8_ref bit for bit (codes and scales; NaN compared as NaN,
whatever its payload). The FP8 grouped GEMM must match the fp64 grouped product of the
dequantized operands within the error of fp32 accumulation.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set here unless the
environment already chose); with TRITON_INTERPRET=0 on a CUDA machine the same tests run the
compiled kernels (native fp32 -> fp8 casts and fp8 wgmma) on the GPU. Outputs are poisoned, so
an element or scale the kernel forgets to write fails.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from compass_kernels.fp8_ref import (FP8_MAX, grouped_gemm_fp8_ref, quantize_fp8_ref,  # noqa: E402
                                     scale_shape)
from compass_kernels.triton import fp8 as tf  # noqa: E402
from compass_kernels.triton import grouped_gemm as gg  # noqa: E402
from fp8_bounds import calc_diff, fp8_accumulation_bound  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
GRANS = ["tensor", "row", "block", "block2d"]


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------

def run_quantize(x, granularity, block_size, dtype, config=None):
    """(data, scale) from the Triton kernels for x [..., M, K] (as the op layer calls them)."""
    *lead, M, K = x.shape
    B = math.prod(lead)
    x3 = x.reshape(B, M, K)
    data = torch.full((B, M, K), 0x55, dtype=torch.uint8, device=x.device).view(dtype)
    scale = torch.full(scale_shape((B, M, K), granularity, block_size), float("nan"),
                       device=x.device)
    tf.quantize(x3, granularity, block_size, FP8_MAX[dtype], data, scale, config)
    return (data.view(*x.shape),
            scale.view(scale_shape(x.shape, granularity, block_size)))


def assert_codes_equal(got, ref):
    """Same fp8 bits everywhere, except that any NaN code equals any other (the GPU's cvt
    returns the canonical 0x7F, torch keeps the NaN's sign)."""
    got, ref = got.cpu(), ref.cpu()
    nan_g, nan_r = got.float().isnan(), ref.float().isnan()
    assert torch.equal(nan_g, nan_r), f"NaN codes at {(nan_g != nan_r).nonzero()[:5].tolist()}"
    g, r = got.view(torch.uint8), ref.view(torch.uint8)
    bad = (g != r) & ~nan_r
    assert not bad.any(), (f"{int(bad.sum())} codes differ, first at {bad.nonzero()[0].tolist()}: "
                           f"{got[bad][:4].float().tolist()} vs {ref[bad][:4].float().tolist()}")


def check_quantize(x, granularity, block_size, dtype, config=None):
    data, scale = run_quantize(x, granularity, block_size, dtype, config)
    ref_data, ref_scale = quantize_fp8_ref(x.cpu(), granularity, block_size, dtype)
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=0, atol=0, equal_nan=True)
    assert_codes_equal(data, ref_data)
    return data, scale


def awkward(shape, dtype, gen):
    """Values spanning 1e-3 .. 1e3 (per column), an all-zero row, negative zeros and a zero
    block at the start of the last row (scale floor, codes +-0)."""
    *lead, M, K = shape
    x = torch.randn(*shape, generator=gen) * torch.logspace(-3, 3, max(K, 1))[:K]
    x = x * torch.logspace(-1, 1, max(M, 1))[:M, None]  # rows of different magnitude too
    if M > 1:
        x[..., 1, :] = 0.0
    x[..., -1, : min(K, 40)] = -0.0
    return x.to(dtype).to(DEVICE)


# (B, M, K, block_size): K not a multiple of the block, M = 1, K = 1, more than one block
# row, a block size that is not a power of two.
QSHAPES = [(1, 1, 1, 128), (2, 1, 300, 128), (1, 37, 129, 128), (3, 5, 70, 32),
           (1, 70, 200, 64), (2, 9, 50, 24)]


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("shape", QSHAPES, ids=lambda s: "B{}-M{}-K{}-bs{}".format(*s))
def test_quantize_matches_ref(granularity, shape):
    B, M, K, bs = shape
    gen = torch.Generator().manual_seed(B * 1000 + M * 10 + K)
    for in_dtype, dtype in ((torch.float32, E4M3), (torch.bfloat16, E4M3),
                            (torch.float16, E5M2), (torch.float32, E5M2)):
        x = awkward((B, M, K), in_dtype, gen)
        check_quantize(x, granularity, bs, dtype)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_rounding(dtype):
    """Every representable value, every midpoint between neighbours (ties go to even) and the
    subnormal range: a row whose amax is fmax has scale 1, so x / scale is x itself."""
    fmax = FP8_MAX[dtype]
    codes = torch.arange(0, 256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    v = codes[torch.isfinite(codes) & (codes >= 0)].unique().sort().values  # 0 .. fmax
    mids = (v[1:] + v[:-1]) / 2
    quarter = v[:-1] + (v[1:] - v[:-1]) / 4
    sub = torch.linspace(0, float(v[v > 0][0]) * 8, 97)
    vals = torch.cat([v, mids, quarter, sub])
    K = 64
    n = -(-vals.numel() // (K - 1))
    rows = torch.zeros(n * (K - 1))
    rows[: vals.numel()] = vals
    rows = rows.view(n, K - 1)
    x = torch.cat([torch.full((n, 1), fmax), rows], dim=1)
    x = torch.cat([x, -x]).to(DEVICE)  # [2n, K], every row's amax is fmax
    data, scale = check_quantize(x, "row", 128, dtype)
    assert (scale == 1).all()


@pytest.mark.parametrize("granularity", GRANS)
def test_quantize_saturates(granularity):
    """Huge values stay finite, and each group's largest element maps to +-fmax exactly (about
    8% of amax values give amax / scale > fmax in fp32: the clamp catches those)."""
    gen = torch.Generator().manual_seed(7)
    M, K, bs = 64, 96, 32
    x = torch.randn(M, K, generator=gen) * 10 ** torch.empty(M, 1).uniform_(-5, 5, generator=gen)
    x[0, :4] = torch.tensor([3.0e38, -3.0e38, 1e30, -1e30])
    x[1] = torch.finfo(torch.float32).max
    for dtype in (E4M3, E5M2):
        data, _ = check_quantize(x.to(DEVICE), granularity, bs, dtype)
        q = data.cpu().float()
        assert torch.isfinite(q).all() and q.abs().max() == FP8_MAX[dtype]
        if granularity == "row":
            assert (q.abs().amax(dim=1) == FP8_MAX[dtype]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on NaN inside the interpreter
@pytest.mark.parametrize("granularity", GRANS)
def test_quantize_nan_and_inf_visible(granularity):
    """A NaN makes its group's scale NaN and all its codes NaN; an inf makes the scale inf, its
    code NaN and the others 0 -- exactly as the reference. Other groups are untouched."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 40, 70, generator=gen)
    x[0, 3, 5] = float("nan")
    x[1, 20, 66] = float("inf")
    x = x.to(DEVICE)
    for dtype in (E4M3, E5M2):
        data, scale = check_quantize(x, granularity, 32, dtype)
        assert scale.isnan().any() and data.float().isnan().any()
        assert not scale[1].isnan().any() and not scale[0].isinf().any()


def test_quantize_strided_and_batched():
    """Row and matrix strides larger than the data (a slice of a wider buffer), leading batch
    dims, bf16 and fp16 inputs."""
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(3, 50, 150, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        x3 = full.to(dtype).to(DEVICE)[:, 4:41, 7:136]  # [3, 37, 129], strides (7500, 150, 1)
        for gran in GRANS:
            check_quantize(x3, gran, 64, E4M3)
    x5 = torch.randn(2, 3, 17, 40, generator=gen).to(torch.float16).to(DEVICE)
    for gran in GRANS:
        check_quantize(x5, gran, 16, E4M3)


@pytest.mark.parametrize("granularity,config", [
    ("row", tf.QuantConfig(2, 1, 64, 4, two_pass=True)),    # rows longer than registers hold
    ("row", tf.QuantConfig(4, 1, 512, 4)),
    ("block", tf.QuantConfig(2, 4, 32, 4)),                 # several blocks per program
    ("block", tf.QuantConfig(8, 1, 32, 2)),
    ("tensor", tf.QuantConfig(2, 1, 64, 4)),                # many partials, K in chunks
])
def test_quantize_configs(monkeypatch, granularity, config):
    monkeypatch.setattr(tf, "_MAX_PARTIALS", 4)  # tensor: each partial program loops over tiles
    gen = torch.Generator().manual_seed(5)
    x = awkward((2, 37, 300), torch.float32, gen)
    check_quantize(x, granularity, 32, E4M3, config)


def test_quantize_empty():
    """No rows or no columns: empty outputs; tensor and row scales of nothing are the floor."""
    for shape in ((2, 0, 5), (2, 3, 0), (0, 4, 4)):
        x = torch.randn(*shape).to(DEVICE)
        for gran in GRANS:
            check_quantize(x, gran, 128, E4M3)


def test_quant_config_heuristic():
    for gran in GRANS:
        for M, K in ((8192, 4096), (1, 7168), (4096, 100000), (3, 5)):
            cfg = tf.quant_config(gran, M, K, 128)
            assert cfg.block_m * cfg.nb * cfg.gp <= max(tf._ROW_MAX, tf._TILE)
            if gran in ("block", "block2d"):
                assert cfg.gp >= 128
            if gran == "row":
                assert cfg.two_pass == (K > tf._ROW_MAX)
    with pytest.raises(ValueError, match="power of two"):
        tf.QuantConfig(3, 1, 64, 4)


# ----------------------------------------------------------------------------------------------
# FP8 grouped GEMM
# ----------------------------------------------------------------------------------------------

TINY = gg.GemmConfig(16, 16, 32, num_warps=4, num_stages=2)    # many tiles and K steps
WIDE_N = gg.GemmConfig(16, 64, 32, num_warps=4, num_stages=2)  # n-tile spans two w blocks of 32


def make_offsets(M, E, kind, gen):
    """full: groups cover [0, M) with an empty group; gaps: head and tail rows outside every
    group; one: all rows in one expert; empty: no rows in any group."""
    if kind == "one":
        offs = [0] * (E // 2 + 1) + [M] * (E - E // 2)
    elif kind == "empty":
        offs = [M // 2] * (E + 1)
    else:
        lo, hi = (0, M) if kind == "full" else (min(M, 1 + M // 10), max(0, M - 1 - M // 7))
        hi = max(lo, hi)
        cuts = sorted(torch.randint(lo, hi + 1, (E - 1,), generator=gen).tolist())
        offs = [lo] + cuts + [hi]
        if E >= 3 and kind == "full":
            offs[E // 2] = offs[E // 2 + 1]
    return torch.tensor(offs, dtype=torch.int64, device=DEVICE)


def quantized_operands(M, N, K, E, x_gran, w_gran, bs, gen):
    """(x, w) fresh random [M, K] and [E, N, K] with per-row magnitudes spread over 1e-2..1e2,
    and their (data, scale) from the reference quantizer."""
    x = torch.randn(M, K, generator=gen) * 10 ** torch.empty(M, 1).uniform_(-2, 2, generator=gen)
    w = torch.randn(E, N, K, generator=gen) * 10 ** torch.empty(E, N, 1).uniform_(-1, 1,
                                                                                  generator=gen)
    xq = quantize_fp8_ref(x, x_gran, bs, E4M3)
    wq = quantize_fp8_ref(w, w_gran, bs, E4M3)
    return x, w, xq, wq


def run_gemm(xq, x_gran, wq, w_gran, offsets, bs, out_dtype, config=None):
    (xd, xs), (wd, ws) = xq, wq
    out = torch.full((xd.shape[0], wd.shape[1]), float("nan"), dtype=out_dtype, device=DEVICE)
    tf.grouped_gemm_fp8(xd.to(DEVICE), xs.to(DEVICE), x_gran, wd.to(DEVICE), ws.to(DEVICE),
                        w_gran, offsets, bs, out, config)
    return out


def check_gemm(xq, x_gran, wq, w_gran, offsets, bs, out_dtype, config=None):
    """|got - ref| <= rounding to out_dtype + the accumulation bound of tests/fp8_bounds.py: under
    the interpreter (K + 3 steps) fp32 roundings of sum |terms|, the worst case of fp32
    accumulation with per-step scaling; compiled on a GPU, Hopper's FP8 MMA keeps ~14 bits inside
    each k-step, which that bound adds (plus calc_diff < 1e-3). Interpreter gap: its fp32 -> 16-bit
    cast truncates, so a whole output ulp."""
    out = run_gemm(xq, x_gran, wq, w_gran, offsets, bs, out_dtype, config).cpu()
    (xd, xs), (wd, ws) = xq, wq
    o = offsets.cpu()
    ref = grouped_gemm_fp8_ref(xd, xs, x_gran, wd, ws, w_gran, o, bs, torch.float64,
                               torch.float64)
    ref_abs = grouped_gemm_fp8_ref(xd.float().abs().to(xd.dtype), xs, x_gran,
                                   wd.float().abs().to(wd.dtype), ws, w_gran, o, bs,
                                   torch.float64, torch.float64)
    K = xd.shape[1]
    eps_out = torch.finfo(out_dtype).eps
    rounding = eps_out if (INTERPRET and out_dtype.itemsize == 2) else eps_out / 2
    bound = rounding * ref.abs() + fp8_accumulation_bound(K, ref_abs, tensor_core=not INTERPRET)
    bound += torch.finfo(out_dtype).tiny
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or overflowed elements"
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}"
    if not INTERPRET:
        assert calc_diff(out, ref) < 1e-3
    outside = torch.cat([out[: int(o[0])], out[int(o[-1]):]])
    assert torch.equal(outside, torch.zeros_like(outside)), "rows outside the groups must be 0"
    return out


_KINDS = ["gaps", "full", "one", "empty"]
# (M, N, K, E, block_size): K not a multiple of the block or of BLOCK_K, K < BLOCK_K, M = 1,
# N not a multiple of the tile, one expert, empty groups.
GSHAPES = [(1, 24, 40, 1, 32), (37, 24, 200, 3, 64), (100, 40, 96, 8, 32), (64, 16, 33, 2, 32),
           (70, 72, 130, 5, 64)]


SCALES = [("row", "row"), ("block", "block2d"), ("row", "block2d"), ("block", "row")]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("scales", SCALES, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("shape", GSHAPES, ids=lambda s: "M{}-N{}-K{}-E{}-bs{}".format(*s))
def test_grouped_gemm_fp8(scales, shape):
    """Grouping pattern and tile config follow the shape, the output dtype cycles over
    (shape, scales) so that each scales pair meets every output dtype."""
    x_gran, w_gran = scales
    M, N, K, E, bs = shape
    gen = torch.Generator().manual_seed(M * 7919 + N * 31 + K * 7 + E)
    _, _, xq, wq = quantized_operands(M, N, K, E, x_gran, w_gran, bs, gen)
    i = GSHAPES.index(shape)
    offsets = make_offsets(M, E, _KINDS[i % 4], gen)
    config = (TINY, WIDE_N)[i % 2]
    out_dtype = OUT_DTYPES[(i + SCALES.index(scales)) % 3]
    check_gemm(xq, x_gran, wq, w_gran, offsets, bs, out_dtype, config)


@pytest.mark.parametrize("scales", [("row", "row"), ("block", "block2d")],
                         ids=lambda s: f"{s[0]}-{s[1]}")
def test_grouped_gemm_fp8_default_config_accuracy(scales):
    """The shipped 128 x 128 x 128 tiles (default heuristic) on 4 unaligned groups, and the
    DeepGEMM criterion calc_diff = 1 - 2 sum(xy) / sum(x^2 + y^2) < 1e-3 against the
    unquantized fp64 product."""
    x_gran, w_gran = scales
    gen = torch.Generator().manual_seed(17)
    M, N, K, E = 300, 160, 328, 4
    x, w, xq, wq = quantized_operands(M, N, K, E, x_gran, w_gran, 128, gen)
    offsets = torch.tensor([0, 77, 77, 201, 300], dtype=torch.int64, device=DEVICE)
    out = check_gemm(xq, x_gran, wq, w_gran, offsets, 128, torch.bfloat16)
    full = torch.cat([x[s:t].double() @ w[e].double().T
                      for e, (s, t) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])
    y = out.double()
    diff = 1 - 2 * (y * full).sum() / (y * y + full * full).sum()
    assert diff < 1e-3, f"calc_diff {diff:.2e}"


def test_grouped_gemm_fp8_scales_outside_groups_ignored():
    """Rows outside the groups get exact zeros even when their scales are NaN; a NaN scale of
    a grouped row shows in that row only."""
    gen = torch.Generator().manual_seed(23)
    M, N, K, E = 40, 24, 64, 2
    for x_gran, w_gran in (("row", "row"), ("block", "block2d")):
        _, _, (xd, xs), wq = quantized_operands(M, N, K, E, x_gran, w_gran, 32, gen)
        xs = xs.clone()
        xs[:5] = float("nan")   # head rows [0, 5)
        xs[35:] = float("nan")  # tail rows [35, 40)
        xs[20] = float("nan")   # a grouped row
        offsets = torch.tensor([5, 20, 35], dtype=torch.int64, device=DEVICE)
        out = run_gemm((xd, xs), x_gran, wq, w_gran, offsets, 32, torch.float32, TINY).cpu()
        assert torch.equal(out[:5], torch.zeros(5, N)) and torch.equal(out[35:], torch.zeros(5, N))
        assert out[20].isnan().all()
        assert torch.isfinite(torch.cat([out[5:20], out[21:35]])).all()


@pytest.mark.parametrize("chunk,programs", [(4, 1), (8, 3)])
def test_grouped_gemm_fp8_group_chunks(monkeypatch, chunk, programs):
    """More groups than one register chunk holds; few persistent programs."""
    monkeypatch.setattr(gg, "_GROUP_CHUNK", chunk)
    monkeypatch.setattr(gg, "_INTERPRET_PROGRAMS", programs)
    if not INTERPRET:
        monkeypatch.setattr(tf, "_num_programs", lambda device: programs)
    gen = torch.Generator().manual_seed(chunk + programs)
    M, N, K, E = 60, 16, 64, 13
    _, _, xq, wq = quantized_operands(M, N, K, E, "block", "block2d", 32, gen)
    check_gemm(xq, "block", wq, "block2d", make_offsets(M, E, "gaps", gen), 32, torch.float32,
               TINY)


def test_fp8_gemm_config():
    for mpg, N, K in ((8192, 4096, 7168), (64, 1024, 2048), (128, 32, 512)):
        cfg = tf.fp8_gemm_config(mpg, N, K)
        stage = (cfg.block_m + cfg.block_n) * cfg.block_k  # 1-byte operands
        assert cfg.num_stages * stage <= 200 * 1024
    assert tf._fp8_block_k(128, 128) == 128 and tf._fp8_block_k(128, 64) == 64
    assert tf._fp8_block_k(128, 96) == 32


def test_grouped_gemm_fp8_degenerate():
    """No experts (every row zero), K = 0 (zeros in the groups too), one row."""
    gen = torch.Generator().manual_seed(29)
    for M, N, K, E, offs in ((5, 8, 32, 0, [2]), (6, 8, 0, 2, [1, 3, 5]), (1, 8, 40, 2, [0, 1, 1])):
        for x_gran, w_gran in (("row", "row"), ("block", "block2d")):
            _, _, xq, wq = quantized_operands(M, N, K, E, x_gran, w_gran, 32, gen)
            offsets = torch.tensor(offs, dtype=torch.int64, device=DEVICE)
            check_gemm(xq, x_gran, wq, w_gran, offsets, 32, torch.float32, TINY)
