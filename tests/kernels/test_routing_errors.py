"""Bad inputs get a ValueError / TypeError that names the argument and the expectation."""

from __future__ import annotations

import pytest
import torch

import compass_kernels as ck


@pytest.mark.parametrize(
    "ids,E,kwargs,exc,match",
    [
        (torch.tensor([[0, 16]]), 16, {}, ValueError, r"topk_ids .*\[-1, 16\).*16"),
        (torch.tensor([[0, -2]]), 16, {}, ValueError, r"topk_ids .*found -2"),
        (torch.tensor([[0.0, 1.0]]), 16, {}, TypeError, r"topk_ids must be int32 or int64, got torch.float32"),
        (torch.tensor([0, 1]), 16, {}, ValueError, r"topk_ids must be 2-D"),
        ([[0, 1]], 16, {}, TypeError, r"topk_ids must be a torch.Tensor"),
        (torch.tensor([[0, 1]]), 0, {}, ValueError, r"num_experts must be an int >= 1"),
        (torch.tensor([[0, 1]]), 16, {"align": 0}, ValueError, r"align must be an int >= 1"),
        (torch.tensor([[0, 1]]), 16, {"capacity": -1}, ValueError, r"capacity must be None or an int >= 0"),
    ],
)
def test_route_bad_inputs(ids, E, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ck.route(ids, E, **kwargs)


def _plan():
    return ck.route(torch.tensor([[0, 1], [1, 2], [2, 0]]), 4)


def test_permute_bad_inputs():
    plan = _plan()
    with pytest.raises(ValueError, match=r"x must have 3 rows \(from the plan\), got 4"):
        ck.permute(torch.randn(4, 8), plan)
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        ck.permute(torch.randn(3, 8, 2), plan)
    with pytest.raises(ValueError, match=r"probs must have shape \[T, k\] = \[3, 2\], got \(3, 3\)"):
        ck.permute(torch.randn(3, 8), plan, probs=torch.rand(3, 3))
    with pytest.raises(TypeError, match=r"probs must be a floating-point tensor"):
        ck.permute(torch.randn(3, 8), plan, probs=torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"plan must be a RoutingPlan"):
        ck.permute(torch.randn(3, 8), {"row_id_map": None})


def test_unpermute_bad_inputs():
    plan = _plan()
    with pytest.raises(ValueError, match=r"y must have 6 rows \(from the plan\), got 5"):
        ck.unpermute(torch.randn(5, 8), plan)
    with pytest.raises(TypeError, match=r"y must be float32, float64, float16 or bfloat16, got torch.int32"):
        ck.unpermute(torch.ones(6, 8, dtype=torch.int32), plan)
    with pytest.raises(ValueError, match=r"probs must have shape \[T, k\]"):
        ck.unpermute(torch.randn(6, 8), plan, probs=torch.rand(2, 3))


def test_cpu_kernel_rejects_out_of_range_ids_too():
    """Defence in depth: the C++ route refuses ids the Python check would have caught."""
    from compass_kernels import _ext

    if _ext.cpu_module is None:
        pytest.skip("compass_kernels._cpu not built")
    ids = torch.tensor([[0, 9]])
    out = [torch.empty(1, 2, dtype=torch.int64), torch.empty(4, dtype=torch.int64), torch.empty(5, dtype=torch.int64)]
    with pytest.raises(ValueError, match="topk_ids"):
        _ext.cpu.route(topk_ids=ids, T=1, k=2, E=4, capacity=-1, align=1, row_id_map=out[0], tokens_per_expert=out[1],
                       expert_offsets=out[2], workspace=None)
