"""The op-definition helper (compass_kernels._opdef): schemas from type hints, one range per op call,
declared fallbacks in backend_info, run-time fallbacks recorded and warned once."""

from __future__ import annotations

import ast
import importlib
import warnings

import pytest
import torch

import compass_kernels as ck
from compass_kernels import _backend, fp8, ranges, routing
from compass_kernels._opdef import define
from compass_kernels.fp8_ref import quantize_fp8_ref
from compass_kernels.grouped_gemm_ref import grouped_gemm_ref, grouped_gemm_wgrad_ref
from helpers import REPO_ROOT, make_ids

gg = importlib.import_module("compass_kernels.grouped_gemm")   # the package's grouped_gemm is the function

OPS = {
    "route": (routing, "_route_op"), "permute": (routing, "_permute_op"), "unpermute": (routing, "_unpermute_op"),
    "unpermute_bwd": (routing, "_unpermute_bwd_op"), "grouped_gemm": (gg, "_gemm_op"),
    "grouped_gemm_wgrad": (gg, "_wgrad_op"), "quantize_fp8": (fp8, "_quantize_op"),
    "grouped_gemm_fp8": (fp8, "_gemm_fp8_op"),
}


@pytest.fixture
def fresh_choices(monkeypatch):
    """Empty warning / choice / fallback records, automatic backend selection."""
    for name, empty in (("_cache", {}), ("_warned", set()), ("_last_choice", {}), ("_taken", {})):
        monkeypatch.setattr(_backend, name, empty)
    monkeypatch.delenv("COMPASS_BACKEND", raising=False)
    with ck.use_backend(None):
        yield


def test_schemas_come_from_the_type_hints():
    schemas = {name: str(getattr(mod, attr).op._opoverload._schema) for name, (mod, attr) in OPS.items()}
    assert schemas["permute"] == ("compass::permute(Tensor x, Tensor row_id_map, Tensor expert_offsets, "
                                  "Tensor tokens_per_expert, SymInt num_rows) -> Tensor")
    assert schemas["unpermute"].endswith("Tensor? probs) -> Tensor")
    assert schemas["route"].endswith("-> (Tensor, Tensor, Tensor)")
    assert schemas["grouped_gemm"] == ("compass::grouped_gemm(Tensor x, Tensor w, Tensor offsets, bool trans_b) "
                                       "-> Tensor")
    for name, (mod, attr) in OPS.items():
        opdef = getattr(mod, attr)
        assert opdef.qualname == f"compass::{name}" and getattr(torch.ops.compass, name).default is opdef.op._opoverload


def test_eager_on_must_name_tensor_arguments():
    def fake(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty(x.shape)

    with pytest.raises(ValueError, match=r"compass::_never_registered: eager_on names \['n'\], which are not tensor"):
        define("_never_registered", impl=lambda x, n: x, backends=("torch",), eager_on=("n",))(fake)
    assert not hasattr(torch.ops.compass, "_never_registered")


def _range_names(monkeypatch) -> list[str]:
    names: list[str] = []

    class _Range:
        def __init__(self, message, domain=None, **_):
            names.append(f"{domain}/{message}")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(ranges.nvtx, "annotate", _Range)
    monkeypatch.setattr(ranges, "_NVTX_ON", True)                  # as under Nsight
    return names


def test_every_call_opens_the_ops_range_eager_and_dispatched(monkeypatch):
    names = _range_names(monkeypatch)
    ids, x = make_ids(9, 2, 4, "holes"), torch.randn(9, 5)
    plan = ck.route(ids, 4)
    ck.unpermute(ck.permute(x, plan), plan)                         # eager fast path
    assert names == ["compass/compass::route", "compass/compass::permute", "compass/compass::unpermute"]
    names.clear()
    xg = x.clone().requires_grad_(True)
    ck.unpermute(ck.permute(xg, plan), plan).sum().backward()      # through the custom ops and autograd
    assert names == ["compass/compass::permute", "compass/compass::unpermute",
                     "compass/compass::permute", "compass/compass::unpermute"]


def test_the_eager_fast_path_shows_in_the_torch_profiler():
    ids, x = make_ids(9, 2, 4), torch.randn(9, 5)
    plan = ck.route(ids, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ck.permute(x, plan)
    assert "compass::permute" in {e.name for e in prof.events()}


def test_declared_fallbacks_are_in_backend_info():
    fb = ck.backend_info()["fallbacks"]
    assert set(fb) >= set(OPS) | {"sinkhorn", "otpo_weights", "sort_chunks"}
    for op in ("grouped_gemm", "grouped_gemm_wgrad", "grouped_gemm_fp8"):
        (cutlass,) = [f for f in fb[op] if (f["from"], f["to"]) == ("cuda", "triton")]
        assert "CUTLASS" in cutlass["when"] and "16-byte" in cutlass["when"]
    for op in ("quantize_fp8", "grouped_gemm_fp8"):
        assert any((f["from"], f["to"]) == ("triton", "torch") and "sm_89" in f["when"] for f in fb[op])
    assert {"from": "cpu", "to": "torch", "when": "always: sort_chunks has no cpu implementation"} in fb["sort_chunks"]
    assert any((f["from"], f["to"]) == ("cuda", "triton") for f in fb["sinkhorn"])
    assert fb["permute"] == []


def test_undeclared_fallback_is_an_error():
    with pytest.raises(RuntimeError, match=r"route fell back from 'cuda' to 'triton', a fallback it did not declare"):
        _backend.record_fallback("route", torch.device("cpu"), "cuda", "triton")


def _pretend_cuda(monkeypatch, op_backend: dict[str, str]):
    """resolve() answers as on a GPU machine for the listed ops (the launchers then run the named
    backend's code path on CPU tensors: Triton under TRITON_INTERPRET=1)."""
    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda op, device: op_backend.get(op) or real(op, device))


def test_cutlass_declining_runs_triton_recorded_and_warned_once(monkeypatch, fresh_choices):
    pytest.importorskip("triton")
    _pretend_cuda(monkeypatch, {"grouped_gemm": "cuda", "grouped_gemm_wgrad": "cuda"})
    monkeypatch.setattr(gg, "_cutlass_serves", lambda *t, trans_b, K, N: False)   # e.g. fp32, or not Hopper
    x, w, offsets = torch.randn(12, 8), torch.randn(3, 8, 6), torch.tensor([0, 5, 5, 12])
    with pytest.warns(RuntimeWarning, match=r"grouped_gemm on cpu falls back from the 'cuda' to the 'triton' "
                                            r"backend \(the CUTLASS sm_90a kernels do not serve"):
        y = ck.grouped_gemm(x, w, offsets)
    torch.testing.assert_close(y, grouped_gemm_ref(x, w, offsets, False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.grouped_gemm(x, w, offsets)                              # second call: no second warning
    info = ck.backend_info()
    assert info["chosen"]["grouped_gemm@cpu"] == "triton"
    assert info["fallbacks_taken"]["grouped_gemm@cpu"]["from"] == "cuda"
    with pytest.warns(RuntimeWarning, match=r"grouped_gemm_wgrad on cpu falls back from the 'cuda'"):
        dw = gg._wgrad_op(x, y, offsets, 3, False)
    torch.testing.assert_close(dw, grouped_gemm_wgrad_ref(x, y, offsets, 3, False))
    assert ck.backend_info()["chosen"]["grouped_gemm_wgrad@cpu"] == "triton"


@pytest.mark.filterwarnings("ignore:compass.*sm_89:RuntimeWarning")
def test_fp8_below_sm89_runs_torch_recorded(monkeypatch, fresh_choices):
    _pretend_cuda(monkeypatch, {"quantize_fp8": "triton"})
    monkeypatch.setattr(fp8, "_triton_fp8_device", lambda device: False)   # an sm_80 GPU
    x = torch.randn(6, 40)
    with pytest.warns(RuntimeWarning, match=r"quantize_fp8 on cpu falls back from the 'triton' to the 'torch' "
                                            r"backend \(a GPU below sm_89"):
        q = ck.quantize_fp8(x)
    want = quantize_fp8_ref(x, "row", 128, torch.float8_e4m3fn)
    assert torch.equal(q.data.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(q.scale, want[1])
    assert ck.backend_info()["fallbacks_taken"]["quantize_fp8@cpu"] == {
        "from": "triton", "to": "torch", "when": "a GPU below sm_89: Triton's FP8 kernels need sm_89 or newer"}


def _imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_fp8_does_not_depend_on_routing():
    """routing -> fp8 -> grouped_gemm, one way: the FP8 permute lives in routing."""
    assert not any("routing" in m for m in _imported_modules(REPO_ROOT / "compass_kernels" / "fp8.py"))
    assert not hasattr(fp8, "permute_fp8")
