"""transformers' experts forward, three implementations in one run: "compass"
(compass_kernels.integrations.transformers), "grouped_mm" (transformers' default) and "eager" (its
per-expert loop). CPU fp32, forward and forward + backward (dx, dW and the routing weights' grad).

Shapes, T=2048 tokens, d=512: Mixtral-like E=8 and E=16, top-2, f=704 (MixtralExperts), and
fine-grained E=128, top-8, f=176 (Qwen3MoeExperts), the same active width k f = 1408. Routing: the
softmax top-k of random logits (uniform load). ``test_ratio_floors`` (last) checks, per pass at E=128,
compass >= 1.0x grouped_mm and >= 3x eager (median times), when timing is on.

    pytest bench/test_hf_bench.py --benchmark-only [--benchmark-json out/hf.json]
COMPASS_BENCH_QUICK=1: tiny shapes (the suite runs, nothing is timed).
"""

from __future__ import annotations

import pytest
import torch

from compass_kernels.benchmarking.models import expert_flops
from quick import QUICK, pick

transformers = pytest.importorskip("transformers", minversion="5")
from compass_kernels.integrations.transformers import register  # noqa: E402

NAME = register()
T, D = pick(2048, 32), pick(512, 16)
SHAPES = {"E8k2": (8, 2, pick(704, 8)), "E16k2": (16, 2, pick(704, 8)), "E128k8": (128, 8, pick(176, 4))}
PROVIDERS = (NAME, "grouped_mm", "eager")
FLOORS = {"grouped_mm": 1.0, "eager": 3.0}         # at E128k8, compass / provider speed
_MEDIANS: dict = {}


def _experts(shape: str):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    E, k, f = SHAPES[shape]
    if E <= 16:
        m = MixtralExperts(transformers.MixtralConfig(hidden_size=D, intermediate_size=f, num_local_experts=E,
                                                      num_experts_per_tok=k))
    else:
        m = Qwen3MoeExperts(transformers.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=f, num_experts=E,
                                                        num_experts_per_tok=k))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(T, D)
    w, ids = torch.randn(T, E).softmax(-1).topk(k)
    return m, x, ids, w / w.sum(-1, keepdim=True)


def _record(benchmark, provider, shape, pass_):
    E, k, f = SHAPES[shape]
    benchmark.group = f"hf_{pass_}-{shape}"
    benchmark.extra_info.update(impl=provider, shape=shape, pass_=pass_, tokens=T,
                                flops=expert_flops(T, D, f, k, training=pass_ == "fwdbwd"))


def _keep(benchmark, provider, shape, pass_):
    if benchmark.stats is not None:
        _MEDIANS[(pass_, shape, provider)] = benchmark.stats.stats.median


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hf_experts_forward(benchmark, provider, shape):
    m, x, ids, w = _experts(shape)
    m.config._experts_implementation = provider
    _record(benchmark, provider, shape, "fwd")
    with torch.no_grad():
        out = benchmark.pedantic(m, args=(x, ids, w), rounds=3, warmup_rounds=1)
        m.config._experts_implementation = "grouped_mm"
        ref = m(x, ids, w)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    _keep(benchmark, provider, shape, "fwd")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hf_experts_forward_backward(benchmark, provider, shape):
    m, x, ids, w = _experts(shape)
    m.config._experts_implementation = provider
    x.requires_grad_()
    w.requires_grad_()
    g = torch.randn(T, D)
    params = list(m.parameters())

    def step():
        return torch.autograd.grad(m(x, ids, w), [x, w, *params], g)

    _record(benchmark, provider, shape, "fwdbwd")
    grads = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert all(torch.isfinite(gr).all() for gr in grads)
    _keep(benchmark, provider, shape, "fwdbwd")


def test_ratio_floors(benchmark):
    """compass vs the others at E=128 (runs after the cases above, in file order; it takes the
    benchmark fixture, unused, so that --benchmark-only runs it)."""
    if QUICK or not _MEDIANS:
        pytest.skip("timing is off (--benchmark-disable or quick mode)")
    ratios, missed = {}, []
    for pass_ in ("fwd", "fwdbwd"):
        for shape in SHAPES:
            mine = _MEDIANS.get((pass_, shape, NAME))
            for other in PROVIDERS[1:]:
                theirs = _MEDIANS.get((pass_, shape, other))
                if mine and theirs:
                    r = ratios[f"{pass_} {shape} vs {other}"] = theirs / mine
                    if shape == "E128k8" and r < FLOORS[other]:
                        missed.append(f"{pass_} {shape} vs {other}: {r:.2f}x < {FLOORS[other]}x")
    print("\n".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    assert not missed, "; ".join(missed)
