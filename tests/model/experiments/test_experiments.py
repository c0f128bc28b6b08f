"""The paper experiments (compass_model.experiments) in quick mode, plus their metric helpers."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch

from compass_model.experiments import (
    EXPERIMENTS,
    balance,
    combine,
    experts,
    otpo_vs_dpo,
)
from compass_model.experiments.common import machine_info, median_times


def _check_outputs(tmp_path, name, result):
    j = tmp_path / f"{name}.json"
    png = tmp_path / f"{name}.png"
    assert j.exists() and png.exists()
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads(j.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["quick"] is True
    assert on_disk["experiment"] == name
    m = on_disk["machine"]
    for key in ("platform", "cpu_count", "torch", "threads"):
        assert key in m
    assert m["threads"] == 1
    return on_disk


def test_registry():
    assert set(EXPERIMENTS) == {"balance", "experts", "combine", "otpo-vs-dpo"}
    assert all(callable(f) for f in EXPERIMENTS.values())


def test_machine_info():
    m = machine_info()
    assert m["torch"] == torch.__version__ and m["threads"] == torch.get_num_threads()


def test_median_times_interleaves():
    calls = []
    t = median_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())


# ---- balance -------------------------------------------------------------------------------------

def test_balance_metrics():
    assert balance.max_vio([5, 5, 5, 5]) == 0
    assert balance.max_vio([8, 0, 0, 0]) == pytest.approx(3.0)
    assert balance.max_vio([0, 0]) == 0
    recs = [{"counts": [[3, 0, 1, 0]]}, {"counts": [[0, 0, 2, 2]]}, {"counts": [[1, 0, 1, 2]]}]
    assert balance.dead_experts(recs, 2) == 1            # expert 1 (expert 0 has load in the last step)
    assert balance.dead_experts(recs, 1) == 1
    assert balance.dead_experts(recs[:2], 2) == 1
    assert balance.dead_experts([{"counts": [[0, 1], [0, 1]]}], 1) == 2   # summed over blocks


def test_balance_quick(tmp_path):
    res = _check_outputs(tmp_path, "balance", balance.run(tmp_path, quick=True))
    v = res["variants"]
    assert set(v) == {"no-aux", "aux", "aux+z", "aux-cosine+z", "aux-exp+z"}
    steps = res["setup"]["steps"]
    E = res["setup"]["num_experts"]
    for r in v.values():
        assert len(r["entropy"]) == steps and len(r["lm"]) == steps
        assert all(0 <= e <= 1 + 1e-6 for e in r["entropy"])
        assert 0 <= r["final_entropy"] <= 1
        assert 0 <= r["max_vio"] <= E - 1 + 1e-6
        assert 0 <= r["dead_experts"] <= E * res["setup"]["n_layers"]
        assert math.isfinite(r["final_lm"]) and math.isfinite(r["eval_lm"])
        assert sum(r["final_load"]) == pytest.approx(1, abs=1e-3)
    # aux coefficient: 0 without aux, constant, decaying
    assert all(c == 0 for c in v["no-aux"]["aux_coef"])
    assert len(set(v["aux"]["aux_coef"])) == 1
    assert v["aux-cosine+z"]["aux_coef"][-1] < v["aux-cosine+z"]["aux_coef"][0]
    assert v["aux-exp+z"]["aux_coef"][-1] < v["aux-exp+z"]["aux_coef"][0]
    # robust in quick mode (seeds 0-4: no-aux entropy 0.45-0.64, aux 0.83-0.95)
    assert v["no-aux"]["final_entropy"] < v["aux"]["final_entropy"]
    assert v["no-aux"]["max_vio"] > v["aux"]["max_vio"]


# ---- experts -------------------------------------------------------------------------------------

def test_experts_grid():
    g = experts.grid()
    assert len(g) == 12 and all(E >= k for E, k in g)
    assert {experts.ffn_dim(64, k) * k for k in (1, 2, 4)} == {128}
    with pytest.raises(ValueError):
        experts.ffn_dim(3, 4)


def test_experts_quick(tmp_path):
    res = _check_outputs(tmp_path, "experts", experts.run(tmp_path, quick=True))
    rows = res["configs"]
    assert rows
    active = {r["active_params"] for r in rows}
    assert len(active) > 0
    for r in rows:
        assert r["num_experts"] >= r["top_k"]
        assert r["expert_ffn_dim"] * r["top_k"] == 2 * res["setup"]["f0_lm"]
        for key in ("grouped_s", "dense_s", "layer_s", "gemm_eff", "tokens_per_s"):
            assert r[key] > 0 and math.isfinite(r[key])
        assert math.isfinite(r["eval_lm"]) and math.isfinite(r["final_lm"])
        assert r["total_params"] >= r["active_params"]
    # fixed active width: configurations with the same top-k share the active parameter count
    # up to the router (d x E) and differ in the total
    by_k = {}
    for r in rows:
        by_k.setdefault(r["top_k"], []).append(r)
    for rs in by_k.values():
        spread = max(r["active_params"] for r in rs) - min(r["active_params"] for r in rs)
        assert spread <= 64 * 32 * res["setup"]["lm"]["n_layers"]
    assert res["best_eval_lm"] in {r["label"] for r in rows}


# ---- combine -------------------------------------------------------------------------------------

def test_combine_peers_match_fused():
    import compass_kernels as ck
    g = torch.Generator().manual_seed(0)
    T, H, E, k = 37, 16, 8, 2
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    probs = torch.rand(T, k, generator=g)
    plan = ck.route(ids, E)
    ref = ck.unpermute(ck.permute(x, plan), plan, probs=probs)
    xp, sorted_idx, tpe = combine.megatron_dispatch(x, ids, E)
    torch.testing.assert_close(xp, ck.permute(x, plan))         # same expert-contiguous order
    assert tpe.tolist() == plan.tokens_per_expert.tolist()
    torch.testing.assert_close(combine.megatron_combine(xp, sorted_idx, probs, T), ref)
    lists = combine.hf_lists(ids, E)
    ys = [x.index_select(0, tok) for tok, _ in lists]
    torch.testing.assert_close(combine.hf_combine(ys, lists, probs, T), ref)
    torch.testing.assert_close(ref, (x[:, None] * probs[..., None]).sum(1))


def test_combine_quick(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="compass"), caplog.at_level(logging.INFO, logger="compass_model"):
        res = _check_outputs(tmp_path, "combine", combine.run(tmp_path, quick=True))
    msgs = [r.getMessage() for r in caplog.records]          # progress, the per-shape lines, the files
    n = len(combine.shapes(True))
    assert any(m.startswith(f"[combine] shapes: {n}/{n}") for m in msgs), msgs
    assert sum(m.startswith("[combine] T=") for m in msgs) == n
    assert any(m.startswith("[combine] wrote ") for m in msgs), msgs
    assert len(res["shapes"]) == len(combine.shapes(True))
    for r in res["shapes"]:
        for key in ("fused_dispatch_ms", "megatron_dispatch_ms", "fused_combine_ms", "megatron_combine_ms",
                    "hf_combine_ms", "speedup_dispatch", "speedup_combine_megatron", "speedup_combine_hf"):
            assert r[key] > 0 and math.isfinite(r[key])
        assert r["speedup_combine_megatron"] == pytest.approx(r["megatron_combine_ms"] / r["fused_combine_ms"])
    assert set(res["geomean_speedup"]) == {"speedup_dispatch", "speedup_combine_megatron", "speedup_combine_hf"}


# ---- otpo-vs-dpo ---------------------------------------------------------------------------------

def test_perturb_last_number():
    rng = random.Random(0)
    for text in ('{"size": "42 EU"}', "Answer: 1234.50 IDR", "x 7"):
        out = otpo_vs_dpo.perturb_last_number(text, rng)
        assert len(out) == len(text)
        diffs = [i for i, (a, b) in enumerate(zip(text, out)) if a != b]
        assert len(diffs) == 1 and out[diffs[0]].isdigit()
    assert otpo_vs_dpo.perturb_last_number("no digits", rng) is None
    for _ in range(50):                              # never a new leading zero in a multi-digit number
        assert not otpo_vs_dpo.perturb_last_number("a 12", rng).startswith("a 0")


def test_concentration_hand_built():
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    diff = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    uniform = mask.float()
    c = otpo_vs_dpo.concentration(uniform, mask, diff)
    assert c[0].item() == pytest.approx(1.0)                 # DPO's uniform weights: exactly 1
    assert math.isnan(c[1].item())                           # no differing token: undefined
    # weights 1, 4, 1, 2 on the response (padding weight ignored): mass 4 / 8 on 1 of 4 tokens -> 2
    w = torch.tensor([[9.0, 1, 4, 1, 2, 9], [1, 1, 1, 1, 0, 0]])
    assert otpo_vs_dpo.concentration(w, mask, diff)[0].item() == pytest.approx((4 / 8) / (1 / 4))
    # a weight of 0 on the differing token -> 0
    w0 = torch.tensor([[0.0, 1, 0, 1, 2, 0], [1, 1, 1, 1, 0, 0]])
    assert otpo_vs_dpo.concentration(w0, mask, diff)[0].item() == 0.0
    nxt = otpo_vs_dpo.next_positions(diff, mask)
    assert nxt.nonzero().tolist() == [[0, 3]]


def test_diff_masks_hand_built():
    from compass_model.data import ByteTokenizer
    from compass_model.train.align import encode_pairs
    tok = ByteTokenizer()
    pairs = [{"prompt": "P:", "chosen": "size 42", "rejected": "size 43"},
             {"prompt": "Q", "chosen": "ab", "rejected": "abc"}]
    b = encode_pairs(pairs, tok, 32)
    dc, dr = otpo_vs_dpo.diff_masks(b)
    assert dc[0].sum() == 1 and dr[0].sum() == 1
    assert b.chosen_labels[0][dc[0]].tolist() == [ord("2")]
    assert b.rejected_labels[0][dr[0]].tolist() == [ord("3")]
    # "ab<eos>" vs "abc<eos>": the inserted "c" differs on the rejected side only
    assert dc[1].sum() == 0 and b.rejected_labels[1][dr[1]].tolist() == [ord("c")]


def test_make_pairs_differ_in_one_token():
    from compass_model.data import ByteTokenizer
    from compass_model.train.align import encode_pairs
    tok = ByteTokenizer()
    pairs = otpo_vs_dpo.make_pairs(6, 0, tok, 256)
    assert len(pairs) == 6
    b = encode_pairs(pairs, tok, 256)
    dc, dr = otpo_vs_dpo.diff_masks(b)
    assert dc.sum(-1).tolist() == [1] * 6 and dr.sum(-1).tolist() == [1] * 6


def test_otpo_vs_dpo_quick(tmp_path):
    res = _check_outputs(tmp_path, "otpo-vs-dpo", otpo_vs_dpo.run(tmp_path, quick=True))
    assert res["dpo_concentration"] == 1.0
    assert 0 < res["diff_token_fraction"] < 0.2
    assert set(res["weights"]) == {"random/eps1", "random/eps0.1", "lm_trained/eps1", "lm_trained/eps0.1"}
    for w in res["weights"].values():
        assert math.isfinite(w["concentration"]) and w["concentration"] >= 0
        assert math.isfinite(w["concentration_next"]) and w["concentration_next"] >= 0
        ex = w["example"]
        assert len(ex["chosen_weights"]) == len(ex["diff"]) == len(ex["tokens"]) and sum(ex["diff"]) == 1
        # OTPO weights on a side sum to min(n_chosen, n_rejected) = n here (equal lengths)
        assert sum(ex["chosen_weights"]) == pytest.approx(len(ex["chosen_weights"]), rel=1e-4)
    for m in ("reference", "dpo", "otpo"):
        a = res["accuracy"][m]
        assert 0 <= a["reward_accuracy"] <= 1 and 0 <= a["logp_accuracy"] <= 1
        assert a["n"] == res["setup"]["n_eval"]
    assert res["accuracy"]["reference"]["margin"] == pytest.approx(0, abs=1e-6)
