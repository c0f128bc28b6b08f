"""GPU timings, one row per line as each is measured: grouped GEMM, FP8, routing, against peers.

    python bench/gpu_bench.py [--json rows.jsonl] [--only gemm,fp8,routing,moe] [--dry-run]

Timing (compass_kernels.benchmarking.timers.DeviceTimer): ``ms`` is device time without host
overhead: ``--calls`` back-to-back calls captured in one CUDA graph and replayed between an event
pair (back-to-back eager calls between an event pair when capture fails; ``how`` says which), the
median of ``--reps`` replays divided by the calls. Inputs, peers, bytes and FLOPs also come from
compass_kernels.benchmarking.
``eager_ms`` beside it is the wall time per eager call (host overhead included). Kernel outputs are
not poisoned here (COMPASS_POISON=0). Clocks, power and temperature are printed at start and end.

Rows (H200 targets, measured only there: bf16 >= 700 TFLOP/s at the Compass shape and >= 1.0x
torch._grouped_mm everywhere; FP8 >= 1.6x bf16; permute / unpermute >= 0.8 of the measured copy):
  gemm     bf16 grouped GEMM forward, dgrad and wgrad at Compass (E=16, 16384 x 2048 x 1408), its
           transpose (16384 x 1408 x 2048) and fine-grained (E=128, 16384 x 1024 x 256), uniform and
           skewed groups; every GPU backend (and each forced CUTLASS tile) against a loop of torch.mm,
           torch._grouped_mm and one dense GEMM of the same FLOPs: % of dense, % of 989 TFLOP/s
  fp8      grouped_gemm_fp8 with row and with block (1x128 / 128x128) scales against
           torch._scaled_grouped_mm (row scales) and the bf16 grouped GEMM
  routing  permute and unpermute alone in GB/s against a measured copy_ of the same bytes and the
           4.8 TB/s peak, the eager torch path as peer; route + permute + unpermute against the
           Megatron-style path
  moe      the expert-aware FP8 MoE layer against the bf16 one
``--dry-run`` runs every row on CPU at tiny shapes (the kit's dry run): the numbers mean nothing.
A row that fails prints ``FAIL`` with the reason and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ["COMPASS_POISON"] = "0"  # timing, not testing: no NaN fill of every output

import torch  # noqa: E402

import compass_kernels as ck  # noqa: E402
from compass_kernels import _backend  # noqa: E402
from compass_kernels.benchmarking.inputs import group_sizes, offsets_of, topk_ids  # noqa: E402
from compass_kernels.benchmarking.models import H200_BF16_TFLOPS, H200_HBM_TBPS, copy_bytes, gemm_flops  # noqa: E402
from compass_kernels.benchmarking.models import permute_bytes, unpermute_bytes  # noqa: E402
from compass_kernels.benchmarking.peers import megatron_moe_routing  # noqa: E402
from compass_kernels.benchmarking.timers import DeviceTimer  # noqa: E402

PEAK_BF16_TFLOPS = H200_BF16_TFLOPS
PEAK_HBM_TBPS = H200_HBM_TBPS


class Table:
    """Prints each row as one flushed line when it is produced (and appends it to a JSON-lines
    file), so a run cut short keeps every row measured before."""

    def __init__(self, out=None, jsonl: str | None = None):
        self.out, self.jsonl, self.rows = out or sys.stdout, jsonl, []

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        self.out.write(text + "\n")
        self.out.flush()
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")

    def section(self, name: str, fn, *args) -> None:
        try:
            fn(self, *args)
        except Exception as e:  # one broken section must not cost the others
            self.emit({"section": name, "name": "FAIL", "why": f"{type(e).__name__}: {str(e)[:300]}"})


def gpu_state() -> dict:
    """SM / memory clocks, power and temperature from nvidia-smi (empty if it is missing)."""
    q = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(zip(q.split(","), out[0].split(", "))) if out else {}


# ---------------------------------------------------------------------------------------------
# inputs


def kinds(scale: int) -> tuple[str, ...]:
    """Group-size patterns: both on a GPU; the dry run (interpreter, scale > 1) exercises one."""
    return ("uniform", "skewed") if scale == 1 else ("skewed",)


def gpu_backends(op: str, device: str) -> list[str]:
    return [b for b in ("cuda", "triton") if _backend.backend_status(b, device)[0]
            and b in _backend._registry.impls.get(op, ())] or ["torch"]


# ---------------------------------------------------------------------------------------------
# sections


def gemm_section(table: Table, timer: DeviceTimer, device: str, scale: int):
    shapes = {"compass": (16, 16384, 2048, 1408), "compass_T": (16, 16384, 1408, 2048),
              "fine": (128, 16384, 1024, 256)}
    for name, (E, M, K, N) in shapes.items():
        M, K, N = M // scale, K // scale, N // scale
        for kind in kinds(scale):
            sizes = group_sizes(M, E, kind)
            off = offsets_of(sizes, device)
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            w = torch.randn(E, K, N, device=device, dtype=torch.bfloat16) / K**0.5
            dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
            flops = gemm_flops(M, K, N)
            dense = timer(lambda: x @ w[0])["ms"]
            bounds = [int(b) for b in off.tolist()]  # host copy for the loop peer, outside timing
            tag = dict(section="gemm", shape=f"{name} E{E} {M}x{K}x{N}", groups=kind)
            passes = {
                "fwd": (lambda: ck.grouped_gemm(x, w, off),
                        lambda: torch._grouped_mm(x, w, offs=off[1:].int()),
                        lambda: [x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(E)]),
                "dgrad": (lambda: ck.grouped_gemm(dy, w, off, trans_b=True),
                          lambda: torch._grouped_mm(dy, w.transpose(1, 2), offs=off[1:].int()),
                          lambda: [dy[bounds[e]:bounds[e + 1]] @ w[e].t() for e in range(E)]),
                "wgrad": (lambda: torch.ops.compass.grouped_gemm_wgrad(x, dy, off, E, False),
                          lambda: torch._grouped_mm(x.t(), dy, offs=off[1:].int()),
                          lambda: [x[bounds[e]:bounds[e + 1]].t() @ dy[bounds[e]:bounds[e + 1]] for e in range(E)]),
            }
            for pname, (ours, grouped_mm, loop) in passes.items():
                peers = {}
                for peer, fn in (("torch._grouped_mm", grouped_mm), ("torch.mm loop", loop)):
                    try:
                        peers[peer] = timer(fn)
                    except Exception as e:
                        table.emit({**tag, "pass": pname, "impl": peer, "FAIL": f"{type(e).__name__}: {str(e)[:160]}"})
                for b in gpu_backends("grouped_gemm", device):
                    with ck.use_backend(b):
                        t = timer(ours)
                    row = {**tag, "pass": pname, "impl": b, **t, "tflops": flops / t["ms"] / 1e9,
                           "pct_dense": 100 * dense / t["ms"],
                           "pct_peak": 100 * flops / t["ms"] / 1e9 / PEAK_BF16_TFLOPS}
                    for peer, pt in peers.items():
                        row[f"x_{peer.split()[0]}"] = pt["ms"] / t["ms"]
                    table.emit(row)
                for peer, pt in peers.items():
                    table.emit({**tag, "pass": pname, "impl": peer, **pt, "tflops": flops / pt["ms"] / 1e9,
                                "pct_dense": 100 * dense / pt["ms"]})
            table.emit({**tag, "pass": "dense", "impl": f"x @ w[0] ({M}x{K}x{N})", "ms": dense,
                        "tflops": flops / dense / 1e9})
            if device == "cuda" and "cuda" in gpu_backends("grouped_gemm", device):
                tile_rows(table, timer, tag, x, w, off, flops)


def tile_rows(table, timer, tag, x, w, off, flops):
    """Each compiled CUTLASS forward tile (COMPASS_GEMM_TILE) beside the wave model's choice."""
    from compass_kernels import _ext

    M, N, E = x.shape[0], w.shape[2], w.shape[0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    chosen = _ext.cpu_module.gemm_forward_tile(M, N, E, sms) if _ext.cpu_module is not None else "?"
    with ck.use_backend("cuda"):
        for tile in ("128x128", "128x256"):
            os.environ["COMPASS_GEMM_TILE"] = tile
            try:
                t = timer(lambda: ck.grouped_gemm(x, w, off))
            finally:
                os.environ.pop("COMPASS_GEMM_TILE", None)
            table.emit({**tag, "pass": "fwd", "impl": f"cuda tile {tile}", "chosen": tile == chosen, **t,
                        "tflops": flops / t["ms"] / 1e9})


def fp8_section(table: Table, timer: DeviceTimer, device: str, scale: int):
    E, M, K, N = 16, 16384 // scale, 2048 // scale, 1408 // scale
    bs = 128 // scale
    for kind in kinds(scale):
        off = offsets_of(group_sizes(M, E, kind), device)
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device=device, dtype=torch.bfloat16) / K**0.5
        flops = gemm_flops(M, K, N)
        bf16 = timer(lambda: ck.grouped_gemm(x, w, off, trans_b=True))["ms"]
        tag = dict(section="fp8", shape=f"compass E{E} {M}x{K}x{N}", groups=kind)
        table.emit({**tag, "impl": "bf16 grouped_gemm", "ms": bf16, "tflops": flops / bf16 / 1e9})
        for xg, wg in (("row", "row"), ("block", "block2d")):
            qx = ck.quantize_fp8(x, granularity=xg, block_size=bs)
            qw = ck.quantize_fp8(w, granularity=wg, block_size=bs)
            t = timer(lambda: ck.grouped_gemm_fp8(qx, qw, off))
            quant = timer(lambda: ck.quantize_fp8(x, granularity=xg, block_size=bs))["ms"]
            table.emit({**tag, "impl": f"grouped_gemm_fp8 {xg}/{wg}", **t, "tflops": flops / t["ms"] / 1e9,
                        "x_bf16": bf16 / t["ms"], "x_bf16_with_act_quant": bf16 / (t["ms"] + quant)})
        try:  # torch's peer: row-wise scales, w column-major [E, K, N]
            qx, qw = ck.quantize_fp8(x, granularity="row"), ck.quantize_fp8(w, granularity="row")
            wt = qw.data.transpose(1, 2)
            t = timer(lambda: torch._scaled_grouped_mm(qx.data, wt, qx.scale, qw.scale, offs=off[1:].int(),
                                                       out_dtype=torch.bfloat16))
            table.emit({**tag, "impl": "torch._scaled_grouped_mm row/row", **t, "tflops": flops / t["ms"] / 1e9,
                        "x_bf16": bf16 / t["ms"]})
        except Exception as e:
            table.emit({**tag, "impl": "torch._scaled_grouped_mm", "FAIL": f"{type(e).__name__}: {str(e)[:160]}"})


def routing_section(table: Table, timer: DeviceTimer, device: str, scale: int):
    T, H = 16384 // scale, 4096 // scale
    for E, k in ((16, 2), (128, 8)):
        for kind in kinds(scale):
            x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
            ids = topk_ids(T, k, E, kind, device=device).contiguous()
            probs = torch.softmax(torch.randn(T, k, device=device), -1)
            plan = ck.route(ids, E)
            xp = ck.permute(x, plan)
            n = (T + T * k) * H  # the bf16 activations permute / unpermute read and write, as bytes
            src = torch.empty(n, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            moved = copy_bytes(n, 1)
            copy = timer(lambda: dst.copy_(src))["ms"]
            tag = dict(section="routing", shape=f"T{T} H{H} E{E} k{k}", groups=kind)
            table.emit({**tag, "impl": "copy_ (same bytes)", "ms": copy, "GBps": moved / copy / 1e6,
                        "pct_peak": 100 * moved / copy / 1e9 / PEAK_HBM_TBPS})
            ops = {"permute": (lambda: ck.permute(x, plan), permute_bytes(T, H, k, x.element_size())),
                   "unpermute": (lambda: ck.unpermute(xp, plan, probs), unpermute_bytes(T, H, k, x.element_size()))}
            for op, (fn, nbytes) in ops.items():
                for b in gpu_backends(op, device) + ["torch"]:
                    with ck.use_backend(b):
                        t = timer(fn)
                    table.emit({**tag, "op": op, "impl": b, **t, "GBps": nbytes / t["ms"] / 1e6,
                                "of_copy": (nbytes / t["ms"]) / (moved / copy),
                                "pct_peak": 100 * nbytes / t["ms"] / 1e9 / PEAK_HBM_TBPS})
            meg = timer(lambda: megatron_moe_routing(x, ids, probs, E))
            table.emit({**tag, "op": "route+permute+unpermute", "impl": "megatron-style", **meg})

            def full():
                p = ck.route(ids, E)
                return ck.unpermute(ck.permute(x, p), p, probs)
            for b in gpu_backends("route", device):
                with ck.use_backend(b):
                    t = timer(full)
                table.emit({**tag, "op": "route+permute+unpermute", "impl": b, **t,
                            "x_megatron": meg["ms"] / t["ms"]})


def moe_section(table: Table, timer: DeviceTimer, device: str, scale: int):
    import copy

    from compass_model import CompassConfig, CompassForCausalLM
    from compass_model.quant import quantize_model
    from compass_model.quant_metrics import time_moe_layers

    E, M, K, N = 16, 16384 // scale, 2048 // scale, 1408 // scale
    cfg = CompassConfig(vocab_size=256, d_model=K, n_layers=1, n_heads=16, n_kv_heads=4, num_experts=E, top_k=2,
                        expert_ffn_dim=N, max_seq_len=64, dtype="bfloat16")
    model = CompassForCausalLM(cfg).to(device).eval()
    q = quantize_model(copy.deepcopy(model), None, method="expert_aware", smooth_alpha=None)
    t = time_moe_layers(model.moe_layers()[0], q.moe_layers()[0], num_tokens=M, iters=3 if scale > 1 else 10)
    table.emit({"section": "moe", "shape": f"T={M} d={K} f={N} E={E} k=2", "impl": "fp8 expert-aware layer",
                "bf16_ms": t["fp_ms"], "fp8_ms": t["fp8_ms"], "x_bf16": t["speedup"]})


SECTIONS = {"gemm": gemm_section, "fp8": fp8_section, "routing": routing_section, "moe": moe_section}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="append every row to this JSON-lines file as it is measured")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: exercises every row")
    ap.add_argument("--calls", type=int, default=10, help="calls per timed graph / event pair")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    if args.dry_run:
        device, scale, timer = "cpu", 64, DeviceTimer("cpu", calls=1, reps=1)
    elif not torch.cuda.is_available():
        print("FAIL gpu_bench: no CUDA device (use --dry-run on CPU)", flush=True)
        return 1
    else:
        device, scale, timer = "cuda", 1, DeviceTimer("cuda", args.calls, args.reps)
    table = Table(jsonl=args.json)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    table.emit({"section": "start", "device": name, "torch": torch.__version__, **gpu_state()})
    for sec in args.only.split(","):
        table.section(sec, SECTIONS[sec], timer, device, scale)
    table.emit({"section": "end", **gpu_state()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
