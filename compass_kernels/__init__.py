"""Compass kernels: Mixture-of-Experts routing, grouped GEMM, FP8 and optimal-transport ops.

Every op has a readable PyTorch reference (``*_ref``) and CPU / Triton / CUDA backends behind one
signature; see ``backend_info()`` for what is built here and ``use_backend`` to force one.
"""

from compass_kernels._backend import BACKENDS, backend_info, use_backend
from compass_kernels.grouped_gemm import grouped_gemm
from compass_kernels.ot import otpo_weights, sinkhorn
from compass_kernels.routing import RoutingPlan, permute, route, unpermute

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "RoutingPlan",
    "backend_info",
    "grouped_gemm",
    "otpo_weights",
    "permute",
    "route",
    "sinkhorn",
    "unpermute",
    "use_backend",
]
