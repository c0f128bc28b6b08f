"""Generation: KV-cache decoding equals full recomputation, speculative greedy equals plain greedy,
sampling with temperature / top-p."""

from __future__ import annotations

import pytest
import torch

from compass_model import CompassConfig, CompassForCausalLM, sample

CFG = CompassConfig.from_preset("tiny", vocab_size=256, max_seq_len=64).replace(shared_expert_dim=32, n_layers=3, n_dense_layers=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = CompassForCausalLM(CFG)
    with torch.no_grad():            # larger weights than the init: peaked logits, no near-ties in argmax
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return m


def _recompute_greedy(model, ids, n):
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_kv_cache_equals_full_recompute(model):
    prompt = torch.randint(0, 256, (2, 7))
    out = model.generate(prompt, 24)
    assert out.tokens.shape == (2, 31) and torch.equal(out.tokens[:, :7], prompt)
    assert torch.equal(out.tokens, _recompute_greedy(model, prompt, 24))
    assert out.acceptance_rate is None and out.trunk_forwards == 24
    # the cached logits themselves match the full forward, position by position
    seq = out.tokens
    model.setup_caches(2, seq.shape[1])
    try:
        pre, _ = model.decode(seq[:, :7], torch.arange(7))
        steps = [model.decode(seq[:, i:i + 1], torch.tensor([i]))[0] for i in range(7, 20)]
    finally:
        model.clear_caches()
    full = model(seq[:, :20]).logits
    torch.testing.assert_close(torch.cat([pre, *steps], dim=1), full, rtol=1e-4, atol=1e-4)


def test_speculative_equals_greedy(model):
    prompt = torch.randint(0, 256, (1, 5))
    plain = model.generate(prompt, 30)
    spec = model.generate(prompt, 30, speculative=True)
    assert torch.equal(spec.tokens, plain.tokens)
    assert 0.0 <= spec.acceptance_rate <= 1.0
    for n in (1, 2, 3):                                  # the one-token-left tail
        assert torch.equal(model.generate(prompt, n, speculative=True).tokens, plain.tokens[:, : 5 + n])


@pytest.mark.parametrize("oracle_every", [1, 2])
def test_speculative_with_good_drafts(model, monkeypatch, oracle_every):
    """An untrained MTP module's drafts are rejected; replace it by an oracle (right every draft, or
    every other one) so the accept path and the acceptance rate are exercised too."""
    prompt = torch.randint(0, 256, (1, 6))
    plain = model.generate(prompt, 25).tokens[0]
    calls = []

    def draft(h, next_ids, input_pos):
        calls.append(1)
        target = int(input_pos[-1]) + 2                  # the draft predicts the token after next_ids[-1]
        tok = plain[target] if len(calls) % oracle_every == 0 else (plain[target] + 1) % 256
        return torch.nn.functional.one_hot(tok, 256).float().expand(1, h.shape[1], 256)

    monkeypatch.setattr(model, "mtp_decode", draft)
    spec = model.generate(prompt, 25, speculative=True)
    assert torch.equal(spec.tokens[0], plain)
    if oracle_every == 1:
        assert spec.acceptance_rate == 1.0
        assert spec.trunk_forwards == 1 + 12             # prefill + 24 tokens two at a time
    else:
        assert 0.3 < spec.acceptance_rate < 0.7


def test_sampling():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 5.0, 0.0]])
    assert sample(logits).tolist() == [0, 2]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, 0.5, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {0} and set(draws[:, 1].tolist()) == {2}   # top-p 0.5 keeps only the top token
    draws = torch.stack([sample(logits, 1.0, 0.9, generator=g) for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2}       # p = 0.61, 0.22, 0.14, 0.03: the last is cut at 0.9
    a = sample(logits.repeat(8, 1), 0.7, generator=torch.Generator().manual_seed(3))
    b = sample(logits.repeat(8, 1), 0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sampled_generation_and_errors(model):
    prompt = torch.randint(0, 256, (3, 4))
    out = model.generate(prompt, 10, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (3, 14)
    assert model.training == CompassForCausalLM(CFG).training           # mode restored
    with pytest.raises(ValueError, match="temperature=0"):
        model.generate(prompt[:1], 4, temperature=1.0, speculative=True)
    with pytest.raises(ValueError, match="one sequence"):
        model.generate(prompt, 4, speculative=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 61)
    with pytest.raises(ValueError, match="mtp_depth=0"):
        CompassForCausalLM(CFG.replace(mtp_depth=0)).generate(prompt[:1], 4, speculative=True)
