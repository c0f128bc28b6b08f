"""Triton grouped GEMM: the persistent forward (and dgrad) kernel and the K-grouped wgrad kernel.

grouped_gemm        out[offsets[e]:offsets[e+1]] = x[...] @ w[e]   (w[e]^T with trans_b)
                    x [M, K], w [E, K, N] ([E, N, K] with trans_b), out [M, N]; rows outside
                    [offsets[0], offsets[E]) are written as zeros.
grouped_gemm_wgrad  dw[e] = x_e^T dy_e ([E, K, N]), or dy_e^T x_e ([E, N, K]) with trans_b;
                    empty groups get exact zeros.

fp32 accumulation for fp32/bf16/fp16 (fp64 for fp64), stored in the output's dtype. fp32 and fp64
operands use ``input_precision="ieee"`` so results match the fp32 reference; TF32 (3x faster on
H100 tensor cores, ~1e-3 relative error) can be an opt-in later. FP fusion is on (explicitly, as
Triton 3.10 turns the default off): the fp32 FMA path then rounds once per multiply-add.

Launchers take preallocated outputs, validate nothing beyond internal asserts (the op layer
validates) and never read device values on the host: the group sizes stay on the device, so they
are safe under CUDA-graph capture and ``torch.compile``. Row indices become int64 before they
multiply a stride (M x K passes 2^31 at 1M rows of K = 2048).

Forward schedule. The rows [0, M) are cut into G = E + 2 contiguous "groups": a head
[0, offsets[0]), the E experts, and a tail [offsets[E], M). Head and tail are zero groups: their
tiles skip the K loop and store zeros, so one launch writes every row of out. A group of s rows
has cdiv(s, BLOCK_M) m-tiles; tile t of the persistent loop is m-tile t // n_tiles (counted over
all groups in order) and n-tile t % n_tiles. Each program walks t = pid, pid + P, ... and finds a
tile's group by counting the groups whose cumulative m-tile count is <= its m-tile (tl.cumsum
over the offsets, done once per program). More than G_CHUNK groups (E >= 255 at the default
chunk) are held a chunk at a time: t only grows within a program, so the program advances
through the chunks once. The total tile count depends on the offsets, so the loop runs to the
static bound (cdiv(M, BLOCK_M) + E + 1) * n_tiles (sum_g cdiv(s_g, BM) <= cdiv(M, BM) + G - 1)
and tiles past the real count are empty (no loads, fully masked stores).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from compass_kernels.triton.launch import launch

_INTERPRET_PROGRAMS = 4  # persistent programs under TRITON_INTERPRET (no SMs to count)
_GROUP_CHUNK = 256  # groups held in registers at once: 4 int32 vectors, 4 regs/thread at 8 warps


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch parameters.

    Forward: out tile block_m x block_n, reduction in block_k steps.
    Wgrad:   dw[e] tile block_k x block_n (rows x columns of dw[e], whatever its layout),
             reduction over the group's rows in block_m steps.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


# Named presets; the heuristics below pick among them and trim num_stages to shared memory.
GEMM_CONFIGS = {
    # 16-bit, H100: 128 x 256 x 64 with 8 warps (two consumer warpgroups of wgmma m64n256)
    # is the configuration of Triton's persistent-matmul tutorial for large problems.
    "large": GemmConfig(128, 256, 64, num_warps=8, num_stages=3),
    "medium": GemmConfig(128, 128, 64, num_warps=8, num_stages=4),
    # Groups of <= 96 rows (fine-grained MoE, E = 128 at 16K rows): 64-row tiles waste less.
    "small_m": GemmConfig(64, 128, 64, num_warps=4, num_stages=4),
    "narrow": GemmConfig(64, 64, 64, num_warps=4, num_stages=4),
    # fp32/fp64 with ieee precision run on FMA units: small tiles keep the operands in registers.
    "fma": GemmConfig(64, 64, 32, num_warps=4, num_stages=2),
    # Wgrad: a 128 x 128 tile of dw[e] (block_k x block_n), reduced over 64-row steps.
    "wgrad": GemmConfig(64, 128, 128, num_warps=8, num_stages=4),
    "wgrad_fma": GemmConfig(32, 64, 64, num_warps=4, num_stages=2),
}
_SMEM_BUDGET = 200 * 1024  # of the H100's 227 KiB per block, leaving room for the epilogue


def _fit_stages(cfg: GemmConfig, stage_bytes: int) -> GemmConfig:
    """cfg with num_stages trimmed so the operand ring fits _SMEM_BUDGET (at least 2 stages)."""
    stages = max(2, min(cfg.num_stages, _SMEM_BUDGET // stage_bytes))
    return GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, stages)


@functools.lru_cache(maxsize=256)
def gemm_config(m_per_group: int, N: int, K: int, dtype: torch.dtype) -> GemmConfig:
    """Forward heuristic from the mean rows per group, N, K and the operand dtype."""
    if dtype.itemsize >= 4:
        return GEMM_CONFIGS["fma"]
    if m_per_group <= 96:
        cfg = GEMM_CONFIGS["small_m"] if N > 64 else GEMM_CONFIGS["narrow"]
    elif N >= 2048 and K >= 256:
        cfg = GEMM_CONFIGS["large"]
    elif N > 64:
        cfg = GEMM_CONFIGS["medium"]
    else:
        cfg = GEMM_CONFIGS["narrow"]
    # A stage holds a [block_m, block_k] tile of x and a [block_k, block_n] tile of w.
    return _fit_stages(cfg, (cfg.block_m + cfg.block_n) * cfg.block_k * dtype.itemsize)


@functools.lru_cache(maxsize=256)
def wgrad_config(m_per_group: int, P: int, Q: int, dtype: torch.dtype) -> GemmConfig:
    """Wgrad heuristic: dw[e] is [P, Q]; the reduction runs over m_per_group rows on average."""
    if dtype.itemsize >= 4:
        return GEMM_CONFIGS["wgrad_fma"]
    if P > 64 and Q > 64:
        cfg = GEMM_CONFIGS["wgrad"]
    else:
        cfg = GEMM_CONFIGS["narrow"]
    # A stage holds a [block_m, block_k] and a [block_m, block_n] tile of the two operands.
    return _fit_stages(cfg, cfg.block_m * (cfg.block_k + cfg.block_n) * dtype.itemsize)


def _dot_types(dtype: torch.dtype):
    """(accumulator type, tl.dot input_precision) for an operand dtype."""
    if dtype == torch.float64:
        return tl.float64, "ieee"
    # ieee for fp32 operands: exact fp32 products, matching the fp32 reference (tf32 would not).
    # For 16-bit operands the precision argument is ignored.
    return tl.float32, "ieee"


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(device: torch.device) -> int:
    """One persistent program per SM (a 128 x 128 bf16 tile with 4 stages takes 128 KiB of
    shared memory, so one fits per SM anyway)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRET_PROGRAMS


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_groups(offsets_ptr, cbase, E, M, BLOCK_M: tl.constexpr, G_CHUNK: tl.constexpr):
    """Rows [start, end) and m-tile counts of groups cbase .. cbase + G_CHUNK - 1 (head = 0,
    experts 1..E, tail = E + 1); counts are 0 past the last group. Offsets are clamped to [0, M]
    so that corrupt offsets cannot make a store leave out."""
    j = cbase + tl.arange(0, G_CHUNK)
    start = tl.load(offsets_ptr + j - 1, mask=(j >= 1) & (j <= E + 1), other=0)
    end = tl.load(offsets_ptr + j, mask=j <= E, other=M)
    start = tl.minimum(tl.maximum(start, 0), M).to(tl.int32)
    end = tl.minimum(tl.maximum(end, start), M).to(tl.int32)
    cnt = tl.where(j <= E + 1, tl.cdiv(end - start, BLOCK_M), 0)
    return start, end, cnt, tl.cumsum(cnt, axis=0)


@triton.jit
def _first_chunk(offsets_ptr, E, M, BLOCK_M: tl.constexpr, G_CHUNK: tl.constexpr):
    """The schedule's state before the first tile: (tbase, m-tiles of the groups before the chunk;
    cbase, its first group, an int32 tensor so that loops can carry it; ctotal, its m-tiles; and
    ``_load_groups`` of the chunk)."""
    cbase = tl.program_id(0) * 0
    start_v, end_v, cnt, cum = _load_groups(offsets_ptr, cbase, E, M, BLOCK_M, G_CHUNK)
    return cbase, cbase, tl.sum(cnt, axis=0), start_v, end_v, cnt, cum


@triton.jit
def _tile(tile, n_tiles, tbase, cbase, ctotal, start_v, end_v, cnt, cum, offsets_ptr, E, M,
          BLOCK_M: tl.constexpr, G_CHUNK: tl.constexpr, MULTI_CHUNK: tl.constexpr):
    """Tile ``tile`` of the forward schedule: the state of ``_first_chunk`` advanced to the chunk
    holding its m-tile (m-tiles never decrease), then nt (its n-tile), m0 (its first row), row_end
    (its group's end row, 0 past the real tile count: nothing stored), expert (the group's expert,
    clamped) and is_expert (false for the head and tail groups and past the tile count: no loads)."""
    mt = tile // n_tiles
    if MULTI_CHUNK:
        while (mt >= tbase + ctotal) & (cbase + G_CHUNK < E + 2):
            tbase += ctotal
            cbase += G_CHUNK
            start_v, end_v, cnt, cum = _load_groups(offsets_ptr, cbase, E, M, BLOCK_M, G_CHUNK)
            ctotal = tl.sum(cnt, axis=0)
    rel = mt - tbase
    live = rel < ctotal
    g_local = tl.sum((cum <= rel).to(tl.int32), axis=0)  # first group with cum > rel
    hit = tl.arange(0, G_CHUNK) == g_local
    first_tile = tl.sum(tl.where(hit, cum - cnt, 0), axis=0)
    row0 = tl.sum(tl.where(hit, start_v, 0), axis=0)
    row_end = tl.where(live, tl.sum(tl.where(hit, end_v, 0), axis=0), 0)
    g = cbase + g_local
    m0 = row0 + (rel - first_tile) * BLOCK_M
    return (tbase, cbase, ctotal, start_v, end_v, cnt, cum, tile % n_tiles, m0, row_end, tl.maximum(g - 1, 0),
            live & (g >= 1) & (g <= E))


@triton.jit
def _grouped_gemm_kernel(x_ptr, stride_xm, w_ptr, offsets_ptr, out_ptr, stride_om,
                         M, N, K, E, max_tiles,
                         TRANS_B: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         G_CHUNK: tl.constexpr, MULTI_CHUNK: tl.constexpr):
    # grid (P,): persistent; see the module docstring for the tile schedule.
    n_tiles = tl.cdiv(N, BLOCK_N)
    tbase, cbase, ctotal, start_v, end_v, cnt, cum = _first_chunk(offsets_ptr, E, M, BLOCK_M, G_CHUNK)
    if TRANS_B:  # w[e] is [N, K]: b[k, n] = w[e, n, k]
        stride_wk = 1
        stride_wn = K
    else:  # w[e] is [K, N]
        stride_wk = N
        stride_wn = 1
    for tile in range(tl.program_id(0), max_tiles, tl.num_programs(0)):
        tbase, cbase, ctotal, start_v, end_v, cnt, cum, nt, m0, row_end, expert, is_expert = _tile(
            tile, n_tiles, tbase, cbase, ctotal, start_v, end_v, cnt, cum, offsets_ptr, E, M, BLOCK_M, G_CHUNK,
            MULTI_CHUNK)
        k_end = tl.where(is_expert, K, 0)  # head and tail groups: zeros

        cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        rk = tl.arange(0, BLOCK_K)
        # Rows past the group are clamped into x and computed but not stored (each output row
        # depends only on its own x row), so the A loads need only the K mask. The int64 part
        # of each address is a scalar base; the tile offsets are int32 and loop-invariant
        # (pointer tensors would hold 2 registers per element across the K loop).
        rows = m0 + tl.arange(0, BLOCK_M)
        a_offs = (tl.minimum(rows, M - 1) - m0)[:, None] * stride_xm + rk[None, :]
        b_offs = rk[:, None] * stride_wk + cols[None, :] * stride_wn  # < K * N < 2^31
        x_base = x_ptr + m0.to(tl.int64) * stride_xm
        w_base = w_ptr + expert.to(tl.int64) * K * N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k0 in range(0, k_end, BLOCK_K):
            kmask = rk < K - k0
            a = tl.load(x_base + a_offs, mask=kmask[None, :], other=0.0)
            b = tl.load(w_base + b_offs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
            x_base += BLOCK_K
            w_base += BLOCK_K * stride_wk
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=(rows < row_end)[:, None] & cmask[None, :])


def _group_chunk(E: int) -> int:
    """Groups held in registers at once: all E + 2 up to _GROUP_CHUNK, then chunks of it."""
    return min(_GROUP_CHUNK, triton.next_power_of_2(E + 2))


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_b: bool,
                 out: torch.Tensor, config: GemmConfig | None = None) -> None:
    """out[offsets[e]:offsets[e+1]] = x[...] @ w[e] (w[e]^T with trans_b); other rows zero.

    x [M, K] with x.stride(1) == 1; w [E, K, N] ([E, N, K] with trans_b) contiguous; offsets
    [E + 1] int64 on x's device, non-decreasing within [0, M]; out [M, N] contiguous, x's dtype.
    config: tile sizes, default ``gemm_config(M // E, N, K, dtype)``.
    """
    M, K = x.shape
    E = w.shape[0]
    N = w.shape[1] if trans_b else w.shape[2]
    assert w.shape[2 if trans_b else 1] == K and offsets.shape == (E + 1,)
    assert offsets.dtype == torch.int64 and offsets.is_contiguous()
    assert (x.stride(1) == 1 or K <= 1) and w.is_contiguous() and out.is_contiguous()
    assert out.shape == (M, N) and out.dtype == x.dtype == w.dtype
    assert K * N < 2**31, "w[e] offsets are int32 in the kernel"
    if M == 0 or N == 0:
        return
    cfg = config or gemm_config(M // max(E, 1), N, K, x.dtype)
    assert x.stride(0) * cfg.block_m < 2**31, "x tile offsets are int32 in the kernel"
    acc, precision = _dot_types(x.dtype)
    n_tiles = triton.cdiv(N, cfg.block_n)
    max_tiles = (triton.cdiv(M, cfg.block_m) + E + 1) * n_tiles
    g_chunk = _group_chunk(E)
    grid = (min(_num_programs(x.device), max_tiles),)
    _grouped_gemm_kernel[grid](
        x, x.stride(0), w, offsets, out, out.stride(0), M, N, K, E, max_tiles,
        TRANS_B=trans_b, ACC=acc, DOT_PRECISION=precision, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, G_CHUNK=g_chunk,
        MULTI_CHUNK=E + 2 > g_chunk,
        **launch("grouped_gemm", num_warps=cfg.num_warps, num_stages=cfg.num_stages))


# ----------------------------------------------------------------------------------------------
# Wgrad kernel: dw[e] [P, Q] = a_e^T b_e with a [M, P], b [M, Q] (a = x, b = dy; swapped for
# trans_b, whose dw[e] = dy_e^T x_e is [N, K])
# ----------------------------------------------------------------------------------------------

@triton.jit
def _grouped_gemm_wgrad_kernel(a_ptr, stride_am, b_ptr, stride_bm, offsets_ptr, out_ptr,
                               M, P, Q,
                               ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                               BLOCK_Q: tl.constexpr):
    # grid (E, cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q)): one dw[e] tile per program, reduced over
    # the group's rows in BLOCK_M steps; an empty group runs no step and stores zeros.
    e = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pmask = p < P
    qmask = q < Q
    start = tl.minimum(tl.maximum(tl.load(offsets_ptr + e), 0), M).to(tl.int32)
    end = tl.minimum(tl.maximum(tl.load(offsets_ptr + e + 1), start), M).to(tl.int32)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=ACC)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + rm
        rmask = rows < end
        rows64 = rows.to(tl.int64)
        a = tl.load(a_ptr + rows64[None, :] * stride_am + p[:, None],  # [BLOCK_P, BLOCK_M]
                    mask=pmask[:, None] & rmask[None, :], other=0.0)
        b = tl.load(b_ptr + rows64[:, None] * stride_bm + q[None, :],  # [BLOCK_M, BLOCK_Q]
                    mask=rmask[:, None] & qmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    out_ptrs = out_ptr + e.to(tl.int64) * P * Q + p[:, None].to(tl.int64) * Q + q[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & qmask[None, :])


def grouped_gemm_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, trans_b: bool,
                       out: torch.Tensor, config: GemmConfig | None = None) -> None:
    """dw[e] = x_e^T dy_e into out [E, K, N], or dy_e^T x_e into out [E, N, K] with trans_b,
    over the rows offsets[e]:offsets[e+1]; empty groups get exact zeros.

    x [M, K] and dy [M, N] with stride(1) == 1; offsets [E + 1] int64 on x's device; out
    contiguous in x's dtype. config: tile sizes, default ``wgrad_config(M // E, P, Q, dtype)``
    for dw[e] of shape [P, Q].
    """
    M, K = x.shape
    N = dy.shape[1]
    E = offsets.shape[0] - 1
    a, b = (dy, x) if trans_b else (x, dy)
    P, Q = a.shape[1], b.shape[1]
    assert dy.shape[0] == M and out.shape == (E, P, Q) and out.is_contiguous()
    assert (x.stride(1) == 1 or K <= 1) and (dy.stride(1) == 1 or N <= 1)
    assert out.dtype == x.dtype == dy.dtype
    assert offsets.dtype == torch.int64 and offsets.is_contiguous()
    if E == 0 or P == 0 or Q == 0:
        return
    cfg = config or wgrad_config(M // E, P, Q, x.dtype)
    acc, precision = _dot_types(x.dtype)
    grid = (E, triton.cdiv(P, cfg.block_k), triton.cdiv(Q, cfg.block_n))
    _grouped_gemm_wgrad_kernel[grid](
        a, a.stride(0), b, b.stride(0), offsets, out, M, P, Q, ACC=acc, DOT_PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_P=cfg.block_k, BLOCK_Q=cfg.block_n,
        **launch("grouped_gemm_wgrad", num_warps=cfg.num_warps, num_stages=cfg.num_stages))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (python -m compass_kernels.triton.aot): the configurations the
# heuristics pick for the benchmark shapes, forward (trans_b False: w [E, K, N]; True: the
# nn.Linear layout and dgrad), and wgrad, in bf16, fp16 and fp32. 16-bit cases must use wgmma.
# ----------------------------------------------------------------------------------------------

# (E, rows per group, N, K) of the forward and dgrad GEMMs: Compass (E = 16, 16K rows, K = 2048,
# N = 1408), fine-grained (E = 128, 16K rows, K = 1024, N = 256), Transformer Engine's
# 8 x 4096 x 768 x 2048, and E = 1024 for the multi-chunk group walk.
_AOT_SHAPES = [(16, 1024, 1408, 2048), (16, 1024, 2048, 1408), (128, 128, 256, 1024),
               (128, 128, 1024, 256), (8, 4096, 768, 2048), (8, 4096, 2048, 768),
               (1024, 16, 1408, 2048)]


def _aot_cases():
    i32 = "i32"
    cases, seen = [], set()
    # bf16 on every shape; fp16 and fp32 on the Compass shape (the same code paths).
    for dt, torch_dt, shapes in (("bf16", torch.bfloat16, _AOT_SHAPES),
                                 ("fp16", torch.float16, _AOT_SHAPES[:2]),
                                 ("fp32", torch.float32, _AOT_SHAPES[:2])):
        acc, precision = _dot_types(torch_dt)
        opts = {"expect_in_ptx": ("wgmma",)} if torch_dt.itemsize == 2 else {}
        for E, mpg, N, K in shapes:
            g_chunk = _group_chunk(E)
            multi = E + 2 > g_chunk
            for trans_b in (False, True):
                cfg = gemm_config(mpg, N, K, torch_dt)
                key = ("fwd", dt, cfg, trans_b, multi)  # G_CHUNK barely matters: one per config
                if key in seen or (multi and trans_b):  # one multi-chunk variant is enough
                    continue
                seen.add(key)
                cases.append((
                    _grouped_gemm_kernel,
                    {"x_ptr": f"*{dt}", "stride_xm": i32, "w_ptr": f"*{dt}",
                     "offsets_ptr": "*i64", "out_ptr": f"*{dt}", "stride_om": i32, "M": i32,
                     "N": i32, "K": i32, "E": i32, "max_tiles": i32},
                    {"TRANS_B": trans_b, "ACC": acc, "DOT_PRECISION": precision,
                     "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                     "G_CHUNK": g_chunk, "MULTI_CHUNK": multi},
                    f"grouped_gemm_{dt}_{'nt' if trans_b else 'nn'}_{cfg.block_m}x{cfg.block_n}"
                    f"x{cfg.block_k}_E{E}",
                    {"launch": "grouped_gemm", "num_warps": cfg.num_warps,
                     "num_stages": cfg.num_stages, "div16": ("stride_xm", "stride_om", "N", "K"),
                     **opts}))
            for P, Q in ((K, N), (N, K)):  # dw [E, K, N] and, with trans_b, [E, N, K]
                cfg = wgrad_config(mpg, P, Q, torch_dt)
                key = ("wgrad", dt, cfg)
                if key in seen:
                    continue
                seen.add(key)
                cases.append((
                    _grouped_gemm_wgrad_kernel,
                    {"a_ptr": f"*{dt}", "stride_am": i32, "b_ptr": f"*{dt}", "stride_bm": i32,
                     "offsets_ptr": "*i64", "out_ptr": f"*{dt}", "M": i32, "P": i32, "Q": i32},
                    {"ACC": acc, "DOT_PRECISION": precision, "BLOCK_M": cfg.block_m,
                     "BLOCK_P": cfg.block_k, "BLOCK_Q": cfg.block_n},
                    f"grouped_gemm_wgrad_{dt}_{cfg.block_k}x{cfg.block_n}x{cfg.block_m}",
                    {"launch": "grouped_gemm_wgrad", "num_warps": cfg.num_warps,
                     "num_stages": cfg.num_stages, "div16": ("stride_am", "stride_bm", "P", "Q"),
                     **opts}))
    return cases


AOT_CASES = _aot_cases()
