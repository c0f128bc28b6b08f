"""Decoding with a KV cache: greedy, temperature / top-p sampling, and MTP speculative decoding.

Speculative decoding (greedy only) uses the depth-1 MTP module as the draft: after each verified
step it proposes the token after next, and one trunk forward over ``[last token, draft]`` checks
it. The trunk's argmax at every position decides what is emitted, so the output is exactly plain
greedy decoding's; an accepted draft yields two tokens for one trunk forward (DeepSeek-V3 reports
85-90% acceptance for a trained MTP module, about 1.8x tokens per second).

Early stopping (``stop_id``, e.g. the tokenizer's EOS): a sequence is finished once it has emitted
``stop_id``; every later position of that row is ``stop_id``, and decoding ends as soon as all rows
are finished, so ``tokens`` is ``[B, S0 + n]`` with ``n <= max_new_tokens`` (``n`` = the step at which
the last row emitted its first ``stop_id``, or ``max_new_tokens`` if some row never did). Before
each row's first ``stop_id`` the tokens are exactly those decoding without ``stop_id`` gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationOutput:
    """What ``generate`` returns: the tokens and, for speculative decoding, the acceptance statistics."""
    tokens: torch.Tensor                 # [B, S0 + n]: prompt then generated tokens; n = max_new_tokens
                                         # unless stop_id ended decoding early (see the module docstring)
    acceptance_rate: float | None        # accepted / proposed drafts (speculative only)
    trunk_forwards: int                  # cached trunk forwards, prefill included


def sample(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``[B]``: argmax at temperature 0; else sample softmax(logits / T) restricted to
    the smallest set of tokens whose probability reaches top_p (the most likely token always stays)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(dim=-1, descending=True)
        drop = p_sorted.cumsum(dim=-1) - p_sorted > top_p          # mass before this token already >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, p_sorted.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(model, input_ids, max_new_tokens, temperature, top_p, speculative) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [B, S0] with S0 >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = input_ids.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len = {model.config.max_seq_len}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if speculative:
        if temperature != 0:
            raise ValueError("speculative decoding reproduces greedy decoding: it needs temperature=0")
        if model.config.mtp_depth < 1:
            raise ValueError("speculative decoding drafts with the MTP module: the config has mtp_depth=0")
        if input_ids.shape[0] != 1:
            raise ValueError(f"speculative decoding takes one sequence, got batch {input_ids.shape[0]}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, speculative: bool = False,
             generator: torch.Generator | None = None, stop_id: int | None = None) -> GenerationOutput:
    """Extend ``input_ids [B, S0]`` by up to ``max_new_tokens`` tokens with a KV cache (eval mode: no
    capacity dropping). ``speculative=True``: greedy, batch 1, drafts with the MTP module.
    ``stop_id``: once every row has emitted it, stop early; a row's positions after its first
    ``stop_id`` hold ``stop_id`` (``tokens`` is ``[B, S0 + n]``, ``n <= max_new_tokens``)."""
    _check(model, input_ids, max_new_tokens, temperature, top_p, speculative)
    was_training = model.training
    model.eval()
    model.setup_caches(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
    try:
        if speculative:
            new, forwards, rate = _speculative(model, input_ids, max_new_tokens, stop_id)
        else:
            new = _plain(model, input_ids, max_new_tokens, temperature, top_p, generator, stop_id)
            forwards, rate = new.shape[1], None
    finally:
        model.clear_caches()
        model.train(was_training)
    return GenerationOutput(torch.cat([input_ids, new], dim=1), rate, forwards)


def _plain(model, ids_BS, n_new, temperature, top_p, generator, stop_id=None) -> torch.Tensor:
    """``[B, n]`` new tokens, one trunk forward each (``n < n_new`` only when ``stop_id`` ended it)."""
    S0, dev = ids_BS.shape[1], ids_BS.device
    logits, _ = model.decode(ids_BS, torch.arange(S0, device=dev))
    tok_B = sample(logits[:, -1], temperature, top_p, generator)
    done_B = None if stop_id is None else tok_B == stop_id
    out = [tok_B]
    for i in range(n_new - 1):
        if done_B is not None and bool(done_B.all()):      # one host sync per step, only with stop_id
            break
        logits, _ = model.decode(tok_B[:, None], torch.tensor([S0 + i], device=dev))
        tok_B = sample(logits[:, -1], temperature, top_p, generator)
        if done_B is not None:
            tok_B = tok_B.masked_fill(done_B, stop_id)     # finished rows keep emitting stop_id
            done_B = done_B | (tok_B == stop_id)
        out.append(tok_B)
    return torch.stack(out, dim=1)


def _speculative(model, ids_1S, n_new, stop_id=None):
    """Invariant at the top of the loop: ``last`` is the newest emitted token, at position ``pos``,
    not yet in the trunk's cache; ``draft`` is the MTP module's guess for position pos + 1.
    With ``stop_id`` the output ends at its first ``stop_id`` (as plain greedy with batch 1)."""
    S0, dev = ids_1S.shape[1], ids_1S.device
    logits, h = model.decode(ids_1S, torch.arange(S0, device=dev))
    last = logits[:, -1].argmax(-1)                                        # [1]
    # MTP position i pairs trunk state h_i with token t_{i+1} and predicts t_{i+2}
    draft_logits = model.mtp_decode(h, torch.cat([ids_1S[:, 1:], last[:, None]], 1), torch.arange(S0, device=dev))
    draft = draft_logits[:, -1].argmax(-1)
    out, pos, forwards, proposed, accepted = [last], S0, 1, 0, 0
    stopped = stop_id is not None and int(last) == stop_id
    while len(out) < n_new and not stopped:
        if len(out) == n_new - 1:                 # one token left: a draft would write past the cache
            logits, _ = model.decode(last[:, None], torch.tensor([pos], device=dev))
            out.append(logits[:, -1].argmax(-1))
            forwards += 1
            break
        logits, h = model.decode(torch.stack([last, draft], 1), torch.tensor([pos, pos + 1], device=dev))
        greedy = logits.argmax(-1)                                         # [1, 2]: trunk's choices at pos, pos + 1
        forwards += 1
        proposed += 1
        n_ok = 2 if bool(greedy[0, 0] == draft[0]) else 1                  # the draft was right: pos + 1 is valid too
        accepted += n_ok - 1
        new = greedy[:, :n_ok]                                             # [1, n_ok]
        out += list(new.unbind(1))
        stopped = stop_id is not None and bool((new == stop_id).any())
        if len(out) < n_new - 1 and not stopped:  # else no draft is needed (at most one token left, or stopped)
            draft = model.mtp_decode(h[:, :n_ok], new, torch.arange(pos, pos + n_ok, device=dev))[:, -1].argmax(-1)
        last, pos = new[:, -1], pos + n_ok
    if stop_id is not None:                       # an accepted pair may run one token past the stop
        out = out[: next((i + 1 for i, t in enumerate(out) if int(t) == stop_id), len(out))]
    return torch.stack(out[:n_new], dim=1), forwards, accepted / proposed if proposed else None
