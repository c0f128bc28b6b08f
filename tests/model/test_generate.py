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


def _expected_with_stop(plain, S0, stop):
    """What ``stop_id=stop`` must return given the unstopped output ``plain [B, S0 + N]``."""
    new = plain[:, S0:].clone()
    firsts = []
    for r in range(new.shape[0]):
        hits = (new[r] == stop).nonzero()
        if len(hits):
            f = int(hits[0])
            new[r, f + 1:] = stop
            firsts.append(f + 1)
        else:
            firsts.append(None)
    n = new.shape[1] if None in firsts else max(firsts)
    return torch.cat([plain[:, :S0], new[:, :n]], dim=1), n


def test_stop_id_ends_early_and_pads(model):
    torch.manual_seed(5)
    prompt = torch.randint(0, 256, (3, 6))
    plain = model.generate(prompt, 30).tokens
    # a token every row emits somewhere, at different steps, so the rows stop at different times
    common = set(plain[0, 6:].tolist()) & set(plain[1, 6:].tolist()) & set(plain[2, 6:].tolist())
    candidates = sorted(common) or [int(plain[0, 6 + 3])]
    for stop in candidates[:3]:
        out = model.generate(prompt, 30, stop_id=stop)
        want, n = _expected_with_stop(plain, 6, stop)
        assert out.tokens.shape == (3, 6 + n) and torch.equal(out.tokens, want)
        assert out.trunk_forwards == n
    # the rows of the test above stop before the end for at least one candidate
    out = model.generate(prompt[:1], 30, stop_id=int(plain[0, 6 + 4]))
    first = int((plain[0, 6:] == plain[0, 6 + 4]).nonzero()[0]) + 1
    assert out.tokens.shape == (1, 6 + first) and first <= 5
    assert torch.equal(out.tokens[0], plain[0, : 6 + first]) and out.trunk_forwards == first


def test_stop_id_absent_or_immediate(model):
    prompt = torch.randint(0, 256, (2, 5))
    plain = model.generate(prompt, 12).tokens
    unused = next(t for t in range(256) if t not in set(plain[:, 5:].flatten().tolist()))
    out = model.generate(prompt, 12, stop_id=unused)              # never emitted: same as no stop_id
    assert torch.equal(out.tokens, plain) and out.trunk_forwards == 12
    row = plain[:1]
    out = model.generate(row[:, :5], 12, stop_id=int(row[0, 5]))   # the first new token is the stop
    assert torch.equal(out.tokens, row[:, :6]) and out.trunk_forwards == 1
    # sampling honours it too: after a row's stop every position is the stop
    g = torch.Generator().manual_seed(0)
    s = model.generate(prompt, 12, temperature=1.0, generator=g, stop_id=int(plain[0, 7])).tokens
    for r in range(2):
        hits = (s[r, 5:] == int(plain[0, 7])).nonzero()
        if len(hits):
            assert (s[r, 5 + int(hits[0]):] == int(plain[0, 7])).all()


def test_speculative_with_stop_id_equals_plain(model):
    prompt = torch.randint(0, 256, (1, 5))
    plain = model.generate(prompt, 30).tokens
    for k in (0, 1, 2, 7, 29):
        stop = int(plain[0, 5 + k])
        want = model.generate(prompt, 30, stop_id=stop).tokens
        spec = model.generate(prompt, 30, speculative=True, stop_id=stop)
        assert torch.equal(spec.tokens, want)
        assert torch.equal(want, plain[:, : 5 + int((plain[0, 5:] == stop).nonzero()[0]) + 1])


def test_speculative_stop_inside_accepted_pair(model, monkeypatch):
    """With perfect drafts tokens arrive two at a time: a stop in the first of a pair must still
    end the output there (the second token of the pair is dropped)."""
    prompt = torch.randint(0, 256, (1, 6))
    plain = model.generate(prompt, 25).tokens[0]

    def draft(h, next_ids, input_pos):
        tok = plain[int(input_pos[-1]) + 2]
        return torch.nn.functional.one_hot(tok, 256).float().expand(1, h.shape[1], 256)

    monkeypatch.setattr(model, "mtp_decode", draft)
    for k in range(1, 8):                               # both slots of several pairs
        stop = int(plain[6 + k])
        first = int((plain[6:] == stop).nonzero()[0]) + 1
        spec = model.generate(prompt, 25, speculative=True, stop_id=stop)
        assert torch.equal(spec.tokens[0], plain[: 6 + first])
