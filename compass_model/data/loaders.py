"""JSONL loaders for the user's own data; every bad record raises ``DataError`` naming file and line.

Formats (one JSON object per line):
  pretraining  ``{"text": str}``
  SFT          ``{"prompt": str, "response": str, "domain": "ecommerce" | "general"}``
  preference   ``{"prompt": str, "chosen": str, "rejected": str}``
Required fields must be non-empty strings. Extra keys (ids, metadata) are allowed and ignored. Blank
lines are not records and are skipped; anything else that is not a valid record is an error, so a
file either loads completely or not at all (nothing is silently dropped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("ecommerce", "general")


class DataError(ValueError):
    """A bad record: the message starts with ``path:line:``."""


@dataclass(frozen=True)
class TextRecord:
    """One pretraining text from a JSONL file."""
    text: str
    source: str          # "path:line", to trace a sample back to its record


@dataclass(frozen=True)
class SFTRecord:
    """One SFT sample: prompt, response and its domain (selects the mixed loss's weighting)."""
    prompt: str
    response: str
    domain: str
    source: str


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair: a prompt with a chosen and a rejected response."""
    prompt: str
    chosen: str
    rejected: str
    source: str


def iter_jsonl(path):
    """Yields ``(line_number, dict)``; raises ``DataError`` on a missing file, bad UTF-8, bad JSON or
    a line that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _fields(obj: dict, names: tuple, where: str) -> list:
    out = []
    for name in names:
        if name not in obj:
            raise DataError(f"{where}: missing field {name!r} (record has {sorted(obj)})")
        v = obj[name]
        if not isinstance(v, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(v).__name__}")
        if not v.strip():
            raise DataError(f"{where}: field {name!r} is empty")
        out.append(v)
    return out


def load_text_jsonl(path) -> list:
    """Pretraining records ``{"text"}`` -> ``list[TextRecord]``."""
    return [TextRecord(*_fields(o, ("text",), f"{path}:{n}"), source=f"{path}:{n}") for n, o in iter_jsonl(path)]


def load_sft_jsonl(path) -> list:
    """SFT records ``{"prompt", "response", "domain"}`` -> ``list[SFTRecord]``. ``domain`` selects the
    prompt weight of the mixed loss (ecommerce: w_p = 1, general: w_p = 0) and is required."""
    out = []
    for n, o in iter_jsonl(path):
        where = f"{path}:{n}"
        prompt, response, domain = _fields(o, ("prompt", "response", "domain"), where)
        if domain not in DOMAINS:
            raise DataError(f"{where}: field 'domain' must be one of {DOMAINS}, got {domain!r}")
        out.append(SFTRecord(prompt, response, domain, where))
    return out


def load_preference_jsonl(path) -> list:
    """Preference records ``{"prompt", "chosen", "rejected"}`` -> ``list[PreferenceRecord]``."""
    out = []
    for n, o in iter_jsonl(path):
        where = f"{path}:{n}"
        prompt, chosen, rejected = _fields(o, ("prompt", "chosen", "rejected"), where)
        if chosen == rejected:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical (no preference signal)")
        out.append(PreferenceRecord(prompt, chosen, rejected, where))
    return out


def write_jsonl(path, records) -> None:
    """Writes dicts one per line (UTF-8, non-ASCII kept): the inverse of ``iter_jsonl``."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
