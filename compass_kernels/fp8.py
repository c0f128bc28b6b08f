"""FP8 (W8A8): fused quantization and the FP8 grouped GEMM, per-row and DeepSeek-style blockwise.

``quantize_fp8`` turns x ``[..., M, K]`` into an ``Fp8Tensor`` (codes + fp32 scales) per tensor,
per row, per 1 x 128 block (activations, DeepSeek-V3) or per 128 x 128 tile (weights);
``grouped_gemm_fp8`` runs the experts on FP8 operands: ``y = (s_x s_w) * (X_q W_q^T)`` per group,
fp32 accumulation, bf16 out. Definitions and exact semantics: ``fp8_ref``.

Stack (docs/design.md, op anatomy): references in ``fp8_ref`` -> backend launchers here -> the ops
declared with ``_opdef.define`` (custom op and fake tensors; no autograd: FP8 is the inference path,
and codes carry no gradient) -> the public functions, which wrap the op's ``(data, scale)`` outputs in an ``Fp8Tensor``.

Backends: quantize_fp8 -> torch, cpu (fused C++: amax and cast in one pass over memory per row or
block), triton; grouped_gemm_fp8 -> torch, cpu (per group: dequantize to fp32, BLAS into the
output slice), triton, cuda (CUTLASS sm_90a, e4m3 only; anything it declines runs Triton).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass

import torch

from compass_kernels import _backend, _ext
from compass_kernels._opdef import define
from compass_kernels.fp8_ref import (
    FP8_MAX,
    GRANULARITIES,
    dequantize_fp8_ref,
    grouped_gemm_fp8_ref,
    quantize_fp8_ref,
    scale_shape,
    smooth_scales_ref,
)
from compass_kernels.grouped_gemm import check_offset_values

__all__ = ["Fp8Tensor", "quantize_fp8", "dequantize_fp8", "grouped_gemm_fp8", "smooth_scales",
           "GRANULARITY_CODES"]

# Shared with csrc/cpu/fp8.cpp and the CUDA entry points.
GRANULARITY_CODES = {"tensor": 0, "row": 1, "block": 2, "block2d": 3}
_FP8 = tuple(FP8_MAX)                                   # (float8_e4m3fn, float8_e5m2)
_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_X_GRANS, _W_GRANS = ("row", "block"), ("row", "block2d")


def _triton_fp8_built() -> bool:
    """The Triton kernels live in their own module; until it exists, triton is not offered."""
    try:
        return importlib.util.find_spec("compass_kernels.triton.fp8") is not None
    except ImportError:
        return False


# A _cpu built before fp8.cpp existed (or from another branch) has no quantize_fp8: then the cpu
# backend does not claim the op and resolve() falls back to torch with its one-time warning.
_CPU_QUANT = ("cpu",) if _ext.cpu_module is not None and hasattr(_ext.cpu_module, "quantize_fp8") else ()
_TRITON = ("triton",) if _triton_fp8_built() else ()


@dataclass(frozen=True)
class Fp8Tensor:
    """FP8 codes and their fp32 scales: ``x ~= data * scale`` (scale broadcast per granularity).

    data        [..., M, K] float8_e4m3fn or float8_e5m2
    scale       fp32: [...] ("tensor"), [..., M] ("row"), [..., M, ceil(K/bs)] ("block"),
                [..., ceil(M/bs), ceil(K/bs)] ("block2d")
    granularity "tensor" | "row" | "block" | "block2d"
    block_size  bs of the blockwise granularities (carried, unused, by the others)
    """

    data: torch.Tensor
    scale: torch.Tensor
    granularity: str
    block_size: int = 128

    def __post_init__(self):
        if not isinstance(self.data, torch.Tensor) or self.data.dtype not in _FP8:
            raise TypeError(f"Fp8Tensor.data must be a float8_e4m3fn or float8_e5m2 tensor, "
                            f"got {getattr(self.data, 'dtype', type(self.data).__name__)}")
        if self.data.dim() < 2:
            raise ValueError(f"Fp8Tensor.data must have rank >= 2 [..., M, K], got shape {tuple(self.data.shape)}")
        _check_granularity(self.granularity)
        _check_block_size(self.block_size)
        if not isinstance(self.scale, torch.Tensor) or self.scale.dtype != torch.float32:
            raise TypeError(f"Fp8Tensor.scale must be a float32 tensor, got "
                            f"{getattr(self.scale, 'dtype', type(self.scale).__name__)}")
        want = scale_shape(self.data.shape, self.granularity, self.block_size)
        if tuple(self.scale.shape) != tuple(want):
            raise ValueError(f"Fp8Tensor.scale must have shape {tuple(want)} for data {tuple(self.data.shape)} "
                             f"with granularity {self.granularity!r} and block_size {self.block_size}, "
                             f"got {tuple(self.scale.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def fmax(self) -> float:
        return FP8_MAX[self.data.dtype]

    def dim(self) -> int:
        return self.data.dim()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self, dtype)


# ---------------------------------------------------------------------------------------------
# validation (names the argument and what was expected)


def _check_granularity(granularity) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got {granularity!r}")


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")


def _check_fp8_dtype(dtype) -> None:
    if dtype not in _FP8:
        raise TypeError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")


def _check_fp8_tensor(name: str, q, dim: int, layout: str, grans: tuple[str, ...]) -> None:
    if not isinstance(q, Fp8Tensor):
        raise TypeError(f"{name} must be an Fp8Tensor (from quantize_fp8), got {type(q).__name__}")
    if q.data.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(q.data.shape)}")
    if q.granularity not in grans:
        raise ValueError(f"{name} must be quantized with granularity {' or '.join(map(repr, grans))}, "
                         f"got {q.granularity!r}")


def _gemm_block_size(q_x: Fp8Tensor, q_w: Fp8Tensor) -> int:
    """The one block size the kernels see: that of the blockwise operand(s)."""
    x_blk, w_blk = q_x.granularity == "block", q_w.granularity == "block2d"
    if x_blk and w_blk and q_x.block_size != q_w.block_size:
        raise ValueError(f"q_x and q_w must share the block size, got {q_x.block_size} (q_x) and "
                         f"{q_w.block_size} (q_w)")
    return q_w.block_size if w_blk else q_x.block_size


def _check_gemm(q_x, q_w, offsets, out_dtype) -> None:
    _check_fp8_tensor("q_x", q_x, 2, "[M, K]", _X_GRANS)
    _check_fp8_tensor("q_w", q_w, 3, "[E, N, K]", _W_GRANS)
    if q_x.shape[1] != q_w.shape[2]:
        raise ValueError(f"q_x [M, K] has K = {q_x.shape[1]} but q_w [E, N, K] has K = {q_w.shape[2]}")
    if q_x.dtype != q_w.dtype:
        raise TypeError(f"q_x and q_w must have the same FP8 dtype, got {q_x.dtype} and {q_w.dtype}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {out_dtype}")
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64 (plan.expert_offsets), got {offsets.dtype}")
    E = q_w.shape[0]
    if offsets.dim() != 1 or offsets.shape[0] != E + 1:
        raise ValueError(f"offsets must be 1-D with E + 1 = {E + 1} entries for q_w with E = {E}, "
                         f"got shape {tuple(offsets.shape)}")
    for name, t in (("q_w", q_w.data), ("offsets", offsets)):
        if t.device != q_x.device:
            raise ValueError(f"{name} is on {t.device}, expected q_x's device {q_x.device}")
    check_offset_values(offsets, q_x.shape[0])


# ---------------------------------------------------------------------------------------------
# backends: quantize


def _triton():
    from compass_kernels.triton import fp8 as tf

    return tf


def _strides(x3: torch.Tensor) -> tuple[int, int]:
    """(stride_b, stride_m) in elements; with fewer than two matrices or rows torch may report anything."""
    B, M, K = x3.shape
    sm = x3.stride(1) if M > 1 else K
    return (x3.stride(0) if B > 1 else M * sm), sm


def _as3d(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x [..., M, K] as [B, M, K] with unit stride along K and rows and matrices that do not overlap
    (a copy only when the strides are not like that: a transpose, an expand)."""
    *lead, M, K = x.shape
    B = math.prod(lead)
    x3 = x.reshape(B, M, K)
    sb, sm = _strides(x3)
    if (x3.stride(2) != 1 and K > 1) or sm < K or sb < (M - 1) * sm + K:
        x3 = x3.contiguous()
    return x3, B, M, K


@functools.cache
def _triton_fp8_device(device: torch.device) -> bool:
    """Whether Triton can compile fp8e4nv for ``device``: sm_89 and newer (CPU: the interpreter)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device.index or 0) >= (8, 9)


def _fp8_backend(op: str, backend: str, device: torch.device) -> str:
    """``backend``, except Triton on a GPU older than sm_89, which runs the torch reference."""
    if backend == "triton" and not _triton_fp8_device(device):
        _backend.record_fallback(op, device, "triton", "torch")
        return "torch"
    return backend


def _quantize_impl(x, granularity: str, block_size: int, dtype):
    backend = _fp8_backend("quantize_fp8", _backend.resolve("quantize_fp8", x.device), x.device)
    if backend == "torch" or (backend == "triton" and x.numel() == 0):
        # An empty x needs no kernel launch: its scales are the floor (the amax of nothing is 0).
        return quantize_fp8_ref(x, granularity, block_size, dtype)
    # Both kernels read fp32/bf16/fp16; the reference rounds fp64 to fp32 first, so do that here.
    x3, B, M, K = _as3d(x.float() if x.dtype == torch.float64 else x)
    data = _ext.empty(x.shape, dtype=dtype, device=x.device)
    scale = _ext.empty(scale_shape(x.shape, granularity, block_size), dtype=torch.float32, device=x.device)
    if backend == "cpu":
        sb, _ = _strides(x3)  # x3's row stride travels with x3
        _ext.kernels("cpu").quantize_fp8(x=x3, B=B, M=M, K=K, stride_b=sb, granularity=GRANULARITY_CODES[granularity],
                              block_size=block_size, data=data, scale=scale)
    else:
        scale3 = scale.view(B, *scale_shape((M, K), granularity, block_size))
        _triton().quantize(x3, granularity, block_size, FP8_MAX[dtype], data.view(B, M, K), scale3)
    return data, scale


# ---------------------------------------------------------------------------------------------
# backends: grouped GEMM


def _gemm_cpu(x_data, x_scale, x_gran, w_data, w_scale, w_gran, offsets, block_size, out_dtype):
    """Per group: dequantize w[e] (and the group's rows) to fp32 and multiply with BLAS straight into
    the group's slice of y. Offsets live in host memory here, so reading them is not a device sync."""
    M, N = x_data.shape[0], w_data.shape[1]
    y = _ext.empty(M, N, dtype=out_dtype, device=x_data.device)
    b = offsets.tolist()
    y[: b[0]].zero_()
    y[b[-1]:].zero_()
    if b[-1] <= b[0]:
        return y
    rows = slice(b[0], b[-1])
    xd = dequantize_fp8_ref(x_data[rows], x_scale[rows], x_gran, block_size)                # [rows, K] fp32
    for e in range(w_data.shape[0]):
        s, t = b[e], b[e + 1]
        if t <= s:
            continue
        wd = dequantize_fp8_ref(w_data[e], w_scale[e], w_gran, block_size)                  # [N, K] fp32
        xe = xd[s - b[0]: t - b[0]]
        if out_dtype == torch.float32:
            torch.mm(xe, wd.t(), out=y[s:t])
        else:
            y[s:t] = torch.mm(xe, wd.t())
    return y


@functools.cache
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def _gemm_cuda(x_data, x_scale, x_gran, w_data, w_scale, w_gran, offsets, block_size, out_dtype):
    """CUTLASS sm_90a: e4m3 x e4m3, block size 128, 16-byte aligned operands on a Hopper GPU.
    Returns None for anything it does not serve (the caller runs Triton)."""
    m = _ext.cuda
    if m is None or not hasattr(m, "grouped_gemm_fp8") or x_data.dtype != torch.float8_e4m3fn:
        return None
    if (x_gran == "block" or w_gran == "block2d") and block_size != 128:
        return None
    M, K = x_data.shape
    E, N = w_data.shape[:2]
    xg, wg, oc = GRANULARITY_CODES[x_gran], GRANULARITY_CODES[w_gran], _ext.dtype_code(out_dtype)
    if not _hopper(x_data.device.index or 0) or not m.grouped_gemm_fp8_supported(xg, wg, K, N, oc):
        return None
    x, w = x_data.contiguous(), w_data.contiguous()
    xs, ws, off = x_scale.contiguous(), w_scale.contiguous(), offsets.contiguous()
    if any(t.data_ptr() % 16 for t in (x, w)):
        return None
    y = _ext.empty(M, N, dtype=out_dtype, device=x.device)
    with torch.cuda.device(x.device):
        nbytes = m.grouped_gemm_fp8_workspace_bytes(M, K, N, E, xg, wg, oc)
        work = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
        m.grouped_gemm_fp8(x=x, x_scale=xs, w=w, w_scale=ws, offsets=off, y=y, M=M, K=K, N=N, E=E, x_gran=xg,
                           w_gran=wg, workspace=work, workspace_bytes=nbytes)
    return y


def _gemm_impl(x_data, x_scale, x_gran, w_data, w_scale, w_gran, offsets, block_size, out_dtype):
    args = (x_data, x_scale, x_gran, w_data, w_scale, w_gran, offsets, block_size, out_dtype)
    backend = _fp8_backend("grouped_gemm_fp8", _backend.resolve("grouped_gemm_fp8", x_data.device),
                           x_data.device)
    if backend == "cpu":
        return _gemm_cpu(*args)
    if backend == "cuda":
        y = _gemm_cuda(*args)
        if y is not None:
            return y
        to = "triton" if _TRITON and _triton_fp8_device(x_data.device) else "torch"
        _backend.record_fallback("grouped_gemm_fp8", x_data.device, "cuda", to)
        backend = to
    if backend == "triton":
        y = _ext.empty(x_data.shape[0], w_data.shape[1], dtype=out_dtype, device=x_data.device)
        _triton().grouped_gemm_fp8(x_data.contiguous(), x_scale.contiguous(), x_gran, w_data.contiguous(),
                                   w_scale.contiguous(), w_gran, offsets.contiguous(), block_size, y)
        return y
    return grouped_gemm_fp8_ref(*args)


# ---------------------------------------------------------------------------------------------
# the op declarations (compass_kernels._opdef; no autograd: codes carry no gradient)

_BELOW_SM89 = ("triton", "torch", "a GPU below sm_89: Triton's FP8 kernels need sm_89 or newer")


@define("quantize_fp8", impl=_quantize_impl, backends=("torch", *_CPU_QUANT, *_TRITON), fallbacks=(_BELOW_SM89,))
def _quantize_op(x: torch.Tensor, granularity: str, block_size: int, dtype: torch.dtype) -> tuple[
    torch.Tensor, torch.Tensor
]:
    return (x.new_empty(x.shape, dtype=dtype),
            x.new_empty(scale_shape(x.shape, granularity, block_size), dtype=torch.float32))


_CUTLASS_DECLINES = ("the CUTLASS sm_90a kernel does not serve the operands (not e4m3, a block size other than "
                     "128, a GPU other than sm_90, a shape it does not support, or operands not 16-byte aligned)")


@define("grouped_gemm_fp8", impl=_gemm_impl, backends=("torch", "cpu", *_TRITON, "cuda"),
        fallbacks=(_BELOW_SM89, ("cuda", "triton", _CUTLASS_DECLINES),
                   ("cuda", "torch", _CUTLASS_DECLINES + " and compass_kernels.triton.fp8 is missing "
                    "or the GPU is below sm_89")))
def _gemm_fp8_op(x_data: torch.Tensor, x_scale: torch.Tensor, x_granularity: str, w_data: torch.Tensor,
                 w_scale: torch.Tensor, w_granularity: str, offsets: torch.Tensor, block_size: int,
                 out_dtype: torch.dtype) -> torch.Tensor:
    return x_data.new_empty(x_data.shape[0], w_data.shape[1], dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# public API


def quantize_fp8(x: torch.Tensor, *, granularity: str = "row", block_size: int = 128,
                 dtype: torch.dtype = torch.float8_e4m3fn) -> Fp8Tensor:
    """Quantize the last two dims of ``x [..., M, K]`` (fp32/bf16/fp16/fp64) to FP8.

    ``scale = max(amax, 1e-12) / fmax`` per group (fmax 448 for e4m3fn, 57344 for e5m2) and
    ``data = cast(clamp(x / scale, -fmax, fmax))``: saturating, round to nearest even. Groups:
    "tensor" one per matrix (scale ``[...]``), "row" (``[..., M]``), "block" 1 x block_size
    (``[..., M, ceil(K/bs)]``, DeepSeek activations), "block2d" block_size x block_size
    (``[..., ceil(M/bs), ceil(K/bs)]``, DeepSeek weights). A NaN in x shows as a NaN scale and code.
    Leading dims are a batch (expert weights ``[E, N, K]`` get per-expert scales).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have rank >= 2 [..., M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _IN_DTYPES:
        raise TypeError(f"x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    _check_granularity(granularity)
    _check_block_size(block_size)
    _check_fp8_dtype(dtype)
    data, scale = _quantize_op(x, granularity, block_size, dtype)
    return Fp8Tensor(data, scale, granularity, block_size)


def dequantize_fp8(q: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data * scale`` in fp32 (fp64 when asked: exact), returned in ``dtype``; shape of ``q.data``."""
    if not isinstance(q, Fp8Tensor):
        raise TypeError(f"q must be an Fp8Tensor (from quantize_fp8), got {type(q).__name__}")
    if dtype not in _IN_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    return dequantize_fp8_ref(q.data, q.scale, q.granularity, q.block_size, dtype)


def grouped_gemm_fp8(q_x: Fp8Tensor, q_w: Fp8Tensor, offsets: torch.Tensor, *,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 grouped GEMM: ``y[offsets[e]:offsets[e+1]] = deq(q_x)[...] @ deq(q_w[e])^T`` -> ``[M, N]``.

    ``q_x`` from x ``[M, K]`` ("row" or "block"), ``q_w`` from w ``[E, N, K]`` ("row" = per output
    channel, or "block2d"), same FP8 dtype; blockwise operands share one block size. Equals the
    grouped product of the dequantized operands up to fp32 accumulation; rows outside
    ``[offsets[0], offsets[-1])`` are zero, groups may be empty, sizes need no alignment.
    """
    _check_gemm(q_x, q_w, offsets, out_dtype)
    block_size = _gemm_block_size(q_x, q_w)
    return _gemm_fp8_op(q_x.data, q_x.scale, q_x.granularity, q_w.data, q_w.scale, q_w.granularity, offsets, block_size,
                out_dtype)


def smooth_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant per-input-channel scales ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, fp32 ``[K]``.

    Divide the activations by s (fold into the preceding norm) and multiply the weights' input
    columns by s; the product is unchanged and the activation outliers move into the weights.
    """
    for name, t in (("act_amax", act_amax), ("weight_amax", weight_amax)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [K], got shape {tuple(t.shape)}")
        if t.dtype not in _IN_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if act_amax.shape != weight_amax.shape:
        raise ValueError(f"act_amax and weight_amax must have the same shape [K], got {tuple(act_amax.shape)} "
                         f"and {tuple(weight_amax.shape)}")
    if weight_amax.device != act_amax.device:
        raise ValueError(f"weight_amax is on {weight_amax.device}, expected act_amax's device {act_amax.device}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    return smooth_scales_ref(act_amax, weight_amax, float(alpha))

