"""Triton routing kernels: route, permute, unpermute and unpermute's backward.

Semantics are those of ``compass_kernels._ext`` (the contract the C++ backends implement):

route      ids [T, k] -> row_id_map [T, k] int64, tokens_per_expert [E] int64,
           expert_offsets [E + 1] int64. Ranks are stable in (t, j) order, so the plan is
           deterministic and identical across backends.
permute    out[row_id_map[t, j]] = x[t]; padding rows and the tail past expert_offsets[E] zeroed.
           Pure data movement: the data is viewed as an integer dtype of the same size, so every
           element type (fp8 included) moves bit-exactly.
unpermute  out[t] = sum_j probs[t, j] * y[row_id_map[t, j]], fp32 accumulation (fp64 for fp64),
           slot order j = 0..k-1, no atomics.
unpermute_bwd  grad_y[row] = probs[t, j] * grad_out[t]; grad_probs[t, j] = <grad_out[t], y[row]>.

Launchers validate nothing beyond internal asserts (the op layer validates) and never read device
values on the host, so they are safe under CUDA-graph capture and ``torch.compile``.
All row indices are int64 before they multiply a stride: rows x hidden passes 2^31 at
T*k = 1M rows of H = 4096.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compass_kernels.triton.launch import launch

# ----------------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------------
# Three launches, no atomics, so ranks are deterministic:
#   1. count:  program c histograms its chunk of assignments into counts[c, :E] (one-hot sums).
#   2. scan:   per expert, an exclusive scan of counts over chunks (in place -> base[c, e]),
#              totals[e] and tokens_per_expert[e]. Programs tile the experts.
#   3. assign: every program recomputes the E-length offsets from totals (E <= a few thousand
#              adds, cheaper than a fourth launch); program 0 writes expert_offsets. Each chunk
#              then walks its blocks again: rank = base[c, e] + running[e] + in-block rank (a
#              cumsum of the one-hot along the block axis).
# The one-hot tile is [BLOCK, E_PAD] with BLOCK * E_PAD = _ROUTE_TILE, so the work is
# O(T * k * E_PAD): trivial at E = 16, k = 2; at E = 1024 it is the cost to beat later.

_ROUTE_TILE = 4096  # elements of the one-hot tile: 16 per thread at 8 warps
_ROUTE_SCAN_TILE = 2048  # elements of the [CB, E_TILE] int64 tile of the scan kernel
_ROUTE_MAX_BLOCK = 256
_ROUTE_MAX_CHUNKS = 4096  # programs of kernels 1 and 3
_ROUTE_MAX_WORKSPACE = 1 << 20  # int64 elements of base[c, e]: 8 MiB


@triton.jit
def _route_count_kernel(ids_ptr, counts_ptr, N, E, blocks_per_chunk,
                        BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, E_PAD)
    lanes = tl.arange(0, BLOCK)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    start = c * blocks_per_chunk * BLOCK
    for b in range(blocks_per_chunk):
        idx = start + b * BLOCK + lanes
        e = tl.load(ids_ptr + idx, mask=idx < N, other=-1)
        e = tl.where((e >= 0) & (e < E), e, -1)  # out-of-range ids count as unrouted
        counts += tl.sum((e[:, None] == cols[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + c * E + cols, counts.to(tl.int64), mask=cols < E)


@triton.jit
def _route_scan_kernel(counts_ptr, totals_ptr, tpe_ptr, num_chunks, E, capacity,
                       CB: tl.constexpr, E_TILE: tl.constexpr):
    cols = tl.program_id(0) * E_TILE + tl.arange(0, E_TILE)
    cmask = cols < E
    running = tl.zeros([E_TILE], dtype=tl.int64)
    for c0 in range(0, num_chunks, CB):
        chunks = c0 + tl.arange(0, CB)
        ptrs = counts_ptr + chunks[:, None].to(tl.int64) * E + cols[None, :]
        m = (chunks[:, None] < num_chunks) & cmask[None, :]
        cnt = tl.load(ptrs, mask=m, other=0)  # [CB, E_TILE] int64
        tl.store(ptrs, tl.cumsum(cnt, axis=0) - cnt + running[None, :], mask=m)
        running += tl.sum(cnt, axis=0)
    tl.store(totals_ptr + cols, running, mask=cmask)
    tpe = tl.where(capacity >= 0, tl.minimum(running, capacity), running)
    tl.store(tpe_ptr + cols, tpe, mask=cmask)


@triton.jit
def _route_assign_kernel(ids_ptr, base_ptr, totals_ptr, row_id_map_ptr, offsets_ptr,
                         N, E, capacity, align, blocks_per_chunk,
                         BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    totals = tl.load(totals_ptr + cols, mask=cmask, other=0)
    tpe = tl.where(capacity >= 0, tl.minimum(totals, capacity), totals)
    seg = (tpe + align - 1) // align * align
    offsets = tl.cumsum(seg, axis=0) - seg  # [E_PAD] int64, exclusive
    if c == 0:
        tl.store(offsets_ptr + cols, offsets, mask=cmask)
        tl.store(offsets_ptr + E, tl.sum(seg, axis=0))
    prev = tl.load(base_ptr + c * E + cols, mask=cmask, other=0)  # rank of the chunk's first hit
    lanes = tl.arange(0, BLOCK)
    start = c * blocks_per_chunk * BLOCK
    for b in range(blocks_per_chunk):
        idx = start + b * BLOCK + lanes
        e = tl.load(ids_ptr + idx, mask=idx < N, other=-1)
        e = tl.where((e >= 0) & (e < E), e, -1)
        hit = e[:, None] == cols[None, :]  # [BLOCK, E_PAD]
        oh = hit.to(tl.int32)
        excl = tl.cumsum(oh, axis=0) - oh  # earlier hits of the same expert in this block
        rank = tl.sum(tl.where(hit, excl.to(tl.int64) + prev[None, :], 0), axis=1)
        first = tl.sum(tl.where(hit, offsets[None, :], 0), axis=1)
        keep = (e >= 0) & ((capacity < 0) | (rank < capacity))
        tl.store(row_id_map_ptr + idx, tl.where(keep, first + rank, -1), mask=idx < N)
        prev += tl.sum(oh, axis=0)


def _route_config(N: int, E: int) -> tuple[int, int, int, int]:
    """(BLOCK, E_PAD, blocks_per_chunk, num_chunks) for N = T * k assignments."""
    e_pad = triton.next_power_of_2(max(E, 1))
    block = max(1, min(_ROUTE_MAX_BLOCK, _ROUTE_TILE // e_pad))
    n_blocks = max(1, triton.cdiv(N, block))
    max_chunks = max(1, min(_ROUTE_MAX_CHUNKS, _ROUTE_MAX_WORKSPACE // max(E, 1)))
    blocks_per_chunk = triton.cdiv(n_blocks, max_chunks)
    return block, e_pad, blocks_per_chunk, triton.cdiv(n_blocks, blocks_per_chunk)


def _route_scan_config(e_pad: int) -> tuple[int, int]:
    """(E_TILE, CB): experts per scan program, chunks per scan step."""
    e_tile = min(e_pad, 128)
    return e_tile, max(1, _ROUTE_SCAN_TILE // e_tile)


def route_workspace_numel(T: int, k: int, E: int) -> int:
    """int64 elements of route's workspace: base[num_chunks, E] then totals[E]."""
    return (_route_config(T * k, E)[3] + 1) * E


def route(topk_ids: torch.Tensor, num_experts: int, capacity: int, align: int,
          row_id_map: torch.Tensor, tokens_per_expert: torch.Tensor,
          expert_offsets: torch.Tensor, workspace: torch.Tensor | None = None) -> None:
    """Fill row_id_map [T, k], tokens_per_expert [E], expert_offsets [E + 1] (all int64).

    topk_ids [T, k] int32/int64 contiguous; capacity < 0 means none; align >= 1.
    workspace: int64 with at least ``route_workspace_numel(T, k, E)`` elements, or None to
    allocate it here (torch.empty: no sync).
    """
    T, k = topk_ids.shape
    N, E = T * k, num_experts
    assert topk_ids.is_contiguous() and align >= 1
    if N == 0 or E == 0:  # no zero-size grids: nothing routed
        row_id_map.fill_(-1)
        tokens_per_expert.zero_()
        expert_offsets.zero_()
        return
    block, e_pad, bpc, num_chunks = _route_config(N, E)
    if workspace is None:
        workspace = torch.empty(route_workspace_numel(T, k, E), dtype=torch.int64,
                                device=topk_ids.device)
    assert workspace.dtype == torch.int64 and workspace.numel() >= (num_chunks + 1) * E
    base = workspace[: num_chunks * E]
    totals = workspace[num_chunks * E: (num_chunks + 1) * E]
    _route_count_kernel[(num_chunks,)](topk_ids, base, N, E, bpc, BLOCK=block, E_PAD=e_pad,
                                       **launch("route_count"))
    e_tile, cb = _route_scan_config(e_pad)
    _route_scan_kernel[(triton.cdiv(E, e_tile),)](
        base, totals, tokens_per_expert, num_chunks, E, capacity, CB=cb, E_TILE=e_tile,
        **launch("route_scan"))
    _route_assign_kernel[(num_chunks,)](
        topk_ids, base, totals, row_id_map, expert_offsets, N, E, capacity, align, bpc,
        BLOCK=block, E_PAD=e_pad, **launch("route_assign"))


# ----------------------------------------------------------------------------------------------
# permute and the padding zero-fill (shared with unpermute_bwd's grad_y)
# ----------------------------------------------------------------------------------------------

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MOVE_BYTES = 4096  # bytes of one row tile moved by a permute program: 16 B per thread, 2 passes
_ZERO_ROWS = 32
_ZERO_TILE = 4096  # elements of the [ROWS, BLOCK_H] zero tile


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """Same bytes, integer dtype of the same size: moves are bit-exact for any element type."""
    return t.view(_INT_VIEW[t.element_size()])


@triton.jit
def _permute_kernel(x_ptr, stride_x, row_id_map_ptr, out_ptr, stride_out, H, k,
                    BLOCK_H: tl.constexpr):
    # grid (T, cdiv(H, BLOCK_H)): x[t] is read once per H block and stored to its k rows.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    v = tl.load(x_ptr + t * stride_x + h, mask=hmask)
    for j in range(k):
        row = tl.load(row_id_map_ptr + t * k + j)
        if row >= 0:
            tl.store(out_ptr + row * stride_out + h, v, mask=hmask)


@triton.jit
def _zero_pad_rows_kernel(out_ptr, stride_out, offsets_ptr, tpe_ptr, E, num_rows, H, n_search,
                          ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    # Row r lies in the segment of the last expert e with offsets[e] <= r (e = E: the tail).
    # It is padding iff r >= offsets[e] + tokens_per_expert[e]. Binary search per row:
    # n_search = ceil(log2(E + 1)) steps over offsets[0..E].
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    lo = tl.zeros([ROWS], dtype=tl.int32)
    hi = tl.zeros([ROWS], dtype=tl.int32) + (E + 1)
    for _ in range(n_search):
        mid = (lo + hi) // 2
        le = tl.load(offsets_ptr + mid) <= r
        lo = tl.where(le, mid, lo)
        hi = tl.where(le, hi, mid)
    data_end = tl.load(offsets_ptr + lo) + tl.load(tpe_ptr + lo, mask=lo < E, other=0)
    pad = (r < num_rows) & (r >= data_end)
    if tl.max(pad.to(tl.int32), axis=0) > 0:  # most blocks hold only data rows: skip the H loop
        zero = tl.zeros([ROWS, BLOCK_H], dtype=out_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            tl.store(out_ptr + r[:, None] * stride_out + h[None, :], zero,
                     mask=pad[:, None] & (h < H)[None, :])


def _move_block_h(H: int, elem_size: int) -> int:
    return min(triton.next_power_of_2(max(H, 1)), max(16, _MOVE_BYTES // elem_size))


def _zero_pad_rows(out: torch.Tensor, expert_offsets: torch.Tensor,
                   tokens_per_expert: torch.Tensor) -> None:
    num_rows, H = out.shape
    if num_rows == 0 or H == 0:
        return
    E = tokens_per_expert.numel()
    block_h = min(triton.next_power_of_2(H), _ZERO_TILE // _ZERO_ROWS)
    _zero_pad_rows_kernel[(triton.cdiv(num_rows, _ZERO_ROWS),)](
        _as_int(out), out.stride(0), expert_offsets, tokens_per_expert, E, num_rows, H,
        E.bit_length(), ROWS=_ZERO_ROWS, BLOCK_H=block_h, **launch("zero_pad_rows"))


def permute(x: torch.Tensor, row_id_map: torch.Tensor, expert_offsets: torch.Tensor,
            tokens_per_expert: torch.Tensor, out: torch.Tensor) -> None:
    """out[row_id_map[t, j]] = x[t] for rows >= 0; every other row of out is zeroed.

    x [T, H] with x.stride(1) == 1 (row stride may exceed H), any dtype; row_id_map [T, k]
    int64 contiguous; out [num_rows, H] contiguous, same dtype as x.
    """
    T, H = x.shape
    k = row_id_map.shape[1]
    assert (x.stride(1) == 1 or H <= 1) and out.is_contiguous() and out.dtype == x.dtype
    if T > 0 and k > 0 and H > 0:
        block_h = _move_block_h(H, x.element_size())
        _permute_kernel[(T, triton.cdiv(H, block_h))](
            _as_int(x), x.stride(0), row_id_map, _as_int(out), out.stride(0), H, k,
            BLOCK_H=block_h, **launch("permute"))
    _zero_pad_rows(out, expert_offsets, tokens_per_expert)


# ----------------------------------------------------------------------------------------------
# unpermute and its backward
# ----------------------------------------------------------------------------------------------

_COMBINE_BLOCK_H = 1024  # fp32 accumulators per program: 8 per thread at 4 warps
_BWD_TILE = 2048  # elements of the [K_PAD, BLOCK_H] tile of unpermute_bwd


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _unpermute_kernel(y_ptr, stride_y, row_id_map_ptr, probs_ptr, out_ptr, stride_out, H, k,
                      HAS_PROBS: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid (T, cdiv(H, BLOCK_H)); one program owns out[t, h-block]: a gather, no atomics.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    acc = tl.zeros([BLOCK_H], dtype=ACC)
    for j in range(k):
        row = tl.load(row_id_map_ptr + t * k + j)
        if row >= 0:
            v = tl.load(y_ptr + row * stride_y + h, mask=hmask, other=0).to(ACC)
            if HAS_PROBS:
                # A separate multiply and add, as in the C++ backends: the launch table runs
                # this kernel with fp fusion off, so the two are not contracted into one FMA.
                prod = tl.load(probs_ptr + t * k + j).to(ACC) * v
                acc = acc + prod
            else:
                acc = acc + v
    tl.store(out_ptr + t * stride_out + h, acc.to(out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _unpermute_bwd_kernel(g_ptr, stride_g, y_ptr, stride_y, row_id_map_ptr, probs_ptr,
                          grad_y_ptr, stride_gy, grad_probs_ptr, H, k,
                          HAS_PROBS: tl.constexpr, COMPUTE_GP: tl.constexpr, ACC: tl.constexpr,
                          K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid (T,): a program walks H once, reading grad_out[t] once for all k slots; it scatters
    # grad_y rows and, for grad_probs, keeps [K_PAD, BLOCK_H] partial dot products.
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K_PAD)
    jmask = j < k
    rows = tl.load(row_id_map_ptr + t * k + j, mask=jmask, other=-1)
    live = rows >= 0
    if HAS_PROBS:
        w = tl.load(probs_ptr + t * k + j, mask=jmask, other=0).to(ACC)
    dots = tl.zeros([K_PAD, BLOCK_H], dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hmask = h < H
        m2 = live[:, None] & hmask[None, :]
        g = tl.load(g_ptr + t * stride_g + h, mask=hmask, other=0)
        if HAS_PROBS:
            gy = (w[:, None] * g.to(ACC)[None, :]).to(grad_y_ptr.dtype.element_ty)
        else:
            gy = tl.broadcast_to(g[None, :], [K_PAD, BLOCK_H])
        tl.store(grad_y_ptr + rows[:, None] * stride_gy + h[None, :], gy, mask=m2)
        if COMPUTE_GP:
            yv = tl.load(y_ptr + rows[:, None] * stride_y + h[None, :], mask=m2, other=0)
            dots += g.to(ACC)[None, :] * yv.to(ACC)
    if COMPUTE_GP:
        gp = tl.where(live, tl.sum(dots, axis=1), 0)
        tl.store(grad_probs_ptr + t * k + j, gp.to(grad_probs_ptr.dtype.element_ty), mask=jmask)


def unpermute(y: torch.Tensor, row_id_map: torch.Tensor, probs: torch.Tensor | None,
              out: torch.Tensor) -> None:
    """out[t] = sum_j probs[t, j] * y[row_id_map[t, j]] over rows >= 0 (weight 1 without probs).

    y [num_rows, H] float with y.stride(1) == 1; row_id_map [T, k] int64 contiguous;
    probs [T, k] contiguous float (any float dtype) or None; out [T, H] contiguous, y's dtype.
    """
    T, H = out.shape
    k = row_id_map.shape[1]
    assert (y.stride(1) == 1 or H <= 1) and out.is_contiguous() and out.dtype == y.dtype
    assert probs is None or probs.is_contiguous()
    if T == 0 or H == 0:
        return
    if k == 0:
        out.zero_()
        return
    block_h = min(triton.next_power_of_2(H), _COMBINE_BLOCK_H)
    _unpermute_kernel[(T, triton.cdiv(H, block_h))](
        y, y.stride(0), row_id_map, probs if probs is not None else row_id_map, out,
        out.stride(0), H, k, HAS_PROBS=probs is not None, ACC=_acc_dtype(y.dtype),
        BLOCK_H=block_h, **launch("unpermute"))


def unpermute_bwd(grad_out: torch.Tensor, y: torch.Tensor | None, row_id_map: torch.Tensor,
                  expert_offsets: torch.Tensor, tokens_per_expert: torch.Tensor,
                  probs: torch.Tensor | None, grad_y: torch.Tensor,
                  grad_probs: torch.Tensor | None) -> None:
    """Backward of unpermute.

    grad_y[row_id_map[t, j]] = probs[t, j] * grad_out[t] (a bit-exact copy without probs), other
    rows of grad_y zero; grad_probs[t, j] = <grad_out[t], y[row_id_map[t, j]]> accumulated in
    fp32 (fp64 for fp64), 0 where the row is -1. grad_out [T, H] and y [num_rows, H] have
    stride(1) == 1; grad_y [num_rows, H] contiguous in grad_out's dtype; grad_probs [T, k]
    contiguous or None (then y may be None too).
    """
    T, H = grad_out.shape
    k = row_id_map.shape[1]
    assert grad_out.stride(1) == 1 or H <= 1
    assert grad_y.is_contiguous() and grad_y.dtype == grad_out.dtype
    compute_gp = grad_probs is not None
    assert not compute_gp or (y is not None and (y.stride(1) == 1 or H <= 1)
                              and grad_probs.is_contiguous())
    if T > 0 and k > 0:
        if H == 0:
            if compute_gp:
                grad_probs.zero_()
        else:
            k_pad = triton.next_power_of_2(k)
            block_h = min(triton.next_power_of_2(H), max(16, _BWD_TILE // k_pad))
            has_probs = probs is not None
            # Without probs grad_y is a pure copy: move integer bits, as permute does (unless
            # grad_probs still needs grad_out as floats; a float load/store is bit-exact too).
            as_bits = not has_probs and not compute_gp
            g = _as_int(grad_out) if as_bits else grad_out
            gy = _as_int(grad_y) if as_bits else grad_y
            _unpermute_bwd_kernel[(T,)](
                g, grad_out.stride(0), y if compute_gp else g, y.stride(0) if compute_gp else 0,
                row_id_map, probs if has_probs else row_id_map, gy, grad_y.stride(0),
                grad_probs if compute_gp else row_id_map, H, k,
                HAS_PROBS=has_probs, COMPUTE_GP=compute_gp, ACC=_acc_dtype(grad_out.dtype),
                K_PAD=k_pad, BLOCK_H=block_h, **launch("unpermute_bwd"))
    elif compute_gp and grad_probs.numel() > 0:
        grad_probs.zero_()
    _zero_pad_rows(grad_y, expert_offsets, tokens_per_expert)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (python -m compass_kernels.triton.aot): the configurations the
# launchers pick for the Compass shape (E = 16, k = 2), the fine-grained one (E = 128, k = 8) and
# the largest E (1024), with the element types the op layer passes.
# ----------------------------------------------------------------------------------------------

def _aot_cases():
    i32 = "i32"
    cases = []
    for ids in ("*i32", "*i64"):
        for E in (16, 128, 1024):
            block, e_pad, _, _ = _route_config(1 << 16, E)
            meta = {"BLOCK": block, "E_PAD": e_pad}
            tag = f"{ids[1:]}_E{e_pad}"
            cases.append((_route_count_kernel,
                          {"ids_ptr": ids, "counts_ptr": "*i64", "N": i32, "E": i32,
                           "blocks_per_chunk": i32}, meta, f"route_count_{tag}", {"launch": "route_count"}))
            cases.append((_route_assign_kernel,
                          {"ids_ptr": ids, "base_ptr": "*i64", "totals_ptr": "*i64",
                           "row_id_map_ptr": "*i64", "offsets_ptr": "*i64", "N": i32, "E": i32,
                           "capacity": i32, "align": i32, "blocks_per_chunk": i32},
                          meta, f"route_assign_{tag}", {"launch": "route_assign"}))
    for e_pad in (16, 128):
        e_tile, cb = _route_scan_config(e_pad)
        cases.append((_route_scan_kernel,
                      {"counts_ptr": "*i64", "totals_ptr": "*i64", "tpe_ptr": "*i64",
                       "num_chunks": i32, "E": i32, "capacity": i32},
                      {"CB": cb, "E_TILE": e_tile}, f"route_scan_T{e_tile}", {"launch": "route_scan"}))
    move = {"launch": "permute", "div16": ("stride_x", "stride_out", "H")}
    for bits, size in (("i8", 1), ("i16", 2), ("i32", 4)):  # fp8, bf16/fp16, fp32 as integers
        ptr = f"*{bits}"
        cases.append((_permute_kernel,
                      {"x_ptr": ptr, "stride_x": i32, "row_id_map_ptr": "*i64", "out_ptr": ptr,
                       "stride_out": i32, "H": i32, "k": i32},
                      {"BLOCK_H": _move_block_h(4096, size)}, f"permute_{bits}", move))
        cases.append((_zero_pad_rows_kernel,
                      {"out_ptr": ptr, "stride_out": i32, "offsets_ptr": "*i64",
                       "tpe_ptr": "*i64", "E": i32, "num_rows": i32, "H": i32, "n_search": i32},
                      {"ROWS": _ZERO_ROWS, "BLOCK_H": _ZERO_TILE // _ZERO_ROWS},
                      f"zero_pad_{bits}", {"launch": "zero_pad_rows", "div16": ("stride_out", "H")}))
    for dt, acc in (("bf16", tl.float32), ("fp16", tl.float32), ("fp32", tl.float32),
                    ("fp64", tl.float64)):
        for has_probs in (True, False):
            cases.append((_unpermute_kernel,
                          {"y_ptr": f"*{dt}", "stride_y": i32, "row_id_map_ptr": "*i64",
                           "probs_ptr": "*fp32" if has_probs else "*i64", "out_ptr": f"*{dt}",
                           "stride_out": i32, "H": i32, "k": i32},
                          {"HAS_PROBS": has_probs, "ACC": acc, "BLOCK_H": _COMBINE_BLOCK_H},
                          f"unpermute_{dt}{'_probs' if has_probs else ''}",
                          {"launch": "unpermute", "div16": ("stride_y", "stride_out", "H")}))
    bwd_div16 = {"launch": "unpermute_bwd", "div16": ("stride_g", "stride_y", "stride_gy", "H")}
    for dt, acc in (("bf16", tl.float32), ("fp16", tl.float32), ("fp32", tl.float32),
                    ("fp64", tl.float64)):
        for k_pad in (2, 8):  # with probs: weighted grad_y and grad_probs
            cases.append((_unpermute_bwd_kernel,
                          {"g_ptr": f"*{dt}", "stride_g": i32, "y_ptr": f"*{dt}", "stride_y": i32,
                           "row_id_map_ptr": "*i64", "probs_ptr": "*fp32",
                           "grad_y_ptr": f"*{dt}", "stride_gy": i32, "grad_probs_ptr": "*fp32",
                           "H": i32, "k": i32},
                          {"HAS_PROBS": True, "COMPUTE_GP": True, "ACC": acc, "K_PAD": k_pad,
                           "BLOCK_H": _BWD_TILE // k_pad},
                          f"unpermute_bwd_{dt}_k{k_pad}", bwd_div16))
    for bits in ("i16", "i32"):
        for k_pad in (2, 8):  # without probs: a bit copy of grad_out into grad_y
            ptr = f"*{bits}"
            cases.append((_unpermute_bwd_kernel,
                          {"g_ptr": ptr, "stride_g": i32, "y_ptr": ptr, "stride_y": i32,
                           "row_id_map_ptr": "*i64", "probs_ptr": "*i64", "grad_y_ptr": ptr,
                           "stride_gy": i32, "grad_probs_ptr": "*i64", "H": i32, "k": i32},
                          {"HAS_PROBS": False, "COMPUTE_GP": False, "ACC": tl.float32,
                           "K_PAD": k_pad, "BLOCK_H": _BWD_TILE // k_pad},
                          f"unpermute_bwd_copy_{bits}_k{k_pad}", bwd_div16))
    return cases


AOT_CASES = _aot_cases()
