"""Alignment under --dp / --ep (gloo): a short DPO + OTPO run on 2 ranks gives the single-process
losses, gradient norms and reward metrics with the default recipe (aux loss, z-loss, router bias
updates, RPO's chosen NLL), writes DCP shards, and its final weights consolidate to the
single-process ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from align_worker import align
from train_runs import free_port

from compass_model.checkpoint import WEIGHTS_NAME, load_weights, save_pretrained
from compass_model.config import CompassConfig
from compass_model.data import write_jsonl
from compass_model.model import CompassForCausalLM
from compass_model.train.metrics import read_metrics
from compass_model.train.state import latest_checkpoint
from helpers import REPO_ROOT

PAIRS = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in [
    ("Color of sky?", "blue", "grass"), ("2+2=", "4", "five"), ("Capital of France?", "Paris", "Rome it is"),
    ("Say hi", "hi", "bye"), ("Opposite of hot?", "cold", "warm"), ("Animal that barks?", "dog", "cat"),
    ("3+3=", "6", "seven"), ("Fruit that is yellow?", "banana", "apple")]]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("align_dist")
    torch.manual_seed(0)
    save_pretrained(CompassForCausalLM(CompassConfig.from_preset("tiny", max_seq_len=128, router_bias_rate=1e-3)),
                    tmp / "sft")
    write_jsonl(tmp / "pairs.jsonl", PAIRS)
    res = align(tmp / "sft", tmp / "one", tmp / "pairs.jsonl")
    return tmp, res


def _run(tmp, name, dp, ep):
    worker = Path(__file__).with_name("align_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(dp * ep), "--master-port",
           str(free_port()), str(worker), str(tmp / "sft"), str(tmp / name), str(tmp / "pairs.jsonl"), str(dp), str(ep)]
    root = str(REPO_ROOT)     # this source tree, not an installed copy
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return read_metrics(tmp / name / "metrics.jsonl")


def _same(tmp, name, many):
    ref = read_metrics(tmp / "one" / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in many] == [(r["stage"], r["step"]) for r in ref]
    for a, b in zip(ref, many):
        for k in ("loss", "reward_margin", "reward_accuracy", "router_loss", "sft_nll"):
            assert abs(a[k] - b[k]) < 1e-4, (a["stage"], a["step"], k, a[k], b[k])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
        if "weight_min" in a:
            # OTPO weights come out of an fp32 Sinkhorn solve on hidden states that differ by ~1e-7
            # between layouts (other reduction orders); the solve amplifies that to ~1e-4 (1.2e-4
            # measured on weights of ~1.19), so the bound is relative, like the gradient norm's.
            for k in ("weight_min", "weight_max"):
                assert abs(a[k] - b[k]) < 1e-3 * abs(a[k]), (a["stage"], a["step"], k, a[k], b[k])
    for stage in ("align-dpo", "align"):
        mine = latest_checkpoint(tmp / name / "checkpoints" / stage)
        assert not (mine / WEIGHTS_NAME).exists() and (mine / "model" / ".metadata").is_file()
        w1, w2 = load_weights(latest_checkpoint(tmp / "one" / "checkpoints" / stage)), load_weights(mine)
        assert set(w1) == set(w2)
        for k in w1:                                    # router biases included: one bias update
            # Adam's first steps move each weight by about lr * sign(g): where a gradient is ~0, a
            # 1e-9 difference between the layouts' reduction orders can flip single elements by
            # ~lr, so compare whole tensors (a relative norm), not elements.
            err = (w2[k].double() - w1[k].double()).norm() / w1[k].double().norm().clamp(min=1e-12)
            assert err < 1e-3, (k, float(err))


def test_align_ep2_matches_one_process(one):
    tmp, res = one
    _same(tmp, "ep2", _run(tmp, "ep2", 1, 2))
    summary = json.loads((tmp / "ep2" / "align-summary.json").read_text())
    for method in ("dpo", "otpo"):                      # rank 0 evaluates the consolidated model
        assert summary[method]["eval"] == pytest.approx(res[method]["eval"], abs=1e-4)


@pytest.mark.slow
def test_align_dp2_matches_one_process(one):
    """FSDP2 over the two ranks (experts replicated over ep 1, sharded on their hidden dim)."""
    tmp, _ = one
    _same(tmp, "dp2", _run(tmp, "dp2", 2, 1))


def test_align_micro_batch_must_split_over_the_ranks():
    from compass_model.train.align import _check_split
    from compass_model.train.parallel import EPContext

    ctx = EPContext(rank=0, world=2)
    _check_split(4, 6, ctx)                             # micro-batches of 4 and 2 pairs
    with pytest.raises(ValueError, match=r"micro-batches of \[1, 2\] pairs .* divisible by the world size 2"):
        _check_split(2, 5, ctx)
    _check_split(3, 5, None)                            # one process: anything goes
