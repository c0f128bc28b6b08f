"""Find every experts class of the installed transformers that uses ``@use_experts_implementation``
and build a tiny instance of it from its family's own config class (shrunk in place)."""

from __future__ import annotations

import functools
import importlib
import inspect
from pathlib import Path

import torch

HIDDEN, FFN, EXPERTS, TOP_K = 16, 12, 8, 2

_SHRINK = {
    "hidden_size": HIDDEN, "moe_hidden_size": HIDDEN, "intermediate_size": FFN, "moe_intermediate_size": FFN,
    "expert_intermediate_size": FFN, "moe_ffn_hidden_size": FFN, "ffn_hidden_size": FFN,
    "num_local_experts": EXPERTS, "num_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "moe_k": TOP_K, "top_k": TOP_K,
}


def _is_experts_class(c) -> bool:
    fwd = getattr(c, "forward", None)
    return isinstance(c, type) and "experts_interface" in getattr(getattr(fwd, "__code__", None), "co_freevars", ())


@functools.cache
def experts_classes() -> dict[str, type]:
    """``{"family.ClassName": class}`` for every decorated experts class, found by reading the
    installed modeling files (the decorator's own heuristic) and inspecting their classes."""
    import transformers.models as tm

    found = {}
    for d in sorted(Path(tm.__file__).parent.iterdir()):
        f = d / f"modeling_{d.name}.py"
        if not f.exists() or "@use_experts_implementation" not in f.read_text():
            continue
        mod = importlib.import_module(f"transformers.models.{d.name}.modeling_{d.name}")
        for name, c in vars(mod).items():
            if _is_experts_class(c) and c.__module__ == mod.__name__:
                found[f"{d.name}.{name}"] = c
    return found


def _configs(cfg, depth=0):
    yield cfg
    if depth < 2:
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None and hasattr(sub, "to_dict"):
                yield from _configs(sub, depth + 1)


def shrink(cfg):
    """Set the sizes the experts read (ints, unset ones, per-layer lists) to tiny values, in place."""
    for key, value in _SHRINK.items():
        if not hasattr(cfg, key):
            continue
        old = getattr(cfg, key)
        if old is None or (isinstance(old, int) and not isinstance(old, bool)):
            setattr(cfg, key, value)
        elif isinstance(old, (list, tuple)) and all(isinstance(v, int) for v in old):
            setattr(cfg, key, [value] * len(old))
    return cfg


def tiny_experts(qualname: str, seed: int = 0) -> torch.nn.Module:
    """A tiny instance of the experts class, all parameters random (biases too), fp32."""
    cls = experts_classes()[qualname]
    mod = importlib.import_module(cls.__module__)
    config_classes = [c for c in vars(mod).values() if isinstance(c, type) and hasattr(c, "config_class")
                      and getattr(c, "config_class", None) is not None]
    errors = []
    # an experts class whose caller passes its width (per-layer widths in the config) gets FFN
    params = inspect.signature(cls.__init__).parameters
    extra = {"intermediate_size": FFN} if "intermediate_size" in params else {}
    # a class built per layer (``layer_idx``) is tried at each layer index until one builds tiny
    layers = range(4) if "layer_idx" in params else [None]
    for model_cls in config_classes:
        try:
            top = model_cls.config_class()
        except Exception as e:  # noqa: BLE001  (some need arguments: try the next)
            errors.append(repr(e))
            continue
        for cfg in _configs(top):
            shrink(cfg)
            for layer in layers:
                try:
                    torch.manual_seed(seed)
                    m = cls(cfg, **extra, **({} if layer is None else {"layer_idx": layer}))
                except Exception as e:  # noqa: BLE001
                    errors.append(f"{type(cfg).__name__}: {e!r}")
                    continue
                if sum(p.numel() for p in m.parameters()) > 1e6:
                    errors.append(f"{type(cfg).__name__}: not shrunk")
                    continue
                with torch.no_grad():
                    for p in m.parameters():
                        p.normal_(0, 0.3)
                return m.float()
    raise RuntimeError(f"no config builds {qualname}: {errors[:4]}")


def hidden_dim(m) -> int:
    w = m.down_proj                      # [E, D, F] (nn.Linear layout) or [E, F, D] (transposed)
    return w.shape[2] if m.is_transposed else w.shape[1]
