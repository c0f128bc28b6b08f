"""``compass plan``: the per-GPU memory and traffic of a preset at a dp x ep layout (a pure function).

The layout is the one ``compass train --dp N --ep M`` builds (``compass_model.train.parallel``):

  routed experts        split over ep (E / ep per rank), each slice FSDP2-sharded over dp on its
                        hidden dimension (dim 1: E / ep is often smaller than dp)
  every other weight    FSDP2-sharded over the world (dp x ep) on dim 0; replicated when dp = 1
  sharding              torch.chunk pieces (ceil(n / s) rows, the last ones shorter)

so the parameter, gradient and optimizer bytes are counted per tensor from the model's real
shapes (built on the meta device: nothing is allocated). Gradients are held in the parameter's
dtype, AdamW keeps exp_avg and exp_avg_sq in it too plus a 4-byte step per tensor (no fp32 master
copy: what the trainer runs today). The largest FSDP unit is also counted unsharded twice (the
gathered block in use and the next one prefetched).

Activations are an estimate (16-bit, one micro-batch of B x S tokens, attention without the S x S
matrix as fused kernels run it): per token and layer the block keeps its norms' inputs and
outputs, q / k / v, the attention output, the router's fp32 logits and scores, the k permuted rows,
the experts' gate|up and SwiGLU outputs and their outputs, the shared expert's; plus the logits in
16 and 32 bits. With activation checkpointing (``compass train --activation-checkpointing``) the
attention and expert internals are recomputed in the backward, one layer at a time.

All-to-all: ``CompassConfig.all_to_all_bytes_per_token`` (MTP layers included): each token's k
routed copies cross the EP group four times a step (dispatch and combine, forward and backward), a
fraction (ep - 1) / ep of them off the rank under uniform routing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from compass_model.config import CompassConfig

GiB = 1 << 30
DEFAULT_SEQ_LEN = 4096          # pretraining context; longer contexts need context parallelism (not built)
EXPERT_LEAVES = ("w13_EDF", "w2_EFD")


def chunk_rows(n: int, shards: int, index: int) -> int:
    """Rows of dim-0 length ``n`` that shard ``index`` of ``shards`` holds (torch.chunk pieces)."""
    c = -(-n // shards)
    return max(0, min(c, n - index * c))


def param_shapes(config: CompassConfig) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every parameter, from a model built on the meta device."""
    from compass_model.model import CompassForCausalLM

    with torch.device("meta"):
        model = CompassForCausalLM(config.replace(max_seq_len=min(config.max_seq_len, 8)))
    return [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]


def local_numel(name: str, shape: tuple[int, ...], dp: int, ep: int, rank: int) -> int:
    """Elements of one parameter that world rank ``rank`` (= d ep + e) holds in the train layout."""
    d, e = divmod(rank, ep)
    rest = math.prod(shape[1:])
    if name.rpartition(".")[2] in EXPERT_LEAVES and ep > 1:
        rows = shape[0] // ep                                    # this rank's experts, dim 1 over dp
        return rows * (chunk_rows(shape[1], dp, d) if dp > 1 else shape[1]) * math.prod(shape[2:])
    if dp > 1:
        return chunk_rows(shape[0], dp * ep, rank) * rest
    return math.prod(shape)


@dataclass
class Plan:
    """A parallel layout's per-GPU memory and communication (what ``compass plan`` prints)."""
    preset: str
    gpus: int
    dp: int
    ep: int
    seq_len: int
    micro_batch: int
    gpu_mem_gib: float
    params_per_gpu: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    gather_bytes: int                   # two unsharded FSDP units (the largest)
    activation_bytes: int
    activation_bytes_checkpointed: int
    a2a_bytes_per_token: int            # all four exchanges, every MoE layer, per token per step
    a2a_off_rank_bytes_per_token: int
    fits: bool
    fits_with_checkpointing: bool

    def total_bytes(self, checkpointing: bool) -> int:
        """Bytes per GPU: parameters, gradients, optimizer state, gathers and activations (checkpointed or not)."""
        act = self.activation_bytes_checkpointed if checkpointing else self.activation_bytes
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.gather_bytes + act

    def to_dict(self) -> dict:
        """The plan's fields as a dict (JSON-ready)."""
        return asdict(self)


def rank_bytes(config: CompassConfig, dp: int, ep: int, rank: int = 0, shapes=None) -> dict[str, int]:
    """Parameter / gradient / optimizer bytes that ``rank`` holds (see the module doc)."""
    shapes = param_shapes(config) if shapes is None else shapes
    n = p = 0
    for name, shape, dtype in shapes:
        k = local_numel(name, shape, dp, ep, rank)
        n += k
        p += k * dtype.itemsize
    return {"params": n, "param_bytes": p, "grad_bytes": p, "optimizer_bytes": 2 * p + 4 * len(shapes)}


def activation_bytes(c: CompassConfig, tokens: int, checkpointing: bool) -> int:
    """16-bit activation estimate for ``tokens`` tokens on one rank (see the module doc). With
    checkpointing (``train/recompute.py``: attention and the experts / dense FFN recomputed) a
    layer keeps its norms' inputs and outputs, the attention output, the router's fp32 logits and
    scores, the k permuted rows and expert outputs and the shared expert's activations, plus one
    layer's recomputed inner activations at a time."""
    hd = c.head_dim or c.d_model // c.n_heads
    D, k, F, E = c.d_model, c.top_k, c.expert_ffn_dim, c.num_experts
    attn_inner = (2 * c.n_heads + 2 * c.n_kv_heads) * hd         # q, k, v, attention output heads
    attn_kept = 4 * D                                            # norm in / out, wo in / out
    moe_inner = 3 * k * F                                        # gate|up, SwiGLU
    moe_kept = 2 * D + 4 * E + 2 * k * D + 3 * c.shared_expert_dim
    dense_inner, dense_kept = 3 * c.dense_ffn_dim, 2 * D
    layers = [(attn_kept + moe_kept, attn_inner + moe_inner) if i >= c.n_dense_layers
              else (attn_kept + dense_kept, attn_inner + dense_inner) for i in range(c.n_layers)]
    layers += [(attn_kept + moe_kept, attn_inner + moe_inner)] * c.mtp_depth
    logits = 3 * c.vocab_size * (1 + c.mtp_depth)                 # 16-bit logits + fp32 for the CE
    if checkpointing:
        return 2 * tokens * (sum(kept for kept, _ in layers) + max(inner for _, inner in layers) + logits)
    return 2 * tokens * (sum(kept + inner for kept, inner in layers) + logits)


def choose_layout(num_experts: int, gpus: int, gpus_per_node: int = 8) -> tuple[int, int]:
    """ep: the largest divisor of E that also divides the node's GPUs (the all-to-all stays on the
    node's fast links) and the GPU count; dp = gpus / ep."""
    ep = max(d for d in range(1, num_experts + 1)
             if num_experts % d == 0 and gpus % d == 0 and gpus_per_node % d == 0)
    return gpus // ep, ep


def make_plan(preset: str, gpus: int, gpu_mem_gib: float = 80.0, seq_len: int | None = None,
              micro_batch: int = 1, dp: int | None = None, ep: int | None = None,
              gpus_per_node: int = 8) -> Plan:
    """The plan of ``preset`` on ``gpus`` GPUs (layout chosen by ``choose_layout`` unless given)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus must be an int >= 1, got {gpus!r}")
    if micro_batch < 1 or gpu_mem_gib <= 0:
        raise ValueError(f"--micro-batch must be >= 1 and --gpu-mem > 0, got {micro_batch}, {gpu_mem_gib}")
    c = CompassConfig.from_preset(preset)
    S = min(c.max_seq_len, DEFAULT_SEQ_LEN) if seq_len is None else seq_len
    if not 1 <= S <= c.max_seq_len:
        raise ValueError(f"--seq-len must be in [1, {c.max_seq_len}] for {preset}, got {S}")
    if dp is None and ep is None:
        dp, ep = choose_layout(c.num_experts, gpus, gpus_per_node)
    elif dp is None or ep is None:
        ep = ep if ep is not None else gpus // dp
        dp = dp if dp is not None else gpus // ep
    from compass_model.train.parallel import check_layout

    check_layout(dp, ep, gpus, c.num_experts, world_is=f"--gpus is {gpus}")
    shapes = param_shapes(c)
    b = rank_bytes(c, dp, ep, 0, shapes)
    unit = _largest_unit_bytes(shapes, ep)
    gather = 2 * unit if dp > 1 else 0
    tokens = micro_batch * S
    act = activation_bytes(c, tokens, False)
    act_ckpt = activation_bytes(c, tokens, True)
    # every copy (ep = 1: all of them stay on the rank) and the off-rank ones (the config's model)
    a2a = round(c.all_to_all_bytes_per_token(2, include_mtp=True) * 2)
    off = round(c.all_to_all_bytes_per_token(ep, include_mtp=True))
    plan = Plan(preset, gpus, dp, ep, S, micro_batch, gpu_mem_gib, b["params"], b["param_bytes"], b["grad_bytes"],
                b["optimizer_bytes"], gather, act, act_ckpt, a2a, off, False, False)
    plan.fits = plan.total_bytes(False) <= gpu_mem_gib * GiB
    plan.fits_with_checkpointing = plan.total_bytes(True) <= gpu_mem_gib * GiB
    return plan


def _largest_unit_bytes(shapes, ep: int) -> int:
    """Bytes of the largest FSDP unit gathered at once: a block (or MTP module) without its experts
    plus its E / ep experts, or the root (embedding, head, final norm)."""
    units: dict[str, int] = {}
    for name, shape, dtype in shapes:
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("layers", "mtp") else "root"
        n = math.prod(shape) * dtype.itemsize
        if parts[-1] in EXPERT_LEAVES:
            n //= ep
        units[key] = units.get(key, 0) + n
    return max(units.values())


def format_plan(p: Plan) -> str:
    """The plan as the text table ``compass plan`` prints."""
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [
        f"{p.preset} on {p.gpus} GPUs: dp {p.dp} x ep {p.ep} (experts {p.ep}-way, each slice FSDP over dp; "
        f"other weights FSDP over all {p.gpus})",
        f"micro-batch {p.micro_batch} x seq {p.seq_len} tokens per GPU, {p.gpu_mem_gib:g} GiB per GPU",
        f"per GPU: parameters {p.params_per_gpu / 1e9:.3f} B",
        f"  parameters          {g(p.param_bytes)}",
        f"  gradients           {g(p.grad_bytes)}",
        f"  optimizer (AdamW)   {g(p.optimizer_bytes)}",
        f"  gathered FSDP units {g(p.gather_bytes)}",
        f"  activations         {g(p.activation_bytes)}   ({g(p.activation_bytes_checkpointed).strip()} with "
        "activation checkpointing)",
        f"  total               {g(p.total_bytes(False))}   ({g(p.total_bytes(True)).strip()} with checkpointing)",
        f"all-to-all: {p.a2a_bytes_per_token / 1e6:.3f} MB per token per step "
        f"({p.a2a_off_rank_bytes_per_token / 1e6:.3f} MB off the rank under uniform routing)",
    ]
    if p.fits:
        lines.append("fits")
    elif p.fits_with_checkpointing:
        lines.append("fits only with activation checkpointing")
    else:
        lines.append(f"does NOT fit in {p.gpu_mem_gib:g} GiB: more GPUs, a shorter --seq-len or a smaller "
                     "--micro-batch")
    return "\n".join(lines)
