"""The Triton launch-option table: launchers and the ahead-of-time check compile the same kernel.

A kernel that promises the C++ backends' bits (``bit_exact``) must not be FMA-contracted at
launch; the AOT compile (real PTX for sm_90, no GPU needed) is checked for ``fma`` here.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from compass_kernels.triton import aot
from compass_kernels.triton.launch import LAUNCH, Launch, launch
from helpers import REPO_ROOT

ROOT = REPO_ROOT
TRITON_DIR = ROOT / "compass_kernels" / "triton"


def _kernel_key(name: str) -> str:
    """``_unpermute_bwd_kernel`` -> ``unpermute_bwd``: a kernel's entry in the table."""
    assert name.startswith("_") and name.endswith("_kernel"), name
    return name[1:-len("_kernel")]


def _launch_calls():
    """(file, kernel name, ast.Call) for every ``kernel[grid](...)`` launch in the package."""
    for path in sorted(TRITON_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel")):
                yield path.name, node.func.value.id, node


def test_every_launch_takes_its_options_from_the_table():
    calls = list(_launch_calls())
    assert len(calls) >= 14, [c[1] for c in calls]
    for fname, kernel, call in calls:
        where = f"{fname}: {kernel}[...](...) line {call.lineno}"
        literal = {kw.arg for kw in call.keywords} & {"num_warps", "num_stages", "enable_fp_fusion"}
        assert not literal, f"{where} passes {literal} itself instead of through launch()"
        spread = [kw.value for kw in call.keywords if kw.arg is None]
        assert len(spread) == 1 and isinstance(spread[0], ast.Call) and getattr(spread[0].func, "id", "") == "launch", \
            f"{where} must pass **launch(<table entry>)"
        assert ast.literal_eval(spread[0].args[0]) == _kernel_key(kernel), where


def test_every_aot_case_compiles_the_launchers_options():
    cases = aot.collect_cases()
    assert len(cases) > 50
    covered = set()
    for _, kernel, _, _, name, options in cases:
        assert "launch" in options and "enable_fp_fusion" not in options, name
        fn = getattr(kernel, "fn", kernel)
        assert options["launch"] == _kernel_key(fn.__name__), name
        covered.add(options["launch"])
    assert covered == set(LAUNCH), f"table entries without an AOT case: {set(LAUNCH) - covered}"


def test_table_rules():
    with pytest.raises(ValueError, match="bit_exact"):
        Launch(True, num_warps=4, bit_exact=True)
    assert launch("unpermute") == {"enable_fp_fusion": False, "num_warps": 4}
    assert launch("grouped_gemm", num_warps=8, num_stages=3) == {
        "enable_fp_fusion": True, "num_warps": 8, "num_stages": 3}
    with pytest.raises(ValueError, match="comes from the table"):
        launch("unpermute", num_warps=8)
    with pytest.raises(ValueError, match="needs num_warps"):
        launch("grouped_gemm")
    for name in ("unpermute", "unpermute_bwd", "permute"):
        assert LAUNCH[name].bit_exact and not LAUNCH[name].enable_fp_fusion


_PTX_SCRIPT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
from compass_kernels.triton import aot, launch as L
rows = {}
for case in aot.collect_cases():
    if case[4] in ("unpermute_fp32_probs", "unpermute_bf16_probs", "unpermute_bwd_bf16_k8"):
        r = aot.compile_case(case)
        rows[case[4]] = {"error": r.get("error"), "fma": r.get("fma"), "opts": r.get("options")}
# the detector is not vacuous: the same kernel with fusion on is contracted
object.__setattr__(L.LAUNCH["unpermute"], "enable_fp_fusion", True)
case = next(c for c in aot.collect_cases() if c[4] == "unpermute_fp32_probs")
r = aot.compile_case(case)
rows["fused"] = {"error": r.get("error"), "fma": r.get("fma"), "opts": r.get("options")}
print(json.dumps(rows))
"""


def test_bit_exact_kernels_have_no_fma_in_their_ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("unpermute_fp32_probs", "unpermute_bf16_probs", "unpermute_bwd_bf16_k8"):
        assert rows[name]["error"] is None, rows[name]
        assert rows[name]["opts"]["enable_fp_fusion"] is False
        assert rows[name]["fma"] == [], f"{name}: {rows[name]['fma'][:2]}"
    assert rows["fused"]["error"] is None and rows["fused"]["fma"], rows["fused"]
