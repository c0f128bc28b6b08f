"""The MoE's parts: router statistics from sums, the token dispatcher, grouped experts (biases,
transposed weights, custom activation), and the FP8 / EP layers composed from them, not copies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compass_model import CompassConfig
from compass_kernels.moe_blocks import TokenDispatcher, grouped_mlp, row_experts
from compass_model.moe import (
    MoE,
    assignment_counts,
    load_balancing_loss,
    router_z_loss,
)


def _moe(**kw) -> MoE:
    torch.manual_seed(0)
    return MoE(CompassConfig(**{**dict(d_model=16, num_experts=6, top_k=2, expert_ffn_dim=12), **kw}))


def test_balance_from_summed_shards_equals_whole_batch():
    """What a global-batch all-reduce relies on: counts, score sums, token counts and z sums of two
    shards, added, give the whole batch's aux / z losses and stats."""
    m = _moe()
    x = torch.randn(11, 16)
    logits, scores, ids, _ = m.router(x)
    counts = assignment_counts(ids, 6)
    whole = m.router.statistics(logits, scores, counts, counts)
    assert torch.allclose(whole["aux"], load_balancing_loss(scores, counts))
    assert torch.allclose(whole["z"], router_z_loss(logits))
    parts = [(logits[:4], scores[:4], ids[:4]), (logits[4:], scores[4:], ids[4:])]
    c = sum(assignment_counts(i, 6) for _, _, i in parts)
    s = sum(sc.sum(0) for _, sc, _ in parts)
    z = sum(torch.logsumexp(lg, -1).square().sum() for lg, _, _ in parts)
    merged = m.router.balance(c, s, torch.tensor(11), z, c)
    for k in ("aux", "z"):
        torch.testing.assert_close(merged[k], whole[k])
    torch.testing.assert_close(merged["stats"]["load"], whole["stats"]["load"])


def test_assignment_counts_skip_empty_slots():
    ids = torch.tensor([[0, -1], [2, 0], [-1, -1]])
    assert assignment_counts(ids, 3).tolist() == [2.0, 0.0, 1.0]


@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_mlp_bias_transposed_custom_activation(trans_b):
    torch.manual_seed(1)
    E, D, Fd, T = 4, 8, 6, 9
    ids = torch.randint(-1, E, (T, 2))
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(T, 2, dtype=torch.float64)
    w_in = torch.randn(E, D, 2 * Fd, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(E, Fd, D, dtype=torch.float64, requires_grad=True)
    b_in = torch.randn(E, 2 * Fd, dtype=torch.float64, requires_grad=True)
    b_out = torch.randn(E, D, dtype=torch.float64, requires_grad=True)
    act = lambda h: torch.tanh(h[:, ::2]) * h[:, 1::2]  # noqa: E731  (interleaved gate / up)
    disp = TokenDispatcher(E)
    d = disp.dispatch(x, ids)
    wi, wo = (w_in.transpose(1, 2), w_out.transpose(1, 2)) if trans_b else (w_in, w_out)
    y = grouped_mlp(d.rows, d.offsets, wi, wo, act=act, trans_b=trans_b, b_in=b_in, b_out=b_out)
    out = disp.combine(y, d, probs)
    ref = torch.zeros_like(x)
    for t in range(T):
        for j in range(2):
            e = int(ids[t, j])
            if e >= 0:
                ref[t] += probs[t, j] * (act((x[t] @ w_in[e] + b_in[e])[None])[0] @ w_out[e] + b_out[e])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out * g).sum(), (x, w_in, w_out, b_in, b_out))
    want = torch.autograd.grad((ref * g).sum(), (x, w_in, w_out, b_in, b_out))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_row_experts():
    offsets = torch.tensor([0, 2, 2, 5])
    assert row_experts(offsets, 7).tolist() == [0, 0, 2, 2, 2, 2, 2]


def test_fp8_and_ep_layers_are_the_composed_moe():
    """One forward for every MoE layer: the FP8 layer swaps the experts stage, the EP layer the
    dispatcher; neither copies MoE.forward."""
    from compass_model.distributed import EPDispatcher, EPMoE
    from compass_model.quant import Fp8MoE

    assert Fp8MoE.forward is MoE.forward and EPMoE.forward is MoE.forward
    assert Fp8MoE.experts is not MoE.experts
    assert issubclass(EPDispatcher, TokenDispatcher)


def test_state_dict_keys_unchanged():
    m = _moe(shared_expert_dim=8)
    assert sorted(m.state_dict()) == sorted([
        "router.weight", "router.bias", "w13_EDF", "w2_EFD",
        "shared.w1.weight", "shared.w3.weight", "shared.w2.weight"])


def test_swiglu_experts_match_dense_loop():
    m = _moe().double()
    x = torch.randn(7, 16, dtype=torch.float64)
    out, _ = m(x)
    _, _, ids, gates = m.router(x)
    ref = torch.zeros_like(x)
    for t in range(7):
        for j in range(2):
            e = int(ids[t, j])
            g, u = (x[t] @ m.w13_EDF[e]).chunk(2)
            ref[t] += gates[t, j] * ((F.silu(g) * u) @ m.w2_EFD[e])
    torch.testing.assert_close(out, ref)
