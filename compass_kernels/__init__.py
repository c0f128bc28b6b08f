"""Compass kernels: Mixture-of-Experts routing, grouped GEMM, FP8 and optimal-transport ops.

Every op has a readable PyTorch reference (``*_ref``) and CPU / Triton / CUDA backends behind one
signature; see ``backend_info()`` for what is built here and ``use_backend`` to force one.
"""

from compass_kernels._backend import BACKENDS, backend_info, use_backend
from compass_kernels.fp8 import Fp8Tensor, dequantize_fp8, grouped_gemm_fp8, quantize_fp8, smooth_scales
from compass_kernels.grouped_gemm import grouped_gemm
from compass_kernels.ot import otpo_weights, sinkhorn
from compass_kernels.routing import RoutingPlan, permute, route, unpermute
from compass_kernels.sort_chunks import sort_chunks

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Fp8Tensor",
    "RoutingPlan",
    "backend_info",
    "dequantize_fp8",
    "grouped_gemm",
    "grouped_gemm_fp8",
    "otpo_weights",
    "permute",
    "quantize_fp8",
    "route",
    "sinkhorn",
    "smooth_scales",
    "sort_chunks",
    "unpermute",
    "use_backend",
]
