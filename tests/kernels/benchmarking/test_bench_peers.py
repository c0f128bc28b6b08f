"""compass_kernels.benchmarking.peers compute what the ops compute; the harness imports torch only."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import compass_kernels as ck
from compass_kernels.benchmarking import peers
from compass_kernels.fp8_ref import quantize_fp8_ref
from compass_kernels.grouped_gemm_ref import grouped_gemm_ref
from compass_kernels.sort_chunks import sort_chunks_ref
from helpers import REPO_ROOT, make_ids


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_megatron_and_hf_routing_match_the_ops(kind):
    T, H, E, k = 41, 12, 8, 3
    x, ids, probs = torch.randn(T, H), make_ids(T, k, E, kind).contiguous(), torch.rand(T, k)
    plan = ck.route(ids, E)
    ref = ck.unpermute(ck.permute(x, plan), plan, probs)
    xp, sorted_idx, tpe = peers.megatron_dispatch(x, ids, E)
    assert torch.equal(xp, ck.permute(x, plan)) and torch.equal(tpe, plan.tokens_per_expert)
    torch.testing.assert_close(peers.megatron_combine(xp, sorted_idx, probs, T), ref)
    torch.testing.assert_close(peers.megatron_moe_routing(x, ids, probs, E), ref)
    lists = peers.hf_lists(ids, E)
    torch.testing.assert_close(peers.hf_combine([x.index_select(0, t) for t, _ in lists], lists, probs, T), ref)


def test_mm_cat_and_split_cat():
    x, w = torch.randn(30, 8), torch.randn(4, 8, 5)
    off = torch.tensor([0, 7, 7, 20, 30])
    torch.testing.assert_close(peers.mm_cat(x, w, off), grouped_gemm_ref(x, w, off))
    sizes, order = torch.tensor([10, 0, 15, 5]), torch.tensor([2, 0, 3, 1])
    assert torch.equal(peers.split_cat(x, sizes, order), sort_chunks_ref(x, sizes, order, 30))


@pytest.mark.parametrize("gran", ["row", "block", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_quantize_matches_the_reference(gran, dtype):
    x = (torch.randn(6, 256) * 3).to(dtype)
    data, scale = peers.eager_quantize_fp8(x, gran)
    want_data, want_scale = quantize_fp8_ref(x, gran, 128)
    assert torch.equal(data.view(torch.uint8), want_data.view(torch.uint8))
    assert torch.equal(scale.reshape(-1), want_scale.reshape(-1))
    with pytest.raises(ValueError, match="granularity"):
        peers.eager_quantize_fp8(x, "column")


def test_naive_moe_is_the_layer():
    from compass_model.config import CompassConfig
    from compass_model.moe import MoE

    cfg = CompassConfig(d_model=16, n_heads=1, n_kv_heads=1, num_experts=8, top_k=2, expert_ffn_dim=8)
    layer = MoE(cfg).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(peers.naive_moe(layer, x), layer(x)[0], rtol=1e-4, atol=1e-5)


def test_the_harness_imports_torch_only_and_is_not_loaded_by_the_package():
    code = (
        "import sys, torch\n"
        "import compass_kernels\n"
        "assert 'compass_kernels.benchmarking' not in sys.modules, 'loaded by import compass_kernels'\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "import compass_kernels.benchmarking\n"
        "new = {m.split('.')[0] for m in sys.modules} - before - set(sys.stdlib_module_names)\n"
        "assert not new, f'the harness needs more than torch and the standard library: {new}'\n"
        "assert 'pytest' not in sys.modules and 'compass_model' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_harness_sources_import_torch_and_the_standard_library_only():
    """Static: torch already imports numpy when it is installed, so the run-time check above cannot
    see a numpy import; the import statements can."""
    import ast

    allowed = set(sys.stdlib_module_names) | {"torch", "compass_kernels", "__future__"}
    for path in (REPO_ROOT / "compass_kernels" / "benchmarking").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
