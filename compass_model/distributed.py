"""Expert parallelism over torch.distributed: an all-to-all token dispatcher and an EP MoE layer.

The E experts are split contiguously over the EP group: rank r owns experts [r L, (r + 1) L),
L = E / ep. One MoE layer, per rank (T local tokens, k slots, D hidden):

  router        replicated weights, local tokens: ids [T, k], gates [T, k]
  permute       ck.route + ck.permute over all E experts: rows expert-contiguous, hence grouped by
                destination rank (expert e lives on rank e // L)
  counts a2a    tokens_per_expert [E] -> recv_counts [ep, L] (what every source sends to my
                experts): one all_to_all_single of E int64
  host sync     the split sizes of the token all-to-all as Python ints (see ``_split_sizes``)
  tokens a2a    all_to_all_single with uneven splits -> [N_recv, D], grouped (source, local expert)
  sort_chunks   -> grouped (local expert, source): expert-contiguous for the grouped GEMM
  experts       ck.grouped_gemm (w13) -> SwiGLU -> ck.grouped_gemm (w2) with the local shards
  reverse       sort_chunks back to (source, expert), all_to_all_single back, ck.unpermute(gates)

Autograd runs through the round trip (the all-to-alls are differentiable, sort_chunks' backward is
the inverse chunk order), so every rank must run the backward of every EP layer it ran forward:
the backward issues the same collectives in reverse. A rank with no tokens still takes part in
every collective with zero-sized buffers, so graphs never diverge and nothing hangs.

Gradients: an expert shard's gradient is complete on its rank (the all-to-all brought every token
routed to it, from every rank), summed over the ranks' losses. The router and shared-expert weights
(and the rest of the model) are replicated and see only local tokens: reducing their gradients over
the data-parallel ranks is the caller's business. Two ways are provided for EP = DP (one group):
``average_gradients`` (all-reduce the replicated part, scale the experts by 1 / dp) and
``fully_shard_replicated`` (FSDP2 over the replicated part, expert shards ignored; then
``scale_expert_gradients``). EP inside a larger DP (a dp x ep mesh, each expert shard FSDP-sharded
over the ranks holding it) is the trainer's layout: ``compass_model.train.parallel``.

torch.compile: the split sizes are read on the host, so an EP layer cannot compile with
fullgraph=True (untested; the local route / permute / grouped GEMM / sort_chunks ops can).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import compass_kernels as ck
from compass_model.config import CompassConfig
from compass_kernels import ranges
from compass_kernels.moe_blocks import Dispatched, TokenDispatcher
from compass_model.moe import MoE

__all__ = ["EPDispatcher", "EPMoE", "all_to_all", "average_gradients", "check_ep_size", "expert_params",
           "fully_shard_replicated", "is_expert_param", "scale_expert_gradients", "shard_moe_layers"]


def check_ep_size(num_experts: int, ep_size: int) -> int:
    """Experts per rank; a clear error when the experts do not split evenly over the EP group."""
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    if num_experts % ep_size != 0:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the expert-parallel size "
                         f"({ep_size}): each rank owns num_experts / ep_size experts")
    return num_experts // ep_size


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits, differentiable: the backward is the same exchange
    with the splits swapped. (torch.distributed.nn.functional's version is deprecated in favour
    of the private _functional_collectives; this is the 15 lines we need.)"""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.splits, ctx.group = (input_splits, output_splits), group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits,
                               input_split_sizes=input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back_out, back_in = ctx.splits
        return _AllToAll.apply(grad.contiguous(), back_out, back_in, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None) -> torch.Tensor:
    """Rows ``x [sum(input_splits), ...]`` scattered to the group, ``input_splits[r]`` rows to rank r;
    returns the ``[sum(output_splits), ...]`` rows received, ordered by source rank. Differentiable."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


class EPDispatcher(TokenDispatcher):
    """The token dispatcher of one EP group: ``dispatch`` permutes the local tokens (as the local
    ``TokenDispatcher`` does), sends the rows to the ranks that own their experts and returns them
    expert-contiguous over this rank's experts; ``combine`` is its exact reverse, then unpermutes.

    ``exchange(xp [N, D], tokens_per_expert [E])`` is the all-to-all half alone: it expects rows
    grouped by global expert (the output of ``ck.permute`` without align), rows past
    sum(tokens_per_expert) are ignored; ``exchange_back`` reverses it.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local = check_ep_size(num_experts, self.ep)
        self.expert_start = self.rank * self.num_local

    def _split_sizes(self, tokens_per_expert: torch.Tensor):
        """Exchange per-expert counts (one all-to-all), then read the split sizes on the host.

        all_to_all_single with uneven splits takes its split sizes as Python ints (NCCL and gloo
        both size the transfers on the host), so this ``tolist`` is the one host sync per layer that
        an uneven all-to-all cannot avoid; everything else stays on the device.
        """
        ep, L = self.ep, self.num_local
        recv_counts = torch.empty_like(tokens_per_expert)                # [ep * L]: (source, local expert)
        dist.all_to_all_single(recv_counts, tokens_per_expert.contiguous(), group=self.group)
        send = tokens_per_expert.view(ep, L).sum(1)                     # [ep] rows to each rank
        recv = recv_counts.view(ep, L).sum(1)                           # [ep] rows from each rank
        sizes = torch.cat([send, recv]).tolist()
        return recv_counts, sizes[:ep], sizes[ep:]

    def exchange(self, xp_ND: torch.Tensor, tokens_per_expert: torch.Tensor):
        """-> (rows [M, D] expert-contiguous over my L experts, local offsets [L + 1], state)."""
        ep, L = self.ep, self.num_local
        recv_counts, send_splits, recv_splits = self._split_sizes(tokens_per_expert)
        x_send = xp_ND[:sum(send_splits)]
        x_recv = all_to_all(x_send, recv_splits, send_splits, self.group)          # [n_recv, D]
        dev = recv_counts.device
        # (source s, expert l) chunk s * L + l -> order (l, s)
        to_expert = torch.arange(ep * L, device=dev).view(ep, L).t().reshape(-1)
        x_sorted = ck.sort_chunks(x_recv, recv_counts, to_expert)
        per_expert = recv_counts.view(ep, L).sum(0)                     # [L]
        offsets = torch.cat([per_expert.new_zeros(1), torch.cumsum(per_expert, 0)])
        state = (recv_counts, send_splits, recv_splits, xp_ND.shape[0])
        return x_sorted, offsets, state

    def exchange_back(self, y_MD: torch.Tensor, state) -> torch.Tensor:
        """Expert outputs [M, D] (exchange's order) -> [N, D] in the sender's permuted order."""
        recv_counts, send_splits, recv_splits, num_rows = state
        ep, L = self.ep, self.num_local
        dev = recv_counts.device
        sizes_el = recv_counts.view(ep, L).t().reshape(-1)              # chunk sizes in (l, s) order
        to_source = torch.arange(ep * L, device=dev).view(L, ep).t().reshape(-1)
        y_recv = ck.sort_chunks(y_MD, sizes_el, to_source)
        n_send = sum(send_splits)
        y_back = all_to_all(y_recv, send_splits, recv_splits, self.group)          # [n_send, D]
        if num_rows > n_send:  # capacity drops: the plan's static row count exceeds the kept rows
            y_back = torch.cat([y_back, y_back.new_zeros(num_rows - n_send, y_back.shape[1])])
        return y_back

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, capacity: int | None = None) -> Dispatched:
        """Route and permute the local tokens, then send each row to the rank that owns its expert."""
        plan, xp_ND = self.permute(x_TD, ids_TK, capacity)
        with ranges.nvtx_range("dispatch"):
            rows, offsets, state = self.exchange(xp_ND, plan.tokens_per_expert)
        return Dispatched(rows, offsets, plan, state)

    def combine(self, y_MD: torch.Tensor, d: Dispatched, probs_TK: torch.Tensor | None) -> torch.Tensor:
        """Send the expert outputs back to the tokens' ranks and combine them with the gate weights."""
        with ranges.nvtx_range("combine"):
            y_ND = self.exchange_back(y_MD, d.state)
        return self.unpermute(y_ND, d.plan, probs_TK)


class EPMoE(MoE):
    """``MoE`` with its routed experts sharded over an EP group (same forward contract): the same
    composed layer with an ``EPDispatcher`` as its token dispatcher.

    Holds the replicated router (and shared expert) and this rank's L = E / ep experts:
    ``w13_EDF [L, D, 2F]``, ``w2_EFD [L, F, D]``. ``from_dense`` copies a single-process ``MoE``;
    ``shard_moe_layers`` swaps every ``MoE`` of a model for its shard. A subclass of ``MoE``, so the
    model's blocks treat it as one. Capacity (training with ``capacity_factor``) applies to each
    rank's local tokens, as it does for a data-parallel replica of ``MoE``.

    Losses and gradients when the EP group is also the data-parallel group (each rank its own
    batch, the global loss the mean of the ranks' losses): the router's aux loss is computed on
    local tokens (per-rank load, as Megatron does per micro-batch); an expert's gradient arrives
    complete but *summed* over the ranks' losses, so divide it by the DP size where the replicated
    parameters' gradients are averaged (``average_gradients`` does both). With
    ``router_bias_rate > 0`` all-reduce ``router.load`` before ``update_bias`` so the ranks keep
    one bias. Setting ``router.stats_group`` (see ``Router``) makes the router statistics global over that
    group instead: the aux and z losses become this rank's share of the whole batch's values, and
    the capacity and the bias load are the whole batch's.
    """

    def __init__(self, config: CompassConfig, group: dist.ProcessGroup | None = None):
        super().__init__(config, EPDispatcher(config.num_experts, group))

    @property
    def expert_start(self) -> int:
        """The global index of this rank's first expert."""
        return self.dispatcher.expert_start

    @classmethod
    def from_dense(cls, moe: MoE, config: CompassConfig, group: dist.ProcessGroup | None = None) -> EPMoE:
        """This rank's shard of a single-process ``MoE`` (router and shared expert copied whole)."""
        ep_moe = cls(config, group).to(device=moe.w13_EDF.device, dtype=moe.w13_EDF.dtype)
        ep_moe.router.load_state_dict(moe.router.state_dict())
        lo, hi = ep_moe.expert_start, ep_moe.expert_start + ep_moe.dispatcher.num_local
        with torch.no_grad():
            ep_moe.w13_EDF.copy_(moe.w13_EDF[lo:hi])
            ep_moe.w2_EFD.copy_(moe.w2_EFD[lo:hi])
            if moe.shared is not None:
                ep_moe.shared.load_state_dict(moe.shared.state_dict())
        return ep_moe


def shard_moe_layers(model: nn.Module, config: CompassConfig, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every ``MoE`` submodule of ``model`` (same weights on every rank) by its ``EPMoE``
    shard, in place; returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MoE) and not isinstance(child, EPMoE):
                setattr(module, child_name, EPMoE.from_dense(child, config, group))
    return model


def is_expert_param(name: str, model: nn.Module) -> bool:
    """Whether parameter ``name`` of ``model`` is an expert shard of an ``EPMoE`` (not replicated)."""
    owner, _, leaf = name.rpartition(".")
    return leaf in ("w13_EDF", "w2_EFD") and isinstance(model.get_submodule(owner), EPMoE)


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The expert-sharded parameters of ``model`` (those ``is_expert_param`` names)."""
    return [p for name, p in model.named_parameters() if is_expert_param(name, model)]


@torch.no_grad()
def scale_expert_gradients(model: nn.Module, dp_size: int) -> None:
    """Expert shards' gradients arrive complete but summed over the ranks' losses: divide by the
    data-parallel size when the global loss is the mean of the ranks' losses."""
    for p in expert_params(model):
        if p.grad is not None:
            p.grad.div_(dp_size)


@torch.no_grad()
def average_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Plain data parallelism over ``group`` (the EP group itself) for a model with ``EPMoE``
    layers, where the global loss is the mean of the ranks' losses: replicated gradients are
    all-reduced and averaged; expert shards' gradients are already complete sums, so only scaled.
    Every rank must call it with the same parameters holding gradients (same order, no skips).
    """
    world = dist.get_world_size(group)
    for name, p in model.named_parameters():
        if p.grad is not None and not is_expert_param(name, model):
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(world)
    scale_expert_gradients(model, world)


def fully_shard_replicated(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """FSDP2 (``fully_shard``) over the replicated parameters of a model with ``EPMoE`` layers,
    data-parallel over ``group`` (here the EP group itself: EP = DP): each block of
    ``model.layers`` and ``model.mtp`` is one FSDP unit, then the root. Expert shards are
    ``ignored_params`` (already split over the group, not replicated), so after ``backward`` call
    ``scale_expert_gradients(model, dp_size)``; FSDP averages the rest. Build the optimizer after this.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device.type
    mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD, device)
    ignored = set(expert_params(model))
    for block in [*getattr(model, "layers", ()), *getattr(model, "mtp", ())]:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model
