"""The files of a saved model: the weights in ``model.safetensors`` and the config in ``config.json``
(``checkpoint.py`` explains the format). This module reads and writes them without knowing the
model class, so ``model.py`` can use it; ``checkpoint.from_pretrained`` (which builds models of
every kind) sits above both.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compass_model.config import CompassConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SHARDED_WEIGHTS_DIR = "model"          # a torch.distributed.checkpoint directory (distributed training)
DIGEST_KEY = "sha256"
QUANT_CONFIG_NAME = "quant_config.json"   # an FP8 model (quant.save_quantized)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is on disk; the message names the file."""


def tensor_digest(state: dict) -> str:
    """sha256 over ``state``'s tensors in name order (name, dtype, shape, raw bytes)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_pretrained(model, directory, metadata: dict | None = None) -> None:
    """Write ``directory/model.safetensors`` (with the tensors' digest) and ``directory/config.json``
    (created if missing). ``metadata``: extra string entries for the safetensors header."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", **(metadata or {}), DIGEST_KEY: tensor_digest(state)}
    save_file(state, path / WEIGHTS_NAME, metadata=meta)
    (path / CONFIG_NAME).write_text(model.config.to_json())


def load_config(directory) -> CompassConfig:
    """The ``CompassConfig`` in ``directory/config.json`` (CheckpointError naming the file if unusable)."""
    path = Path(directory) / CONFIG_NAME
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the model config ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    try:
        return CompassConfig(**obj)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid model config ({e})") from e


def read_metadata(directory) -> dict:
    """The safetensors header's metadata of ``directory/model.safetensors``."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path}: cannot read the weights ({e}); the file is damaged or not safetensors") from e


def has_sharded_weights(directory) -> bool:
    """``directory`` holds its weights as DCP shards (``model/``) rather than ``model.safetensors``."""
    path = Path(directory)
    return not (path / WEIGHTS_NAME).is_file() and (path / SHARDED_WEIGHTS_DIR / ".metadata").is_file()


def has_weights(directory) -> bool:
    """``directory`` holds weights, as ``model.safetensors`` or as DCP shards."""
    return (Path(directory) / WEIGHTS_NAME).is_file() or has_sharded_weights(directory)


def sharded_metadata(directory):
    """The DCP metadata of ``directory/model/`` (tensor names, global shapes and dtypes)."""
    import torch.distributed.checkpoint as dcp
    path = Path(directory) / SHARDED_WEIGHTS_DIR
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the sharded weights' metadata ({e}); "
                              "the checkpoint is damaged") from e


def load_sharded_weights(directory) -> dict:
    """The dense state dict of ``directory/model/``: every tensor allocated at its global shape and
    filled from the ranks' shards by DCP in this process alone (``no_dist``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    path = Path(directory) / SHARDED_WEIGHTS_DIR
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in sharded_metadata(directory).state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    try:
        with warnings.catch_warnings():          # DCP warns that no process group is up: intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the sharded weights ({e}); the checkpoint is damaged") from e
    return state


def load_weights(directory) -> dict:
    """The state dict in ``directory/model.safetensors``, verified against its stored digest (or
    consolidated from ``directory/model/``, a distributed checkpoint's shards)."""
    if has_sharded_weights(directory):
        return load_sharded_weights(directory)
    path = Path(directory) / WEIGHTS_NAME
    meta = read_metadata(directory)
    try:
        state = load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the weights ({e}); the file is damaged") from e
    want = meta.get(DIGEST_KEY)
    if want is not None and tensor_digest(state) != want:
        raise CheckpointError(f"{path}: checksum mismatch, the weights changed after they were written "
                              "(a damaged or edited file); use another checkpoint or retrain")
    return state


def is_quantized(directory) -> bool:
    """An FP8 model written by ``quant.save_quantized`` (its ``quant_config.json`` says so)."""
    return (Path(directory) / QUANT_CONFIG_NAME).is_file()


def check_files(directory) -> Path:
    """``directory`` as a Path; FileNotFoundError unless it holds a config and weights."""
    path = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (path / name).is_file() and not (name == WEIGHTS_NAME and has_sharded_weights(path)):
            raise FileNotFoundError(f"{path / name} not found: not a save_pretrained directory")
    return path


def load_pretrained(cls, directory):
    """``cls(config)`` from ``directory/config.json`` with the verified weights loaded exactly
    (strict: every tensor must match by name, shape and dtype)."""
    path = check_files(directory)
    if is_quantized(path):
        raise CheckpointError(f"{path} holds an FP8 model ({QUANT_CONFIG_NAME}): load it with "
                              "compass_model.from_pretrained")
    config = load_config(path)
    state = load_weights(path)
    model = cls(config)
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].dtype != v.dtype:
            raise CheckpointError(f"{path / WEIGHTS_NAME}: {k} has dtype {v.dtype} but the config says "
                                  f"{own[k].dtype}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path / WEIGHTS_NAME}: does not match {path / CONFIG_NAME} ({e})") from e
    return model
