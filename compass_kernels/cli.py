"""The kernels' command line, reached through ``compass info`` (what is built and chosen) and
``compass route-demo`` (``compass_model.cli``), or ``python -m compass_kernels.cli info|demo``.

The routing demo routes a Compass-v3 shaped batch
(16 experts, top-2) and a fine-grained one (128 experts, top-8) through route -> permute -> unpermute,
checks the result against the PyTorch reference, and times it against the Megatron-style path.
It first asks glibc to keep freed memory in the heap (``keep_freed_memory``, in this process;
``--system-malloc`` skips it). Settings that only exist at start-up, such as a trim threshold above
2 GiB, go through the environment: ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=N``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

import torch

import compass_kernels as ck


def demo(tokens: int, hidden: int, reps: int, malloc: str = "system") -> int:
    """Route, permute and unpermute two batch shapes; compare with the reference, time against the
    Megatron-style path; 1 on a mismatch. ``malloc``: what ``keep_freed_memory`` returned."""
    from compass_kernels.benchmarking.inputs import topk_ids
    from compass_kernels.benchmarking.models import routing_bytes
    from compass_kernels.benchmarking.peers import megatron_moe_routing
    from compass_kernels.benchmarking.timers import median_time

    info = ck.backend_info()
    print(f"compass-kernels {ck.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"malloc: {malloc} (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')})")
    print("backend for CPU tensors:", info["chosen"].get("permute@cpu"))
    print(f"{'shape':16} {'routing':8} {'compass ms':>10} {'megatron ms':>11} {'speed-up':>8} {'GB/s':>6}  check")
    ok = True
    for E, k in ((16, 2), (128, 8)):
        for kind in ("uniform", "skewed"):
            torch.manual_seed(0)
            x = torch.randn(tokens, hidden)
            ids = topk_ids(tokens, k, E, kind).contiguous()
            probs = torch.softmax(torch.randn(tokens, k), -1)

            def ours():
                plan = ck.route(ids, E)
                return ck.unpermute(ck.permute(x, plan), plan, probs)

            out = ours()
            with ck.use_backend("torch"):
                ref = ours()
            good = torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
            ok &= good
            t_ours = median_time(ours, reps)
            t_meg = median_time(lambda: megatron_moe_routing(x, ids, probs, E), reps)
            gbps = routing_bytes(tokens, hidden, k, x.element_size(), num_experts=E) / t_ours / 1e9
            print(f"E={E:<3} k={k:<9} {kind:8} {t_ours * 1e3:10.2f} {t_meg * 1e3:11.2f} {t_meg / t_ours:8.2f} "
                  f"{gbps:6.2f}  {'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1


# glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh pages and unmaps
# them on free: each new [8192, 2048] fp32 output then costs ~35 ms of page faults here, 6x the
# permute kernel. jemalloc and tcmalloc keep freed memory instead; keep_freed_memory() asks glibc
# for the same in this process, so the demo's kernels and its peers are timed alike.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4     # mallopt parameters (malloc.h)
_TRIM_THRESHOLD = 2**31 - 1                 # mallopt takes a C int: 2 GiB


def keep_freed_memory() -> str:
    """Make glibc keep freed memory in the heap for the rest of this process (``mallopt``: no mmap
    for large blocks, no trimming below 2 GiB). The environment's ``GLIBC_TUNABLES`` wins when set
    (``glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736`` is what ``bench/run_cpu.sh``
    uses; a larger trim threshold than 2 GiB can only be set that way, at start-up). Returns what
    holds: ``"GLIBC_TUNABLES"``, ``"mallopt"`` or ``"system"`` (not glibc, or mallopt refused)."""
    if os.environ.get("GLIBC_TUNABLES"):
        return "GLIBC_TUNABLES"
    if sys.platform != "linux" or not hasattr(os, "confstr"):
        return "system"
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return "system"
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    except (OSError, ValueError, AttributeError):
        return "system"
    return "mallopt" if ok else "system"


def main(argv: list[str] | None = None) -> int:
    """``python -m compass_kernels.cli info|demo``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="compass", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print backend_info() as JSON")
    d = sub.add_parser("demo", help="route a Compass-shaped batch and compare with the Megatron-style path")
    d.add_argument("--tokens", type=int, default=8192)
    d.add_argument("--hidden", type=int, default=2048)
    d.add_argument("--reps", type=int, default=5)
    d.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default malloc settings (fresh pages for every large tensor)")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        print(json.dumps(ck.backend_info(), indent=1))
        return 0
    malloc = "system" if args.system_malloc else keep_freed_memory()
    return demo(args.tokens, args.hidden, args.reps, malloc)


if __name__ == "__main__":
    sys.exit(main())
