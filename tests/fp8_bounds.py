"""Error bounds of an FP8 GEMM's accumulation, shared by the FP8 tests and bench/gpu_smoke.py.

Every product of two FP8 values is exact in fp32, so the error is the accumulation's. Two models:

fp32 inside each k-step (CPU, the Triton interpreter): every product is added in fp32, so
    |err| <= (K + 3 * steps + 2) * 2^-24 * sum|terms| (the scale products round 2-3 times a step).
Hopper's FP8 tensor cores (compiled wgmma on sm_90): the kernels take a fresh partial product per
    k-tile of ``mma_k`` products (BLOCK_K, at most 128 in our Triton and CUTLASS tiles) and promote it
    to the fp32 accumulator; inside that tile the tensor core keeps about 14 significant bits
    (truncated after each add), so
    |err| <= (mma_k * 2^-13 + (K + 3 * steps + 2) * 2^-24) * sum|terms|.
    The DeepGEMM criterion calc_diff(y, exact) < 1e-3 is the usual whole-tensor check on top.
"""

from __future__ import annotations

import torch

MMA_K = 128          # products per promoted partial: the largest BLOCK_K of the FP8 kernels
HOPPER_BITS = 14     # significant bits the FP8 tensor core keeps while accumulating a partial


def fp8_accumulation_bound(K: int, ref_abs: torch.Tensor, tensor_core: bool, mma_k: int = MMA_K,
                           k_step: int = 16) -> torch.Tensor:
    """Bound on |got - exact| for an FP8 GEMM with sum_k |x_k w_k| = ``ref_abs``. ``k_step``: the
    smallest scaling step (the scale products round 2-3 times a step). ``tensor_core``: compiled on a
    GPU whose FP8 MMA keeps ~14 bits inside each ``mma_k``-product partial (Hopper); else fp32."""
    steps = -(-K // k_step)
    fp32 = 1.01 * (K + 3 * steps + 2) * 2.0**-24
    inner = min(mma_k, K) * 2.0 ** (1 - HOPPER_BITS) if tensor_core else 0.0
    return (fp32 + inner) * ref_abs


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's criterion: 1 - 2 sum(xy) / sum(x^2 + y^2) (0 for equal tensors)."""
    x, y = x.double(), y.double()
    den = (x * x + y * y).sum()
    return 0.0 if den == 0 else (1 - 2 * (x * y).sum() / den).item()


def emulate_hopper_fp8_dot(a: torch.Tensor, b: torch.Tensor, mma_k: int = MMA_K) -> torch.Tensor:
    """a [M, K] @ b [K, N] of exactly representable products, summed as Hopper's FP8 MMA does per the
    model above: within each ``mma_k``-product partial the running sum is truncated to 14 significant
    bits after every add, then the partial is added to an fp32 accumulator. For tests of the bound."""
    M, K = a.shape
    acc = torch.zeros(M, b.shape[1], dtype=torch.float32)
    for k0 in range(0, K, mma_k):
        part = torch.zeros(M, b.shape[1], dtype=torch.float64)
        for k in range(k0, min(k0 + mma_k, K)):
            part = _truncate(part + a[:, k, None].double() * b[None, k, :].double(), HOPPER_BITS)
        acc = acc + part.float()
    return acc


def _truncate(v: torch.Tensor, bits: int) -> torch.Tensor:
    """v rounded toward zero to ``bits`` significant bits."""
    m, e = torch.frexp(v)
    return torch.ldexp(torch.trunc(m * 2.0**bits) / 2.0**bits, e)
