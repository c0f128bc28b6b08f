"""Bytes each op must move and FLOPs it must do: one definition per op.

A byte model counts what the op cannot avoid: every input it reads once, every output it writes
once, index and weight tensors included, at their real element sizes (int64 ids and row maps,
fp32 gates and scales). Cache reuse is not subtracted and temporaries are not added, so
``bytes / seconds`` is an achieved bandwidth comparable with a ``copy_`` of the same bytes
(``copy_bytes``), the ceiling of the machine. Every implementation of an op is charged the same
bytes (a peer that moves more is slower at the same count). A FLOP model counts the matmul
multiply-adds as 2 FLOPs each, the convention of ``CompassConfig.flops_per_token``; training
(forward + backward) is 3x the forward.

``docs/benchmarking.md`` says where the earlier per-script models disagreed and why these counts
were kept.
"""

from __future__ import annotations

__all__ = [
    "GATE_BYTES", "H200_BF16_TFLOPS", "H200_HBM_TBPS", "INDEX_BYTES", "NIC_GBPS", "NVLINK_GBPS",
    "copy_bytes", "expert_flops", "gemm_flops", "moe_layer_flops", "otpo_weights_bytes",
    "permute_backward_bytes", "permute_bytes", "quantize_fp8_bytes", "route_bytes", "router_flops",
    "routing_bytes", "sinkhorn_bytes", "sort_chunks_bytes", "unpermute_backward_bytes", "unpermute_bytes",
]

INDEX_BYTES = 8   # int64: topk ids, the row map, expert offsets and counts, chunk sizes
GATE_BYTES = 4    # fp32 routing weights (probs) and their gradient

# Datasheet figures of the GPU the targets are set for (H200 SXM), used to turn a measured time into
# a fraction of peak and to price communication. Assumptions, not measurements.
H200_BF16_TFLOPS = 989.0   # dense bf16 tensor-core peak (H100 SXM alike)
H200_HBM_TBPS = 4.8        # HBM3e bandwidth
NVLINK_GBPS = 450.0        # NVLink 4, per direction per GPU
NIC_GBPS = 50.0            # a 400 Gb/s network link per GPU


def _check(**dims: int) -> None:
    for name, v in dims.items():
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def copy_bytes(numel: int, elem_size: int) -> int:
    """A ``dst.copy_(src)`` of ``numel`` elements: read them once and write them once."""
    _check(numel=numel, elem_size=elem_size)
    return 2 * numel * elem_size


# ---- routing ------------------------------------------------------------------------------------

def route_bytes(tokens: int, top_k: int, num_experts: int, id_size: int = INDEX_BYTES) -> int:
    """``ck.route``: read the ``[T, k]`` ids, write the ``[T, k]`` int64 row map, the ``E``
    tokens-per-expert counts and the ``E + 1`` offsets."""
    _check(tokens=tokens, top_k=top_k, num_experts=num_experts, id_size=id_size)
    return tokens * top_k * (id_size + INDEX_BYTES) + (2 * num_experts + 1) * INDEX_BYTES


def permute_bytes(tokens: int, hidden: int, top_k: int, elem_size: int) -> int:
    """``ck.permute``: read ``x [T, H]`` and the row map ``[T, k]``, write ``T k`` rows of ``H``."""
    _check(tokens=tokens, hidden=hidden, top_k=top_k, elem_size=elem_size)
    tk = tokens * top_k
    return (tokens + tk) * hidden * elem_size + tk * INDEX_BYTES


def unpermute_bytes(tokens: int, hidden: int, top_k: int, elem_size: int, probs: bool = True) -> int:
    """``ck.unpermute``: read ``T k`` rows of ``H`` and the row map (and the fp32 ``probs [T, k]``
    when given), write ``out [T, H]``."""
    _check(tokens=tokens, hidden=hidden, top_k=top_k, elem_size=elem_size)
    tk = tokens * top_k
    return (tokens + tk) * hidden * elem_size + tk * (INDEX_BYTES + (GATE_BYTES if probs else 0))


def permute_backward_bytes(tokens: int, hidden: int, top_k: int, elem_size: int) -> int:
    """The gradient of ``x`` through permute: an unpermute without probs (sum the ``k`` row
    gradients of each token)."""
    return unpermute_bytes(tokens, hidden, top_k, elem_size, probs=False)


def unpermute_backward_bytes(tokens: int, hidden: int, top_k: int, elem_size: int) -> int:
    """The gradients of ``y`` and ``probs`` through unpermute: read ``grad_out [T, H]``, ``y``
    again (``grad_probs`` is a dot of the two), the row map and ``probs``; write ``grad_y`` and
    ``grad_probs``."""
    _check(tokens=tokens, hidden=hidden, top_k=top_k, elem_size=elem_size)
    tk = tokens * top_k
    return (tokens + 2 * tk) * hidden * elem_size + tk * (INDEX_BYTES + 2 * GATE_BYTES)


def routing_bytes(tokens: int, hidden: int, top_k: int, elem_size: int, *, num_experts: int,
                  backward: bool = False) -> int:
    """route + permute + unpermute with probs (the MoE layer's dispatch and combine); with
    ``backward`` also the gradients of ``x`` and ``probs`` (forward + backward, as timed)."""
    fwd = (route_bytes(tokens, top_k, num_experts) + permute_bytes(tokens, hidden, top_k, elem_size)
           + unpermute_bytes(tokens, hidden, top_k, elem_size))
    if not backward:
        return fwd
    return (fwd + unpermute_backward_bytes(tokens, hidden, top_k, elem_size)
            + permute_backward_bytes(tokens, hidden, top_k, elem_size))


def sort_chunks_bytes(rows: int, hidden: int, elem_size: int, num_chunks: int) -> int:
    """``ck.sort_chunks``: read and write every row once, read the chunk sizes and the order."""
    _check(rows=rows, hidden=hidden, elem_size=elem_size, num_chunks=num_chunks)
    return 2 * rows * hidden * elem_size + 2 * num_chunks * INDEX_BYTES


# ---- FP8 ----------------------------------------------------------------------------------------

def quantize_fp8_bytes(rows: int, cols: int, elem_size: int, granularity: str, block_size: int = 128) -> int:
    """``ck.quantize_fp8`` of ``[rows, cols]``: read x, write one-byte codes and fp32 scales.
    ``tensor`` reads x twice (the global amax is needed before the first code)."""
    _check(rows=rows, cols=cols, elem_size=elem_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    nb = lambda n: -(-n // block_size)  # noqa: E731 - ceil division
    scales = {"row": rows, "block": rows * nb(cols), "block2d": nb(rows) * nb(cols), "tensor": 1}
    if granularity not in scales:
        raise ValueError(f"granularity must be one of {sorted(scales)}, got {granularity!r}")
    reads = 2 if granularity == "tensor" else 1
    return rows * cols * (reads * elem_size + 1) + 4 * scales[granularity]


# ---- optimal transport --------------------------------------------------------------------------

def sinkhorn_bytes(batch: int, n: int, m: int, elem_size: int = 4) -> int:
    """``ck.sinkhorn`` on ``[B, n, m]``: read the cost and the marginals, write the plan."""
    _check(batch=batch, n=n, m=m, elem_size=elem_size)
    return batch * (2 * n * m + n + m) * elem_size


def otpo_weights_bytes(batch: int, len_chosen: int, len_rejected: int, hidden: int, elem_size: int = 4) -> int:
    """``ck.otpo_weights``: read the two hidden-state tensors and the bool masks, write the two
    fp32 weight vectors."""
    _check(batch=batch, len_chosen=len_chosen, len_rejected=len_rejected, hidden=hidden, elem_size=elem_size)
    lengths = len_chosen + len_rejected
    return batch * (lengths * hidden * elem_size + lengths * (1 + 4))


# ---- FLOPs --------------------------------------------------------------------------------------

def gemm_flops(m: int, k: int, n: int) -> int:
    """``[m, k] @ [k, n]``, or a grouped GEMM whose groups hold ``m`` rows in all."""
    _check(m=m, k=k, n=n)
    return 2 * m * k * n


def expert_flops(tokens: int, d_model: int, ffn_dim: int, top_k: int, training: bool = False) -> int:
    """SwiGLU experts (``w13 [d, 2f]``, ``w2 [f, d]``) for ``tokens`` tokens of ``top_k`` slots."""
    fwd = gemm_flops(tokens * top_k, d_model, 3 * ffn_dim)
    return 3 * fwd if training else fwd


def router_flops(tokens: int, d_model: int, num_experts: int, training: bool = False) -> int:
    """The router's ``[T, d] @ [d, E]`` logits."""
    fwd = gemm_flops(tokens, d_model, num_experts)
    return 3 * fwd if training else fwd


def moe_layer_flops(config, tokens: int, training: bool = False) -> int:
    """Matmul FLOPs of one MoE layer without a shared expert: the experts plus the router, i.e. 2 x
    the active MoE parameters per token. ``config``: anything with ``d_model``, ``expert_ffn_dim``,
    ``top_k`` and ``num_experts`` (a ``CompassConfig``)."""
    d = config.d_model
    return (expert_flops(tokens, d, config.expert_ffn_dim, config.top_k, training)
            + router_flops(tokens, d, config.num_experts, training))
