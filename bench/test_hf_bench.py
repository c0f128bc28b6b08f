"""transformers' experts forward, three implementations in one run: "compass"
(compass_kernels.integrations.transformers), "grouped_mm" (transformers' default) and "eager" (its
per-expert loop). CPU fp32, forward and forward + backward (dx, dW and the routing weights' grad).

Shapes, d=512: Mixtral-like E=8 and E=16, top-2, f=704 (MixtralExperts), and fine-grained E=128,
top-8, f=176 (Qwen3MoeExperts), the same active width k f = 1408, all at T=2048 tokens (a training-size
batch); and the fine-grained experts again at T=256 tokens (a serving-size batch: about 16 rows per
expert). Routing: the softmax top-k of random logits (uniform load). ``test_ratio_floors`` (last)
prints every ratio and checks, per pass and per T at E=128, compass >= 1.0x grouped_mm and >= 3x
eager on medians of an interleaved timing (the three providers alternate, so a shared machine's load
drifts over all of them alike), when timing is on. Every provider runs in this process with the same thread count (bench/conftest.py).

    pytest bench/test_hf_bench.py --benchmark-only [--benchmark-json out/hf.json]
COMPASS_BENCH_QUICK=1: tiny shapes (the suite runs, nothing is timed).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from compass_kernels.benchmarking.models import expert_flops
from compass_kernels.benchmarking.timers import median_times
from quick import QUICK, pick

transformers = pytest.importorskip("transformers", minversion="5")
from compass_kernels.integrations.transformers import register  # noqa: E402

NAME = register()
T, D = pick(2048, 32), pick(512, 16)
T_SERVE = pick(256, 16)
# name -> (experts E, top-k, expert width f, tokens)
SHAPES = {"E8k2": (8, 2, pick(704, 8), T), "E16k2": (16, 2, pick(704, 8), T), "E128k8": (128, 8, pick(176, 4), T),
          "E128k8T256": (128, 8, pick(176, 4), T_SERVE)}
PROVIDERS = (NAME, "grouped_mm", "eager")
FLOORS = {"grouped_mm": 1.0, "eager": 3.0}         # compass / provider speed, at E=128, per T and pass
FLOOR_SHAPES = ("E128k8", "E128k8T256")
ROUNDS = {"fwd": 7, "fwdbwd": 3}                   # interleaved rounds per pass
_MEDIANS: dict = {}


def _experts(shape: str):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    E, k, f, tokens = SHAPES[shape]
    if E <= 16:
        m = MixtralExperts(transformers.MixtralConfig(hidden_size=D, intermediate_size=f, num_local_experts=E,
                                                      num_experts_per_tok=k))
    else:
        m = Qwen3MoeExperts(transformers.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=f, num_experts=E,
                                                        num_experts_per_tok=k))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(tokens, D)
    w, ids = torch.randn(tokens, E).softmax(-1).topk(k)
    return m, x, ids, w / w.sum(-1, keepdim=True)


def _record(benchmark, provider, shape, pass_):
    E, k, f, tokens = SHAPES[shape]
    benchmark.group = f"hf_{pass_}-{shape}"
    benchmark.extra_info.update(impl=provider, shape=shape, pass_=pass_, tokens=tokens,
                                flops=expert_flops(tokens, D, f, k, training=pass_ == "fwdbwd"))


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
    g = torch.randn(x.shape)
    params = list(m.parameters())

    def step():
        return torch.autograd.grad(m(x, ids, w), [x, w, *params], g)

    _record(benchmark, provider, shape, "fwdbwd")
    grads = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert all(torch.isfinite(gr).all() for gr in grads)
    _keep(benchmark, provider, shape, "fwdbwd")


def _step(m, x, ids, w, provider, pass_):
    """One call of the experts under provider: the forward (no grad) or forward + backward."""
    m.config._experts_implementation = provider
    if pass_ == "fwd":
        with torch.no_grad():
            return m(x, ids, w)
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    return torch.autograd.grad(m(xg, ids, wg), [xg, wg, *m.parameters()], torch.ones(x.shape))


def interleaved_medians(shape: str, pass_: str, rounds: int) -> dict:
    """Median seconds per provider, the providers timed interleaved (the harness's median_times),
    so that the load of a shared machine drifts over all of them alike."""
    m, x, ids, w = _experts(shape)
    return median_times({p: functools.partial(_step, m, x, ids, w, p, pass_) for p in PROVIDERS}, rounds)


def test_ratio_floors(benchmark):
    """compass vs the others. Prints the ratios of the cases above (each timed on its own) and
    checks the floors at E=128, per pass and per T (2048 and 256 tokens), on an interleaved timing of
    the three providers; every ratio is printed before any miss fails the test (runs after the cases
    above, in file order; it takes the benchmark fixture, unused, so that --benchmark-only runs it)."""
    if QUICK or not _MEDIANS:
        pytest.skip("timing is off (--benchmark-disable or quick mode)")
    lines = [f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} (at the end)"]
    for pass_ in ("fwd", "fwdbwd"):
        for shape in SHAPES:
            mine = _MEDIANS.get((pass_, shape, NAME))
            for other in PROVIDERS[1:]:
                theirs = _MEDIANS.get((pass_, shape, other))
                if mine and theirs:
                    lines.append(f"{pass_} {shape} vs {other}: {theirs / mine:.2f}x (separate cases)")
    missed = []
    for shape in FLOOR_SHAPES:
        for pass_, rounds in ROUNDS.items():
            med = interleaved_medians(shape, pass_, rounds)
            times = ", ".join(f"{p} {v * 1e3:.1f} ms" for p, v in med.items())
            lines.append(f"{pass_} {shape} interleaved medians: {times}")
            for other, floor in FLOORS.items():
                r = med[other] / med[NAME]
                lines.append(f"{pass_} {shape} vs {other}: {r:.2f}x (interleaved, floor {floor}x)")
                if r < floor:
                    missed.append(f"{pass_} {shape} vs {other}: {r:.2f}x < {floor}x")
    lines.append(f"load average {os.getloadavg()[0]:.1f} (after the interleaved timing)")
    print("\n" + "\n".join(lines))
    assert not missed, "; ".join(missed)
