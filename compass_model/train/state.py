"""Atomic training checkpoints: a killed run resumes from the last finished step.

A stage's checkpoints live in ``<out>/checkpoints/<stage>/``: each one is a directory ``step-NNNNNN``
holding ``model.safetensors`` + ``config.json`` (``save_pretrained``, loadable on its own) and
``trainer.pt`` (optimizer state, step, whether the stage finished, anything else the trainer keeps).
A distributed run's checkpoint holds ``model/`` and ``optimizer/`` (DCP shards, ``dcp_checkpoint.py``)
in place of ``model.safetensors`` and the optimizer state; ``from_pretrained`` consolidates it.
It is written under a temporary name and renamed, then the ``LATEST`` file is replaced (write, then
``os.replace``), then step directories older than the newest ``keep_last`` are removed. A kill at
any point leaves ``LATEST`` naming a complete checkpoint.

A failed write (disk full, quota) removes the partial temporary directory and raises
``CheckpointWriteError`` ("no space left on DIR"); ``LATEST`` and the previous checkpoints are untouched.
The weights' safetensors header (a sharded checkpoint: ``trainer.pt``) also stores the run's
fingerprint (``run_of``; ``rundir.py``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from compass_model.checkpoint import (
    CheckpointError,
    from_pretrained,
    has_sharded_weights,
    has_weights,
    load_weights,
    read_metadata,
    save_pretrained,
    sharded_metadata,
)

logger = logging.getLogger(__name__)

LATEST = "LATEST"
TRAINER_NAME = "trainer.pt"
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the partial files are gone, earlier checkpoints are intact."""


def _disk_full(e: BaseException, where: Path) -> bool:
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    text = str(e)       # safetensors (Rust) and torch.save's zip writer wrap the OS error in their own
    if any(s in text for s in ("No space left", "os error 28", "Disk quota exceeded")):
        return True
    if "unexpected pos" in text or "file write failed" in text:
        try:
            return shutil.disk_usage(where).free < 64 << 20
        except OSError:
            return False
    return False


def _write_files(tmp: Path, model, state: dict, extra_files: dict | None, run: dict | None, weights: bool) -> None:
    if weights:
        save_pretrained(model, tmp, metadata={"run": json.dumps(run)} if run is not None else None)
    else:                                   # the weights are among extra_files (DCP shards)
        from compass_model.checkpoint import CONFIG_NAME
        tmp.mkdir(parents=True)
        (tmp / CONFIG_NAME).write_text(model.config.to_json())
    torch.save(state, tmp / TRAINER_NAME)
    for fname, src in (extra_files or {}).items():
        os.replace(src, tmp / fname)


def save_checkpoint(stage_dir, model, optimizer, step: int, done: bool = False, extra: dict | None = None,
                    extra_files: dict | None = None, keep_last: int = 1, run: dict | None = None,
                    weights: bool = True) -> Path:
    """Write the checkpoint of ``step`` finished optimizer steps; returns its directory.
    ``extra_files``: ``{name: path}`` of files already written (other ranks' optimizer states) that
    are moved into the checkpoint before it becomes visible. ``keep_last``: how many of the newest
    step directories stay (older ones are removed). ``run``: the run's fingerprint (stored in
    the weights' header, ``run_of``). ``weights=False``: write only ``model.config`` (the weights
    come in ``extra_files``, already written as shards by every rank)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = stage_dir / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    state = {"step": step, "done": done, "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "extra": extra or {}}
    if not weights:
        state["run"] = run
    try:
        _write_files(tmp, model, state, extra_files, run, weights)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            prev = latest_checkpoint(stage_dir)
        except OSError:
            prev = None
        kept = f"; {prev} is intact" if prev is not None else ""
        if _disk_full(e, stage_dir):
            err = CheckpointWriteError(f"no space left on {stage_dir} while writing checkpoint {name}{kept}: "
                                       "free space (or lower --keep-last), then rerun with --resume")
            err.errno = errno.ENOSPC
            raise err from e
        raise
    final = stage_dir / name
    if final.exists():                      # re-saving the same step (e.g. marking a stage done)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = stage_dir / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, stage_dir / LATEST)
    older = sorted((p for p in stage_dir.glob("step-*") if p.name <= name), reverse=True)
    newer = [p for p in stage_dir.glob("step-*") if p.name > name]     # an abandoned later timeline
    for old in older[keep_last:] + newer:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(stage_dir) -> Path | None:
    """The directory ``LATEST`` names, or None if the stage has no checkpoint yet."""
    pointer = Path(stage_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(stage_dir) / pointer.read_text().strip()
    if not (path / TRAINER_NAME).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete; the checkpoint is corrupt")
    return path


def trainer_state(checkpoint_dir) -> dict:
    """The ``trainer.pt`` of a checkpoint: step, done, optimizer state, extra (and run)."""
    # our own file (optimizer tensors and plain Python values): weights_only keeps pickle code out
    path = Path(checkpoint_dir) / TRAINER_NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the trainer state ({e}); the file is damaged") from e


def run_of(checkpoint_dir) -> dict | None:
    """The run fingerprint stored with a checkpoint (None for one saved outside a run)."""
    if has_sharded_weights(checkpoint_dir):
        return trainer_state(checkpoint_dir).get("run")
    text = read_metadata(checkpoint_dir).get("run")
    return json.loads(text) if text else None


def usable_checkpoint(stage_dir, warn: bool = True) -> Path | None:
    """The newest checkpoint of ``stage_dir`` whose files verify (weights digest, trainer state), or
    None. A damaged newer one is renamed ``.damaged-step-N`` and ``LATEST`` moves back to the one
    used, so that everything after (optimizer state, metrics truncation) agrees on it. ``warn``: log
    each checkpoint passed over (a warning on this module's logger)."""
    stage_dir = Path(stage_dir)
    try:
        latest = latest_checkpoint(stage_dir)
    except FileNotFoundError:
        latest = None
    steps = sorted(stage_dir.glob("step-*"), reverse=True)
    for path in ([latest] if latest is not None else []) + [p for p in steps if p != latest]:
        try:
            if has_sharded_weights(path):
                sharded_metadata(path)      # the shards are read where they are needed
            else:
                load_weights(path)
            trainer_state(path)
        except (CheckpointError, FileNotFoundError) as e:
            if warn:
                logger.warning("checkpoint %s is unusable (%s); trying an older one", path, e)
            os.replace(path, path.with_name(f".damaged-{path.name}"))
            continue
        if path != latest:
            pointer = stage_dir / f".{LATEST}.tmp"
            pointer.write_text(path.name + "\n")
            os.replace(pointer, stage_dir / LATEST)
        return path
    if latest is not None or steps:
        raise CheckpointError(f"{stage_dir}: no checkpoint of this stage verifies; rerun without --resume "
                              "(--overwrite) or restore the files")
    return None


def stage_done(stage_dir) -> bool:
    """Whether the stage's latest checkpoint marks it finished."""
    path = latest_checkpoint(stage_dir)
    return path is not None and bool(trainer_state(path)["done"])


def load_model(checkpoint_dir, device=None):
    """The model of a checkpoint directory (``checkpoint.from_pretrained``)."""
    return from_pretrained(checkpoint_dir, device)


def resolve_checkpoint(path, stages=None) -> Path:
    """What ``--checkpoint`` may name: a model directory (``model.safetensors`` + ``config.json``), a
    stage directory (its ``LATEST``), or a run directory (``--out`` of ``compass train``: the final
    checkpoint in ``report.json``, else the latest of its last trained stage in recipe order)."""
    from compass_model.checkpoint import CONFIG_NAME
    from compass_model.train.stages import STAGES
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if has_weights(p) or (p / CONFIG_NAME).is_file():
        return p
    if (p / LATEST).is_file():
        return latest_checkpoint(p)
    report = p / "report.json"
    if report.is_file():
        import json
        try:
            final = json.loads(report.read_text()).get("final_checkpoint")
        except (ValueError, AttributeError):
            final = None
        if final and has_weights(final):
            return Path(final)
    ckpts = p / "checkpoints"
    for name in reversed(stages or STAGES):
        if (ckpts / name / LATEST).is_file():
            return latest_checkpoint(ckpts / name)
    raise FileNotFoundError(f"{p} holds no checkpoint: give a model directory (model.safetensors + config.json), "
                            "a stage directory with LATEST, or the --out directory of compass train")
