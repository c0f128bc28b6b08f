"""The Triton Sinkhorn kernel against the torch reference and POT.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set here unless the
environment already chose); with TRITON_INTERPRET=0 on a CUDA machine the same tests run the
compiled kernel on the GPU. The interpreter costs ~10 ms per iteration per pair, so problems are
small and most checks run a fixed number of iterations (tol = 0): the kernel's scaling iterations
and the reference's log-domain iterations produce the same iterates, so the plans must agree to
float64 rounding whatever the convergence.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import compass_kernels as ck  # noqa: E402
from compass_kernels.ot_ref import sinkhorn_ref  # noqa: E402
from compass_kernels.triton import ot as tot  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def _triton_backend():
    with ck.use_backend("triton"):
        yield


def _problem(B, n, m, balanced, scale=1.0, dtype=torch.float64):
    C = scale * torch.rand(B, n, m, dtype=torch.float64)
    a = torch.rand(B, n, dtype=torch.float64) + 0.1
    b = torch.rand(B, m, dtype=torch.float64) + 0.1
    a[0, 1] = 0                                    # zero-mass bins
    b[B - 1, 0] = 0
    if balanced:
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    return C.to(DEVICE, dtype), a.to(DEVICE, dtype), b.to(DEVICE, dtype)


def _close(got, want, rtol):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol,
                               atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("eps,tau,scale", [(1.0, 0.2, 1.0), (0.1, None, 1.0), (0.05, 5.0, 1.0),
                                           (0.01, 0.2, 20.0), (0.01, None, 20.0)])
def test_fixed_iterations_match_reference(eps, tau, scale):
    """scale 20, eps 0.01: exp(-C/eps) underflows float64, every column goes through the exact
    log-sum-exp update and K is rebuilt from the absorbed potentials."""
    C, a, b = _problem(2, 7, 10, tau is None, scale)
    P, iters = ck.sinkhorn(C, a, b, eps=eps, tau=tau, max_iter=12, tol=0.0, return_iters=True)
    R, _ = sinkhorn_ref(C, a, b, eps, tau, max_iter=12, tol=0.0)
    assert iters.tolist() == [12, 12]
    assert bool(P.isfinite().all())
    _close(P, R, 1e-10)
    assert bool((P[0, 1] == 0).all()) and bool((P[1, :, 0] == 0).all())


@pytest.mark.parametrize("tau", [0.2, None])
def test_converges_to_pot(tau):
    ot = pytest.importorskip("ot")
    C, a, b = _problem(2, 6, 9, tau is None)
    P, iters = ck.sinkhorn(C, a, b, eps=0.1, tau=tau, tol=1e-11, max_iter=2000, return_iters=True)
    R, it_ref = sinkhorn_ref(C, a, b, 0.1, tau, tol=1e-11, max_iter=2000)
    assert (iters.cpu() - it_ref.cpu()).abs().max() <= 10   # the same criterion, checked on the device
    for i in range(2):
        Ci, ai, bi = (x[i].cpu().numpy() for x in (C, a, b))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Q = (ot.sinkhorn(ai, bi, Ci, 0.1, stopThr=1e-13, numItermax=100_000) if tau is None else
                 ot.unbalanced.sinkhorn_unbalanced(ai, bi, Ci, 0.1, tau, reg_type="entropy", stopThr=1e-13,
                                                   numItermax=100_000))
        _close(P[i], torch.from_numpy(Q), 1e-5)


def test_float32():
    C, a, b = _problem(2, 8, 5, False)
    P = ck.sinkhorn(C.float(), a.float(), b.float(), eps=0.1, tau=0.2, max_iter=15, tol=0.0)
    assert P.dtype == torch.float32
    R, _ = sinkhorn_ref(C, a, b, 0.1, 0.2, max_iter=15, tol=0.0)
    _close(P, R, 1e-5)


def test_streams_blocks(monkeypatch):
    """Force 4 x 8 blocks so rows and columns span several blocks (a 192-token pair is 16 x 256)."""
    monkeypatch.setattr(tot, "_MAX_BC", 8)
    monkeypatch.setattr(tot, "_TILE", {torch.float32: 32, torch.float64: 32})
    assert tot._blocks(13, 19, torch.float64) == (4, 8)
    C, a, b = _problem(2, 13, 19, False, scale=10.0)
    P = ck.sinkhorn(C, a, b, eps=0.02, tau=0.5, max_iter=6, tol=0.0)
    R, _ = sinkhorn_ref(C, a, b, 0.02, 0.5, max_iter=6, tol=0.0)
    _close(P, R, 1e-10)


def test_empty_sides_and_cadence():
    C, a, b = _problem(3, 4, 5, False)
    a[1] = 0
    P, iters = ck.sinkhorn(C, a, b, eps=0.5, tau=0.5, check_every=3, tol=1e-6, return_iters=True)
    assert bool((P[1] == 0).all()) and iters[1] == 0
    assert iters[0] % 3 == 0 and iters[2] % 3 == 0 and iters[0] > 0


@pytest.mark.parametrize("eps", [1.0, 0.1])
def test_otpo_default_matches_official_function_triton(eps):
    """The default (official) cost scale through the Triton path against the independent
    re-implementation of the official function, on states with a dominant common direction."""
    pytest.importorskip("ot")
    from otpo_official import anisotropic_states, official_otpo_weights, prompt_masks  # tests/ is on the path

    B, L, D = 3, 12, 16
    h_c, h_r = anisotropic_states(B, L, D, seed=3)
    mc, mr = prompt_masks(B, L, starts=[3, 0, 2], lengths_c=[7, 12, 9], lengths_r=[9, 8, 6])
    w_c, w_r = ck.otpo_weights(h_c.to(DEVICE), h_r.to(DEVICE), mc.to(DEVICE), mr.to(DEVICE), eps=eps, tau=0.2)
    o_c, o_r = official_otpo_weights(h_c, h_r, mc, mr, eps, 0.2)
    torch.testing.assert_close(w_c.double().cpu(), o_c, rtol=0, atol=2e-3)
    torch.testing.assert_close(w_r.double().cpu(), o_r, rtol=0, atol=2e-3)


def test_otpo_weights_triton():
    B, L, D = 2, 8, 4
    h_c, h_r = torch.randn(B, L, D), torch.randn(B, L, D)
    mc = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    mr = torch.tensor([[0] + [1] * 7, [1] * 8], dtype=torch.bool)
    w_c, w_r = ck.otpo_weights(h_c.to(DEVICE), h_r.to(DEVICE), mc.to(DEVICE), mr.to(DEVICE), eps=1.0, tau=0.2)
    with ck.use_backend("torch"):
        r_c, r_r = ck.otpo_weights(h_c, h_r, mc, mr, eps=1.0, tau=0.2)
    torch.testing.assert_close(w_c.cpu(), r_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_r.cpu(), r_r, rtol=1e-4, atol=1e-5)
