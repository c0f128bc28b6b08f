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

The file functions live in ``checkpoint_files.py`` (re-exported here), which knows no model class:
``model.py`` uses it for ``save_pretrained`` / ``from_pretrained`` and this module builds models on
top of both, so the two import in one direction only.
"""

from __future__ import annotations

import torch

from compass_model.checkpoint_files import (
    CONFIG_NAME,
    DIGEST_KEY,
    QUANT_CONFIG_NAME,
    SHARDED_WEIGHTS_DIR,
    WEIGHTS_NAME,
    CheckpointError,
    check_files,
    has_sharded_weights,
    has_weights,
    is_quantized,
    load_config,
    load_pretrained,
    load_sharded_weights,
    load_weights,
    read_metadata,
    save_pretrained,
    sharded_metadata,
    tensor_digest,
)
from compass_model.model import CompassForCausalLM

__all__ = ["CONFIG_NAME", "DIGEST_KEY", "QUANT_CONFIG_NAME", "SHARDED_WEIGHTS_DIR", "WEIGHTS_NAME", "CheckpointError",
           "cast_model", "from_pretrained", "has_sharded_weights", "has_weights", "is_quantized", "load_config",
           "load_sharded_weights", "load_weights", "read_metadata", "save_pretrained", "sharded_metadata",
           "tensor_digest"]


def from_pretrained(directory, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                    ) -> CompassForCausalLM:
    """Rebuild the model from ``config.json`` and load the verified weights exactly (strict: every
    tensor must match by name, shape and dtype). An FP8 directory (``quant_config.json``) comes back
    as the quantized model. ``dtype``: rebuild in that parameter dtype (weights are cast once)."""
    path = check_files(directory)
    if is_quantized(path):
        from compass_model.quant import load_quantized
        model = load_quantized(path)
        return model if device is None else model.to(device)
    model = load_pretrained(CompassForCausalLM, path)
    if dtype is not None and dtype != model.config.torch_dtype:
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
