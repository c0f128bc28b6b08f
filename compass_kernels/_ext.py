"""Loading of the compiled modules and their typed kernel boundary.

The C++/CUDA modules do not link libtorch. Every kernel entry point is declared once, with typed
arguments, in ``csrc/common/kernels.def``; the module exports that table and this module builds, at
import, one keyword-argument caller per entry point (``compass_kernels._boundary``):

    _ext.cpu.unpermute(y=y, num_rows=R, H=H, row_id_map=row, T=T, k=k, probs=probs, out=out)

``cpu`` / ``cuda`` hold those callers (None when the module is not there); other attributes of them
are the module's own plain functions (``cuda.route_workspace_numel``, ``cpu.gemm_forward_tile``, ...).
Tensors go in as tensors: the caller passes their data pointers, row strides (in elements) and
dtype codes as the table asks, and for CUDA the current stream of the first tensor's device. Output
buffers are allocated in Python and written by the kernel; inner (last-dim) strides are 1: callers
make that so. The semantics of each entry point are its docstring (``help(_ext.cpu.route)``) and
the comments next to its kernels. The dtype codes come from the module (``csrc/common/dtype.h``).
"""

from __future__ import annotations

import importlib
import os

import torch

from compass_kernels import _boundary

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _load(name: str):
    try:
        module = importlib.import_module(f"compass_kernels.{name}")
    except ImportError as e:  # not built, or built for another Python
        return None, f"compass_kernels.{name} not importable: {e}"
    if not hasattr(module, "signatures"):  # built from sources older than the typed kernel boundary
        return None, (f"compass_kernels.{name} at {module.__file__} is out of date (no kernel signature "
                      "table): rebuild it")
    return module, None


cpu_module, cpu_missing = _load("_cpu")
cuda_module, cuda_missing = _load("_cuda")


def _shadowing(missing: list[str]) -> str | None:
    """Why the compiled modules in ``missing`` are absent when this ``compass_kernels`` is a source
    checkout (``python -m pytest`` from the repository root puts it first on ``sys.path``) while
    another copy on ``sys.path``, the installed package, has them; None otherwise."""
    import glob
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


def _stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _dtype_codes() -> dict[torch.dtype, int]:
    tables = [m.dtype_codes for m in (cpu_module, cuda_module) if m is not None]
    if len(tables) == 2 and tables[0] != tables[1]:
        raise ImportError(f"compass_kernels._cpu and _cuda disagree on dtype codes ({tables[0]} vs {tables[1]}): "
                          "rebuild both from one source tree")
    return _boundary.dtype_codes(tables[0]) if tables else {}


# {torch dtype: code} of csrc/common/dtype.h, read from the compiled module; empty when none is built
# (then no kernel consumes a code).
DTYPE_CODES = _dtype_codes()
# COMPASS_CHECK=1 (at import): the callers also refuse buffers of another dtype than the table declares.
_CHECK_BUFFERS = os.environ.get("COMPASS_CHECK", "0") == "1"
cpu = _boundary.Kernels(cpu_module, DTYPE_CODES, check_buffers=_CHECK_BUFFERS) if cpu_module is not None else None
cuda = (_boundary.Kernels(cuda_module, DTYPE_CODES, _stream_handle, torch.cuda.device, check_buffers=_CHECK_BUFFERS)
        if cuda_module is not None else None)



def kernels(backend: str) -> _boundary.Kernels:
    """The compiled entry points of ``backend`` ("cpu" or "cuda"); launchers call this only after the
    backend resolved to it, so a missing module here is a bug, said as such."""
    k = cpu if backend == "cpu" else cuda if backend == "cuda" else None
    if k is None:
        raise RuntimeError(f"compass: no compiled {backend!r} module, yet a launcher was asked to use it")
    return k

def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def _check_values() -> bool:
    """COMPASS_CHECK=1: also run the value checks that read device data (they synchronise)."""
    return os.environ.get("COMPASS_CHECK", "0") == "1"


def _poison_enabled() -> bool:
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
