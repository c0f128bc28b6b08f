"""Optimal transport: batched entropic Sinkhorn (balanced and unbalanced) and OTPO token weights.

OTPO (arXiv 2505.18720) weights each response token of a DPO pair by its mass in an unbalanced
optimal-transport plan between the chosen and the rejected response's hidden states. The official
code loops over the pairs in Python and calls POT once per pair; here one call solves the whole
batch (OpenMP over pairs on CPU, one Triton program per pair on GPU), with no host sync on GPU.

Stack (docs/design.md, op anatomy): references in ``ot_ref`` -> backend launchers here -> the ops
declared with ``_opdef.define`` (custom op and fake tensors; no autograd: the weights carry no
gradient) -> the public ``sinkhorn`` and ``otpo_weights``. Exact semantics, convergence criterion included: the ``ot_ref`` docstring.

Backends compute the same function with different algorithms: ``torch`` runs log-domain
iterations (an exp per plan entry per iteration); ``cpu`` and ``triton`` run the cheaper scaling
iterations u = (a / K v)^fi on K = exp((alpha + beta - C) / eps), computed once, and absorb a
scaling into the potentials alpha, beta (recomputing only the affected rows or columns of K, with
an exact log-sum-exp step) when it leaves [1e-10, 1e10] (fp32) or [1e-50, 1e50] (fp64) or when a
sum under- or overflows, so eps = 0.01 (or 0.001) is as safe as eps = 1. Started from the same
point, the two produce the same iterates (tests compare them after a fixed number of iterations).
"""

from __future__ import annotations

import math
import warnings

import torch

from compass_kernels import _backend, _ext
from compass_kernels._opdef import define
from compass_kernels.ot_ref import (
    COST_SCALES,
    nonfinite_pairs,
    otpo_mark_nonfinite,
    otpo_nonfinite_pairs,
    otpo_weights_from_plan,
    otpo_weights_ref,
    sinkhorn_ref,
    sinkhorn_residual,
)

__all__ = ["sinkhorn", "otpo_weights"]


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Balanced problems need sum(a) == sum(b); beyond this relative gap Sinkhorn oscillates instead of
# converging (the last half-step fixes one marginal and breaks the other), so it is an error.
_MASS_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------
# validation (names the argument and what was expected)


def _reads_ok(t: torch.Tensor) -> bool:
    """Value checks read data: eagerly on CPU tensors, on GPU only with COMPASS_CHECK=1, never
    while compiling or under another tracer."""
    return t.numel() > 0 and _ext.values_readable(t)


def _check_tensor(name: str, t, dim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {what}, got shape {tuple(t.shape)}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_scalar(name: str, v, *, allow_inf=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {v!r}")
    v = float(v)
    if not v > 0 or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be > 0{'' if allow_inf else ' and finite'}, got {v!r}")
    return v


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _check_solver_args(max_iter, tol, check_every):
    _check_int("max_iter", max_iter, 1)
    _check_int("check_every", check_every, 1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a float >= 0, got {tol!r}")
    return max_iter, float(tol), check_every


def _check_marginal(name: str, w: torch.Tensor) -> None:
    if not _reads_ok(w):
        return
    bad = (w < 0) | w.isnan() | w.isinf()
    if bool(bad.any()):
        v = w[bad][0].item()
        raise ValueError(f"{name} must hold finite non-negative masses, found {v}")


def _check_sinkhorn_args(cost, a, b, tau) -> None:
    _check_tensor("cost", cost, 3, "[B, n, m]")
    _check_tensor("a", a, 2, "[B, n]")
    _check_tensor("b", b, 2, "[B, m]")
    for name, t in (("cost", cost), ("a", a), ("b", b)):
        _check_float(name, t)
    B, n, m = cost.shape
    if tuple(a.shape) != (B, n):
        raise ValueError(f"a must have shape [B, n] = [{B}, {n}] (from cost), got {tuple(a.shape)}")
    if tuple(b.shape) != (B, m):
        raise ValueError(f"b must have shape [B, m] = [{B}, {m}] (from cost), got {tuple(b.shape)}")
    for name, t in (("a", a), ("b", b)):
        if t.device != cost.device:
            raise ValueError(f"{name} is on {t.device} but cost is on {cost.device}")
    _check_marginal("a", a)
    _check_marginal("b", b)
    if tau is None and _reads_ok(a) and _reads_ok(b):
        sa, sb = a.double().sum(-1), b.double().sum(-1)
        gap = (sa - sb).abs() > _MASS_RTOL * torch.maximum(sa, sb)
        if bool(gap.any()):
            i = int(gap.nonzero()[0, 0])
            raise ValueError(
                f"balanced sinkhorn (tau=None) needs a and b of equal mass per pair; pair {i} has "
                f"sum(a) = {sa[i].item():.6g}, sum(b) = {sb[i].item():.6g}. Normalise them or pass tau "
                f"for unbalanced OT")


def _check_otpo_args(h_chosen, h_rejected, mask_chosen, mask_rejected) -> None:
    _check_tensor("h_chosen", h_chosen, 3, "[B, L, D]")
    _check_tensor("h_rejected", h_rejected, 3, "[B, L, D]")
    _check_float("h_chosen", h_chosen)
    _check_float("h_rejected", h_rejected)
    if h_rejected.shape != h_chosen.shape:
        raise ValueError(f"h_rejected must have the shape of h_chosen {tuple(h_chosen.shape)}, "
                         f"got {tuple(h_rejected.shape)}")
    B, L, _ = h_chosen.shape
    for name, t in (("mask_chosen", mask_chosen), ("mask_rejected", mask_rejected)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (B, L):
            raise ValueError(f"{name} must have shape [B, L] = [{B}, {L}] (from h_chosen), got {tuple(t.shape)}")
        if t.dtype.is_complex:
            raise TypeError(f"{name} must be bool (or 0/1 integers), got {t.dtype}")
    for name, t in (("h_rejected", h_rejected), ("mask_chosen", mask_chosen), ("mask_rejected", mask_rejected)):
        if t.device != h_chosen.device:
            raise ValueError(f"{name} is on {t.device} but h_chosen is on {h_chosen.device}")


# ---------------------------------------------------------------------------------------------
# backend launchers: validate nothing (the public functions did), allocate, launch


def _triton():
    from compass_kernels.triton import ot as tot

    return tot


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sinkhorn_kernel(backend: str, cost, a, b, eps, tau, max_iter, tol, check_every):
    """cpu / triton: (plan [B, n, m] in fp32 or fp64, iters [B] int32)."""
    dt = _compute_dtype(cost.dtype)
    cost, a, b = cost.to(dt).contiguous(), a.to(dt).contiguous(), b.to(dt).contiguous()
    B, n, m = cost.shape
    plan = _ext.empty(B, n, m, dtype=dt, device=cost.device)
    iters = _ext.empty(B, dtype=torch.int32, device=cost.device)
    if backend == "cpu":
        _ext.kernels("cpu").sinkhorn(cost=cost, a=a, b=b, B=B, n=n, m=m, eps=eps, tau=-1.0 if tau is None else tau,
                          max_iter=max_iter, tol=tol, check_every=check_every, plan=plan, iters=iters)
    else:
        _triton().sinkhorn(cost, a, b, eps, tau, max_iter, tol, check_every, plan, iters)
    return plan, iters


def _sinkhorn_impl(cost, a, b, eps, tau, max_iter, tol, check_every):
    backend = _backend.resolve("sinkhorn", cost.device)
    if backend == "torch" or cost.numel() == 0:
        return sinkhorn_ref(cost, a, b, eps, tau, max_iter, tol, check_every)
    plan, iters = _sinkhorn_kernel(backend, cost, a, b, eps, tau, max_iter, tol, check_every)
    if backend == "triton":  # NaN in, NaN out as in the reference (the cpu kernel does it in its setup pass)
        bad = nonfinite_pairs(cost, a, b)
        plan, iters = torch.where(bad[:, None, None], float("nan"), plan), torch.where(bad, 0, iters)
    return plan.to(cost.dtype), iters


def _otpo_sq_dist(h_chosen, h_rejected, mask_chosen, mask_rejected):
    """Squared distances ``||p_i - q_j||^2`` [B, L, L] through one batched GEMM, in fp32 (fp64 for
    fp64 inputs): ||p||^2 + ||q||^2 - 2 p.q, which can come out slightly negative.

    Both sides are first centred on the mean of the pair's valid tokens: distances are unchanged
    and the cancellation error of the identity, ~6e-8 * ||p||^2, shrinks with the norms (LLM hidden
    states have norms of ~sqrt(D) that dwarf the distance between two similar tokens). Padding
    positions (which may hold anything, NaN included) are zeroed first.
    """
    dt = _compute_dtype(h_chosen.dtype)
    mc, mr = mask_chosen[:, :, None], mask_rejected[:, :, None]
    p = torch.where(mc, h_chosen.to(dt), 0.0)                         # [B, L, D]
    q = torch.where(mr, h_rejected.to(dt), 0.0)
    count = (mask_chosen.sum(1) + mask_rejected.sum(1)).clamp(min=1).to(dt)  # [B]
    mu = (p.sum(1) + q.sum(1)) / count[:, None]                      # [B, D]
    p = torch.where(mc, p - mu[:, None, :], 0.0)
    q = torch.where(mr, q - mu[:, None, :], 0.0)
    sq = torch.linalg.vector_norm(p, dim=-1).square_()[:, :, None] + \
        torch.linalg.vector_norm(q, dim=-1).square_()[:, None, :]   # [B, L, L]
    return torch.baddbmm(sq, p, q.transpose(1, 2), alpha=-2.0)


def _otpo_scale_floor(h_chosen, h_rejected, mask_chosen, mask_rejected, cost_scale: str):
    """[B]: what the masked rows add to the maximum of the official cost, 0 for ``"valid"``.

    The official cost is the cdist of the masked hidden states over the padded L x L matrix: a zero
    rejected row (any masked rejected position) puts ``||p_i|| + 1e-6`` in it for every valid
    chosen token, a zero chosen row ``||q_j|| + 1e-6``. Norms of the uncentred states, in fp32 (fp64
    for fp64 inputs); no host sync."""
    dt = _compute_dtype(h_chosen.dtype)
    B = h_chosen.shape[0]
    if cost_scale == "valid":
        return torch.zeros(B, dtype=dt, device=h_chosen.device)
    n_c = torch.where(mask_chosen, torch.linalg.vector_norm(torch.where(
        mask_chosen[:, :, None], h_chosen.to(dt), 0.0), dim=-1), 0.0)    # [B, L]
    n_r = torch.where(mask_rejected, torch.linalg.vector_norm(torch.where(
        mask_rejected[:, :, None], h_rejected.to(dt), 0.0), dim=-1), 0.0)
    from_c = torch.where((~mask_rejected).any(-1), n_c.amax(-1) + 1e-6, 0.0)
    from_r = torch.where((~mask_chosen).any(-1), n_r.amax(-1) + 1e-6, 0.0)
    return torch.maximum(from_c, from_r)


def _otpo_cost(h_chosen, h_rejected, mask_chosen, mask_rejected, cost_scale: str):
    """The OTPO cost of ``ot_ref.otpo_cost_ref`` from ``_otpo_sq_dist`` (fp32 for non-fp64 inputs)."""
    # In place: this runs inside the custom op, on buffers it owns.
    C = _otpo_sq_dist(h_chosen, h_rejected, mask_chosen, mask_rejected).clamp_min_(0.0).sqrt_().add_(1e-6)
    C.masked_fill_(~(mask_chosen[:, :, None] & mask_rejected[:, None, :]), 0.0)
    cmax = torch.maximum(C.flatten(1).amax(-1),                       # [B], valid entries are >= 1e-6
                         _otpo_scale_floor(h_chosen, h_rejected, mask_chosen, mask_rejected, cost_scale))
    return C.div_(torch.where(cmax > 1, cmax, 1.0)[:, None, None])


def _otpo_impl(h_chosen, h_rejected, mask_chosen, mask_rejected, eps, tau, max_iter, tol, check_every,
               cost_scale):
    backend = _backend.resolve("otpo_weights", h_chosen.device)
    out = torch.float64 if h_chosen.dtype == torch.float64 else torch.float32
    B, L, _ = h_chosen.shape
    if backend == "torch" or B * L == 0:
        return otpo_weights_ref(h_chosen, h_rejected, mask_chosen, mask_rejected, eps, tau, max_iter, tol,
                                check_every, cost_scale)
    if backend == "cpu":
        # One C++ call, per pair on a thread: centring, the distance GEMM fused with the cost (its own
        # AVX-512 tile: MKL's AVX2 path on AMD ran it at half speed), the solve and the weights. The
        # official scale's padded-row norms come in as a per-pair floor under the cost's maximum.
        dt = _compute_dtype(h_chosen.dtype)
        hc, hr = h_chosen.to(dt).contiguous(), h_rejected.to(dt).contiguous()
        mc, mr = mask_chosen.contiguous(), mask_rejected.contiguous()
        floor = _otpo_scale_floor(h_chosen, h_rejected, mask_chosen, mask_rejected, cost_scale).contiguous()
        w_c = _ext.empty(B, L, dtype=dt, device=hc.device)
        w_r = _ext.empty(B, L, dtype=dt, device=hc.device)
        iters = _ext.empty(B, dtype=torch.int32, device=hc.device)
        _ext.kernels("cpu").otpo_weights(h_c=hc, h_r=hr, mask_c=mc, mask_r=mr, B=B, L=L, D=hc.shape[2], eps=eps, tau=tau,
                              max_iter=max_iter, tol=tol, check_every=check_every, scale_floor=floor, w_c=w_c,
                              w_r=w_r, iters=iters)
        return w_c.to(out), w_r.to(out)
    C = _otpo_cost(h_chosen, h_rejected, mask_chosen, mask_rejected, cost_scale)
    plan, _ = _sinkhorn_kernel(backend, C, mask_chosen.to(C.dtype), mask_rejected.to(C.dtype), eps, tau,
                               max_iter, tol, check_every)
    w_c, w_r = otpo_weights_from_plan(plan, mask_chosen, mask_rejected)
    return w_c.to(out), w_r.to(out)


def _otpo_launch(h_chosen, h_rejected, mask_chosen, mask_rejected, eps, tau, max_iter, tol, check_every,
                 cost_scale="official"):
    w_c, w_r = _otpo_impl(h_chosen, h_rejected, mask_chosen, mask_rejected, eps, tau, max_iter, tol, check_every,
                          cost_scale)
    if _backend.resolve("otpo_weights", h_chosen.device) != "triton":  # torch and cpu do it themselves
        return w_c, w_r
    bad = otpo_nonfinite_pairs(h_chosen, h_rejected, mask_chosen, mask_rejected)  # NaN in, NaN out
    return otpo_mark_nonfinite(w_c, w_r, bad, mask_chosen, mask_rejected)


# ---------------------------------------------------------------------------------------------
# the op declarations (compass_kernels._opdef; no autograd: both ops are solvers without a gradient)


@define("sinkhorn", impl=_sinkhorn_impl, backends=("torch", "cpu", "triton"))
def _sinkhorn_op(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, tau: float | None,
                 max_iter: int, tol: float, check_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cost.new_empty(cost.shape), cost.new_empty(cost.shape[0], dtype=torch.int32)


@define("otpo_weights", impl=_otpo_launch, backends=("torch", "cpu", "triton"))
def _otpo_op(h_chosen: torch.Tensor, h_rejected: torch.Tensor, mask_chosen: torch.Tensor,
             mask_rejected: torch.Tensor, eps: float, tau: float, max_iter: int, tol: float,
             check_every: int, cost_scale: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.float64 if h_chosen.dtype == torch.float64 else torch.float32
    shape = mask_chosen.shape
    return h_chosen.new_empty(shape, dtype=out), h_chosen.new_empty(shape, dtype=out)


# ---------------------------------------------------------------------------------------------
# public API


def sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, eps: float, tau: float | None = None,
             max_iter: int = 1000, tol: float = 1e-6, check_every: int = 10, return_iters: bool = False):
    """Batched entropic optimal transport: ``cost [B, n, m]``, ``a [B, n]``, ``b [B, m]`` -> ``plan [B, n, m]``.

    ``tau=None``: balanced, ``min <P, C> + eps * sum P (log P - 1)`` subject to ``P 1 = a``,
    ``P^T 1 = b`` (a and b of equal mass per pair; POT's ``ot.sinkhorn(a, b, C, eps)``).
    ``tau > 0``: unbalanced, the marginal constraints replaced by ``tau * KL(P 1 || a) + tau *
    KL(P^T 1 || b)`` (POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, eps, tau,
    reg_type="entropy")``). Zero-mass entries of a or b give zero rows / columns; stable for small
    eps (0.01). Stops a pair when the largest relative change of its scalings over one iteration,
    checked every ``check_every`` iterations, is below ``tol``, or after ``max_iter`` iterations.

    The plan has cost's dtype. Precision: torch computes in float64; cpu keeps K in the input's
    precision (fp32 for half inputs) and potentials, scalings and sums in float64; triton computes
    in the input's precision (fp32 for half inputs). Not differentiable: inputs are detached.

    ``return_iters=True`` also returns ``iters [B] int32``, the iterations each pair ran: ``max_iter``
    means the pair stopped on the limit, not on ``tol``. Then, if the plan's residual (the change one
    more iteration would make, ``ot_ref.sinkhorn_residual``) is still >= tol, one RuntimeWarning
    per call names the pair count and the worst residual, like POT (none with tol = 0: a fixed
    iteration count) (CPU tensors; on GPU only with
    COMPASS_CHECK=1, as reading iters synchronises). NaN stays visible: a pair with a NaN or -inf
    cost between entries with mass, or with invalid masses that could not be checked (GPU, tracing),
    gets an all-NaN plan and iters 0 on every backend.
    """
    eps = _check_scalar("eps", eps)
    tau = None if tau is None else _check_scalar("tau", tau, allow_inf=True)
    if tau is not None and math.isinf(tau):
        tau = None
    max_iter, tol, check_every = _check_solver_args(max_iter, tol, check_every)
    _check_sinkhorn_args(cost, a, b, tau)
    plan, iters = _sinkhorn_op(cost.detach(), a.detach(), b.detach(), eps, tau, max_iter, tol, check_every)
    _warn_unconverged(plan, iters, cost, a, b, eps, tau, max_iter, tol)
    return (plan, iters) if return_iters else plan


def _warn_unconverged(plan, iters, cost, a, b, eps, tau, max_iter, tol) -> None:
    """One RuntimeWarning per call when a pair ran all max_iter iterations and its plan is still
    ``tol`` or more from convergence (``ot_ref.sinkhorn_residual``). Reads iters: CPU tensors
    eagerly, GPU only with COMPASS_CHECK=1 (a sync), never under a tracer."""
    if tol == 0 or not _reads_ok(iters):  # tol = 0 asks for exactly max_iter iterations
        return
    out = iters >= max_iter
    if not bool(out.any()):
        return
    res = sinkhorn_residual(plan[out], cost[out].detach(), a[out].detach(), b[out].detach(), eps, tau)
    late = res >= tol
    if not bool(late.any()):
        return
    worst = int(torch.where(late, res, -1.0).argmax())
    pair = int(out.nonzero()[worst].item())
    rows = plan[out][worst].double().sum(-1)
    aw = a[out][worst].double()
    msg = (f"sinkhorn did not converge: {int(late.sum())} of {iters.numel()} pairs still had a residual >= tol = "
           f"{tol:g} after max_iter = {max_iter} iterations (worst: pair {pair}, residual {res[worst].item():.3g}")
    if tau is None:
        pos = aw > 0
        gap = ((rows[pos] - aw[pos]).abs() / aw[pos]).max().item() if bool(pos.any()) else 0.0
        msg += f", row marginals off by up to {100 * gap:.3g}%"
    warnings.warn(msg + "). Raise max_iter or eps, or scale the cost down; return_iters=True shows the "
                  "iterations each pair ran.", RuntimeWarning, stacklevel=3)


def otpo_weights(h_chosen: torch.Tensor, h_rejected: torch.Tensor, mask_chosen: torch.Tensor,
                 mask_rejected: torch.Tensor, *, eps: float = 1.0, tau: float = 0.2, max_iter: int = 1000,
                 tol: float = 1e-6, check_every: int = 10, cost_scale: str = "official"):
    """OTPO per-token weights (arXiv 2505.18720): ``(w_chosen [B, L], w_rejected [B, L])``, no gradient.

    ``h_* [B, L, D]``: the policy's last hidden states (after the final norm) at the positions that
    predict each response token; ``mask_* [B, L]``: True (or 1) on response tokens.
    Cost ``C_ij = ||p_i - q_j||_2 + 1e-6`` over valid pairs, divided by a maximum when that exceeds
    1. ``cost_scale="official"`` (default, the OTPO authors' code): the maximum of the cdist of the
    *masked* states over the padded L x L matrix, which includes ``||p_i||`` and ``||q_j||`` when the
    other side has masked (prompt or padding) positions; ``"valid"``: the maximum over valid pairs
    only (padding-invariant; sharper weights on states with a common direction). Marginals 1 on
    valid tokens; plan ``P`` by unbalanced Sinkhorn (eps, tau; see ``sinkhorn``);
    ``w_chosen_i = n * sum_j P_ij / S``, ``w_rejected_j = n * sum_i P_ij / S`` with
    ``n = min(n_chosen, n_rejected)`` and ``S = sum P``, so each side sums to n.
    Zero on masked tokens; all zero for a pair with an empty side. The content of masked positions
    never changes the result (with ``"valid"``, neither does the padding length). float32 weights
    (float64 for float64 inputs). On isotropic states eps = 1 gives near-uniform weights (about
    0.95-1.06) and eps = 0.1 spreads them (about 0.1-1.2); the official scale flattens both when the
    states' norms dwarf their distances.
    """
    eps = _check_scalar("eps", eps)
    tau = _check_scalar("tau", tau)
    max_iter, tol, check_every = _check_solver_args(max_iter, tol, check_every)
    if cost_scale not in COST_SCALES:
        raise ValueError(f"cost_scale must be one of {COST_SCALES}, got {cost_scale!r}")
    _check_otpo_args(h_chosen, h_rejected, mask_chosen, mask_rejected)
    mask_chosen = mask_chosen if mask_chosen.dtype == torch.bool else mask_chosen != 0
    mask_rejected = mask_rejected if mask_rejected.dtype == torch.bool else mask_rejected != 0
    return _otpo_op(h_chosen.detach(), h_rejected.detach(), mask_chosen, mask_rejected, eps, tau, max_iter, tol,
                    check_every, cost_scale)
