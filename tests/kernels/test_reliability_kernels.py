"""Bad or unusual input never gives a silent wrong answer: 16-bit rounding in the grouped GEMM's
gradients, strides the kernels cannot take directly, NaN through the OT solvers, value checks under
ordinary modes, unconverged Sinkhorn, hand-built routing plans, meta tensors and higher-order
gradients. Every backend that serves CPU tensors here runs (triton under TRITON_INTERPRET=1)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import compass_kernels as ck
from compass_kernels import ot as ck_ot
from compass_kernels.grouped_gemm_ref import grouped_gemm_ref, grouped_gemm_wgrad_ref
from compass_kernels.ot_ref import sinkhorn_residual
from helpers import cpu_backends

BACKENDS = cpu_backends()
NAN = float("nan")


def _offsets(sizes, start=0):
    return torch.tensor([start] + sizes, dtype=torch.int64).cumsum(0)


def _gemm_backends(dtype):
    # The Triton interpreter's tl.dot is unreliable with bf16 operands: triton runs fp16 only here.
    return [b for b in BACKENDS if not (b == "triton" and dtype == torch.bfloat16)]


# ---------------------------------------------------------------------------------------------
# grouped GEMM: 16-bit outputs sum in fp32 and round once, forward, dgrad and wgrad


@pytest.mark.parametrize("dtype,step", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)], ids=["bf16", "fp16"])
def test_wgrad_of_unequal_groups_rounds_once(dtype, step):
    """Group 1's first four rows sum to 4 + step, which 16 bits round to 4; the exact dw is [4, step]."""
    x = torch.tensor([1, 1, 1, 1, 1 + step, 1, 1, 1, -1, -1, -1, -1], dtype=dtype)[:, None]
    offsets = torch.tensor([0, 4, 12])
    for backend in _gemm_backends(dtype):
        with ck.use_backend(backend):
            w = torch.zeros(2, 1, 1, dtype=dtype, requires_grad=True)
            y = ck.grouped_gemm(x, w, offsets)
            y.backward(torch.ones_like(y))
        assert w.grad.flatten().tolist() == [4.0, step], backend


def _exact_inputs(M, K, N, E, dtype, trans_b):
    """Values whose products and sums are exact in fp32 but not in 16 bits: multiples of 1/64 below
    2^13 (19 bits), big terms that cancel and small ones that survive. Any fp32 accumulation order
    gives the same sum, so a backend that rounds once equals the reference bit for bit; one that
    rounds a partial sum to 16 bits (256 + 1/64 needs 15) does not."""
    pick = torch.tensor([16.0, -16.0, 1.0, -1.0, 1 / 8, -3 / 8, 5 / 8, 0.0])

    def draw(*shape):
        return pick[torch.randint(0, len(pick), shape)].to(dtype)

    return draw(M, K), draw(*((E, N, K) if trans_b else (E, K, N))), draw(M, N)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grouped_gemm_16bit_forward_dgrad_wgrad_round_once(dtype, trans_b):
    # unequal neighbours (pairs), equal runs, an empty group, rows outside the groups
    sizes = [3, 11, 0, 6, 6, 6, 2, 13, 1]
    offsets = _offsets(sizes, start=2)
    M, K, N, E = int(offsets[-1]) + 3, 24, 8, len(sizes)
    x, w, dy = _exact_inputs(M, K, N, E, dtype, trans_b)
    want_y = grouped_gemm_ref(x, w, offsets, trans_b)
    want_dx = grouped_gemm_ref(dy, w, offsets, not trans_b)
    want_dw = grouped_gemm_wgrad_ref(x, dy, offsets, E, trans_b)
    for backend in _gemm_backends(dtype):
        with ck.use_backend(backend):
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = ck.grouped_gemm(xg, wg, offsets, trans_b=trans_b)
            y.backward(dy)
        assert torch.equal(y, want_y), backend
        assert torch.equal(xg.grad, want_dx), backend
        assert torch.equal(wg.grad, want_dw), backend


# ---------------------------------------------------------------------------------------------
# routing: any strides (stride-0 gradients, expanded inputs, width 1)


def _plan():
    ids = torch.tensor([[0, 2], [2, -1], [1, 2], [2, 0], [1, 1]])
    return ck.route(ids, 3, capacity=3, align=2)  # a dropped slot, an unrouted one, padding rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_probs_backward_through_sum(backend):
    plan = _plan()
    x = torch.randn(plan.num_tokens, 4, requires_grad=True)
    probs = torch.rand(plan.num_tokens, plan.topk, requires_grad=True)
    with ck.use_backend(backend):
        xp, pp = ck.permute(x, plan, probs=probs)
        (xp.sum() + pp.sum()).backward()  # both gradients arrive expanded: stride 0
    routed = (plan.row_id_map >= 0).float()
    assert torch.equal(probs.grad, routed)
    assert torch.equal(x.grad, routed.sum(1, keepdim=True).expand(-1, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_width_one_and_expanded_inputs(backend):
    plan = _plan()
    T, k, R = plan.num_tokens, plan.topk, plan.num_rows
    cases = {
        "x width 1": (lambda x: ck.permute(x, plan), [torch.randn(T, 1)]),
        "probs alone": (lambda x, p: ck.permute(x, plan, probs=p)[1], [torch.randn(T, 3), torch.rand(T, k)]),
        "y width 1": (lambda y, p: ck.unpermute(y, plan, p), [torch.randn(R, 1), torch.rand(T, k)]),
        "x expanded": (lambda x: ck.permute(x, plan), [torch.randn(1, 5).expand(T, 5)]),
        "y expanded": (lambda y: ck.unpermute(y, plan), [torch.randn(1, 5).expand(R, 5)]),
        "y, probs expanded": (lambda y, p: ck.unpermute(y, plan, p),
                              [torch.randn(1, 5).expand(R, 5), torch.rand(1, k).expand(T, k)]),
    }

    def run(name, f, inputs, grad):
        leaves = [t.detach().requires_grad_(grad) for t in inputs]
        out = f(*leaves)
        if grad:
            out.sum().backward()  # the output gradient arrives expanded (stride 0)
        return [out.detach()] + [t.grad for t in leaves if grad]

    for name, (f, inputs) in cases.items():
        for grad in (False, True):  # the direct eager call, then the custom op with autograd
            with ck.use_backend("torch"):
                want = run(name, f, inputs, grad)
            with ck.use_backend(backend):
                got = run(name, f, inputs, grad)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=f"{name}, grad={grad}")


# ---------------------------------------------------------------------------------------------
# optimal transport: NaN in, NaN out, on every backend


def _ot_problem():
    C = torch.rand(3, 4, 5)
    a = torch.full((3, 4), 0.25)
    b = torch.full((3, 5), 0.2)
    a[2, 3] = 0.0  # a zero-mass row in pair 2
    a[2] /= a[2].sum()
    return C, a, b


@pytest.mark.parametrize("tau", [None, 0.5])
def test_sinkhorn_nan_and_neg_inf_costs_give_nan_plans(tau):
    C, a, b = _ot_problem()
    C[0, 1, 2] = NAN
    C[1, 0, 0] = float("-inf")
    C[2, 3, 1] = NAN  # on pair 2's zero-mass row: never read, the plan stays finite
    C[2, 0, 4] = float("inf")  # +inf forbids transport; allowed
    clean = C.clone()
    clean[2, 3, 1] = 0.0
    plans = {}
    for backend in BACKENDS:
        with ck.use_backend(backend):
            # a fixed iteration count (tol = 0): every backend runs the same iterates, and the
            # interpreted Triton kernel stays quick
            P, iters = ck.sinkhorn(C, a, b, eps=0.1, tau=tau, max_iter=30, tol=0.0, return_iters=True)
            P2 = ck.sinkhorn(clean, a, b, eps=0.1, tau=tau, max_iter=30, tol=0.0)
        assert P[:2].isnan().all(), backend
        assert iters.tolist() == [0, 0, 30], backend
        assert P[2].isfinite().all() and P[2, 0, 4] == 0 and P[2, 3].eq(0).all(), backend
        torch.testing.assert_close(P[2], P2[2], rtol=0, atol=0)
        plans[backend] = P[2]
    for backend, P in plans.items():
        torch.testing.assert_close(P, plans["torch"], rtol=1e-4, atol=1e-6, msg=backend)


def test_sinkhorn_unchecked_bad_masses_give_nan_plans():
    """Masses the public function cannot check (GPU without COMPASS_CHECK, tracing) reach the op."""
    C, a, b = _ot_problem()
    a[0, 0] = -0.25
    b[1, 1] = NAN
    a[2, 0] = float("inf")
    for backend in BACKENDS:
        with ck.use_backend(backend):
            P, iters = ck_ot._sinkhorn_op(C, a, b, 0.1, None, 20, 1e-6, 10)
        assert P.isnan().all() and iters.eq(0).all(), backend


def test_otpo_weights_nonfinite_hidden_states_give_nan_weights():
    h_c, h_r = torch.randn(3, 6, 8), torch.randn(3, 6, 8)
    m_c = torch.tensor([[1, 1, 1, 1, 0, 0]] * 3, dtype=torch.bool)
    m_r = torch.tensor([[1, 1, 1, 1, 1, 0]] * 3, dtype=torch.bool)
    h_c[0, 1, 3] = NAN
    h_r[1, 2, 0] = float("-inf")
    h_c[2, 5, 0] = NAN  # padding: ignored
    results = {}
    for backend in BACKENDS:
        with ck.use_backend(backend):
            w_c, w_r = ck.otpo_weights(h_c, h_r, m_c, m_r)
        for w, m in ((w_c, m_c), (w_r, m_r)):
            assert w[:2][m[:2]].isnan().all() and w[:2][~m[:2]].eq(0).all(), backend
            assert w[2].isfinite().all(), backend
        results[backend] = (w_c[2], w_r[2])
    for backend, (w_c, w_r) in results.items():
        torch.testing.assert_close(w_c, results["torch"][0], rtol=1e-4, atol=1e-5, msg=backend)
        torch.testing.assert_close(w_r, results["torch"][1], rtol=1e-4, atol=1e-5, msg=backend)


# ---------------------------------------------------------------------------------------------
# value checks: skipped only by tracers, not by ordinary modes


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [lambda: torch.device("cpu"), _PassThrough], ids=["torch.device", "dispatch mode"])
def test_value_checks_run_under_ordinary_modes(mode):
    x, w = torch.randn(4, 2), torch.randn(2, 2, 2)
    C, a, b = _ot_problem()
    with mode():
        with pytest.raises(ValueError, match=r"offsets must lie in \[0, M\]"):
            ck.grouped_gemm(x, w, torch.tensor([0, 2, 9]))
        with pytest.raises(ValueError, match="offsets must be non-decreasing"):
            ck.grouped_gemm(x, w, torch.tensor([0, 3, 2]))
        with pytest.raises(ValueError, match="a must hold finite non-negative masses"):
            ck.sinkhorn(C, -a, b, eps=0.1)
        with pytest.raises(ValueError, match="equal mass"):
            ck.sinkhorn(C, a, 2 * b, eps=0.1)
        with ck.use_backend("torch"), pytest.raises(ValueError, match="topk_ids must hold values"):
            ck.route(torch.tensor([[0, 5]]), 3)
        with pytest.raises(ValueError, match="split_sizes must be >= 0"):
            ck.sort_chunks(torch.randn(3, 2), torch.tensor([4, -1]), torch.tensor([1, 0]))


def test_tracers_still_skip_value_checks():
    x, w, offsets = torch.randn(6, 4), torch.randn(2, 4, 3), torch.tensor([0, 2, 5])
    C, a, b = _ot_problem()

    def f(x, w, offsets, C, a, b):
        return ck.grouped_gemm(x, w, offsets), ck.sinkhorn(C, a, b, eps=0.1, max_iter=20, tol=0.0)

    want = f(x, w, offsets, C, a, b)
    for kwargs in ({}, {"tracing_mode": "fake"}, {"pre_dispatch": True}):
        gm = make_fx(f, **kwargs)(x, w, offsets, C, a, b)
        for got, ref in zip(gm(x, w, offsets, C, a, b), want):
            torch.testing.assert_close(got, ref)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.device("cpu"):  # a mode outside the compiled region changes nothing inside it
        for got, ref in zip(compiled(x, w, offsets, C, a, b), want):
            torch.testing.assert_close(got, ref)


# ---------------------------------------------------------------------------------------------
# sinkhorn convergence warning


@pytest.mark.parametrize("tau", [None, 1.0])
def test_unconverged_sinkhorn_warns_once_with_the_residual(tau):
    C = torch.rand(2, 8, 8, dtype=torch.float64) * 100
    a = torch.full((2, 8), 1 / 8, dtype=torch.float64)
    for backend in BACKENDS:
        with ck.use_backend(backend), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            P, iters = ck.sinkhorn(C, a, a, eps=0.01, tau=tau, max_iter=30, return_iters=True)
            ck.sinkhorn(C, a, a, eps=0.01, tau=tau, max_iter=30, tol=0.0)  # fixed iteration count: silent
            ck.sinkhorn(C / 100, a, a, eps=1.0, tau=tau)  # converges: silent
        msgs = [str(w.message) for w in caught if "sinkhorn" in str(w.message)]  # not numpy's (interpreter)
        assert len(msgs) == 1, (backend, msgs)
        res = sinkhorn_residual(P, C, a, a, 0.01, tau).max().item()
        assert iters.eq(30).all() and res > 1e-6
        assert "did not converge" in msgs[0] and f"residual {res:.3g}" in msgs[0], (backend, msgs[0])
        if tau is None:
            assert "row marginals off by up to" in msgs[0]


@pytest.mark.parametrize("tau", [None, 0.5])
def test_residual_is_small_at_convergence_and_large_before(tau):
    C = torch.rand(2, 6, 7, dtype=torch.float64)
    a, b = torch.rand(2, 6, dtype=torch.float64) + 0.1, torch.rand(2, 7, dtype=torch.float64) + 0.1
    if tau is None:
        b = b / b.sum(-1, keepdim=True) * a.sum(-1, keepdim=True)
    with ck.use_backend("torch"):
        done = ck.sinkhorn(C, a, b, eps=0.1, tau=tau, max_iter=10_000, tol=1e-10)
        early = ck.sinkhorn(C, a, b, eps=0.1, tau=tau, max_iter=3, tol=0.0)
    assert sinkhorn_residual(done, C, a, b, 0.1, tau).max() < 1e-8
    assert sinkhorn_residual(early, C, a, b, 0.1, tau).min() > 1e-4


# ---------------------------------------------------------------------------------------------
# hand-built routing plans


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_built_plan_with_non_contiguous_row_id_map(backend):
    with ck.use_backend(backend):
        plan = _plan()
        rim = plan.row_id_map.t().contiguous().t()  # same values, column-major
        assert not rim.is_contiguous()
        odd = dataclasses.replace(plan, row_id_map=rim)
        x = torch.randn(plan.num_tokens, 3)
        y = torch.randn(plan.num_rows, 3)
        probs = torch.rand(plan.num_tokens, plan.topk)
        assert torch.equal(ck.permute(x, odd), ck.permute(x, plan))
        assert torch.equal(ck.unpermute(y, odd, probs), ck.unpermute(y, plan, probs))


def test_hand_built_plan_bad_fields_name_the_field():
    plan = _plan()
    with pytest.raises(TypeError, match="RoutingPlan.row_id_map must be an int64 tensor"):
        dataclasses.replace(plan, row_id_map=plan.row_id_map.int())
    with pytest.raises(ValueError, match=r"RoutingPlan.expert_offsets must have shape \[4\]"):
        dataclasses.replace(plan, expert_offsets=plan.expert_offsets[:-1])
    with pytest.raises(ValueError, match=r"RoutingPlan.row_id_map must have shape \[5, 3\].*got \[5, 2\]"):
        dataclasses.replace(plan, topk=3)


# ---------------------------------------------------------------------------------------------
# meta tensors, double backward, torch.func


def test_meta_pipeline_and_its_backward():
    ids = torch.empty(6, 2, dtype=torch.int64, device="meta")
    plan = ck.route(ids, 4, align=8)
    assert plan.row_id_map.device.type == "meta" and plan.expert_offsets.shape == (5,)
    x = torch.empty(6, 16, device="meta", requires_grad=True)
    probs = torch.empty(6, 2, device="meta", requires_grad=True)
    w = torch.empty(4, 32, 16, device="meta", requires_grad=True)
    xp, pp = ck.permute(x, plan, probs=probs)
    h = ck.grouped_gemm(xp, w, plan.expert_offsets, trans_b=True)
    out = ck.unpermute(h, plan, probs)
    assert out.shape == (6, 32) and out.device.type == "meta"
    (out.sum() + pp.sum()).backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and probs.grad.shape == probs.shape


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # fp64: not in the interpreter
def test_double_backward(backend):
    offsets = torch.tensor([1, 3, 3, 6])
    plan = ck.route(torch.tensor([[0, 1], [1, -1], [2, 0], [1, 2]]), 3, align=2)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    with ck.use_backend(backend):
        for trans_b in (False, True):
            x, w = torch.randn(7, 4, **f64), torch.randn(3, *((5, 4) if trans_b else (4, 5)), **f64)
            assert torch.autograd.gradgradcheck(lambda x, w: ck.grouped_gemm(x, w, offsets, trans_b=trans_b), (x, w))
        x, y, p = torch.randn(4, 3, **f64), torch.randn(plan.num_rows, 3, **f64), torch.rand(4, 2, **f64)
        assert torch.autograd.gradgradcheck(lambda y, p: ck.unpermute(y, plan, p), (y, p))
        assert torch.autograd.gradgradcheck(lambda x, p: ck.permute(x, plan, probs=p), (x, p))


def test_func_grad_names_the_op_and_vmap_still_works():
    plan = _plan()
    w, offsets = torch.randn(2, 4, 4), torch.tensor([0, 1, 3])
    cases = {
        "grouped_gemm": (lambda x: ck.grouped_gemm(x, w, offsets).sum(), torch.randn(3, 4)),
        "permute": (lambda x: ck.permute(x, plan).sum(), torch.randn(plan.num_tokens, 4)),
        "unpermute": (lambda y: ck.unpermute(y, plan).sum(), torch.randn(plan.num_rows, 4)),
    }
    for op, (f, arg) in cases.items():
        with pytest.raises(NotImplementedError, match=rf"compass_kernels.{op} cannot be differentiated by torch.func"):
            torch.func.grad(f)(arg)
    ys = torch.randn(2, plan.num_rows, 4)
    got = torch.func.vmap(lambda y: ck.unpermute(y, plan))(ys)
    assert torch.equal(got, torch.stack([ck.unpermute(y, plan) for y in ys]))
