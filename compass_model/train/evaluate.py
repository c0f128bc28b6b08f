"""Evaluation of a Compass model: task accuracy (per language and family), long-context retrieval at
1x and 4x context, MTP speculative decoding (acceptance, speed-up), held-out perplexity and expert load.

Everything here runs under ``torch.no_grad()`` in eval mode (the model's previous mode is restored
afterwards) and returns plain JSON-serialisable dicts (floats, ints, strs, lists, dicts).

How a task is asked: SFT trains on ``[BOS] prompt response [EOS]``, so the model is prompted with
``[BOS] + encode(prompt)``, decodes greedily until EOS, and the text before EOS is the response that
``compass_model.data.check`` judges. The generation budget per family is the longest gold answer of
that family in the evaluated set + ``ANSWER_SLACK`` tokens (capped at ``MAX_ANSWER_TOKENS``): the
checker must see the whole answer, and a model that rambles past it is cut off either way.

Prompts with the same token length are decoded together as one batch: the KV-cache decode has no
padding mask, so prompts of different lengths cannot share a batch. A prompt that leaves no room to
generate within ``model.config.max_seq_len`` gets the response ``""`` (a wrong answer, not an error).

Perplexity and expert load are measured on held-out generated corpus text (``generate_corpus`` with
``seed + 1``; training reads the stage seed), packed into document-isolated rows like pretraining.
Expert load counts routing decisions of real tokens only (padding is excluded), trunk MoE layers
only (the MTP module does not run without labels).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from compass_model.data import (
    CorpusConfig,
    check,
    generate_corpus,
    make_tasks,
    pack_pretraining,
)
from compass_model.data.passkey import CODE_DIGITS, check_passkey, make_passkey_tasks
from compass_model.generate import generate
from compass_model.train.data import EVAL_TASK_SEED, catalogue_items

ANSWER_SLACK = 16              # tokens allowed past the longest gold answer of a family
MAX_ANSWER_TOKENS = 192        # cap on the per-family budget (price reasoning is ~110 bytes)
GENERATE_BATCH = 16            # at most this many same-length prompts per generate call
FORWARD_BATCH = 8              # packed rows per forward in perplexity / router load
SAMPLES_PER_FAMILY = 2         # examples kept in "samples" (first ones of each family, input order)


@contextlib.contextmanager
def _inference(model):
    """``torch.no_grad()`` + eval mode, restoring the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _prompt_ids(tokenizer, prompt: str) -> list:
    head = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    return head + tokenizer.encode(prompt)


def _ratio(k: int, n: int) -> float:
    return float(k) / n if n else 0.0


# ---- generation and task accuracy -----------------------------------------------------------------

def generate_answers(model, tokenizer, prompts: list, max_new_tokens: int, counter=None) -> list:
    """Greedy responses (text before the first EOS) to ``prompts``, in order.

    Each prompt is fed as ``[BOS] + encode(prompt)``; generation stops at EOS and is clipped so that
    prompt + new tokens <= ``model.config.max_seq_len``. A prompt with no room left answers ``""``.
    Generated ids outside the tokenizer's vocabulary (a model ``vocab_size`` rounded up) are dropped.
    Prompts of equal token length are batched together (up to ``GENERATE_BATCH``). ``counter``: a
    ``progress.progress`` advanced by the number of prompts answered."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_len = model.config.max_seq_len
    eos, vocab = tokenizer.eos_id, tokenizer.vocab_size
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    out = [""] * len(prompts)
    by_len = defaultdict(list)
    for i, x in enumerate(ids):
        by_len[len(x)].append(i)
    device = _device(model)
    with _inference(model):
        for length, idx in sorted(by_len.items()):
            budget = min(max_new_tokens, max_len - length)
            if length < 1 or budget < 1:            # no room to answer: counts as a wrong (empty) answer
                if counter is not None:
                    counter.update(len(idx))
                continue
            for s in range(0, len(idx), GENERATE_BATCH):
                chunk = idx[s:s + GENERATE_BATCH]
                prompt_BS = torch.tensor([ids[i] for i in chunk], dtype=torch.long, device=device)
                tokens = generate(model, prompt_BS, budget, stop_id=eos).tokens[:, length:].tolist()
                for i, new in zip(chunk, tokens):
                    if eos in new:
                        new = new[:new.index(eos)]
                    # ids past the tokenizer's vocabulary (the embedding's round-up rows) are dropped
                    out[i] = tokenizer.decode([x for x in new if x < vocab])
                if counter is not None:
                    counter.update(len(chunk))
    return out


def _answer_budget(tokenizer, tasks) -> int:
    longest = max(len(tokenizer.encode(t.answer)) for t in tasks)
    return min(MAX_ANSWER_TOKENS, longest + ANSWER_SLACK)


def _accuracy_table(keys, oks) -> dict:
    hits, counts = defaultdict(int), defaultdict(int)
    for k, ok in zip(keys, oks):
        counts[k] += 1
        hits[k] += int(ok)
    return {k: {"accuracy": _ratio(hits[k], counts[k]), "n": counts[k]} for k in sorted(counts)}


def evaluate_tasks(model, tokenizer, tasks, max_new_tokens: int | None = None, counter=None) -> dict:
    """Accuracy of greedy answers on ``tasks`` (``compass_model.data.Task``) judged by ``check``.

    ``max_new_tokens``: one budget for every task; None (default) = per family, the longest gold
    answer of that family + ``ANSWER_SLACK``, capped at ``MAX_ANSWER_TOKENS``.
    Returns ``{"accuracy", "n", "per_language": {lang: {"accuracy", "n"}}, "per_family": {...},
    "samples": [{"family", "lang", "prompt", "response", "gold", "ok"}]}`` (the first
    ``SAMPLES_PER_FAMILY`` tasks of each family, in input order)."""
    tasks = list(tasks)
    responses = [""] * len(tasks)
    by_family = defaultdict(list)
    for i, t in enumerate(tasks):
        by_family[t.family].append(i)
    for idx in by_family.values():
        fam_tasks = [tasks[i] for i in idx]
        budget = max_new_tokens if max_new_tokens is not None else _answer_budget(tokenizer, fam_tasks)
        for i, r in zip(idx, generate_answers(model, tokenizer, [t.prompt for t in fam_tasks], budget, counter)):
            responses[i] = r
    oks = [check(t, r) for t, r in zip(tasks, responses)]
    samples, kept = [], defaultdict(int)
    for t, r, ok in zip(tasks, responses, oks):
        if kept[t.family] < SAMPLES_PER_FAMILY:
            kept[t.family] += 1
            samples.append({"family": t.family, "lang": t.lang, "prompt": t.prompt, "response": r,
                            "gold": t.answer, "ok": bool(ok)})
    return {
        "accuracy": _ratio(sum(oks), len(oks)),
        "n": len(oks),
        "per_language": _accuracy_table([t.lang for t in tasks], oks),
        "per_family": _accuracy_table([t.family for t in tasks], oks),
        "samples": samples,
    }


def long_context_eval(model, tokenizer, base_context: int, n: int = 14, seed: int = EVAL_TASK_SEED,
                      factors=(("1x", 1), ("4x", 4)), counter=None) -> dict:
    """Voucher-code retrieval (``data.passkey``: one code hidden at a random depth of a catalogue
    filling the context) at ``factor x base_context`` tokens for each ``(name, factor)`` of
    ``factors``: ``{name: {"context", "accuracy", "n", "mean_depth_of_misses"}}``. A context beyond
    ``model.config.max_seq_len`` is reported as ``{"context", "skipped": True, "reason"}``.
    ``counter``: progress, as in ``generate_answers``."""
    out = {}
    max_len = model.config.max_seq_len
    for name, factor in factors:
        ctx = int(factor * base_context)
        if ctx > max_len:
            out[name] = {"context": ctx, "skipped": True,
                         "reason": f"context {ctx} exceeds the model's max_seq_len {max_len}"}
            if counter is not None:
                counter.update(n)
            continue
        tasks = make_passkey_tasks(n, seed=seed, context=ctx)
        answers = generate_answers(model, tokenizer, [t.prompt for t in tasks], CODE_DIGITS + 2, counter)
        oks = [check_passkey(t, a) for t, a in zip(tasks, answers)]
        misses = [t.meta["depth"] for t, ok in zip(tasks, oks) if not ok]
        out[name] = {"context": ctx, "accuracy": _ratio(sum(oks), len(oks)), "n": len(oks),
                     "mean_depth_of_misses": sum(misses) / len(misses) if misses else None}
    return out


def speculative_eval(model, tokenizer, n: int = 8, max_new_tokens: int = 96, seed: int = EVAL_TASK_SEED) -> dict:
    """MTP self-speculative decoding on ``n`` held-out task prompts (batch 1, greedy), against plain
    greedy decoding of the same prompts: ``{"acceptance_rate"`` (accepted drafts / proposed drafts,
    the mean over prompts), ``"tokens_per_trunk_forward"``, ``"speedup"`` (plain wall time / speculative wall
    time, this machine), ``"identical"`` (the outputs match token for token, as they must),
    ``"n", "tokens"}``; ``{"skipped": True, "reason"}`` without an MTP module."""
    if model.config.mtp_depth < 1:
        return {"skipped": True, "reason": "the model has no MTP module (mtp_depth = 0)"}
    tasks = make_tasks(n, seed=seed + 7, families=("extract", "classify", "price", "relevance"))
    device = _device(model)
    rates, forwards, tokens = [], 0, 0
    t_plain = t_spec = 0.0
    identical = True
    with _inference(model):
        for t in tasks:
            ids = torch.tensor([_prompt_ids(tokenizer, t.prompt)], dtype=torch.long, device=device)
            budget = min(max_new_tokens, model.config.max_seq_len - ids.shape[1])
            if budget < 2:
                continue
            t0 = time.perf_counter()
            plain = generate(model, ids, budget, stop_id=tokenizer.eos_id)
            t1 = time.perf_counter()
            spec = generate(model, ids, budget, speculative=True, stop_id=tokenizer.eos_id)
            t2 = time.perf_counter()
            t_plain, t_spec = t_plain + (t1 - t0), t_spec + (t2 - t1)
            identical &= plain.tokens.shape == spec.tokens.shape and bool((plain.tokens == spec.tokens).all())
            if spec.acceptance_rate is not None:
                rates.append(spec.acceptance_rate)
            forwards += spec.trunk_forwards
            tokens += spec.tokens.shape[1] - ids.shape[1]
    return {"acceptance_rate": sum(rates) / len(rates) if rates else 0.0,
            "tokens_per_trunk_forward": _ratio(tokens, forwards),
            "speedup": t_plain / t_spec if t_spec > 0 else None, "identical": identical, "n": len(tasks),
            "tokens": tokens}


# ---- perplexity and expert load -------------------------------------------------------------------

def _trunk_moe_routers(model) -> list:
    """Routers of the trunk's MoE blocks, in depth order (the MTP module is not run here)."""
    from compass_model.moe import MoE

    return [layer.ffn.router for layer in model.layers if isinstance(layer.ffn, MoE)]


def _packed_pass(model, tokenizer, texts, seq_len: int):
    """One no-grad pass over ``texts`` packed into rows of ``seq_len`` (clipped to max_seq_len) ->
    (summed token NLL, predicted tokens, per-MoE-layer expert counts over real tokens [E] each)."""
    seq_len = min(seq_len, model.config.max_seq_len)
    docs = [tokenizer.encode(t, bos=True, eos=True) for t in texts]
    if not docs:
        raise ValueError("no texts to evaluate")
    batch = pack_pretraining(docs, seq_len, tokenizer.pad_id)
    device = _device(model)
    routers = _trunk_moe_routers(model)
    counts = [torch.zeros(r.weight.shape[0], dtype=torch.float64) for r in routers]
    real = {}                                          # the current chunk's non-padding token mask [T]

    def hook(k):
        def record(module, inputs, output):
            ids_TK = output[2][real["mask"]]           # Router.forward -> logits, scores, ids, gates
            counts[k] += torch.bincount(ids_TK.reshape(-1).cpu(), minlength=counts[k].numel()).double()
        return record

    handles = [r.register_forward_hook(hook(k)) for k, r in enumerate(routers)]
    nll, n_tok = 0.0, 0
    try:
        with _inference(model):
            for s in range(0, batch.input_ids.shape[0], FORWARD_BATCH):
                rows = slice(s, s + FORWARD_BATCH)
                doc_ids = batch.doc_ids[rows]
                real["mask"] = (doc_ids != 0).reshape(-1).to(device)
                out = model(batch.input_ids[rows].to(device), position_ids=batch.position_ids[rows].to(device),
                            attention_mask=batch.attention_mask()[rows].to(device))
                labels = batch.labels[rows].to(device)
                # fp64 log-softmax and sum: a uniform model gives exactly ln V per token
                nll += float(F.cross_entropy(out.logits.double().flatten(0, 1), labels.flatten(),
                                             ignore_index=-100, reduction="sum"))
                n_tok += int((labels != -100).sum())
    finally:
        for h in handles:
            h.remove()
    return nll, n_tok, counts


def _perplexity_from(nll: float, n_tok: int) -> float:
    if n_tok == 0:
        raise ValueError("no predicted tokens: every text is a single token")
    return float(math.exp(nll / n_tok))


def _router_from(counts) -> dict:
    entropy, load = [], []
    for c in counts:
        E, total = c.numel(), float(c.sum())
        f = c / total if total > 0 else c
        h = float(-torch.xlogy(f, f).sum() / math.log(E)) if E > 1 else 1.0
        entropy.append(h)
        load.append([float(x) for x in f])
    return {"entropy": entropy, "load": load,
            "mean_entropy": float(sum(entropy) / len(entropy)) if entropy else 0.0}


def perplexity(model, tokenizer, texts, seq_len: int) -> float:
    """``exp(mean next-token NLL)`` over ``texts`` (each ``[BOS] text [EOS]``) packed into
    document-isolated rows of ``seq_len`` (clipped to ``max_seq_len``); padding is not counted."""
    nll, n_tok, _ = _packed_pass(model, tokenizer, texts, seq_len)
    return _perplexity_from(nll, n_tok)


def router_load(model, tokenizer, texts, seq_len: int) -> dict:
    """Expert load of the trunk's MoE layers on ``texts``: ``{"entropy": [per layer H(f) / log E],
    "load": [per layer [per-expert fraction of routing decisions]], "mean_entropy"}`` (1 = uniform,
    0 = every token on the same experts). Padding tokens are excluded."""
    _, _, counts = _packed_pass(model, tokenizer, texts, seq_len)
    return _router_from(counts)


# ---- everything -------------------------------------------------------------------------------------

def evaluate_model(model, tokenizer, *, seed: int = EVAL_TASK_SEED, n_tasks: int = 70, base_context: int = 256,
                   n_long: int = 14, n_docs: int = 64, n_speculative: int = 8, progress: bool = True,
                   desc: str = "eval") -> dict:
    """The evaluation report: ``{"accuracy", "n_tasks", "per_language", "per_family", "samples",
    "long_context", "speculative", "perplexity", "router"}``.

    Tasks: ``make_tasks(n_tasks, seed)`` with catalogues sized for ``base_context``, keeping those whose
    ``[BOS] prompt answer [EOS]`` fits ``base_context`` tokens. Perplexity and router load: ``n_docs``
    held-out corpus documents (``generate_corpus`` seed ``seed + 1``) in rows of ``base_context``.
    Long context: ``n_long`` voucher-code retrievals at 1x and 4x (``long_context_eval``; 0 skips
    them); speculative decoding: ``n_speculative`` prompts (``speculative_eval``; 0 skips it).
    ``progress``: report answered prompts as it goes (``progress.py``: a bar on a terminal, else log lines)."""
    from compass_model.train.progress import progress as counter_for

    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise ValueError(f"n_tasks must be an int >= 1, got {n_tasks!r}")
    all_tasks = make_tasks(n_tasks, seed=seed, n_items=catalogue_items(base_context))
    tasks = [t for t in all_tasks
             if len(tokenizer.encode(t.prompt)) + len(tokenizer.encode(t.answer)) + 2 <= base_context]
    with counter_for(len(tasks) + 2 * n_long + 1, desc, enabled=progress) as counter:
        res = evaluate_tasks(model, tokenizer, tasks, counter=counter) if tasks else {
            "accuracy": 0.0, "n": 0, "per_language": {}, "per_family": {}, "samples": []}
        long_context = (long_context_eval(model, tokenizer, base_context, n=n_long, seed=seed, counter=counter)
                        if n_long else {})
        texts = [d["text"] for d in generate_corpus(CorpusConfig(seed=seed + 1, n_docs=n_docs))]
        nll, n_tok, counts = _packed_pass(model, tokenizer, texts, base_context)
        counter.update(1)
    return {
        "accuracy": res["accuracy"],
        "n_tasks": res["n"],
        "n_tasks_dropped": len(all_tasks) - len(tasks),
        "per_language": res["per_language"],
        "per_family": res["per_family"],
        "long_context": long_context,
        "speculative": (speculative_eval(model, tokenizer, n=n_speculative, seed=seed) if n_speculative
                        else {"skipped": True, "reason": "n_speculative = 0"}),
        "perplexity": _perplexity_from(nll, n_tok),
        "router": _router_from(counts),
        "samples": res["samples"],
    }
