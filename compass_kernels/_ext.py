"""Loading of the compiled modules and the raw-pointer calling convention.

The C++/CUDA modules do not link libtorch. Every kernel entry point takes integers: data pointers
(``tensor.data_ptr()``), sizes, row strides in *elements*, dtype codes (below) and, for CUDA, the
stream handle (``torch.cuda.current_stream().cuda_stream``). Output buffers are allocated in Python
and written by the kernel. Inner (last-dim) strides are always 1: callers make that so.

The contracts of the other op families sit next to their kernels: FP8 quantization in
``csrc/cpu/fp8.cpp``, Sinkhorn / OTPO in ``csrc/cpu/ot.cpp``, the grouped GEMMs in
``csrc/cuda/grouped_gemm.h`` and ``csrc/cuda/grouped_gemm_fp8.h`` (pybind docstrings in module.cu).

Routing entry points of ``_cpu`` and ``_cuda`` (``_cuda``'s take a trailing ``stream`` argument and
``route`` also takes a ``workspace`` pointer, see ``route_workspace_numel``):

route(ids, ids_is_int64, T, k, E, capacity, align, row_id_map, tokens_per_expert, expert_offsets)
    ids [T, k] contiguous int32/int64, entries in [-1, E); capacity < 0 means none.
    Writes row_id_map [T, k] int64, tokens_per_expert [E] int64, expert_offsets [E + 1] int64.
permute(x, stride_x, elem_size, T, H, row_id_map, k, expert_offsets, tokens_per_expert, E,
        num_rows, out)
    Moves bytes: out[row_id_map[t, j]] = x[t] for every routed slot; every other row of out
    [num_rows, H] (padding and the tail past expert_offsets[E]) is zeroed. Any element size.
unpermute(y, stride_y, dtype, num_rows, H, row_id_map, T, k, probs, probs_dtype, out)
    out[t] = sum_j probs[t, j] * y[row_id_map[t, j]] over slots with a row >= 0 (weight 1 when
    probs == 0), accumulated in fp32 (fp64 for fp64), in slot order j = 0..k-1, cast to y's dtype.
unpermute_bwd(grad_out, stride_g, y, stride_y, dtype, num_rows, H, row_id_map, T, k,
              expert_offsets, tokens_per_expert, E, probs, probs_dtype, grad_y, grad_probs)
    grad_y[row_id_map[t, j]] = probs[t, j] * grad_out[t] (plain copy when probs == 0), other rows
    of grad_y zero; grad_probs[t, j] = <grad_out[t], y[row_id_map[t, j]]> accumulated in fp32
    (fp64 for fp64), 0 for slots with row -1; grad_probs is skipped when probs == 0.
"""

from __future__ import annotations

import importlib

import torch

# dtype codes shared with csrc/common/dtype.h
DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.float8_e4m3fn: 6,
    torch.float8_e5m2: 7,
    torch.uint8: 8,
    torch.int8: 9,
}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def _load(name: str):
    try:
        return importlib.import_module(f"compass_kernels.{name}"), None
    except ImportError as e:  # not built, or built for another Python
        return None, f"compass_kernels.{name} not importable: {e}"


cpu_module, cpu_missing = _load("_cpu")
cuda_module, cuda_missing = _load("_cuda")


def _shadowing(missing: list[str]) -> str | None:
    """Why the compiled modules in ``missing`` are absent when this ``compass_kernels`` is a source
    checkout (``python -m pytest`` from the repository root puts it first on ``sys.path``) while
    another copy on ``sys.path``, the installed package, has them; None otherwise."""
    import glob
    import os
    import sys

    here = os.path.dirname(os.path.realpath(__file__))
    root = os.path.dirname(here)
    checkout = os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(os.path.join(root, "csrc"))
    if not missing or not checkout:
        return None
    for entry in sys.path:
        other = os.path.realpath(os.path.join(entry or os.getcwd(), "compass_kernels"))
        if other != here and any(glob.glob(os.path.join(other, f"{name}.*so")) for name in missing):
            return (f"compass_kernels was imported from the source tree {here}, which has no compiled "
                    f"{'/'.join(missing)} and shadows the installed package at {other}: run from another "
                    "directory or with `python -P` (keeps the working directory off sys.path), or build "
                    "the modules into the source tree")
    return None


shadow_note = _shadowing([n for n, m in (("_cpu", cpu_module), ("_cuda", cuda_module)) if m is None])
if shadow_note:
    cpu_missing = cpu_missing and f"{cpu_missing} ({shadow_note})"
    cuda_missing = cuda_missing and f"{cuda_missing} ({shadow_note})"

try:
    build_info = importlib.import_module("compass_kernels._build_info")
except ImportError:
    build_info = None


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _check_values() -> bool:
    """COMPASS_CHECK=1: also run the value checks that read device data (they synchronise)."""
    import os

    return os.environ.get("COMPASS_CHECK", "0") == "1"


def _poison_enabled() -> bool:
    import os

    return os.environ.get("COMPASS_POISON", "0") == "1"


# Infra dispatch modes of torch's tracers (make_fx's proxy mode, fake tensors, functionalization),
# and the packages whose torch-function modes trace (make_fx's pre-dispatch modes, torch.export).
_TRACER_DISPATCH_KEYS = tuple(getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL"))
_TRACER_FUNCTION_MODULES = ("torch.fx.", "torch._export", "torch.export", "torch._dynamo", "torch._functorch",
                            "torch._subclasses", "torch._higher_order_ops")


def tracing() -> bool:
    """Whether tensor values are unavailable because something traces our calls: dynamo, jit
    tracing, make_fx (proxy and pre-dispatch modes), torch.export, fake or functional tensor modes,
    or a functorch transform. Value checks that read tensors are skipped only then; an ordinary
    mode such as ``with torch.device("cpu"):`` or a user's dispatch mode keeps them."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return True
    if torch._C._len_torch_dispatch_stack() and any(
            torch._C._get_dispatch_mode(k) is not None for k in _TRACER_DISPATCH_KEYS):
        return True
    if torch._C._is_torch_function_mode_enabled():
        from torch.overrides import _get_current_function_mode_stack

        return any(type(m).__module__.startswith(_TRACER_FUNCTION_MODULES) for m in _get_current_function_mode_stack())
    return False


def values_readable(t: torch.Tensor) -> bool:
    """Whether a value check may read ``t`` here: not tracing, real data (not meta or fake), and a
    CPU tensor (free to read) or COMPASS_CHECK=1 (a device read synchronises)."""
    if t.is_meta or tracing() or not (t.device.type == "cpu" or _check_values()):
        return False
    return type(t) in (torch.Tensor, torch.nn.Parameter) or not _is_fake(t)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def eager(*tensors) -> bool:
    """Whether an op may call its implementation directly instead of through its torch.library
    custom op: plain execution (no tracer, dispatch mode or function mode), plain tensors (None
    allowed) with data (not meta), and no gradient to record. Graphs, fake tensors, meta tensors,
    modes and autograd see the custom op; the direct call skips its dispatcher, autograd and dynamo
    wrappers, ~60 us per op when a large MoE step has evicted that code from the caches (3-5 us hot)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()):
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and not t.is_meta and not (grad and t.requires_grad))
               for t in tensors)


def reject_func_grad(op: str, *tensors) -> None:
    """torch.library custom ops differentiate under torch.autograd only: under torch.func.grad (vjp,
    jacrev) their autograd fails with an error about autograd.Function.setup_context. Name the op
    and the alternative instead. (vmap and jvp work; under torch.compile nothing is raised here.)"""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return
    grad = torch._C._functorch.TransformType.Grad
    if any(i.key() == grad for i in torch._C._functorch.get_interpreter_stack() or ()) and any(
            t is not None and t.requires_grad for t in tensors):
        raise NotImplementedError(
            f"compass_kernels.{op} cannot be differentiated by torch.func.grad / vjp / jacrev (its gradient is "
            f"registered for torch.autograd only); use torch.autograd.grad, with create_graph=True for "
            f"higher-order gradients")


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs. With ``COMPASS_POISON=1`` (tests) the buffer is filled
    with NaN (floats) or all-ones bits (integers) first, so rows a kernel forgot to write show."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _poison_enabled() and out.numel():
        if dtype.is_floating_point and out.element_size() > 1:
            out.fill_(float("nan"))
        else:
            out.view(torch.uint8).fill_(0xFF) if out.element_size() == 1 else out.fill_(-1)
    return out
