"""The run directory (``--out``): one trainer at a time, no silent reuse of an old run.

  lock         ``OUT/.lock`` held with ``flock`` while a run trains: a second trainer into the same
               directory fails at once (the kernel drops the lock when the holder dies, even by SIGKILL)
  --out rules  a fresh run needs an empty (or missing) directory; ``resume`` continues what is
               there; ``overwrite`` removes the previous run's files first (only the files a run
               writes: anything else in the directory stays)
  fingerprint  ``OUT/run.json`` and every checkpoint's weights header store a digest of the model
               config and the seed; a resume with another config or seed is refused
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
RUN_ENTRIES = ("checkpoints", "align", "plots", "metrics.jsonl", "metrics.tmp", "report.json", "report.tmp", RUN_FILE)


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to pass instead."""


def fingerprint(config, seed: int) -> dict:
    """``{"digest", "config", "seed"}``: what a resumed run must share with the run it continues."""
    cfg = json.loads(config.to_json())
    digest = hashlib.sha256(json.dumps({"config": cfg, "seed": seed}, sort_keys=True).encode()).hexdigest()[:16]
    return {"digest": digest, "config": cfg, "seed": seed}


def _differences(old: dict, new: dict) -> str:
    diffs = [f"seed {old.get('seed')} -> {new['seed']}"] if old.get("seed") != new["seed"] else []
    a, b = old.get("config", {}), new["config"]
    diffs += [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")


def check_fingerprint(stored: dict | None, new: dict, where) -> None:
    """RunDirError if ``stored`` (a checkpoint's or ``run.json``'s) is of another config or seed."""
    if stored and stored.get("digest") != new["digest"]:
        raise RunDirError(f"--resume: {where} belongs to a run with another model config or seed "
                          f"({_differences(stored, new)}); resume with the original --preset/--config/--seed, "
                          "or start over with --overwrite")


def _entries(out: Path) -> list:
    return [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []


def prepare(out, run: dict, *, resume: bool, overwrite: bool) -> None:
    """Apply the --out rules to ``out`` and check ``run`` (``fingerprint``) against ``OUT/run.json``.
    Call with the lock held; ``record`` writes the fingerprint once every other check passed."""
    out = Path(out)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    entries = _entries(out)
    if entries and not (resume or overwrite):
        raise RunDirError(f"--out {out} is not empty (an earlier run?): pass --resume to continue it, "
                          "--overwrite to replace it, or choose a new --out")
    if overwrite:
        for name in RUN_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    run_file = out / RUN_FILE
    if resume and run_file.is_file():
        check_fingerprint(json.loads(run_file.read_text()), run, run_file)


def record(out, run: dict) -> None:
    """Write the run's fingerprint to ``OUT/run.json`` (atomically)."""
    run_file = Path(out) / RUN_FILE
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1))
    os.replace(tmp, run_file)


@contextlib.contextmanager
def locked(out):
    """Hold ``OUT/.lock`` for the block; another holder -> ``RunDirError`` naming its pid."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:                 # no flock (Windows): run unlocked
        yield
        return
    f = open(out / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise RunDirError(f"--out {out} is in use by another compass train (pid {pid}); wait for it to "
                              "finish or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()                       # closing releases the lock
