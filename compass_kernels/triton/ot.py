"""Triton batched Sinkhorn: one program per pair, the whole solve in one launch.

Semantics (iteration, convergence criterion, zero-mass entries) are those of
``compass_kernels.ot_ref``; the algorithm is the cpu backend's (csrc/cpu/ot.cpp): scaling
iterations on K = exp((alpha + beta - C) / eps) with absorbed potentials alpha, beta, and an exact
log-sum-exp update (absorbed, that row block's / column block's K recomputed) for any scaling that
leaves the band [lo, hi] or whose sum under- or overflows.

Where K lives: a 192-token pair pads to a 256 x 256 tile, 256 KB in fp32, which is the whole
register file of an SM before C and the temporaries of the log-sum-exp step; so K is written into
the plan buffer (it becomes the plan at the end) and streamed in [BR, BC] blocks, two passes per
iteration. For OTPO-sized pairs (147 KB at 192 x 192 fp32) those passes hit L1/L2, not HBM.

Convergence runs on the device: every ``check_every`` iterations a program compares its
log-scalings with those one iteration earlier and leaves its loop when the change is below tol, so
a launch never waits on the host and converged pairs free their SM. Scalars (eps, fi = tau / (tau +
eps), band, tol) come in a small device tensor, because Python floats reach a Triton kernel as
fp32 and the fp64 path needs eps exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compass_kernels.triton.launch import launch

_TILE = {torch.float32: 4096, torch.float64: 1024}   # elements of one K block (BR x BC); fp64 at 2048 spilled
_MAX_BC = 256
# Band for the scalings before absorption. fp32: K entries below ~1e-38 flush, and u * v <= 1e20
# keeps the mass lost that way under 1e-18; fp64: as the cpu backend.
_BAND = {torch.float32: (1e-10, 1e10), torch.float64: (1e-50, 1e50)}


@triton.jit
def _change(new, old):
    """|new - old| with -inf == -inf counting as no change."""
    return tl.where(new == old, 0.0, tl.abs(new - old))


@triton.jit
def _init_rows(C_ptr, K_ptr, a_ptr, u_ptr, al_ptr, be_ptr, n, m, inv_eps, cexp, r0,
               BR: tl.constexpr, BC: tl.constexpr):
    """alpha = min over live columns of C (0 if none finite), u = 1 on live rows, K rows."""
    rows = r0 + tl.arange(0, BR)
    rmask = rows < n
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    live_r = a > 0
    lo = tl.full([BR], float("inf"), a.dtype)
    for c0 in range(0, m, BC):
        cols = c0 + tl.arange(0, BC)
        beta = tl.load(be_ptr + cols, mask=cols < m, other=float("-inf"))
        msk = rmask[:, None] & (cols[None, :] < m) & (beta[None, :] > float("-inf"))
        C = tl.load(C_ptr + rows[:, None] * m + cols[None, :], mask=msk, other=float("inf")).to(a.dtype)
        lo = tl.minimum(lo, tl.min(C, axis=1))
    alpha = tl.where(live_r, tl.where(lo < float("inf"), lo, 0.0), float("-inf"))
    tl.store(al_ptr + rows, alpha, mask=rmask)
    tl.store(u_ptr + rows, tl.where(live_r, 1.0, 0.0).to(a.dtype), mask=rmask)
    _write_k_rows(C_ptr, K_ptr, be_ptr, alpha, rows, rmask, m, inv_eps, BC)


@triton.jit
def _write_k_rows(C_ptr, K_ptr, be_ptr, alpha, rows, wmask, m, inv_eps, BC: tl.constexpr):
    """K[rows, :] = exp((alpha + beta - C) / eps) for the rows in wmask (0 on dead entries)."""
    for c0 in range(0, m, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < m
        beta = tl.load(be_ptr + cols, mask=cm, other=float("-inf"))
        msk = wmask[:, None] & cm[None, :]
        C = tl.load(C_ptr + rows[:, None] * m + cols[None, :], mask=msk, other=0.0).to(alpha.dtype)
        x = (alpha[:, None] + beta[None, :] - C) * inv_eps
        live = (alpha[:, None] > float("-inf")) & (beta[None, :] > float("-inf"))
        K = tl.where(live, tl.exp(x), 0.0)
        tl.store(K_ptr + rows[:, None] * m + cols[None, :], K, mask=msk)


@triton.jit
def _write_k_cols(C_ptr, K_ptr, al_ptr, beta, cols, wmask, n, m, inv_eps, BR: tl.constexpr):
    """K[:, cols] = exp((alpha + beta - C) / eps) for the columns in wmask."""
    for r0 in range(0, n, BR):
        rows = r0 + tl.arange(0, BR)
        rm = rows < n
        alpha = tl.load(al_ptr + rows, mask=rm, other=float("-inf"))
        msk = rm[:, None] & wmask[None, :]
        C = tl.load(C_ptr + rows[:, None] * m + cols[None, :], mask=msk, other=0.0).to(beta.dtype)
        x = (alpha[:, None] + beta[None, :] - C) * inv_eps
        live = (alpha[:, None] > float("-inf")) & (beta[None, :] > float("-inf"))
        K = tl.where(live, tl.exp(x), 0.0)
        tl.store(K_ptr + rows[:, None] * m + cols[None, :], K, mask=msk)


@triton.jit
def _scalings(w, s, lc, fi, lo, hi, BALANCED: tl.constexpr):
    """New scalings (w / s)^fi exp(lc) and the mask of live entries that left the band."""
    live = w > 0
    ok_s = (s > 0) & (s < float("inf"))  # tiny / huge sums push x out of the band instead
    s_safe = tl.where(ok_s, s, 1.0)
    w_safe = tl.where(live, w, 1.0)
    if BALANCED:
        x = w_safe / s_safe
    else:
        x = tl.exp(fi * (tl.log(w_safe) - tl.log(s_safe)) + lc)
    bad = live & ~(ok_s & (x >= lo) & (x <= hi))
    return x, bad


@triton.jit
def _update_rows(C_ptr, K_ptr, a_ptr, u_ptr, al_ptr, v_ptr, be_ptr, n, m, eps, inv_eps, fi, cexp, lo, hi,
                 BALANCED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    for r0 in range(0, n, BR):
        rows = r0 + tl.arange(0, BR)
        rm = rows < n
        a = tl.load(a_ptr + rows, mask=rm, other=0.0)
        alpha = tl.load(al_ptr + rows, mask=rm, other=float("-inf"))
        s = tl.zeros([BR], a.dtype)
        for c0 in range(0, m, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < m
            v = tl.load(v_ptr + cols, mask=cm, other=0.0)
            K = tl.load(K_ptr + rows[:, None] * m + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
            s += tl.sum(K * v[None, :], axis=1)
        u, bad = _scalings(a, s, alpha * cexp, fi, lo, hi, BALANCED)
        u = tl.where(a > 0, u, 0.0)
        if tl.sum(bad.to(tl.int32)) > 0:
            # exact update of the bad rows: f = fi * eps * (log a - LSE_j((g_j - C_ij) / eps)), online LSE
            mx = tl.full([BR], float("-inf"), a.dtype)
            acc = tl.zeros([BR], a.dtype)
            for c0 in range(0, m, BC):
                cols = c0 + tl.arange(0, BC)
                cm = cols < m
                v = tl.load(v_ptr + cols, mask=cm, other=0.0)
                beta = tl.load(be_ptr + cols, mask=cm, other=float("-inf"))
                g = tl.where(v > 0, beta + eps * tl.log(tl.where(v > 0, v, 1.0)), float("-inf"))
                msk = bad[:, None] & cm[None, :]
                C = tl.load(C_ptr + rows[:, None] * m + cols[None, :], mask=msk, other=0.0).to(a.dtype)
                z = tl.where(msk & (g[None, :] > float("-inf")), (g[None, :] - C) * inv_eps, float("-inf"))
                new_mx = tl.maximum(mx, tl.max(z, axis=1))
                safe = tl.where(new_mx > float("-inf"), new_mx, 0.0)
                acc = acc * tl.exp(mx - safe) + tl.sum(tl.exp(z - safe[:, None]), axis=1)
                mx = new_mx
            reach = mx > float("-inf")
            lse = tl.where(reach, mx, 0.0) + tl.log(tl.where(reach, acc, 1.0))
            f = fi * eps * (tl.log(tl.where(bad, a, 1.0)) - lse)
            alpha = tl.where(bad, tl.where(reach, f, float("-inf")), alpha)
            u = tl.where(bad, tl.where(reach, 1.0, 0.0), u)
            tl.store(al_ptr + rows, alpha, mask=rm)
            _write_k_rows(C_ptr, K_ptr, be_ptr, alpha, rows, rm & bad, m, inv_eps, BC)
        tl.store(u_ptr + rows, u, mask=rm)


@triton.jit
def _update_cols(C_ptr, K_ptr, b_ptr, u_ptr, al_ptr, v_ptr, be_ptr, n, m, eps, inv_eps, fi, cexp, lo, hi,
                 BALANCED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    for c0 in range(0, m, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < m
        b = tl.load(b_ptr + cols, mask=cm, other=0.0)
        beta = tl.load(be_ptr + cols, mask=cm, other=float("-inf"))
        t = tl.zeros([BC], b.dtype)
        for r0 in range(0, n, BR):
            rows = r0 + tl.arange(0, BR)
            rm = rows < n
            u = tl.load(u_ptr + rows, mask=rm, other=0.0)
            K = tl.load(K_ptr + rows[:, None] * m + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
            t += tl.sum(K * u[:, None], axis=0)
        v, bad = _scalings(b, t, beta * cexp, fi, lo, hi, BALANCED)
        v = tl.where(b > 0, v, 0.0)
        if tl.sum(bad.to(tl.int32)) > 0:
            mx = tl.full([BC], float("-inf"), b.dtype)
            acc = tl.zeros([BC], b.dtype)
            for r0 in range(0, n, BR):
                rows = r0 + tl.arange(0, BR)
                rm = rows < n
                u = tl.load(u_ptr + rows, mask=rm, other=0.0)
                alpha = tl.load(al_ptr + rows, mask=rm, other=float("-inf"))
                f = tl.where(u > 0, alpha + eps * tl.log(tl.where(u > 0, u, 1.0)), float("-inf"))
                msk = rm[:, None] & bad[None, :]
                C = tl.load(C_ptr + rows[:, None] * m + cols[None, :], mask=msk, other=0.0).to(b.dtype)
                z = tl.where(msk & (f[:, None] > float("-inf")), (f[:, None] - C) * inv_eps, float("-inf"))
                new_mx = tl.maximum(mx, tl.max(z, axis=0))
                safe = tl.where(new_mx > float("-inf"), new_mx, 0.0)
                acc = acc * tl.exp(mx - safe) + tl.sum(tl.exp(z - safe[None, :]), axis=0)
                mx = new_mx
            reach = mx > float("-inf")
            lse = tl.where(reach, mx, 0.0) + tl.log(tl.where(reach, acc, 1.0))
            g = fi * eps * (tl.log(tl.where(bad, b, 1.0)) - lse)
            beta = tl.where(bad, tl.where(reach, g, float("-inf")), beta)
            v = tl.where(bad, tl.where(reach, 1.0, 0.0), v)
            tl.store(be_ptr + cols, beta, mask=cm)
            _write_k_cols(C_ptr, K_ptr, al_ptr, beta, cols, cm & bad, n, m, inv_eps, BR)
        tl.store(v_ptr + cols, v, mask=cm)


@triton.jit
def _log_scalings(x_ptr, pot_ptr, w_ptr, old_ptr, k, inv_eps, SAVE: tl.constexpr, B: tl.constexpr):
    """pot / eps + log(x) on live entries; SAVE: store it to old_ptr, else return max |change|."""
    err = tl.zeros([], x_ptr.dtype.element_ty)
    for k0 in range(0, k, B):
        idx = k0 + tl.arange(0, B)
        km = idx < k
        w = tl.load(w_ptr + idx, mask=km, other=0.0)
        x = tl.load(x_ptr + idx, mask=km, other=1.0)
        pot = tl.load(pot_ptr + idx, mask=km, other=0.0)
        F = tl.where(x > 0, pot * inv_eps + tl.log(tl.where(x > 0, x, 1.0)), float("-inf"))
        if SAVE:
            tl.store(old_ptr + idx, F, mask=km)
        else:
            old = tl.load(old_ptr + idx, mask=km, other=0.0)
            err = tl.maximum(err, tl.max(tl.where(km & (w > 0), _change(F, old), 0.0)))
    return err


@triton.jit
def _sinkhorn_kernel(cost_ptr, a_ptr, b_ptr, params_ptr, plan_ptr, iters_ptr, ws_ptr,
                     n, m, max_iter, check_every,
                     BALANCED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nm = n.to(tl.int64) * m
    C_ptr = cost_ptr + pid * nm
    K_ptr = plan_ptr + pid * nm               # K lives in the plan buffer until the end
    a_ptr = a_ptr + pid * n
    b_ptr = b_ptr + pid * m
    ws = ws_ptr + pid * 3 * (n + m)
    u_ptr = ws
    al_ptr = ws + n
    Fo_ptr = ws + 2 * n
    v_ptr = ws + 3 * n
    be_ptr = v_ptr + m
    Go_ptr = be_ptr + m
    eps = tl.load(params_ptr + 0)
    fi = tl.load(params_ptr + 1)
    lo = tl.load(params_ptr + 2)
    hi = tl.load(params_ptr + 3)
    tol = tl.load(params_ptr + 4)
    inv_eps = 1.0 / eps
    cexp = (fi - 1.0) * inv_eps

    nc = 0
    for c0 in range(0, m, BC):                # columns: v = 1, beta = 0 where b > 0
        cols = c0 + tl.arange(0, BC)
        cm = cols < m
        b = tl.load(b_ptr + cols, mask=cm, other=0.0)
        tl.store(v_ptr + cols, tl.where(b > 0, 1.0, 0.0).to(b.dtype), mask=cm)
        tl.store(be_ptr + cols, tl.where(b > 0, 0.0, float("-inf")).to(b.dtype), mask=cm)
        nc += tl.sum((b > 0).to(tl.int32))
    tl.debug_barrier()
    nr = 0
    for r0 in range(0, n, BR):
        rows = r0 + tl.arange(0, BR)
        a = tl.load(a_ptr + rows, mask=rows < n, other=0.0)
        nr += tl.sum((a > 0).to(tl.int32))
        _init_rows(C_ptr, K_ptr, a_ptr, u_ptr, al_ptr, be_ptr, n, m, inv_eps, cexp, r0, BR, BC)
    tl.debug_barrier()

    it = 0
    done = (nr == 0) | (nc == 0)
    while (it < max_iter) & (done == 0):
        it += 1
        check = (it % check_every) == 0
        if check:
            _log_scalings(u_ptr, al_ptr, a_ptr, Fo_ptr, n, inv_eps, True, BR)
            _log_scalings(v_ptr, be_ptr, b_ptr, Go_ptr, m, inv_eps, True, BC)
        _update_rows(C_ptr, K_ptr, a_ptr, u_ptr, al_ptr, v_ptr, be_ptr, n, m, eps, inv_eps, fi, cexp, lo, hi,
                     BALANCED, BR, BC)
        tl.debug_barrier()
        _update_cols(C_ptr, K_ptr, b_ptr, u_ptr, al_ptr, v_ptr, be_ptr, n, m, eps, inv_eps, fi, cexp, lo, hi,
                     BALANCED, BR, BC)
        tl.debug_barrier()
        if check:
            err_r = _log_scalings(u_ptr, al_ptr, a_ptr, Fo_ptr, n, inv_eps, False, BR)
            err_c = _log_scalings(v_ptr, be_ptr, b_ptr, Go_ptr, m, inv_eps, False, BC)
            done = tl.maximum(err_r, err_c) < tol

    for r0 in range(0, n, BR):                # plan = K u v, in place (empty sides: K = 0)
        rows = r0 + tl.arange(0, BR)
        rm = rows < n
        u = tl.load(u_ptr + rows, mask=rm, other=0.0)
        for c0 in range(0, m, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < m
            v = tl.load(v_ptr + cols, mask=cm, other=0.0)
            ptrs = K_ptr + rows[:, None] * m + cols[None, :]
            msk = rm[:, None] & cm[None, :]
            K = tl.load(ptrs, mask=msk, other=0.0)
            tl.store(ptrs, K * u[:, None] * v[None, :], mask=msk)
    tl.store(iters_ptr + pid, it)


def _blocks(n: int, m: int, dtype: torch.dtype) -> tuple[int, int]:
    bc = min(triton.next_power_of_2(max(m, 1)), _MAX_BC)
    br = max(1, min(triton.next_power_of_2(max(n, 1)), _TILE[dtype] // bc))
    return br, bc


def _params(eps: float, tau: float | None, tol: float, dtype, device) -> torch.Tensor:
    """[eps, fi, lo, hi, tol] on the device, filled by kernels (no host-to-device copy to wait on)."""
    fi = 1.0 if tau is None else tau / (tau + eps)
    lo, hi = _BAND[dtype]
    params = torch.empty(5, dtype=dtype, device=device)
    for i, x in enumerate((eps, fi, lo, hi, tol)):
        params[i] = x
    return params


def sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, tau: float | None, max_iter: int,
             tol: float, check_every: int, plan: torch.Tensor, iters: torch.Tensor) -> None:
    """cost [B, n, m], a [B, n], b [B, m] (contiguous, one dtype: fp32 or fp64) -> writes plan, iters."""
    B, n, m = cost.shape
    if B == 0:
        return
    if n == 0 or m == 0:
        iters.zero_()
        return
    br, bc = _blocks(n, m, cost.dtype)
    ws = torch.empty(B, 3 * (n + m), dtype=cost.dtype, device=cost.device)
    params = _params(eps, tau, tol, cost.dtype, cost.device)
    _sinkhorn_kernel[(B,)](cost, a, b, params, plan, iters, ws, n, m, max_iter, check_every,
                           BALANCED=tau is None, BR=br, BC=bc, **launch("sinkhorn"))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (python -m compass_kernels.triton.aot): the block configurations the
# launcher picks for pairs of more than 128 tokens (BR x BC = 16 x 256 in fp32, 4 x 256 in fp64:
# the 192-token OTPO shape and every longer one, streamed) and for 64-token pairs (64 x 64 /
# 16 x 64), fp32 and fp64, balanced and unbalanced.
# ----------------------------------------------------------------------------------------------

def _aot_cases():
    cases = []
    for dt, ty in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        for n in (192, 64):
            br, bc = _blocks(n, n, dt)
            for balanced in (False, True):
                sig = {"cost_ptr": f"*{ty}", "a_ptr": f"*{ty}", "b_ptr": f"*{ty}", "params_ptr": f"*{ty}",
                       "plan_ptr": f"*{ty}", "iters_ptr": "*i32", "ws_ptr": f"*{ty}", "n": "i32", "m": "i32",
                       "max_iter": "i32", "check_every": "i32"}
                meta = {"BALANCED": balanced, "BR": br, "BC": bc}
                name = f"sinkhorn_{ty}_L{n}{'_balanced' if balanced else ''}"
                cases.append((_sinkhorn_kernel, sig, meta, name, {"launch": "sinkhorn"}))
    return cases


AOT_CASES = _aot_cases()
