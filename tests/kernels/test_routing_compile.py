"""torch.library registration (opcheck) and torch.compile(fullgraph=True) of the routing chain."""

from __future__ import annotations

import pytest
import torch

import compass_kernels as ck
from compass_kernels import routing
from helpers import make_ids


def _plan_args(T=13, k=2, E=8, capacity=None, align=2):
    ids = make_ids(T, k, E, "holes")
    plan = ck.route(ids, E, capacity=capacity, align=align)
    return ids, plan


@pytest.mark.parametrize("T", [0, 13])
def test_opcheck_routing_ops(T):
    ids, plan = _plan_args(T=T)
    x = torch.randn(T, 6, requires_grad=True)
    y = torch.randn(plan.num_rows, 6, requires_grad=True)
    probs = torch.rand(T, 2, requires_grad=True)
    g = torch.randn(T, 6)
    maps = (plan.row_id_map, plan.expert_offsets, plan.tokens_per_expert)
    torch.library.opcheck(routing._route_op.op, (ids, 8, -1, 2))
    torch.library.opcheck(routing._route_op.op, (ids.int(), 8, 3, 4))
    torch.library.opcheck(routing._permute_op.op, (x, *maps, plan.num_rows))
    torch.library.opcheck(routing._unpermute_op.op, (y, *maps, probs))
    torch.library.opcheck(routing._unpermute_op.op, (y, *maps, None))
    torch.library.opcheck(routing._unpermute_bwd_op.op, (g, y.detach(), *maps, probs.detach()))


def _moe_combine(ids, x, probs, w):
    plan = ck.route(ids, w.shape[0], align=4)
    xp, pp = ck.permute(x, plan, probs=probs)
    h = torch.tanh(xp @ w.sum(0)) * pp[:, None]     # a stand-in expert
    return ck.unpermute(h, plan) + ck.unpermute(xp, plan, probs)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_compile_fullgraph_route_permute_unpermute(backend):
    ctx = ck.use_backend(None if backend == "auto" else backend)
    with ctx:
        torch._dynamo.reset()
        compiled = torch.compile(_moe_combine, fullgraph=True, dynamic=True)
        w = torch.randn(8, 12, 12, requires_grad=True)
        for T in (37, 64):                              # a second T must not need a graph break
            ids = make_ids(T, 2, 8, "skewed")
            x = torch.randn(T, 12, requires_grad=True)
            probs = torch.rand(T, 2, requires_grad=True)
            out = compiled(ids, x, probs, w)
            ref = _moe_combine(ids, x, probs, w)
            torch.testing.assert_close(out, ref)
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, (x, probs, w), g)
            want = torch.autograd.grad(ref, (x, probs, w), g)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)


def test_graphs_see_the_custom_ops_and_eager_calls_skip_them(monkeypatch):
    """In eager mode without gradients route / permute / unpermute call their implementations
    directly (_ext.eager, in compass_kernels._opdef); a tracer (make_fx: a dispatch mode), autograd and torch.compile
    go through the custom ops, so graphs hold compass ops and backward still works."""
    from torch.fx.experimental.proxy_tensor import make_fx

    ids, x, probs = make_ids(13, 2, 8, "holes"), torch.randn(13, 6), torch.rand(13, 2)

    def chain(ids, x, probs):
        plan = ck.route(ids, 8, align=2)
        return ck.unpermute(ck.permute(x, plan), plan, probs)

    targets = {str(n.target) for n in make_fx(chain)(ids, x, probs).graph.nodes if n.op == "call_function"}
    assert {"compass.route.default", "compass.permute.default", "compass.unpermute.default"} <= targets, targets

    calls = []
    for name in ("_route_op", "_permute_op", "_unpermute_op"):
        opdef = getattr(routing, name)                              # the custom op behind the eager bypass
        monkeypatch.setattr(opdef, "op", lambda *a, _op=opdef.op, _n=name: calls.append(_n) or _op(*a))
    eager = chain(ids, x, probs)
    assert calls == []                                              # no dispatch in plain eager
    xg = x.clone().requires_grad_(True)
    out = chain(ids, xg, probs)
    assert calls == ["_permute_op", "_unpermute_op"]                # x needs a gradient; the ids never do
    assert torch.equal(out, eager)
    (gx,) = torch.autograd.grad(out.sum(), xg)
    routed = ck.route(ids, 8, align=2).row_id_map >= 0
    torch.testing.assert_close(gx, torch.where(routed, probs, 0.0).sum(1, keepdim=True).expand(13, 6))
