"""sinkhorn and otpo_weights: against POT, across backends, edge cases, bad inputs, opcheck, compile.

The torch and cpu backends run here; the Triton kernel has its own interpreter tests
(tests/kernels/triton/test_ot_triton.py) on smaller problems. Plans are compared with POT run to a tight
tolerance (stopThr 1e-12), so both sides are converged and "1e-5 relative on the plan" measures the
solvers, not where each one stopped.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import compass_kernels as ck
from compass_kernels import ot as ck_ot
from compass_kernels.ot_ref import otpo_weights_ref, sinkhorn_ref
from helpers import cpu_backends
from otpo_official import anisotropic_states, official_otpo_weights, prompt_masks

ot = pytest.importorskip("ot")

_NO_CPU = pytest.mark.skip(reason="compass_kernels._cpu not built")
BACKENDS = [b if b in cpu_backends() else pytest.param(b, marks=_NO_CPU) for b in ("torch", "cpu")]
TIGHT = dict(max_iter=100_000, tol=1e-12)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with ck.use_backend(request.param):
        yield request.param


def _problem(B, n, m, balanced, dtype=torch.float64, zero_bins=True):
    """Random costs in [0, 1), random marginals, a few zero-mass bins (pairs 0 and 1)."""
    C = torch.rand(B, n, m, dtype=dtype)
    a = torch.rand(B, n, dtype=dtype) + 0.1
    b = torch.rand(B, m, dtype=dtype) + 0.1
    if zero_bins:
        a[0, 2] = 0
        b[min(1, B - 1), 0] = 0
        b[min(1, B - 1), m - 1] = 0
    if balanced:
        a = a / a.sum(-1, keepdim=True)
        b = b / b.sum(-1, keepdim=True)
    return C, a, b


def _pot_plan(C, a, b, eps, tau):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reg_type="entropy" warns that c is overwritten
        if tau is None:
            P = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, numItermax=100_000, stopThr=1e-13)
        else:
            P = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), C.numpy(), eps, tau, reg_type="entropy",
                                                  numItermax=100_000, stopThr=1e-13)
    return torch.from_numpy(P)


def _close(got, want, rtol):
    """Relative to the largest entry of the pair: tiny plan entries carry no weight."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# sinkhorn against POT


@pytest.mark.parametrize("tau", [0.2, 5.0, None])
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.05])
def test_sinkhorn_matches_pot(backend, eps, tau):
    C, a, b = _problem(3, 9, 13, balanced=tau is None)
    P, iters = ck.sinkhorn(C, a, b, eps=eps, tau=tau, return_iters=True, **TIGHT)
    assert P.dtype == torch.float64 and P.shape == (3, 9, 13)
    assert iters.dtype == torch.int32 and bool((iters > 0).all())
    for i in range(3):
        _close(P[i], _pot_plan(C[i], a[i], b[i], eps, tau), 1e-5)
    # zero-mass bins: exact zero rows / columns
    assert bool((P[0, 2] == 0).all())
    assert bool((P[1, :, 0] == 0).all()) and bool((P[1, :, -1] == 0).all())


def test_balanced_marginals_are_met(backend):
    C, a, b = _problem(4, 16, 11, balanced=True)
    P = ck.sinkhorn(C, a, b, eps=0.05, tol=1e-10, max_iter=20_000)
    torch.testing.assert_close(P.sum(-1), a, rtol=0, atol=1e-9)
    torch.testing.assert_close(P.sum(-2), b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 20.0])
@pytest.mark.parametrize("tau", [0.2, None])
def test_small_eps_is_finite(backend, tau, scale):
    """eps = 0.01 on costs up to 20: exp(-C/eps) underflows float64 (e^-2000), so the scaling
    iterations must fall back to log-domain updates."""
    C, a, b = _problem(2, 12, 10, balanced=tau is None)
    C = C * scale
    P, iters = ck.sinkhorn(C, a, b, eps=0.01, tau=tau, max_iter=3000, tol=1e-9, return_iters=True)
    assert bool(P.isfinite().all())
    R, _ = sinkhorn_ref(C, a, b, 0.01, tau, max_iter=3000, tol=1e-9)
    for i in range(2):
        _close(P[i], R[i], 1e-5)
    if tau is None and bool((iters < 3000).all()):
        torch.testing.assert_close(P.sum(-1), a, rtol=0, atol=1e-7)


@pytest.mark.parametrize("eps,tau,scale", [(0.1, None, 1.0), (0.05, 5.0, 1.0), (0.01, 0.2, 20.0),
                                           (0.001, None, 1.0)])
def test_fixed_iterations_match_reference(backend, eps, tau, scale):
    """The cpu backend's scaling iterations (with absorption into the potentials) produce the
    reference's log-domain iterates: run both for a fixed number of iterations (tol = 0), far from
    convergence, and compare to float64 rounding."""
    C, a, b = _problem(3, 11, 8, balanced=tau is None)
    C = C * scale
    P, iters = ck.sinkhorn(C, a, b, eps=eps, tau=tau, max_iter=25, tol=0.0, return_iters=True)
    R, _ = sinkhorn_ref(C, a, b, eps, tau, max_iter=25, tol=0.0)
    assert iters.tolist() == [25, 25, 25]
    _close(P, R, 1e-10)


def test_float32_plan(backend):
    C, a, b = _problem(3, 8, 12, balanced=False)
    P = ck.sinkhorn(C.float(), a.float(), b.float(), eps=0.1, tau=0.2, tol=1e-9)
    assert P.dtype == torch.float32
    R = ck.sinkhorn(C, a, b, eps=0.1, tau=0.2, tol=1e-9)
    for i in range(3):
        _close(P[i].double(), R[i], 1e-5)  # fp32 inputs: the cost itself is rounded at 6e-8


def test_backends_agree_and_count_iterations_alike():
    if "cpu" not in cpu_backends():
        pytest.skip("compass_kernels._cpu not built")
    C, a, b = _problem(5, 17, 6, balanced=False)
    with ck.use_backend("torch"):
        P0, it0 = ck.sinkhorn(C, a, b, eps=0.05, tau=1.0, tol=1e-10, return_iters=True)
    with ck.use_backend("cpu"):
        P1, it1 = ck.sinkhorn(C, a, b, eps=0.05, tau=1.0, tol=1e-10, return_iters=True)
    torch.testing.assert_close(P1, P0, rtol=1e-9, atol=1e-12)
    assert (it1 - it0).abs().max() <= 10          # the same criterion; a tie may flip by one check


def test_iteration_budget_and_cadence(backend):
    C, a, b = _problem(3, 6, 7, balanced=False)
    _, iters = ck.sinkhorn(C, a, b, eps=0.05, tau=5.0, max_iter=7, tol=0.0, return_iters=True)
    assert iters.tolist() == [7, 7, 7]
    _, iters = ck.sinkhorn(C, a, b, eps=0.5, tau=0.5, check_every=3, tol=1e-6, return_iters=True)
    assert all(k % 3 == 0 for k in iters.tolist())


def test_empty_sides_and_shapes(backend):
    C, a, b = _problem(3, 5, 4, balanced=False, zero_bins=False)
    a[1] = 0                                      # pair 1 has no chosen mass
    b[2] = 0
    P, iters = ck.sinkhorn(C, a, b, eps=0.1, tau=0.2, return_iters=True)
    assert bool((P[1] == 0).all()) and bool((P[2] == 0).all()) and bool(P[0].sum() > 0)
    assert iters[1] == 0 and iters[2] == 0
    for B, n, m in ((0, 3, 4), (2, 0, 4), (2, 3, 0)):
        P = ck.sinkhorn(torch.rand(B, n, m), torch.ones(B, n), torch.ones(B, m), eps=0.1, tau=0.2)
        assert P.shape == (B, n, m) and bool((P == 0).all())


# ---------------------------------------------------------------------------------------------
# otpo_weights


def _hidden(B, L, D, n_diff=3, diff_at=0, seed=0):
    """Chosen / rejected hidden states that agree token for token up to noise, except n_diff
    rejected tokens from position diff_at replaced by far-away vectors (the 'price' that differs)."""
    g = torch.Generator().manual_seed(seed)
    h_c = torch.randn(B, L, D, generator=g)
    h_r = h_c + 0.05 * torch.randn(B, L, D, generator=g)
    h_r[:, diff_at:diff_at + n_diff] = 3.0 * torch.randn(B, n_diff, D, generator=g)
    return h_c, h_r


def _masks(B, L, lengths_c, lengths_r, offset=0):
    ar = torch.arange(L)
    mc = torch.stack([(ar >= offset) & (ar < offset + n) for n in lengths_c])
    mr = torch.stack([(ar >= offset) & (ar < offset + n) for n in lengths_r])
    return mc, mr


def _valid_pairs_loop(h_c, h_r, mc, mr, eps, tau):
    """The ``cost_scale="valid"`` option per pair: the cost of the valid tokens only, divided by its
    own maximum; POT solving to a tight tolerance."""
    w_c, w_r = torch.zeros(mc.shape, dtype=torch.float64), torch.zeros(mr.shape, dtype=torch.float64)
    for i in range(h_c.shape[0]):
        p, q = h_c[i][mc[i]].double(), h_r[i][mr[i]].double()
        if len(p) == 0 or len(q) == 0:
            continue
        C = torch.cdist(p, q, compute_mode="donot_use_mm_for_euclid_dist") + 1e-6
        C = C / C.max() if C.max() > 1 else C
        G = _pot_plan(C, torch.ones(len(p), dtype=torch.float64), torch.ones(len(q), dtype=torch.float64), eps, tau)
        scale = G.sum() / min(len(p), len(q))
        w_c[i, mc[i]] = G.sum(1) / scale
        w_r[i, mr[i]] = G.sum(0) / scale
    return w_c, w_r


# prompts of 5, 0, 3 and 7 positions: pair 1's chosen side fills all 24 positions (no zero row)
_ANISO_MASKS = dict(starts=[5, 0, 3, 7], lengths_c=[14, 24, 9, 17], lengths_r=[19, 20, 21, 11])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1.0, 0.1])
def test_otpo_default_matches_official_function(backend, eps, dtype):
    """The default cost scale against the independent re-implementation of the official
    ``get_ot_weight`` (tests/otpo_official.py: masked states, padded cdist, POT's stabilised
    entropic sinkhorn_unbalanced) on states with a dominant common direction."""
    B, L, D = 4, 24, 32
    h_c, h_r = anisotropic_states(B, L, D)
    mc, mr = prompt_masks(B, L, **_ANISO_MASKS)
    w_c, w_r = ck.otpo_weights(h_c.to(dtype), h_r.to(dtype), mc, mr, eps=eps, tau=0.2)
    assert w_c.dtype == dtype and w_c.shape == (B, L)
    o_c, o_r = official_otpo_weights(h_c.to(dtype), h_r.to(dtype), mc, mr, eps, 0.2)
    torch.testing.assert_close(w_c.double(), o_c, rtol=0, atol=2e-3)
    torch.testing.assert_close(w_r.double(), o_r, rtol=0, atol=2e-3)


def test_otpo_cost_scales_differ_on_anisotropic_states(backend):
    """The two scales are different functions here: "valid" is much sharper at eps 0.1 (its
    maximum ignores the states' norms), and it is what the valid-pairs loop computes."""
    B, L, D = 4, 24, 32
    h_c, h_r = anisotropic_states(B, L, D)
    mc, mr = prompt_masks(B, L, **_ANISO_MASKS)
    off_c, _ = ck.otpo_weights(h_c, h_r, mc, mr, eps=0.1, tau=0.2)
    val_c, val_r = ck.otpo_weights(h_c, h_r, mc, mr, eps=0.1, tau=0.2, cost_scale="valid")
    def spread(w):                                    # mean over pairs of max - min over valid tokens
        return sum(float(w[i][mc[i]].max() - w[i][mc[i]].min()) for i in range(B)) / B

    assert spread(val_c) > 2 * spread(off_c)
    o_c, o_r = _valid_pairs_loop(h_c, h_r, mc, mr, 0.1, 0.2)
    torch.testing.assert_close(val_c.double(), o_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(val_r.double(), o_r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1.0, 0.1])
def test_otpo_valid_scale_matches_valid_pairs_loop(backend, eps, dtype):
    B, L, D = 4, 24, 16
    h_c, h_r = _hidden(B, L, D)
    h_c, h_r = h_c.to(dtype), h_r.to(dtype)
    mc, mr = _masks(B, L, [20, 24, 9, 15], [17, 24, 13, 15], offset=0)
    w_c, w_r = ck.otpo_weights(h_c, h_r, mc, mr, eps=eps, tau=0.2, tol=1e-12, max_iter=100_000,
                               cost_scale="valid")
    assert w_c.dtype == dtype and w_c.shape == (B, L)
    o_c, o_r = _valid_pairs_loop(h_c, h_r, mc, mr, eps, 0.2)
    # fp32 weights; the cpu backend's cost is then an fp32 GEMM (||p||^2 + ||q||^2 - 2 p.q)
    rtol = 1e-5 if backend == "torch" or dtype == torch.float64 else 1e-4
    torch.testing.assert_close(w_c.double(), o_c, rtol=rtol, atol=rtol)
    torch.testing.assert_close(w_r.double(), o_r, rtol=rtol, atol=rtol)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="compass_kernels._cpu not built")
@pytest.mark.parametrize("D", [1, 77, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_otpo_cpu_cost_tiles_on_awkward_shapes(dtype, D):
    """The cpu backend's fused distance GEMM (register tiles of 6 rows x 4 vectors, then row and
    column tails) against the float64 reference: lengths that leave every tail (1, 5, 7, 67, 131,
    150 tokens against 150, 64, 1, 129, 66, 6), scattered masks, D not a multiple of the vector
    width, and a large common offset on the hidden states (the centring keeps the identity
    ||p||^2 + ||q||^2 - 2 p.q accurate)."""
    B, L = 6, 150
    h_c, h_r = _hidden(B, L, D, seed=1)
    h_c, h_r = (h_c + 40.0).to(dtype), (h_r + 40.0).to(dtype)
    g = torch.Generator().manual_seed(2)
    mc = torch.zeros(B, L, dtype=torch.bool)
    mr = torch.zeros(B, L, dtype=torch.bool)
    for i, (n_c, n_r) in enumerate(zip([1, 5, 7, 67, 131, 150], [150, 64, 1, 129, 66, 6])):
        mc[i, torch.randperm(L, generator=g)[:n_c]] = True
        mr[i, torch.randperm(L, generator=g)[:n_r]] = True
    with ck.use_backend("cpu"):
        got = ck.otpo_weights(h_c, h_r, mc, mr, eps=0.1, tau=0.2, tol=1e-10, max_iter=100_000)
    want = otpo_weights_ref(h_c.double(), h_r.double(), mc, mr, eps=0.1, tau=0.2, tol=1e-10, max_iter=100_000)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for g_, w_ in zip(got, want):
        assert g_.dtype == dtype
        torch.testing.assert_close(g_.double(), w_, rtol=tol, atol=tol)


def test_otpo_weight_properties(backend):
    B, L, D = 3, 32, 24
    h_c, h_r = _hidden(B, L, D, n_diff=3, diff_at=2)
    mc, mr = _masks(B, L, [30, 30, 20], [26, 30, 28], offset=2)
    w1_c, w1_r = ck.otpo_weights(h_c, h_r, mc, mr, eps=1.0, tau=0.2)
    w01_c, w01_r = ck.otpo_weights(h_c, h_r, mc, mr, eps=0.1, tau=0.2)
    n_tok = torch.minimum(mc.sum(1), mr.sum(1)).float()
    for w_c, w_r in ((w1_c, w1_r), (w01_c, w01_r)):
        torch.testing.assert_close(w_c.sum(1), n_tok, rtol=1e-5, atol=0)   # each side sums to n
        torch.testing.assert_close(w_r.sum(1), n_tok, rtol=1e-5, atol=0)
        assert bool((w_c[~mc] == 0).all()) and bool((w_r[~mr] == 0).all())  # zero where masked
    # eps = 1: near uniform on the tokens that have a counterpart; eps = 0.1: spread out, and the
    # differing rejected tokens (the first 3 valid ones, far from every chosen token) get the
    # smallest weights
    for i in range(B):
        uniform = float(n_tok[i]) / int(mr[i].sum())
        matched = w1_r[i][mr[i]][3:] / uniform
        assert float((matched - 1).abs().max()) < 0.1
        valid = w01_r[i][mr[i]]
        assert float(valid[:3].max()) < float(valid[3:].min())
        assert float(valid.std()) > 2 * float(w1_r[i][mr[i]].std())


@pytest.mark.parametrize("cost_scale", ["valid", "official"])
def test_otpo_padding_does_not_change_weights(backend, cost_scale):
    """"valid": neither the padding length nor its content matters. "official": the content of
    masked positions does not (they are zero vectors), their presence does; every pair here has
    masked positions on both sides before and after padding."""
    B, L, D = 2, 20, 16
    h_c, h_r = _hidden(B, L, D)
    mc, mr = _masks(B, L, [20, 14], [18, 20])
    if cost_scale == "official":
        mc[:, 0], mr[:, 0] = False, False
    w_c, w_r = ck.otpo_weights(h_c, h_r, mc, mr, eps=0.1, tau=0.2, cost_scale=cost_scale)
    # pad to 37 positions with huge garbage (and NaN) hidden states, valid tokens shifted by 5
    Lp, off = 37, 5
    pad_c = 1e3 * torch.randn(B, Lp, D)
    pad_r = 1e3 * torch.randn(B, Lp, D)
    pad_c[:, 0] = float("nan")
    pad_c[:, off:off + L], pad_r[:, off:off + L] = h_c, h_r
    mcp = torch.zeros(B, Lp, dtype=torch.bool)
    mrp = torch.zeros(B, Lp, dtype=torch.bool)
    mcp[:, off:off + L], mrp[:, off:off + L] = mc, mr
    p_c, p_r = ck.otpo_weights(pad_c, pad_r, mcp.int(), mrp.int(), eps=0.1, tau=0.2,  # int masks too
                               cost_scale=cost_scale)
    torch.testing.assert_close(p_c[:, off:off + L], w_c, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(p_r[:, off:off + L], w_r, rtol=2e-5, atol=2e-6)
    assert bool((p_c[:, :off] == 0).all()) and bool((p_r[:, off + L:] == 0).all())


def test_otpo_empty_side_gives_zero_weights(backend):
    B, L, D = 3, 10, 8
    h_c, h_r = _hidden(B, L, D)
    mc, mr = _masks(B, L, [10, 0, 6], [7, 5, 0])
    w_c, w_r = ck.otpo_weights(h_c, h_r, mc, mr)
    assert bool((w_c[1:] == 0).all()) and bool((w_r[1:] == 0).all())
    torch.testing.assert_close(w_c[0].sum(), torch.tensor(7.0), rtol=1e-5, atol=0)


def test_otpo_bf16_hidden_states_and_backend_agreement():
    B, L, D = 2, 16, 32
    h_c, h_r = _hidden(B, L, D)
    mc, mr = _masks(B, L, [16, 11], [13, 16])
    want = otpo_weights_ref(h_c.bfloat16(), h_r.bfloat16(), mc, mr, eps=0.1, tau=0.2)
    for name in cpu_backends():
        if name == "triton":
            continue
        with ck.use_backend(name):
            got = ck.otpo_weights(h_c.bfloat16(), h_r.bfloat16(), mc, mr, eps=0.1, tau=0.2)
        for g, w in zip(got, want):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad inputs


def _ok():
    return torch.rand(2, 3, 4), torch.ones(2, 3), torch.ones(2, 4)


@pytest.mark.parametrize(
    "mutate,kwargs,exc,match",
    [
        (lambda C, a, b: (C, -a, b), {"tau": 1.0}, ValueError, r"a must hold finite non-negative masses, found -1"),
        (lambda C, a, b: (C, a, b.index_fill(1, torch.tensor([2]), float("nan"))), {"tau": 1.0}, ValueError,
         r"b must hold finite non-negative masses, found nan"),
        (lambda C, a, b: (C, a[:, :2], b), {}, ValueError, r"a must have shape \[B, n\] = \[2, 3\]"),
        (lambda C, a, b: (C, a, b[:1]), {}, ValueError, r"b must have shape \[B, m\] = \[2, 4\]"),
        (lambda C, a, b: (C[0], a, b), {}, ValueError, r"cost must be 3-D \[B, n, m\]"),
        (lambda C, a, b: (C.long(), a, b), {}, TypeError, r"cost must be float32, float64, float16 or bfloat16"),
        (lambda C, a, b: ([[1.0]], a, b), {}, TypeError, r"cost must be a torch.Tensor"),
        (lambda C, a, b: (C, a, b), {"eps": 0.0}, ValueError, r"eps must be > 0 and finite, got 0.0"),
        (lambda C, a, b: (C, a, b), {"eps": float("inf")}, ValueError, r"eps must be > 0 and finite"),
        (lambda C, a, b: (C, a, b), {"tau": -1.0}, ValueError, r"tau must be > 0, got -1.0"),
        (lambda C, a, b: (C, a, b), {"tau": 0}, ValueError, r"tau must be > 0"),
        (lambda C, a, b: (C, a, b), {"max_iter": 0}, ValueError, r"max_iter must be an int >= 1"),
        (lambda C, a, b: (C, a, b), {"check_every": 0}, ValueError, r"check_every must be an int >= 1"),
        (lambda C, a, b: (C, a, b), {"tol": -1e-3}, ValueError, r"tol must be a float >= 0"),
        (lambda C, a, b: (C, a, b), {"tau": None}, ValueError, r"balanced sinkhorn \(tau=None\) needs a and b "
                                                               r"of equal mass per pair; pair 0 has sum\(a\) = 3"),
    ],
)
def test_sinkhorn_bad_inputs(mutate, kwargs, exc, match):
    C, a, b = mutate(*_ok())
    kwargs = {"eps": 0.1, **kwargs}
    with pytest.raises(exc, match=match):
        ck.sinkhorn(C, a, b, **kwargs)


def _otpo_args(h=(2, 5, 3), h_r=None, mc=(2, 5), mr=(2, 5)):
    h_r = h if h_r is None else h_r
    return (torch.rand(*h), torch.rand(*h_r), torch.ones(*mc, dtype=torch.bool), torch.ones(*mr, dtype=torch.bool))


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (_otpo_args(h_r=(2, 4, 3)), {}, ValueError, r"h_rejected must have the shape of h_chosen \(2, 5, 3\)"),
        (_otpo_args(mc=(2, 4)), {}, ValueError, r"mask_chosen must have shape \[B, L\] = \[2, 5\]"),
        (_otpo_args(mr=(5,)), {}, ValueError, r"mask_rejected must have shape \[B, L\]"),
        (_otpo_args(h=(5, 3), mc=(5,), mr=(5,)), {}, ValueError, r"h_chosen must be 3-D \[B, L, D\]"),
        (_otpo_args(), {"eps": -1.0}, ValueError, r"eps must be > 0"),
        (_otpo_args(), {"tau": None}, TypeError, r"tau must be a positive float, got None"),
        (_otpo_args(), {"cost_scale": "max"}, ValueError, r"cost_scale must be one of \('official', 'valid'\)"),
        ((torch.randint(0, 3, (2, 5, 3)), torch.rand(2, 5, 3), torch.ones(2, 5), torch.ones(2, 5)),
         {}, TypeError, r"h_chosen must be float32, float64, float16 or bfloat16"),
    ],
)
def test_otpo_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ck.otpo_weights(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.library registration and torch.compile


def test_opcheck(backend):
    C, a, b = _problem(2, 5, 7, balanced=False)
    torch.library.opcheck(ck_ot._sinkhorn_op.op, (C, a, b, 0.1, 0.2, 200, 1e-8, 10))
    Cb, ab, bb = _problem(2, 5, 7, balanced=True)
    torch.library.opcheck(ck_ot._sinkhorn_op.op, (Cb.float(), ab.float(), bb.float(), 0.5, None, 200, 1e-6, 5))
    h_c, h_r = _hidden(2, 6, 4)
    mc, mr = _masks(2, 6, [6, 3], [4, 6])
    torch.library.opcheck(ck_ot._otpo_op.op, (h_c, h_r, mc, mr, 1.0, 0.2, 200, 1e-6, 10))


def test_compile_fullgraph():
    """Both ops inside one compiled function, with a second shape that must not break the graph."""
    def step(cost, a, b, h_c, h_r, mc, mr):
        P = ck.sinkhorn(cost, a, b, eps=0.1, tau=0.5)
        w_c, w_r = ck.otpo_weights(h_c, h_r, mc, mr, eps=1.0, tau=0.2)
        return P.sum(-1) * 2, w_c + 1, w_r

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for L in (6, 9):
        C, a, b = _problem(2, L, L + 1, balanced=False, dtype=torch.float32)
        h_c, h_r = _hidden(2, L, 4)
        mc, mr = _masks(2, L, [L, L - 2], [L - 1, L])
        got = compiled(C, a, b, h_c, h_r, mc, mr)
        want = step(C, a, b, h_c, h_r, mc, mr)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
