"""Stage 7 (compass_model.train.align): mixed-policy pairs, per-token reference log-probs, DPO / OTPO."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compass_model.checkpoint import save_pretrained
from compass_model.config import CompassConfig
from compass_model.data import (
    ByteTokenizer,
    PreferenceRecord,
    check,
    make_tasks,
    write_jsonl,
)
from compass_model.generate import GenerationOutput
from compass_model.losses import otpo_weights, token_logprobs
from compass_model.model import CompassForCausalLM
from compass_model.train import align
from compass_model.train import pairs as pairs_mod
from compass_model.train.metrics import MetricsWriter, read_metrics
from compass_model.train.state import latest_checkpoint, stage_done, trainer_state

TOK = ByteTokenizer()
LN2 = math.log(2)



def tiny_model(seed: int = 0) -> CompassForCausalLM:
    torch.manual_seed(seed)
    return CompassForCausalLM(CompassConfig.from_preset("tiny", max_seq_len=256, n_layers=1))


def clone(model) -> CompassForCausalLM:
    m = CompassForCausalLM(model.config)
    m.load_state_dict(model.state_dict())
    return m


# Short hand-made pairs: fast to encode and train on.
PAIRS = [
    {"prompt": "Color of sky?", "chosen": "blue", "rejected": "grass", "lang": "en", "family": "toy"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "five", "lang": "en", "family": "toy"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome it is", "lang": "en", "family": "toy"},
    {"prompt": "Say hi", "chosen": "hi", "rejected": "bye", "lang": "en", "family": "toy"},
    {"prompt": "Opposite of hot?", "chosen": "cold", "rejected": "warm", "lang": "en", "family": "toy"},
    {"prompt": "Animal that barks?", "chosen": "dog", "rejected": "cat", "lang": "en", "family": "toy"},
]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    batch = align.encode_pairs(PAIRS, TOK, 64)
    ref = align.reference_logprobs(model, batch, micro_batch=4)
    return model, batch, ref


# ---- pairs ---------------------------------------------------------------------------------------

def test_build_pairs_rejected_always_fails_check_and_is_deterministic():
    model = tiny_model()
    tasks = make_tasks(4, seed=2, n_items=2)
    pairs, stats = align.build_pairs(model, TOK, tasks, max_new_tokens=8, seed=3, max_len=256)
    assert stats["kept"] == len(pairs) > 0
    assert stats["tasks"] == 4
    by_prompt = {t.prompt: t for t in tasks}
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "lang", "family"}
        t = by_prompt[p["prompt"]]
        assert p["chosen"] == t.answer and check(t, p["chosen"])
        assert p["rejected"].strip() and not check(t, p["rejected"])
        assert (p["lang"], p["family"]) == (t.lang, t.family)
    again, _ = align.build_pairs(model, TOK, tasks, max_new_tokens=8, seed=3, max_len=256)
    assert again == pairs
    other, _ = align.build_pairs(model, TOK, tasks, max_new_tokens=8, seed=4, max_len=256)
    assert [p["rejected"] for p in other] != [p["rejected"] for p in pairs]


def test_build_pairs_resamples_correct_drops_correct_and_empty(monkeypatch):
    """A scripted sampler: correct samples are never kept; text after EOS is cut off."""
    tasks = [t for t in make_tasks(10, seed=0, families=("classify",))][:3]
    eos = TOK.eos_id
    script = {
        tasks[0].prompt: [tasks[0].answer, "wrong label"],      # correct first, then a usable sample
        tasks[1].prompt: [tasks[1].answer, tasks[1].answer],     # always correct -> dropped_correct
        tasks[2].prompt: ["", "   "],                            # empty -> dropped_empty
    }
    calls = {}

    def fake_generate(model, ids, n_new, **kw):
        prompt = TOK.decode(ids[0].tolist())
        k = calls.get(prompt, 0)
        calls[prompt] = k + 1
        text = script[prompt][k]
        new = TOK.encode(text) + [eos] + TOK.encode(" trailing junk")
        new = (new + [eos] * n_new)[:n_new]
        return GenerationOutput(torch.cat([ids, torch.tensor([new])], 1), None, n_new)

    monkeypatch.setattr(pairs_mod, "generate", fake_generate)
    pairs, stats = align.build_pairs(tiny_model(), TOK, tasks, max_new_tokens=40, tries=2)
    assert [p["prompt"] for p in pairs] == [tasks[0].prompt]
    assert pairs[0]["rejected"] == "wrong label"                 # cut at EOS, the junk after it is gone
    assert stats["dropped_correct"] == 1 and stats["dropped_empty"] == 1 and stats["kept"] == 1
    assert stats["samples"] == 6 and stats["correct_samples"] == 3 and stats["empty_samples"] == 2


def test_pairs_from_records():
    recs = [PreferenceRecord("p", "good", "bad", "f:1")]
    assert align.pairs_from_records(recs) == [{"prompt": "p", "chosen": "good", "rejected": "bad", "lang": None,
                                               "family": "user"}]


# ---- encoding ------------------------------------------------------------------------------------

def test_encode_pairs_hand_checked():
    b = align.encode_pairs([{"prompt": "ab", "chosen": "c", "rejected": "de"}], TOK, 16)
    BOS, EOS, PAD, X = TOK.bos_id, TOK.eos_id, TOK.pad_id, -100
    a, bb, c, d, e = (ord(ch) for ch in "abcde")
    assert b.chosen_ids.tolist() == [[BOS, a, bb, c, EOS, PAD]]
    assert b.rejected_ids.tolist() == [[BOS, a, bb, d, e, EOS]]
    # prediction position i carries the label ids[i + 1] when that is a response token or the EOS
    assert b.chosen_labels.tolist() == [[X, X, c, EOS, X, X]]
    assert b.rejected_labels.tolist() == [[X, X, d, e, EOS, X]]
    assert b.chosen_mask.tolist() == [[False, False, True, True, False, False]]
    assert b.rejected_mask.dtype == torch.bool and b.rejected_mask.tolist() == [[False, False, True, True, True, False]]


def test_encode_pairs_lines_up_with_token_logprobs(setup):
    model, batch, _ = setup
    with torch.no_grad():
        logits = model(batch.chosen_ids).logits
    lp = token_logprobs(logits, batch.chosen_labels)
    ls = torch.log_softmax(logits.float(), -1)
    for r in range(len(batch)):
        ids = batch.chosen_ids[r].tolist()
        resp_positions = batch.chosen_mask[r].nonzero().flatten().tolist()
        n_resp = len(TOK.encode(PAIRS[r]["chosen"])) + 1            # response + EOS
        assert len(resp_positions) == n_resp
        assert ids[resp_positions[-1] + 1] == TOK.eos_id
        for i in resp_positions:
            assert torch.allclose(lp[r, i], ls[r, i, ids[i + 1]], atol=1e-5)
        assert (lp[r][~batch.chosen_mask[r]] == 0).all()


def test_encode_pairs_too_long_names_the_pair():
    pairs = [PAIRS[0], {"prompt": "x" * 30, "chosen": "y", "rejected": "z" * 40}]
    with pytest.raises(ValueError, match="pair 1"):
        align.encode_pairs(pairs, TOK, 48)


# ---- reference log-probs and step-0 losses -------------------------------------------------------

def test_reference_equals_policy_at_step_0_and_losses_are_ln2(setup):
    model, batch, ref = setup
    ref_c, ref_r = ref
    assert ref_c.dtype == torch.float32 and ref_c.shape == batch.chosen_ids.shape
    assert (ref_c[~batch.chosen_mask] == 0).all() and (ref_r[~batch.rejected_mask] == 0).all()
    assert (ref_c[batch.chosen_mask] < 0).all()
    policy = clone(model).train()
    lp_c, lp_r, *_ = pairs_mod.forward_pairs(policy, batch)           # one forward, train mode, all pairs
    assert torch.allclose(lp_c, ref_c, atol=1e-5) and torch.allclose(lp_r, ref_r, atol=1e-5)
    for method in ("dpo", "otpo"):
        loss, m = align.preference_step_loss(policy, batch, ref, method, beta=0.1)
        assert loss.item() == pytest.approx(LN2, abs=1e-5), method
        assert m["reward_margin"] == pytest.approx(0.0, abs=1e-5)
        recs = align.train_preference(clone(model), batch, ref, method=method, steps=1, lr=1e-3,
                                      micro_batch=len(batch))
        assert recs[0]["loss"] == pytest.approx(LN2, abs=1e-5)


def test_otpo_weights_zero_off_the_response(setup):
    model, batch, _ = setup
    with torch.no_grad():
        hidden = model(torch.cat([batch.chosen_ids, batch.rejected_ids])).hidden
    n = len(batch)
    w_c, w_r = otpo_weights(hidden[:n], hidden[n:], batch.chosen_mask, batch.rejected_mask)
    assert (w_c[~batch.chosen_mask] == 0).all() and (w_r[~batch.rejected_mask] == 0).all()
    assert (w_c[batch.chosen_mask] > 0).all() and (w_r[batch.rejected_mask] > 0).all()
    n_tok = torch.minimum(batch.chosen_mask.sum(-1), batch.rejected_mask.sum(-1)).float()
    assert torch.allclose(w_c.sum(-1), n_tok, atol=1e-3) and torch.allclose(w_r.sum(-1), n_tok, atol=1e-3)


@pytest.mark.parametrize("method", ["dpo", "otpo"])
def test_training_raises_reward_accuracy_and_margin(setup, method):
    model, batch, ref = setup
    policy = clone(model)
    before = align.preference_accuracy(policy, batch, ref)
    assert before["margin"] == pytest.approx(0.0, abs=1e-5) and before["reward_accuracy"] == 0.0
    recs = align.train_preference(policy, batch, ref, method=method, steps=4, lr=2e-3, micro_batch=3,
                                  grad_accum=2)
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert all(r["stage"] == f"align-{method}" for r in recs)
    assert {"loss", "lr", "reward_margin", "reward_accuracy", "seconds"} <= set(recs[0])
    assert recs[-1]["loss"] < recs[0]["loss"]
    after = align.preference_accuracy(policy, batch, ref)
    assert after["n"] == len(batch)
    assert after["margin"] > 0.05 and after["reward_accuracy"] >= 5 / 6, after
    assert after["logp_accuracy"] >= before["logp_accuracy"]


def test_step_indices_pure_and_cover_each_epoch():
    a = [align.step_indices(6, s, 4, seed=1) for s in range(3)]
    assert a == [align.step_indices(6, s, 4, seed=1) for s in range(3)]
    flat = [i for step in a for i in step]
    assert sorted(flat[:6]) == list(range(6)) and sorted(flat[6:12]) == list(range(6))
    assert a != [align.step_indices(6, s, 4, seed=2) for s in range(3)]


# ---- resume --------------------------------------------------------------------------------------

class _Crash(Exception):
    pass


class CrashingWriter(MetricsWriter):
    """Raises while recording step ``crash_at`` (before its checkpoint is written): a killed run."""

    def __init__(self, path, crash_at):
        super().__init__(path)
        self.crash_at = crash_at

    def write(self, record):
        if record["step"] == self.crash_at:
            raise _Crash
        super().write(record)


@pytest.mark.parametrize("method", ["dpo", "otpo"])
def test_resume_reproduces_the_uninterrupted_run(setup, tmp_path, method):
    model, batch, ref = setup
    kw = {"method": method, "steps": 4, "lr": 2e-3, "micro_batch": 2, "seed": 5, "warmup_steps": 1}
    full = align.train_preference(clone(model), batch, ref, stage_dir=tmp_path / "full", **kw)

    stage = tmp_path / "cut"
    with pytest.raises(_Crash):
        align.train_preference(clone(model), batch, ref, stage_dir=stage,
                               metrics=CrashingWriter(tmp_path / "m.jsonl", crash_at=2), **kw)
    assert trainer_state(latest_checkpoint(stage))["step"] == 2 and not stage_done(stage)
    resumed_model = clone(model)            # SFT weights: resume must load the step-2 weights itself
    writer = MetricsWriter(tmp_path / "m.jsonl")
    rest = align.train_preference(resumed_model, batch, ref, stage_dir=stage, metrics=writer, resume=True, **kw)
    assert [r["step"] for r in rest] == [2, 3]
    for a, b in zip(rest, full[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["lr"] == pytest.approx(b["lr"])
    assert stage_done(stage)
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [0, 1, 2, 3]
    # a finished stage: nothing runs, the trained weights are loaded
    fresh = clone(model)
    assert align.train_preference(fresh, batch, ref, stage_dir=stage, resume=True, **kw) == []
    for (k, v), w in zip(fresh.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(v, w), k


def test_reference_cache_roundtrip_and_mismatch(setup, tmp_path):
    _, batch, ref = setup
    path = tmp_path / "ref.safetensors"
    align.save_reference(path, *ref, batch=batch)
    c, r = align.load_reference(path, batch)
    assert torch.equal(c, ref[0]) and torch.equal(r, ref[1])
    other = align.encode_pairs(PAIRS[::-1], TOK, 64)
    with pytest.raises(ValueError):
        align.load_reference(path, other)


# ---- the stage end to end ------------------------------------------------------------------------

def _run(tmp_path, sft_dir, **over):
    kw = {"n_pairs": 3, "eval_pairs": 2, "steps": 2, "lr": 2e-3, "micro_batch": 2, "max_len": 128, "beta": 0.1,
          "seed": 0, "max_new_tokens": 10}
    kw.update(over)
    return align.run_alignment(sft_dir, tmp_path / "out", TOK, **kw)


def test_run_alignment_end_to_end_and_resume_reuses_caches(tmp_path, monkeypatch):
    sft_dir = tmp_path / "sft"
    save_pretrained(tiny_model(), sft_dir)
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    res = _run(tmp_path, sft_dir, metrics=metrics)
    assert {"pairs", "dpo", "otpo", "sft_eval"} <= set(res)
    assert {"train", "eval", "dropped_correct"} <= set(res["pairs"])
    assert res["pairs"]["train"] >= 1 and res["pairs"]["eval"] >= 1
    for method in ("dpo", "otpo"):
        r = res[method]
        assert {"loss_first", "loss_last", "seconds", "steps", "eval"} <= set(r)
        assert r["steps"] == 2 and r["loss_first"] == pytest.approx(LN2, abs=1e-4)
        assert {"reward_accuracy", "logp_accuracy", "margin", "n"} <= set(r["eval"])
        assert r["eval"]["n"] == res["pairs"]["eval"]
    assert res["sft_eval"]["margin"] == pytest.approx(0.0, abs=1e-5)
    out = tmp_path / "out"
    assert stage_done(out / "checkpoints" / "align-dpo") and stage_done(out / "checkpoints" / "align")
    stored = json.loads((out / "pairs.json").read_text())
    assert len(stored["train"]) == res["pairs"]["train"]
    stages = [m["stage"] for m in read_metrics(tmp_path / "metrics.jsonl")]
    assert stages == ["align-dpo"] * 2 + ["align-otpo"] * 2

    # resume: the pairs and reference log-probs come from the cache, finished stages do not rerun
    def boom(*a, **k):
        raise AssertionError("recomputed on resume")

    monkeypatch.setattr(align, "reference_logprobs", boom)
    monkeypatch.setattr(align, "build_pairs", boom)
    monkeypatch.setattr(align, "preference_step_loss", boom)
    again = _run(tmp_path, sft_dir, metrics=metrics, resume=True)
    for method in ("dpo", "otpo"):
        assert again[method]["loss_last"] == pytest.approx(res[method]["loss_last"])
        assert again[method]["eval"] == pytest.approx(res[method]["eval"])
    assert again["pairs"]["train"] == res["pairs"]["train"]


def test_run_alignment_from_pairs_file_does_not_sample(tmp_path, monkeypatch):
    sft_dir = tmp_path / "sft"
    save_pretrained(tiny_model(), sft_dir)
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in PAIRS])
    monkeypatch.setattr(align, "build_pairs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    res = _run(tmp_path, sft_dir, pairs_file=path, steps=1, n_pairs=10)
    assert res["pairs"]["train"] == 4 and res["pairs"]["eval"] == 2
    assert res["otpo"]["steps"] == 1


def test_sft_weight_adds_the_chosen_nll():
    """RPO: the loss grows by sft_weight x the chosen responses' token-mean NLL; the preference loss
    reported in the metrics stays the pure one."""
    model = tiny_model()
    pairs = [{"prompt": "Q: 1+1?\n", "chosen": "2", "rejected": "three", "lang": "en", "family": "user"},
             {"prompt": "Color?\n", "chosen": "merah", "rejected": "biru", "lang": "id", "family": "user"}]
    b = align.encode_pairs(pairs, TOK, 64)
    ref = align.reference_logprobs(model, b)
    plain, m0 = align.preference_step_loss(model, b, ref, "dpo")
    rpo, m1 = align.preference_step_loss(model, b, ref, "dpo", sft_weight=0.5)
    lp = ref[0]                                   # policy == reference: the chosen log-probs
    nll = float(-(lp * b.chosen_mask).sum() / b.chosen_mask.sum())
    assert m1["loss"] == pytest.approx(m0["loss"]) and m1["sft_nll"] == pytest.approx(nll, rel=1e-5)
    assert float(rpo.detach()) == pytest.approx(float(plain.detach()) + 0.5 * nll, rel=1e-5)
