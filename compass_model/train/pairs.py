"""Preference pairs for alignment: mixed-policy pair building, encoding, per-token reference log-probs.

``build_pairs``: chosen = the task's reference answer (off-policy), rejected = a sample of the SFT
model that ``compass_model.data.check`` marks wrong (on-policy); ``pairs_from_records`` takes user
``{"prompt","chosen","rejected"}`` records instead. ``encode_pairs`` -> ``PairBatch``: each side
``[BOS] prompt response [EOS]`` right-padded to a shared length, per-token tensors indexed by
prediction position (``compass_model.losses``). ``reference_logprobs`` computes the reference
model's per-token log-probs once; ``save_reference`` / ``load_reference`` cache them (safetensors,
with a fingerprint of the pairs). Training on them: ``compass_model.train.align``.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compass_model.data import check
from compass_model.generate import generate
from compass_model.losses import IGNORE_INDEX, token_logprobs
from compass_model.moe import aux_loss_coefficient
from compass_model.train.progress import progress

PAIR_KEYS = ("prompt", "chosen", "rejected", "lang", "family")


# ---- 1. pairs ------------------------------------------------------------------------------------

def _generate_supports_stop() -> bool:
    return "stop_id" in inspect.signature(generate).parameters


def _cut_at_eos(ids: list, eos_id: int) -> list:
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def build_pairs(model, tokenizer, tasks, *, max_new_tokens: int | None = None, temperature: float = 1.0,
                top_p: float = 0.95, seed: int = 0, tries: int = 2, max_len: int | None = None):
    """Mixed-policy pairs ``(pairs, stats)``: chosen = ``task.answer`` (off-policy), rejected = a sample
    of ``model`` given ``[BOS] prompt`` that fails ``check`` (on-policy).

    Each try draws one sample (cut at the first EOS); an empty or correct sample is rejected and the
    task is sampled again, up to ``tries`` samples. A task without a valid rejected sample is dropped:
    ``stats["dropped_correct"]`` if any of its samples was correct, else ``stats["dropped_empty"]``.
    ``max_new_tokens``: sample length (None: twice the answer's length + 16); always capped by the
    model's context and, if ``max_len`` is given, by ``max_len`` (so the encoded pair fits) — tasks whose
    chosen side alone does not fit ``max_len`` are dropped (``stats["dropped_long"]``).
    Deterministic: one ``torch.Generator`` seeded with ``seed``, tasks sampled in order.

    Pair dicts: ``{"prompt", "chosen", "rejected", "lang", "family"}``.
    """
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    eos = tokenizer.eos_id
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ctx = model.config.max_seq_len if max_len is None else min(max_len, model.config.max_seq_len)
    stop_kw = {"stop_id": eos} if _generate_supports_stop() else {}
    stats = {"tasks": len(tasks), "samples": 0, "correct_samples": 0, "empty_samples": 0, "dropped_correct": 0,
             "dropped_empty": 0, "dropped_long": 0, "kept": 0}
    pairs = []
    counter = progress(len(tasks), "building preference pairs (tasks sampled)")
    for task in tasks:
        counter.update(1)
        prompt_ids = head + tokenizer.encode(task.prompt)
        answer_len = len(tokenizer.encode(task.answer))
        budget = ctx - len(prompt_ids) - 1                # room for response + EOS
        if answer_len + 1 > budget:
            stats["dropped_long"] += 1
            continue
        n_new = min(max_new_tokens or 2 * answer_len + 16, budget)
        ids = torch.tensor([prompt_ids], device=device)
        rejected, saw_correct = None, False
        for _ in range(tries):
            out = generate(model, ids, n_new, temperature=temperature, top_p=top_p, generator=gen, **stop_kw)
            new = _cut_at_eos(out.tokens[0, len(prompt_ids):].tolist(), eos)
            # a model's vocabulary may be rounded up past the tokenizer's: those ids decode to nothing
            text = tokenizer.decode([i for i in new if i < tokenizer.vocab_size])
            # a cut multi-byte character decodes to U+FFFD (3 bytes): keep the re-encoded pair in budget
            while text and len(tokenizer.encode(text)) + 1 > budget:
                text = text[:-1]
            stats["samples"] += 1
            if not text.strip():
                stats["empty_samples"] += 1
            elif check(task, text):
                stats["correct_samples"] += 1
                saw_correct = True
            else:
                rejected = text
                break
        if rejected is None:
            stats["dropped_correct" if saw_correct else "dropped_empty"] += 1
            continue
        pairs.append({"prompt": task.prompt, "chosen": task.answer, "rejected": rejected, "lang": task.lang,
                      "family": task.family})
    counter.close()
    stats["kept"] = len(pairs)
    return pairs, stats


def pairs_from_records(records) -> list:
    """User preference records (``PreferenceRecord`` from ``load_preference_jsonl``, or dicts with
    ``prompt``/``chosen``/``rejected``) -> pair dicts (``lang`` None, ``family`` ``"user"``)."""
    out = []
    for r in records:
        get = (lambda k, r=r: r[k]) if isinstance(r, dict) else (lambda k, r=r: getattr(r, k))
        out.append({"prompt": get("prompt"), "chosen": get("chosen"), "rejected": get("rejected"),
                    "lang": r.get("lang") if isinstance(r, dict) else None,
                    "family": (r.get("family") if isinstance(r, dict) else None) or "user"})
    return out


# ---- 2. encoding ---------------------------------------------------------------------------------

@dataclass
class PairBatch:
    """``N`` preference pairs as right-padded ``[N, L]`` tensors (both sides share ``L``).

    ``*_ids`` int64 (pad_id on padding), ``*_labels`` int64 (the token each position predicts on the
    response, -100 elsewhere), ``*_mask`` bool (``labels != -100``: response tokens and the EOS, by
    prediction position)."""
    chosen_ids: torch.Tensor
    chosen_labels: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_labels: torch.Tensor
    rejected_mask: torch.Tensor

    def __len__(self) -> int:
        return self.chosen_ids.shape[0]

    def select(self, idx) -> PairBatch:
        """Rows ``idx`` (a slice, list or index tensor)."""
        return PairBatch(*(getattr(self, f.name)[idx] for f in fields(self)))

    def to(self, device) -> PairBatch:
        """The batch with every tensor on ``device``."""
        return PairBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def fingerprint(self) -> str:
        """A hash of the token ids and labels: ties cached reference log-probs to this exact batch."""
        h = hashlib.sha256()
        for f in fields(self):
            t = getattr(self, f.name).detach().cpu().contiguous()
            h.update(f.name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).numpy().tobytes())
        return h.hexdigest()


def _encode_side(prompt_ids: list, response_ids: list, tokenizer) -> tuple:
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids = head + prompt_ids + response_ids + [tokenizer.eos_id]
    first = len(head) + len(prompt_ids)           # index of the first response token in ids
    # position i predicts ids[i + 1]: a label for i + 1 >= first, i.e. i >= first - 1
    labels = [IGNORE_INDEX] * (first - 1) + ids[first:] + [IGNORE_INDEX]
    return ids, labels


def encode_pairs(pairs, tokenizer, max_len: int) -> PairBatch:
    """Pair dicts -> ``PairBatch`` of ``[BOS] prompt response [EOS]`` sequences, right-padded to the
    longest sequence of either side. Raises ValueError naming the pair index if a side exceeds
    ``max_len`` tokens (cutting would drop the end of the response and its EOS) or a response is empty."""
    if not pairs:
        raise ValueError("encode_pairs needs at least one pair")
    sides = {"chosen": [], "rejected": []}
    for k, p in enumerate(pairs):
        prompt_ids = tokenizer.encode(p["prompt"])
        for side in ("chosen", "rejected"):
            resp = tokenizer.encode(p[side])
            if not resp:
                raise ValueError(f"pair {k}: empty {side} response")
            ids, labels = _encode_side(prompt_ids, resp, tokenizer)
            if len(ids) > max_len:
                raise ValueError(f"pair {k}: {side} side is {len(ids)} tokens (prompt {len(prompt_ids)}, "
                                 f"response {len(resp)}, + specials) > max_len {max_len}")
            sides[side].append((ids, labels))
    L = max(len(ids) for seqs in sides.values() for ids, _ in seqs)
    out = {}
    for side, seqs in sides.items():
        ids_t = torch.full((len(seqs), L), tokenizer.pad_id, dtype=torch.long)
        lab_t = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, labels) in enumerate(seqs):
            ids_t[r, :len(ids)] = torch.tensor(ids)
            lab_t[r, :len(labels)] = torch.tensor(labels)
        out[f"{side}_ids"], out[f"{side}_labels"], out[f"{side}_mask"] = ids_t, lab_t, lab_t != IGNORE_INDEX
    return PairBatch(**out)


def pair_fits(pair: dict, tokenizer, max_len: int) -> bool:
    """Whether both sides of ``pair`` encode to at most ``max_len`` tokens."""
    n_prompt = len(tokenizer.encode(pair["prompt"])) + 1 + (tokenizer.bos_id is not None)
    return all(n_prompt + len(tokenizer.encode(pair[s])) <= max_len for s in ("chosen", "rejected"))


# ---- 3. reference log-probs ----------------------------------------------------------------------

def model_device(model):
    """The device of ``model``'s parameters."""
    return next(model.parameters()).device


def forward_pairs(model, b: PairBatch):
    """One forward on chosen + rejected concatenated -> (logp_c [B, L], logp_r [B, L], hidden_c,
    hidden_r [B, L, D], router term (aux + z, weighted as in ``CompassForCausalLM.forward``))."""
    B = len(b)
    out = model(torch.cat([b.chosen_ids, b.rejected_ids]))
    lp = token_logprobs(out.logits, torch.cat([b.chosen_labels, b.rejected_labels]))
    c = model.config
    router = aux_loss_coefficient(c, model.step) * out.losses["aux"] + c.z_loss_coef * out.losses["z"]
    return lp[:B], lp[B:], out.hidden[:B], out.hidden[B:], router


@torch.no_grad()
def pair_logprobs(model, batch: PairBatch, micro_batch: int, desc: str | None = None):
    """Per-token log-probs ``(chosen [N, L], rejected [N, L])`` of ``model`` on ``batch``, fp32,
    in eval mode without grad, ``micro_batch`` pairs per forward (the training mode is restored).
    ``desc``: report the pairs done under that label (``progress.py``; None: silently)."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    try:
        cs, rs = [], []
        with progress(len(batch), desc or "", enabled=desc is not None) as counter:
            for i in range(0, len(batch), micro_batch):
                lp_c, lp_r, *_ = forward_pairs(model, batch.select(slice(i, i + micro_batch)).to(dev))
                cs.append(lp_c.float())
                rs.append(lp_r.float())
                counter.update(len(lp_c))
    finally:
        model.train(was_training)
    return torch.cat(cs), torch.cat(rs)


def reference_logprobs(ref_model, batch: PairBatch, micro_batch: int = 16, desc: str | None = None):
    """Per-token reference log-probs ``(ref_chosen [N, L], ref_rejected [N, L])``, fp32, 0 off the
    response, computed once (eval mode, no grad) in micro-batches of ``micro_batch`` pairs
    (``desc``: progress, as ``pair_logprobs``)."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    return pair_logprobs(ref_model, batch, micro_batch, desc)


def save_reference(path, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, batch: PairBatch | None = None) -> None:
    """Write the reference log-probs to ``path`` (safetensors, atomically). With ``batch`` its
    fingerprint is stored, and ``load_reference(path, batch)`` refuses a cache of another batch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "fingerprint": batch.fingerprint() if batch is not None else ""}
    tmp = path.with_name(path.name + ".tmp")
    save_file({"ref_chosen": ref_chosen.detach().float().cpu().contiguous(),
               "ref_rejected": ref_rejected.detach().float().cpu().contiguous()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_reference(path, batch: PairBatch | None = None):
    """``(ref_chosen, ref_rejected)`` from ``save_reference``. With ``batch``: ValueError unless the
    cache was saved for that batch (same fingerprint when one was stored, same shape)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    t = load_file(str(path))
    ref_c, ref_r = t["ref_chosen"], t["ref_rejected"]
    if batch is not None:
        shape = tuple(batch.chosen_ids.shape)
        if tuple(ref_c.shape) != shape or tuple(ref_r.shape) != shape:
            raise ValueError(f"{path}: reference log-probs have shape {tuple(ref_c.shape)}, the batch {shape}")
        if meta.get("fingerprint") and meta["fingerprint"] != batch.fingerprint():
            raise ValueError(f"{path}: reference log-probs were computed for different pairs")
    return ref_c, ref_r
