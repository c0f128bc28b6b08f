"""Experiment ``otpo-vs-dpo``: token weighting on pairs that differ in one token (experiment 4).

Pairs: generated ``extract`` and ``price`` tasks; chosen = the reference answer, rejected = the same
answer with ONE digit of its final number changed (the size in the JSON, the final price), so with
the byte tokenizer the two responses have equal length and differ in exactly one token.

Measured:
  * weight concentration: for each pair and side, (OTPO weight mass on the differing tokens / weight
    mass on the response) / (differing tokens / response tokens). DPO's implicit weights are uniform,
    so its concentration is exactly 1; > 1 means OTPO emphasises the differing tokens, < 1 that it
    de-emphasises them. ``concentration_next``: the same on the token right after each differing one
    (hidden[:, i] is the state before token i, so the differing token's own state is shared by both
    sides and the next position is the first whose state differs). Reported for a random-init model
    and a briefly LM-trained one, at the training eps (1.0) and a sharper eps (0.1).
  * preference accuracy on held-out pairs after a few DPO / OTPO steps from the same start
    (``compass_model.train.align.train_preference`` / ``preference_accuracy``).
"""

from __future__ import annotations

import copy
import difflib
import logging
import random
import re
import time

import torch

from compass_model.experiments.common import (
    finish,
    small_config,
    stage_data,
    train_lm,
)

logger = logging.getLogger(__name__)
NAME = "otpo-vs-dpo"
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def perturb_last_number(text: str, rng: random.Random) -> str | None:
    """``text`` with one digit of its last number replaced by another digit (no new leading zero);
    None if there is no number."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    digits = [i for i in range(m.start(), m.end()) if text[i].isdigit()]
    pos = rng.choice(digits)
    choices = [d for d in "0123456789" if d != text[pos] and not (d == "0" and pos == m.start() and len(digits) > 1)]
    return text[:pos] + rng.choice(choices) + text[pos + 1:]


def make_pairs(n: int, seed: int, tokenizer, max_len: int, families=("extract", "price")) -> list:
    """``n`` one-token-different pairs (``perturb_last_number``) of generated tasks that fit ``max_len``."""
    from compass_model.data import make_tasks
    from compass_model.train.align import pair_fits
    rng = random.Random(f"otpo-vs-dpo/{seed}")
    out, batch_seed = [], seed
    while len(out) < n:
        for t in make_tasks(4 * n, seed=batch_seed, families=families):
            rej = perturb_last_number(t.answer, rng)
            if rej is None or rej == t.answer:
                continue
            pair = {"prompt": t.prompt, "chosen": t.answer, "rejected": rej, "lang": t.lang, "family": t.family}
            if pair_fits(pair, tokenizer, max_len):
                out.append(pair)
                if len(out) == n:
                    break
        batch_seed += 7919
    return out


def diff_masks(batch) -> tuple:
    """``(diff_chosen [N, L], diff_rejected [N, L])`` bool: response positions (by prediction position)
    whose label is not part of the longest common alignment of the two responses (difflib opcodes;
    for equal-length substitutions exactly the positions where the labels differ)."""
    dc = torch.zeros_like(batch.chosen_mask)
    dr = torch.zeros_like(batch.rejected_mask)
    for i in range(len(batch)):
        pc = batch.chosen_mask[i].nonzero().flatten().tolist()
        pr = batch.rejected_mask[i].nonzero().flatten().tolist()
        a = batch.chosen_labels[i, pc].tolist()
        b = batch.rejected_labels[i, pr].tolist()
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
            if tag != "equal":
                for p in pc[i1:i2]:
                    dc[i, p] = True
                for p in pr[j1:j2]:
                    dr[i, p] = True
    return dc, dr


def concentration(w: torch.Tensor, mask: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """Per row: ``(sum w[diff] / sum w[mask]) / (|diff| / |mask|)``; NaN for a row without differing
    tokens or weight. Uniform weights give exactly 1."""
    w = w.double() * mask
    d = (diff & mask.bool()).double()
    frac_w = (w * d).sum(-1) / w.sum(-1)
    frac_n = d.sum(-1) / mask.double().sum(-1)
    out = frac_w / frac_n
    return torch.where((frac_n > 0) & (w.sum(-1) > 0), out, torch.full_like(out, float("nan")))


def next_positions(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The response positions right after each differing one: the first whose predicting hidden state
    (``hidden[:, i]`` is the state *before* token i) has seen the difference."""
    nxt = torch.zeros_like(diff)
    nxt[:, 1:] = diff[:, :-1]
    return nxt & mask.bool() & ~diff


def _nanmean(t: torch.Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else float("nan")


@torch.no_grad()
def weight_stats(model, batch, eps: float, tau: float = 0.2) -> dict:
    """OTPO weights on ``batch`` from ``model``'s hidden states: concentration per side (mean over
    pairs), mean weight on differing / on other response tokens, and the first pair's weights."""
    from compass_model.losses import otpo_weights
    model.eval()
    B = len(batch)
    out = model(torch.cat([batch.chosen_ids, batch.rejected_ids]))
    h = out.hidden.float()
    w_c, w_r = otpo_weights(h[:B], h[B:], batch.chosen_mask, batch.rejected_mask, eps=eps, tau=tau)
    dc, dr = diff_masks(batch)
    cc = concentration(w_c, batch.chosen_mask, dc)
    cr = concentration(w_r, batch.rejected_mask, dr)
    nc = concentration(w_c, batch.chosen_mask, next_positions(dc, batch.chosen_mask))
    nr = concentration(w_r, batch.rejected_mask, next_positions(dr, batch.rejected_mask))
    m0 = batch.chosen_mask[0]
    return {
        "eps": eps, "tau": tau,
        "concentration_chosen": _nanmean(cc), "concentration_rejected": _nanmean(cr),
        "concentration": _nanmean(torch.cat([cc, cr])),
        "concentration_next": _nanmean(torch.cat([nc, nr])),
        "weight_on_diff": float(torch.cat([w_c[dc], w_r[dr]]).mean()),
        "weight_off_diff": float(torch.cat([w_c[batch.chosen_mask & ~dc], w_r[batch.rejected_mask & ~dr]]).mean()),
        "weight_min": float(w_c[batch.chosen_mask].min()), "weight_max": float(w_c[batch.chosen_mask].max()),
        "example": {"chosen_weights": w_c[0, m0].tolist(), "diff": dc[0, m0].tolist(),
                    "tokens": batch.chosen_labels[0, m0].tolist()},
    }


def run(out_dir, *, quick: bool = False, seed: int = 0) -> dict:
    """Weight statistics and DPO / OTPO training, write ``otpo-vs-dpo.json`` and ``.png`` under ``out_dir``."""
    from compass_model.data import ByteTokenizer
    from compass_model.train.align import (
        encode_pairs,
        preference_accuracy,
        reference_logprobs,
        train_preference,
    )
    t0 = time.perf_counter()
    tok = ByteTokenizer()
    if quick:
        p = {"pre_steps": 4, "pre_rows": 4, "pre_seq": 64, "n_train": 8, "n_eval": 8, "steps": 3, "micro": 4,
             "lr": 1e-3, "max_len": 200, "families": ("extract",), "n_layers": 1, "pool": 200}
    else:
        p = {"pre_steps": 600, "pre_rows": 8, "pre_seq": 128, "n_train": 256, "n_eval": 128, "steps": 150, "micro": 8,
             "lr": 5e-4, "max_len": 256, "families": ("extract", "price"), "n_layers": 2, "pool": 2000}
    pairs = make_pairs(p["n_train"] + p["n_eval"], seed + 2, tok, p["max_len"], p["families"])
    train = encode_pairs(pairs[:p["n_train"]], tok, p["max_len"])
    held = encode_pairs(pairs[p["n_train"]:], tok, p["max_len"])
    dc, dr = diff_masks(held)
    diff_frac = float(torch.cat([dc.sum(-1), dr.sum(-1)]).double().sum()
                      / torch.cat([held.chosen_mask.sum(-1), held.rejected_mask.sum(-1)]).double().sum())
    cfg = small_config(n_layers=p["n_layers"], max_seq_len=p["max_len"])

    torch.manual_seed(seed)
    from compass_model.model import CompassForCausalLM
    random_model = CompassForCausalLM(cfg)
    pre = train_lm(cfg, stage_data("ecommerce", p["pre_seq"], p["pre_rows"], seed, p["pool"]), p["pre_steps"],
                   seed=seed, progress=True)
    base = pre["model"]
    weights = {}
    for label, model in (("random", random_model), ("lm_trained", base)):
        for eps in (1.0, 0.1):
            s = weight_stats(model, held, eps)
            weights[f"{label}/eps{eps:g}"] = s
            logger.info(f"[{NAME}] weights {label:>10} eps {eps:g}: concentration {s['concentration']:.3f} "
                       f"(diff {s['weight_on_diff']:.3f} vs other {s['weight_off_diff']:.3f}); "
                       f"next token {s['concentration_next']:.3f}")

    ref_train = reference_logprobs(base, train)
    ref_held = reference_logprobs(base, held)
    acc = {"reference": preference_accuracy(base, held, ref_held)}
    methods = {"dpo": {"method": "dpo"}, "otpo": {"method": "otpo", "eps": 1.0}}
    if not quick:
        methods["otpo-eps0.1"] = {"method": "otpo", "eps": 0.1}
    curves = {}
    for name, kw in methods.items():
        t = time.perf_counter()
        model = copy.deepcopy(base)
        recs = train_preference(model, train, ref_train, steps=p["steps"], lr=p["lr"], micro_batch=p["micro"],
                                warmup_steps=min(5, p["steps"] - 1), seed=seed, progress=True, **kw)
        a = preference_accuracy(model, held, ref_held)
        a["train_loss_first"], a["train_loss_last"] = recs[0]["loss"], recs[-1]["loss"]
        a["seconds"] = round(time.perf_counter() - t, 2)
        acc[name] = a
        curves[name] = [r["loss"] for r in recs]
        logger.info(f"[{NAME}] {name:>11}: held-out reward acc {a['reward_accuracy']:.3f}  logp acc {a['logp_accuracy']:.3f}  "
                   f"margin {a['margin']:.4f}  ({a['seconds']} s)")
    result = {
        "setup": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}, "seed": seed,
                  "n_layers": cfg.n_layers, "beta": 0.1, "pretrain_final_lm": pre["records"][-1]["lm"],
                  "threads": torch.get_num_threads()},
        "diff_token_fraction": diff_frac,
        "dpo_concentration": 1.0,
        "weights": weights,
        "accuracy": acc,
        "train_loss": curves,
        "example_pair": {k: pairs[p["n_train"]][k] for k in ("prompt", "chosen", "rejected")},
    }
    return finish(out_dir, NAME, result, _plot, quick=quick, t0=t0)


def _plot(plt, result, path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4), gridspec_kw={"width_ratios": [2, 1]})
    ex = result["weights"]["lm_trained/eps0.1"]["example"]
    n = len(ex["chosen_weights"])
    colors = ["C3" if d else "C0" for d in ex["diff"]]
    a.bar(range(n), ex["chosen_weights"], color=colors)
    a.axhline(1.0, color="k", lw=0.8, ls="--", label="DPO (uniform)")
    labels = [chr(t) if 32 <= t < 127 else "·" for t in ex["tokens"]]
    a.set_xticks(range(n))
    a.set_xticklabels(labels, fontsize=6)
    a.set_title("OTPO weights, chosen response of one held-out pair (red: differs), eps 0.1")
    a.legend(fontsize=8)
    keys = list(result["weights"])
    b.bar(range(len(keys) + 1), [1.0] + [result["weights"][k]["concentration"] for k in keys],
          color=["C7"] + ["C1"] * len(keys))
    b.axhline(1.0, color="k", lw=0.8, ls="--")
    b.set_xticks(range(len(keys) + 1))
    b.set_xticklabels(["DPO"] + keys, rotation=30, fontsize=7)
    b.set_title("weight concentration on differing tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
