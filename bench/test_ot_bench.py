"""OTPO weights and batched Sinkhorn on CPU against POT, the solver the official OTPO code calls.

Shape: B = 16 preference pairs, responses of 128..192 tokens padded to L = 192, D = 256 hidden
states; eps 1 (OTPO's 8B setting) and 0.1 (3B), tau = 0.2. Peers, in the same run:

* pot_official: OTPO's ``get_ot_weight`` loop (Mimasss2/OTPO): per pair ``torch.cdist`` on the
  (mask-zeroed) padded hidden states, then ``ot.unbalanced.sinkhorn_unbalanced(..., method=
  "sinkhorn_stabilized")`` on torch tensors, with ``reg_type="entropy"`` (docs/algorithms.md);
* pot_numpy: the same loop on float64 numpy arrays of the valid tokens with POT's plain
  ``sinkhorn`` method, the fastest way to call POT per pair;
* pot_batch: POT's batched solver ``ot.batch.solve_batch`` (log-domain Sinkhorn over [B, n, m]).
  It is balanced only (no marginal relaxation), so it is compared on the balanced problem.

extra_info carries what bench/report.py reads (impl, shape, kind, pass_ = "ot", bytes: inputs read
plus outputs written once, compass_kernels.benchmarking.models) and the iterations each solver ran
(iters_mean / iters_max; POT's stabilised solver checks every 10 iterations, its count is read from
its error log).
Our convergence test (relative change of the scalings < 1e-6) is at least as strict as POT's.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import compass_kernels as ck
from compass_kernels.benchmarking.models import otpo_weights_bytes, sinkhorn_bytes

ot = pytest.importorskip("ot")

B, L, D, TAU = 16, 192, 256, 0.2
EPS = [1.0, 0.1]


def _batch(seed=0):
    """Chosen / rejected hidden states that match token for token up to noise, with 8 rejected
    tokens replaced (the part that differs), and response lengths in [128, 192]."""
    g = torch.Generator().manual_seed(seed)
    h_c = torch.randn(B, L, D, generator=g)
    h_r = h_c + 0.3 * torch.randn(B, L, D, generator=g)
    h_r[:, 20:28] = 2.0 * torch.randn(B, 8, D, generator=g)
    ar = torch.arange(L)
    mc = ar < torch.randint(128, L + 1, (B, 1), generator=g)
    mr = ar < torch.randint(128, L + 1, (B, 1), generator=g)
    return h_c, h_r, mc, mr


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")  # POT warns that reg_type="entropy" overwrites c
    return ctx


def pot_official(h_c, h_r, mc, mr, eps, log_iters=None):
    """OTPO's get_ot_weight, as published (padded L x L cost, max over the padded matrix)."""
    ctx = _quiet()
    w_c, w_r = [], []
    for i in range(h_c.shape[0]):
        P = mc[i].unsqueeze(1) * h_c[i]
        Q = mr[i].unsqueeze(1) * h_r[i]
        C = torch.cdist(P.float(), Q.float(), p=2) + 1e-6
        cmax = C.abs().max()
        if cmax.item() > 1:
            C = C / cmax
        a, b = torch.ones(L) * mc[i], torch.ones(L) * mr[i]
        G, log = ot.unbalanced.sinkhorn_unbalanced(a, b, C, eps, TAU, method="sinkhorn_stabilized",
                                                   reg_type="entropy", log=True)
        if log_iters is not None:
            log_iters.append(10 * (len(log["err"]) - 1) + 1)
        scale = G.sum() / min(a.sum(), b.sum())
        w_c.append(G.sum(-1) / scale)
        w_r.append(G.sum(0) / scale)
    ctx.__exit__(None, None, None)
    return torch.stack(w_c), torch.stack(w_r)


def pot_numpy(h_c, h_r, mc, mr, eps, log_iters=None):
    """The same weights per pair on the valid tokens, float64 numpy, POT's plain scaling method."""
    ctx = _quiet()
    w_c, w_r = np.zeros((B, L)), np.zeros((B, L))
    for i in range(h_c.shape[0]):
        p, q = h_c[i][mc[i]].double().numpy(), h_r[i][mr[i]].double().numpy()
        C = ot.dist(p, q, metric="euclidean") + 1e-6
        C = C / C.max() if C.max() > 1 else C
        G, log = ot.unbalanced.sinkhorn_unbalanced(np.ones(len(p)), np.ones(len(q)), C, eps, TAU,
                                                   reg_type="entropy", log=True)
        if log_iters is not None:
            log_iters.append(len(log["err"]))
        scale = G.sum() / min(len(p), len(q))
        w_c[i, mc[i].numpy()] = G.sum(1) / scale
        w_r[i, mr[i].numpy()] = G.sum(0) / scale
    ctx.__exit__(None, None, None)
    return w_c, w_r


def _info(benchmark, impl, shape, kind, nbytes, iters):
    iters = [int(k) for k in iters]
    benchmark.extra_info.update(impl=impl, shape=shape, kind=kind, pass_="ot", bytes=nbytes,
                                iters_mean=float(np.mean(iters)) if iters else None,
                                iters_max=max(iters) if iters else None)


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("impl", ["compass", "pot_official", "pot_numpy"])
def test_otpo_weights(benchmark, impl, eps):
    h_c, h_r, mc, mr = _batch()
    kind = f"eps{eps:g}"
    benchmark.group = f"otpo-{kind}"
    nbytes = otpo_weights_bytes(B, L, L, D)
    iters = []
    if impl == "compass":
        # iterations: the same solve through sinkhorn on the cost otpo_weights builds
        from compass_kernels.ot import _otpo_cost

        C = _otpo_cost(h_c, h_r, mc, mr, "official")               # otpo_weights' default cost_scale
        _, it = ck.sinkhorn(C, mc.float(), mr.float(), eps=eps, tau=TAU, return_iters=True)
        iters = it.tolist()
        out = benchmark.pedantic(ck.otpo_weights, args=(h_c, h_r, mc, mr), kwargs=dict(eps=eps, tau=TAU),
                                 rounds=7, warmup_rounds=1)
        ref = pot_numpy(h_c, h_r, mc, mr, eps)
        # POT stops at its own (looser) criterion: agreement to ~1e-3 on weights of size ~1
        np.testing.assert_allclose(out[0].double().numpy(), ref[0], atol=2e-3)
        np.testing.assert_allclose(out[1].double().numpy(), ref[1], atol=2e-3)
    elif impl == "pot_official":
        pot_official(h_c, h_r, mc, mr, eps, iters)
        benchmark.pedantic(pot_official, args=(h_c, h_r, mc, mr, eps), rounds=2, warmup_rounds=0)
    else:
        pot_numpy(h_c, h_r, mc, mr, eps, iters)
        benchmark.pedantic(pot_numpy, args=(h_c, h_r, mc, mr, eps), rounds=3, warmup_rounds=0)
    _info(benchmark, impl, f"B{B}L{L}D{D}", kind, nbytes, iters)


def _cost():
    from compass_kernels.ot import _otpo_cost

    h_c, h_r, mc, mr = _batch()
    full = torch.ones(B, L, dtype=torch.bool)
    return _otpo_cost(h_c, h_r, full, full, "official")              # [B, L, L] fp32 in [0, 1]


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("impl", ["compass", "compass_check1", "pot_loop"])
def test_sinkhorn_unbalanced(benchmark, impl, eps):
    """The solver alone on a precomputed [16, 192, 192] cost, unit masses, tau = 0.2.

    compass_check1 tests convergence after every iteration, as POT does (the default, every 10,
    means at least 10 iterations; OTPO at eps = 1 converges in ~6)."""
    C = _cost()
    ones = torch.ones(B, L)
    kind = f"unbalanced-eps{eps:g}"
    benchmark.group = f"sinkhorn-{kind}"
    iters = []
    if impl.startswith("compass"):
        kw = dict(eps=eps, tau=TAU, check_every=1 if impl == "compass_check1" else 10)
        _, it = ck.sinkhorn(C, ones, ones, return_iters=True, **kw)
        iters = it.tolist()
        benchmark.pedantic(ck.sinkhorn, args=(C, ones, ones), kwargs=kw, rounds=9, warmup_rounds=1)
    else:
        Cn = C.double().numpy()

        def loop(log_iters=None):
            ctx = _quiet()
            for i in range(B):
                _, log = ot.unbalanced.sinkhorn_unbalanced(np.ones(L), np.ones(L), Cn[i], eps, TAU,
                                                           reg_type="entropy", log=True)
                if log_iters is not None:
                    log_iters.append(len(log["err"]))
            ctx.__exit__(None, None, None)

        loop(iters)
        benchmark.pedantic(loop, rounds=3, warmup_rounds=0)
    _info(benchmark, impl, f"B{B}L{L}", kind, sinkhorn_bytes(B, L, L), iters)


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("impl", ["compass", "pot_loop", "pot_batch"])
def test_sinkhorn_balanced(benchmark, impl, eps):
    """Balanced problem (uniform 1/L marginals), where POT's batched solver applies."""
    C = _cost()
    a = torch.full((B, L), 1.0 / L)
    kind = f"balanced-eps{eps:g}"
    benchmark.group = f"sinkhorn-{kind}"
    iters = []
    if impl == "compass":
        _, it = ck.sinkhorn(C, a, a, eps=eps, return_iters=True)
        iters = it.tolist()
        benchmark.pedantic(ck.sinkhorn, args=(C, a, a), kwargs=dict(eps=eps), rounds=9, warmup_rounds=1)
    elif impl == "pot_loop":
        Cn, an = C.double().numpy(), a[0].double().numpy()

        def loop(log_iters=None):
            for i in range(B):
                _, log = ot.sinkhorn(an, an, Cn[i], eps, log=True)
                if log_iters is not None:
                    log_iters.append(log["niter"])

        loop(iters)
        benchmark.pedantic(loop, rounds=3, warmup_rounds=0)
    else:
        Cb, ab = C.double(), a.double()        # torch backend of POT, batched log-domain Sinkhorn
        res = ot.batch.solve_batch(Cb, eps, ab, ab, method="log_sinkhorn", tol=1e-6)
        iters = [res.log["n_iter"]] * B
        benchmark.pedantic(ot.batch.solve_batch, args=(Cb, eps, ab, ab),
                           kwargs=dict(method="log_sinkhorn", tol=1e-6), rounds=3, warmup_rounds=0)
    _info(benchmark, impl, f"B{B}L{L}", kind, sinkhorn_bytes(B, L, L), iters)
