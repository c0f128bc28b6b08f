"""The MoE feed-forward: fp32 top-k router, router losses and stats, experts on compass_kernels.

Data path (one NVTX range per stage, for nsys):
  router      logits = x W_r^T in fp32, softmax, top-k (optionally biased), gates renormalised over k
  permute     ck.route + ck.permute: tokens to expert-contiguous rows
  expert_fc1  ck.grouped_gemm with the fused gate|up weights [E, D, 2F]
  activation  SwiGLU: silu(gate) * up
  expert_fc2  ck.grouped_gemm with the down weights [E, F, D]
  unpermute   ck.unpermute(probs): gather + gate-weighted combine in one pass
Nothing here reads a tensor on the host, so a block compiles with torch.compile(fullgraph=True).
"""

from __future__ import annotations

import contextlib
import math

import nvtx
import torch
import torch.nn.functional as F
from torch import nn

import compass_kernels as ck
from compass_model.config import CompassConfig

# An expert is "dead" below this fraction of the uniform load 1/E.
DEAD_EXPERT_FRACTION = 0.1


def nvtx_range(name: str):
    """An NVTX range (a no-op without a GPU profiler). Dynamo cannot trace the nvtx C calls, so
    compiled graphs get none; profile eager runs."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return nvtx.annotate(name, domain="compass")


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN ``w2(silu(w1 x) * w3 x)``: the dense blocks' FFN and the shared expert."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def load_balancing_loss(scores_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Switch / Mixtral top-k form ``E * sum_i f_i P_i``: f_i the fraction of (token, slot)
    assignments to expert i (no gradient), P_i the mean router probability of expert i. 1 when uniform."""
    T, E = scores_TE.shape
    f_E = counts_E.detach().float() / counts_E.sum().clamp(min=1)
    P_E = scores_TE.float().sum(0) / max(T, 1)
    return E * (f_E * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t logsumexp(logits_t)^2`` (0 for T = 0), fp32."""
    T = logits_TE.shape[0]
    return torch.logsumexp(logits_TE.float(), dim=-1).square().sum() / max(T, 1)


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


class Router(nn.Module):
    """Top-k softmax gating in fp32: ``weight [E, D]`` stays fp32 whatever the model dtype, because
    bf16 logits tie and flip top-k choices. An optional per-expert ``bias`` (aux-loss-free
    balancing, DeepSeek-V3) shifts only the *selection*; the gates come from the unbiased scores."""

    def __init__(self, config: CompassConfig):
        super().__init__()
        self.top_k = config.top_k
        self.bias_rate = config.router_bias_rate
        self.weight = nn.Parameter(torch.randn(config.num_experts, config.d_model) * config.init_std)
        self.register_buffer("bias", torch.zeros(config.num_experts))
        # assignments per expert since the last bias update (accumulates over gradient-accumulation steps)
        self.register_buffer("load", torch.zeros(config.num_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor):
        """``x [T, D]`` -> logits [T, E], scores [T, E] (softmax), ids [T, k] int64, gates [T, k]
        (scores of the chosen experts renormalised to sum to 1), all fp32."""
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.softmax(dim=-1)
        choose_TE = scores_TE + self.bias if self.bias_rate > 0 else scores_TE
        ids_TK = choose_TE.topk(self.top_k, dim=-1).indices
        gates_TK = scores_TE.gather(-1, ids_TK)
        return logits_TE, scores_TE, ids_TK, gates_TK / gates_TK.sum(dim=-1, keepdim=True)

    @torch.no_grad()
    def update_bias(self) -> None:
        """``b_i += gamma * sign(mean_load - load_i)`` from the load seen since the last call."""
        if self.bias_rate > 0:
            self.bias += self.bias_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


class MoE(nn.Module):
    """Routed SwiGLU experts (plus an optional always-on shared expert) over ``x [..., D]``.

    Returns ``(out [..., D], router)`` where ``router`` holds this layer's ``aux`` and ``z`` losses
    (fp32 scalars, unweighted) and its ``stats`` (see ``router_stats``). With ``capacity_factor``
    each expert keeps at most ceil(cf * T * k / E) assignments in (token, slot) order while
    training; a dropped slot contributes nothing (the token keeps its residual and other slot).
    Inference never drops, so a token's output does not depend on its batch neighbours.
    """

    def __init__(self, config: CompassConfig):
        super().__init__()
        E, D, Fd = config.num_experts, config.d_model, config.expert_ffn_dim
        self.num_experts, self.top_k, self.capacity_factor = E, config.top_k, config.capacity_factor
        self.router = Router(config)
        # gate | up fused: one grouped GEMM, not two. (CompassForCausalLM re-initialises all weights.)
        self.w13_EDF = nn.Parameter(torch.randn(E, D, 2 * Fd) * config.init_std)
        self.w2_EFD = nn.Parameter(torch.randn(E, Fd, D) * config.init_std)
        self.shared = SwiGLU(D, config.shared_expert_dim) if config.shared_expert_dim else None

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None or not self.training:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor):
        E = self.num_experts
        x_TD = x.reshape(-1, x.shape[-1])
        T = x_TD.shape[0]
        with nvtx_range("router"):
            logits_TE, scores_TE, ids_TK, gates_TK = self.router(x_TD)
            counts_E = torch.zeros(E, device=x.device).scatter_add_(
                0, ids_TK.reshape(-1), torch.ones(ids_TK.numel(), device=x.device))
        with nvtx_range("permute"):
            plan = ck.route(ids_TK, E, capacity=self.capacity(T))
            xp_RD = ck.permute(x_TD, plan)
        xe_MD, offsets, state = self._dispatch(xp_RD, plan)
        w13, w2 = self.w13_EDF, self.w2_EFD
        if torch.is_autocast_enabled(x.device.type):   # a custom op: follow autocast like nn.Linear does
            dt = torch.get_autocast_dtype(x.device.type)
            xe_MD, w13, w2 = xe_MD.to(dt), w13.to(dt), w2.to(dt)
        with nvtx_range("expert_fc1"):
            h_MF2 = ck.grouped_gemm(xe_MD, w13, offsets)
        with nvtx_range("activation"):
            gate_MF, up_MF = h_MF2.chunk(2, dim=-1)
            a_MF = F.silu(gate_MF) * up_MF
        with nvtx_range("expert_fc2"):
            y_MD = ck.grouped_gemm(a_MF, w2, offsets)
        y_RD = self._combine(y_MD, state)
        with nvtx_range("unpermute"):
            out_TD = ck.unpermute(y_RD, plan, probs=gates_TK)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        if self.training and self.router.bias_rate > 0:
            self.router.load += counts_E
        router = {
            "aux": load_balancing_loss(scores_TE, counts_E),
            "z": router_z_loss(logits_TE),
            "stats": router_stats(counts_E, plan.tokens_per_expert),
        }
        return out_TD.reshape(x.shape), router

    def _dispatch(self, xp_RD: torch.Tensor, plan):
        """Where the permuted rows meet their experts: here, in place (rows, plan.expert_offsets, no
        state). Expert parallelism (compass_model.distributed.EPMoE) overrides this pair."""
        return xp_RD, plan.expert_offsets, None

    def _combine(self, y_MD: torch.Tensor, state) -> torch.Tensor:
        return y_MD
