"""The peers that the routing kernels are measured against, in plain PyTorch.

megatron_*: the Megatron-LM style token dispatcher (stable argsort of the flattened expert ids,
index_select to dispatch, multiply by probs and index_add to combine). copy_ceiling: a preallocated
``copy_`` of the same number of bytes, the bandwidth ceiling of this machine.
"""

from __future__ import annotations

import torch


def megatron_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int):
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    sorted_idx = torch.argsort(flat, stable=True)                     # [T * k] expert-contiguous order
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    xp = x.index_select(0, sorted_idx // k)                           # [T * k, H]
    return xp, sorted_idx, tokens_per_expert


def megatron_combine(y: torch.Tensor, sorted_idx: torch.Tensor, probs: torch.Tensor, num_tokens: int):
    k = probs.shape[1]
    weighted = y * probs.reshape(-1)[sorted_idx, None].to(y.dtype)
    out = y.new_zeros(num_tokens, y.shape[1])
    return out.index_add_(0, sorted_idx // k, weighted)


def megatron_moe_routing(x, topk_ids, probs, num_experts):
    xp, sorted_idx, _ = megatron_dispatch(x, topk_ids, num_experts)
    return megatron_combine(xp, sorted_idx, probs, x.shape[0])


def routing_bytes(T: int, H: int, k: int, elem: int, backward: bool = False) -> int:
    """Bytes the fused routing must move: permute reads T rows and writes T*k; unpermute reads T*k
    rows and writes T. The backward moves the same again (plus the probs dot, which re-reads y)."""
    fwd = (T + T * k) * H * elem * 2
    return fwd + (fwd + T * k * H * elem if backward else 0)
