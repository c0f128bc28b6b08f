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
    torch.library.opcheck(routing._route_op, (ids, 8, -1, 2))
    torch.library.opcheck(routing._route_op, (ids.int(), 8, 3, 4))
    torch.library.opcheck(routing._permute_op, (x, *maps, plan.num_rows))
    torch.library.opcheck(routing._unpermute_op, (y, *maps, probs))
    torch.library.opcheck(routing._unpermute_op, (y, *maps, None))
    torch.library.opcheck(routing._unpermute_bwd_op, (g, y.detach(), *maps, probs.detach()))


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
