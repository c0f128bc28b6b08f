"""Triton FP8 kernels: fused quantization and the FP8 grouped GEMM (per-row and blockwise scales).

quantize          x [B, M, K] (fp32/bf16/fp16, stride(-1) == 1) -> data [B, M, K] float8 (e4m3fn or
                  e5m2) and fp32 scales, per granularity:
                    tensor  [B]                             one scale per matrix
                    row     [B, M]                          one per row
                    block   [B, M, ceil(K/bs)]              1 x bs blocks (DeepSeek activations)
                    block2d [B, ceil(M/bs), ceil(K/bs)]     bs x bs blocks (DeepSeek weights)
                  scale = max(amax, 1e-12) / fmax, data = cast(clamp(x / scale, -fmax, fmax)),
                  computed in fp32 with a true division (not a reciprocal multiply), so the codes
                  and scales match the torch reference bit for bit.
grouped_gemm_fp8  out[offsets[e]:offsets[e+1]] = (x_q * sx) @ (w_q[e] * sw[e])^T, fp32 accumulation;
                  x "row" or "block" (1 x bs) scales, w "row" (per output channel) or "block2d";
                  rows outside [offsets[0], offsets[E]) are written as zeros.

Quantization reads x once for row, block and block2d: one program holds whole scale groups in
registers ([BLOCK_M, NB, GP] tiles: BLOCK_M rows x NB groups of GP >= group columns; block2d
reduces the amax over the rows too), computes amax, scale and codes and writes both. Rows longer
than _ROW_MAX elements do not fit in registers and are read twice (the second read mostly hits
L2). Tensor granularity takes two launches: per-program partial maxima, then the cast kernel,
whose programs each reduce the (at most _MAX_PARTIALS) partials of their matrix, so nothing waits
on the host.

NaN. tl.max and tl.maximum ignore NaN on the GPU (max.f32) but propagate it in the interpreter
(np.maximum), so NaN is handled explicitly: reductions OR an isnan flag into the amax (_amax),
elementwise maxima say propagate_nan=ALL. A NaN in a scale group makes its amax and scale NaN,
hence all its codes NaN, as in the torch reference (amax, clamp and divide all propagate NaN).
The final clamp propagates it too; the GPU's cvt.rn.satfinite keeps NaN as NaN.

Interpreter gaps (measured with Triton 3.9). Its fp32 -> fp8 cast rounds half up on the mantissa
without carrying into the exponent (124.7 -> 64 instead of 128 in e4m3), and turns NaN into a
finite code. On CPU tensors (only possible under the interpreter) the kernel therefore builds the
code in integer arithmetic (_fp8_code: round to nearest even, subnormals, NaN) and bit-casts it;
on the GPU it is one cvt.rn.satfinite per two values. Its fp8 tl.dot upcasts to fp16 and is exact
for e4m3, but mis-decodes e5m2 subnormals (the GEMM tests use e4m3, like the serving path).

GEMM schedule: the colleague's persistent grouped GEMM (grouped_gemm.py): rows cut into a zero
head group, the E experts and a zero tail group, tiles mapped to groups on the device, one launch.
Accumulation: Hopper's fp8 wgmma keeps only ~14 bits in its accumulator (DeepSeek-V3, sec. 3.3.2),
so every BLOCK_K (128) step is promoted into an fp32 register accumulator (acc += dot(a, b)), as
DeepGEMM does; the blockwise path scales the step's partial product there by sx[m, kb] * sw[n, kb]
(BLOCK_K divides the block size, so a step never straddles two scale blocks). Per-row scales are
an outer product applied once in the epilogue.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from compass_kernels.triton.launch import launch

from compass_kernels.triton.grouped_gemm import GemmConfig, _first_chunk, _group_chunk, _num_programs, _tile

_MODE = {"row": 0, "block": 0, "block2d": 1, "tensor": 2}  # scale modes of _quantize_kernel
_TILE = 8192          # elements per quantization program: 32 per thread at 8 warps
_ROW_MAX = 16384      # longest row held in registers (64 fp32 per thread at 8 warps)
_MAX_PARTIALS = 1024  # partial maxima per matrix for tensor scales (4 KB read by each cast program)

# (mantissa bits, smallest normal exponent, NaN code) of the fp8 formats, for _fp8_code
_FP8_FORMATS = {torch.float8_e4m3fn: (3, -6, 0x7F), torch.float8_e5m2: (2, -14, 0x7F)}


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantConfig:
    """Tile of one quantization program: block_m rows x nb scale groups of gp (>= group) columns;
    two_pass: rows longer than _ROW_MAX, streamed twice in gp-column chunks (row scales only)."""

    block_m: int
    nb: int
    gp: int
    num_warps: int
    two_pass: bool = False

    def __post_init__(self):
        for name in ("block_m", "nb", "gp"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.two_pass and self.nb != 1:
            raise ValueError("two_pass tiles hold one scale group (nb = 1)")


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _warps(elems: int) -> int:
    """4 .. 8 warps for 2K .. 8K+ elements, fewer for small tiles (>= 8 elements per thread)."""
    return max(1, min(8, elems // 1024))


@functools.lru_cache(maxsize=256)
def quant_config(granularity: str, M: int, K: int, block_size: int) -> QuantConfig:
    """Tile of the cast kernel (also of the tensor-granularity partial-max kernel)."""
    if granularity == "block2d":  # one bs x bs block per program (16K elements at bs = 128)
        gp = _pow2(block_size)
        return QuantConfig(gp, 1, gp, _warps(gp * gp))
    if granularity == "block":
        gp = _pow2(block_size)
        nb = min(_pow2(triton.cdiv(K, block_size)), max(1, _TILE // gp))
        return QuantConfig(min(_pow2(M), max(1, _TILE // (gp * nb))), nb, gp, _warps(_TILE))
    kp = _pow2(K)
    if granularity == "row" and kp > _ROW_MAX:
        return QuantConfig(1, 1, _TILE, _warps(_TILE), two_pass=True)
    if granularity == "tensor":
        kp = min(kp, _TILE)
    return QuantConfig(min(_pow2(M), max(1, _TILE // kp)), 1, kp, _warps(min(kp * _pow2(M), _TILE)))


@triton.jit
def _amax(a, axis: tl.constexpr):
    """Max of a (>= 0 or NaN) along axis, NaN if any element is NaN. tl.max ignores NaN on the
    GPU; a custom NaN-propagating combine would be right too, but the interpreter runs custom
    reductions element by element in Python (1.7 s for one 64 x 128 tile)."""
    has_nan = tl.max((a != a).to(tl.int32), axis) > 0
    return tl.where(has_nan, float("nan"), tl.max(a, axis))


@triton.jit
def _div(a, b):
    """a / b rounded to nearest (div.rn.f32), as torch divides: Triton's '/' on fp32 is
    div.full.f32 on the GPU, an approximation within 2 ulp that would change codes."""
    return tl.math.div_rn(a, b.broadcast_to(a.shape))


@triton.jit
def _scale(amax, fmax):
    """max(amax, 1e-12) / fmax, NaN kept."""
    a = tl.maximum(amax, 1e-12, propagate_nan=tl.PropagateNan.ALL)
    return _div(a, tl.full(a.shape, fmax, tl.float32))


@triton.jit
def _fp8_code(y, MANT: tl.constexpr, EMIN: tl.constexpr, NAN_CODE: tl.constexpr):
    """uint8 fp8 code of fp32 y (|y| <= fmax or NaN), rounded to nearest even: the interpreter's
    own cast is wrong (module docstring). Codes of normal and subnormal values are contiguous:
    with e = max(floor(log2|y|), EMIN) and r = rne(|y| / 2^(e - MANT)) in [0, 2^(MANT+1)], the
    code is (e - EMIN) << MANT + r, and r = 2^(MANT+1) carries into the next binade by itself."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = ((bits >> 24) & 0x80).to(tl.int32)
    e = tl.maximum(((bits >> 23) & 0xFF).to(tl.int32) - 127, EMIN)
    quantum = ((e - MANT + 127) << 23).to(tl.float32, bitcast=True)  # exact power of two
    r = (tl.abs(y) / quantum + 8388608.0) - 8388608.0  # round to an integer, ties to even
    code = ((e - EMIN) << MANT) + r.to(tl.int32)
    code = tl.where(y != y, NAN_CODE, code) | sign
    return code.to(tl.uint8)


@triton.jit
def _cast_store(data_ptr, offs, mask, y, fmax, SOFT_CAST: tl.constexpr, MANT: tl.constexpr,
                EMIN: tl.constexpr, NAN_CODE: tl.constexpr):
    """Store cast(clamp(y, -fmax, fmax)); the clamp keeps NaN (PyTorch's clamp does)."""
    y = tl.minimum(tl.maximum(y, -fmax, propagate_nan=tl.PropagateNan.ALL), fmax,
                   propagate_nan=tl.PropagateNan.ALL)
    if SOFT_CAST:
        q = _fp8_code(y, MANT, EMIN, NAN_CODE).to(data_ptr.dtype.element_ty, bitcast=True)
    else:
        q = y.to(data_ptr.dtype.element_ty)
    tl.store(data_ptr + offs, q, mask=mask)


@triton.jit
def _quantize_kernel(x_ptr, stride_xb, stride_xm, data_ptr, scale_ptr, partial_ptr,
                     M, K, group, n_groups, n_mtiles, n_partials, fmax,
                     MODE: tl.constexpr, TWO_PASS: tl.constexpr, BLOCK_M: tl.constexpr,
                     NB: tl.constexpr, GP: tl.constexpr, P_POW2: tl.constexpr,
                     SOFT_CAST: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
                     NAN_CODE: tl.constexpr):
    # grid (B * n_mtiles, cdiv(n_groups, NB)). Columns [g * group, (g + 1) * group) form scale
    # group g. MODE 0 (row, block): a scale per row and group, scale[b, m, g]; MODE 1 (block2d):
    # a scale per group over the BLOCK_M rows (n_mtiles = ceil(M / group), the rows of block mb
    # are [mb * group, (mb + 1) * group)), scale[b, mb, g]; MODE 2 (tensor): the scale comes
    # from the n_partials partial maxima of matrix b (group is then just a column chunk).
    pid = tl.program_id(0)
    b = pid // n_mtiles
    mt = pid % n_mtiles
    if MODE == 1:
        m0 = mt * group
        row_end = tl.minimum(M, m0 + group)
    else:
        m0 = mt * BLOCK_M
        row_end = M
    rows = m0 + tl.arange(0, BLOCK_M)
    g = tl.program_id(1) * NB + tl.arange(0, NB)
    j = tl.arange(0, GP)
    # The int64 part of the addresses is a scalar base; tile offsets stay int32 (asserted).
    x_base = x_ptr + b.to(tl.int64) * stride_xb + m0.to(tl.int64) * stride_xm
    d_base = data_ptr + (b.to(tl.int64) * M + m0) * K
    rmask = (rows < row_end)[:, None, None]
    r3 = tl.arange(0, BLOCK_M)[:, None, None]

    if TWO_PASS:  # a row longer than registers hold: amax over chunks, then the cast (MODE 0)
        amax = tl.zeros([BLOCK_M, 1, GP], dtype=tl.float32)
        for c0 in range(0, K, GP):
            cols = c0 + j[None, None, :]
            x = tl.load(x_base + r3 * stride_xm + cols, mask=rmask & (cols < K), other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)), propagate_nan=tl.PropagateNan.ALL)
        amax = _amax(amax, 2)  # [BLOCK_M, 1]
        scale = _scale(amax, fmax)
        for c0 in range(0, K, GP):
            cols = c0 + j[None, None, :]
            mask = rmask & (cols < K)
            x = tl.load(x_base + r3 * stride_xm + cols, mask=mask, other=0.0)
            y = _div(x.to(tl.float32), scale[:, :, None])
            _cast_store(d_base, r3 * K + cols, mask, y, fmax, SOFT_CAST, MANT, EMIN, NAN_CODE)
        srows = rows[:, None]
        tl.store(scale_ptr + b.to(tl.int64) * M + srows, scale, mask=srows < M)
    else:
        cols = g[None, :, None] * group + j[None, None, :]  # [1, NB, GP]
        mask = rmask & (j < group)[None, None, :] & (cols < K)
        x = tl.load(x_base + r3 * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        if MODE == 2:
            p = tl.arange(0, P_POW2)
            part = tl.load(partial_ptr + b * n_partials + p, mask=p < n_partials, other=0.0)
            scale = _scale(_amax(part, 0), fmax)
            y = _div(x, scale)
            if (mt == 0) & (tl.program_id(1) == 0):
                tl.store(scale_ptr + b, scale)
        else:
            amax = _amax(tl.abs(x), 2)  # [BLOCK_M, NB]
            if MODE == 1:
                amax = _amax(amax, 0)[None, :]  # [1, NB]
            scale = _scale(amax, fmax)
            y = _div(x, scale[:, :, None])
            gs = g[None, :]
            if MODE == 1:  # scale [B, n_mtiles, n_groups]
                s_offs = (b.to(tl.int64) * n_mtiles + mt) * n_groups + gs
                tl.store(scale_ptr + s_offs, scale, mask=gs < n_groups)
            else:  # scale [B, M, n_groups]
                srows = rows[:, None]
                s_offs = (b.to(tl.int64) * M + srows) * n_groups + gs
                tl.store(scale_ptr + s_offs, scale, mask=(srows < M) & (gs < n_groups))
        _cast_store(d_base, r3 * K + cols, mask, y, fmax, SOFT_CAST, MANT, EMIN, NAN_CODE)


@triton.jit
def _amax_partial_kernel(x_ptr, stride_xb, stride_xm, partial_ptr, M, K, n_partials,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid (n_partials, B): program p reduces the row tiles p, p + n_partials, ... of matrix b.
    p = tl.program_id(0)
    b = tl.program_id(1)
    x_base = x_ptr + b.to(tl.int64) * stride_xb
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for m0 in range(p * BLOCK_M, M, n_partials * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ptrs = x_base + rows.to(tl.int64)[:, None] * stride_xm
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + rk[None, :]
            x = tl.load(row_ptrs + cols, mask=(rows[:, None] < M) & (cols < K), other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)), propagate_nan=tl.PropagateNan.ALL)
    amax = _amax(_amax(amax, 1), 0)
    tl.store(partial_ptr + b * n_partials + p, amax)


def _fp8_format(dtype: torch.dtype):
    assert dtype in _FP8_FORMATS, f"fp8 output must be float8_e4m3fn or float8_e5m2, got {dtype}"
    return _FP8_FORMATS[dtype]


def quantize(x3: torch.Tensor, granularity: str, block_size: int, fmax: float,
             data_out: torch.Tensor, scale_out: torch.Tensor,
             config: QuantConfig | None = None) -> None:
    """data_out, scale_out <- quantization of x3 [B, M, K] (module docstring for the formula).

    x3 fp32/bf16/fp16 with stride(-1) == 1; data_out [B, M, K] float8_e4m3fn/e5m2 contiguous;
    scale_out fp32 contiguous: [B] (tensor), [B, M] (row), [B, M, ceil(K/bs)] (block),
    [B, ceil(M/bs), ceil(K/bs)] (block2d). No host sync; tensor granularity allocates a small
    partial-max buffer on x3's device. config: tile override (tests), default quant_config(...).
    """
    B, M, K = x3.shape
    assert granularity in _MODE, f"unknown granularity {granularity!r}"
    assert x3.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert x3.stride(-1) == 1 or K <= 1
    assert data_out.shape == (B, M, K) and data_out.is_contiguous() and scale_out.is_contiguous()
    assert scale_out.dtype == torch.float32 and block_size >= 1
    n_kb, n_mb = triton.cdiv(K, block_size), triton.cdiv(M, block_size)
    expected = {"tensor": (B,), "row": (B, M), "block": (B, M, n_kb),
                "block2d": (B, n_mb, n_kb)}[granularity]
    assert scale_out.shape == expected, f"scale_out {tuple(scale_out.shape)} != {expected}"
    mant, emin, nan_code = _fp8_format(data_out.dtype)
    if scale_out.numel() == 0:  # then data_out is empty too
        return
    cfg = config or quant_config(granularity, M, K, block_size)
    # Strides of size-1 dims are arbitrary in torch (and never multiplied by a nonzero index).
    stride_xm = x3.stride(1) if M > 1 else K
    stride_xb = x3.stride(0) if B > 1 else M * stride_xm
    assert cfg.block_m * max(stride_xm, K) < 2**31, "tile offsets are int32 in the kernel"
    if granularity in ("block", "block2d"):
        assert cfg.gp >= block_size and not cfg.two_pass, "a program must hold whole blocks"
        group, n_groups = block_size, n_kb
    elif cfg.two_pass:
        assert granularity == "row"
        group, n_groups = K, 1
    else:
        assert cfg.gp >= K or granularity == "tensor", "a program must hold whole rows"
        row = granularity == "row"
        group = K if row else cfg.gp  # tensor: column chunks
        n_groups = 1 if row else max(1, triton.cdiv(K, group))
    # Tensor scales of M = 0 or K = 0 matrices still need a program: amax 0 -> the floor scale.
    n_mtiles = n_mb if granularity == "block2d" else max(1, triton.cdiv(M, cfg.block_m))
    assert granularity != "block2d" or cfg.block_m >= block_size
    n_partials, partial = 1, scale_out
    if granularity == "tensor":
        n_partials = min(n_mtiles, _MAX_PARTIALS)
        partial = torch.empty(B, n_partials, dtype=torch.float32, device=x3.device)
        _amax_partial_kernel[(n_partials, B)](
            x3, stride_xb, stride_xm, partial, M, K, n_partials,
            BLOCK_M=cfg.block_m, BLOCK_K=cfg.gp, **launch("amax_partial", num_warps=cfg.num_warps))
    grid = (B * n_mtiles, triton.cdiv(n_groups, cfg.nb))
    _quantize_kernel[grid](
        x3, stride_xb, stride_xm, data_out, scale_out, partial, M, K, group, n_groups, n_mtiles,
        n_partials, fmax, MODE=_MODE[granularity], TWO_PASS=cfg.two_pass, BLOCK_M=cfg.block_m,
        NB=cfg.nb, GP=cfg.gp, P_POW2=_pow2(n_partials), SOFT_CAST=x3.device.type == "cpu",
        MANT=mant, EMIN=emin, NAN_CODE=nan_code, **launch("quantize", num_warps=cfg.num_warps))


# ----------------------------------------------------------------------------------------------
# FP8 grouped GEMM
# ----------------------------------------------------------------------------------------------

# Presets (GemmConfig from grouped_gemm.py). fp8 operands are 1 byte, so BLOCK_K = 128 (one
# DeepSeek scale block per step, 4 wgmma k32 instructions) costs what 64 does in bf16. Registers
# bound the tile: the fp32 accumulator plus the step's partial product (promotion) take
# 2 x 64 per thread at 128 x 128 with 8 warps; 128 x 256 would need 256 and spill.
FP8_GEMM_CONFIGS = {
    "large": GemmConfig(128, 128, 128, num_warps=8, num_stages=4),   # 32 KB a stage
    "small_m": GemmConfig(64, 128, 128, num_warps=4, num_stages=5),  # groups of <= 96 rows
    "narrow": GemmConfig(64, 64, 128, num_warps=4, num_stages=5),
}


@functools.lru_cache(maxsize=256)
def fp8_gemm_config(m_per_group: int, N: int, K: int) -> GemmConfig:
    """The tile configuration of the FP8 grouped GEMM for ``m_per_group`` rows per group and an ``N x K`` weight."""
    if N <= 64:
        return FP8_GEMM_CONFIGS["narrow"]
    if m_per_group <= 96:
        return FP8_GEMM_CONFIGS["small_m"]
    return FP8_GEMM_CONFIGS["large"]


@triton.jit
def _grouped_gemm_fp8_kernel(x_ptr, stride_xm, sx_ptr, w_ptr, sw_ptr, offsets_ptr, out_ptr,
                             stride_om, M, N, K, E, max_tiles, block_size, n_kb, n_nb,
                             X_BLOCK: tl.constexpr, W_BLOCK: tl.constexpr,
                             SW_SCALAR: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             G_CHUNK: tl.constexpr, MULTI_CHUNK: tl.constexpr):
    # grid (P,): persistent; tile schedule of grouped_gemm._grouped_gemm_kernel.
    # Scales: sx [M] (row) or [M, n_kb] (X_BLOCK); sw [E, N] (row) or [E, n_nb, n_kb] (W_BLOCK).
    # SW_SCALAR: block_size is a multiple of BLOCK_N, so a tile's columns share one w block
    # and each K step loads one sw value (a [BLOCK_N] vector spread over the wgmma layout costs
    # ~40 registers of values and addresses).
    n_tiles = tl.cdiv(N, BLOCK_N)
    tbase, cbase, ctotal, start_v, end_v, cnt, cum = _first_chunk(offsets_ptr, E, M, BLOCK_M, G_CHUNK)
    for tile in range(tl.program_id(0), max_tiles, tl.num_programs(0)):
        tbase, cbase, ctotal, start_v, end_v, cnt, cum, nt, m0, row_end, expert, is_expert = _tile(
            tile, n_tiles, tbase, cbase, ctotal, start_v, end_v, cnt, cum, offsets_ptr, E, M, BLOCK_M, G_CHUNK,
            MULTI_CHUNK)
        k_end = tl.where(is_expert, K, 0)  # head and tail groups: zeros, no loads

        cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        rk = tl.arange(0, BLOCK_K)
        rows = m0 + tl.arange(0, BLOCK_M)
        rows_rel = tl.minimum(rows, M - 1) - m0  # rows past the group: computed, not stored
        a_offs = rows_rel[:, None] * stride_xm + rk[None, :]
        b_offs = rk[:, None] + cols[None, :] * K  # [BLOCK_K, BLOCK_N], K-major (wgmma's fp8 B)
        x_base = x_ptr + m0.to(tl.int64) * stride_xm
        w_base = w_ptr + expert.to(tl.int64) * N * K
        if X_BLOCK:
            sx_offs = rows_rel * n_kb
            sx_base = sx_ptr + m0.to(tl.int64) * n_kb
        if W_BLOCK:
            sw_base = sw_ptr + expert.to(tl.int64) * n_nb * n_kb
            if SW_SCALAR:
                sw_base += (nt * BLOCK_N // block_size) * n_kb
            else:
                sw_offs = (cols // block_size) * n_kb
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            kmask = rk < K - k0
            a = tl.load(x_base + a_offs, mask=kmask[None, :], other=0.0)
            b = tl.load(w_base + b_offs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            part = tl.dot(a, b)  # a fresh fp32 partial each step: promoted below
            if X_BLOCK or W_BLOCK:
                kb = k0 // block_size
                if X_BLOCK:
                    part = part * tl.load(sx_base + sx_offs + kb)[:, None]
                if W_BLOCK:
                    if SW_SCALAR:
                        part = part * tl.load(sw_base + kb)
                    else:
                        part = part * tl.load(sw_base + sw_offs + kb, mask=cmask,
                                              other=0.0)[None, :]
            acc += part
            x_base += BLOCK_K
            w_base += BLOCK_K
        # Masks by comparison only: the interpreter types (vector & scalar bool) as int32.
        if not X_BLOCK:
            sx = tl.load(sx_ptr + tl.minimum(rows, M - 1).to(tl.int64),
                         mask=rows < tl.where(is_expert, row_end, 0), other=0.0)
            acc = acc * sx[:, None]
        if not W_BLOCK:
            sw = tl.load(sw_ptr + expert.to(tl.int64) * N + cols,
                         mask=cols < tl.where(is_expert, N, 0), other=0.0)
            acc = acc * sw[None, :]
        acc = tl.where(is_expert, acc, 0.0)  # exact zeros, whatever the scales of those rows
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=(rows < row_end)[:, None] & cmask[None, :])


def _fp8_block_k(cfg_block_k: int, block_size: int) -> int:
    """Largest power of two <= cfg_block_k dividing block_size (a step stays in one block)."""
    bk = cfg_block_k
    while bk > 16 and block_size % bk:
        bk //= 2
    assert block_size % bk == 0, f"block_size {block_size} needs a power-of-two divisor >= 16"
    return bk


def grouped_gemm_fp8(x_data: torch.Tensor, x_scale: torch.Tensor, x_granularity: str,
                     w_data: torch.Tensor, w_scale: torch.Tensor, w_granularity: str,
                     offsets: torch.Tensor, block_size: int, out: torch.Tensor,
                     config: GemmConfig | None = None) -> None:
    """out[offsets[e]:offsets[e+1]] = (x_q * sx) @ (w_q[e] * sw[e])^T; other rows zero.

    x_data [M, K] float8 with stride(1) == 1; x_scale fp32 contiguous, [M] ("row") or
    [M, ceil(K/bs)] ("block"); w_data [E, N, K] float8 contiguous; w_scale fp32 contiguous,
    [E, N] ("row") or [E, ceil(N/bs), ceil(K/bs)] ("block2d"); offsets [E + 1] int64 on the
    device, non-decreasing within [0, M]; out [M, N] bf16/fp16/fp32 contiguous.
    config: tile sizes (tests), default fp8_gemm_config(M // E, N, K); its block_k is lowered to
    a divisor of block_size when a blockwise scale is used.
    """
    M, K = x_data.shape
    E, N = w_data.shape[0], w_data.shape[1]
    assert x_granularity in ("row", "block") and w_granularity in ("row", "block2d")
    assert x_data.dtype in _FP8_FORMATS and w_data.dtype in _FP8_FORMATS
    assert w_data.shape[2] == K and w_data.is_contiguous() and (x_data.stride(1) == 1 or K <= 1)
    assert offsets.shape == (E + 1,) and offsets.dtype == torch.int64 and offsets.is_contiguous()
    assert out.shape == (M, N) and out.is_contiguous()
    assert out.dtype in (torch.bfloat16, torch.float16, torch.float32)
    n_kb, n_nb = triton.cdiv(K, block_size), triton.cdiv(N, block_size)
    x_block, w_block = x_granularity == "block", w_granularity == "block2d"
    assert x_scale.shape == ((M, n_kb) if x_block else (M,)) and x_scale.is_contiguous()
    assert w_scale.shape == ((E, n_nb, n_kb) if w_block else (E, N)) and w_scale.is_contiguous()
    assert x_scale.dtype == w_scale.dtype == torch.float32
    assert N * K < 2**31, "w[e] offsets are int32 in the kernel"
    if M == 0 or N == 0:
        return
    cfg = config or fp8_gemm_config(M // max(E, 1), N, K)
    stride_xm = x_data.stride(0) if M > 1 else K  # a size-1 dim's stride is arbitrary
    block_k = _fp8_block_k(cfg.block_k, block_size) if (x_block or w_block) else cfg.block_k
    assert stride_xm * cfg.block_m < 2**31, "x tile offsets are int32 in the kernel"
    n_tiles = triton.cdiv(N, cfg.block_n)
    max_tiles = (triton.cdiv(M, cfg.block_m) + E + 1) * n_tiles
    g_chunk = _group_chunk(E)
    grid = (min(_num_programs(x_data.device), max_tiles),)
    _grouped_gemm_fp8_kernel[grid](
        x_data, stride_xm, x_scale, w_data, w_scale, offsets, out, out.stride(0),
        M, N, K, E, max_tiles, block_size, n_kb, n_nb, X_BLOCK=x_block, W_BLOCK=w_block,
        SW_SCALAR=block_size % cfg.block_n == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, G_CHUNK=g_chunk,
        MULTI_CHUNK=E + 2 > g_chunk,
        **launch("grouped_gemm_fp8", num_warps=cfg.num_warps, num_stages=cfg.num_stages))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (python -m compass_kernels.triton.aot): the tiles the heuristics
# pick for the benchmark shapes, e4m3 output / operands, for sm_90. GEMMs must use wgmma.
# ----------------------------------------------------------------------------------------------

def _aot_cases():
    i32 = "i32"
    cases = []
    quant_sig = {"stride_xb": i32, "stride_xm": i32, "data_ptr": "*fp8e4nv",
                 "scale_ptr": "*fp32", "partial_ptr": "*fp32", "M": i32, "K": i32,
                 "group": i32, "n_groups": i32, "n_mtiles": i32, "n_partials": i32,
                 "fmax": "fp32"}
    mant, emin, nan_code = _FP8_FORMATS[torch.float8_e4m3fn]
    # Activations [8192, 4096] (row, block, tensor) and weights [E, 2048, 7168] (block2d); one
    # row longer than _ROW_MAX for the two-pass path.
    for gran, M, K, dts in (("row", 8192, 4096, ("fp32", "bf16")),
                            ("block", 8192, 4096, ("fp32", "bf16")),
                            ("block2d", 2048, 7168, ("fp32", "bf16")),
                            ("tensor", 8192, 4096, ("fp32", "bf16")),
                            ("row", 64, 32768, ("bf16",))):
        cfg = quant_config(gran, M, K, 128)
        for dt in dts:
            warps = {"launch": "quantize", "num_warps": cfg.num_warps,
                     "div16": ("stride_xb", "stride_xm", "K", "group")}
            if gran == "tensor":
                cases.append((
                    _amax_partial_kernel,
                    {"x_ptr": f"*{dt}", "stride_xb": i32, "stride_xm": i32,
                     "partial_ptr": "*fp32", "M": i32, "K": i32, "n_partials": i32},
                    {"BLOCK_M": cfg.block_m, "BLOCK_K": cfg.gp},
                    f"fp8_amax_partial_{dt}_{cfg.block_m}x{cfg.gp}",
                    {"launch": "amax_partial", "num_warps": cfg.num_warps,
                     "div16": ("stride_xb", "stride_xm", "K")}))
            name = f"fp8_quantize_{gran}{'_2pass' if cfg.two_pass else ''}_{dt}_e4m3_" \
                   f"{cfg.block_m}x{cfg.nb}x{cfg.gp}"
            cases.append((
                _quantize_kernel, {"x_ptr": f"*{dt}", **quant_sig},
                {"MODE": _MODE[gran], "TWO_PASS": cfg.two_pass, "BLOCK_M": cfg.block_m,
                 "NB": cfg.nb, "GP": cfg.gp,
                 "P_POW2": _pow2(min(triton.cdiv(M, cfg.block_m), _MAX_PARTIALS)),
                 "SOFT_CAST": False, "MANT": mant, "EMIN": emin, "NAN_CODE": nan_code},
                name, warps))
    gemm_sig = {"x_ptr": "*fp8e4nv", "stride_xm": i32, "sx_ptr": "*fp32", "w_ptr": "*fp8e4nv",
                "sw_ptr": "*fp32", "offsets_ptr": "*i64", "out_ptr": "*bf16", "stride_om": i32,
                "M": i32, "N": i32, "K": i32, "E": i32, "max_tiles": i32, "block_size": i32,
                "n_kb": i32, "n_nb": i32}
    # 4 x 8192 x 4096 x 7168 (DeepGEMM's shape: "large") and E = 128 x 64 rows ("small_m").
    for (E, mpg, N, K) in ((4, 8192, 4096, 7168), (128, 64, 1024, 2048)):
        cfg = fp8_gemm_config(mpg, N, K)
        g_chunk = _group_chunk(E)
        for xg, wg in (("row", "row"), ("block", "block2d")):
            x_block, w_block = xg == "block", wg == "block2d"
            bk = _fp8_block_k(cfg.block_k, 128) if (x_block or w_block) else cfg.block_k
            cases.append((
                _grouped_gemm_fp8_kernel, gemm_sig,
                {"X_BLOCK": x_block, "W_BLOCK": w_block, "SW_SCALAR": 128 % cfg.block_n == 0,
                 "BLOCK_M": cfg.block_m,
                 "BLOCK_N": cfg.block_n, "BLOCK_K": bk, "G_CHUNK": g_chunk,
                 "MULTI_CHUNK": E + 2 > g_chunk},
                f"grouped_gemm_fp8_{xg}_{wg}_bf16_{cfg.block_m}x{cfg.block_n}x{bk}_E{E}",
                {"launch": "grouped_gemm_fp8", "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                 "div16": ("stride_xm", "stride_om", "N", "K", "block_size"),
                 "expect_in_ptx": ("wgmma", "e4m3.e4m3")}))
    return cases


AOT_CASES = _aot_cases()
