"""FP8 quantization of [8192, 4096] fp32 / bf16 on CPU against eager PyTorch and a copy ceiling.

Granularities (kind): per row, per 1 x 128 block (DeepSeek activations), per tensor. Peers in the
same run:

* eager: what one writes in plain PyTorch (torchao's recipe): amax, clamp, divide, clamp, cast,
  each a separate pass over memory (fp32 temporaries for bf16 inputs);
* copy: a preallocated ``copy_`` of as many bytes as the quantization must move (read x, write the
  codes), the bandwidth ceiling;
* alloc_touch: allocating and touching a new [8192, 4096] byte tensor, which ck.quantize_fp8 (like
  any op returning a new tensor) pays on top of moving bytes. 32 MiB is above glibc's mmap
  threshold, so every call gets fresh pages and a page fault per 4 KiB on first touch: on this VM
  about as long as the quantization itself (torch's THP_MEM_ALLOC_ENABLE=1 halves it);
* compass_kernel: the C++ kernel alone into preallocated outputs, the like-for-like comparison with
  ``copy``.

extra_info carries what bench/report.py reads: pass_ = "quant", shape, kind, impl, bytes: what each
granularity must move (compass_kernels.benchmarking.models.quantize_fp8_bytes: x read once and codes
and scales written once, and for "tensor" a second read of x, the global amax being needed before the
first code). Its fraction of the copy is against those bytes; at one read it would be about 0.6 of the
figure. COMPASS_BENCH_QUICK=1: tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

import compass_kernels as ck
from compass_kernels import _ext
from compass_kernels.benchmarking.models import copy_bytes, quantize_fp8_bytes
from compass_kernels.benchmarking.peers import eager_quantize_fp8
from compass_kernels.fp8 import GRANULARITY_CODES
from quick import pick

M, K = pick(8192, 64), pick(4096, 256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KINDS = ["row", "block", "tensor"]
eager_quantize = eager_quantize_fp8    # the eager-PyTorch peer: the same codes and scales as ck.quantize_fp8


def compass_quantize(x: torch.Tensor, kind: str):
    with ck.use_backend("cpu"):
        q = ck.quantize_fp8(x, granularity=kind)
    return q.data, q.scale


def kernel_only(x: torch.Tensor, kind: str, out=None):
    """compass_kernels._cpu.quantize_fp8 into preallocated codes and scales (allocated once)."""
    data, scale = out
    _ext.cpu_module.quantize_fp8(x.data_ptr(), _ext.dtype_code(x.dtype), 1, M, K, M * K, K, GRANULARITY_CODES[kind],
                                 128, _ext.dtype_code(torch.float8_e4m3fn), data.data_ptr(), scale.data_ptr())
    return data, scale


IMPLS = {"compass": compass_quantize, "eager": eager_quantize, "compass_kernel": kernel_only}


def _bytes(dtype: torch.dtype, kind: str) -> int:
    return quantize_fp8_bytes(M, K, dtype.itemsize, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_quantize(benchmark, impl, dt, kind):
    x = torch.randn(M, K).to(DTYPES[dt])
    fn = IMPLS[impl]
    if impl == "compass_kernel":
        scale_shape = {"row": (M,), "block": (M, K // 128), "tensor": ()}[kind]
        out = (torch.empty(M, K, dtype=torch.float8_e4m3fn), torch.empty(scale_shape))
        fn = lambda x, kind: kernel_only(x, kind, out)  # noqa: E731
    benchmark.group = f"quant-{dt}"
    benchmark.extra_info.update(bytes=_bytes(DTYPES[dt], kind), impl=impl, shape=f"{M}x{K}-{dt}", kind=kind,
                                pass_="quant")
    data, scale = benchmark.pedantic(fn, args=(x, kind), rounds=3 if impl == "eager" else 9, warmup_rounds=1)
    want_data, want_scale = eager_quantize(x, kind)
    assert torch.equal(data.view(torch.uint8), want_data.view(torch.uint8))
    assert torch.equal(scale.reshape(-1), want_scale.reshape(-1))


@pytest.mark.parametrize("dt", list(DTYPES))
def test_copy_ceiling(benchmark, dt):
    n = _bytes(DTYPES[dt], "row") // 2                       # read n bytes, write n bytes
    src, dst = torch.randint(0, 255, (n,), dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    benchmark.group = f"quant-{dt}"
    benchmark.extra_info.update(bytes=copy_bytes(n, 1), impl="copy", shape=f"{M}x{K}-{dt}", kind="all", pass_="quant")
    benchmark.pedantic(dst.copy_, args=(src,), rounds=9, warmup_rounds=1)


def test_alloc_codes(benchmark):
    """What returning a new [8192, 4096] fp8 tensor costs before any data moves: allocate and touch."""
    benchmark.group = "quant-alloc"
    benchmark.extra_info.update(bytes=M * K, impl="alloc_touch", shape=f"{M}x{K}", kind="all", pass_="quant")
    benchmark.pedantic(lambda: torch.empty(M, K, dtype=torch.uint8).fill_(0), rounds=9, warmup_rounds=1)
