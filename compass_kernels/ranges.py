"""NVTX ranges that work with or without the ``nvtx`` package.

``nvtx`` (NVIDIA's Python package: domains, colours) is optional. Without it, ranges go to
``torch.cuda.nvtx`` on a CUDA build of torch (``domain/name``), and are no-ops on a CPU build.
Use ``nvtx.annotate(name, domain=...)`` as with the package.
"""

from __future__ import annotations

import contextlib
import os

import torch


class _TorchNvtx:
    """The ``annotate`` subset of the nvtx package, on torch.cuda.nvtx (or nothing)."""

    @staticmethod
    def annotate(message: str, domain: str | None = None, **_):
        if torch.version.cuda is None:  # CPU build of torch: its nvtx stubs raise
            return contextlib.nullcontext()
        return torch.cuda.nvtx.range(f"{domain}/{message}" if domain else message)


def _load_nvtx():
    try:
        import nvtx
    except ImportError:
        return _TorchNvtx()
    return nvtx


def __getattr__(name: str):
    # ``ranges.nvtx`` is resolved on first use, so that ``import compass_kernels`` loads no nvtx
    if name == "nvtx":
        globals()["nvtx"] = _load_nvtx()
        return globals()["nvtx"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def nvtx_range(name: str):
    """The NVTX range of one MoE stage (``domain="compass"``); none inside a compiled graph, since
    dynamo cannot trace the nvtx C calls (profile eager runs). Profilers may replace this function
    (``profiling/moe_breakdown.py`` mirrors each range as a ``record_function``)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _nvtx().annotate(name, domain="compass")


def _nvtx():
    return globals().get("nvtx") or __getattr__("nvtx")


# Whether op ranges go anywhere: NVTX hands ranges to a tool (Nsight Systems / Compute) that the
# profiler names in NVTX_INJECTION64_PATH when it starts the process; without one a range is a no-op
# that still costs 2-4 us of Python per op call, so op calls skip it.
_NVTX_ON = bool(os.environ.get("NVTX_INJECTION64_PATH") or os.environ.get("NVTX_INJECTION32_PATH"))


def op_range(name: str, record: bool = False):
    """The range of one op call (``compass::permute``, ...), or None when nothing would see it: NVTX
    in domain ``compass`` while a tool listens and, with ``record`` while torch.profiler runs, a
    ``record_function`` of the same name (the eager fast path skips the dispatcher, which otherwise
    shows the op in the profile). Host-side only: no device sync; none while dynamo traces (the
    custom op's kernel opens it when the compiled graph runs)."""
    profiling = record and torch.autograd.profiler._is_profiler_enabled
    if not (_NVTX_ON or profiling) or torch.compiler.is_compiling():
        return None
    if not profiling:
        return _nvtx().annotate(name, domain="compass")
    stack = contextlib.ExitStack()
    stack.enter_context(_nvtx().annotate(name, domain="compass"))
    stack.enter_context(torch.profiler.record_function(name))
    return stack
