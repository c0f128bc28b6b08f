"""The MoE layer: kernel path vs a dense loop over experts, backends, T = 0, capacity, router losses,
stats, aux-loss-free bias, NVTX ranges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import compass_kernels as ck
from compass_kernels import ranges
from compass_model import CompassConfig, aux_loss_coefficient
from compass_model.moe import MoE, load_balancing_loss, router_stats, router_z_loss
from helpers import cpu_backends


def make_moe(dtype=torch.float64, **kw) -> MoE:
    cfg = CompassConfig(**{**dict(d_model=24, num_experts=8, top_k=2, expert_ffn_dim=20), **kw})
    m = MoE(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0, 0.3)
    return m.to(dtype) if dtype != torch.float32 else m


def dense_moe_ref(m: MoE, x_TD: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """A plain loop over experts (no compass_kernels): top-k of the fp32 softmax, gates renormalised
    over k, per expert the first ``capacity`` (token, slot) pairs in (t, j) order."""
    logits = x_TD.float() @ m.router.weight.float().t()
    scores = logits.softmax(-1)
    ids = (scores + m.router.bias if m.router.bias_rate > 0 else scores).topk(m.top_k, dim=-1).indices
    gates = scores.gather(-1, ids)
    gates = gates / gates.sum(-1, keepdim=True)
    out = torch.zeros_like(x_TD)
    Fd = m.w2_EFD.shape[1]
    for e in range(m.num_experts):
        pairs = (ids == e).nonzero()                       # row-major: (t, j) order
        if capacity is not None:
            pairs = pairs[:capacity]
        for t, j in pairs.tolist():
            h = x_TD[t] @ m.w13_EDF[e]
            y = (F.silu(h[:Fd]) * h[Fd:]) @ m.w2_EFD[e]
            out[t] = out[t] + gates[t, j].to(x_TD.dtype) * y
    if m.shared is not None:
        out = out + m.shared(x_TD)
    return out


@pytest.mark.parametrize("T", [0, 1, 37])
@pytest.mark.parametrize("shared", [0, 16])
def test_kernel_moe_equals_dense_loop(T, shared):
    m = make_moe(shared_expert_dim=shared)
    x = torch.randn(T, 24, dtype=torch.float64, requires_grad=True)
    out, router = m(x)
    ref = dense_moe_ref(m, x)
    # float64 experts: only summation order differs
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [x, m.w13_EDF, m.w2_EFD, m.router.weight]
    got = torch.autograd.grad((out * g).sum(), params)
    # the reference has no graph at T = 0 (a loop over nothing): expect zero gradients
    want = (torch.autograd.grad((ref * g).sum(), params) if T else [torch.zeros_like(p) for p in params])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)   # router grads go through fp32 gates
    assert torch.isfinite(router["aux"]) and torch.isfinite(router["z"])


def test_capacity_drops_in_training_only():
    m = make_moe(capacity_factor=0.5)
    x = torch.randn(40, 24, dtype=torch.float64)
    cap = m.capacity(40)
    assert cap == math.ceil(0.5 * 40 * 2 / 8) == 5
    out, router = m(x)
    torch.testing.assert_close(out, dense_moe_ref(m, x, capacity=cap), rtol=1e-12, atol=1e-12)
    assert router["stats"]["dropped"] > 0.4                 # half the capacity: at least half dropped
    m.eval()
    out, router = m(x)
    assert router["stats"]["dropped"] == 0
    torch.testing.assert_close(out, dense_moe_ref(m, x), rtol=1e-12, atol=1e-12)


def test_all_tokens_to_one_expert():
    m = make_moe()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[3] = 5.0
        m.router.weight[5] = 4.0
    x = torch.rand(16, 24, dtype=torch.float64) + 0.5            # positive: experts 3 and 5 always win
    out, router = m(x)
    torch.testing.assert_close(out, dense_moe_ref(m, x), rtol=1e-12, atol=1e-12)
    stats = router["stats"]
    assert stats["dead"] == 6 and stats["max_load"] == 0.5
    assert stats["entropy"] == pytest.approx(math.log(2) / math.log(8))


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="compass_kernels._cpu not built")
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_backend_torch_vs_cpu(capacity_factor):
    m = make_moe(dtype=torch.float32, shared_expert_dim=8, capacity_factor=capacity_factor)
    x = torch.randn(2, 29, 24)
    g = torch.randn(2, 29, 24)
    results = {}
    for backend in ("torch", "cpu"):
        with ck.use_backend(backend):
            xb = x.clone().requires_grad_()
            out, router = m(xb)
            grads = torch.autograd.grad((out * g).sum(), [xb, *m.parameters()])
            results[backend] = (out, router["aux"], router["z"], *grads)
    # Routing is exact, but the cpu grouped GEMM batches small groups into bmm calls while the
    # reference loops torch.mm per expert, so BLAS blocks the sums differently: fp32 rounding
    # (~2e-7 seen in the forward, ~1e-6 in the backward) is allowed.
    for a, b in zip(results["torch"], results["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_aux_and_z_losses_on_known_logits():
    # D = E and an identity router: the logits are x itself.
    m = make_moe(dtype=torch.float32, d_model=4, n_heads=2, n_kv_heads=1, num_experts=4, top_k=2)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(4))
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5], [1.0, 1.5, 2.5, 0.0]])
    _, router = m(logits)
    T, E = 3, 4
    counts = [0] * E
    for row in logits.tolist():
        for e in sorted(range(E), key=lambda i: -row[i])[:2]:
            counts[e] += 1
    P = [sum(math.exp(r[i]) / sum(math.exp(v) for v in r) for r in logits.tolist()) / T for i in range(E)]
    aux = E * sum(counts[i] / (T * 2) * P[i] for i in range(E))
    z = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in logits.tolist()) / T
    assert router["aux"].item() == pytest.approx(aux, rel=1e-6)
    assert router["z"].item() == pytest.approx(z, rel=1e-6)
    # uniform router probabilities and balanced assignments: aux at its minimum 1; zero logits: z = ln(E)^2
    scores = torch.full((8, 4), 0.25)
    assert load_balancing_loss(scores, torch.full((4,), 4.0)).item() == pytest.approx(1.0)
    assert router_z_loss(torch.zeros(8, 4)).item() == pytest.approx(math.log(4) ** 2)


def test_router_stats_and_empty_batch():
    s = router_stats(torch.full((8,), 5.0), torch.full((8,), 5.0))
    assert s["entropy"] == pytest.approx(1.0) and s["max_vio"] == 0 and s["dead"] == 0 and s["dropped"] == 0
    s = router_stats(torch.tensor([10.0, 0, 0, 0]), torch.tensor([6.0, 0, 0, 0]))
    assert s["entropy"] == 0 and s["max_vio"] == 3 and s["dead"] == 3 and s["max_load"] == 1
    assert s["dropped"] == pytest.approx(0.4)
    m = make_moe(dtype=torch.float32)
    x = torch.randn(0, 24, requires_grad=True)
    out, router = m(x)
    assert out.shape == (0, 24) and router["aux"] == 0 and router["z"] == 0
    (out.sum() + router["aux"] + router["z"]).backward()
    assert x.grad.shape == (0, 24)


def test_router_is_fp32_in_bf16():
    m = make_moe(dtype=torch.bfloat16)
    m.router.float()                        # CompassForCausalLM keeps it fp32; here by hand
    logits, scores, ids, gates = m.router(torch.randn(5, 24, dtype=torch.bfloat16))
    assert logits.dtype == scores.dtype == gates.dtype == torch.float32
    torch.testing.assert_close(gates.sum(-1), torch.ones(5))
    out, _ = m(torch.randn(5, 24, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_aux_loss_free_bias():
    m = make_moe(dtype=torch.float32, router_bias_rate=1e-3)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 1.0
        m.router.weight[1] = 0.9
    x = torch.rand(20, 24) + 0.1             # experts 0 and 1 take everything
    out, r = m(x)
    m.router.update_bias()
    b = m.router.bias
    assert b[0] == b[1] == pytest.approx(-1e-3) and (b[2:] == pytest.approx(1e-3))
    assert (m.router.load == 0).all()
    # the bias moves selection only: gates still come from the unbiased softmax
    with torch.no_grad():
        m.router.bias.copy_(torch.tensor([-1.0, -1.0, 1, 1, 0, 0, 0, 0]))
    logits, scores, ids, gates = m.router(x)
    assert set(ids.flatten().tolist()) == {2, 3}
    torch.testing.assert_close(gates, scores[:, 2:4] / scores[:, 2:4].sum(-1, keepdim=True))


@pytest.mark.parametrize("decay,steps,expected", [
    ("none", [0, 500, 5000], [1e-2, 1e-2, 1e-2]),
    ("linear", [0, 500, 1000, 2000], [1e-2, 5.5e-3, 1e-3, 1e-3]),
    ("cosine", [0, 500, 1000, 3000], [1e-2, 5.5e-3, 1e-3, 1e-3]),
    ("exp", [0, 1000, 2000], [1e-2, 5.5e-3, 3.25e-3]),
])
def test_aux_coefficient_schedule(decay, steps, expected):
    cfg = CompassConfig(aux_loss_coef=1e-2, aux_loss_min_coef=1e-3, aux_loss_decay=decay,
                        aux_loss_decay_steps=0 if decay == "none" else 1000)
    got = [aux_loss_coefficient(cfg, torch.tensor(s)).item() for s in steps]
    assert got == pytest.approx(expected, rel=1e-6)


def test_aux_coefficient_floor_never_exceeds_the_coefficient():
    """aux_loss_coef = 0 switches the term off even under a preset's decay floor (tiny: 0.03)."""
    off = CompassConfig.from_preset("tiny", aux_loss_coef=0.0)
    assert off.aux_loss_min_coef > 0
    assert [aux_loss_coefficient(off, torch.tensor(s)).item() for s in (0, 1000, 10_000)] == [0.0, 0.0, 0.0]


def test_nvtx_ranges(monkeypatch):
    names = []

    class _Range:
        def __init__(self, name, **kw):
            names.append(name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(ranges.nvtx, "annotate", _Range)
    make_moe(dtype=torch.float32)(torch.randn(6, 24))
    assert names == ["router", "permute", "expert_fc1", "activation", "expert_fc2", "unpermute"]
