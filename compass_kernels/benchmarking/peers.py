"""The plain-PyTorch implementations the kernels are measured against.

* ``megatron_*``: the Megatron-LM style token dispatcher: a stable argsort of the flattened expert
  ids, ``index_select`` to dispatch, a multiply by the permuted probs and ``index_add_`` to combine.
* ``naive_moe``: the Mixtral / Qwen-MoE forward of ``transformers``: a one-hot expert mask, then per
  expert a ``torch.where`` for its tokens (a host sync, as in HF), an ``index_select`` gather, the
  expert's SwiGLU, a multiply by the gate weights and an ``index_add_`` scatter. ``hf_lists`` /
  ``hf_combine`` are its token lists and its combine step alone.
* ``mm_cat``: a loop of ``torch.mm`` over the groups and a ``torch.cat`` (the grouped-GEMM peer).
* ``split_cat``: ``torch.split`` + ``torch.cat`` in the sorted order (the sort_chunks peer).
* ``eager_quantize_fp8``: FP8 quantization as one writes it in eager PyTorch (torchao's recipe).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["eager_quantize_fp8", "hf_combine", "hf_lists", "megatron_combine", "megatron_dispatch",
           "megatron_moe_routing", "mm_cat", "naive_moe", "split_cat"]


# ---- routing ------------------------------------------------------------------------------------

def megatron_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int):
    """``x [T, H]``, ``topk_ids [T, k]`` -> ``(x_sorted [T k, H], sorted_idx [T k], tokens_per_expert [E])``
    in expert-contiguous order (the order of ``ck.permute`` without capacity or alignment)."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    sorted_idx = torch.argsort(flat, stable=True)                     # [T * k] expert-contiguous order
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    return x.index_select(0, sorted_idx // k), sorted_idx, tokens_per_expert


def megatron_combine(y: torch.Tensor, sorted_idx: torch.Tensor, probs: torch.Tensor, num_tokens: int):
    """``y [T k, H]`` in ``megatron_dispatch``'s order -> ``[T, H]``, each row weighted by its prob."""
    k = probs.shape[1]
    weighted = y * probs.reshape(-1)[sorted_idx, None].to(y.dtype)
    out = y.new_zeros(num_tokens, y.shape[1])
    return out.index_add_(0, sorted_idx // k, weighted)


def megatron_moe_routing(x: torch.Tensor, topk_ids: torch.Tensor, probs: torch.Tensor, num_experts: int):
    """Dispatch then combine (identity experts): the peer of route + permute + unpermute."""
    xp, sorted_idx, _ = megatron_dispatch(x, topk_ids, num_experts)
    return megatron_combine(xp, sorted_idx, probs, x.shape[0])


# ---- the Hugging Face style MoE loop ------------------------------------------------------------

def _no_range(name: str):
    return contextlib.nullcontext()


def naive_moe(moe, x: torch.Tensor, stage=_no_range) -> torch.Tensor:
    """``moe``: a ``compass_model.moe.MoE`` (``router``, ``w13_EDF [E, D, 2F]``, ``w2_EFD [E, F, D]``);
    ``x [..., D]`` -> ``[..., D]``, the same function as the layer (no capacity dropping, no shared
    expert). ``stage(name)`` wraps each stage in a range named as moe.py's NVTX ranges (router,
    permute, expert_fc1, activation, expert_fc2, unpermute; the per-expert ones repeat E times)."""
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


def hf_lists(topk_ids: torch.Tensor, num_experts: int) -> list:
    """Per expert ``(tok, slot)`` as the HF loop finds them (``torch.where`` on the one-hot mask)."""
    mask_EKT = F.one_hot(topk_ids, num_experts).permute(2, 1, 0)
    out = []
    for e in range(num_experts):
        slot, tok = torch.where(mask_EKT[e])
        out.append((tok, slot))
    return out


def hf_combine(ys: list, lists: list, gates: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The HF loop's combine alone: per expert ``index_add_`` of ``y_e * gates`` (``ys[e]``: the
    expert's output rows for ``lists[e]`` of ``hf_lists``)."""
    out = ys[0].new_zeros(num_tokens, ys[0].shape[1])
    for y_e, (tok, slot) in zip(ys, lists):
        out.index_add_(0, tok, y_e * gates[tok, slot, None])
    return out


# ---- grouped GEMM, sort_chunks, FP8 -------------------------------------------------------------

def mm_cat(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x [M, K]``, ``w [E, K, N]``, ``offsets [E + 1]`` -> ``[M, N]``: one ``torch.mm`` per group
    (the offsets read on the host) and a ``torch.cat``."""
    b = offsets.tolist()
    return torch.cat([x[b[e]: b[e + 1]] @ w[e] for e in range(w.shape[0])])


def split_cat(x: torch.Tensor, sizes: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x``'s chunks of ``sizes`` rows, concatenated in ``order`` (both read on the host)."""
    parts = torch.split(x, sizes.tolist())
    return torch.cat([parts[i] for i in order.tolist()])


def eager_quantize_fp8(x: torch.Tensor, granularity: str, block_size: int = 128, fmax: float = 448.0):
    """``x [M, K]`` -> ``(codes [M, K] float8_e4m3fn, scales)``: amax, clamp, divide, clamp, cast, each
    a separate pass over memory (fp32 temporaries for 16-bit inputs). ``granularity``: ``row``,
    ``block`` (1 x ``block_size``) or ``tensor``; the same formula, codes and scales as
    ``ck.quantize_fp8``."""
    M, K = x.shape
    xf = x.float()
    if granularity == "block":
        xf = xf.view(M, K // block_size, block_size)
    dims = {"row": (-1,), "block": (-1,), "tensor": (-2, -1)}
    if granularity not in dims:
        raise ValueError(f"granularity must be one of {sorted(dims)}, got {granularity!r}")
    scale = xf.abs().amax(dim=dims[granularity], keepdim=True).clamp(min=1e-12) / fmax
    data = (xf / scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
    return data.view(M, K), scale
