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
    module = globals().get("nvtx") or __getattr__("nvtx")
    return module.annotate(name, domain="compass")
