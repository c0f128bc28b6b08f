"""Readable PyTorch references for the routing ops: the oracle of every test and benchmark.

They run on any device, in any float dtype (float64 included), with no host synchronisation, so
they also serve as the ``torch`` backend. Conventions (exact; every backend matches them):

* An assignment is a (token t, slot j) pair with ``topk_ids[t, j] = e >= 0``; ``-1`` means "no expert".
* Within an expert, assignments are ordered by (t, j); an assignment's *rank* is its position there.
* With ``capacity = C`` ranks >= C are dropped. Each expert's segment holds its kept assignments
  followed by zero padding up to a multiple of ``align``; segments are laid out expert by expert.
"""

from __future__ import annotations

import torch


def round_up(n, multiple: int):
    """``n`` rounded up to a multiple of ``multiple``."""
    return (n + multiple - 1) // multiple * multiple


def num_rows_bound(num_tokens, topk: int, num_experts: int, capacity: int | None, align: int):
    """A static upper bound on the permuted row count, from shapes and arguments only.

    Exact (T * k) without capacity or align. Padding adds at most ``align - 1`` rows to each
    non-empty expert, and there are at most min(E, T * k) of those; with capacity, no segment is
    longer than round_up(C, align).
    """
    n = num_tokens * topk
    bound = n + torch.sym_min(num_experts, n) * (align - 1) if align > 1 else n
    if capacity is not None:
        bound = torch.sym_min(bound, num_experts * round_up(capacity, align))
    return bound


def route_ref(topk_ids: torch.Tensor, num_experts: int, capacity: int | None = None, align: int = 1):
    """topk_ids [T, k] int -> (row_id_map [T, k], tokens_per_expert [E], expert_offsets [E + 1]), int64."""
    T, k = topk_ids.shape
    E = num_experts
    ids = topk_ids.reshape(-1).long()                                 # [N], in (t, j) order
    valid = (ids >= 0) & (ids < E)
    key = torch.where(valid, ids, E)                                  # unrouted -> sentinel expert E
    order = torch.argsort(key, stable=True)                           # grouped by expert, (t, j) kept
    count_all = torch.bincount(key, minlength=E + 1)                  # [E + 1]
    first = torch.cumsum(count_all, 0) - count_all                    # sorted position of each expert
    rank = torch.empty_like(ids)
    rank[order] = torch.arange(ids.numel(), device=ids.device) - first[key[order]]

    count = count_all[:E]
    kept = count if capacity is None else count.clamp(max=capacity)
    seg = round_up(kept, align)
    offsets = torch.cat([seg.new_zeros(1), torch.cumsum(seg, 0)])    # [E + 1]
    keep = valid if capacity is None else valid & (rank < capacity)
    row = torch.where(keep, offsets[key] + rank, -1)
    return row.reshape(T, k), kept, offsets


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    """View as a same-width integer dtype: index ops then move raw bits (float8, NaN payloads)."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.view(bits)


def permute_ref(x: torch.Tensor, row_id_map: torch.Tensor, num_rows) -> torch.Tensor:
    """x [T, H] -> out [num_rows, H]: out[row_id_map[t, j]] = x[t]; every other row is zero."""
    T, k = row_id_map.shape
    H = x.shape[1]
    rows = row_id_map.reshape(-1)                                     # [T * k]
    dest = torch.where(rows >= 0, rows, num_rows)                     # unrouted -> a dump row
    src = _as_bits(x).repeat_interleave(k, dim=0)                     # [T * k, H], row t*k + j = x[t]
    out = _as_bits(x.new_zeros(num_rows + 1, H))
    out.index_copy_(0, dest, src)
    return out[:num_rows].view(x.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unpermute_ref(y: torch.Tensor, row_id_map: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """y [R, H] -> out [T, H]: out[t] = sum_j probs[t, j] * y[row_id_map[t, j]], fp32 accumulation.

    Slots are added in order j = 0..k-1 as ``acc = acc + w * y`` (the kernels do the same, so fp32
    results agree bit for bit); slots with row -1 contribute nothing.
    """
    T, k = row_id_map.shape
    acc_t = _acc_dtype(y.dtype)
    y_pad = torch.cat([y, y.new_zeros(1, y.shape[1])])               # row R: zeros for unrouted slots
    acc = torch.zeros(T, y.shape[1], dtype=acc_t, device=y.device)
    for j in range(k):
        r = row_id_map[:, j]
        yj = y_pad.index_select(0, torch.where(r >= 0, r, y.shape[0])).to(acc_t)
        term = yj if probs is None else probs[:, j, None].to(acc_t) * yj
        acc = torch.where(r[:, None] >= 0, acc + term, acc)
    return acc.to(y.dtype)


def unpermute_bwd_ref(grad_out: torch.Tensor, y: torch.Tensor, row_id_map: torch.Tensor, probs: torch.Tensor):
    """Gradients of unpermute with probs: (grad_y [R, H], grad_probs [T, k]).

    grad_y[row(t, j)] = probs[t, j] * grad_out[t] (other rows zero);
    grad_probs[t, j] = <grad_out[t], y[row(t, j)]> (zero where row is -1).
    """
    T, k = row_id_map.shape
    R, H = y.shape
    acc_t = _acc_dtype(y.dtype)
    rows = row_id_map.reshape(-1)
    dest = torch.where(rows >= 0, rows, R)
    g = grad_out.to(acc_t).repeat_interleave(k, dim=0)               # [T * k, H]
    scaled = (probs.reshape(-1, 1).to(acc_t) * g).to(y.dtype)
    grad_y = y.new_zeros(R + 1, H).index_copy_(0, dest, scaled)[:R]
    y_pad = torch.cat([y, y.new_zeros(1, H)])
    dots = (g * y_pad.index_select(0, dest).to(acc_t)).sum(-1)
    grad_probs = torch.where(rows >= 0, dots, 0).reshape(T, k).to(probs.dtype)
    return grad_y, grad_probs
