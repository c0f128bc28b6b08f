"""Atomic training checkpoints: a killed run resumes from the last finished step.

A stage's checkpoints live in ``<out>/checkpoints/<stage>/``: each one is a directory ``step-NNNNNN``
holding ``model.safetensors`` + ``config.json`` (``save_pretrained``, loadable on its own) and
``trainer.pt`` (optimizer state, step, whether the stage finished, anything else the trainer keeps).
It is written under a temporary name and renamed, then the ``LATEST`` file is replaced (write, then
``os.replace``), then older step directories are removed. A kill at any point leaves ``LATEST``
naming a complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from compass_model.checkpoint import from_pretrained, save_pretrained

LATEST = "LATEST"
TRAINER_NAME = "trainer.pt"


def save_checkpoint(stage_dir, model, optimizer, step: int, done: bool = False, extra: dict | None = None,
                    extra_files: dict | None = None) -> Path:
    """Write the checkpoint of ``step`` finished optimizer steps; returns its directory.
    ``extra_files``: ``{name: path}`` of files already written (other ranks' optimizer states) that
    are moved into the checkpoint before it becomes visible."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = stage_dir / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tmp)
    state = {"step": step, "done": done, "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "extra": extra or {}}
    torch.save(state, tmp / TRAINER_NAME)
    for fname, src in (extra_files or {}).items():
        os.replace(src, tmp / fname)
    final = stage_dir / name
    if final.exists():                      # re-saving the same step (e.g. marking a stage done)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = stage_dir / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, stage_dir / LATEST)
    for old in stage_dir.glob("step-*"):
        if old.name != name:
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
    # our own file (optimizer tensors and plain Python values): weights_only keeps pickle code out
    return torch.load(Path(checkpoint_dir) / TRAINER_NAME, map_location="cpu", weights_only=True)


def stage_done(stage_dir) -> bool:
    path = latest_checkpoint(stage_dir)
    return path is not None and bool(trainer_state(path)["done"])


def load_model(checkpoint_dir, device=None):
    return from_pretrained(checkpoint_dir, device)
