"""Sequence packing into fixed-length rows, with document ids, position ids and SFT loss masks.

Conventions (those of ``compass_model.losses``): ``labels[r, i]`` is the token that position i
predicts (the next token of the *same* document; -100 at a document's last token and on padding),
and every mask is indexed by that prediction position too. So for an SFT sample
``[BOS] prompt response [EOS]`` packed at offset o, ``response_mask[r, i] = 1`` where
``labels[r, i]`` is a response token or the EOS (the model learns to stop), ``prompt_mask = 1``
where it is a prompt token, and BOS is never a label. ``losses.mixed_loss_mask(prompt_mask,
response_mask, prompt_weight)`` then gives ``m_t = 1`` on response, ``w_p`` on prompt, 0 on padding.

``doc_ids`` is 0 on padding and 1, 2, ... per document within a row; ``document_causal_mask``
turns it into a ``[R, S, S]`` boolean attention mask (True = may attend) so packed documents do not
see each other; ``position_ids`` restart at 0 for each document (RoPE positions).

Placement is first-fit in input order (deterministic); a document longer than a row is split into
row-sized chunks (pretraining) — an SFT sample that does not fit raises instead, because cutting it
would silently drop its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
PROMPT, RESPONSE, OTHER = 1, 2, 0          # per-token roles


@dataclass(frozen=True)
class PackedBatch:
    """Packed rows of documents with labels, positions, document ids and loss masks (``[R, S]`` each)."""
    input_ids: torch.Tensor       # [R, S] int64, pad_id on padding
    labels: torch.Tensor          # [R, S] int64, -100 where nothing is predicted
    position_ids: torch.Tensor    # [R, S] int64, restarting at 0 per document, 0 on padding
    doc_ids: torch.Tensor         # [R, S] int64, 0 on padding, 1.. per document in the row
    prompt_mask: torch.Tensor     # [R, S] bool, by prediction position
    response_mask: torch.Tensor   # [R, S] bool, by prediction position
    prompt_weight: torch.Tensor   # [R, S] float32, w_p of the sample the label belongs to

    def loss_mask(self) -> torch.Tensor:
        """``m_t = response + w_p * prompt`` ([R, S] float32): the SFT mixed-loss weights."""
        return self.response_mask.float() + self.prompt_weight * self.prompt_mask.float()

    def attention_mask(self) -> torch.Tensor:
        """``[R, S, S]`` bool: causal attention within each document (``document_causal_mask``)."""
        return document_causal_mask(self.doc_ids)


def document_causal_mask(doc_ids_RS: torch.Tensor) -> torch.Tensor:
    """``[R, S]`` doc ids -> ``[R, S, S]`` bool: query i may attend key j iff j <= i and both are in the
    same document. Padding (id 0) attends to itself only, so no softmax row is empty (no NaN)."""
    S = doc_ids_RS.shape[-1]
    same = doc_ids_RS[:, :, None] == doc_ids_RS[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids_RS.device).tril()
    eye = torch.eye(S, dtype=torch.bool, device=doc_ids_RS.device)
    pad = (doc_ids_RS == 0)[:, :, None]
    return torch.where(pad, eye, same & causal)


def _first_fit(lengths: list, seq_len: int) -> list:
    """Row index for each piece (first row with room, in input order)."""
    free, rows = [], []
    for n in lengths:
        for r, room in enumerate(free):
            if room >= n:
                free[r] -= n
                rows.append(r)
                break
        else:
            free.append(seq_len - n)
            rows.append(len(free) - 1)
    return rows


def _pack(pieces: list, seq_len: int, pad_id: int) -> PackedBatch:
    """``pieces``: ``(ids, roles, w_p)`` each at most ``seq_len`` long."""
    rows = _first_fit([len(p[0]) for p in pieces], seq_len)
    R = max(rows, default=-1) + 1
    input_ids = torch.full((R, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((R, seq_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((R, seq_len), dtype=torch.long)
    doc_ids = torch.zeros((R, seq_len), dtype=torch.long)
    roles = torch.zeros((R, seq_len), dtype=torch.long)       # role of the *label* at each position
    weight = torch.zeros((R, seq_len), dtype=torch.float32)
    fill = [0] * R
    for (ids, role, w), r in zip(pieces, rows):
        o, n = fill[r], len(ids)
        fill[r] += n
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        input_ids[r, o:o + n] = ids_t
        labels[r, o:o + n - 1] = ids_t[1:]
        position_ids[r, o:o + n] = torch.arange(n)
        doc_ids[r, o:o + n] = int(doc_ids[r].max()) + 1
        roles[r, o:o + n - 1] = torch.as_tensor(role[1:], dtype=torch.long)
        weight[r, o:o + n - 1] = w
    return PackedBatch(input_ids, labels, position_ids, doc_ids, roles == PROMPT, roles == RESPONSE, weight)


def pack_pretraining(docs: list, seq_len: int, pad_id: int) -> PackedBatch:
    """Token lists (BOS/EOS already added) -> rows of ``seq_len``. Every label counts (``response_mask``
    = 1 wherever a next token exists in the same piece). Documents longer than ``seq_len`` are cut
    into ``seq_len`` chunks, each packed as its own piece: the first token of every chunk after the
    first is never a label (one lost prediction per cut, < 1/seq_len of the tokens)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    pieces = []
    for d, ids in enumerate(docs):
        ids = list(ids)
        if not ids:
            raise ValueError(f"document {d} is empty")
        for s in range(0, len(ids), seq_len):
            chunk = ids[s:s + seq_len]
            pieces.append((chunk, [RESPONSE] * len(chunk), 0.0))
    return _pack(pieces, seq_len, pad_id)


def pack_sft(samples: list, seq_len: int, pad_id: int, bos_id: int | None, eos_id: int) -> PackedBatch:
    """``samples``: ``(prompt_ids, response_ids, prompt_weight)`` -> rows of ``[BOS] prompt response [EOS]``
    (BOS left out if ``bos_id`` is None). ``prompt_weight`` is w_p: 1.0 for e-commerce, 0.0 for general
    (``prompt_weight_for``). Raises if a sample does not fit in ``seq_len``."""
    pieces = []
    for k, (p, r, w) in enumerate(samples):
        p, r = list(p), list(r)
        if not r:
            raise ValueError(f"SFT sample {k} has an empty response")
        head = [bos_id] if bos_id is not None else []
        ids = head + p + r + [eos_id]
        if len(ids) > seq_len:
            raise ValueError(f"SFT sample {k} is {len(ids)} tokens (prompt {len(p)}, response {len(r)}, "
                             f"+{len(head) + 1} special) > seq_len {seq_len}; raise seq_len or shorten it")
        role = [OTHER] * len(head) + [PROMPT] * len(p) + [RESPONSE] * (len(r) + 1)
        pieces.append((ids, role, float(w)))
    return _pack(pieces, seq_len, pad_id)


def prompt_weight_for(domain: str) -> float:
    """The unified SFT mixed loss (docs/algorithms.md): full-sequence loss on e-commerce, answer-only on general."""
    if domain == "ecommerce":
        return 1.0
    if domain == "general":
        return 0.0
    raise ValueError(f"domain must be 'ecommerce' or 'general', got {domain!r}")
