"""Progress of long jobs (training stages, evaluation, FP8 reports, pair building).

On a terminal: a tqdm bar on stderr. Otherwise (a log file, CI, a pipe): a ``logging`` line on the
``compass`` logger every ``every`` items (default: a tenth of the total) and at the end, so a job
that runs for minutes is never silent and a log stays short. ``enabled=False``: nothing at all.

    with progress(total=len(tasks), desc="eval tasks") as p:
        for chunk in chunks:
            ...
            p.update(len(chunk))
"""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("compass")

try:  # progress bars are a nicety; everything runs without them
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def _on_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class progress:
    """A counter of ``total`` items that reports itself (see the module docstring)."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, every: int | None = None,
                 initial: int = 0, tty: bool | None = None):
        self.total, self.desc, self.n = int(total), desc, int(initial)
        self.every = max(1, every if every is not None else -(-self.total // 10))
        self._bar = None
        self._logging = False
        self._t0 = time.perf_counter()
        self._last = self.n
        self._postfix = ""
        if not enabled or self.total <= 0:
            return
        if (_on_tty() if tty is None else tty) and tqdm is not None:
            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, leave=False)
        else:
            self._logging = True

    def set_postfix(self, **kw) -> None:
        """Show ``key=value`` pairs after the count (the bar's postfix, the log line's tail)."""
        self._postfix = " ".join(f"{k}={v}" for k, v in kw.items())
        if self._bar is not None:
            self._bar.set_postfix(**kw)

    def update(self, k: int = 1) -> None:
        """Advance by ``k`` items; off a terminal, log a line when a tenth more is done."""
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        elif self._logging and (self.n - self._last >= self.every or self.n >= self.total):
            self._last = self.n
            dt = time.perf_counter() - self._t0
            logger.info("%s: %d/%d (%.0f s)%s", self.desc, self.n, self.total, dt,
                        f" {self._postfix}" if self._postfix else "")

    def close(self) -> None:
        """Finish the bar (nothing more is reported)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._logging = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
