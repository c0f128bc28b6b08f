"""GPU timings in one table: routing, grouped GEMM and FP8, every GPU backend against the peers.

    python bench/gpu_bench.py [--json out.json]

Routing: route + permute + unpermute (bf16, T=16384, H=4096) vs the Megatron-style path, with the
device-to-device copy of the same bytes as the ceiling. Grouped GEMM (bf16): ours vs
torch._grouped_mm, a loop of torch.mm, and one dense GEMM with the same FLOPs (efficiency).
The cuda backend's two forward tiles are also timed one by one (COMPASS_GEMM_TILE), with the one
the wave model picks marked. FP8: grouped_gemm_fp8 (row scales) vs the bf16 grouped GEMM on the Compass up-projection shape, and
the expert-aware FP8 MoE layer vs the bf16 one (``quant_metrics.time_moe_layers``: the paper's ~2x).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from peers import megatron_moe_routing  # noqa: E402

import compass_kernels as ck  # noqa: E402
from compass_kernels import _backend  # noqa: E402


def bench_ms(fn, reps: int = 20) -> float:
    """Median of CUDA-event timings after warm-up (L2 not flushed: these ops stream > L2 anyway)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _ids(T, E, k, kind):
    if kind == "uniform":
        return torch.rand(T, E, device="cuda").argsort(1)[:, :k].contiguous()
    w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64, device="cuda") ** 1.5
    return torch.multinomial(w.expand(T, E), k)


def routing_rows(backends):
    rows, T, H = [], 16384, 4096
    for E, k in ((16, 2), (128, 8)):
        for kind in ("uniform", "skewed"):
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            ids, probs = _ids(T, E, k, kind), torch.softmax(torch.randn(T, k, device="cuda"), -1)
            nbytes = 2 * (T + T * k) * H * 2
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")  # a copy reads and writes
            dst = torch.empty_like(src)
            ceil_ms = bench_ms(lambda: dst.copy_(src))
            meg = bench_ms(lambda: megatron_moe_routing(x, ids, probs, E))
            for b in backends:
                def ours():
                    plan = ck.route(ids, E)
                    return ck.unpermute(ck.permute(x, plan), plan, probs)
                with ck.use_backend(b):
                    ms = bench_ms(ours)
                rows.append(dict(op="routing", shape=f"E{E}k{k}", kind=kind, backend=b, ms=ms,
                                 tbps=nbytes / ms / 1e9, vs_megatron=meg / ms, of_copy=ceil_ms / ms))
    return rows


def gemm_rows(backends):
    rows = []
    shapes = {"compass_up": (16, 16384, 2048, 1408), "compass_down": (16, 16384, 1408, 2048),
              "fine": (128, 16384, 1024, 256), "te_8x4096": (8, 32768, 2048, 768)}
    for name, (E, M, K, N) in shapes.items():
        for kind in ("uniform", "skewed"):
            if kind == "uniform":
                sizes = torch.full((E,), M // E)
            else:
                w_ = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.5
                sizes = (w_ / w_.sum() * M).floor().long()
            sizes[0] += M - sizes.sum()
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).cuda()
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(E, K, N, device="cuda", dtype=torch.bfloat16) / K**0.5
            flops = 2 * M * K * N
            dense = bench_ms(lambda: x @ w[0])
            peer = bench_ms(lambda: torch._grouped_mm(x, w, offs=offsets[1:].int()))
            for b in backends:
                with ck.use_backend(b):
                    ms = bench_ms(lambda: ck.grouped_gemm(x, w, offsets))
                rows.append(dict(op="grouped_gemm", shape=name, kind=kind, backend=b, ms=ms,
                                 tflops=flops / ms / 1e9, efficiency=dense / ms, vs_grouped_mm=peer / ms))
            if "cuda" in backends:
                rows += tile_rows(name, kind, x, w, offsets, flops)
            rows.append(dict(op="grouped_gemm", shape=name, kind=kind, backend="torch._grouped_mm", ms=peer,
                             tflops=flops / peer / 1e9, efficiency=dense / peer))
    return rows


def tile_rows(name, kind, x, w, offsets, flops):
    """Each compiled forward tile of the cuda backend, forced with COMPASS_GEMM_TILE, next to the
    one the wave model (csrc/common/gemm_tiles.h) picks: the data to check or retune the model."""
    from compass_kernels import _ext

    M, N, E = x.shape[0], w.shape[2], w.shape[0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    os.environ.pop("COMPASS_GEMM_TILE", None)
    chosen = _ext.cpu_module.gemm_forward_tile(M, N, E, sms) if _ext.cpu_module is not None else "?"
    rows = []
    with ck.use_backend("cuda"):
        for tile in ("128x128", "128x256"):
            os.environ["COMPASS_GEMM_TILE"] = tile
            try:
                ms = bench_ms(lambda: ck.grouped_gemm(x, w, offsets))
            finally:
                os.environ.pop("COMPASS_GEMM_TILE", None)
            rows.append(dict(op="grouped_gemm_tile", shape=name, kind=kind, tile=tile, chosen=tile == chosen, ms=ms,
                             tflops=flops / ms / 1e9))
    return rows


def fp8_rows(device: str = "cuda", scale: int = 1):
    """``scale`` > 1 shrinks the shapes (a CPU smoke run of this function)."""
    import copy

    from compass_model import CompassConfig, CompassForCausalLM
    from compass_model.quant import quantize_model
    from compass_model.quant_metrics import time_moe_layers

    rows = []
    E, M, K, N = 16, 16384 // scale, 2048 // scale, 1408 // scale
    sizes = torch.full((E,), M // E)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).to(device)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device=device, dtype=torch.bfloat16) / K**0.5
    qx, qw = ck.quantize_fp8(x, granularity="row"), ck.quantize_fp8(w, granularity="row")
    bf16 = bench_ms(lambda: ck.grouped_gemm(x, w, offsets, trans_b=True))
    fp8 = bench_ms(lambda: ck.grouped_gemm_fp8(qx, qw, offsets))
    quant = bench_ms(lambda: ck.quantize_fp8(x, granularity="row"))
    flops = 2 * M * K * N
    rows.append(dict(op="grouped_gemm_fp8", shape="compass_up", ms=fp8, tflops=flops / fp8 / 1e9,
                     vs_bf16=bf16 / fp8, with_act_quant_vs_bf16=bf16 / (fp8 + quant)))
    cfg = CompassConfig(vocab_size=256, d_model=K, n_layers=1, n_heads=16, n_kv_heads=4, num_experts=E, top_k=2,
                        expert_ffn_dim=N, max_seq_len=64, dtype="bfloat16")
    model = CompassForCausalLM(cfg).to(device).eval()
    q = quantize_model(copy.deepcopy(model), None, method="expert_aware", smooth_alpha=None)
    t = time_moe_layers(model.moe_layers()[0], q.moe_layers()[0], num_tokens=M, iters=10)
    rows.append(dict(op="moe_layer_fp8", shape=f"T={M} d={K} f={N} E={E} k=2", fp_ms=t["fp_ms"],
                     fp8_ms=t["fp8_ms"], speedup=t["speedup"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print(json.dumps(ck.backend_info()["built"], indent=None))
    gpu = [b for b in ("cuda", "triton") if _backend.backend_status(b, "cuda")[0]]
    rows = routing_rows(gpu) + gemm_rows([b for b in gpu if b in _backend._registry.impls["grouped_gemm"]])
    rows += fp8_rows()
    for r in rows:
        extra = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
        print(extra)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
