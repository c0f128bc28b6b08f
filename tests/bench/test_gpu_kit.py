"""The GPU bring-up kit, checked on a CPU machine: what can be checked without a GPU is checked here.

- a CUDA build without the CUTLASS headers is a configure error, not a silent CUTLASS-less module;
- a source tree that shadows the installed package says so when its compiled module is missing;
- compass_model (and the GPU benchmark) runs without the ``nvtx`` package;
- the CUDA launches of routing, the GEMMs and FP8 run under their tensors' device;
- FP8 below sm_89 falls back to torch instead of compiling Triton's fp8e4nv;
- bench/gpu_smoke.py and the dry run of bench/gpu_check.sh pass on CPU.
"""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO_ROOT

ROOT = REPO_ROOT


def _run(args, timeout=300, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


# ---- defect: COMPASS_CUDA=1 without CUTLASS built a module with no CUTLASS kernel ----------------


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cuda_build_without_cutlass_is_a_configure_error(tmp_path):
    pybind11_dir = _run([sys.executable, "-m", "pybind11", "--cmakedir"]).stdout.strip()
    res = _run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "b"), "-DCOMPASS_CUDA=1",
                f"-DCOMPASS_CUTLASS_DIR={tmp_path / 'no-cutlass'}", f"-Dpybind11_DIR={pybind11_dir}"])
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-2000:]
    assert "needs the CUTLASS headers" in out and "--no-build-isolation" in out, out[-2000:]


def test_pip_build_passes_the_cutlass_dir_and_the_extra_holds_the_build_tools():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    defines = cfg["tool"]["scikit-build"]["cmake"]["define"]
    assert defines["COMPASS_CUTLASS_DIR"]["env"] == "COMPASS_CUTLASS_DIR"
    extra = " ".join(cfg["project"]["optional-dependencies"]["cuda-build"])
    for pkg in ("nvidia-cutlass", "scikit-build-core", "pybind11", "cmake", "ninja"):
        assert pkg in extra
    assert not any(d.startswith("nvtx") for d in cfg["project"]["dependencies"])


def test_ci_builds_cuda_through_pip_and_runs_the_dry_run():
    ci = (ROOT / ".ci" / "run").read_text()
    check = (ROOT / ".ci" / "cuda_check.sh").read_text()
    assert "cuda_check.sh" in ci and "COMPASS_GPU_DRY_RUN=1" in ci
    assert "COMPASS_CUDA=1" in check and "pip\" wheel" not in check and "-m pip wheel" in check
    assert "--target _cuda" not in check  # no second, CMake-only build
    assert "import compass_kernels, compass_kernels._cuda" in check


# ---- defect: a source tree shadowing the installed package --------------------------------------


def test_gpu_check_runs_python_outside_the_source_tree():
    """Every Python step of bench/gpu_check.sh but pip runs with -P (no working directory on
    sys.path) from $OUT, and the import step rejects the source tree's package."""
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    calls = [line.strip() for line in text.splitlines() if '"$PY"' in line and not line.strip().startswith("#")]
    assert len(calls) >= 6, calls
    for line in calls:
        rest = line.split('"$PY"', 1)[1].split()
        assert rest[0] == "-P" or rest[:2] == ["-m", "pip"] or rest[0] == "-c", line
    assert '(cd "$OUT" && timeout' in text
    assert "the source tree shadows the installed package" in text


def test_source_tree_shadowing_the_installed_package_is_named(tmp_path):
    src = tmp_path / "checkout"
    shutil.copytree(ROOT / "compass_kernels", src / "compass_kernels",
                    ignore=shutil.ignore_patterns("*.so", "_build_info.py", "__pycache__"))
    (src / "csrc").mkdir()
    (src / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    code = textwrap.dedent("""
        import torch, compass_kernels as ck
        assert ck.__file__.startswith(%r), ck.__file__
        with ck.use_backend("cpu"):
            try:
                ck.quantize_fp8(torch.randn(4, 8), granularity="row")
            except RuntimeError as e:
                print(e)
    """ % str(src))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"}
    res = _run([sys.executable, "-c", code], cwd=src, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "shadows the installed package at" in res.stdout, res.stdout
    assert "python -P" in res.stdout


# ---- defect: compass_model imported nvtx unconditionally ---------------------------------------

_NO_NVTX = """
import sys
sys.modules["nvtx"] = None  # import nvtx -> ImportError, as on an image without the package
"""


def test_compass_model_runs_without_nvtx():
    code = _NO_NVTX + textwrap.dedent("""
        import torch
        import compass_model.cli, compass_model.distributed, compass_model.quant
        from compass_kernels import ranges
        from compass_model import moe
        from compass_model.config import CompassConfig
        assert type(ranges.nvtx).__name__ == "_TorchNvtx"
        m = moe.MoE(CompassConfig(d_model=24, num_experts=8, top_k=2, expert_ffn_dim=20))
        y = m(torch.randn(6, 24))
        y[0].sum().backward() if isinstance(y, tuple) else y.sum().backward()
        print("ok")
    """)
    res = _run([sys.executable, "-c", code], cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_gpu_bench_imports_without_nvtx():
    code = _NO_NVTX + "import runpy; runpy.run_path('bench/gpu_bench.py', run_name='not_main')\nprint('ok')"
    res = _run([sys.executable, "-c", code], cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_gpu_bench_rows_are_flushed_as_produced(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_bench
    finally:
        sys.path.remove(str(ROOT / "bench"))

    class Out:
        def __init__(self):
            self.parts, self.flushed = [], []

        def write(self, s):
            self.parts.append(s)

        def flush(self):
            self.flushed.append("".join(self.parts))

    out, log = Out(), tmp_path / "rows.jsonl"
    table = gpu_bench.Table(out=out, jsonl=str(log))
    table.emit({"section": "gemm", "name": "a", "ms": 1.0})
    assert out.flushed and "a" in out.flushed[-1]  # printed and flushed before the next row exists
    assert log.read_text().count("\n") == 1          # and on disk
    table.emit({"section": "gemm", "name": "b", "ms": 2.0})
    assert log.read_text().count("\n") == 2 and len(table.rows) == 2


# ---- defect: routing's CUDA launches had no device guard ----------------------------------------


def _cuda_calls_outside_device_guard(path: pathlib.Path) -> list[str]:
    """Calls into ``_ext.cuda_module`` (directly or through a local ``m = _ext.cuda_module``) that
    are not inside ``with torch.cuda.device(...)``; host-only queries are allowed."""
    host_only = ("route_workspace_numel", "grouped_gemm_supported", "grouped_gemm_fp8_supported")
    tree = ast.parse(path.read_text())
    bad = []

    def guarded(stack):
        return any(isinstance(n, ast.With) and any(
            ast.unparse(item.context_expr).startswith("torch.cuda.device(") for item in n.items) for n in stack)

    def visit(node, stack, aliases):
        if isinstance(node, ast.FunctionDef):
            aliases = set(aliases)
            for sub in ast.walk(node):
                if isinstance(sub, ast.Assign) and ast.unparse(sub.value) == "_ext.cuda_module":
                    aliases |= {t.id for t in sub.targets if isinstance(t, ast.Name)}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if (owner == "_ext.cuda_module" or owner in aliases) and node.func.attr not in host_only:
                if not guarded(stack):
                    bad.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
        for child in ast.iter_child_nodes(node):
            visit(child, stack + [node], aliases)

    visit(tree, [], set())
    return bad


@pytest.mark.parametrize("name", ["routing.py", "grouped_gemm.py", "fp8.py"])
def test_cuda_launches_run_under_the_tensors_device(name):
    assert _cuda_calls_outside_device_guard(ROOT / "compass_kernels" / name) == []


def test_device_guard_check_sees_an_unguarded_launch(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("def f(x):\n    m = _ext.cuda_module\n    m.permute(1)\n"
                 "    with torch.cuda.device(x.device):\n        m.unpermute(2)\n")
    assert _cuda_calls_outside_device_guard(p) == ["x.py:3 m.permute"]


# ---- defect: FP8 on sm_80 / sm_86 compiled Triton's fp8e4nv and crashed -------------------------


@pytest.mark.parametrize("cap,expect", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_triton_needs_sm89(monkeypatch, cap, expect):
    from compass_kernels import fp8

    fp8._triton_fp8_device.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    try:
        assert fp8._triton_fp8_device(torch.device("cuda", 0)) is expect
    finally:
        fp8._triton_fp8_device.cache_clear()
    assert fp8._triton_fp8_device(torch.device("cpu")) is True  # the interpreter


@pytest.mark.filterwarnings("ignore:compass.*sm_89:RuntimeWarning")
def test_fp8_below_sm89_runs_the_torch_reference(monkeypatch):
    """The op layer's choice on an sm_80 device: torch for quantize and the GEMM, never Triton."""
    from compass_kernels import fp8

    fp8._triton_fp8_device.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    try:
        for op in ("quantize_fp8", "grouped_gemm_fp8"):
            assert fp8._fp8_backend(op, "triton", torch.device("cuda", 0)) == "torch"
            assert fp8._fp8_backend(op, "triton", torch.device("cpu")) == "triton"
        assert fp8._fp8_backend("grouped_gemm_fp8", "cuda", torch.device("cuda", 0)) == "cuda"
    finally:
        fp8._triton_fp8_device.cache_clear()


# ---- the kit on CPU ------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_smoke_on_cpu_passes_every_triton_check():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = _run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--min-pass", "15"], env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "0 FAIL" in res.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_exits_0(tmp_path):
    """The dry run against the packages this process imported (copied to a site folder, compiled
    modules included: the installed package, or a source tree built in place)."""
    import compass_kernels
    import compass_model

    site = tmp_path / "site"
    for mod in (compass_kernels, compass_model):
        src = pathlib.Path(mod.__file__).resolve().parent
        shutil.copytree(src, site / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "COMPASS_GPU_DRY_RUN": "1", "SITE": str(site), "OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    res = _run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, timeout=1500)
    assert res.returncode == 0, res.stdout[-4000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "PASS smoke" in summary and "PASS bench" in summary and "PASS import" in summary
