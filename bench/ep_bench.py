"""Data x expert parallelism: step time, memory and all-to-all bytes of the tiny model measured
here, and the analytic all-to-all volume of the compass-v3 preset (or compass-v3-top4) at EP 8.

  python bench/ep_bench.py [--steps 30] [--layouts 1,ep2,dp2xep2] [--preset compass-v3-top4] [--out out/ep_bench.json]

Measured: ``compass train`` (one process) and ``torchrun ... --dp N --ep M`` (gloo), the same
global batch, median seconds per optimizer step over the steps after the first 5, peak RSS per
rank, and the bytes every ``all_to_all_single`` sent off its rank (counted in the run) against the
communication model (``CompassConfig.all_to_all_bytes_per_token``, uniform routing). On a 2-core
CPU, N processes share 2 cores: this measures the layouts' overhead (all-to-alls, FSDP gathers,
host syncs, checkpoint gathers), not a speed-up.

Analytic (``CompassConfig.all_to_all_bytes_per_token``): bytes per token per training step over the
dispatch and combine all-to-alls of every MoE layer, uniform routing, bf16 (and FP8 dispatch), and
the time they take at NVLink vs inter-node bandwidth next to the token's compute time at a stated
MFU. The bandwidths and peak are assumptions (H200 SXM: NVLink 4 ~450 GB/s per direction, 400 Gb/s
NIC = 50 GB/s per GPU, 989 dense bf16 TFLOP/s: compass_kernels.benchmarking.models), not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's compass_model, not an installed one
from compass_kernels.benchmarking.models import H200_BF16_TFLOPS, NIC_GBPS, NVLINK_GBPS  # noqa: E402
from compass_model import CompassConfig  # noqa: E402

PEAK_TFLOPS, MFU = H200_BF16_TFLOPS, 0.4


def analytic(ep: int = 8, seq_len: int = 4096, preset: str = "compass-v3") -> dict:
    c = CompassConfig.from_preset(preset)
    flops = c.flops_per_token(seq_len=seq_len)
    t_compute = flops / (PEAK_TFLOPS * 1e12 * MFU)
    rows = {}
    for name, b in (("bf16", 2), ("fp8_dispatch", None)):
        if b is None:   # FP8 dispatch (DeepSeek-V3): the forward dispatch (1/4 of the traffic) at 1 byte
            full = c.all_to_all_bytes_per_token(ep, bytes_per_elem=2)
            per = 0.75 * full + 0.25 * full / 2
        else:
            per = c.all_to_all_bytes_per_token(ep, bytes_per_elem=b)
        rows[name] = {"bytes_per_token": per, "nvlink_us": per / (NVLINK_GBPS * 1e9) * 1e6,
                      "network_us": per / (NIC_GBPS * 1e9) * 1e6}
    return {"preset": preset, "ep": ep, "moe_layers": c.n_moe_layers, "d_model": c.d_model, "top_k": c.top_k,
            "train_flops_per_token": flops, "compute_us_per_token": t_compute * 1e6,
            "assumptions": {"nvlink_GBps": NVLINK_GBPS, "nic_GBps": NIC_GBPS, "peak_TFLOPs": PEAK_TFLOPS, "mfu": MFU},
            **rows}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAYOUTS = {"1": (1, 1), "ep2": (1, 2), "ep4": (1, 4), "dp2xep2": (2, 2)}


def worker(argv: list[str]) -> int:
    """One training process (a torchrun rank or the single process): ``compass train`` with every
    ``all_to_all_single`` counted (bytes this rank sends to other ranks, token rows apart from the
    int64 count exchanges) and the peak RSS, written to ``$EP_BENCH_STATS.<rank>.json`` at exit."""
    import resource

    import torch
    import torch.distributed as dist

    from compass_model import cli
    from compass_model.train import parallel

    sent = {"rows": 0, "counts": 0}
    a2a = dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        me, n = dist.get_rank(group), dist.get_world_size(group)
        splits = input_split_sizes or [input.shape[0] // n] * n
        row = input[0].numel() * input.element_size() if input.shape[0] else 0
        kind = "counts" if input.dtype == torch.int64 else "rows"
        per_row = row if input.dim() > 1 else input.element_size()
        sent[kind] += sum(s for r, s in enumerate(splits) if r != me) * per_row
        return a2a(output, input, output_split_sizes, input_split_sizes, group, async_op)

    dist.all_to_all_single = counted
    leave = parallel.exit_ep

    def record(ctx):
        rank = 0 if ctx is None else ctx.rank
        stats = {"rank": rank, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **sent}
        Path(f"{os.environ['EP_BENCH_STATS']}.{rank}.json").write_text(json.dumps(stats))
        leave(ctx)

    parallel.exit_ep = record
    cli.exit_ep = record
    rc = cli.main(argv)
    record(None)
    return rc


def measured(layouts, steps: int) -> dict:
    """Median step time (steps after the first 5), peak RSS per rank and counted all-to-all bytes of
    the tiny model at each layout, the same global batch; N processes share this machine's cores,
    so this is the layouts' overhead, not a speed-up."""
    rows, seq, accum = 8, 128, 1
    cfg = {"model": {"preset": "tiny"},
           "stages": [{"name": "general", "steps": steps, "rows": rows, "seq_len": seq, "warmup_steps": 2,
                       "grad_accum": accum, "save_every": steps}]}
    c = CompassConfig.from_preset("tiny")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.json").write_text(json.dumps(cfg))
        for name in layouts:
            dp, ep = LAYOUTS[name]
            world = dp * ep
            args = ["train", "--config", f"{tmp}/c.json", "--stages", "general", "--no-eval", "--no-progress",
                    "--out", f"{tmp}/{name}"] + (["--dp", str(dp), "--ep", str(ep)] if world > 1 else [])
            me = [str(Path(__file__).resolve()), "--worker"]
            cmd = ([sys.executable, *me, *args] if world == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                    "--master-port", str(_port()), *me, *args])
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // world)), EP_BENCH_STATS=f"{tmp}/{name}-stats")
            subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=1800)
            rec = [json.loads(x) for x in Path(f"{tmp}/{name}/metrics.jsonl").read_text().splitlines()]
            ranks = [json.loads(Path(f"{tmp}/{name}-stats.{r}.json").read_text()) for r in range(world)]
            sec = [r["seconds"] for r in rec[5:]]
            tokens = steps * rows * seq * accum                    # trunk tokens; MTP sees seq - 1 of each row
            mtp_tokens = steps * rows * (seq - 1) * accum * c.mtp_depth
            model = (c.all_to_all_bytes_per_token(ep) * tokens
                     + c.all_to_all_bytes_per_token(ep) / c.n_moe_layers * mtp_tokens)
            counted = sum(r["rows"] for r in ranks)
            out[name] = {"dp": dp, "ep": ep, "median_step_s": statistics.median(sec), "loss_last": rec[-1]["loss"],
                         "peak_rss_mib_per_rank": [round(r["peak_rss_mib"], 1) for r in ranks],
                         "a2a_counted_bytes": counted, "a2a_count_exchange_bytes": sum(r["counts"] for r in ranks),
                         "a2a_model_bytes": model, "a2a_counted_vs_model": counted / model if model else None}
    base = out[next(iter(out))]["median_step_s"]
    for v in out.values():
        v["vs_first"] = v["median_step_s"] / base
    return out


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--layouts", default="1,ep2,dp2xep2", help=f"comma-separated, from {sorted(LAYOUTS)}")
    ap.add_argument("--out", default="out/ep_bench.json")
    ap.add_argument("--preset", default="compass-v3", choices=["compass-v3", "compass-v3-top4"],
                    help="the model whose all-to-all volume is estimated (default: compass-v3, top-2)")
    a = ap.parse_args()
    res = {"analytic": analytic(preset=a.preset), "measured": measured(a.layouts.split(","), a.steps)}
    an = res["analytic"]
    print(f"{an['preset']}, EP {an['ep']}, {an['moe_layers']} MoE layers, d {an['d_model']}, top-{an['top_k']}: "
          f"compute {an['compute_us_per_token']:.0f} us/token at {MFU:.0%} MFU")
    for k in ("bf16", "fp8_dispatch"):
        r = an[k]
        print(f"  {k:13} {r['bytes_per_token'] / 2**20:.2f} MiB/token/step  NVLink {r['nvlink_us']:.1f} us "
              f"({r['nvlink_us'] / an['compute_us_per_token']:.1%})  network {r['network_us']:.0f} us "
              f"({r['network_us'] / an['compute_us_per_token']:.1%})")
    print(f"tiny model, this machine ({os.cpu_count()} CPUs, gloo; overhead of the layouts, not speed-up):")
    for name, r in res["measured"].items():
        ratio = "" if r["a2a_counted_vs_model"] is None else (
            f", all-to-all rows {r['a2a_counted_bytes'] / 2**20:.2f} MiB counted vs "
            f"{r['a2a_model_bytes'] / 2**20:.2f} MiB modelled ({r['a2a_counted_vs_model']:.3f}x)")
        print(f"  {name:8} {r['median_step_s'] * 1e3:.1f} ms/step ({r['vs_first']:.2f}x), peak RSS per rank "
              f"{r['peak_rss_mib_per_rank']} MiB{ratio}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
