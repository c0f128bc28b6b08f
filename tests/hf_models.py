"""Whole tiny models of every family whose experts use ``@use_experts_implementation``: the family's
CausalLM (or its text model when it has none), from its own config class with the defaults shrunk
generically (sizes, layers, experts, vocabulary) plus a few per-family settings."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import itertools

import torch

from hf_families import _configs, experts_classes

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


def _is_attention(kind) -> bool:
    return isinstance(kind, str) and kind.endswith("attention") and kind != "linear_attention"


def _keep_an_attention_layer(c, key: str, full: list) -> None:
    """A hybrid stack whose cut to LAYERS left only linear-attention (state-space) layers gets one
    attention layer back, of the kind the full stack has: a cache without any attention layer has no
    sequence length, so such a model cannot ``generate``."""
    kinds = list(getattr(c, key))
    if "linear_attention" in kinds and not any(map(_is_attention, kinds)):
        last = len(kinds) - 1 - kinds[::-1].index("linear_attention")       # as in the full stacks: attention after
        kinds[last] = next((k for k in full if _is_attention(k)), "full_attention")
        setattr(c, key, kinds)


def shrink_config(cfg):
    """The tiny version of a config, in place: every known size, per-layer lists cut to LAYERS (a
    hybrid stack keeps an attention layer), token ids inside the vocabulary."""
    for c in _configs(cfg):
        old_layers = getattr(c, "num_hidden_layers", None)
        stacks = {k: list(v) for k, v in vars(c).items() if k in ("layer_types", "layers_block_type")
                  and isinstance(v, (list, tuple))}
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
        for key, full in stacks.items():
            _keep_an_attention_layer(c, key, full)
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


def tiny_model(family: str, overrides: dict | None = None, init: dict | None = None, seed: int = 0,
               class_name: str | None = None) -> torch.nn.Module:
    """The family's tiny model in fp32, eval mode, every parameter random (biases too). ``init``:
    arguments of the config class; ``overrides``: settings after the shrink (dotted keys reach into
    sub-configs and dicts); ``class_name``: another model class of the family (default: families())."""
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = getattr(mod, class_name or families()[family])
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
    if n > 3_000_000:
        raise RuntimeError(f"{family}: the shrunk config still has {n} parameters")
    model = cls(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
        for name, b in model.named_buffers():
            if "correction_bias" in name or "bias" in name.rsplit(".", 1)[-1] and b.is_floating_point():
                b.normal_(0, 0.1)
    return model.float().eval()


def to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` the way ``from_pretrained(dtype=...)`` loads it: the parameters
    and buffers the class keeps in fp32 (``_keep_in_fp32_modules_strict``: routers, score-correction
    biases, ...) stay fp32."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype)
    keep = build_glob_alternation(list(plan))[0] if plan else None
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in itertools.chain(out.named_parameters(), out.named_buffers()):
            if t.is_floating_point() and not (keep is not None and keep.search(name)):
                t.data = t.data.to(dtype)
    return out


@contextlib.contextmanager
def routing(model: torch.nn.Module, replay: list | None = None):
    """Record (``replay=None``) or replay the routing every experts module of ``model`` receives, in
    call order: yields the list of ``(top_k_index, top_k_weights)``. A replay hands each call the
    recorded ids and weights (cast to the weights' dtype of that call), so two runs route alike even
    where rounding would flip a near tie between two experts' scores."""
    record: list = []
    classes = tuple(experts_classes().values())

    def hook(module, args, kwargs):
        args = list(args)
        names = ("hidden_states", "top_k_index", "top_k_weights")
        get = [args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names)]
        if replay is None:
            record.append((get[1].clone(), get[2].detach().clone()))
            return None
        ids, w = replay[len(record)]
        record.append(None)
        for i, value in ((1, ids), (2, w.to(get[2].dtype))):
            if i < len(args):
                args[i] = value
            else:
                kwargs[names[i]] = value
        return tuple(args), kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, classes)]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()
    if replay is not None and len(record) != len(replay):
        raise AssertionError(f"{len(record)} experts calls replayed {len(replay)} recorded ones")


def assert_bf16_close(got: torch.Tensor, ref: torch.Tensor, ref32: torch.Tensor, what: str = "") -> None:
    """A bf16 model output through "compass" (``got``) against "eager" in bf16 (``ref``) and the fp32
    model (``ref32``), relative to the output's scale ``s = max |ref32|``. bf16 keeps 8 significant
    bits (a rounding step of up to 2^-8 = 0.4% of a value), and a two-layer model rounds the residual
    stream, the attention, the experts, the norms and the head one after another, so two bf16 runs
    that round in different places differ by several steps of s: |got - ref| <= 5e-2 s (13 steps).
    compass accumulates in fp32 and rounds once, so it may not be further from fp32 than eager is:
    |got - ref32| <= 1.5 |ref - ref32| + 1e-2 s."""
    got, ref = got.float(), ref.float()
    s = ref32.abs().max()
    err, eager_err = (got - ref).abs().max(), (ref - ref32).abs().max()
    assert err <= 5e-2 * s, f"{what}: bf16 compass vs bf16 eager {err / s:.4f} of the scale (> 0.05)"
    own = (got - ref32).abs().max()
    assert own <= 1.5 * eager_err + 1e-2 * s, (f"{what}: bf16 compass is {own / s:.4f} of the scale from fp32, "
                                               f"bf16 eager {eager_err / s:.4f}")
