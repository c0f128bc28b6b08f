"""MoE building blocks on the kernels: a token dispatcher and grouped experts.

``TokenDispatcher`` moves tokens to expert-contiguous rows and back (``ck.route`` + ``ck.permute``,
then ``ck.unpermute``: gather and gate-weighted sum in one pass); ``grouped_mlp`` runs the experts
over those rows with two ``ck.grouped_gemm`` calls (expert biases, transposed weights, any
activation, or other GEMMs such as the FP8 ones). ``compass_model.MoE`` composes them with its
router, expert parallelism subclasses the dispatcher, and the transformers adapter
(``compass_kernels.integrations.transformers``) runs them on a Hugging Face experts module's weights.
Each stage opens an NVTX range (``compass_kernels.ranges``). Nothing here reads a tensor on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

import compass_kernels as ck
from compass_kernels import ranges

__all__ = ["Dispatched", "TokenDispatcher", "grouped_mlp", "row_experts", "swiglu"]


# ---------------------------------------------------------------------------------------------
# part 2: the token dispatcher


class Dispatched(NamedTuple):
    """What the experts get from a dispatcher: ``rows [M, D]`` expert-contiguous over the local
    experts, ``offsets [L + 1]`` int64, and what ``combine`` needs to bring the outputs back."""
    rows: torch.Tensor
    offsets: torch.Tensor
    plan: ck.RoutingPlan
    state: Any = None


class TokenDispatcher:
    """Local token dispatch: every expert on this process. ``dispatch`` routes ``ids [T, k]``
    (entries in [-1, E), -1 = no expert) and permutes ``x [T, D]`` to expert-contiguous rows;
    ``combine`` gathers the expert outputs back and sums them weighted by ``probs [T, k]``.
    Stateless (one per layer or shared), nothing read on the host."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local = num_experts
        self.expert_start = 0

    def permute(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, capacity: int | None = None):
        """-> (plan, permuted rows [plan.num_rows, D]), inside the "permute" range."""
        with ranges.nvtx_range("permute"):
            plan = ck.route(ids_TK, self.num_experts, capacity=capacity)
            return plan, ck.permute(x_TD, plan)

    def unpermute(self, y_RD: torch.Tensor, plan: ck.RoutingPlan, probs_TK: torch.Tensor | None) -> torch.Tensor:
        with ranges.nvtx_range("unpermute"):
            return ck.unpermute(y_RD, plan, probs=probs_TK)

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, capacity: int | None = None) -> Dispatched:
        plan, xp_RD = self.permute(x_TD, ids_TK, capacity)
        return Dispatched(xp_RD, plan.expert_offsets, plan)

    def combine(self, y_MD: torch.Tensor, d: Dispatched, probs_TK: torch.Tensor | None) -> torch.Tensor:
        return self.unpermute(y_MD, d.plan, probs_TK)


# ---------------------------------------------------------------------------------------------
# part 3: grouped experts


def row_experts(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The expert of each of ``num_rows`` expert-contiguous rows (rows past offsets[-1] get the last)."""
    E = offsets.numel() - 1
    rows = torch.arange(num_rows, device=offsets.device)
    return torch.searchsorted(offsets[1:], rows, right=True).clamp(max=E - 1)


def swiglu(h_MF2: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the fused ``[gate | up]`` rows."""
    gate_MF, up_MF = h_MF2.chunk(2, dim=-1)
    return F.silu(gate_MF) * up_MF


def grouped_mlp(x_MD: torch.Tensor, offsets: torch.Tensor, w_in, w_out, *,
                act: Callable[[torch.Tensor], torch.Tensor] = swiglu, trans_b: bool = False,
                b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None,
                gemms: tuple[Callable, Callable] | None = None) -> torch.Tensor:
    """The experts of expert-contiguous rows: ``act(x W_in[e] + b_in[e]) W_out[e] + b_out[e]`` with
    two grouped GEMMs, one NVTX range per stage. Weights ``[E, K, N]``, or ``[E, N, K]`` with
    ``trans_b``, through ck.grouped_gemm; ``gemms=(fc1, fc2)``, each ``(x, w, offsets) -> y``,
    replaces it (the FP8 experts). Rows past ``offsets[-1]`` (dropped or padding slots) are never
    read back by ``combine``."""
    if gemms is None:
        gemm = lambda x, w, off: ck.grouped_gemm(x, w, off, trans_b=trans_b)  # noqa: E731
        gemms = (gemm, gemm)
    rows_M = row_experts(offsets, x_MD.shape[0]) if b_in is not None or b_out is not None else None
    with ranges.nvtx_range("expert_fc1"):
        h = gemms[0](x_MD, w_in, offsets)
        if b_in is not None:
            h = h + b_in[rows_M]
    with ranges.nvtx_range("activation"):
        a = act(h)
    with ranges.nvtx_range("expert_fc2"):
        y = gemms[1](a, w_out, offsets)
        if b_out is not None:
            y = y + b_out[rows_M]
    return y
