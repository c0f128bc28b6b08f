"""Expert parallelism: measured step time of the tiny model at EP 1/2/4 on this machine, and the
analytic all-to-all volume of the compass-v3 preset (or compass-v3-top4) at EP 8.

  python bench/ep_bench.py [--steps 30] [--eps 1,2,4] [--preset compass-v3-top4] [--out out/ep_bench.json]

Measured: ``compass train`` (one process) and ``torchrun --nproc-per-node N ... --ep N`` (gloo),
the same global batch, median seconds per optimizer step over the steps after the first 5. On a
2-core CPU, N processes share 2 cores: this measures EP's overhead (all-to-alls, host syncs,
gathers for checkpoints), not a speed-up.

Analytic (``CompassConfig.all_to_all_bytes_per_token``): bytes per token per training step over the
dispatch and combine all-to-alls of every MoE layer, uniform routing, bf16 (and FP8 dispatch), and
the time they take at NVLink vs inter-node bandwidth next to the token's compute time at a stated
MFU. The bandwidths and peak are assumptions (H200 SXM: NVLink 4 ~450 GB/s per direction, 400 Gb/s
NIC = 50 GB/s per GPU, 989 dense bf16 TFLOP/s), not measurements.
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

from compass_model import CompassConfig

NVLINK_GBPS, NIC_GBPS, PEAK_TFLOPS, MFU = 450.0, 50.0, 989.0, 0.4


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


def measured(eps, steps: int) -> dict:
    cfg = {"model": {"preset": "tiny"},
           "stages": [{"name": "general", "steps": steps, "rows": 8, "seq_len": 128, "warmup_steps": 2,
                       "save_every": steps}]}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.json").write_text(json.dumps(cfg))
        for ep in eps:
            args = ["-m", "compass_model.cli", "train", "--config", f"{tmp}/c.json", "--stages", "general",
                    "--no-eval", "--no-progress", "--out", f"{tmp}/ep{ep}"]
            cmd = ([sys.executable, *args] if ep == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ep),
                    "--master-port", str(_port()), *args, "--ep", str(ep)])
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // ep)))
            subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=900)
            rec = [json.loads(x) for x in Path(f"{tmp}/ep{ep}/metrics.jsonl").read_text().splitlines()]
            sec = [r["seconds"] for r in rec[5:]]
            out[ep] = {"median_step_s": statistics.median(sec), "loss_last": rec[-1]["loss"]}
    base = out[min(out)]["median_step_s"]
    for v in out.values():
        v["vs_ep1"] = v["median_step_s"] / base
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eps", default="1,2,4")
    ap.add_argument("--out", default="out/ep_bench.json")
    ap.add_argument("--preset", default="compass-v3", choices=["compass-v3", "compass-v3-top4"],
                    help="the model whose all-to-all volume is estimated (default: compass-v3, top-2)")
    a = ap.parse_args()
    res = {"analytic": analytic(preset=a.preset), "measured": measured([int(x) for x in a.eps.split(",")], a.steps)}
    an = res["analytic"]
    print(f"{an['preset']}, EP {an['ep']}, {an['moe_layers']} MoE layers, d {an['d_model']}, top-{an['top_k']}: "
          f"compute {an['compute_us_per_token']:.0f} us/token at {MFU:.0%} MFU")
    for k in ("bf16", "fp8_dispatch"):
        r = an[k]
        print(f"  {k:13} {r['bytes_per_token'] / 2**20:.2f} MiB/token/step  NVLink {r['nvlink_us']:.1f} us "
              f"({r['nvlink_us'] / an['compute_us_per_token']:.1%})  network {r['network_us']:.0f} us "
              f"({r['network_us'] / an['compute_us_per_token']:.1%})")
    print("tiny model, this machine (gloo):")
    for ep, r in res["measured"].items():
        print(f"  EP {ep}: {r['median_step_s'] * 1e3:.1f} ms/step ({r['vs_ep1']:.2f}x EP 1)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
