"""The kernels' command line, reached through ``compass info`` (what is built and chosen) and
``compass route-demo`` (``compass_model.cli``), or ``python -m compass_kernels.cli info|demo``.

The routing demo routes a Compass-v3 shaped batch
(16 experts, top-2) and a fine-grained one (128 experts, top-8) through route -> permute -> unpermute,
checks the result against the PyTorch reference, and times it against the Megatron-style path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import compass_kernels as ck


def demo(tokens: int, hidden: int, reps: int) -> int:
    from compass_kernels.benchmarking.inputs import topk_ids
    from compass_kernels.benchmarking.models import routing_bytes
    from compass_kernels.benchmarking.peers import megatron_moe_routing
    from compass_kernels.benchmarking.timers import median_time

    info = ck.backend_info()
    print(f"compass-kernels {ck.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
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


# glibc maps allocations above 32 MiB fresh and unmaps them on free: each new [8192, 2048] fp32
# output then costs ~35 ms of page faults here, 6x the permute kernel. The demo keeps freed memory
# in the heap (as jemalloc/tcmalloc would) unless the user set GLIBC_TUNABLES; peers run alike.
_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def reexec_with_malloc_tunables(argv: list[str], module: str = "compass_kernels.cli") -> None:
    """Run ``python -m module argv`` again with the tunables, unless the user set GLIBC_TUNABLES."""
    if "GLIBC_TUNABLES" in os.environ or sys.platform != "linux":
        return
    env = dict(os.environ, GLIBC_TUNABLES=_MALLOC_TUNABLES)
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def main(argv: list[str] | None = None) -> int:
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
    if args.cmd == "demo" and not args.system_malloc:
        reexec_with_malloc_tunables(argv)
    if args.cmd == "info":
        print(json.dumps(ck.backend_info(), indent=1))
        return 0
    return demo(args.tokens, args.hidden, args.reps)


if __name__ == "__main__":
    sys.exit(main())
