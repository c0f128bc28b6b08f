"""Generated tasks with checkable answers, for SFT, alignment pairs and evaluation.

Families (``FAMILIES``):
  extract    noisy listing title -> JSON ``{"brand", "color", "size"}``; size in canonical units
             (``"500 ml"``, ``"0.25 kg"`` in the title -> ``"250 g"``), so the model must normalise units
  classify   listing title -> category label (one of ``corpus.CATEGORIES``)
  price      discount or currency conversion, with worked reasoning ending ``Answer: <number> <CODE>``
  relevance  search query + listing title -> ``relevant`` | ``irrelevant``
  retrieve   a long catalogue of ``n_items`` lines -> the price of one item (context length scales
             with ``n_items``: the long-context stage and the 1x / 4x evaluation use it)

Each ``Task`` carries its gold ``answer``; ``check(task, response)`` says whether a response is
right (exact match for extract / classify / relevance after normalisation, numeric match within half
a currency unit of the last shown decimal for price / retrieve). ``check(t, t.answer)`` is True for
every generated task (a test checks it).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

from .corpus import (
    CATEGORIES,
    CURRENCIES,
    LANGS,
    QUERY_WORDS,
    format_amount,
    format_size,
    listing_title,
    make_product,
    round_price,
)

FAMILIES = ("extract", "classify", "price", "relevance", "retrieve")
CANONICAL_UNIT = {"ml": ("ml", 1.0), "l": ("ml", 1000.0), "liter": ("ml", 1000.0), "g": ("g", 1.0),
                  "kg": ("g", 1000.0), "gb": ("GB", 1.0), "pcs": ("pcs", 1.0), "eu": ("EU", 1.0),
                  "size": ("EU", 1.0), "no.": ("EU", 1.0)}
_SIZE_RE = re.compile(r"^\s*(?:(eu|size|no\.)\s*)?([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_ANSWER_RE = re.compile(r"answer\s*:\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)", re.IGNORECASE)


@dataclass(frozen=True)
class Task:
    """An evaluation / SFT task: a prompt in one language, its gold answer and what the family's checker needs."""
    family: str
    lang: str
    prompt: str
    answer: str                          # the gold response (reasoning included for price)
    meta: dict = field(default_factory=dict, compare=False)  # family-specific gold fields for checkers

    def to_sft(self) -> dict:
        """The SFT record (loaders.py format): generated tasks are e-commerce data."""
        return {"prompt": self.prompt, "response": self.answer, "domain": "ecommerce"}


def canonical_size(text: str) -> str | None:
    """``"0.5L"`` -> ``"500 ml"``, ``"EU42"`` / ``"size 42"`` -> ``"42 EU"``; None if unparseable."""
    m = _SIZE_RE.match(str(text))
    if not m:
        return None
    prefix, value, unit = m.group(1), float(m.group(2)), (m.group(3) or "").lower()
    key = (prefix or unit).lower()
    if key not in CANONICAL_UNIT or (prefix and unit):
        return None
    base, scale = CANONICAL_UNIT[key]
    return f"{value * scale:g} {base}"


# ---- generators ---------------------------------------------------------------------------------

def _extract(rng, lang, noise):
    p = make_product(rng, lang)
    title = listing_title(rng, p, noise)
    gold = {"brand": p.brand, "color": p.color, "size": canonical_size(f"{p.size}{p.unit}")}
    prompt = f"Extract brand, color and size as JSON.\nListing: {title}\nJSON:"
    return Task("extract", lang, prompt, json.dumps(gold, ensure_ascii=False), {"gold": gold})


def _classify(rng, lang, noise):
    p = make_product(rng, lang)
    labels = ", ".join(CATEGORIES)
    prompt = f"Category ({labels})?\nListing: {listing_title(rng, p, noise)}\nCategory:"
    return Task("classify", lang, prompt, p.category, {"gold": p.category})


def _num(amount: float, currency: str) -> str:
    """Plain machine-readable number for the final answer line: no thousands separators."""
    return f"{amount:.{CURRENCIES[currency].decimals}f}"


def _price(rng, lang, noise):
    p = make_product(rng, lang)
    cur = p.currency
    if rng.random() < 0.5:
        pct = rng.choice((5, 10, 15, 20, 25, 30, 40, 50))
        off = p.price * pct / 100
        final = round_price(p.price - off, cur)
        prompt = (f"{p.brand} {p.noun} costs {format_amount(p.price, cur)} with a {pct}% discount. "
                  f"What is the final price?")
        answer = (f"Discount = {_num(p.price, cur)} x {pct}/100 = {off:.2f}. "
                  f"Final = {_num(p.price, cur)} - {off:.2f} = {final:.2f}.\nAnswer: {_num(final, cur)} {cur}")
        return Task("price", lang, prompt, answer, {"gold": final, "currency": cur})
    target = rng.choice([c for c in CURRENCIES if c != cur])
    rate = CURRENCIES[target].per_usd / CURRENCIES[cur].per_usd
    final = round_price(p.price * rate, target)
    prompt = (f"Rates: 1 USD = {CURRENCIES[cur].per_usd:g} {cur} = {CURRENCIES[target].per_usd:g} {target}. "
              f"Convert {format_amount(p.price, cur)} to {target}.")
    answer = (f"{_num(p.price, cur)} {cur} / {CURRENCIES[cur].per_usd:g} = {p.price / CURRENCIES[cur].per_usd:.4f} USD; "
              f"x {CURRENCIES[target].per_usd:g} = {p.price * rate:.4f}.\nAnswer: {_num(final, target)} {target}")
    return Task("price", lang, prompt, answer, {"gold": final, "currency": target})


def _relevance(rng, lang, noise):
    p = make_product(rng, lang)
    q = make_product(rng, lang) if rng.random() < 0.5 else p
    # relevant iff the query names the listing's category (brand alone does not make it relevant)
    gold = "relevant" if q.category == p.category else "irrelevant"
    query = f"{q.noun} {QUERY_WORDS[lang]} {format_size(rng, q.size, q.unit)}"
    prompt = f"Query: {query}\nListing: {listing_title(rng, p, noise)}\nRelevant?"
    return Task("relevance", lang, prompt, gold, {"gold": gold})


def _retrieve(rng, lang, noise, n_items=20):
    items = [make_product(rng, lang, i) for i in range(n_items)]
    target = rng.choice(items)
    lines = [f"{p.pid} | {p.brand} {p.noun} {format_size(rng, p.size, p.unit)} | {format_amount(p.price, p.currency)}"
             for p in items]
    prompt = "Catalogue:\n" + "\n".join(lines) + f"\nPrice of {target.pid}?"
    answer = f"Answer: {_num(target.price, target.currency)} {target.currency}"
    return Task("retrieve", lang, prompt, answer, {"gold": target.price, "currency": target.currency})


_GENERATORS = {"extract": _extract, "classify": _classify, "price": _price, "relevance": _relevance,
               "retrieve": _retrieve}


def make_tasks(n: int, seed: int = 0, families=FAMILIES, langs=LANGS, noise: float = 0.3,
               n_items: int = 20) -> list:
    """``n`` tasks cycling over ``families`` x ``langs`` (every pair appears once ``n >= |F| |L|``).
    ``n_items``: catalogue length of ``retrieve`` tasks (~60 bytes per line)."""
    bad = [f for f in families if f not in _GENERATORS]
    if bad:
        raise ValueError(f"unknown task families {bad}; expected a subset of {FAMILIES}")
    bad = [x for x in langs if x not in LANGS]
    if bad:
        raise ValueError(f"unknown languages {bad}; expected a subset of {LANGS}")
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    rng = random.Random(seed)
    pairs = [(f, x) for f in families for x in langs]
    out = []
    for i in range(n):
        fam, lang = pairs[i % len(pairs)]
        gen = _GENERATORS[fam]
        out.append(gen(rng, lang, noise, n_items) if fam == "retrieve" else gen(rng, lang, noise))
    return out


# ---- checkers -----------------------------------------------------------------------------------

def parse_answer_number(response: str) -> float | None:
    """The number on the *last* ``Answer:`` line (thousands commas allowed); None if absent."""
    hits = _ANSWER_RE.findall(response)
    if not hits:
        return None
    try:
        return float(hits[-1].replace(",", ""))
    except ValueError:
        return None


def _check_extract(task, response):
    try:
        got = json.loads(response.strip())
    except (json.JSONDecodeError, ValueError):
        return False
    gold = task.meta["gold"]
    if not isinstance(got, dict) or set(got) != set(gold):
        return False
    return (str(got["brand"]).strip().lower() == gold["brand"].lower()
            and str(got["color"]).strip().lower() == gold["color"].lower()
            and canonical_size(str(got["size"])) == gold["size"])


def _check_label(task, response):
    return response.strip().lower().rstrip(".") == task.meta["gold"]


def _check_number(task, response):
    got = parse_answer_number(response)
    if got is None:
        return False
    # half a unit of the last shown decimal: Rp / ₫ answers are whole numbers, others have cents
    tol = 0.5 * 10 ** -CURRENCIES[task.meta["currency"]].decimals
    return abs(got - task.meta["gold"]) <= tol + 1e-9


_CHECKERS = {"extract": _check_extract, "classify": _check_label, "relevance": _check_label,
             "price": _check_number, "retrieve": _check_number}


def check(task: Task, response: str) -> bool:
    """True iff ``response`` answers ``task`` correctly (see the module docstring for the rules)."""
    if task.family not in _CHECKERS:
        raise ValueError(f"unknown task family {task.family!r}; expected one of {FAMILIES}")
    return bool(_CHECKERS[task.family](task, response))
