"""compass_kernels.benchmarking.models: byte and FLOP counts against hand-computed numbers and
against the tensors the ops really read and write."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import compass_kernels as ck
from compass_kernels.benchmarking import models as m
from helpers import make_ids


def test_routing_bytes_by_hand():
    T, H, k, E, b = 8192, 2048, 2, 16, 4
    tk = T * k
    assert m.permute_bytes(T, H, k, b) == (T + tk) * H * b + tk * 8
    assert m.unpermute_bytes(T, H, k, b) == (T + tk) * H * b + tk * (8 + 4)
    assert m.unpermute_bytes(T, H, k, b, probs=False) == (T + tk) * H * b + tk * 8
    assert m.route_bytes(T, k, E) == tk * 16 + (2 * E + 1) * 8
    fwd = m.route_bytes(T, k, E) + 2 * (T + tk) * H * b + tk * 20
    assert m.routing_bytes(T, H, k, b, num_experts=E) == fwd
    # backward: grad_out and y read, grad_y written, probs read, grad_probs written (unpermute);
    # grad rows read, grad_x written (permute); each with the row map
    bwd = (T + 2 * tk) * H * b + tk * (8 + 8) + (tk + T) * H * b + tk * 8
    assert m.routing_bytes(T, H, k, b, num_experts=E, backward=True) == fwd + bwd


def test_routing_activations_agree_with_the_earlier_activation_only_count():
    """The activations of the fused forward are 2 (T + T k) H b; forward + backward add T k H b for
    the gate gradient's second read of y (the count bench/ used before, index bytes aside)."""
    T, H, k, E, b = 1000, 512, 8, 128, 2
    meta_fwd = m.route_bytes(T, k, E) + T * k * (8 + 8 + 4)
    act_fwd = 2 * (T + T * k) * H * b
    assert m.routing_bytes(T, H, k, b, num_experts=E) - meta_fwd == act_fwd
    meta_bwd = T * k * (8 + 8 + 8)
    both = m.routing_bytes(T, H, k, b, num_experts=E, backward=True)
    assert both - meta_fwd - meta_bwd == 2 * act_fwd + T * k * H * b


def test_routing_bytes_are_the_tensors_the_ops_touch():
    """Each op's count is the sum of its inputs' and outputs' sizes (no capacity, no alignment)."""
    T, H, k, E = 37, 24, 3, 8
    ids = make_ids(T, k, E).contiguous()
    x = torch.randn(T, H)
    probs = torch.rand(T, k)
    plan = ck.route(ids, E)
    nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert m.route_bytes(T, k, E) == nbytes(ids, plan.row_id_map, plan.tokens_per_expert, plan.expert_offsets)
    y = ck.permute(x, plan)
    assert m.permute_bytes(T, H, k, x.element_size()) == nbytes(x, plan.row_id_map, y)
    out = ck.unpermute(y, plan, probs)
    assert m.unpermute_bytes(T, H, k, x.element_size()) == nbytes(y, plan.row_id_map, probs, out)


def test_fp8_bytes_by_hand():
    M, K = 8192, 4096
    assert m.quantize_fp8_bytes(M, K, 4, "row") == M * K * 5 + 4 * M
    assert m.quantize_fp8_bytes(M, K, 2, "block") == M * K * 3 + 4 * M * (K // 128)
    assert m.quantize_fp8_bytes(M, K, 2, "tensor") == M * K * 5 + 4          # x read twice
    assert m.quantize_fp8_bytes(300, 200, 2, "block2d", 128) == 300 * 200 * 3 + 4 * 3 * 2
    assert m.quantize_fp8_bytes(3, 200, 4, "block", 64) == 3 * 200 * 5 + 4 * 3 * 4   # ceil(200 / 64) = 4


def test_other_bytes_by_hand():
    assert m.copy_bytes(1000, 4) == 8000
    assert m.sort_chunks_bytes(16384, 2048, 4, 16) == 2 * 16384 * 2048 * 4 + 2 * 16 * 8
    assert m.sinkhorn_bytes(16, 192, 100) == 16 * (2 * 192 * 100 + 192 + 100) * 4
    assert m.otpo_weights_bytes(16, 192, 160, 256) == 16 * (352 * 256 * 4 + 352 * 5)


def test_flops_by_hand():
    assert m.gemm_flops(16384, 2048, 1408) == 2 * 16384 * 2048 * 1408
    assert m.expert_flops(2048, 512, 704, 2) == 2 * 2048 * 2 * 3 * 512 * 704
    assert m.expert_flops(2048, 512, 704, 2, training=True) == 3 * m.expert_flops(2048, 512, 704, 2)
    assert m.router_flops(10, 512, 16) == 2 * 10 * 512 * 16
    cfg = SimpleNamespace(d_model=512, expert_ffn_dim=176, top_k=8, num_experts=128)
    # 2 x the active MoE parameters per token: k experts of 3 d f plus the d E router
    assert m.moe_layer_flops(cfg, 2048) == 2 * 2048 * (8 * 3 * 512 * 176 + 512 * 128)
    assert m.moe_layer_flops(cfg, 2048, training=True) == 3 * m.moe_layer_flops(cfg, 2048)


def test_moe_layer_flops_is_the_models_convention():
    """The model's cost model counts 2 x active parameters per token: an MoE block's share of it
    (router + k experts, no shared expert) is moe_layer_flops."""
    from compass_model.config import CompassConfig

    cfg = CompassConfig.from_preset("tiny", shared_expert_dim=0)
    moe_params = cfg._block_params(True, active=True) - cfg._attn_params() - 2 * cfg.d_model   # less the norms
    assert m.moe_layer_flops(cfg, 5) == 2 * 5 * moe_params


@pytest.mark.parametrize("call, name", [
    (lambda: m.permute_bytes(-1, 8, 2, 4), "tokens"),
    (lambda: m.unpermute_bytes(8, -2, 2, 4), "hidden"),
    (lambda: m.copy_bytes(10, -1), "elem_size"),
    (lambda: m.gemm_flops(1, -1, 1), "k"),
    (lambda: m.quantize_fp8_bytes(4, 4, 4, "column"), "granularity"),
    (lambda: m.quantize_fp8_bytes(4, 4, 4, "block", 0), "block_size"),
])
def test_bad_arguments_are_named(call, name):
    with pytest.raises(ValueError, match=name):
        call()
