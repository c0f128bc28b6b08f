"""compass_model.train.evaluate: answers stop at EOS, scripted right answers score 1.0, over-long
prompts count as wrong, long context is skipped past max_seq_len, perplexity and expert load are
exact on rigged models, and the full report is plain JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from compass_model import CompassConfig, CompassForCausalLM
from compass_model.data import ByteTokenizer, check, make_tasks
from compass_model.data.passkey import make_passkey_tasks
from compass_model.train.evaluate import (
    evaluate_model,
    evaluate_tasks,
    generate_answers,
    long_context_eval,
    perplexity,
    router_load,
    speculative_eval,
)

TOK = ByteTokenizer()
CFG = CompassConfig.from_preset("tiny", max_seq_len=1024)



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CompassForCausalLM(CFG)


class ScriptedModel(nn.Module):
    """The decode API of CompassForCausalLM, answering each prompt with a scripted text, then EOS,
    then junk (which must never be read). Records every decode call's batch size and length."""

    def __init__(self, script: dict, max_seq_len: int = 1024, vocab: int = 264, junk: str = "JUNK"):
        super().__init__()
        self.config = CFG.replace(max_seq_len=max_seq_len)
        self.vocab = vocab
        self.script = {tuple(TOK.encode(p, bos=True)): TOK.encode(a) + [TOK.eos_id] + TOK.encode(junk) * 50
                       for p, a in script.items()}
        self.calls = []
        self._w = nn.Parameter(torch.zeros(1))     # a parameter, so the device can be read

    def setup_caches(self, batch, max_len):
        self.rows = None

    def clear_caches(self):
        self.rows = None

    def decode(self, ids, input_pos):
        self.calls.append(tuple(ids.shape))
        if self.rows is None:                      # prefill: remember which prompt each row is
            self.rows = [self.script.get(tuple(r), [ord("?")] * 2000) for r in ids.tolist()]
            self.s0 = ids.shape[1]
        step = int(input_pos[-1]) + 1 - self.s0    # index of the token these logits predict
        nxt = torch.tensor([r[step] for r in self.rows])
        logits = nn.functional.one_hot(nxt, self.vocab).float()[:, None].expand(-1, ids.shape[1], -1)
        return logits, None


def test_generate_answers_stops_at_eos_and_batches_equal_lengths():
    fake = ScriptedModel({"aa": "abc", "bb": "héllo wörld", "ccc": "x"})
    got = generate_answers(fake, TOK, ["aa", "ccc", "bb"], max_new_tokens=40)
    assert got == ["abc", "x", "héllo wörld"]
    prefills = [c for c in fake.calls if c[1] > 1]
    assert sorted(prefills) == [(1, 4), (2, 3)]            # "aa" and "bb" shared one batch
    # decoding stopped once both rows had emitted EOS: 13 bytes + EOS for "héllo wörld", not 40 steps
    two_row_steps = [c for c in fake.calls if c == (2, 1)]
    assert len(two_row_steps) == len("héllo wörld".encode())    # 14 tokens incl. EOS, 1st from prefill
    # a budget too small for the answer cuts it (and the checker then sees a partial answer)
    assert generate_answers(fake, TOK, ["bb"], max_new_tokens=3) == ["hé"]


def test_scripted_right_answers_score_one_and_wrong_family_zero():
    tasks = make_tasks(20, seed=7, n_items=3)
    fake = ScriptedModel({t.prompt: t.answer for t in tasks})
    res = evaluate_tasks(fake, TOK, tasks)
    assert res["accuracy"] == 1.0 and res["n"] == 20
    assert all(v["accuracy"] == 1.0 for v in res["per_family"].values())
    assert sum(v["n"] for v in res["per_language"].values()) == 20
    assert {s["family"] for s in res["samples"]} == {t.family for t in tasks}
    assert all(s["ok"] and s["response"] == s["gold"] for s in res["samples"])
    # every classify task answered wrong: exactly that family's share is lost
    wrong = {t.prompt: ("nonsense" if t.family == "classify" else t.answer) for t in tasks}
    res = evaluate_tasks(ScriptedModel(wrong), TOK, tasks)
    n_cls = sum(t.family == "classify" for t in tasks)
    assert res["per_family"]["classify"] == {"accuracy": 0.0, "n": n_cls}
    assert res["accuracy"] == pytest.approx(1 - n_cls / 20)
    assert res["per_family"]["price"]["accuracy"] == 1.0


def test_budget_is_per_family_and_long_enough_for_gold():
    """The default budget must let the longest gold answer (price reasoning) through whole."""
    tasks = [t for t in make_tasks(40, seed=3) if t.family == "price"]
    longest = max(tasks, key=lambda t: len(TOK.encode(t.answer)))
    fake = ScriptedModel({longest.prompt: longest.answer})
    res = evaluate_tasks(fake, TOK, [longest])
    assert res["accuracy"] == 1.0 and len(TOK.encode(longest.answer)) > 90


def test_over_long_prompt_is_wrong_not_an_error(model):
    t = make_tasks(5, seed=0, families=("retrieve",), n_items=40)[0]     # ~2.5k byte tokens > 1024
    assert len(TOK.encode(t.prompt)) > CFG.max_seq_len
    fake = ScriptedModel({t.prompt: t.answer, "hi": "ok"})
    res = evaluate_tasks(fake, TOK, [t])
    assert res["accuracy"] == 0.0 and res["samples"][0]["response"] == ""
    assert generate_answers(model, TOK, [t.prompt, "hi"], 8)[0] == ""   # real model: no crash either
    # exactly one free position: one token is generated
    edge = "a" * (CFG.max_seq_len - 2)                                    # [BOS] + 1022 = 1023 tokens
    assert generate_answers(ScriptedModel({edge: "xyz"}), TOK, [edge], 50) == ["x"]


def test_long_context_retrieval_and_skip_beyond_max_seq_len():
    tasks = make_passkey_tasks(3, seed=11, context=128)
    fake = ScriptedModel({t.prompt: t.answer for t in tasks}, max_seq_len=300)
    res = long_context_eval(fake, TOK, base_context=128, n=3, seed=11)
    assert res["1x"] == {"context": 128, "accuracy": 1.0, "n": 3, "mean_depth_of_misses": None}
    assert res["4x"]["skipped"] is True and res["4x"]["context"] == 512
    assert "max_seq_len" in res["4x"]["reason"] and "accuracy" not in res["4x"]
    wrong = ScriptedModel({t.prompt: str((int(t.answer) + 1) % 10000).zfill(4) for t in tasks}, max_seq_len=300)
    miss = long_context_eval(wrong, TOK, base_context=128, n=3, seed=11, factors=(("1x", 1),))
    assert miss["1x"]["accuracy"] == 0.0 and 0 <= miss["1x"]["mean_depth_of_misses"] <= 1


def test_speculative_eval_reproduces_greedy(model):
    res = speculative_eval(model, TOK, n=2, max_new_tokens=12)
    assert res["identical"] is True and res["n"] == 2 and res["tokens"] > 0
    assert 0.0 <= res["acceptance_rate"] <= 1.0 and res["speedup"] > 0
    assert 1.0 <= res["tokens_per_trunk_forward"] <= 2.0
    no_mtp = CompassForCausalLM(CFG.replace(mtp_depth=0))
    assert speculative_eval(no_mtp, TOK, n=1)["skipped"] is True


def test_perplexity_of_uniform_model_is_vocab_size():
    torch.manual_seed(0)
    m = CompassForCausalLM(CFG)
    with torch.no_grad():
        m.head.weight.zero_()                       # logits all 0: uniform over the 264 ids
    texts = ["hello world", "xin chào", "a" * 300]
    assert perplexity(m, TOK, texts, seq_len=128) == pytest.approx(CFG.vocab_size, rel=1e-12)


def test_perplexity_matches_direct_forward(model):
    text = "Somethinc rice cooker 2 L | Rp 350.000"
    ids = torch.tensor([TOK.encode(text, bos=True, eos=True)])
    with torch.no_grad():
        ce = nn.functional.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:])
    # padded rows and a second document in the row must not change it
    assert perplexity(model, TOK, [text], seq_len=64) == pytest.approx(math.exp(float(ce)), rel=1e-4)
    other = "another document"
    ids2 = torch.tensor([TOK.encode(other, bos=True, eos=True)])
    with torch.no_grad():
        ce2 = nn.functional.cross_entropy(model(ids2).logits[0, :-1].float(), ids2[0, 1:], reduction="sum")
    n = ids.shape[1] - 1 + ids2.shape[1] - 1
    want = math.exp((float(ce) * (ids.shape[1] - 1) + float(ce2)) / n)
    assert perplexity(model, TOK, [text, other], seq_len=128) == pytest.approx(want, rel=1e-4)


def test_router_load_counts_real_tokens_only(model):
    text = "x" * 62                                    # [BOS] + 62 + [EOS] = one full row of 64
    ids = torch.tensor([TOK.encode(text, bos=True, eos=True)])
    with torch.no_grad():
        stats = model.eval()(ids).router_stats
    model.train()
    full = router_load(model, TOK, [text], seq_len=64)
    padded = router_load(model, TOK, [text], seq_len=200)          # 136 padding tokens, excluded
    assert model.training                                           # mode restored
    assert len(full["load"]) == len(stats) == 2
    for k in range(2):
        torch.testing.assert_close(torch.tensor(full["load"][k]), stats[k]["load"].double(), rtol=0, atol=1e-7,
                                   check_dtype=False)
        torch.testing.assert_close(torch.tensor(padded["load"][k]), torch.tensor(full["load"][k]), rtol=0, atol=1e-7)
        assert full["entropy"][k] == pytest.approx(float(stats[k]["entropy"]), abs=1e-6)
    assert full["mean_entropy"] == pytest.approx(sum(full["entropy"]) / 2)


def test_evaluate_model_report_is_plain_json(model):
    model.train()
    res = evaluate_model(model, TOK, n_tasks=10, base_context=256, n_long=2, n_docs=12, n_speculative=2)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert json.loads(json.dumps(res)) == res
    assert set(res) >= {"per_language", "per_family", "accuracy", "long_context", "speculative", "perplexity",
                        "router", "samples"}
    assert res["speculative"]["identical"] is True
    assert res["n_tasks"] + res["n_tasks_dropped"] == 10
    assert sum(v["n"] for v in res["per_family"].values()) == res["n_tasks"]
    assert 0.0 <= res["accuracy"] <= 1.0
    assert res["long_context"]["4x"]["context"] == 1024 and res["long_context"]["4x"]["n"] == 2   # fits 1024
    assert 1.0 < res["perplexity"] < 1e4 and math.isfinite(res["perplexity"])
    assert len(res["router"]["entropy"]) == 2
    assert all(sum(layer) == pytest.approx(1.0) and len(layer) == CFG.num_experts for layer in res["router"]["load"])
    for s in res["samples"]:
        assert s["ok"] == check(next(t for t in make_tasks(10, seed=1000, n_items=1) if t.prompt == s["prompt"]),
                                s["response"])
