"""route + permute + unpermute on CPU fp32 against the Megatron-style path and a copy ceiling.

Shapes: Compass-v3 (E=16, k=2) and fine-grained (E=128, k=8), T=8192 tokens, H=2048; uniform and
skewed (Zipf 1.5) routing. Peers, inputs and byte counts come from compass_kernels.benchmarking.
COMPASS_BENCH_QUICK=1: tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

import compass_kernels as ck
from compass_kernels.benchmarking.inputs import topk_ids
from compass_kernels.benchmarking.models import copy_bytes, permute_bytes, routing_bytes, unpermute_bytes
from compass_kernels.benchmarking.peers import megatron_moe_routing
from quick import pick

T, H = pick(8192, 64), pick(2048, 32)
SHAPES = {"E16k2": (16, 2), "E128k8": (128, 8)}


def _inputs(shape, kind, grad=False):
    E, k = SHAPES[shape]
    x = torch.randn(T, H, requires_grad=grad)
    probs = torch.softmax(torch.randn(T, k), -1).requires_grad_(grad)
    return x, topk_ids(T, k, E, kind).contiguous(), probs, E, k


def compass_moe_routing(x, topk_ids, probs, num_experts):
    plan = ck.route(topk_ids, num_experts)
    return ck.unpermute(ck.permute(x, plan), plan, probs)


IMPLS = {"compass": compass_moe_routing, "megatron": megatron_moe_routing}


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, impl, shape, kind):
    x, ids, probs, E, k = _inputs(shape, kind)
    fn = IMPLS[impl]
    benchmark.group = f"fwd-{shape}-{kind}"
    benchmark.extra_info.update(bytes=routing_bytes(T, H, k, 4, num_experts=E), impl=impl, shape=shape, kind=kind,
                                pass_="fwd")
    # Three warm-up rounds: the heap takes a few calls to settle into reusing the freed 64-128 MiB
    # buffers (until then each round pays page faults, 7 -> 19-32 ms here), for every impl alike.
    out = benchmark.pedantic(fn, args=(x, ids, probs, E), rounds=5, warmup_rounds=3)
    torch.testing.assert_close(out, megatron_moe_routing(x, ids, probs, E), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, impl, shape, kind):
    x, ids, probs, E, k = _inputs(shape, kind, grad=True)
    fn = IMPLS[impl]
    g = torch.randn(T, H)

    def step():
        out = fn(x, ids, probs, E)
        return torch.autograd.grad(out, (x, probs), g)

    benchmark.group = f"fwdbwd-{shape}-{kind}"
    benchmark.extra_info.update(bytes=routing_bytes(T, H, k, 4, num_experts=E, backward=True), impl=impl,
                                shape=shape, kind=kind, pass_="fwdbwd")
    benchmark.pedantic(step, rounds=3, warmup_rounds=2)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", ["permute", "unpermute"])
def test_op_vs_copy_ceiling(benchmark, op, shape):
    """Each op alone, with the plan precomputed, next to a copy of the same bytes (the ceiling)."""
    x, ids, probs, E, k = _inputs(shape, "uniform")
    plan = ck.route(ids, E)
    y = ck.permute(x, plan)
    fn = (lambda: ck.permute(x, plan)) if op == "permute" else (lambda: ck.unpermute(y, plan, probs))
    benchmark.group = f"op-{shape}"
    nbytes = (permute_bytes if op == "permute" else unpermute_bytes)(T, H, k, 4)
    benchmark.extra_info.update(bytes=nbytes, impl=op, shape=shape, kind="uniform", pass_="op")
    benchmark.pedantic(fn, rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_copy_ceiling(benchmark, shape):
    E, k = SHAPES[shape]
    n = (T + T * k) * H // 2                                        # the activations permute moves
    src, dst = torch.randn(n), torch.empty(n)
    benchmark.group = f"op-{shape}"
    benchmark.extra_info.update(bytes=copy_bytes(n, 4), impl="copy", shape=shape, kind="uniform", pass_="op")
    benchmark.pedantic(dst.copy_, args=(src,), rounds=7, warmup_rounds=1)
