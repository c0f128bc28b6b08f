"""Experiment ``combine``: the MoE "memcpy" microbenchmark (experiment 3).

At identical shapes (T tokens, hidden H, E experts, top-k, fp32, random top-k routing):
  dispatch  fused ``ck.route`` + ``ck.permute``  vs  Megatron-style stable argsort + ``index_select``
  combine   fused ``ck.unpermute(probs)``        vs  Megatron-style multiply by the permuted probs +
            ``index_add_``  and  the Hugging Face loop's per-expert ``index_add_`` of ``y_e * gates``
            (its token lists precomputed, so only the combine is timed)
Each op is timed in isolation on the same inputs, the paths interleaved, median of ``reps`` runs.
The peers, the timer and the byte count are the benchmark harness's (``compass_kernels.benchmarking``:
``megatron_dispatch`` / ``megatron_combine``, the combine step of ``naive_moe`` as ``hf_combine``,
``median_times``, ``unpermute_bytes``). The machine is shared and noisy: report ratios within one run
(``speedup_*``).

On CPU, run under bench/run_cpu.sh's ``GLIBC_TUNABLES`` (glibc.malloc.mmap_max=0 and a huge
trim_threshold; ``machine.glibc_tunables`` records it): without them every buffer over 32 MiB is fresh
mmap'd pages, and the page faults dominate the large shapes (measured here: the Megatron combine's
temporaries at T=4096, H=1024 take 13 ms instead of 3.7 ms, inflating its ratio from ~2.6x to ~11x).
"""

from __future__ import annotations

import logging
import time

import torch

import compass_kernels as ck
from compass_kernels.benchmarking.inputs import topk_ids
from compass_kernels.benchmarking.models import unpermute_bytes
from compass_kernels.benchmarking.peers import hf_combine, hf_lists, megatron_combine, megatron_dispatch
from compass_model.experiments.common import finish, median_times
from compass_model.train.progress import progress

logger = logging.getLogger(__name__)
NAME = "combine"


def bench_shape(T: int, H: int, E: int, k: int, reps: int, seed: int) -> dict:
    """Dispatch and combine times (ms) and speed-ups of the fused kernels over the peers at one shape."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    ids = topk_ids(T, k, E, "uniform", generator=gen).contiguous()
    probs = torch.rand(T, k, generator=gen)
    probs = probs / probs.sum(-1, keepdim=True)
    plan = ck.route(ids, E)
    y_fused = ck.permute(x, plan)                       # expert outputs in the fused row order
    _, sorted_idx, _ = megatron_dispatch(x, ids, E)
    y_meg = x.index_select(0, sorted_idx // k)         # the same rows in Megatron's order
    lists = hf_lists(ids, E)
    ys_hf = [x.index_select(0, tok) for tok, _ in lists]
    # all three combines compute the same output
    ref = ck.unpermute(y_fused, plan, probs=probs)
    for other in (megatron_combine(y_meg, sorted_idx, probs, T), hf_combine(ys_hf, lists, probs, T)):
        torch.testing.assert_close(other, ref, rtol=1e-4, atol=1e-4)
    t = median_times({
        "fused_dispatch": lambda: ck.permute(x, ck.route(ids, E)),
        "megatron_dispatch": lambda: megatron_dispatch(x, ids, E),
        "fused_combine": lambda: ck.unpermute(y_fused, plan, probs=probs),
        "megatron_combine": lambda: megatron_combine(y_meg, sorted_idx, probs, T),
        "hf_combine": lambda: hf_combine(ys_hf, lists, probs, T),
    }, reps=reps)
    moved = unpermute_bytes(T, H, k, x.element_size())  # bytes a combine must read + write
    return {"T": T, "H": H, "E": E, "k": k, **{f"{n}_ms": v * 1e3 for n, v in t.items()},
            "speedup_dispatch": t["megatron_dispatch"] / t["fused_dispatch"],
            "speedup_combine_megatron": t["megatron_combine"] / t["fused_combine"],
            "speedup_combine_hf": t["hf_combine"] / t["fused_combine"],
            "fused_combine_gbps": moved / t["fused_combine"] / 1e9,
            "megatron_combine_gbps": moved / t["megatron_combine"] / 1e9}


def shapes(quick: bool) -> list:
    """The ``(T, H, E, k)`` shapes measured (two in quick mode)."""
    if quick:
        return [(256, 1024, 16, 2), (256, 1024, 128, 8)]
    return ([(T, H, 16, 2) for T in (1024, 4096) for H in (1024, 2048)]
            + [(T, H, 128, 8) for T in (1024, 2048) for H in (1024, 2048)])


def run(out_dir, *, quick: bool = False, seed: int = 0) -> dict:
    """Time every shape, write ``combine.json`` and ``combine.png`` under ``out_dir``."""
    t0 = time.perf_counter()
    reps = 3 if quick else 7
    rows = []
    todo = shapes(quick)
    bar = progress(len(todo), f"[{NAME}] shapes")
    for T, H, E, k in todo:
        r = bench_shape(T, H, E, k, reps, seed)
        rows.append(r)
        logger.info(f"[{NAME}] T={T} H={H} E={E} k={k}: combine fused {r['fused_combine_ms']:.2f} ms, megatron "
                   f"{r['megatron_combine_ms']:.2f} ms (x{r['speedup_combine_megatron']:.2f}), hf {r['hf_combine_ms']:.2f} ms "
                   f"(x{r['speedup_combine_hf']:.2f}); dispatch x{r['speedup_dispatch']:.2f}")
        bar.update(1)
    bar.close()
    geo = lambda xs: float(torch.tensor(xs).log().mean().exp())
    result = {
        "setup": {"dtype": "float32", "reps": reps, "routing": "uniform random top-k", "seed": seed,
                  "threads": torch.get_num_threads()},
        "shapes": rows,
        "geomean_speedup": {key: geo([r[key] for r in rows])
                            for key in ("speedup_dispatch", "speedup_combine_megatron", "speedup_combine_hf")},
    }
    return finish(out_dir, NAME, result, _plot, quick=quick, t0=t0)


def _plot(plt, result, path):
    rows = result["shapes"]
    labels = [f"T{r['T']} H{r['H']}\nE{r['E']} k{r['k']}" for r in rows]
    xs = range(len(rows))
    w = 0.27
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.5))
    for i, (key, name) in enumerate((("fused_combine_ms", "fused unpermute"),
                                     ("megatron_combine_ms", "Megatron index_add"),
                                     ("hf_combine_ms", "HF per-expert loop"))):
        a.bar([x + (i - 1) * w for x in xs], [r[key] for r in rows], w, label=name)
    a.set_yscale("log")
    a.set_ylabel("ms (median)")
    a.set_title("combine stage")
    a.legend(fontsize=8)
    for i, (key, name) in enumerate((("fused_dispatch_ms", "fused route+permute"),
                                     ("megatron_dispatch_ms", "Megatron argsort+index_select"))):
        b.bar([x + (i - 0.5) * w for x in xs], [r[key] for r in rows], w, label=name)
    b.set_yscale("log")
    b.set_title("dispatch stage")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
