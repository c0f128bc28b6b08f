"""Backend selection: order, overrides, loud failures, one warning per fallback, backend_info."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import compass_kernels as ck
from compass_kernels import _backend, _ext


def test_backend_info_reports_everything():
    info = ck.backend_info()
    assert set(info) >= {"built", "chosen", "override"}
    for name in ck.BACKENDS:
        entry = info["built"][f"{name}@cpu"]
        assert isinstance(entry["available"], bool) and entry["why"]
    assert info["built"]["torch@cpu"]["available"]
    assert not info["built"]["cuda@cpu"]["available"]
    assert "route@cpu" in info["chosen"]


def test_cpu_backend_is_built_where_installed():
    """A pip-installed package must carry _cpu; a silent fall back to torch would hide it.

    Set COMPASS_ALLOW_NO_CPU=1 to run the suite from a source tree without the extension.
    """
    if os.environ.get("COMPASS_ALLOW_NO_CPU") == "1":
        pytest.skip("COMPASS_ALLOW_NO_CPU=1")
    assert _ext.cpu_module is not None, _ext.cpu_missing
    assert _backend.resolve("permute", torch.device("cpu")) in ("cpu", _backend.requested())


def test_use_backend_scopes_and_restores():
    before = _backend.requested()
    with ck.use_backend("torch"):
        assert _backend.requested() == "torch"
        assert _backend.resolve("permute", torch.device("cpu")) == "torch"
        with ck.use_backend(None):
            assert _backend.requested() is None or _backend.requested() == os.environ.get("COMPASS_BACKEND")
    assert _backend.requested() == before


def test_explicit_backend_that_cannot_serve_raises():
    with ck.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"compass backend 'cuda' was requested for route on cpu"):
            ck.route(torch.tensor([[0, 1]]), 2)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"use_backend got 'cutlass'"):
        ck.use_backend("cutlass")


def test_env_override(monkeypatch):
    monkeypatch.setenv("COMPASS_BACKEND", "torch")
    assert _backend.resolve("unpermute", torch.device("cpu")) == "torch"
    monkeypatch.setenv("COMPASS_BACKEND", "nope")
    with pytest.raises(ValueError, match="COMPASS_BACKEND"):
        _backend.requested()


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_ext, "cpu_module", None)
    monkeypatch.setattr(_ext, "cpu_missing", "pretend it is not built")
    monkeypatch.setattr(_backend, "_cache", {})
    monkeypatch.setattr(_backend, "_warned", set())
    with ck.use_backend(None):
        monkeypatch.delenv("COMPASS_BACKEND", raising=False)
        with pytest.warns(RuntimeWarning, match=r"falls back to the 'torch' backend .*pretend it is not built"):
            ck.route(torch.tensor([[0, 1]]), 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ck.route(torch.tensor([[1, 0]]), 2)  # second call: no second warning


def test_tracers_see_the_custom_ops_of_the_direct_eager_calls():
    """quantize_fp8, grouped_gemm_fp8 and grouped_gemm call their implementations directly in
    plain eager mode (_ext.eager); under a tracer (make_fx) they must still be compass ops, and
    grouped_gemm with a weight that needs a gradient goes through the op (its autograd)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w = torch.randn(10, 16), torch.randn(3, 8, 16)
    offsets = torch.tensor([0, 4, 4, 10])

    def chain(x, w, offsets):
        qx, qw = ck.quantize_fp8(x, granularity="row"), ck.quantize_fp8(w, granularity="row")
        return ck.grouped_gemm_fp8(qx, qw, offsets, out_dtype=torch.float32) + ck.grouped_gemm(x, w, offsets,
                                                                                                trans_b=True)

    graph = make_fx(chain)(x, w, offsets).graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert {"compass.quantize_fp8.default", "compass.grouped_gemm_fp8.default",
            "compass.grouped_gemm.default"} <= targets, targets
    torch.testing.assert_close(make_fx(chain)(x, w, offsets)(x, w, offsets), chain(x, w, offsets))
    wg = w.clone().requires_grad_(True)
    (dw,) = torch.autograd.grad(ck.grouped_gemm(x, wg, offsets, trans_b=True).sum(), wg)
    torch.testing.assert_close(dw[1], torch.zeros(8, 16))          # the empty group
    torch.testing.assert_close(dw[0], x[:4].sum(0).expand(8, 16))
