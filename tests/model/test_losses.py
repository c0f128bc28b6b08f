"""SFT mixed loss, DPO and OTPO against their formulas (docs/algorithms.md)."""

from __future__ import annotations

import math

import pytest
import torch

import compass_kernels as ck
from compass_model import (
    CompassConfig,
    CompassForCausalLM,
    dpo_loss,
    mixed_loss_mask,
    otpo_loss,
    otpo_weights,
    sequence_logprobs,
    sft_mixed_loss,
    token_logprobs,
)


def test_token_logprobs():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = -100
    lp = token_logprobs(logits, labels)
    want = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    want[0, 1] = 0
    torch.testing.assert_close(lp, want)


def test_sft_mixed_loss_formula_and_global_normalisation():
    B, S, V = 3, 6, 7
    logits, labels = torch.randn(B, S, V), torch.randint(0, V, (B, S))
    prompt = torch.zeros(B, S)
    prompt[:, :2] = 1
    response = torch.zeros(B, S)
    response[:, 2:5] = 1                                       # position 5: padding
    m = mixed_loss_mask(prompt, response, torch.tensor([1.0, 0.0, 1.0]))   # e-commerce, general, e-commerce
    assert m[0].tolist() == [1, 1, 1, 1, 1, 0] and m[1].tolist() == [0, 0, 1, 1, 1, 0]
    nll = -logits.log_softmax(-1)
    want = sum(m[b, t] * nll[b, t, labels[b, t]] for b in range(B) for t in range(S)) / m.sum()
    torch.testing.assert_close(sft_mixed_loss(logits, labels, m), want)
    # gradient accumulation: micro-batches normalised by the global count sum to the full-batch loss
    N = m.sum()
    parts = sum(sft_mixed_loss(logits[i:i + 1], labels[i:i + 1], m[i:i + 1], num_tokens=N) for i in range(B))
    torch.testing.assert_close(parts, want)
    assert sft_mixed_loss(logits, labels, torch.zeros(B, S)) == 0


def test_dpo_loss_formula():
    pc, pr, rc, rr = (torch.randn(4) * 5 for _ in range(4))
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    want = sum(-math.log(1 / (1 + math.exp(-0.1 * ((a - c) - (b - d)))))
               for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())) / 4
    assert loss.item() == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(cr, 0.1 * (pc - rc))
    torch.testing.assert_close(rj, 0.1 * (pr - rr))


def _pair_batch(B=3, L=9):
    lp = [-(torch.rand(B, L) * 3) for _ in range(4)]            # per-token log-probs: pc, pr, rc, rr
    mc = torch.zeros(B, L, dtype=torch.bool)
    mr = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        mc[b, 2:2 + 3 + b] = True
        mr[b, 3:3 + 5 - b] = True
    return lp, mc, mr


def test_otpo_with_uniform_weights_is_dpo():
    (pc, pr, rc, rr), mc, mr = _pair_batch()
    pc.requires_grad_()
    got = otpo_loss(pc, pr, rc, rr, mc.float(), mr.float(), beta=0.2)
    want = dpo_loss(sequence_logprobs(pc, mc), sequence_logprobs(pr, mr), sequence_logprobs(rc, mc),
                    sequence_logprobs(rr, mr), beta=0.2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_otpo_weights_apply_per_token_to_policy_and_reference():
    (pc, pr, rc, rr), mc, mr = _pair_batch()
    w_c, w_r = torch.rand(3, 9) * mc, torch.rand(3, 9) * mr
    pc.requires_grad_()
    loss, cr, _ = otpo_loss(pc, pr, rc, rr, w_c, w_r, beta=0.1)
    delta = ((w_c * pc).sum(-1) - (w_c * rc).sum(-1)) - ((w_r * pr).sum(-1) - (w_r * rr).sum(-1))
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(0.1 * delta).mean())
    torch.testing.assert_close(cr, 0.1 * ((w_c * pc).sum(-1) - (w_c * rc).sum(-1)).detach())
    (g,) = torch.autograd.grad(loss, pc)
    assert (g[~mc] == 0).all() and (g[mc] != 0).all()          # gradient only on weighted response tokens


@pytest.mark.skipif(not hasattr(ck, "otpo_weights"), reason="compass_kernels.otpo_weights not available")
def test_otpo_end_to_end_with_kernel_weights():
    """Hidden states from the model (final norm, prediction positions), weights from the kernel,
    per-token reference log-probs precomputed once."""
    model = CompassForCausalLM(CompassConfig.from_preset("tiny", mtp_depth=0))
    B, S = 2, 16
    chosen, rejected = torch.randint(0, 256, (B, S + 1)), torch.randint(0, 256, (B, S + 1))
    mc = torch.zeros(B, S, dtype=torch.bool)
    mr = torch.zeros(B, S, dtype=torch.bool)
    mc[:, 5:14] = True                      # prompt predicts up to position 4; padding after the response
    mr[0, 5:11] = True
    mr[1, 5:16] = True
    with torch.no_grad():
        ref_c = token_logprobs(model(chosen[:, :-1]).logits, chosen[:, 1:])
        ref_r = token_logprobs(model(rejected[:, :-1]).logits, rejected[:, 1:])
    out_c, out_r = model(chosen[:, :-1]), model(rejected[:, :-1])
    w_c, w_r = otpo_weights(out_c.hidden, out_r.hidden, mc, mr, eps=0.1, tau=0.2)
    n = torch.minimum(mc.sum(-1), mr.sum(-1)).float()
    torch.testing.assert_close(w_c.sum(-1), n, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w_r.sum(-1), n, rtol=1e-4, atol=1e-4)
    assert (w_c[~mc] == 0).all() and (w_r[~mr] == 0).all()
    pol_c = token_logprobs(out_c.logits, chosen[:, 1:])
    pol_r = token_logprobs(out_r.logits, rejected[:, 1:])
    loss, _, _ = otpo_loss(pol_c, pol_r, ref_c, ref_r, w_c, w_r)
    # the policy equals the reference here: Delta = 0, loss = ln 2
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    loss.backward()
    assert model.head.weight.grad is not None
