"""Readable PyTorch references for the optimal-transport ops: the oracle of every test and benchmark.

They run on any device with no host synchronisation on accelerators, compute in float64 whatever
the input dtype (the log-domain potentials of a small-eps problem need it: a float32 potential of
size ~1 carries an error of ~6e-8 / eps in the log-scalings), and also serve as the ``torch``
backend.

Problem (POT's ``ot.sinkhorn`` for ``tau=None``; ``ot.unbalanced.sinkhorn_unbalanced(...,
reg_type="entropy")`` otherwise), for each pair of the batch::

    min_P <P, C> + eps * sum P (log P - 1) [+ tau * KL(P 1 || a) + tau * KL(P^T 1 || b)]
    (balanced: subject to P 1 = a, P^T 1 = b)

solved by Sinkhorn iterations on the potentials f = eps log u, g = eps log v, ``fi = tau / (tau +
eps)`` (1 when balanced)::

    f_i <- fi * (eps log a_i - eps LSE_j((g_j - C_ij) / eps))       (u first, as POT's unbalanced)
    g_j <- fi * (eps log b_j - eps LSE_i((f_i - C_ij) / eps))
    P_ij = exp((f_i + g_j - C_ij) / eps)

Starting point u = v = 1 (f = g = 0) on the positive-mass entries (POT also starts zero-mass
entries at 1, which changes the first iterate, not the solution). Zero-mass entries have potential
-inf, so their rows and columns of the plan are exactly zero; a pair with no mass on one side gets a
zero plan.

Convergence, the same in every backend: every ``check_every`` iterations (iteration numbers that
are multiples of it, counting from 1) a pair computes ``err = max(|df| / eps, |dg| / eps)`` over
its positive-mass entries, the largest relative change of the scalings u, v over that iteration
(for a balanced problem it is also the relative violation of the row marginals), and stops when
``err < tol``. POT's unbalanced criterion divides |du| by max(|u|, 1), which is never larger, so
this one is at least as strict. ``iters[b]`` counts the iterations pair b ran; a converged pair's
potentials are frozen while the others continue.

Invalid numbers stay visible: a pair whose cost is NaN or -inf where both marginals have mass, or
whose a or b holds a NaN, infinite or negative mass, gets an all-NaN plan and ``iters = 0`` (the
public ``sinkhorn`` raises on bad masses first where it can read them). +inf costs are allowed:
they forbid transport. ``sinkhorn_residual`` measures how far a returned plan is from convergence.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def _fi(eps: float, tau: float | None) -> float:
    return 1.0 if tau is None or tau == float("inf") else tau / (tau + eps)


def _half_step(log_w: torch.Tensor, other: torch.Tensor, C: torch.Tensor, eps: float, fi: float):
    """One potential update. log_w [B, k], other [B, l], C [B, k, l] -> [B, k].

    Entries with no mass, or with no finite transport to the other side, get -inf (zero rows)."""
    lse = torch.logsumexp((other[:, None, :] - C) / eps, dim=-1)  # [B, k]
    new = fi * eps * (log_w - lse)
    return torch.where((log_w > _NEG_INF) & (lse > _NEG_INF), new, _NEG_INF)


def _change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """max |new - old| per pair, with -inf == -inf counting as no change. [B, k] -> [B]."""
    d = torch.where(new == old, 0.0, (new - old).abs())
    return d.amax(-1)


def nonfinite_pairs(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] bool: pairs whose plan is NaN (see the module docstring). Elementwise, no host sync."""
    live = (a > 0)[:, :, None] & (b > 0)[:, None, :]
    bad_cost = ((cost.isnan() | (cost == _NEG_INF)) & live).flatten(1).any(-1)
    bad_mass = ((a < 0) | ~a.isfinite()).any(-1) | ((b < 0) | ~b.isfinite()).any(-1)
    return bad_cost | bad_mass


def sinkhorn_residual(plan: torch.Tensor, cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
                      tau: float | None) -> torch.Tensor:
    """[B] float64: the convergence measure (max |df|, |dg| / eps) that one more iteration would
    show, from a plan whose last half-step updated g (every backend ends that way).

    The plan gives the potentials' effect: P 1 = exp(f / eps) * sum_j exp((g_j - C_ij) / eps) and,
    when unbalanced, g / eps = fi / (1 - fi) * log(b / P^T 1). The next f / eps is fi * (log a - L)
    with L = LSE_j((g_j - C_ij) / eps), so the change is |fi log a + (1 - fi) L - log P 1|; balanced
    (fi = 1) that is |log(a / P 1)|, the relative violation of the row marginals. Rows with mass but
    no finite cost to a column with mass are exactly zero at the fixed point and are skipped; a row or
    column whose plan entries all underflowed to zero gives an infinite residual.
    """
    fi = _fi(eps, tau)
    P, C = plan.to(torch.float64), cost.to(torch.float64)
    a, b = a.to(torch.float64), b.to(torch.float64)
    rows = P.sum(-1)                                                  # [B, n]
    reach = ((C < float("inf")) & (b > 0)[:, None, :]).any(-1) & (a > 0)
    if fi < 1:
        g = fi / (1 - fi) * (b.log() - P.sum(-2).log())               # g / eps, [B, m]
        g = torch.where(b > 0, g, _NEG_INF)
        lse = torch.logsumexp(g[:, None, :] - C / eps, dim=-1)        # [B, n]
        d = fi * a.log() + (1 - fi) * lse - rows.log()
    else:
        d = a.log() - rows.log()
    d = torch.where(reach, d.abs().nan_to_num(nan=float("inf"), posinf=float("inf")), 0.0)
    return d.amax(-1) if d.shape[-1] else d.new_zeros(d.shape[0])


def sinkhorn_ref(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, tau: float | None = None,
                 max_iter: int = 1000, tol: float = 1e-6, check_every: int = 10):
    """cost [B, n, m], a [B, n], b [B, m] -> (plan [B, n, m] in cost's dtype, iters [B] int32).

    Log-domain batched Sinkhorn in float64 (see the module docstring for the exact iteration).
    Early exit: on CPU tensors the all-converged flag is read on the host every ``check_every``
    iterations (a free read: there is no device). On accelerators the loop runs all ``max_iter``
    iterations with converged pairs frozen, so nothing waits on the host (CUDA-graph safe) and the
    result is identical; the ``triton`` backend is the fast path there, exiting inside the kernel.
    """
    B, n, m = cost.shape
    iters = torch.zeros(B, dtype=torch.int32, device=cost.device)
    if B == 0 or n == 0 or m == 0:
        return cost.new_zeros(B, n, m), iters
    live = (a > 0)[:, :, None] & (b > 0)[:, None, :]
    C = torch.where(live, cost.to(torch.float64), 0.0)                # costs of zero-mass entries: never read
    log_a = a.to(torch.float64).log()                                 # [B, n], -inf on zero mass
    log_b = b.to(torch.float64).log()                                 # [B, m]
    fi = _fi(eps, tau)
    Ct = C.transpose(1, 2)
    f = torch.where(log_a > _NEG_INF, 0.0, _NEG_INF)                  # [B, n]
    g = torch.where(log_b > _NEG_INF, 0.0, _NEG_INF)                  # [B, m]
    bad = nonfinite_pairs(cost, a, b)                                 # [B] NaN plans, not solved
    done = ~((a > 0).any(-1) & (b > 0).any(-1)) | bad                 # [B] empty sides: zero plan
    host_exit = cost.device.type == "cpu"
    for it in range(1, max_iter + 1):
        f_new = _half_step(log_a, g, C, eps, fi)
        g_new = _half_step(log_b, f_new, Ct, eps, fi)
        if it % check_every == 0:
            err = torch.maximum(_change(f_new, f), _change(g_new, g)) / eps
        live = ~done
        iters += live.to(torch.int32)
        f = torch.where(live[:, None], f_new, f)
        g = torch.where(live[:, None], g_new, g)
        if it % check_every == 0:
            done = done | (err < tol)
            if host_exit and bool(done.all()):
                break
    # Rows / columns without mass have potential -inf; empty-side pairs are zeroed explicitly.
    plan = torch.exp((f[:, :, None] + g[:, None, :] - C) / eps)
    has_mass = ((a > 0).any(-1) & (b > 0).any(-1))[:, None, None]
    plan = torch.where(has_mass, plan, 0.0)
    plan = torch.where(bad[:, None, None], float("nan"), plan)
    return plan.to(cost.dtype), iters


# ---------------------------------------------------------------------------------------------
# OTPO token weights (arXiv 2505.18720; docs/algorithms.md, "OTPO")


COST_SCALES = ("official", "valid")


def otpo_cost_ref(h_chosen: torch.Tensor, h_rejected: torch.Tensor, mask_chosen: torch.Tensor,
                  mask_rejected: torch.Tensor, cost_scale: str = "official") -> torch.Tensor:
    """[B, L, D] x2, bool masks [B, L] x2 -> cost [B, L, L] float64.

    ``C_ij = ||p_i - q_j||_2 + 1e-6`` (direct differences, no cancellation), divided by a maximum
    when that maximum exceeds 1, and 0 on pairs with a masked side (their plan entries are zero
    whatever the cost). Which maximum (``cost_scale``):

    ``"official"`` (the OTPO authors' code): the hidden states are masked first (prompt and padding
    rows become zero vectors) and the maximum runs over the whole padded L x L matrix, so it also
    sees ``||p_i|| + 1e-6`` (against a zero rejected row) and ``||q_j|| + 1e-6`` (against a zero
    chosen row) whenever the other side has a masked position. LLM hidden states share a large
    common direction, so these norms usually exceed every valid distance and the cost is flatter.

    ``"valid"``: the maximum over the valid pairs only; the padding length then cannot change
    anything, and on states with a common direction the weights are sharper.
    """
    if cost_scale not in COST_SCALES:
        raise ValueError(f"cost_scale must be one of {COST_SCALES}, got {cost_scale!r}")
    p = torch.where(mask_chosen[:, :, None], h_chosen.to(torch.float64), 0.0)
    q = torch.where(mask_rejected[:, :, None], h_rejected.to(torch.float64), 0.0)
    C = torch.cdist(p, q, compute_mode="donot_use_mm_for_euclid_dist") + 1e-6
    valid = mask_chosen[:, :, None] & mask_rejected[:, None, :]       # [B, L, L]
    if cost_scale == "official":
        cmax = C.flatten(1).amax(-1)                                  # [B], padded rows included
    else:
        cmax = torch.where(valid, C, 0.0).flatten(1).amax(-1)
    scale = torch.where(cmax > 1, cmax, 1.0)
    return torch.where(valid, C / scale[:, None, None], 0.0)


def otpo_nonfinite_pairs(h_chosen: torch.Tensor, h_rejected: torch.Tensor, mask_chosen: torch.Tensor,
                         mask_rejected: torch.Tensor) -> torch.Tensor:
    """[B] bool: pairs with a NaN or infinite hidden state on a valid token. Their weights are NaN on
    valid tokens (0 on masked ones, whose content never matters). Elementwise, no host sync."""
    bad_c = (~h_chosen.isfinite()).any(-1) & mask_chosen
    bad_r = (~h_rejected.isfinite()).any(-1) & mask_rejected
    return bad_c.any(-1) | bad_r.any(-1)


def otpo_mark_nonfinite(w_c: torch.Tensor, w_r: torch.Tensor, bad: torch.Tensor, mask_chosen: torch.Tensor,
                        mask_rejected: torch.Tensor):
    """The ``bad`` pairs' ([B] bool) weights: NaN on valid tokens, 0 on masked ones; the rest unchanged."""
    nan, bad = float("nan"), bad[:, None]
    return (torch.where(bad, torch.where(mask_chosen, nan, 0.0), w_c),
            torch.where(bad, torch.where(mask_rejected, nan, 0.0), w_r))


def otpo_weights_from_plan(plan: torch.Tensor, mask_chosen: torch.Tensor, mask_rejected: torch.Tensor):
    """plan [B, L, L] -> (w_chosen [B, L], w_rejected [B, L]), float64 (sums accumulated in it).

    ``w = min(n_chosen, n_rejected) * marginal / total mass``; zero for a pair whose plan is zero
    (an empty side). Masked tokens have zero marginals, hence zero weights.
    """
    n_tok = torch.minimum(mask_chosen.sum(-1), mask_rejected.sum(-1)).to(torch.float64)  # [B]
    row = plan.sum(-1, dtype=torch.float64)                           # [B, L]
    col = plan.sum(-2, dtype=torch.float64)                           # [B, L]
    total = row.sum(-1)                                               # [B]
    scale = torch.where(total > 0, n_tok / torch.where(total > 0, total, 1.0), 0.0)
    return row * scale[:, None], col * scale[:, None]


def otpo_weights_ref(h_chosen: torch.Tensor, h_rejected: torch.Tensor, mask_chosen: torch.Tensor,
                     mask_rejected: torch.Tensor, eps: float = 1.0, tau: float = 0.2, max_iter: int = 1000,
                     tol: float = 1e-6, check_every: int = 10, cost_scale: str = "official"):
    """OTPO per-token weights, float64 throughout; returns float32 weights (float64 for float64 inputs).

    Marginals are 1 on valid tokens and 0 elsewhere (not normalised); the plan is the unbalanced
    Sinkhorn plan of ``otpo_cost_ref`` (``cost_scale``: see there).
    """
    mask_chosen, mask_rejected = mask_chosen.bool(), mask_rejected.bool()
    C = otpo_cost_ref(h_chosen, h_rejected, mask_chosen, mask_rejected, cost_scale)
    plan, _ = sinkhorn_ref(C, mask_chosen.to(torch.float64), mask_rejected.to(torch.float64), eps, tau,
                           max_iter, tol, check_every)
    w_c, w_r = otpo_weights_from_plan(plan, mask_chosen, mask_rejected)
    bad = otpo_nonfinite_pairs(h_chosen, h_rejected, mask_chosen, mask_rejected)
    w_c, w_r = otpo_mark_nonfinite(w_c, w_r, bad, mask_chosen, mask_rejected)
    out = torch.float64 if h_chosen.dtype == torch.float64 else torch.float32
    return w_c.to(out), w_r.to(out)
