"""Expert parallelism on gloo, 2 and 4 processes: the EP MoE layer equals the single-process layer.

Each world size is one spawn (process start-up dominates on 2 cores) whose workers run every case:
uniform routing with a shared expert, a rank with zero tokens, skewed routing (every token to rank
0's experts, so other ranks receive nothing), no tokens anywhere, and the divisibility error; with 2
ranks also capacity drops and 5 training steps of a small model (plain all-reduce DP and FSDP2 over
the replicated weights) against single-process training. A dead rank makes the survivor's
collective fail (timeout or closed connection) instead of hanging.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import REPO_ROOT

# Spawned workers unpickle this module's functions by name: make the repository root importable,
# behind site-packages so that the workers use the installed compass_kernels (with its _cpu).
_ROOT = str(REPO_ROOT)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

D, E, K, FFN = 16, 8, 2, 12
TOL = {"rtol": 0, "atol": 1e-10}  # fp64 end to end; only the summation order of reductions differs


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def _dense(cfg, skew: bool):
    from compass_model.moe import MoE

    torch.manual_seed(1)  # identical weights on every rank
    m = MoE(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        if skew:  # experts 0 and 1 (rank 0's) win every top-2 for inputs along u
            u = torch.ones(cfg.d_model) / cfg.d_model**0.5
            m.router.weight[0] += 6 * u
            m.router.weight[1] += 5 * u
    return m.double()


def _inputs(tokens: list[int], skew: bool):
    torch.manual_seed(2)
    xs = [torch.randn(t, D, dtype=torch.float64) for t in tokens]
    if skew:
        xs = [x + 4 / D**0.5 for x in xs]
    gs = [torch.randn(t, D, dtype=torch.float64) for t in tokens]
    return xs, gs


def _check_case(rank: int, world: int, tokens: list[int], skew=False, shared=0, capacity=None) -> None:
    from compass_model.config import CompassConfig
    from compass_model.distributed import EPMoE

    cfg = CompassConfig(d_model=D, num_experts=E, top_k=K, expert_ffn_dim=FFN, shared_expert_dim=shared,
                        capacity_factor=capacity)
    dense = _dense(cfg, skew)
    xs, gs = _inputs(tokens, skew)
    # The single-process reference: every rank's tokens through the dense layer (capacity, if any,
    # applies per batch, as for a data-parallel replica), one summed loss.
    ref_x = [x.clone().requires_grad_() for x in xs]
    ref_out = [dense(x)[0] for x in ref_x]
    sum((o * g).sum() for o, g in zip(ref_out, gs)).backward()

    ep = EPMoE.from_dense(dense, cfg)
    ep.train(dense.training)
    x = xs[rank].clone().requires_grad_()
    out, router = ep(x)
    (out * gs[rank]).sum().backward()
    where = f"rank {rank}/{world}, tokens {tokens}, skew {skew}, capacity {capacity}"
    torch.testing.assert_close(out, ref_out[rank], **TOL, msg=lambda m: f"output, {where}: {m}")
    torch.testing.assert_close(x.grad, ref_x[rank].grad, **TOL, msg=lambda m: f"grad x, {where}: {m}")
    L = E // world
    lo = rank * L
    torch.testing.assert_close(ep.w13_EDF.grad, dense.w13_EDF.grad[lo:lo + L], **TOL,
                               msg=lambda m: f"grad w13, {where}: {m}")
    torch.testing.assert_close(ep.w2_EFD.grad, dense.w2_EFD.grad[lo:lo + L], **TOL,
                               msg=lambda m: f"grad w2, {where}: {m}")
    # replicated weights see local tokens only: their gradients add up over the ranks
    for name, p in ep.named_parameters():
        if name.startswith(("router", "shared")):
            g = p.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g, dense.get_parameter(name).grad, **TOL,
                                       msg=lambda m, n=name: f"grad {n}, {where}: {m}")
    if skew and rank > 0:  # the skewed case really sends nothing to the other ranks' experts
        assert int(router["stats"]["load"][lo:lo + L].sum()) == 0, where


def _check_global_stats(rank: int, world: int, tokens: list[int], capacity=None, skew=False) -> None:
    """Global router statistics (``Router.stats_group``): the ranks' shards of one batch give the
    single-process layer on the concatenated batch: outputs, drops (capacity of the whole batch, in
    its (token, slot) order), the aux and z losses (each rank's share sums to the dense value) and
    every gradient, the router's through the aux and z losses included."""
    from compass_model.config import CompassConfig
    from compass_model.distributed import EPMoE

    cfg = CompassConfig(d_model=D, num_experts=E, top_k=K, expert_ffn_dim=FFN, capacity_factor=capacity)
    dense = _dense(cfg, skew)
    xs, gs = _inputs(tokens, skew)
    ref_x = torch.cat(xs).requires_grad_()
    ref_out, ref_r = dense(ref_x)
    ((ref_out * torch.cat(gs)).sum() + ref_r["aux"] + ref_r["z"]).backward()

    ep = EPMoE.from_dense(dense, cfg)
    ep.router.stats_group = dist.group.WORLD
    x = xs[rank].clone().requires_grad_()
    out, r = ep(x)
    ((out * gs[rank]).sum() + r["aux"] + r["z"]).backward()
    where = f"rank {rank}/{world}, tokens {tokens}, capacity {capacity}, skew {skew}"
    lo_t = sum(tokens[:rank])
    torch.testing.assert_close(out, ref_out[lo_t:lo_t + tokens[rank]], **TOL, msg=lambda m: f"output, {where}: {m}")
    torch.testing.assert_close(x.grad, ref_x.grad[lo_t:lo_t + tokens[rank]], **TOL,
                               msg=lambda m: f"grad x, {where}: {m}")
    losses = torch.stack([r["aux"], r["z"]]).detach()
    dist.all_reduce(losses)
    torch.testing.assert_close(losses, torch.stack([ref_r["aux"], ref_r["z"]]).detach().float(), rtol=1e-6, atol=0,
                               msg=lambda m: f"aux, z, {where}: {m}")
    for k in ("load", "dropped"):
        torch.testing.assert_close(r["stats"][k], ref_r["stats"][k], **TOL, msg=lambda m, k=k: f"{k}, {where}: {m}")
    L = E // world
    lo = rank * L
    torch.testing.assert_close(ep.w13_EDF.grad, dense.w13_EDF.grad[lo:lo + L], **TOL,
                               msg=lambda m: f"grad w13, {where}: {m}")
    g = ep.router.weight.grad.clone()
    dist.all_reduce(g)
    torch.testing.assert_close(g, dense.router.weight.grad, rtol=1e-5, atol=1e-6,   # the router computes in fp32
                               msg=lambda m: f"grad router, {where}: {m}")
    if capacity is not None:
        assert float(ref_r["stats"]["dropped"]) > 0, where       # the case really drops slots


def _train_losses(rank: int, world: int, fsdp: bool, steps: int = 5) -> None:
    """``steps`` AdamW steps of a small MoE transformer (fp64): the EP model (this rank's batch
    rows, expert shards; replicated gradients averaged by ``average_gradients`` or FSDP2) gives the
    single-process losses on the global batch. aux_loss_coef = 0: the load-balancing loss is per-rank by design (not a mean over
    tokens), the LM, MTP and z losses are token means over equal per-rank batches, so they compose."""
    import copy

    from compass_model.config import CompassConfig
    from compass_model.distributed import (
        average_gradients,
        fully_shard_replicated,
        scale_expert_gradients,
        shard_moe_layers,
    )
    from compass_model.model import CompassForCausalLM

    cfg = CompassConfig(vocab_size=48, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, num_experts=4, top_k=2,
                        expert_ffn_dim=12, n_dense_layers=0, shared_expert_dim=8, mtp_depth=1,
                        max_seq_len=8, aux_loss_coef=0.0, z_loss_coef=1e-2)
    torch.manual_seed(3)
    ref = CompassForCausalLM(cfg).double()
    ep = shard_moe_layers(copy.deepcopy(ref), cfg)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    if fsdp:
        from torch.distributed.tensor import DTensor

        fully_shard_replicated(ep)
        assert isinstance(ep.embed.weight, DTensor) and not isinstance(ep.layers[0].ffn.w13_EDF, DTensor)
    opt_ep = torch.optim.AdamW(ep.parameters(), lr=1e-2, foreach=not fsdp)  # DTensor and plain params mix
    B = 2  # sequences per rank
    for step in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (B * world, cfg.max_seq_len))
        labels = torch.roll(ids, -1, dims=1)
        loss_ref = ref(ids, labels).loss
        loss_ref.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        ref.after_optimizer_step()
        mine = slice(rank * B, (rank + 1) * B)
        loss = ep(ids[mine], labels[mine]).loss
        loss.backward()
        if fsdp:
            scale_expert_gradients(ep, world)
        else:
            average_gradients(ep)
        opt_ep.step()
        opt_ep.zero_grad()
        ep.after_optimizer_step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        global_loss /= world
        assert abs(global_loss.item() - loss_ref.item()) < 1e-9, (fsdp, step, global_loss.item(), loss_ref.item())


def _worker(rank: int, world: int, store: str) -> None:
    from compass_model.distributed import EPDispatcher

    _init(rank, world, store)
    uneven = [5 + 3 * r for r in range(world)]
    _check_case(rank, world, uneven, shared=8)
    _check_case(rank, world, [0 if r == world - 1 else 6 for r in range(world)])   # a rank with no tokens
    _check_case(rank, world, uneven, skew=True)                                    # others receive none
    _check_case(rank, world, [0] * world)                                          # nobody has tokens
    if world == 2:
        _check_case(rank, world, [9, 4], capacity=0.5)                              # dropped slots
        _train_losses(rank, world, fsdp=False)
        _train_losses(rank, world, fsdp=True)
    _check_global_stats(rank, world, uneven)
    _check_global_stats(rank, world, uneven, capacity=0.75, skew=True)      # global capacity drops
    _check_global_stats(rank, world, [0 if r == 0 else 7 for r in range(world)], capacity=1.0)
    with pytest.raises(ValueError, match="divisible"):
        EPDispatcher(2 * world + 1)
    dist.barrier()
    _finish(rank, store)


def _finish(rank: int, store: str) -> None:
    """Record that this rank passed, then leave without tearing gloo down: once the first rank has
    gone, a peer's gloo I/O thread can see the closed connection and abort the process (seen on a
    loaded CI box as SIGABRT after every check had passed). Teardown is not what these tests test."""
    Path(f"{store}.ok{rank}").touch()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(fn, world: int, store: str, limit_s: float = 60) -> None:
    """Spawn ``world`` workers; a worker error fails the test, and so does running past limit_s.
    A worker that dies after recording success (``_finish``) is a teardown crash, not a failure."""
    ctx = mp.spawn(fn, args=(world, store), nprocs=world, join=False)
    deadline = time.monotonic() + limit_s
    passed = lambda: all(Path(f"{store}.ok{r}").exists() for r in range(world))
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"{world} workers did not finish in {limit_s} s (a hang?)")
    except mp.ProcessExitedException:
        if not passed():
            raise


@pytest.mark.parametrize("world", [2, 4])
def test_ep_moe_matches_single_process(world, tmp_path):
    _run(_worker, world, str(tmp_path / "store"))


def _dead_rank_worker(rank: int, world: int, store: str) -> None:
    _init(rank, world, store)
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=2))
    dist.barrier(group=group)  # both ends of the group connected: rank 1 leaving mid-handshake fails new_group instead
    if rank == 1:
        _finish(rank, store)  # dies without joining the collective
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):  # gloo: timeout or connection closed, never a hang
        dist.all_reduce(torch.ones(4), group=group)
    assert time.monotonic() - t0 < 30
    _finish(rank, store)


def test_dead_rank_times_out(tmp_path):
    _run(_dead_rank_worker, 2, str(tmp_path / "store"), limit_s=45)
