"""Inputs for benchmarks and tests: routing ids and group sizes with named patterns.

Routing patterns (``topk_ids(..., kind)``):

* ``uniform``: every token picks ``k`` distinct experts uniformly at random (like a top-k);
* ``skewed``: distinct experts drawn with Zipf weights ``1 / (e + 1)^1.5``, so a few experts are
  hot and the tail is nearly idle;
* ``one``: every slot on expert 0 (one full segment, all others empty; duplicates per token);
* ``holes``: uniform with a fraction ``drop`` of the slots ``-1`` (dropped / unrouted slots);
* ``empty``: uniform over the first ``E // 2`` experts only, so the upper half stays empty.

When ``k`` exceeds the experts available (``E``, or ``E // 2`` for ``empty``) the experts of a
token repeat. Group sizes (``group_sizes``) follow the same ``uniform`` / ``skewed`` patterns for
the grouped GEMM and sort_chunks, whose inputs are groups rather than ids.
"""

from __future__ import annotations

import torch

__all__ = ["ROUTING_KINDS", "ZIPF_EXPONENT", "group_sizes", "offsets_of", "topk_ids", "zipf_weights"]

ZIPF_EXPONENT = 1.5
ROUTING_KINDS = ("uniform", "skewed", "one", "holes", "empty")


def zipf_weights(n: int, device=None) -> torch.Tensor:
    """``[n]`` float64 weights ``1 / (i + 1)^1.5`` (not normalised)."""
    return 1.0 / torch.arange(1, n + 1, dtype=torch.float64, device=device) ** ZIPF_EXPONENT


def topk_ids(tokens: int, top_k: int, num_experts: int, kind: str = "uniform", dtype: torch.dtype = torch.int64,
             generator: torch.Generator | None = None, device=None, drop: float = 0.25) -> torch.Tensor:
    """``[tokens, top_k]`` expert ids in ``[0, num_experts)`` (``-1`` for dropped slots) following
    the pattern ``kind`` (see the module doc). ``generator``: a ``torch.Generator`` on ``device``
    for reproducible ids; ``drop``: the fraction of ``-1`` slots of ``holes``."""
    if kind not in ROUTING_KINDS:
        raise ValueError(f"kind must be one of {ROUTING_KINDS}, got {kind!r}")
    if tokens < 0 or top_k < 0 or num_experts < 1:
        raise ValueError(f"need tokens >= 0, top_k >= 0 and num_experts >= 1, got tokens={tokens}, "
                         f"top_k={top_k}, num_experts={num_experts}")
    if not 0.0 <= drop <= 1.0:
        raise ValueError(f"drop must be in [0, 1], got {drop}")
    T, k, E = tokens, top_k, num_experts
    if T == 0:
        return torch.empty(0, k, dtype=dtype, device=device)
    if kind == "one":
        return torch.zeros(T, k, dtype=dtype, device=device)
    if kind == "skewed":
        w = zipf_weights(E, device=device).expand(T, E)
        return torch.multinomial(w, k, replacement=k > E, generator=generator).to(dtype)
    pool = max(1, E // 2) if kind == "empty" else E
    if k <= pool:
        ids = torch.rand(T, pool, generator=generator, device=device).argsort(dim=1)[:, :k]
    else:
        ids = torch.randint(0, pool, (T, k), generator=generator, device=device)
    if kind == "holes":
        ids = torch.where(torch.rand(T, k, generator=generator, device=device) < drop, -1, ids)
    return ids.to(dtype)


def group_sizes(rows: int, groups: int, kind: str = "uniform") -> torch.Tensor:
    """``[groups]`` int64 sizes summing to ``rows``: ``uniform`` (equal, the remainder in group 0)
    or ``skewed`` (Zipf 1.5 shares rounded down, the remainder in group 0)."""
    if rows < 0 or groups < 1:
        raise ValueError(f"need rows >= 0 and groups >= 1, got rows={rows}, groups={groups}")
    if kind == "uniform":
        sizes = torch.full((groups,), rows // groups, dtype=torch.int64)
    elif kind == "skewed":
        w = zipf_weights(groups)
        sizes = (w / w.sum() * rows).floor().long()
    else:
        raise ValueError(f"kind must be 'uniform' or 'skewed', got {kind!r}")
    sizes[0] += rows - sizes.sum()
    return sizes


def offsets_of(sizes: torch.Tensor, device=None) -> torch.Tensor:
    """``[G + 1]`` int64 group offsets ``[0, s0, s0 + s1, ...]`` of the sizes, on ``device``."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cpu().long().cumsum(0)]).to(device or "cpu")
