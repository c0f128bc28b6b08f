"""Chunk sort: reorder consecutive row chunks of ``x [R, H]`` by a permutation, sizes on the device.

The expert-parallel dispatcher needs it twice per MoE layer. After the token all-to-all a rank holds
its rows grouped by (source rank, local expert); the local grouped GEMM wants them grouped by
(local expert, source rank), and the combine path wants the inverse. The chunk sizes are data
(token counts), so they stay on the device: the output row count is static (``num_rows``, default
R) and each output row finds its source row from the chunk offsets on the device, with no host sync.

Semantics (every backend, bit for bit, any dtype: rows move as raw bits)::

    chunk i of x        rows [start_i, start_i + split_sizes[i]), start = exclusive cumsum of sizes
    out                 chunks sorted_idxs[0], sorted_idxs[1], ... concatenated, then zero rows
    out [num_rows, H]   truncated or zero-padded to num_rows; a source row past R reads as zero

Autograd: the backward is the inverse chunk permutation (``sort_chunks`` of the gradient with sizes
``split_sizes[sorted_idxs]`` and order ``argsort(sorted_idxs)``), itself differentiable.
Stack (docs/design.md, op anatomy): reference ``sort_chunks_ref`` -> launchers -> ``compass::sort_chunks`` declared with
``_opdef.define`` (custom op, fake tensor, autograd) -> the public ``sort_chunks``.
"""

from __future__ import annotations

import torch

from compass_kernels import _backend, _ext
from compass_kernels._opdef import define

__all__ = ["sort_chunks", "sort_chunks_ref"]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    """Same bytes, integer dtype: gathers move raw bits (NaN payloads, float8, -0.0)."""
    return x.view(_INT_VIEW[x.element_size()])


def chunk_bases(split_sizes: torch.Tensor, sorted_idxs: torch.Tensor):
    """``end_out [S]`` (exclusive end row of each output chunk) and ``base [S]`` (output row r of
    output chunk p reads source row ``r + base[p]``), int64, on the device, no host sync."""
    sizes_out = split_sizes.index_select(0, sorted_idxs)                # [S]
    end_out = torch.cumsum(sizes_out, 0)                                # [S]
    start_in = torch.cumsum(split_sizes, 0) - split_sizes               # [S]
    base = start_in.index_select(0, sorted_idxs) - (end_out - sizes_out)
    return end_out, base


def sort_chunks_ref(x: torch.Tensor, split_sizes: torch.Tensor, sorted_idxs: torch.Tensor,
                    num_rows: int | None = None) -> torch.Tensor:
    """Reference: x [R, H] -> [num_rows, H]. One gather of the source rows (index from a
    ``searchsorted`` over the output chunk ends) and a masked zero fill; nothing is read on the
    host except, for CPU tensors, whether the fill is needed."""
    R, H = x.shape
    n = R if num_rows is None else num_rows
    S = split_sizes.shape[0]
    if S == 0 or R == 0:
        return x.new_zeros(n, H)
    end_out, base = chunk_bases(split_sizes.long(), sorted_idxs.long())
    r = torch.arange(n, device=x.device)                                # [n]
    p = torch.searchsorted(end_out, r, right=True)                      # output chunk of row r, S if none
    src = r + base.index_select(0, p.clamp(max=S - 1))
    valid = (p < S) & (src < R)
    out = _as_bits(x).index_select(0, torch.where(valid, src, 0))
    # Zero the rows without a source. On CPU, reading valid.all() costs no device sync and skips a
    # full extra pass in the usual case (chunks cover every row): 16 ms of 100 ms at 16K x 1024 fp32.
    if x.device.type != "cpu" or not bool(valid.all()):
        out.masked_fill_(~valid[:, None], 0)
    return out.view(x.dtype)


# ---------------------------------------------------------------------------------------------
# validation and launchers


def _check(x, split_sizes, sorted_idxs, num_rows) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [R, H], got shape {tuple(x.shape)}")
    for name, t in (("split_sizes", split_sizes), ("sorted_idxs", sorted_idxs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [S], got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")
    if sorted_idxs.shape[0] != split_sizes.shape[0]:
        raise ValueError(f"sorted_idxs must have S = {split_sizes.shape[0]} entries (one per chunk), "
                         f"got {sorted_idxs.shape[0]}")
    if num_rows is not None and (isinstance(num_rows, bool) or not isinstance(num_rows, (int, torch.SymInt))
                                 or num_rows < 0):
        raise ValueError(f"num_rows must be None or an int >= 0, got {num_rows!r}")
    if split_sizes.numel() and _ext.values_readable(split_sizes):
        if int(split_sizes.min()) < 0:
            raise ValueError(f"split_sizes must be >= 0, got {split_sizes.tolist()}")
        S = sorted_idxs.shape[0]
        if not torch.equal(torch.sort(sorted_idxs).values, torch.arange(S, device=x.device)):
            raise ValueError(f"sorted_idxs must be a permutation of 0..{S - 1}, got {sorted_idxs.tolist()}")


def _sort_chunks_impl(x, split_sizes, sorted_idxs, num_rows: int) -> torch.Tensor:
    backend = _backend.resolve("sort_chunks", x.device)
    if backend == "torch":
        return sort_chunks_ref(x, split_sizes, sorted_idxs, num_rows)
    from compass_kernels.triton import sort_chunks as tsc

    x = x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()
    out = _ext.empty(num_rows, x.shape[1], dtype=x.dtype, device=x.device)
    end_out, base = chunk_bases(split_sizes, sorted_idxs)
    tsc.sort_chunks(x, end_out, base, out)
    return out


# ---------------------------------------------------------------------------------------------
# autograd formula and the op declaration (compass_kernels._opdef)


def _setup(ctx, inputs, output):
    x, split_sizes, sorted_idxs, _ = inputs
    ctx.num_rows_in = x.shape[0]
    ctx.save_for_backward(split_sizes, sorted_idxs)


def _backward(ctx, grad):
    split_sizes, sorted_idxs = ctx.saved_tensors
    # Output chunk p is input chunk sorted_idxs[p]: send it back with the inverse permutation.
    S = sorted_idxs.shape[0]
    inverse = torch.empty_like(sorted_idxs).scatter_(0, sorted_idxs, torch.arange(S, device=sorted_idxs.device))
    sizes_out = split_sizes.index_select(0, sorted_idxs)
    grad_x = _sort_chunks_op(grad.contiguous(), sizes_out, inverse, ctx.num_rows_in)
    return grad_x, None, None, None


# No C++ kernel yet: CPU tensors get the (sync-free, two-pass) torch reference.
@define("sort_chunks", impl=_sort_chunks_impl, backends=("torch", "triton"), backward=_backward,
        setup_context=_setup)
def _sort_chunks_op(x: torch.Tensor, split_sizes: torch.Tensor, sorted_idxs: torch.Tensor,
                    num_rows: int) -> torch.Tensor:
    return x.new_empty(num_rows, x.shape[1])


def sort_chunks(x: torch.Tensor, split_sizes: torch.Tensor, sorted_idxs: torch.Tensor, *,
                num_rows: int | None = None) -> torch.Tensor:
    """Reorder the S consecutive row chunks of ``x [R, H]`` (sizes ``split_sizes [S]`` int64, on
    x's device) into the order ``sorted_idxs [S]`` int64 (a permutation; chunk ``sorted_idxs[0]``
    first) -> ``[num_rows, H]`` (default R). Rows past the last chunk are zero. Bit-exact for any
    dtype, differentiable in x, no host synchronisation (sizes and order are read on the device).

    Example (EP combine order): rows grouped (source rank s, local expert l) with S = ep * L chunks
    to (l, s) order: ``sorted_idxs = torch.arange(S).view(ep, L).t().flatten()``.
    """
    _check(x, split_sizes, sorted_idxs, num_rows)
    n = x.shape[0] if num_rows is None else num_rows
    return _sort_chunks_op(x, split_sizes, sorted_idxs, n)
