"""The MoE feed-forward, composed of three parts: a router, a token dispatcher and grouped experts.

Data path (one NVTX range per stage, for nsys):
  router      ``Router``: logits = x W_r^T in fp32, softmax, top-k (optionally biased), gates
              renormalised over k
  permute     ``TokenDispatcher.dispatch``: ck.route + ck.permute, tokens to expert-contiguous rows
              (``compass_model.distributed.EPDispatcher`` adds the all-to-all to the experts' ranks)
  expert_fc1  ``grouped_mlp``: ck.grouped_gemm with the fused gate|up weights [E, D, 2F]
  activation  SwiGLU: silu(gate) * up
  expert_fc2  ck.grouped_gemm with the down weights [E, F, D]
  unpermute   ``TokenDispatcher.combine``: ck.unpermute(probs), gather + gate-weighted combine in one pass
``MoE`` composes them; the FP8 layer (``compass_model.quant.Fp8MoE``) swaps the experts part, expert
parallelism (``compass_model.distributed.EPMoE``) the dispatcher, and the transformers adapter
(``compass_kernels.integrations.transformers``) runs the dispatcher and ``grouped_mlp``
(``compass_kernels.moe_blocks``) on a Hugging Face experts module's weights. The router's balancing statistics (aux / z losses, bias load, collapse
diagnostics) are computed in one place, ``Router.balance``, from per-expert counts and score sums.
Nothing here reads a tensor on the host, so a block compiles with torch.compile(fullgraph=True)
(global-batch statistics with a capacity factor excepted: the capacity needs the whole batch's token
count, read once per layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compass_kernels import ranges
from compass_kernels.moe_blocks import TokenDispatcher, grouped_mlp
from compass_model.config import CompassConfig

# An expert is "dead" below this fraction of the uniform load 1/E.
DEAD_EXPERT_FRACTION = 0.1


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN ``w2(silu(w1 x) * w3 x)``: the dense blocks' FFN and the shared expert."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``w2(silu(w1 x) * w3 x)``."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def aux_loss_coefficient(config: CompassConfig, step) -> torch.Tensor:
    """The load-balancing coefficient at ``step`` (int or 0-d tensor), fp32 0-d tensor:
    ``min + (coef - min) * decay(step / decay_steps)`` with min <= coef, decay 1 (none), ``max(0, 1 - t)`` (linear),
    ``(1 + cos(pi min(t, 1))) / 2`` (cosine) or ``0.5^t`` (exp, half-life decay_steps).
    Tensor math, so a step counter kept as a buffer changes it without recompiling."""
    step = torch.as_tensor(step)
    hi = config.aux_loss_coef
    lo = min(config.aux_loss_min_coef, hi)          # aux_loss_coef=0 switches the term off, floor or not
    if config.aux_loss_decay == "none":
        return torch.full((), hi, dtype=torch.float32, device=step.device)
    t = step.float() / config.aux_loss_decay_steps
    if config.aux_loss_decay == "linear":
        frac = (1 - t).clamp(min=0)
    elif config.aux_loss_decay == "cosine":
        frac = 0.5 * (1 + torch.cos(math.pi * t.clamp(max=1)))
    else:
        frac = torch.pow(0.5, t)
    return lo + (hi - lo) * frac


def _per_token(total: torch.Tensor, num_tokens) -> torch.Tensor:
    """``total / max(num_tokens, 1)``; num_tokens an int or (all-reduced) tensor."""
    if isinstance(num_tokens, torch.Tensor):
        return total / num_tokens.clamp(min=1)
    return total / max(num_tokens, 1)


def balancing_loss_from_sums(counts_E: torch.Tensor, score_sum_E: torch.Tensor, num_tokens) -> torch.Tensor:
    """``E * sum_i f_i P_i`` from assignment counts [E] (no gradient) and router score sums over the
    tokens [E]: f_i = counts_i / sum(counts), P_i = score_sum_i / num_tokens."""
    E = counts_E.shape[0]
    f_E = counts_E.detach().float() / counts_E.sum().clamp(min=1)
    return E * (f_E * _per_token(score_sum_E.float(), num_tokens)).sum()


def load_balancing_loss(scores_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Switch / Mixtral top-k form ``E * sum_i f_i P_i``: f_i the fraction of (token, slot)
    assignments to expert i (no gradient), P_i the mean router probability of expert i. 1 when uniform."""
    return balancing_loss_from_sums(counts_E, scores_TE.float().sum(0), scores_TE.shape[0])


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t logsumexp(logits_t)^2`` (0 for T = 0), fp32."""
    return _per_token(torch.logsumexp(logits_TE.float(), dim=-1).square().sum(), logits_TE.shape[0])


def router_stats(counts_E: torch.Tensor, kept_E: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse diagnostics from assignment counts before (``counts``) and after capacity (``kept``):
    load fractions, normalised load entropy H(f) / log E (1 uniform, 0 collapsed), MaxVio
    (max load - mean) / mean, dead experts (load < 0.1 / E), max load (> 0.8: one expert took over)
    and the dropped fraction. Tensors, detached; nothing is read on the host."""
    E = counts_E.shape[0]
    counts = counts_E.detach().float()
    total = counts.sum()
    load = counts / total.clamp(min=1)
    entropy = -torch.xlogy(load, load).sum() / math.log(E) if E > 1 else torch.ones_like(total)
    mean = total / E
    return {
        "load": load,
        "entropy": entropy,
        "max_vio": (counts.max() - mean) / mean.clamp(min=1e-9),
        "dead": (load < DEAD_EXPERT_FRACTION / E).sum(),
        "max_load": load.max(),
        "dropped": 1 - kept_E.detach().float().sum() / total.clamp(min=1),
    }


def global_router_counts(counts_E: torch.Tensor, num_tokens: int, group):
    """Global-batch router statistics: one all-gather over ``group`` (every rank holding part of the
    batch, in batch order) of this rank's ``[counts_E, T]`` (E + 1 floats). Returns the summed
    counts [E], the summed token count (0-d) and the counts of the ranks before this one [E] (where
    this rank's assignments start in each expert's global (token, slot) order: global capacity)."""
    import torch.distributed as dist

    mine = torch.cat([counts_E.float(), counts_E.new_full((1,), float(num_tokens))])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    every = torch.stack(parts)                                   # [world, E + 1]
    before = every[:dist.get_rank(group)].sum(0)
    total = every.sum(0)
    return total[:-1], total[-1], before[:-1]


def drop_over_capacity(ids_TK: torch.Tensor, num_experts: int, capacity, start_E: torch.Tensor) -> torch.Tensor:
    """Assignments past an expert's capacity marked -1 (dropped), keeping (token, slot) order: the
    assignment's place in its expert is ``start_E[e]`` (assignments of earlier ranks) plus its local
    rank. Equals ``ck.route(ids, E, capacity)``'s drops on the concatenated global batch."""
    flat = ids_TK.reshape(-1)
    onehot = F.one_hot(flat.clamp(min=0), num_experts) * (flat >= 0).unsqueeze(1)   # [T k, E]
    local_rank = (onehot.cumsum(0) * onehot).sum(-1) - 1
    keep = (flat >= 0) & (start_E.to(local_rank.dtype)[flat.clamp(min=0)] + local_rank < capacity)
    return torch.where(keep, flat, torch.full_like(flat, -1)).view_as(ids_TK)


def assignment_counts(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(token, slot) assignments per expert ``[E]`` fp32 (slots with id -1 are not counted)."""
    ids = ids_TK.reshape(-1)
    valid = ids >= 0
    return torch.zeros(num_experts, device=ids.device).scatter_add_(0, ids.clamp(min=0), valid.float())


# ---------------------------------------------------------------------------------------------
# part 1: the router


class Router(nn.Module):
    """Top-k softmax gating in fp32: ``weight [E, D]`` stays fp32 whatever the model dtype, because
    bf16 logits tie and flip top-k choices. An optional per-expert ``bias`` (aux-loss-free
    balancing, DeepSeek-V3) shifts only the *selection*; the gates come from the unbiased scores."""

    def __init__(self, config: CompassConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.bias_rate = config.router_bias_rate
        self.weight = nn.Parameter(torch.randn(config.num_experts, config.d_model) * config.init_std)
        self.register_buffer("bias", torch.zeros(config.num_experts))
        # assignments per expert since the last bias update (accumulates over gradient-accumulation steps)
        self.register_buffer("load", torch.zeros(config.num_experts), persistent=False)

    # Global-batch statistics: the process group of every rank holding part of the batch (set by the
    # distributed trainer, ``compass_model.train.parallel``); None: this batch's own statistics.
    stats_group = None

    def reduce_counts(self, counts_E: torch.Tensor, num_tokens: int):
        """With ``stats_group``: (counts [E] and token count summed over the group, the counts of the
        ranks before this one [E]) from one all-gather (``global_router_counts``); else None."""
        if self.stats_group is None:
            return None
        return global_router_counts(counts_E, num_tokens, self.stats_group)

    def forward(self, x_TD: torch.Tensor):
        """``x [T, D]`` -> logits [T, E], scores [T, E] (softmax), ids [T, k] int64, gates [T, k]
        (scores of the chosen experts renormalised to sum to 1), all fp32."""
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.softmax(dim=-1)
        choose_TE = scores_TE + self.bias if self.bias_rate > 0 else scores_TE
        ids_TK = choose_TE.topk(self.top_k, dim=-1).indices
        gates_TK = scores_TE.gather(-1, ids_TK)
        return logits_TE, scores_TE, ids_TK, gates_TK / gates_TK.sum(dim=-1, keepdim=True)

    def statistics(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, counts_E: torch.Tensor,
                   kept_E: torch.Tensor, num_tokens=None) -> dict:
        """This batch's sufficient statistics (counts, score sums, token count, z-loss sum), then
        ``balance``. Global-batch statistics (``reduce_counts``): ``counts_E`` / ``kept_E`` and
        ``num_tokens`` are the whole batch's, the score and z sums this rank's, so the aux and z
        values are this rank's shares (they sum over the ranks to the whole batch's values, and
        their gradients flow through the local scores only)."""
        z_sum = torch.logsumexp(logits_TE.float(), dim=-1).square().sum()
        T = scores_TE.shape[0] if num_tokens is None else num_tokens
        return self.balance(counts_E, scores_TE.float().sum(0), T, z_sum, kept_E)

    def balance(self, counts_E: torch.Tensor, score_sum_E: torch.Tensor, num_tokens, z_sum: torch.Tensor,
                kept_E: torch.Tensor) -> dict:
        """The router's statistics in one place: from assignment counts ``[E]``, router score sums
        ``[E]`` (differentiable), the token count (int or tensor) and the sum of squared logsumexps
        -> ``{"aux": load-balancing loss, "z": z-loss, "stats": router_stats}`` (fp32, unweighted),
        and the aux-loss-free bias load (``load``, training only). Global-batch balancing reduces
        counts, score sums, token count and z sum over the data-parallel ranks before this."""
        if self.training and self.bias_rate > 0:
            self.load += counts_E
        return {
            "aux": balancing_loss_from_sums(counts_E, score_sum_E, num_tokens),
            "z": _per_token(z_sum, num_tokens),
            "stats": router_stats(counts_E, kept_E),
        }

    @torch.no_grad()
    def update_bias(self) -> None:
        """``b_i += gamma * sign(mean_load - load_i)`` from the load seen since the last call."""
        if self.bias_rate > 0:
            self.bias += self.bias_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


# ---------------------------------------------------------------------------------------------
# the layer


class MoE(nn.Module):
    """Routed SwiGLU experts (plus an optional always-on shared expert) over ``x [..., D]``.

    Returns ``(out [..., D], router)`` where ``router`` holds this layer's ``aux`` and ``z`` losses
    (fp32 scalars, unweighted) and its ``stats`` (see ``router_stats``). With ``capacity_factor``
    each expert keeps at most ceil(cf * T * k / E) assignments in (token, slot) order while
    training; a dropped slot contributes nothing (the token keeps its residual and other slot).
    Inference never drops, so a token's output does not depend on its batch neighbours.

    Parts: ``router`` (a module), ``dispatcher`` (a ``TokenDispatcher``, or ``EPDispatcher`` for
    expert parallelism: then ``w13_EDF`` / ``w2_EFD`` hold the local experts only) and ``experts``
    (the grouped-experts stage over the local weights; ``Fp8MoE`` runs FP8 weights there).
    """

    def __init__(self, config: CompassConfig, dispatcher: TokenDispatcher | None = None):
        super().__init__()
        E, D, Fd = config.num_experts, config.d_model, config.expert_ffn_dim
        self.num_experts, self.top_k, self.capacity_factor = E, config.top_k, config.capacity_factor
        self.dispatcher = dispatcher if dispatcher is not None else TokenDispatcher(E)
        L = self.dispatcher.num_local
        self.router = Router(config)
        # gate | up fused: one grouped GEMM, not two. (CompassForCausalLM re-initialises all weights.)
        self.w13_EDF = nn.Parameter(torch.randn(L, D, 2 * Fd) * config.init_std)
        self.w2_EFD = nn.Parameter(torch.randn(L, Fd, D) * config.init_std)
        self.shared = SwiGLU(D, config.shared_expert_dim) if config.shared_expert_dim else None

    def capacity(self, num_tokens: int) -> int | None:
        """Rows per expert kept for ``num_tokens`` tokens while training with a capacity factor; ``None``: no limit."""
        if self.capacity_factor is None or not self.training:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def experts(self, x_MD: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The grouped-experts stage: SwiGLU experts over expert-contiguous rows (local experts)."""
        w13, w2 = self.w13_EDF, self.w2_EFD
        if torch.is_autocast_enabled(x_MD.device.type):   # a custom op: follow autocast like nn.Linear does
            dt = torch.get_autocast_dtype(x_MD.device.type)
            x_MD, w13, w2 = x_MD.to(dt), w13.to(dt), w2.to(dt)
        return grouped_mlp(x_MD, offsets, w13, w2)

    def forward(self, x: torch.Tensor):
        """Route, dispatch, run the experts, combine: ``x [..., D]`` -> (output like ``x``, router output)."""
        x_TD = x.reshape(-1, x.shape[-1])
        T = x_TD.shape[0]
        with ranges.nvtx_range("router"):
            logits_TE, scores_TE, ids_TK, gates_TK = self.router(x_TD)
            counts_E = assignment_counts(ids_TK, self.num_experts)
            capacity, n_tokens, kept_E = self.capacity(T), None, None
            reduced = self.router.reduce_counts(counts_E, T)
            if reduced is not None:          # global-batch statistics: the whole batch's counts and T
                counts_E, n_tokens, start_E = reduced
                kept_E = counts_E
                if capacity is not None:      # the whole batch's capacity (a host read, capacity only)
                    capacity = self.capacity(int(n_tokens))
                    ids_TK = drop_over_capacity(ids_TK, self.num_experts, capacity, start_E)
                    kept_E, capacity = counts_E.clamp(max=capacity), None
        d = self.dispatcher.dispatch(x_TD, ids_TK, capacity)
        y_MD = self.experts(d.rows, d.offsets)
        out_TD = self.dispatcher.combine(y_MD, d, gates_TK)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        router = self.router.statistics(logits_TE, scores_TE, counts_E,
                                        d.plan.tokens_per_expert if kept_E is None else kept_E, n_tokens)
        return out_TD.reshape(x.shape), router
