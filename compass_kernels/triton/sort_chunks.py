"""Triton chunk sort: each output row finds its source row on the device (binary search over the
output chunk ends), then moves its bytes; rows without a source are zero.

``end_out [S]`` and ``base [S]`` come from ``compass_kernels.sort_chunks.chunk_bases``: output row r
lies in output chunk p = #{q : end_out[q] <= r} and reads source row ``r + base[p]``. Data moves as
integers of the element's size, so every dtype is bit-exact. Row indices are int64 before they
multiply a stride. Nothing is read on the host: safe under CUDA-graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compass_kernels.triton.launch import launch

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ROWS = 16
_TILE_BYTES = 16384  # bytes of one [ROWS, BLOCK_H] tile: 1 KiB per row, 64 B per thread at 8 warps


@triton.jit
def _sort_chunks_kernel(x_ptr, stride_x, out_ptr, stride_out, end_ptr, base_ptr, S, R, num_rows, H,
                        n_search, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    # p = first q with end_out[q] > r (S if none): n_search = S.bit_length() halvings of [0, S].
    lo = tl.zeros([ROWS], dtype=tl.int64)
    hi = tl.zeros([ROWS], dtype=tl.int64) + S
    for _ in range(n_search):
        active = lo < hi
        mid = (lo + hi) // 2
        le = tl.load(end_ptr + mid, mask=active, other=0) <= r
        lo = tl.where(active & le, mid + 1, lo)
        hi = tl.where(active & ~le, mid, hi)
    in_chunk = lo < S
    src = r + tl.load(base_ptr + lo, mask=in_chunk, other=0)
    rmask = r < num_rows
    valid = rmask & in_chunk & (src < R)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hmask = (h < H)[None, :]
        v = tl.load(x_ptr + src[:, None] * stride_x + h[None, :], mask=valid[:, None] & hmask, other=0)
        tl.store(out_ptr + r[:, None] * stride_out + h[None, :], v, mask=rmask[:, None] & hmask)


def sort_chunks(x: torch.Tensor, end_out: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> None:
    """out [num_rows, H] contiguous <- chunk-sorted rows of x [R, H] (x.stride(1) == 1 or H <= 1)."""
    R, H = x.shape
    num_rows = out.shape[0]
    S = end_out.shape[0]
    assert out.is_contiguous() and out.dtype == x.dtype and (x.stride(1) == 1 or H <= 1)
    if num_rows == 0 or H == 0:
        return
    if S == 0 or R == 0:
        out.zero_()
        return
    view = _INT_VIEW[x.element_size()]
    block_h = min(triton.next_power_of_2(H), max(16, _TILE_BYTES // (_ROWS * x.element_size())))
    stride_x = x.stride(0) if R > 1 else H
    _sort_chunks_kernel[(triton.cdiv(num_rows, _ROWS),)](
        x.view(view), stride_x, out.view(view), out.stride(0), end_out, base, S, R, num_rows, H,
        S.bit_length(), ROWS=_ROWS, BLOCK_H=block_h, **launch("sort_chunks"))


def _aot_cases():
    # data moves as integers: fp8 / bf16 and fp16 / fp32 / fp64 rows
    cases = []
    for bits, size in (("i8", 1), ("i16", 2), ("i32", 4), ("i64", 8)):
        ptr = f"*{bits}"
        cases.append((_sort_chunks_kernel,
                      {"x_ptr": ptr, "stride_x": "i32", "out_ptr": ptr, "stride_out": "i32",
                       "end_ptr": "*i64", "base_ptr": "*i64", "S": "i32", "R": "i32", "num_rows": "i32",
                       "H": "i32", "n_search": "i32"},
                      {"ROWS": _ROWS, "BLOCK_H": _TILE_BYTES // (_ROWS * size)}, f"sort_chunks_{bits}",
                      {"launch": "sort_chunks", "div16": ("stride_x", "stride_out", "H")}))
    return cases


AOT_CASES = _aot_cases()
