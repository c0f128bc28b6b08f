"""``compass plan``: the layout choice, the printed plan, bad input, and its parameter / optimizer
bytes against the real sharded tensors of a tiny model laid out by the trainer (gloo)."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compass_model.plan import chunk_rows, choose_layout, format_plan, make_plan, rank_bytes
from helpers import REPO_ROOT

_ROOT = str(REPO_ROOT)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


def test_chunk_rows_is_torch_chunk():
    for n in range(0, 13):
        for s in range(1, 9):
            sizes = [len(c) for c in torch.arange(n).chunk(s)] if n else []
            sizes += [0] * (s - len(sizes))
            assert [chunk_rows(n, s, i) for i in range(s)] == sizes, (n, s)


def test_layout_choice():
    assert choose_layout(16, 64) == (8, 8)          # EP within an 8-GPU node
    assert choose_layout(16, 4) == (1, 4)
    assert choose_layout(6, 12, gpus_per_node=4) == (6, 2)


def test_compass_v3_on_64_gpus_prints_the_plan():
    r = subprocess.run([sys.executable, "-m", "compass_model.cli", "plan", "--preset", "compass-v3", "--gpus", "64"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "dp 8 x ep 8" in out and "optimizer (AdamW)" in out and "all-to-all" in out, out
    p = make_plan("compass-v3", 64)
    # 245.5B weights (+ the MTP module) over 64 GPUs, bf16: about 3.9B parameters each
    assert 3.8e9 < p.params_per_gpu < 4.0e9
    assert p.grad_bytes == p.param_bytes and 2 * p.param_bytes < p.optimizer_bytes < 2.01 * p.param_bytes
    assert p.activation_bytes_checkpointed < p.activation_bytes
    assert not p.fits_with_checkpointing and "does NOT fit" in out     # 4096 tokens per GPU
    half = make_plan("compass-v3", 64, seq_len=2048)
    assert not half.fits and half.fits_with_checkpointing and "only with activation checkpointing" in format_plan(half)
    assert make_plan("compass-v3", 64, seq_len=1024).fits


def test_plan_says_when_it_does_not_fit():
    p = make_plan("compass-v3", 8, seq_len=128)         # the weights alone: 245B / 8 x 16 bytes
    assert not p.fits_with_checkpointing and "does NOT fit" in format_plan(p)


def test_plan_bad_input():
    with pytest.raises(ValueError, match="--gpus is 64"):
        make_plan("compass-v3", 64, dp=3, ep=8)
    with pytest.raises(ValueError, match="divisible"):
        make_plan("compass-v3", 24, dp=1, ep=24)
    with pytest.raises(ValueError, match="--gpus"):
        make_plan("compass-v3", 0)
    with pytest.raises(ValueError, match="--seq-len"):
        make_plan("tiny", 1, seq_len=10**6)


def _measure(rank: int, world: int, store: str, dp: int, ep: int) -> None:
    """Lay out the tiny model as ``train --dp --ep`` does, take one AdamW step, compare bytes."""
    from torch.distributed.device_mesh import init_device_mesh

    from compass_model import CompassConfig
    from compass_model.model import CompassForCausalLM
    from compass_model.train import parallel
    from compass_model.train.trainer import make_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))
    ctx = parallel.EPContext(rank, world, dp, ep, "global", mesh)
    cfg = CompassConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = parallel.shard(CompassForCausalLM(cfg), ctx)
    opt = make_optimizer(model, 1e-3, 0.0, foreach=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids, ids).loss.backward()
    opt.step()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    params = [local(p) for p in model.parameters()]
    real = {"params": sum(p.numel() for p in params),
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "optimizer_bytes": sum(local(t).numel() * local(t).element_size()
                                   for st in opt.state.values() for t in st.values())}
    want = rank_bytes(cfg, dp, ep, rank)
    for k, v in real.items():
        assert v == want[k], (dp, ep, rank, k, v, want[k])
    Path(f"{store}.ok{rank}").touch()
    sys.stdout.flush()
    import os
    os._exit(0)


def _run(world: int, dp: int, ep: int, tmp_path) -> None:
    store = str(tmp_path / f"store-{dp}x{ep}")
    ctx = mp.spawn(_measure, args=(world, store, dp, ep), nprocs=world, join=False)
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("workers did not finish in 120 s")
    except mp.ProcessExitedException:
        if not all(Path(f"{store}.ok{r}").exists() for r in range(world)):
            raise


@pytest.mark.parametrize("dp,ep", [(2, 1), (1, 2)])
def test_plan_bytes_match_sharded_tensors(dp, ep, tmp_path):
    _run(dp * ep, dp, ep, tmp_path)


@pytest.mark.slow
def test_plan_bytes_match_sharded_tensors_dp2_ep2(tmp_path):
    _run(4, 2, 2, tmp_path)
