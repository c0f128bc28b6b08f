"""Whole tiny models of every family whose experts use ``@use_experts_implementation``: the family's
CausalLM (or its text model when it has none), from its own config class with the defaults shrunk
generically (sizes, layers, experts, vocabulary) plus a few per-family settings."""

from __future__ import annotations

import functools
import importlib

import torch

from kernels.integrations.hf_families import _configs, experts_classes

VOCAB, LAYERS = 64, 2

# attribute -> tiny value, wherever a config (or one of its sub-configs) has it as an int or leaves it unset
_SIZES = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
    "head_dim": 8, "max_position_embeddings": 128, "max_window_layers": LAYERS,
    "intermediate_size": 24, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24,
    "expert_intermediate_size": 16, "moe_ffn_hidden_size": 16, "ffn_hidden_size": 24, "moe_hidden_size": 32,
    "num_local_experts": 8, "num_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2, "top_k": 2, "top_k_experts": 2,
    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 0, "num_dense_layers": 0, "first_dense_layers": 0,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "sliding_window": 8, "attention_chunk_size": 8,
}


def _cut(value, old_layers: int):
    """Per-layer lists (as long as the old layer count) keep their first LAYERS entries."""
    if isinstance(value, (list, tuple)) and old_layers > LAYERS and len(value) == old_layers:
        return type(value)(value[:LAYERS])
    return value


def shrink_config(cfg):
    """The tiny version of a config, in place: every known size, per-layer lists cut to LAYERS,
    token ids inside the vocabulary."""
    for c in _configs(cfg):
        old_layers = getattr(c, "num_hidden_layers", None)
        kv, heads = getattr(c, "num_key_value_heads", None), getattr(c, "num_attention_heads", None)
        for key, value in _SIZES.items():
            old = getattr(c, key, "absent")
            if old == "absent":
                continue
            if old is None or (isinstance(old, int) and not isinstance(old, bool)):
                setattr(c, key, value)
            elif isinstance(old, (list, tuple)) and old and all(isinstance(v, int) for v in old):
                setattr(c, key, type(old)([value] * len(old)))
        for key, old in list(vars(c).items()):             # the same sizes under other names
            if isinstance(old, int) and not isinstance(old, bool) and key not in _SIZES:
                if key.endswith("head_dim") and old > 8:
                    setattr(c, key, 8)
                elif key.endswith("vocab_size") and old > VOCAB:
                    setattr(c, key, VOCAB)
        if isinstance(kv, int):
            c.num_key_value_heads = 4 if kv == heads else 2
        if isinstance(old_layers, int):
            for key, value in list(vars(c).items()):
                if not key.startswith("_"):
                    setattr(c, key, _cut(value, old_layers))
        if isinstance(getattr(c, "mlp_layer_types", None), list):     # experts in every layer
            c.mlp_layer_types = ["sparse"] * len(c.mlp_layer_types)
        if getattr(c, "enable_moe_block", None) is False:               # an optional MoE block: on
            c.enable_moe_block = True
        if isinstance(getattr(c, "mlp_only_layers", None), list):
            c.mlp_only_layers = []
        if isinstance(getattr(c, "decoder_sparse_step", None), int):
            c.decoder_sparse_step = 1
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(c, key, None)
            if isinstance(v, int) and v >= VOCAB:
                setattr(c, key, 1)
            elif isinstance(v, list):
                setattr(c, key, [t if t < VOCAB else 1 for t in v])
        rope = getattr(c, "rope_parameters", None)
        if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
            rope["mrope_section"] = [2, 1, 1]            # sums to head_dim / 2
    return cfg


@functools.cache
def families() -> dict[str, str]:
    """{family: model class name}: the CausalLM, else the text model, else the model."""
    out = {}
    for fam in sorted({q.split(".")[0] for q in experts_classes()}):
        mod = importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
        names = [n for n, c in vars(mod).items() if isinstance(c, type) and c.__module__ == mod.__name__
                 and getattr(c, "config_class", None) is not None and not n.endswith("PreTrainedModel")]
        for suffix in ("ForCausalLM", "TextModel", "Model"):
            pick = [n for n in names if n.endswith(suffix) and "Vision" not in n and "Audio" not in n]
            if pick:
                out[fam] = min(pick, key=len)
                break
    return out


def tiny_model(family: str, overrides: dict | None = None, init: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model in fp32, eval mode, every parameter random (biases too). ``init``:
    arguments of the config class; ``overrides``: settings after the shrink (dotted keys reach into
    sub-configs and dicts)."""
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = getattr(mod, families()[family])
    cfg = shrink_config(cls.config_class(**(init or {})))
    for key, value in (overrides or {}).items():
        target = cfg
        *path, attr = key.split(".")
        for p in path:
            target = target[p] if isinstance(target, dict) else getattr(target, p)
        if isinstance(target, dict):
            target[attr] = value
        else:
            setattr(target, attr, value)
    torch.manual_seed(seed)
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > 2_000_000:
        raise RuntimeError(f"{family}: the shrunk config still has {n} parameters")
    model = cls(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
        for name, b in model.named_buffers():
            if "correction_bias" in name or "bias" in name.rsplit(".", 1)[-1] and b.is_floating_point():
                b.normal_(0, 0.1)
    return model.float().eval()
