"""Per-stage time of one MoE layer forward: the naive HF-style loop against the fused compass path.

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \
    python profiling/moe_breakdown.py [--tokens 4096 --d-model 1024 --ffn 704 --experts 16 --top-k 2]
        [--device cpu|cuda] [--dtype float32] [--iters 3] [--trace out/moe_trace.json]
        [--json out/moe_breakdown.json]

Both paths run under ``torch.profiler`` in one session, each iteration inside an outer range
(``compass.naive`` / ``compass.fused``), with stage ranges named as moe.py's NVTX ranges: router,
permute, expert_fc1, activation, expert_fc2, unpermute (the naive path's gate multiply +
``index_add_`` combine is its "unpermute"). The layer is not edited: ``mirrored_ranges`` swaps its
``nvtx_range`` for one that opens the NVTX range *and* a ``record_function`` of the same name, for
the duration of the run. Time the layer spends outside the stages (router losses and stats) is
"other", so the shares of a path sum to 1. A stage's time is the wall time of its ranges (summed over
the naive path's per-expert repeats), the median over iterations. On CUDA each range synchronises
the device when it closes, so the host-side range covers the kernels it launched; that serialises
host and device, so use nsys (profiling/nsys_moe.sh) for the unperturbed timeline.

On CPU run it with bench/run_cpu.sh's GLIBC_TUNABLES (above): without them every buffer over 32 MiB
is fresh mmap'd pages, and the fused path, which allocates whole-batch buffers where the naive
loop allocates per expert, pays ~5 ms of page faults in each of permute, activation and the losses
at the default shape (measured: fused 217 -> 186 ms). The report says when they are unset.

Measured here (2-core CPU, fp32, 2 threads, GLIBC_TUNABLES set, median of 5): at the default E=16
shape the expert GEMMs are ~90% of both paths, the naive combine is 2.8% (5.5 ms) and the fused
unpermute 0.8% (1.5 ms, 3.7x faster); the layers tie (192 vs 186 ms). At E=128, k=8, f=176 the
naive loop's permute (one_hot + where + index_select per expert) is 28% and permute + combine 34%
of the layer, against 4.5% fused: 315 -> 214 ms. So on CPU the paper's "combine dominates" does not
appear at E=16 (GEMMs are ~100x slower relative to memory than on an H100); the GPU run decides it.

Prints a table per path, writes a Chrome trace (chrome://tracing or ui.perfetto.dev) and a JSON
summary. Default shape: a CPU-sized Compass-like layer (E=16, top-2, d=1024, f=704, 4096 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                                          # run from a checkout, like bench/

import compass_model.moe as moe_mod  # noqa: E402
from compass_kernels import ranges  # noqa: E402
from compass_kernels.benchmarking.models import moe_layer_flops, routing_bytes  # noqa: E402
from compass_kernels.benchmarking.peers import naive_moe  # noqa: E402
from compass_model.config import CompassConfig  # noqa: E402

STAGES = ("router", "permute", "expert_fc1", "activation", "expert_fc2", "unpermute")
PATHS = ("naive", "fused")
DATA_MOVEMENT = ("permute", "unpermute")


def _range_factory(sync: bool):
    def stage(name: str):
        stack = contextlib.ExitStack()
        stack.enter_context(ranges.nvtx.annotate(name, domain="compass"))
        stack.enter_context(record_function(name))
        if sync:
            stack.callback(torch.cuda.synchronize)                       # runs before the ranges close
        return stack
    return stage


@contextlib.contextmanager
def mirrored_ranges(sync: bool = False):
    """While open, moe.py's stage ranges are NVTX + ``record_function`` ranges of the same name."""
    saved = ranges.nvtx_range
    ranges.nvtx_range = _range_factory(sync)
    try:
        yield ranges.nvtx_range
    finally:
        ranges.nvtx_range = saved


def build(args):
    cfg = CompassConfig(d_model=args.d_model, n_heads=1, n_kv_heads=1, num_experts=args.experts,
                        top_k=args.top_k, expert_ffn_dim=args.ffn, dtype=args.dtype)
    dtype = cfg.torch_dtype
    torch.manual_seed(0)
    layer = moe_mod.MoE(cfg).to(device=args.device)
    for name, p in layer.named_parameters():
        if not name.startswith("router."):                              # the router stays fp32
            p.data = p.data.to(dtype)
    layer.eval()
    x = torch.randn(args.tokens, args.d_model, device=args.device, dtype=dtype)
    return cfg, layer, x


def _events_by_path(prof) -> dict:
    """{path: [{stage: seconds, ..., "total": seconds} per iteration]}, from the profiler's event tree
    (each stage range is charged to the ``compass.<path>`` range it runs inside)."""
    iters: dict[int, dict] = {}
    order: dict[str, list[int]] = {p: [] for p in PATHS}
    for ev in prof.events():
        if ev.device_type != DeviceType.CPU:                             # CUDA: skip gpu_user_annotation copies
            continue
        if ev.name.startswith("compass."):
            iters.setdefault(ev.id, dict.fromkeys(STAGES, 0.0))["total"] = ev.time_range.elapsed_us() * 1e-6
            order[ev.name.split(".", 1)[1]].append(ev.id)
        elif ev.name in STAGES:
            parent = ev.cpu_parent
            while parent is not None and not parent.name.startswith("compass."):
                parent = parent.cpu_parent
            if parent is not None:
                iters.setdefault(parent.id, dict.fromkeys(STAGES, 0.0))[ev.name] += ev.time_range.elapsed_us() * 1e-6
    return {p: [iters[i] for i in ids] for p, ids in order.items()}


def _median(xs):
    return float(torch.tensor(xs, dtype=torch.float64).median()) if xs else 0.0


def summarise(raw: dict) -> dict:
    """Per stage the median over iterations (these shared 2-core machines stall single calls by
    100s of ms); "other" is the median of each iteration's unstaged time, so the shares sum to 1."""
    paths = {}
    for p, its in raw.items():
        ms = {s: _median([it[s] for it in its]) * 1e3 for s in STAGES}
        ms["other"] = _median([max(it["total"] - sum(it[s] for s in STAGES), 0.0) for it in its]) * 1e3
        total = sum(ms.values())
        paths[p] = {"total_ms": total, "median_iter_ms": _median([it["total"] for it in its]) * 1e3,
                    "stages": {s: {"ms": v, "share": v / total if total else 0.0} for s, v in ms.items()}}
    nv, fu = paths["naive"]["stages"], paths["fused"]["stages"]
    top = max(STAGES, key=lambda s: nv[s]["ms"])
    moved = lambda st: sum(st[s]["ms"] for s in DATA_MOVEMENT)  # noqa: E731
    findings = {
        "naive_largest_stage": top,
        "naive_largest_non_gemm_stage": max(("router", "permute", "activation", "unpermute"),
                                            key=lambda s: nv[s]["ms"]),
        "combine_share_naive": nv["unpermute"]["share"],
        "combine_share_fused": fu["unpermute"]["share"],
        "combine_speedup": nv["unpermute"]["ms"] / max(fu["unpermute"]["ms"], 1e-9),
        "data_movement_ms": {"naive": moved(nv), "fused": moved(fu)},
        "data_movement_share": {"naive": moved(nv) / paths["naive"]["total_ms"],
                                "fused": moved(fu) / paths["fused"]["total_ms"]},
        "layer_speedup": paths["naive"]["total_ms"] / max(paths["fused"]["total_ms"], 1e-9),
    }
    return {"paths": paths, "findings": findings}


def run(args) -> dict:
    cfg, layer, x = build(args)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fused = lambda: layer(x)[0]  # noqa: E731
    with torch.no_grad(), mirrored_ranges(sync=cuda) as stage:
        naive = lambda: naive_moe(layer, x, stage)  # noqa: E731
        ref, got = naive(), fused()                                      # warm-up and agreement check
        err = ((ref.float() - got.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                for name, fn in (("naive", naive), ("fused", fused)):
                    with record_function(f"compass.{name}"):
                        fn()
                        if cuda:
                            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    result = summarise(_events_by_path(prof))
    result.update(
        shape={"tokens": args.tokens, "d_model": args.d_model, "ffn": args.ffn, "experts": args.experts,
               "top_k": args.top_k, "dtype": args.dtype},
        device=args.device, threads=torch.get_num_threads(), glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
        iters=args.iters, max_rel_diff=err,
        profiled_wall_s=wall, flops_fwd=moe_layer_flops(cfg, args.tokens),
        dispatch_bytes=routing_bytes(args.tokens, args.d_model, args.top_k, x.element_size(),
                                     num_experts=args.experts),
        backend=__import__("compass_kernels").backend_info()["chosen"].get(f"grouped_gemm@{x.device.type}"),
    )
    if args.trace:
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(args.trace)
    return result


def report(res: dict) -> str:
    s = res["shape"]
    lines = [f"MoE layer forward, T={s['tokens']} d={s['d_model']} f={s['ffn']} E={s['experts']} "
             f"k={s['top_k']} {s['dtype']} on {res['device']} ({res['threads']} threads, "
             f"{res['iters']} iters, backend {res['backend']})",
             f"{'stage':12} {'naive ms':>10} {'share':>7} {'fused ms':>10} {'share':>7} {'naive/fused':>12}"]
    nv, fu = res["paths"]["naive"], res["paths"]["fused"]
    for st in (*STAGES, "other"):
        a, b = nv["stages"][st], fu["stages"][st]
        label = "unpermute*" if st == "unpermute" else st
        lines.append(f"{label:12} {a['ms']:10.2f} {a['share']:7.1%} {b['ms']:10.2f} {b['share']:7.1%} "
                     f"{a['ms'] / max(b['ms'], 1e-9):12.2f}")
    lines.append(f"{'total':12} {nv['total_ms']:10.2f} {'':7} {fu['total_ms']:10.2f} {'':7} "
                 f"{nv['total_ms'] / max(fu['total_ms'], 1e-9):12.2f}")
    f = res["findings"]
    lines += ["* unpermute = the combine: gate multiply + index_add_ (naive), ck.unpermute (fused)",
              f"naive: largest stage {f['naive_largest_stage']}, largest non-GEMM stage "
              f"{f['naive_largest_non_gemm_stage']}; combine {f['combine_share_naive']:.1%} of the layer",
              f"fused: combine {f['combine_share_fused']:.1%} of the layer, {f['combine_speedup']:.1f}x faster; "
              f"permute+combine {f['data_movement_ms']['naive']:.1f} -> {f['data_movement_ms']['fused']:.1f} ms "
              f"({f['data_movement_share']['naive']:.1%} -> {f['data_movement_share']['fused']:.1%} of the layer)",
              f"outputs agree to {res['max_rel_diff']:.1e} (max abs diff / max abs)"]
    if res["device"] == "cpu" and not res["glibc_tunables"]:
        lines.append("note: GLIBC_TUNABLES unset: buffers > 32 MiB pay page faults (see bench/run_cpu.sh)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=704, help="expert FFN width (Compass ratio f/d ~ 1.4, halved)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--trace", default="out/moe_trace.json", help="Chrome trace path ('' for none)")
    ap.add_argument("--json", default="out/moe_breakdown.json", help="summary path ('' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args)
    print(report(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
