"""Turn a pytest-benchmark JSON into the routing table, and check it against the baseline.

    python bench/report.py out/bench.json [--baseline bench/baseline_cpu.json] [--update-baseline]

--update-baseline merges: the ratios of the suites in this JSON are replaced, the rest are kept.

Reports median time, GB/s (bytes each case must move / median), GFLOP/s for GEMMs, grouped-GEMM
efficiency (dense time / grouped time), the speed-up of compass over the
Megatron-style path, and each op's fraction of the copy ceiling. Ratios, not times, are compared with
the baseline: the machines are shared and noisy, ratios measured in one run travel better.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: str) -> dict:
    rows = {}
    for b in json.loads(Path(path).read_text())["benchmarks"]:
        info = b["extra_info"]
        med = b["stats"]["median"]
        key = (info["pass_"], info["shape"], info["kind"], info["impl"])
        rows[key] = {"median_s": med, "gbps": info.get("bytes", 0) / med / 1e9,
                     "gflops": info.get("flops", 0) / med / 1e9}
    return rows


def ratios(rows: dict) -> dict:
    out = {}
    for (p, shape, kind, impl), r in rows.items():
        if p in ("fwd", "fwdbwd") and impl == "compass" and (p, shape, kind, "megatron") in rows:
            out[f"{p}/{shape}/{kind}/speedup_vs_megatron"] = rows[(p, shape, kind, "megatron")]["median_s"] / r["median_s"]
        if p == "gemm" and impl == "compass":
            for peer in ("dense", "mm_cat", "torch_grouped_mm"):
                if (p, shape, kind, peer) in rows:
                    name = "efficiency" if peer == "dense" else f"speedup_vs_{peer}"
                    out[f"gemm/{shape}/{kind}/{name}"] = rows[(p, shape, kind, peer)]["median_s"] / r["median_s"]
        if p in ("moe_fwd", "moe_fwdbwd") and impl == "compass" and (p, shape, kind, "naive") in rows:
            out[f"{p}/{shape}/{kind}/speedup_vs_naive"] = rows[(p, shape, kind, "naive")]["median_s"] / r["median_s"]
        if p == "quant" and impl == "compass":
            if (p, shape, kind, "eager") in rows:
                out[f"quant/{shape}/{kind}/speedup_vs_eager"] = rows[(p, shape, kind, "eager")]["median_s"] / r["median_s"]
            if (p, shape, "all", "copy") in rows:
                out[f"quant/{shape}/{kind}/fraction_of_copy"] = r["gbps"] / rows[(p, shape, "all", "copy")]["gbps"]
        if p == "quant" and impl == "compass_kernel" and (p, shape, "all", "copy") in rows:
            # like for like with the copy: preallocated outputs, no allocation or dispatch
            out[f"quant/{shape}/{kind}/kernel_fraction_of_copy"] = r["gbps"] / rows[(p, shape, "all", "copy")]["gbps"]
        if p == "ot" and impl == "compass":
            for peer in ("pot_loop", "pot_official", "pot_numpy", "pot_batch"):
                if (p, shape, kind, peer) in rows:
                    out[f"ot/{shape}/{kind}/speedup_vs_{peer}"] = rows[(p, shape, kind, peer)]["median_s"] / r["median_s"]
        if p == "op" and impl in ("permute", "unpermute") and (p, shape, kind, "copy") in rows:
            out[f"op/{shape}/{impl}/fraction_of_copy"] = r["gbps"] / rows[(p, shape, kind, "copy")]["gbps"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--baseline", default=str(Path(__file__).with_name("baseline_cpu.json")))
    ap.add_argument("--update-baseline", action="store_true")
    ap.add_argument("--slack", type=float, default=0.75, help="fail below slack * baseline ratio")
    args = ap.parse_args()
    rows = load(args.json)
    print(f"{'pass':7} {'shape':13} {'routing':8} {'impl':17} {'median ms':>10} {'GB/s':>7} {'GFLOP/s':>8}")
    for (p, shape, kind, impl), r in sorted(rows.items()):
        print(f"{p:7} {shape:13} {kind:8} {impl:17} {r['median_s'] * 1e3:10.2f} {r['gbps']:7.2f} {r['gflops']:8.1f}")
    rat = ratios(rows)
    print()
    for name, v in sorted(rat.items()):
        print(f"{name:48} {v:6.2f}")
    if args.update_baseline:  # the ratios this run measured replace theirs; the others stay
        old = json.loads(Path(args.baseline).read_text()) if Path(args.baseline).exists() else {}
        Path(args.baseline).write_text(json.dumps({**old, **rat}, indent=1, sort_keys=True) + "\n")
        print(f"baseline written: {args.baseline}")
        return 0
    if not Path(args.baseline).exists():
        return 0
    base = json.loads(Path(args.baseline).read_text())
    bad = [f"{k}: {rat[k]:.2f} < {args.slack} * {v:.2f}" for k, v in base.items() if k in rat and rat[k] < args.slack * v]
    for line in bad:
        print("REGRESSION", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
