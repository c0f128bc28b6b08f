"""Readable reference for the grouped GEMM: a loop over experts (the oracle of every test).

Rows ``offsets[e]:offsets[e+1]`` of x use ``w[e]``; rows outside ``[offsets[0], offsets[-1])`` are
zero in the output. The loop reads the offsets on the host, so on a GPU it synchronises: it is the
reference, not the fast path.
"""

from __future__ import annotations

import torch


def grouped_gemm_ref(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """x [M, K], w [E, K, N] (or [E, N, K] with trans_b) -> y [M, N], accumulated in fp32 (fp64 for fp64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    N = w.shape[1] if trans_b else w.shape[2]
    y = torch.zeros(x.shape[0], N, dtype=acc, device=x.device)
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        if t > s:
            we = w[e].to(acc)
            y[s:t] = x[s:t].to(acc) @ (we.t() if trans_b else we)
    return y.to(x.dtype)


def grouped_gemm_wgrad_ref(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, num_groups: int,
                           trans_b: bool = False) -> torch.Tensor:
    """The K-grouped GEMM of the weight gradient: dw[e] = x_e^T dy_e ([E, K, N]), or dy_e^T x_e with trans_b.

    Empty groups get exact zeros.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    K, N = x.shape[1], dy.shape[1]
    dw = torch.zeros(num_groups, *((N, K) if trans_b else (K, N)), dtype=acc, device=x.device)
    bounds = offsets.tolist()
    for e in range(num_groups):
        s, t = bounds[e], bounds[e + 1]
        if t > s:
            xe, ge = x[s:t].to(acc), dy[s:t].to(acc)
            dw[e] = ge.t() @ xe if trans_b else xe.t() @ ge
    return dw.to(x.dtype)
