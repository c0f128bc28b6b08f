"""The whole MoE layer (compass_model.moe.MoE), forward and forward + backward, on CPU fp32.

On a quiet machine (2 threads, GLIBC_TUNABLES of bench/run_cpu.sh) compass and the naive loop tie at
E=16 (both ~170 GFLOP/s: the expert GEMMs are ~90% of the layer on CPU) and compass is ~1.3x faster
at E=128 (fwd 60-64 vs 79-86 ms; fwd+bwd 177-196 vs 227-237 ms).

Providers: ``compass`` (backends chosen automatically: the C++/OpenMP kernels when built),
``compass_torch`` (the same layer on the pure-PyTorch reference backend) and ``naive`` (the HF-style
loop over experts, compass_kernels.benchmarking.peers.naive_moe). Shapes: Compass-v3 (E=16, k=2, f=704) and fine-grained
(E=128, k=8, f=176) at the same active width k f = 1408, T=2048 tokens, d=512: 8.9 GFLOP a
forward, cut to fit the 2-core machine (the suite: ~20 s when the machine is otherwise idle; minutes
when other jobs share its 2 cores). Routing comes from the layer's own fp32 router: ``uniform`` as
initialised; ``skewed`` with router row e scaled by 1/(e+1), so low-numbered experts' logits vary
more and win top-k more often (E=16: the top expert takes ~21% of
the assignments against 6% uniform; E=128: ~7x uniform, ~half the experts nearly idle).
extra_info: FLOPs (moe_layer_flops, the model's cost-model convention) and the dispatch bytes (routing_bytes:
route + permute + unpermute, and their backward in fwd+bwd) from compass_kernels.benchmarking.models, and the
measured max expert load. COMPASS_BENCH_QUICK=1: tiny shapes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import compass_kernels as ck
from compass_kernels.benchmarking.models import moe_layer_flops, routing_bytes
from compass_kernels.benchmarking.peers import naive_moe
from compass_model.config import CompassConfig
from compass_model.moe import MoE
from quick import pick

T, D = pick(2048, 64), pick(512, 32)
SHAPES = {"E16k2": (16, 2, pick(704, 16)), "E128k8": (128, 8, pick(176, 4))}
PROVIDERS = ("compass", "compass_torch", "naive")


def _layer(shape: str, kind: str):
    E, k, f = SHAPES[shape]
    cfg = CompassConfig(d_model=D, n_heads=1, n_kv_heads=1, num_experts=E, top_k=k, expert_ffn_dim=f)
    layer = MoE(cfg)
    if kind == "skewed":
        with torch.no_grad():
            scale_E = 1.0 / torch.arange(1, E + 1, dtype=torch.float32)
            layer.router.weight.mul_((scale_E / scale_E.mean())[:, None])
    return cfg, layer


def _fn(provider: str, layer):
    if provider == "naive":
        return lambda x: naive_moe(layer, x)
    return lambda x: layer(x)[0]


def _backend(provider: str):
    return ck.use_backend("torch") if provider == "compass_torch" else contextlib.nullcontext()


def _record(benchmark, cfg, layer, x, provider, shape, kind, pass_):
    with torch.no_grad():
        ids_TK = layer.router(x)[2]
    load_E = torch.bincount(ids_TK.flatten(), minlength=cfg.num_experts).float() / ids_TK.numel()
    training = pass_ == "moe_fwdbwd"
    benchmark.group = f"{pass_}-{shape}-{kind}"
    benchmark.extra_info.update(
        impl=provider, shape=shape, kind=kind, pass_=pass_, tokens=T,
        flops=moe_layer_flops(cfg, T, training=training),
        bytes=routing_bytes(T, D, cfg.top_k, x.element_size(), num_experts=cfg.num_experts, backward=training),
        max_load=float(load_E.max()),
    )


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_moe_forward(benchmark, provider, shape, kind):
    cfg, layer = _layer(shape, kind)
    layer.eval()
    x = torch.randn(T, D)
    fn = _fn(provider, layer)
    _record(benchmark, cfg, layer, x, provider, shape, kind, "moe_fwd")
    with torch.no_grad(), _backend(provider):
        out = benchmark.pedantic(fn, args=(x,), rounds=3, warmup_rounds=1)
        ref = naive_moe(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_moe_forward_backward(benchmark, provider, shape, kind):
    cfg, layer = _layer(shape, kind)
    layer.train()
    x = torch.randn(T, D, requires_grad=True)
    g = torch.randn(T, D)
    fn = _fn(provider, layer)
    params = [layer.router.weight, layer.w13_EDF, layer.w2_EFD]

    def step():
        return torch.autograd.grad(fn(x), [x, *params], g)

    _record(benchmark, cfg, layer, x.detach(), provider, shape, kind, "moe_fwdbwd")
    with _backend(provider):
        grads = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert all(torch.isfinite(gr).all() for gr in grads)
