"""Export a Compass checkpoint to a Hugging Face transformers checkpoint (``compass export --format hf``).

The Compass trunk maps exactly onto transformers' ``MixtralForCausalLM`` when it has what Mixtral
has: pre-norm RMSNorm blocks, GQA attention without biases with RoPE on (i, i + d/2) pairs (plain or
linear-scaled), every block an MoE of SwiGLU experts behind a softmax top-k router whose gates are
renormalised over the k chosen. Weights are renamed and the fused expert weights transposed to
transformers' nn.Linear layout (``w13_EDF [E, D, 2F]`` -> ``gate_up_proj [E, 2F, D]``, gate half
first in both; ``w2_EFD [E, F, D]`` -> ``down_proj [E, D, F]``). The MTP modules (training and
speculative decoding only) are not exported: logits do not depend on them.

Presets that map: ``tiny`` (its MTP module is left out). ``small``, ``proxy-2b`` and ``compass-v3``
do not (shared expert; ``small`` also a dense first block; ``compass-v3`` also YaRN). What does not
map (``mapping_problems``): a shared expert (Compass's is always on and ungated: Qwen2-MoE gates its shared expert by a
sigmoid, DeepSeek-V3 routes by sigmoid scores), dense FFN blocks before the MoE blocks, YaRN / NTK
RoPE scaling (transformers' "yarn" and "dynamic" compute other frequencies) and a non-zero
aux-loss-free router bias (it changes the experts chosen; Mixtral has none). Any of them raises
``ValueError`` naming the feature rather than writing a model that computes something else.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compass_model.config import CompassConfig

__all__ = ["export_hf", "mapping_problems", "to_mixtral"]


def mapping_problems(config: CompassConfig, state: dict | None = None) -> list[str]:
    """Why a Compass model cannot be written as a Mixtral checkpoint (empty: it can)."""
    problems = []
    if config.shared_expert_dim:
        problems.append(f"shared_expert_dim={config.shared_expert_dim}: an always-on, ungated shared expert "
                        "(no transformers class with softmax top-k routing has one)")
    if config.n_dense_layers:
        problems.append(f"n_dense_layers={config.n_dense_layers}: dense FFN blocks before the MoE blocks "
                        "(Mixtral has an MoE in every block)")
    if config.rope_scaling not in ("none", "linear"):
        problems.append(f"rope_scaling={config.rope_scaling!r}: transformers' RoPE scalings compute other "
                        "frequencies (only 'none' and 'linear' map)")
    if state is not None and any(k.endswith("router.bias") and not k.startswith("mtp.") and bool(v.any())
                                 for k, v in state.items()):
        problems.append("router bias (aux-loss-free balancing, router_bias_rate) is non-zero: it changes the "
                        "experts chosen and Mixtral's router has none")
    return problems


def to_mixtral(config: CompassConfig, state: dict):
    """``(MixtralConfig, state_dict)`` for a mappable Compass config and state dict."""
    from transformers import MixtralConfig

    problems = mapping_problems(config, state)
    if problems:
        raise ValueError("this Compass model does not map onto a transformers architecture: " + "; ".join(problems))
    rope = {"rope_type": "default", "rope_theta": config.rope_base}
    if config.rope_scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": config.rope_base, "factor": config.rope_factor}
    hf_config = MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.expert_ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_parameters=rope,
        num_local_experts=config.num_experts, num_experts_per_tok=config.top_k, tie_word_embeddings=False,
        router_aux_loss_coef=config.aux_loss_coef, dtype=config.dtype, sliding_window=None)
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["head.weight"]}
    for i in range(config.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[f"{dst}self_attn.{b}.weight"] = state[f"{src}attn.{a}.weight"]
        out[f"{dst}input_layernorm.weight"] = state[f"{src}attn_norm.weight"]
        out[f"{dst}post_attention_layernorm.weight"] = state[f"{src}ffn_norm.weight"]
        out[f"{dst}mlp.gate.weight"] = state[f"{src}ffn.router.weight"]
        out[f"{dst}mlp.experts.gate_up_proj"] = state[f"{src}ffn.w13_EDF"].transpose(1, 2).contiguous()
        out[f"{dst}mlp.experts.down_proj"] = state[f"{src}ffn.w2_EFD"].transpose(1, 2).contiguous()
    return hf_config, out


def export_hf(checkpoint, out) -> Path:
    """Read a ``save_pretrained`` Compass checkpoint and write ``out`` as a transformers checkpoint
    (``MixtralForCausalLM.from_pretrained(out)`` loads it). Returns ``out``."""
    from compass_model.checkpoint import load_config, load_weights

    try:
        from transformers import MixtralForCausalLM
    except ImportError as e:
        raise ImportError("compass export --format hf needs transformers >= 5: pip install 'compass-kernels[hf]'") from e
    path = Path(checkpoint)
    config = load_config(path)
    state = load_weights(path)          # model.safetensors, or a distributed checkpoint's shards
    hf_config, hf_state = to_mixtral(config, state)
    with torch.device("meta"):
        model = MixtralForCausalLM(hf_config)
    model.load_state_dict({k: v.to(config.torch_dtype) for k, v in hf_state.items()}, strict=True, assign=True)
    model.save_pretrained(out)
    return Path(out)
