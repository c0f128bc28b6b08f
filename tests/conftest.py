"""Shared fixtures: a seeded RNG, poisoned kernel outputs, the backends to test."""

from __future__ import annotations

import os

import pytest
import torch

# Every kernel output is filled with NaN / all-ones bits before the kernel runs (compass_kernels._ext.empty),
# so a row that a kernel forgets to write fails the comparison instead of passing by luck.
os.environ.setdefault("COMPASS_POISON", "1")
# No GPU on the development and CI machines: Triton kernels run in the interpreter on CPU tensors.
# On a GPU machine set TRITON_INTERPRET=0 to test the compiled kernels on CUDA tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import compass_kernels as ck  # noqa: E402
from helpers import cpu_backends  # noqa: E402

_KERNELS = [b for b in ("cpu", "triton") if b in cpu_backends()]


@pytest.fixture(params=_KERNELS or [pytest.param("cpu", marks=pytest.mark.skip(reason="no compiled CPU backend"))])
def kernel_backend(request):
    """A non-reference backend serving CPU tensors, forced for the duration of the test."""
    with ck.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
