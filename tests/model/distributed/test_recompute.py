"""--activation-checkpointing: attention and experts run again in the backward (counted), with the
same loss and gradients as without; the router (and its bias load) runs once."""

from __future__ import annotations

import copy

import torch

from compass_model import CompassConfig
from compass_model.model import CompassForCausalLM
from compass_model.train.recompute import apply_activation_checkpointing


def test_recompute_same_gradients_and_runs_again():
    cfg = CompassConfig.from_preset("tiny", router_bias_rate=1e-3, n_dense_layers=1)
    torch.manual_seed(0)
    ref = CompassForCausalLM(cfg)
    ckpt = copy.deepcopy(ref)
    calls = {"attn": 0, "experts": 0, "router": 0}

    def counting(fn, key):
        def run(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return run
    blocks = [*ckpt.layers, *(m.block for m in ckpt.mtp)]
    for b in blocks:                 # count the inner calls, then wrap them for recompute
        b.attn.forward = counting(b.attn.forward, "attn")
        if hasattr(b.ffn, "router"):
            b.ffn.experts = counting(b.ffn.experts, "experts")
            b.ffn.router.forward = counting(b.ffn.router.forward, "router")
    apply_activation_checkpointing(ckpt)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    out_ref, out = ref(ids, ids), ckpt(ids, ids)
    out_ref.loss.backward()
    out.loss.backward()
    n_moe = sum(hasattr(b.ffn, "router") for b in blocks)
    assert calls == {"attn": 2 * len(blocks), "experts": 2 * n_moe, "router": n_moe}, calls
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=0, atol=0)
    for (n, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)
    for m_ref, m in zip(ref.moe_layers(), ckpt.moe_layers()):
        torch.testing.assert_close(m.router.load, m_ref.router.load, rtol=0, atol=0)   # counted once
