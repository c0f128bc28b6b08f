"""Expert-parallel training for ``compass train --ep N`` (launched by ``torchrun``).

The EP group is the whole world and also the data-parallel group. Every rank holds the replicated
parameters (attention, router, shared expert, embeddings) and its ``E / N`` experts
(``distributed.shard_moe_layers``). The global batch is the stage's batch whatever N is: each
micro-batch's rows are split over the ranks (``rows`` must be divisible by N), the token
normaliser ``N_tokens`` is computed from the whole micro-batch (every rank builds it: batches are a
pure function of the step), so the ranks' losses *sum* to the single-process loss and

  replicated gradients   all-reduce SUM (each rank saw its rows only)
  expert gradients       complete on the owning rank (the all-to-all brought every routed token)
  clipping               one global norm: replicated part once + every rank's expert part

Same math as ``--ep 1`` (the load-balancing loss, computed per forward on the rank's rows, is the
exception: per-rank balance, as Megatron computes it per micro-batch). Checkpoints hold the dense
model (experts gathered: a checkpoint loads at any EP size or none) and every rank's optimizer
state (``optimizer-rank{r}.pt``: resume needs the same N).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from compass_model.data import PackedBatch
from compass_model.distributed import is_expert_param, shard_moe_layers


@dataclass(frozen=True)
class EPContext:
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_ep(ep: int, timeout_s: float = 600) -> EPContext | None:
    """Join the process group torchrun set up (gloo on CPU, NCCL with CUDA); None for ``ep == 1``."""
    if ep == 1:
        return None
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(f"--ep {ep} needs torchrun: torchrun --nproc-per-node {ep} -m compass_model.cli train ...")
    world = int(os.environ["WORLD_SIZE"])
    if world != ep:
        raise ValueError(f"--ep {ep} but torchrun started {world} processes; they must match")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if backend_device() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return EPContext(dist.get_rank(), dist.get_world_size())


def backend_device() -> str:
    return "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"


def shard(model, ctx: EPContext | None):
    if ctx is None:
        return model
    return shard_moe_layers(model, model.config)


def check_rows(stage, ctx: EPContext | None) -> None:
    if ctx is not None and stage.rows % ctx.world:
        raise ValueError(f"stage {stage.name}: rows ({stage.rows}) must be divisible by --ep {ctx.world} "
                         "(each micro-batch's rows are split over the ranks)")


def rank_rows(b: PackedBatch, ctx: EPContext | None) -> PackedBatch:
    """This rank's contiguous slice of a micro-batch's rows."""
    if ctx is None:
        return b
    n = b.input_ids.shape[0] // ctx.world
    sl = slice(ctx.rank * n, (ctx.rank + 1) * n)
    return PackedBatch(*(t[sl] for t in (b.input_ids, b.labels, b.position_ids, b.doc_ids, b.prompt_mask,
                                         b.response_mask, b.prompt_weight)))


@torch.no_grad()
def reduce_gradients(model, ctx: EPContext | None) -> None:
    """All-reduce SUM of the replicated parameters' gradients (one flat buffer)."""
    if ctx is None:
        return
    grads = [p.grad for n, p in model.named_parameters() if p.grad is not None and not is_expert_param(n, model)]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    o = 0
    for g in grads:
        g.copy_(flat[o:o + g.numel()].view_as(g))
        o += g.numel()


@torch.no_grad()
def clip_grad_norm(model, max_norm: float, ctx: EPContext | None) -> float:
    """``clip_grad_norm_`` over the whole (sharded) model: the same norm and scale on every rank."""
    params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if ctx is None:
        return float(torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm))
    rep = sum(p.grad.double().square().sum() for n, p in params if not is_expert_param(n, model))
    exp = sum((p.grad.double().square().sum() for n, p in params if is_expert_param(n, model)),
              torch.zeros((), dtype=torch.float64))
    dist.all_reduce(exp)
    norm = float((rep + exp).sqrt())
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


@torch.no_grad()
def dense_model(model_ep, ctx: EPContext | None):
    """The single-process model with every expert gathered (collective: all ranks call it)."""
    if ctx is None:
        return model_ep
    from compass_model.distributed import EPMoE
    from compass_model.model import CompassForCausalLM

    dense = CompassForCausalLM(model_ep.config)
    state = dict(model_ep.state_dict())
    for name, mod in model_ep.named_modules():
        if isinstance(mod, EPMoE):
            for leaf in ("w13_EDF", "w2_EFD"):
                shard_ = getattr(mod, leaf).detach().contiguous()
                parts = [torch.empty_like(shard_) for _ in range(ctx.world)]
                dist.all_gather(parts, shard_)
                state[f"{name}.{leaf}"] = torch.cat(parts)
    dense.load_state_dict(state, strict=True)
    return dense


def save_ep_checkpoint(stage_dir, model_ep, opt, step: int, done: bool, ctx: EPContext):
    """Collective: the dense model (experts gathered) and every rank's optimizer state, atomically."""
    from pathlib import Path

    from compass_model.train.state import save_checkpoint

    stage_dir = Path(stage_dir)
    dense = dense_model(model_ep, ctx)
    part = stage_dir / f".opt-{step:06d}-rank{ctx.rank}.pt"
    if not ctx.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        torch.save(opt.state_dict(), part)
    dist.barrier()
    if ctx.is_main:
        files = {f"optimizer-rank{r}.pt": stage_dir / f".opt-{step:06d}-rank{r}.pt" for r in range(1, ctx.world)}
        save_checkpoint(stage_dir, dense, opt, step, done, extra={"ep_world": ctx.world}, extra_files=files)
    dist.barrier()


def load_optimizer_state(ckpt_dir, state: dict, ctx: EPContext | None):
    """This rank's optimizer state from a checkpoint (``trainer.pt`` holds rank 0's)."""
    from pathlib import Path

    saved_world = state.get("extra", {}).get("ep_world", 1)
    world = 1 if ctx is None else ctx.world
    if saved_world != world:
        raise ValueError(f"{ckpt_dir} holds optimizer state for --ep {saved_world}; resume with --ep {saved_world} "
                         f"(the weights alone load at any EP size)")
    if ctx is None or ctx.is_main:
        return state["optimizer"]
    return torch.load(Path(ckpt_dir) / f"optimizer-rank{ctx.rank}.pt", map_location="cpu", weights_only=True)


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
    if ctx is not None:
        dist.barrier()
