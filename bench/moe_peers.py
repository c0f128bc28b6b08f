"""The peer the whole MoE layer is measured against: the naive Hugging Face style MoE loop.

``naive_moe`` is the Mixtral / Qwen-MoE forward of ``transformers``: a one-hot expert mask, then per
expert a ``torch.where`` for its tokens, an ``index_select`` gather, the expert's SwiGLU, a multiply
by the gate weights and an ``index_add_`` scatter into the output. It reads the same router and
weights as ``compass_model.moe.MoE``, so both paths compute the same function. ``stage(name)``
wraps each stage in a range with the names moe.py gives its NVTX ranges (the per-expert ranges
repeat E times; profilers sum them by name). Like the HF code it syncs with the host once per
expert (``torch.where``), which is part of what the fused path takes out.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from compass_model.config import CompassConfig


def _no_range(name: str):
    return contextlib.nullcontext()


def naive_moe(moe, x: torch.Tensor, stage=_no_range) -> torch.Tensor:
    """``moe``: a ``compass_model.moe.MoE`` (router, ``w13_EDF [E, D, 2F]``, ``w2_EFD [E, F, D]``);
    ``x [..., D]`` -> ``[..., D]``. No capacity dropping and no shared expert (the benchmark
    configurations have neither)."""
    E = moe.num_experts
    x_TD = x.reshape(-1, x.shape[-1])
    with stage("router"):
        _, _, ids_TK, gates_TK = moe.router(x_TD)
        gates_TK = gates_TK.to(x.dtype)
    out_TD = torch.zeros_like(x_TD)
    with stage("permute"):
        mask_EKT = F.one_hot(ids_TK, E).permute(2, 1, 0)                  # [E, k, T]
    # One tensor per expert, as HF's per-expert nn.Linear: unbind once, because indexing the stacked
    # weight per expert makes each backward materialise a zero [E, D, 2F] gradient (E=128: 8 of 9 s).
    w13 = moe.w13_EDF.unbind(0)
    w2 = moe.w2_EFD.unbind(0)
    for e in range(E):
        with stage("permute"):
            slot, tok = torch.where(mask_EKT[e])                           # host sync, as in HF
            xe_ND = x_TD.index_select(0, tok)
        with stage("expert_fc1"):
            h_NF2 = xe_ND @ w13[e]
        with stage("activation"):
            gate_NF, up_NF = h_NF2.chunk(2, dim=-1)
            a_NF = F.silu(gate_NF) * up_NF
        with stage("expert_fc2"):
            y_ND = a_NF @ w2[e]
        with stage("unpermute"):
            out_TD.index_add_(0, tok, y_ND * gates_TK[tok, slot, None])
    return out_TD.reshape(x.shape)


def moe_layer_flops(config: CompassConfig, tokens: int, training: bool = False) -> int:
    """Matmul FLOPs of one MoE layer (no shared expert) for ``tokens`` tokens, in the convention of
    ``CompassConfig.flops_per_token``: 2 x the active MoE parameters per token (top_k experts of
    ``3 d f`` plus the ``d E`` router), x3 for forward + backward."""
    d, f = config.d_model, config.expert_ffn_dim
    fwd = 2 * tokens * (config.top_k * 3 * d * f + d * config.num_experts)
    return 3 * fwd if training else fwd
