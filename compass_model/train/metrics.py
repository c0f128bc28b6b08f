"""Per-step metrics as JSON lines (``metrics.jsonl``), safe to resume.

One object per optimizer step, at least ``{"stage", "step", "loss"}``. A resumed run first drops
the lines of its stage past the checkpoint's step (they belong to steps that will run again), so
the file never holds a step twice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)                    # JSON has no NaN / inf; keep them visible as strings
    return v


def _complete_lines(path: Path) -> list:
    """The lines of ``path`` that end in a newline: a process killed mid-append (or a read racing
    an append) can leave a partial last line, which belongs to a step that did not finish."""
    return path.read_text().split("\n")[:-1]


class MetricsWriter:
    """Appends per-step records to the JSON-lines file ``path`` (its folder is created)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop records of ``stage`` with ``step >= step`` (steps not in the checkpoint)."""
        if not self.path.exists():
            return
        keep = [line for line in _complete_lines(self.path)
                if line.strip() and not ((r := json.loads(line)).get("stage") == stage and r.get("step", -1) >= step)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        """Append one record (non-finite floats written as strings)."""
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")


def read_metrics(path) -> list:
    """The complete records of ``path`` (``[]`` if it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in _complete_lines(path) if line.strip()]
