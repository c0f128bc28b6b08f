"""Checkpoints: the weights in ``model.safetensors`` and the config in ``config.json``.

safetensors rather than pickle: loading cannot execute code, and tensors are memory-mapped. The
state dict holds parameters and the persistent buffers (router biases, the step counter); RoPE
tables and KV caches are rebuilt from the config.

Integrity: the safetensors header stores ``sha256``, a digest of every tensor (name, dtype, shape
and bytes, in name order). ``from_pretrained`` recomputes it and refuses weights that changed on
disk (a flipped bit, NaN words written over a tensor, a truncated copy), naming the file. Files
written before the digest existed load without the check.

One loader for every kind: a directory with ``quant_config.json`` (``compass quantize --save``) is
rebuilt as the FP8 model it is, any other as the full-precision model. A distributed training
checkpoint holds its weights as a ``torch.distributed.checkpoint`` directory ``model/`` (each rank
wrote its own shards) instead of ``model.safetensors``: ``load_weights`` consolidates it into the
dense state dict in this one process (no process group needed), so ``from_pretrained``, export and
evaluation read it like any other. DCP stores no digest; such weights load unverified.
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
from compass_model.model import CompassForCausalLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SHARDED_WEIGHTS_DIR = "model"          # a torch.distributed.checkpoint directory (distributed training)
DIGEST_KEY = "sha256"


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


def save_pretrained(model: CompassForCausalLM, directory, metadata: dict | None = None) -> None:
    """Write ``directory/model.safetensors`` (with the tensors' digest) and ``directory/config.json``
    (created if missing). ``metadata``: extra string entries for the safetensors header."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", **(metadata or {}), DIGEST_KEY: tensor_digest(state)}
    save_file(state, path / WEIGHTS_NAME, metadata=meta)
    (path / CONFIG_NAME).write_text(model.config.to_json())


def load_config(directory) -> CompassConfig:
    """The ``CompassConfig`` saved in ``directory``; a ``CheckpointError`` naming the file if it is unreadable."""
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
    """Whether ``directory`` holds model weights (one safetensors file or DCP shards)."""
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
    from compass_model.quant import QUANT_CONFIG_NAME
    return (Path(directory) / QUANT_CONFIG_NAME).is_file()


def from_pretrained(directory, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                    ) -> CompassForCausalLM:
    """Rebuild the model from ``config.json`` and load the verified weights exactly (strict: every
    tensor must match by name, shape and dtype). An FP8 directory (``quant_config.json``) comes back
    as the quantized model. ``dtype``: rebuild in that parameter dtype (weights are cast once)."""
    path = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (path / name).is_file() and not (name == WEIGHTS_NAME and has_sharded_weights(path)):
            raise FileNotFoundError(f"{path / name} not found: not a save_pretrained directory")
    if is_quantized(path):
        from compass_model.quant import load_quantized
        model = load_quantized(path)
        return model if device is None else model.to(device)
    config = load_config(path)
    state = load_weights(path)
    model = CompassForCausalLM(config)
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].dtype != v.dtype:
            raise CheckpointError(f"{path / WEIGHTS_NAME}: {k} has dtype {v.dtype} but the config says "
                                  f"{own[k].dtype}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path / WEIGHTS_NAME}: does not match {path / CONFIG_NAME} ({e})") from e
    if dtype is not None and dtype != config.torch_dtype:
        model = cast_model(model, dtype)
    return model if device is None else model.to(device)


def cast_model(model: CompassForCausalLM, dtype: torch.dtype) -> CompassForCausalLM:
    """Cast the parameters the config's dtype governs (router weights and buffers stay as built)."""
    from compass_model.config import DTYPES
    name = next(k for k, v in DTYPES.items() if v == dtype)
    for pname, p in model.named_parameters():
        if not pname.endswith("router.weight"):
            p.data = p.data.to(dtype)
    model.config = model.config.replace(dtype=name)
    return model
