"""Readable references for FP8: quantize, dequantize, the FP8 grouped GEMM and SmoothQuant scales.

Definitions (docs/algorithms.md, FP8). For x ``[..., M, K]`` and a granularity:

    amax  = max |x| over each group ("tensor": the matrix, "row": a row, "block": 1 x bs columns of
            a row, "block2d": a bs x bs tile; the last block or tile of a dim may be partial)
    scale = max(amax, 1e-12) / fmax                   fp32; fmax 448 (e4m3fn), 57344 (e5m2)
    data  = cast(clamp(x / scale, -fmax, fmax))       saturating (torch's cast alone does not saturate)
    x    ~= data * scale

Everything runs in fp32 (x upcast first; fp64 inputs are rounded to fp32 first), so the compiled
backends agree with these functions bit for bit. NaN is not hidden: a NaN in a group makes its
amax and scale NaN and its own code NaN (torch's max and clamp propagate NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRANULARITIES = ("tensor", "row", "block", "block2d")
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
AMAX_FLOOR = 1e-12


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def scale_shape(shape, granularity: str, block_size: int) -> tuple[int, ...]:
    """The scale's shape for data of ``shape [..., M, K]``."""
    *lead, M, K = shape
    tail = {
        "tensor": (),
        "row": (M,),
        "block": (M, _cdiv(K, block_size)),
        "block2d": (_cdiv(M, block_size), _cdiv(K, block_size)),
    }[granularity]
    return (*lead, *tail)


def expand_scale(scale: torch.Tensor, granularity: str, block_size: int, M: int, K: int) -> torch.Tensor:
    """Scale broadcast to one value per element of ``[..., M, K]``: element (m, k) of a block uses
    ``scale[..., m, k // bs]`` ("block") or ``scale[..., m // bs, k // bs]`` ("block2d").

    Gathers, not ``repeat_interleave(bs)[..., :K]``: torch 2.13's inductor miscompiles that slice
    when it fuses it into the following multiply (wrong values in the last, partial block).
    """
    if granularity == "tensor":
        return scale[..., None, None]
    if granularity == "row":
        return scale[..., None]
    cols = torch.arange(K, device=scale.device) // block_size
    if granularity == "block":
        return scale[..., cols]
    rows = torch.arange(M, device=scale.device) // block_size
    return scale[..., rows[:, None], cols[None, :]]


def amax_ref(x: torch.Tensor, granularity: str, block_size: int) -> torch.Tensor:
    """max |x| per group, fp32, NaN-propagating; 0 for an empty group."""
    a = x.float().abs()
    *lead, M, K = a.shape
    if granularity == "tensor":
        return a.amax(dim=(-2, -1)) if M * K else a.new_zeros(lead)
    if granularity == "row":
        return a.amax(dim=-1) if K else a.new_zeros(*lead, M)
    nk = _cdiv(K, block_size)
    a = F.pad(a, (0, nk * block_size - K))  # zero padding never wins a max of |x|
    if granularity == "block":
        return a.reshape(*lead, M, nk, block_size).amax(dim=-1)
    nm = _cdiv(M, block_size)
    a = F.pad(a, (0, 0, 0, nm * block_size - M))
    return a.reshape(*lead, nm, block_size, nk, block_size).amax(dim=(-3, -1))


def quantize_fp8_ref(x: torch.Tensor, granularity: str = "row", block_size: int = 128,
                     dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[..., M, K]`` -> (data ``[..., M, K]`` in ``dtype``, scale fp32 of ``scale_shape``)."""
    fmax = FP8_MAX[dtype]
    xf = x.float()
    M, K = xf.shape[-2:]
    scale = amax_ref(xf, granularity, block_size).clamp(min=AMAX_FLOOR) / fmax
    data = (xf / expand_scale(scale, granularity, block_size, M, K)).clamp(-fmax, fmax).to(dtype)
    return data, scale


def dequantize_fp8_ref(data: torch.Tensor, scale: torch.Tensor, granularity: str, block_size: int = 128,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data * scale`` per element, in fp32 (fp64 when ``dtype`` is fp64: then exact), cast to ``dtype``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    M, K = data.shape[-2:]
    s = expand_scale(scale.to(acc), granularity, block_size, M, K)
    return (data.to(acc) * s).to(dtype)


def grouped_gemm_fp8_ref(x_data: torch.Tensor, x_scale: torch.Tensor, x_granularity: str,
                         w_data: torch.Tensor, w_scale: torch.Tensor, w_granularity: str,
                         offsets: torch.Tensor, block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16,
                         acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``y[offsets[e]:offsets[e+1]] = deq(x)[...] @ deq(w[e])^T``: x ``[M, K]``, w ``[E, N, K]`` -> ``[M, N]``.

    Both operands are dequantized to ``acc_dtype`` (fp64: exact) and multiplied in it; rows outside
    ``[offsets[0], offsets[-1])`` are zero. Reads the offsets on the host (a sync on GPU).
    """
    xd = dequantize_fp8_ref(x_data, x_scale, x_granularity, block_size, acc_dtype)      # [M, K]
    wd = dequantize_fp8_ref(w_data, w_scale, w_granularity, block_size, acc_dtype)      # [E, N, K]
    y = torch.zeros(x_data.shape[0], w_data.shape[1], dtype=acc_dtype, device=x_data.device)
    bounds = offsets.tolist()
    for e in range(w_data.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        if t > s:
            y[s:t] = xd[s:t] @ wd[e].t()
    return y.to(out_dtype)


def smooth_scales_ref(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant (arXiv 2211.10438): ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, fp32 ``[K]``.

    Both maxima and the result are floored at 1e-5 (as the SmoothQuant code does), so a channel
    that never fires gives a finite scale.
    """
    a = act_amax.float().clamp(min=1e-5)
    w = weight_amax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)
