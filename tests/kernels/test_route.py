"""route: the reference against a plain loop, every backend against the reference (exact)."""

from __future__ import annotations

import pytest
import torch

import compass_kernels as ck
from compass_kernels.routing_ref import num_rows_bound, route_ref
from helpers import make_ids, route_oracle

CASES = [
    # (T, k, E, kind, capacity, align)
    (0, 2, 16, "uniform", None, 1),
    (1, 1, 1, "uniform", None, 1),
    (1, 2, 16, "uniform", None, 1),
    (13, 2, 16, "uniform", None, 1),
    (97, 2, 16, "skewed", None, 1),
    (97, 8, 128, "uniform", None, 1),
    (53, 8, 8, "uniform", None, 1),          # k = E
    (31, 16, 16, "uniform", None, 1),        # k = E = 16
    (61, 2, 16, "one", None, 1),             # all slots on one expert (duplicates)
    (61, 2, 16, "empty", None, 1),           # half the experts receive nothing
    (61, 4, 16, "holes", None, 1),           # -1 slots (variable k)
    (97, 2, 16, "skewed", 5, 1),             # capacity drops
    (97, 2, 16, "skewed", 0, 1),             # capacity 0 drops everything
    (97, 2, 16, "uniform", None, 8),         # align padding
    (97, 4, 16, "holes", 7, 4),              # all together
    (1009, 8, 128, "skewed", 40, 16),
]


@pytest.mark.parametrize("T,k,E,kind,capacity,align", CASES)
def test_route_ref_matches_loop(T, k, E, kind, capacity, align):
    ids = make_ids(T, k, E, kind)
    got = route_ref(ids, E, capacity, align)
    want = route_oracle(ids, E, capacity, align)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,k,E,kind,capacity,align", CASES)
def test_route_backend_exact(kernel_backend, T, k, E, kind, capacity, align, dtype):
    ids = make_ids(T, k, E, kind, dtype=dtype)
    plan = ck.route(ids, E, capacity=capacity, align=align)
    want = route_oracle(ids, E, capacity, align)
    assert torch.equal(plan.row_id_map, want[0])
    assert torch.equal(plan.tokens_per_expert, want[1])
    assert torch.equal(plan.expert_offsets, want[2])
    assert plan.row_id_map.dtype == plan.tokens_per_expert.dtype == plan.expert_offsets.dtype == torch.int64
    assert int(plan.expert_offsets[-1]) <= plan.num_rows


def test_route_large_skewed(kernel_backend):
    """Big enough to take the multi-threaded / multi-block paths."""
    ids = make_ids(20011 if kernel_backend == "cpu" else 2003, 8, 128, "skewed")
    plan = ck.route(ids, 128, capacity=300, align=8)
    want = route_ref(ids, 128, 300, 8)
    assert torch.equal(plan.row_id_map, want[0])
    assert torch.equal(plan.expert_offsets, want[2])


@pytest.mark.parametrize("T,k,E,capacity,align", [(0, 2, 16, None, 4), (5, 2, 16, None, 1), (100, 2, 4, None, 8),
                                                   (100, 8, 128, None, 128), (100, 2, 16, 3, 4), (3, 2, 16, 100, 1)])
def test_num_rows_is_an_upper_bound(T, k, E, capacity, align):
    """The static bound holds for the worst layouts: all on one expert, or spread over all experts."""
    bound = num_rows_bound(T, k, E, capacity, align)
    if capacity is None and align == 1:
        assert bound == T * k
    for kind in ("one", "uniform", "skewed"):
        ids = make_ids(T, k, E, kind)
        _, _, off = route_ref(ids, E, capacity, align)
        assert int(off[-1]) <= bound
    # one token per expert: every expert pays its full padding
    ids = (torch.arange(T * k) % E).reshape(T, k) if T else torch.empty(0, k, dtype=torch.int64)
    assert int(route_ref(ids, E, capacity, align)[2][-1]) <= bound


def test_plan_fields():
    plan = ck.route(make_ids(7, 2, 4), 4)
    assert (plan.num_tokens, plan.topk, plan.num_experts, plan.num_rows) == (7, 2, 4, 14)
    with pytest.raises(Exception):
        plan.num_rows = 3  # frozen
