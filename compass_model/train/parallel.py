"""Data x expert parallel training for ``compass train --dp N --ep M`` (launched by ``torchrun``).

World = N x M ranks on a 2-D ``DeviceMesh`` ("dp", "ep"); rank r = d M + e. Every rank takes its own
rows of each micro-batch (the stage's ``rows`` must be divisible by the world), so the global batch
is the stage's batch whatever the layout. The token normaliser is the whole micro-batch's on every
rank (batches are a pure function of the step), so the ranks' losses *sum* to the single-process
loss, and every gradient reduction is a SUM:

  experts (``EPMoE``)    split over "ep" (rank e owns E / M of them), complete within an EP group
                         (the all-to-all brought every token routed to them); --dp N > 1: FSDP2
                         over "dp" on dim 1 (reduce-scatter SUM over the N ranks sharing the slice)
  everything else        --dp 1: replicated, all-reduced SUM over the world (one flat buffer);
                         --dp N > 1: FSDP2 ``fully_shard`` over the world (routers, shared experts,
                         blocks, then the root; reduce-scatter with divide factor 1 = SUM); bf16
                         stages use the mixed-precision policy (bf16 compute, fp32 reduction; the
                         router stays fp32)
  clipping               the global norm: sharded and expert parts summed over the ranks once each
  router statistics      "global" (default): every MoE layer all-gathers its expert counts and
                         token count over the world (one (E + 1)-float vector per rank and layer):
                         the aux loss, capacity and bias update see the micro-batch as one process
                         would; "local": each rank's own rows (the Megatron default), the bias
                         update's load still summed over the world so the ranks keep one bias

Checkpoints: the model and the optimizer state as ``torch.distributed.checkpoint`` shards written
by every rank (``dcp_checkpoint.py``); they resume at any layout, and one process reads them as the
dense model (``from_pretrained`` consolidates).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from compass_model.data import PackedBatch
from compass_model.distributed import check_ep_size, is_expert_param, shard_moe_layers

ROUTER_STATS = ("global", "local")


@dataclass(frozen=True)
class EPContext:
    """This rank's place in the (dp, ep) layout; ``mesh`` the 2-D DeviceMesh (None in unit tests
    that build groups themselves)."""
    rank: int
    world: int
    dp: int = 1
    ep: int = 0                        # 0: the whole world (EP = DP, no --dp)
    router_stats: str = "global"
    mesh: object = None

    def __post_init__(self):
        if self.ep == 0:
            object.__setattr__(self, "ep", self.world // self.dp)

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes metrics, checkpoints' headers and reports."""
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        """Data parallelism over more than one replica (dense weights FSDP2-sharded)."""
        return self.dp > 1

    def group(self, dim: str):
        """The process group along mesh dimension "dp" or "ep" (None: the world)."""
        if self.mesh is None:
            return None
        return self.mesh[dim].get_group()


def check_layout(dp: int, ep: int, world: int, num_experts: int | None = None, world_is: str = "") -> None:
    """Clear errors for a layout torchrun cannot run: N x M must be the world, E divisible by M."""
    for name, v in (("--dp", dp), ("--ep", ep)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if dp * ep != world:
        raise ValueError(f"--dp {dp} x --ep {ep} = {dp * ep} ranks, but "
                         + (world_is or f"torchrun started {world} processes; start dp x ep of them "
                                        f"(torchrun --nproc-per-node {dp * ep} ...)"))
    if num_experts is not None:
        check_ep_size(num_experts, ep)


def init_ep(ep: int, timeout_s: float = 600, dp: int = 1, router_stats: str = "global") -> EPContext | None:
    """Join the process group torchrun set up (gloo on CPU, NCCL with CUDA) and build the (dp, ep)
    mesh; None for a single process."""
    if router_stats not in ROUTER_STATS:
        raise ValueError(f"--router-stats must be one of {ROUTER_STATS}, got {router_stats!r}")
    if dp * ep == 1 and "WORLD_SIZE" not in os.environ:
        return None
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(f"--dp {dp} --ep {ep} needs torchrun: torchrun --nproc-per-node {dp * ep} "
                           "-m compass_model.cli train ...")
    world = int(os.environ["WORLD_SIZE"])
    check_layout(dp, ep, world)
    if world == 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if backend_device() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(backend_device(), (dp, ep), mesh_dim_names=("dp", "ep"))
    return EPContext(dist.get_rank(), world, dp, ep, router_stats, mesh)


def backend_device() -> str:
    """Where collectives run: ``cuda`` under NCCL, else ``cpu`` (gloo)."""
    return "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"


def shard(model, ctx: EPContext | None, stage=None):
    """The model laid out for ``ctx``: MoE layers split over "ep", their router statistics global
    over the world (``router_stats="global"``), dense parameters FSDP-sharded when dp > 1."""
    if ctx is None:
        return model
    check_ep_size(model.config.num_experts, ctx.ep)
    if ctx.ep > 1:
        model = shard_moe_layers(model, model.config, ctx.group("ep"))
    if ctx.router_stats == "global":
        for moe in model.moe_layers():
            moe.router.stats_group = dist.group.WORLD
    if ctx.fsdp:
        fully_shard_dense(model, ctx, bf16=stage is not None and stage.precision == "bf16")
    return model


def fully_shard_dense(model, ctx: EPContext, bf16: bool = False):
    """FSDP2 units, innermost first: each router (always fp32, see ``moe.Router``) and shared expert
    over the world; each ``EPMoE``'s expert shards over "dp" on dim 1 (E / ep can be smaller than
    dp); each block and MTP module, then the root, over the world (dim 0). Gradients are summed
    (divide factor 1), as the ranks' losses sum to the objective. bf16: params gathered in bf16,
    gradients reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    from compass_model.distributed import EPMoE

    world = init_device_mesh(backend_device(), (ctx.world,), mesh_dim_names=("fsdp",))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    units = []
    for moe in model.moe_layers():
        units.append(fully_shard(moe.router, mesh=world, mp_policy=MixedPrecisionPolicy()))
        if moe.shared is not None:
            units.append(fully_shard(moe.shared, mesh=world, mp_policy=policy))
        if isinstance(moe, EPMoE):
            units.append(fully_shard(moe, mesh=ctx.mesh["dp"], mp_policy=policy,
                                     shard_placement_fn=lambda p: Shard(1)))
    for unit in [*model.layers, *model.mtp, model]:
        units.append(fully_shard(unit, mesh=world, mp_policy=policy))
    for unit in units:          # SUM: divide by 1, and plain SUM collectives (gloo has no PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


def check_rows(stage, ctx: EPContext | None) -> None:
    """A stage's micro-batch rows (and its retrieval rows) must split evenly over the ranks."""
    if ctx is not None and (stage.rows % ctx.world or getattr(stage, "retrieval_rows", 0) % ctx.world):
        raise ValueError(f"stage {stage.name}: rows ({stage.rows}) and retrieval_rows must be divisible by the world size "
                         f"{ctx.world} (--dp {ctx.dp} x --ep {ctx.ep}: each micro-batch's rows are split "
                         "over the ranks)")


def rank_rows(b: PackedBatch, ctx: EPContext | None) -> PackedBatch:
    """This rank's contiguous slice of a micro-batch's rows."""
    if ctx is None:
        return b
    n = b.input_ids.shape[0] // ctx.world
    sl = slice(ctx.rank * n, (ctx.rank + 1) * n)
    return PackedBatch(*(t[sl] for t in (b.input_ids, b.labels, b.position_ids, b.doc_ids, b.prompt_mask,
                                         b.response_mask, b.prompt_weight)))


def _all_reduce_flat(grads: list, group=None) -> None:
    """All-reduce SUM of ``grads`` in place through one flat buffer."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    o = 0
    for g in grads:
        g.copy_(flat[o:o + g.numel()].view_as(g))
        o += g.numel()


@torch.no_grad()
def reduce_gradients(model, ctx: EPContext | None) -> None:
    """dp = 1: replicated gradients all-reduced SUM over the world (expert shards' are complete).
    dp > 1: nothing to do, FSDP2 reduce-scattered every gradient in the backward."""
    if ctx is not None and not ctx.fsdp:
        _all_reduce_flat([p.grad for n, p in model.named_parameters()
                          if p.grad is not None and not is_expert_param(n, model)])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm(model, max_norm: float, ctx: EPContext | None) -> float:
    """``clip_grad_norm_`` over the whole (sharded) model: the same norm and scale on every rank.
    One all-reduce over the world of this rank's sum of squares of its shards (FSDP2 and expert
    shards count once each); replicated parameters (dp = 1) are added locally."""
    params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if ctx is None:
        return float(torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm))
    zero = torch.zeros((), dtype=torch.float64)
    sq = lambda ps: sum((_local(p.grad).double().square().sum() for p in ps), zero)  # noqa: E731
    sharded = [p for n, p in params if ctx.fsdp or is_expert_param(n, model)]
    replicated = [p for n, p in params if not (ctx.fsdp or is_expert_param(n, model))]
    total = sq(sharded)
    dist.all_reduce(total)
    norm = float((total + sq(replicated)).sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for _, p in params:
            p.grad.mul_(coef)
    return norm


def all_reduce_totals(totals: dict, ctx: EPContext | None) -> dict:
    """Sum the ranks' loss terms (each is its share of the global objective)."""
    if ctx is None:
        return totals
    keys = ["loss", "lm", "mtp", "aux", "z"]
    t = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {**totals, **dict(zip(keys, t.tolist()))}


def reduce_metrics(m: dict, ctx: EPContext | None) -> dict:
    """The ranks' per-micro-batch metrics combined: shares summed, ``*_min`` / ``*_max`` by min / max."""
    if ctx is None:
        return m
    out = dict(m)
    for op, keys in ((dist.ReduceOp.SUM, [k for k in m if not k.endswith(("_min", "_max"))]),
                     (dist.ReduceOp.MIN, [k for k in m if k.endswith("_min")]),
                     (dist.ReduceOp.MAX, [k for k in m if k.endswith("_max")])):
        if keys:
            t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64)
            dist.all_reduce(t, op=op)
            out.update(zip(keys, t.tolist()))
    return out


def router_share(ctx: EPContext | None) -> int:
    """How many forwards of one micro-batch split the router's per-forward mean terms (aux, z). With
    global router statistics each rank's terms are already its share of the micro-batch's value; with
    local ones they are averaged over the ranks. (The LM and MTP losses are sums over the step's
    global token count, so they need no share.)"""
    if ctx is None or ctx.router_stats == "global":
        return 1
    return ctx.world


@torch.no_grad()
def sync_router_load(model, ctx: EPContext | None) -> None:
    """Local router statistics: sum the bias update's load over the world so every rank applies the
    same bias update (global statistics have summed it already)."""
    if ctx is None or ctx.router_stats == "global":
        return
    loads = [m.router.load for m in model.moe_layers() if m.router.bias_rate > 0]
    _all_reduce_flat(loads)


def finish_ep(ctx: EPContext | None) -> None:
    """Every rank waits here until rank 0 has aligned, evaluated and written its files."""
    if ctx is not None:
        dist.barrier()


def exit_ep(ctx: EPContext | None) -> None:
    """Leave an EP run without tearing the process group down: once one rank has gone, a peer's gloo
    I/O thread can see the closed connection and abort the process (seen in CI as SIGABRT after all
    work was done). Everything is written and flushed by now; ``os._exit`` skips the destructors."""
    if ctx is not None:
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def barrier(ctx: EPContext | None) -> None:
    """Wait for every rank (nothing without ``ctx``)."""
    if ctx is not None:
        dist.barrier()
