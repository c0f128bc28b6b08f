"""Experiment ``experts``: expert count and top-k at fixed active parameters (experiment 2).

Grid: E in {4, 8, 16, 32} x top-k in {1, 2, 4} (E >= k) with ``expert_ffn_dim = F0 * 2 / k``, so the
active FFN width ``k F`` is ``2 F0`` everywhere (the tiny preset's top-2 x F0 = 64 at the LM scale).

Per configuration:
  * ``gemm_eff``: the expert fc1 grouped GEMM (``x [T k, D] -> [T k, 2F]`` over E groups, uniform-ish
    random routing) timed against ONE dense matmul of the same FLOPs (``[T k, D] @ [D, 2F]``):
    dense time / grouped time (1 = as efficient as a dense GEMM);
  * ``tokens_per_s``: forward throughput of a whole ``compass_model.moe.MoE`` layer (router, route,
    permute, two grouped GEMMs, unpermute) at a benchmark shape (d_model ``D_bench``, F0 ``F_bench``);
  * ``eval_lm`` / ``final_lm``: LM loss of the tiny proxy after a fixed step budget (held-out batches /
    mean of the last steps; mean over ``lm["seeds"]`` model seeds, same data), the "fewer but larger
    experts" question; total/active parameters too.
Timings: medians of interleaved repetitions (``compass_kernels.benchmarking.timers.median_times``); a
shared machine is noisy, so compare within one run.
"""

from __future__ import annotations

import logging
import time

import torch

import compass_kernels as ck
from compass_kernels.benchmarking.inputs import offsets_of, topk_ids
from compass_kernels.benchmarking.models import gemm_flops
from compass_model.experiments.common import (
    finish,
    mean,
    median_times,
    small_config,
    stage_data,
    train_lm,
)
from compass_model.train.progress import progress

logger = logging.getLogger(__name__)
NAME = "experts"
EXPERTS = (4, 8, 16, 32)
TOPK = (1, 2, 4)


def grid(experts=EXPERTS, topk=TOPK) -> list:
    """The ``(E, k)`` pairs with ``E >= k``."""
    return [(E, k) for E in experts for k in topk if E >= k]


def ffn_dim(f0: int, k: int) -> int:
    """Per-expert width at fixed active width ``2 f0``: ``f0 * 2 / k`` (integer for k in 1, 2, 4)."""
    if (2 * f0) % k:
        raise ValueError(f"2 * F0 = {2 * f0} is not divisible by top_k = {k}")
    return 2 * f0 // k


def _random_offsets(T: int, E: int, k: int, gen: torch.Generator) -> torch.Tensor:
    counts = torch.bincount(topk_ids(T, k, E, "uniform", generator=gen).reshape(-1), minlength=E)
    return offsets_of(counts)


def time_layer(E: int, k: int, d: int, f0: int, T: int, reps: int, seed: int) -> dict:
    """grouped GEMM vs dense of equal FLOPs, and the MoE layer forward, at one benchmark shape."""
    from compass_model.moe import MoE
    gen = torch.Generator().manual_seed(seed)
    F = ffn_dim(f0, k)
    x_MD = torch.randn(T * k, d, generator=gen)
    w_EDF = torch.randn(E, d, 2 * F, generator=gen) * d ** -0.5
    w_DF = torch.randn(d, 2 * F, generator=gen) * d ** -0.5
    offsets = _random_offsets(T, E, k, gen)
    cfg = small_config(d_model=d, num_experts=E, top_k=k, expert_ffn_dim=F)      # the MoE layer alone
    torch.manual_seed(seed)
    layer = MoE(cfg).eval()
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0, generator=gen)      # spread the routing like a trained router
    x_TD = torch.randn(T, d, generator=gen)

    def layer_fwd():
        with torch.no_grad():
            layer(x_TD)

    t = median_times({"grouped": lambda: ck.grouped_gemm(x_MD, w_EDF, offsets),
                      "dense": lambda: torch.mm(x_MD, w_DF),
                      "layer": layer_fwd}, reps=reps)
    flops = gemm_flops(T * k, d, 2 * F)                       # the up projection w13 [d, 2F]
    return {"grouped_s": t["grouped"], "dense_s": t["dense"], "gemm_eff": t["dense"] / t["grouped"],
            "grouped_gflops": flops / t["grouped"] / 1e9, "dense_gflops": flops / t["dense"] / 1e9,
            "layer_s": t["layer"], "tokens_per_s": T / t["layer"]}


def run(out_dir, *, quick: bool = False, seed: int = 0) -> dict:
    """Measure every configuration, write ``experts.json`` and ``experts.png`` under ``out_dir``."""
    t0 = time.perf_counter()
    if quick:
        configs = grid((4, 16), (1, 2, 4))
        bench = {"d": 64, "f0": 64, "T": 256, "reps": 2}
        lm = {"steps": 6, "rows": 4, "seq_len": 64, "n_layers": 1, "pool": 200, "last": 2, "eval": 1, "seeds": 1}
    else:
        configs = grid()
        bench = {"d": 256, "f0": 256, "T": 2048, "reps": 5}
        lm = {"steps": 300, "rows": 8, "seq_len": 128, "n_layers": 1, "pool": 2000, "last": 30, "eval": 8, "seeds": 2}
    f0_lm = 64
    data = stage_data("ecommerce", lm["seq_len"], lm["rows"], seed, lm["pool"])
    eval_batches = stage_data("ecommerce", lm["seq_len"], lm["rows"], seed + 1000, lm["pool"]).micro_batches(
        0, lm["eval"])
    rows = []
    bar = progress(len(configs), f"[{NAME}] configurations")
    for E, k in configs:
        t = time.perf_counter()
        timing = time_layer(E, k, bench["d"], bench["f0"], bench["T"], bench["reps"], seed)
        cfg = small_config(n_layers=lm["n_layers"], max_seq_len=lm["seq_len"], num_experts=E, top_k=k,
                           expert_ffn_dim=ffn_dim(f0_lm, k))
        runs = [train_lm(cfg, data, lm["steps"], seed=seed + i, eval_batches=eval_batches) for i in range(lm["seeds"])]
        row = {"label": f"E{E}k{k}", "num_experts": E, "top_k": k, "expert_ffn_dim": ffn_dim(f0_lm, k),
               "bench_expert_ffn_dim": ffn_dim(bench["f0"], k),
               "total_params": cfg.num_parameters(), "active_params": cfg.active_parameters(),
               **timing,
               "final_lm": mean(mean(x["lm"] for x in r["records"][-lm["last"]:]) for r in runs),
               "eval_lm": mean(r["eval_lm"] for r in runs), "eval_lm_per_seed": [r["eval_lm"] for r in runs],
               "final_entropy": mean(mean(x["entropy"] for x in r["records"][-lm["last"]:]) for r in runs),
               "seconds": round(time.perf_counter() - t, 2)}
        rows.append(row)
        logger.info(f"[{NAME}] {row['label']:>7}: gemm eff {row['gemm_eff']:.2f}  layer {row['tokens_per_s']:.0f} tok/s  "
                   f"eval lm {row['eval_lm']:.3f}  ({row['seconds']} s)")
        bar.update(1)
    bar.close()
    result = {
        "setup": {"f0_lm": f0_lm, "active_ffn_width_lm": 2 * f0_lm, "bench": bench, "lm": lm, "seed": seed,
                  "threads": torch.get_num_threads()},
        "configs": rows,
        "best_eval_lm": min(rows, key=lambda r: r["eval_lm"])["label"],
    }
    return finish(out_dir, NAME, result, _plot, quick=quick, t0=t0)


def _plot(plt, result, path):
    rows = result["configs"]
    labels = [r["label"] for r in rows]
    xs = range(len(rows))
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    a.bar(xs, [r["eval_lm"] for r in rows], color=[f"C{TOPK.index(r['top_k'])}" for r in rows])
    lo = min(r["eval_lm"] for r in rows)
    a.set_ylim(lo * 0.97, max(r["eval_lm"] for r in rows) * 1.01)
    a.set_title("held-out LM loss after a fixed budget")
    b.bar(xs, [r["tokens_per_s"] for r in rows], color=[f"C{TOPK.index(r['top_k'])}" for r in rows])
    b.set_title("MoE layer forward tokens/s")
    c.bar(xs, [r["gemm_eff"] for r in rows], color=[f"C{TOPK.index(r['top_k'])}" for r in rows])
    c.axhline(1.0, color="k", lw=0.8, ls="--")
    c.set_title("grouped GEMM efficiency (dense time / grouped time)")
    for ax in (a, b, c):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=60, fontsize=8)
    fig.suptitle("fixed active FFN width (colour = top-k)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
