"""Long-context retrieval a small model can learn: a voucher code hidden in a long catalogue.

A ``passkey`` task is a catalogue of product lines (the ``retrieve`` family's format) with one
needle line ``Voucher code: 4821`` at a random depth; the prompt ends by asking for it again with
the same words, ``Voucher code: ``, so the answer is the code's digits. The answer follows the
prompt directly, so the task reads the same as pretraining text (``prompt + answer``) and as an SFT
sample (``[BOS] prompt answer [EOS]``): a model that learned it in a long-context stage is asked the
same way after SFT. To answer, the model must find the one earlier ``Voucher code:`` and copy what
follows it, from anywhere in the context: the retrieval the long-context (YaRN) stages teach and
``evaluate.long_context_eval`` measures at 1x and 4x of the base context.

``context`` is a budget in byte tokens (``ByteTokenizer``): the catalogue is filled with lines
until ``[BOS] prompt answer [EOS]`` would pass it. Lines are ~40-80 bytes, so the catalogue holds
``context / 60`` lines or so.
"""

from __future__ import annotations

import random
import re

from .corpus import LANGS, make_product
from .tasks import Task

NEEDLE = "Voucher code: "
CODE_DIGITS = 4
_HEAD = "Catalogue:\n"


def _line(rng: random.Random, lang: str, i: int) -> str:
    """A catalogue line without digits (brand, product, colour), so the code is the context's only number."""
    p = make_product(rng, lang, i)
    return f"{p.brand} {p.noun} {p.color}"


def passkey_task(rng: random.Random, lang: str, context: int) -> Task:
    """One ``passkey`` task whose ``[BOS] prompt answer [EOS]`` fits ``context`` byte tokens."""
    code = "".join(rng.choice("0123456789") for _ in range(CODE_DIGITS))
    tail = "\n" + NEEDLE
    budget = context - 2 - len(code.encode()) - len(_HEAD.encode()) - len(tail.encode())
    budget -= len((NEEDLE + code + "\n").encode())
    lines, used = [], 0
    while True:
        line = _line(rng, lang, len(lines))
        n = len(line.encode()) + 1
        if used + n > budget:
            break
        lines.append(line)
        used += n
    depth = rng.randint(0, len(lines))
    lines.insert(depth, NEEDLE + code)
    prompt = _HEAD + "\n".join(lines) + tail
    return Task("passkey", lang, prompt, code, {"gold": code, "depth": depth / max(1, len(lines) - 1)})


def curriculum_contexts(context: int, shortest: int = 64) -> list:
    """``context`` and its halvings down to ``shortest``, shortest first: ``1024 -> [64, 128, 256, 512, 1024]``.
    Training on every length at once is the curriculum a small model needs: with a few catalogue lines
    the needle is easy to find, and the same search then carries to longer catalogues."""
    if context < shortest:
        raise ValueError(f"context must be >= {shortest} tokens for a passkey task, got {context}")
    out = [context]
    while out[-1] // 2 >= shortest:
        out.append(out[-1] // 2)
    return out[::-1]


def make_passkey_tasks(n: int, seed: int, context: int, langs=LANGS) -> list:
    """``n`` passkey tasks cycling over ``langs``, each fitting ``context`` byte tokens."""
    if context < 64:
        raise ValueError(f"context must be >= 64 tokens for a passkey task, got {context}")
    rng = random.Random(f"passkey/{seed}/{context}")
    return [passkey_task(rng, langs[i % len(langs)], context) for i in range(n)]


def check_passkey(task: Task, response: str) -> bool:
    """The response's first run of digits is the code (text after it is ignored)."""
    m = re.match(r"\s*([0-9]+)", response)
    return m is not None and m.group(1) == task.meta["gold"]
