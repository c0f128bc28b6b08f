"""The typed kernel boundary: the callers _ext builds from the compiled modules' signature tables
(csrc/common/kernels.def) marshal every argument where the C++ args struct expects it.

The CUDA entry points cannot run here; _cpu exports the CUDA module's table (cuda_signatures, laid out
by the same host compiler), so the CUDA callers and the op files' CUDA call sites are checked against it
with a binding that records the packed bytes instead of launching.
"""

from __future__ import annotations

import contextlib
import importlib
import struct

import pytest
import torch

from compass_kernels import _boundary, _ext, fp8, routing

grouped_gemm = importlib.import_module("compass_kernels.grouped_gemm")  # the package exports the function

pytestmark = pytest.mark.skipif(_ext.cpu_module is None, reason="compass_kernels._cpu not built")

FMT = {"rows": "Qqq", "tensor": "Qq", "buffer": "Q", "int": "q", "float": "d", "bool": "?", "stream": "Q"}
CPU_KERNELS = {"route", "permute", "unpermute", "unpermute_bwd", "quantize_fp8", "sinkhorn", "otpo_weights"}
CUDA_KERNELS = {"route", "permute", "unpermute", "unpermute_bwd", "grouped_gemm", "grouped_gemm_wgrad",
                "grouped_gemm_fp8"}


def _unpack(signature, packed: bytes) -> dict:
    """{field: value} of packed args (rows -> (ptr, stride, dtype), tensor -> (ptr, dtype))."""
    size, fields, _ = signature
    assert len(packed) == size
    out = {}
    for name, kind, offset, _ in fields:
        vals = struct.unpack_from("=" + FMT[kind], packed, offset)
        out[name] = vals if len(vals) > 1 else vals[0]
    return out


class Recorder:
    """A module whose kernel bindings record the bytes they get."""

    def __init__(self, signatures, **plain):
        self.signatures = signatures
        self.calls = []
        for name in signatures:
            setattr(self, name, lambda packed, name=name: self.calls.append((name, packed)))
        self.__dict__.update(plain)


def test_tables_cover_every_entry_point():
    assert set(_ext.cpu_module.signatures) == CPU_KERNELS
    assert set(_ext.cpu_module.cuda_signatures) == CUDA_KERNELS
    for name in CPU_KERNELS:
        assert callable(getattr(_ext.cpu, name))
        fields = _ext.cpu_module.signatures[name][1]
        assert [f[0] for f in fields] == [p for p in getattr(_ext.cpu, name).__code__.co_varnames[:len(fields)]]
    # the routing entry points take the same arguments on both modules, CUDA adding its stream
    for name in CUDA_KERNELS & CPU_KERNELS:
        cpu, cuda = (t[name][1] for t in (_ext.cpu_module.signatures, _ext.cpu_module.cuda_signatures))
        assert [f for f in cuda if f[1] != "stream"] == list(cpu)
        assert cuda[-1][1] == "stream"


def test_dtype_codes_come_from_the_module():
    assert _ext.DTYPE_CODES == {getattr(torch, n): c for n, c in _ext.cpu_module.dtype_codes.items()}
    assert _ext.DTYPE_CODES[torch.float32] == 0 and _ext.DTYPE_CODES[torch.bfloat16] == 3
    assert len(set(_ext.DTYPE_CODES.values())) == len(_ext.DTYPE_CODES)


def test_cpu_caller_packs_every_kind():
    sig = _ext.cpu_module.signatures["unpermute_bwd"]
    rec = Recorder({"unpermute_bwd": sig})
    call = _boundary.Kernels(rec, _ext.DTYPE_CODES).unpermute_bwd
    g = torch.randn(3, 10)[:, :8]                  # a row stride (10) that is not the row length
    y = torch.randn(1, 10, dtype=torch.float64)[:, :8]  # one row: the stride is the row length
    row, off, tpe = torch.zeros(3, 2, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    gy, gp = torch.empty(6, 8), torch.empty(3, 2)
    call(grad_out=g, y=y, num_rows=6, H=8, row_id_map=row, T=3, k=2, expert_offsets=off, tokens_per_expert=tpe, E=4,
         probs=None, grad_y=gy, grad_probs=gp)
    ((_, packed),) = rec.calls
    v = _unpack(sig, packed)
    assert v["grad_out"] == (g.data_ptr(), 10, 0)
    assert v["y"] == (y.data_ptr(), 8, 1)
    assert v["probs"] == (0, -1) and v["grad_probs"] == gp.data_ptr()  # None: null pointer, no dtype
    assert (v["row_id_map"], v["expert_offsets"], v["tokens_per_expert"]) == (row.data_ptr(), off.data_ptr(),
                                                                          tpe.data_ptr())
    assert (v["num_rows"], v["H"], v["T"], v["k"], v["E"], v["grad_y"]) == (6, 8, 3, 2, 4, gy.data_ptr())


def test_buffer_dtype_and_missing_argument_are_refused():
    """Buffers of another dtype: refused by callers built with check_buffers (COMPASS_CHECK=1 at import)."""
    cpu = _boundary.Kernels(_ext.cpu_module, _ext.DTYPE_CODES, check_buffers=True)
    ids = torch.tensor([[0, 1], [1, 0]])
    outs = {"row_id_map": torch.empty(2, 2, dtype=torch.int64), "tokens_per_expert": torch.empty(4, dtype=torch.int64),
            "expert_offsets": torch.empty(5, dtype=torch.int64)}
    args = {"topk_ids": ids, "T": 2, "k": 2, "E": 4, "capacity": -1, "align": 1, "workspace": None}
    with pytest.raises(TypeError, match=r"route: row_id_map must be a torch.int64 tensor, got torch.int32"):
        cpu.route(**args, **{**outs, "row_id_map": torch.empty(2, 2, dtype=torch.int32)})
    with pytest.raises(TypeError, match=r"route: tokens_per_expert must be a torch.int64 tensor, got torch.float32"):
        cpu.route(**args, **{**outs, "tokens_per_expert": torch.empty(4)})
    with pytest.raises(TypeError, match="expert_offsets"):
        cpu.route(**args, row_id_map=outs["row_id_map"], tokens_per_expert=outs["tokens_per_expert"])
    cpu.route(**args, **outs)
    assert outs["tokens_per_expert"].tolist() == [2, 2, 0, 0] and outs["row_id_map"].flatten().tolist() == [0, 2, 3, 1]
    size = _ext.cpu_module.signatures["route"][0]
    with pytest.raises(TypeError, match=f"packed into {size} bytes, got 3"):
        _ext.cpu_module.route(b"abc")


def test_kernel_checks_dtypes_the_caller_passes():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="a must have cost's dtype float32, got float64"):
        _ext.cpu.sinkhorn(cost=x, a=torch.ones(2, 3, dtype=torch.float64), b=torch.ones(2, 4), B=2, n=3, m=4, eps=1.0,
                          tau=-1.0, max_iter=10, tol=0.0, check_every=1, plan=torch.empty_like(x),
                          iters=torch.empty(2, dtype=torch.int32))


class _Calls:
    """_ext.cuda replaced by callers over _cpu.cuda_signatures whose bindings record their bytes."""

    def __init__(self, monkeypatch):
        self.devices = []
        self.module = Recorder(_ext.cpu_module.cuda_signatures, route_workspace_numel=lambda T, k, E: 3,
                               grouped_gemm_workspace_bytes=lambda *a: 256, grouped_gemm_wgrad_workspace_bytes=lambda *a: 256,
                               grouped_gemm_fp8_supported=lambda *a: True, grouped_gemm_fp8_workspace_bytes=lambda *a: 256)

        @contextlib.contextmanager
        def device_guard(device):
            self.devices.append(device)
            yield

        kernels = _boundary.Kernels(self.module, _ext.DTYPE_CODES, lambda device: 0xC0FFEE, device_guard)
        monkeypatch.setattr(_ext, "cuda", kernels)
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # the launchers' guards

    def unpacked(self, name):
        ((_, packed),) = [c for c in self.module.calls if c[0] == name]
        return _unpack(self.module.signatures[name], packed)


def test_cuda_routing_call_sites_match_the_cuda_table(monkeypatch):
    calls = _Calls(monkeypatch)
    monkeypatch.setattr(routing._backend, "resolve", lambda op, device: "cuda")
    T, k, E, H = 5, 2, 4, 8
    ids = torch.randint(0, E, (T, k))
    row, tpe, off = routing._route_impl(ids, E, -1, 1)
    v = calls.unpacked("route")
    assert v["topk_ids"] == (ids.data_ptr(), 5) and (v["T"], v["k"], v["E"], v["capacity"], v["align"]) == (T, k, E, -1, 1)
    assert v["row_id_map"] == row.data_ptr() and v["workspace"][1] == 5 and v["stream"] == 0xC0FFEE
    x, probs = torch.randn(T, H, dtype=torch.bfloat16), torch.rand(T, k)
    out = routing._permute_impl(x, row, off, tpe, T * k)
    v = calls.unpacked("permute")
    assert v["x"] == (x.data_ptr(), H, 3) and v["elem_size"] == 2 and v["out"] == out.data_ptr()
    y = torch.randn(T * k, H, dtype=torch.bfloat16)
    routing._unpermute_impl(y, row, probs)
    v = calls.unpacked("unpermute")
    assert v["y"] == (y.data_ptr(), H, 3) and v["probs"] == (probs.data_ptr(), 0) and v["num_rows"] == T * k
    routing._unpermute_bwd_impl(x, y, row, off, tpe, probs)
    v = calls.unpacked("unpermute_bwd")
    assert v["grad_out"] == (x.data_ptr(), H, 3) and v["E"] == E and v["stream"] == 0xC0FFEE
    assert calls.devices == [ids.device, x.device, y.device, x.device]


def test_cuda_gemm_call_sites_match_the_cuda_table(monkeypatch):
    calls = _Calls(monkeypatch)
    monkeypatch.setattr(grouped_gemm, "_cutlass_serves", lambda *t, trans_b, K, N: True)
    x, w = torch.randn(6, 16, dtype=torch.bfloat16), torch.randn(2, 32, 16, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 4, 6])
    y = grouped_gemm._gemm_cuda(x, w, offsets, True)
    v = calls.unpacked("grouped_gemm")
    assert v["x"] == (x.data_ptr(), 3) and v["w"] == (w.data_ptr(), 3) and v["y"] == (y.data_ptr(), 3)
    assert (v["M"], v["K"], v["N"], v["E"], v["trans_b"], v["workspace_bytes"]) == (6, 16, 32, 2, True, 256)
    dy = torch.randn(6, 32, dtype=torch.bfloat16)
    dw = grouped_gemm._wgrad_cuda(x, dy, offsets, 2, False)
    v = calls.unpacked("grouped_gemm_wgrad")
    assert v["dy"] == (dy.data_ptr(), 3) and v["dw"] == (dw.data_ptr(), 3) and (v["N"], v["E"]) == (32, 2)

    monkeypatch.setattr(fp8, "_hopper", lambda index: True)
    xq, wq = torch.zeros(6, 32, dtype=torch.float8_e4m3fn), torch.zeros(2, 16, 32, dtype=torch.float8_e4m3fn)
    xs, ws = torch.ones(6), torch.ones(2, 16)
    y = fp8._gemm_cuda(xq, xs, "row", wq, ws, "row", offsets, 128, torch.bfloat16)
    v = calls.unpacked("grouped_gemm_fp8")
    assert v["x"] == (xq.data_ptr(), 6) and v["y"] == (y.data_ptr(), 3) and v["x_scale"] == xs.data_ptr()
    assert (v["M"], v["K"], v["N"], v["E"], v["x_gran"], v["w_gran"]) == (6, 32, 16, 2, 1, 1)


@pytest.mark.skipif(_ext.cuda_module is None, reason="compass_kernels._cuda not built")
def test_cuda_module_reports_the_table_the_cpu_module_tests():
    assert _ext.cuda_module.signatures == _ext.cpu_module.cuda_signatures
    assert _ext.cuda_module.dtype_codes == _ext.cpu_module.dtype_codes


def test_module_without_a_table_is_out_of_date(monkeypatch):
    """A _cpu built from sources older than the table is reported, not half used."""
    import types

    stale = types.SimpleNamespace(__file__="/somewhere/_cpu.so", route=lambda *a: None)
    monkeypatch.setattr(importlib, "import_module", lambda name: stale)
    module, why = _ext._load("_cpu")
    assert module is None and "out of date" in why and "rebuild" in why
