"""Checkpoints: the weights in ``model.safetensors`` and the config in ``config.json``.

safetensors rather than pickle: loading cannot execute code, and tensors are memory-mapped. The
state dict holds parameters and the persistent buffers (router biases, the step counter); RoPE
tables and KV caches are rebuilt from the config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compass_model.config import CompassConfig
from compass_model.model import CompassForCausalLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_pretrained(model: CompassForCausalLM, directory) -> None:
    """Write ``directory/model.safetensors`` and ``directory/config.json`` (created if missing)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, path / WEIGHTS_NAME, metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(model.config.to_json())


def load_config(directory) -> CompassConfig:
    return CompassConfig.from_json((Path(directory) / CONFIG_NAME).read_text())


def from_pretrained(directory, device: torch.device | str | None = None) -> CompassForCausalLM:
    """Rebuild the model from ``config.json`` and load the weights exactly (strict: every tensor
    must match by name, shape and dtype)."""
    path = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: not a save_pretrained directory")
    model = CompassForCausalLM(load_config(path))
    state = load_file(path / WEIGHTS_NAME)
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].dtype != v.dtype:
            raise ValueError(f"{k}: checkpoint dtype {v.dtype} differs from the config's {own[k].dtype}")
    model.load_state_dict(state, strict=True)
    return model if device is None else model.to(device)
