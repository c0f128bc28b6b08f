"""Call every CUDA and Triton entry point once on edge shapes against the torch reference.

    python bench/gpu_smoke.py [--filter SUBSTRING]

Prints one line per check, ``PASS name``, ``FAIL name: why`` or ``SKIP name: why``, and never
aborts (a crash of one check is its FAIL line); exits 1 if any check failed. On a CUDA machine the
checks run on the GPU (CUDA kernels and compiled Triton). On a CPU machine the Triton checks run in
the interpreter (TRITON_INTERPRET=1, set here when no GPU is visible) on CPU tensors and the CUDA
checks are skipped. Shapes are small and awkward: H and K not multiples of 16, empty groups, head
and tail rows outside every group, ids of -1, capacity and alignment padding.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("COMPASS_POISON", "1")  # NaN-filled outputs: an unwritten row fails

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import compass_kernels as ck  # noqa: E402
from compass_kernels import _backend  # noqa: E402
from compass_kernels.benchmarking.inputs import topk_ids  # noqa: E402
from compass_kernels.fp8_ref import grouped_gemm_fp8_ref, quantize_fp8_ref  # noqa: E402
from compass_kernels.grouped_gemm_ref import grouped_gemm_ref, grouped_gemm_wgrad_ref  # noqa: E402
from compass_kernels.ot_ref import otpo_weights_ref, sinkhorn_ref  # noqa: E402
from compass_kernels.routing_ref import permute_ref, route_ref, unpermute_bwd_ref, unpermute_ref  # noqa: E402
from compass_kernels.sort_chunks import sort_chunks_ref  # noqa: E402
from fp8_bounds import calc_diff, fp8_accumulation_bound  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
COMPILED = DEV == "cuda"
# The interpreter's tl.dot gets bf16 wrong (its tests run fp16 there), and its fp32 -> 16-bit
# casts truncate instead of rounding: 16-bit GEMMs run fp16 there, and a 16-bit result that is
# bit-equal on a GPU is checked to one ulp.
GEMM16 = torch.bfloat16 if COMPILED else torch.float16
NAME16 = str(GEMM16).split(".")[1]


class Skip(Exception):
    pass


CHECKS: list[tuple[str, str, object]] = []


def check(name: str, backend: str):
    def deco(fn):
        CHECKS.append((f"{backend}:{name}", backend, fn))
        return fn
    return deco


def need(backend: str, op: str) -> None:
    ok, why = _backend.backend_status(backend, DEV)
    if not ok:
        raise Skip(why)
    if backend not in _backend._registry.impls.get(op, ()):
        raise Skip(f"{op} has no {backend} implementation here")


def equal(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    got, ref = got.cpu(), ref.cpu()
    if got.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}")
    if not torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
                       ref.view(torch.uint8) if ref.dtype.itemsize == 1 else ref):
        bad = (got.float() != ref.float()).nonzero()
        raise AssertionError(f"{what}: {len(bad)} elements differ, first at {bad[0].tolist() if len(bad) else '?'}")


def equal16(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Bit-equal when compiled; within one ulp of ref under the interpreter (truncating casts)."""
    if COMPILED or got.dtype.itemsize != 2:
        return equal(got, ref, what)
    ulp = torch.finfo(got.dtype).eps
    close(got, ref, what + " (interpreter: one ulp)", ulp, torch.finfo(got.dtype).tiny)


def close(got: torch.Tensor, ref: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    got, ref = got.cpu().double(), ref.cpu().double()
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: non-finite (unwritten?) elements")
    err = (got - ref).abs() - (atol + rtol * ref.abs())
    if (err > 0).any():
        raise AssertionError(f"{what}: max excess {err.max().item():.3e} over atol {atol} rtol {rtol}")


def ids_for(T: int, k: int, E: int, holes: bool, gen) -> torch.Tensor:
    """Distinct uniform experts per token, with ~20% of the slots -1 when ``holes``."""
    return topk_ids(T, k, E, "holes" if holes else "uniform", generator=gen, drop=0.2)


# ---------------------------------------------------------------------------------------------
# routing: route, permute, unpermute, unpermute_bwd


def _routing(backend, T=37, k=2, E=16, H=72, capacity=None, align=1, holes=True, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(T * 31 + E)
    ids = ids_for(T, k, E, holes, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    probs = torch.rand(T, k, generator=gen)
    row, tpe, off = route_ref(ids, E, capacity, align)
    with ck.use_backend(backend):
        plan = ck.route(ids.to(DEV), E, capacity=capacity, align=align)
    return ids, x, probs, plan, (row, tpe, off)


def routing_checks(backend: str):
    @check("route E16 holes capacity align", backend)
    def _():
        need(backend, "route")
        _, _, _, plan, (row, tpe, off) = _routing(backend, capacity=3, align=8)
        equal(plan.row_id_map, row, "row_id_map")
        equal(plan.tokens_per_expert, tpe, "tokens_per_expert")
        equal(plan.expert_offsets, off, "expert_offsets")

    @check("route E128 k8 int32 ids", backend)
    def _():
        need(backend, "route")
        gen = torch.Generator().manual_seed(5)
        ids = ids_for(300, 8, 128, True, gen).int()
        with ck.use_backend(backend):
            plan = ck.route(ids.to(DEV), 128, align=16)
        equal(plan.row_id_map, route_ref(ids, 128, None, 16)[0], "row_id_map")

    @check("route T=0", backend)
    def _():
        need(backend, "route")
        with ck.use_backend(backend):
            plan = ck.route(torch.empty(0, 2, dtype=torch.int64, device=DEV), 16)
        equal(plan.expert_offsets, torch.zeros(17, dtype=torch.int64), "expert_offsets")

    @check("permute bf16 H=72 padding rows", backend)
    def _():
        need(backend, "permute")
        _, x, _, plan, (row, _, _) = _routing(backend, capacity=3, align=8)
        with ck.use_backend(backend):
            xp = ck.permute(x.to(DEV), plan)
        equal(xp, permute_ref(x, row, plan.num_rows), "permuted rows")

    @check("permute fp8 bits", backend)
    def _():
        need(backend, "permute")
        _, x, _, plan, (row, _, _) = _routing(backend, dtype=torch.float32)
        x8 = x.to(torch.float8_e4m3fn)
        with ck.use_backend(backend):
            xp = ck.permute(x8.to(DEV), plan)
        equal(xp, permute_ref(x8, row, plan.num_rows), "permuted fp8 rows")

    for with_probs in (True, False):
        @check(f"unpermute bf16 {'probs' if with_probs else 'no probs'} bit-equal", backend)
        def _(with_probs=with_probs):
            need(backend, "unpermute")
            _, x, probs, plan, (row, _, _) = _routing(backend, align=8)
            y = permute_ref(x, row, plan.num_rows)
            p = probs if with_probs else None
            with ck.use_backend(backend):
                out = ck.unpermute(y.to(DEV), plan, None if p is None else p.to(DEV))
            equal16(out, unpermute_ref(y, row, p), "unpermuted rows (slot order, no FMA)")

    @check("unpermute fp32 k=8 E=128 bit-equal", backend)
    def _():
        need(backend, "unpermute")
        _, x, probs, plan, (row, _, _) = _routing(backend, T=50, k=8, E=128, H=33, dtype=torch.float32)
        y = permute_ref(x, row, plan.num_rows)
        with ck.use_backend(backend):
            out = ck.unpermute(y.to(DEV), plan, probs.to(DEV))
        equal(out, unpermute_ref(y, row, probs), "unpermuted rows")

    @check("unpermute_bwd bf16", backend)
    def _():
        need(backend, "unpermute_bwd")
        _, x, probs, plan, (row, _, _) = _routing(backend, align=8)
        y = permute_ref(x, row, plan.num_rows)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.dtype)
        with ck.use_backend(backend):
            gy, gp = torch.ops.compass.unpermute_bwd(g.to(DEV), y.to(DEV), plan.row_id_map, plan.expert_offsets,
                                                     plan.tokens_per_expert, probs.to(DEV))
        ry, rp = unpermute_bwd_ref(g, y, row, probs)
        equal16(gy, ry, "grad_y")
        close(gp, rp, "grad_probs", 1e-4, 1e-4)


# ---------------------------------------------------------------------------------------------
# sort_chunks, Sinkhorn, OTPO


def other_checks(backend: str):
    @check("sort_chunks bf16 uneven chunks", backend)
    def _():
        need(backend, "sort_chunks")
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(45, 40, generator=gen).bfloat16()
        sizes = torch.tensor([10, 0, 20, 5, 10])
        order = torch.tensor([4, 2, 0, 1, 3])
        with ck.use_backend(backend):
            out = ck.sort_chunks(x.to(DEV), sizes.to(DEV), order.to(DEV), num_rows=48)
        equal(out, sort_chunks_ref(x, sizes, order, 48), "sorted rows")

    @check("sinkhorn fp32 unbalanced", backend)
    def _():
        need(backend, "sinkhorn")
        gen = torch.Generator().manual_seed(8)
        cost = torch.rand(2, 19, 23, generator=gen)
        a, b = torch.rand(2, 19, generator=gen) + 0.1, torch.rand(2, 23, generator=gen) + 0.1
        with ck.use_backend(backend):
            plan = ck.sinkhorn(cost.to(DEV), a.to(DEV), b.to(DEV), eps=0.1, tau=1.0, max_iter=500)
        close(plan, sinkhorn_ref(cost.double(), a.double(), b.double(), 0.1, 1.0, 500)[0], "plan", 1e-3, 1e-5)

    @check("otpo_weights fp32", backend)
    def _():
        need(backend, "otpo_weights")
        gen = torch.Generator().manual_seed(9)
        hc, hr = torch.randn(2, 12, 16, generator=gen), torch.randn(2, 12, 16, generator=gen)
        mc, mr = torch.rand(2, 12, generator=gen) > 0.2, torch.rand(2, 12, generator=gen) > 0.5
        with ck.use_backend(backend):
            wc, wr = ck.otpo_weights(hc.to(DEV), hr.to(DEV), mc.to(DEV), mr.to(DEV))
        rc, rr = otpo_weights_ref(hc, hr, mc, mr)
        close(wc, rc, "w_chosen", 1e-3, 1e-4)
        close(wr, rr, "w_rejected", 1e-3, 1e-4)


# ---------------------------------------------------------------------------------------------
# grouped GEMM (bf16 / fp32) and FP8


def _gemm_inputs(M=70, K=40, N=24, E=5, dtype=GEMM16, head=3, tail=4):
    gen = torch.Generator().manual_seed(M + K + N + E)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = (torch.randn(E, K, N, generator=gen) / K**0.5).to(dtype)
    inner = M - head - tail
    cuts = sorted(torch.randint(0, inner + 1, (E - 1,), generator=gen).tolist())
    cuts[0] = cuts[1] if E > 2 else cuts[0]  # an empty group
    off = torch.tensor([0] + cuts + [inner], dtype=torch.int64) + head
    return x, w, off


def _gemm_tol(dtype):
    return {torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}.get(dtype, (1e-4, 1e-5))


def gemm_checks(backend: str):
    for dtype in (GEMM16, torch.float32):
        name = str(dtype).split(".")[1]

        @check(f"grouped_gemm {name} fwd head/tail rows, empty group", backend)
        def _(dtype=dtype):
            need(backend, "grouped_gemm")
            x, w, off = _gemm_inputs(dtype=dtype)
            with ck.use_backend(backend):
                y = ck.grouped_gemm(x.to(DEV), w.to(DEV), off.to(DEV))
            close(y, grouped_gemm_ref(x.double(), w.double(), off), "y", *_gemm_tol(dtype))

    @check(f"grouped_gemm {NAME16} dgrad (trans_b)", backend)
    def _():
        need(backend, "grouped_gemm")
        x, w, off = _gemm_inputs(K=24, N=40)
        with ck.use_backend(backend):
            y = ck.grouped_gemm(x.to(DEV), w.to(DEV).transpose(1, 2).contiguous(), off.to(DEV), trans_b=True)
        close(y, grouped_gemm_ref(x.double(), w.double().transpose(1, 2), off, trans_b=True), "dx",
              *_gemm_tol(GEMM16))

    @check(f"grouped_gemm {NAME16} wgrad", backend)
    def _():
        need(backend, "grouped_gemm_wgrad")
        x, w, off = _gemm_inputs()
        dy = torch.randn(x.shape[0], w.shape[2], generator=torch.Generator().manual_seed(2)).to(GEMM16)
        with ck.use_backend(backend):
            dw = torch.ops.compass.grouped_gemm_wgrad(x.to(DEV), dy.to(DEV), off.to(DEV), w.shape[0], False)
        close(dw, grouped_gemm_wgrad_ref(x.double(), dy.double(), off, w.shape[0]), "dw", *_gemm_tol(GEMM16))

    @check("grouped_gemm bf16 M=0", backend)
    def _():
        need(backend, "grouped_gemm")
        w = torch.randn(4, 32, 16).bfloat16()
        with ck.use_backend(backend):
            y = ck.grouped_gemm(torch.empty(0, 32, dtype=torch.bfloat16, device=DEV), w.to(DEV),
                                torch.zeros(5, dtype=torch.int64, device=DEV))
        if tuple(y.shape) != (0, 16):
            raise AssertionError(f"shape {tuple(y.shape)}")


def fp8_checks(backend: str):
    for gran in ("row", "block", "block2d", "tensor"):
        @check(f"quantize_fp8 {gran} bf16 K=200 bit-equal", backend)
        def _(gran=gran):
            need(backend, "quantize_fp8")
            x = torch.randn(37, 200, generator=torch.Generator().manual_seed(4)).bfloat16()
            with ck.use_backend(backend):
                q = ck.quantize_fp8(x.to(DEV), granularity=gran, block_size=64)
            data, scale = quantize_fp8_ref(x, gran, 64)
            equal(q.data, data, "codes")
            equal(q.scale, scale, "scales")

    for xg, wg in (("row", "row"), ("block", "block2d")):
        @check(f"grouped_gemm_fp8 {xg}/{wg} head/tail rows, empty group", backend)
        def _(xg=xg, wg=wg):
            need(backend, "grouped_gemm_fp8")
            x, w, off = _gemm_inputs(M=90, K=256, N=48, E=4, dtype=torch.float32)
            w = w.transpose(1, 2).contiguous()  # [E, N, K]
            qx = ck.quantize_fp8(x, granularity=xg, block_size=128)
            qw = ck.quantize_fp8(w, granularity=wg, block_size=128)
            qx_d = ck.Fp8Tensor(qx.data.to(DEV), qx.scale.to(DEV), xg, 128)
            qw_d = ck.Fp8Tensor(qw.data.to(DEV), qw.scale.to(DEV), wg, 128)
            with ck.use_backend(backend):
                y = ck.grouped_gemm_fp8(qx_d, qw_d, off.to(DEV), out_dtype=torch.float32).cpu()
            args = (qx.data, qx.scale, xg, qw.data, qw.scale, wg, off, 128, torch.float64, torch.float64)
            ref = grouped_gemm_fp8_ref(*args)
            ref_abs = grouped_gemm_fp8_ref(qx.data.float().abs().to(qx.data.dtype), qx.scale, xg,
                                           qw.data.float().abs().to(qw.data.dtype), qw.scale, wg, off, 128,
                                           torch.float64, torch.float64)
            bound = fp8_accumulation_bound(x.shape[1], ref_abs, tensor_core=COMPILED) + 2.0**-23 * ref.abs()
            err = (y.double() - ref).abs()
            if not (err <= bound).all():
                raise AssertionError(f"max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}")
            if calc_diff(y, ref) >= 1e-3:
                raise AssertionError(f"calc_diff {calc_diff(y, ref):.2e}")
            outside = torch.cat([y[: int(off[0])], y[int(off[-1]):]])
            equal(outside, torch.zeros_like(outside), "rows outside the groups")


for _b in ("triton", "cuda"):
    routing_checks(_b)
    gemm_checks(_b)
    fp8_checks(_b)
other_checks("triton")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filter", default="", help="only checks whose name contains this")
    ap.add_argument("--min-pass", type=int, default=0, help="exit 1 unless at least this many checks pass")
    args = ap.parse_args(argv)
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    print(f"gpu_smoke: device {torch.cuda.get_device_name() if COMPILED else 'cpu'}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, compass_kernels from "
          f"{os.path.dirname(ck.__file__)}", flush=True)
    for name, backend, fn in CHECKS:
        if args.filter not in name:
            continue
        if backend == "cuda" and not COMPILED:
            status, why = "SKIP", "no CUDA device"
        else:
            try:
                fn()
                status, why = "PASS", ""
            except Skip as e:
                status, why = "SKIP", str(e)
            except Exception as e:  # report and go on
                status = "FAIL"
                tb = traceback.extract_tb(e.__traceback__)[-1]
                why = f"{type(e).__name__}: {str(e).strip()[:300]} ({os.path.basename(tb.filename)}:{tb.lineno})"
        counts[status] += 1
        print(f"{status} {name}" + (f": {why}" if why else ""), flush=True)
    print(f"gpu_smoke: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP", flush=True)
    if counts["PASS"] < args.min_pass:
        print(f"gpu_smoke: fewer than --min-pass {args.min_pass} checks passed", flush=True)
    return 1 if counts["FAIL"] or counts["PASS"] < args.min_pass else 0


if __name__ == "__main__":
    sys.exit(main())
