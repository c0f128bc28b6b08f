"""Launch options of every Triton kernel, in one table read by the launchers *and* by the
ahead-of-time check (``aot.py``), so CI compiles exactly the kernel a GPU runs.

``enable_fp_fusion`` is always explicit: Triton's default changed between releases (on up to
3.9, off from 3.10) and, with it on, ``a * b + c`` becomes one FMA. Kernels marked
``bit_exact`` promise the same bits as the C++ backends (separate multiply and add, slot order),
so they run with fusion off and the AOT check fails if their PTX holds an ``fma`` instruction.
``num_warps`` / ``num_stages`` are fixed here unless the launcher picks them per shape (the GEMM
configurations); fusion and ``bit_exact`` never vary per shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    """Compile options a kernel is launched with (FMA contraction, warps, stages, bit-exactness)."""
    enable_fp_fusion: bool
    num_warps: int | None = None  # None: the launcher passes it per shape
    num_stages: int | None = None
    bit_exact: bool = False

    def __post_init__(self):
        if self.bit_exact and self.enable_fp_fusion:
            raise ValueError("a bit_exact kernel must run with enable_fp_fusion=False")


LAUNCH = {
    # routing: integer work and moves (fusion is moot; off keeps the float paths exact)
    "route_count": Launch(False, num_warps=8),
    "route_scan": Launch(False, num_warps=8),
    "route_assign": Launch(False, num_warps=8),
    "permute": Launch(False, num_warps=4, bit_exact=True),
    "zero_pad_rows": Launch(False, num_warps=4, bit_exact=True),
    # unpermute: out = sum_j p_j * y_j in slot order, same bits as the C++ loops
    "unpermute": Launch(False, num_warps=4, bit_exact=True),
    # at 4 warps the bf16 k = 8 variant spills 4 bytes (56 registers, ptxas 13)
    "unpermute_bwd": Launch(False, num_warps=8, bit_exact=True),
    "sort_chunks": Launch(False, num_warps=8, bit_exact=True),
    # Sinkhorn: fp32 iterations; fusion on (no bit-equality promise, tolerance-tested)
    "sinkhorn": Launch(True, num_warps=8),
    # GEMMs: the fp32 FMA path rounds once per multiply-add; warps and stages per shape
    "grouped_gemm": Launch(True),
    "grouped_gemm_wgrad": Launch(True),
    "grouped_gemm_fp8": Launch(True),
    # FP8 quantization: amax and x / scale, one rounding each
    "quantize": Launch(False),
    "amax_partial": Launch(False),
}


def launch(name: str, **per_shape) -> dict:
    """Keyword arguments of a launch of kernel ``name``: the table's options plus ``num_warps`` /
    ``num_stages`` where the table leaves them to the launcher."""
    opt = LAUNCH[name]
    for key in per_shape:
        if key not in ("num_warps", "num_stages") or getattr(opt, key) is not None:
            raise ValueError(f"launch option {key!r} of {name!r} comes from the table, not the launcher")
    kw = {"enable_fp_fusion": opt.enable_fp_fusion}
    for key in ("num_warps", "num_stages"):
        value = per_shape.get(key, getattr(opt, key))
        if value is not None:
            kw[key] = value
    if "num_warps" not in kw:
        raise ValueError(f"kernel {name!r} needs num_warps from its launcher")
    return kw


def fma_lines(ptx: str) -> list[str]:
    """The ``fma.*`` instructions of a PTX listing."""
    return [m.group(0).strip() for m in re.finditer(r"^\s*(?:@!?%\w+\s+)?fma\.\S+[^\n]*", ptx, re.MULTILINE)]
