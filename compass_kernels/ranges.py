"""NVTX ranges that work with or without the ``nvtx`` package.

``nvtx`` (NVIDIA's Python package: domains, colours) is optional. Without it, ranges go to
``torch.cuda.nvtx`` on a CUDA build of torch (``domain/name``), and are no-ops on a CPU build.
Use ``nvtx.annotate(name, domain=...)`` as with the package.
"""

from __future__ import annotations

import contextlib

import torch


class _TorchNvtx:
    """The ``annotate`` subset of the nvtx package, on torch.cuda.nvtx (or nothing)."""

    @staticmethod
    def annotate(message: str, domain: str | None = None, **_):
        if torch.version.cuda is None:  # CPU build of torch: its nvtx stubs raise
            return contextlib.nullcontext()
        return torch.cuda.nvtx.range(f"{domain}/{message}" if domain else message)


try:
    import nvtx  # noqa: F401
except ImportError:
    nvtx = _TorchNvtx()


def nvtx_range(name: str):
    """The NVTX range of one MoE stage (``domain="compass"``); none inside a compiled graph, since
    dynamo cannot trace the nvtx C calls (profile eager runs). Profilers may replace this function
    (``profiling/moe_breakdown.py`` mirrors each range as a ``record_function``)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return nvtx.annotate(name, domain="compass")


def op_range(name: str, record: bool = False):
    """The range of one op call (``compass::permute``, ...): NVTX in domain ``compass`` and, with
    ``record`` while torch.profiler runs, a ``record_function`` of the same name (the eager fast path
    skips the dispatcher, which otherwise shows the op in the profile). Host-side only: no device sync;
    none inside a compiled graph's tracing (the custom op's kernel opens it when the graph runs)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if record and torch.autograd.profiler._is_profiler_enabled:
        stack = contextlib.ExitStack()
        stack.enter_context(nvtx.annotate(name, domain="compass"))
        stack.enter_context(torch.profiler.record_function(name))
        return stack
    return nvtx.annotate(name, domain="compass")
