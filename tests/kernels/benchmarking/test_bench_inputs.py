"""compass_kernels.benchmarking.inputs: the routing patterns and group sizes have their properties."""

from __future__ import annotations

import pytest
import torch

from compass_kernels.benchmarking.inputs import ROUTING_KINDS, group_sizes, offsets_of, topk_ids


def _distinct_per_row(ids):
    s = ids.sort(dim=1).values
    return bool((s[:, 1:] != s[:, :-1]).all())


@pytest.mark.parametrize("kind", ROUTING_KINDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_shape_dtype_range(kind, dtype):
    ids = topk_ids(300, 4, 16, kind, dtype=dtype)
    assert ids.shape == (300, 4) and ids.dtype == dtype
    assert int(ids.min()) >= -1 and int(ids.max()) < 16
    assert (ids >= 0).all() or kind == "holes"


def test_uniform_is_distinct_and_balanced():
    ids = topk_ids(20000, 2, 16)
    assert _distinct_per_row(ids)
    load = torch.bincount(ids.flatten(), minlength=16).double() / ids.numel()
    assert (load - 1 / 16).abs().max() < 0.01


def test_skewed_is_distinct_and_hot_at_expert_zero():
    ids = topk_ids(20000, 2, 16, "skewed")
    assert _distinct_per_row(ids)
    load = torch.bincount(ids.flatten(), minlength=16).double() / ids.numel()
    assert load[0] > 3 / 16 and (load[:-1] >= load[1:] - 0.01).all()    # decreasing with the expert


def test_one_holes_empty():
    assert (topk_ids(9, 3, 8, "one") == 0).all()
    holes = topk_ids(20000, 2, 8, "holes")
    assert abs(float((holes == -1).double().mean()) - 0.25) < 0.01
    assert abs(float((topk_ids(20000, 2, 8, "holes", drop=0.5) == -1).double().mean()) - 0.5) < 0.01
    empty = topk_ids(5000, 2, 8, "empty")
    assert int(empty.max()) < 4 and _distinct_per_row(empty)


def test_more_slots_than_experts_repeat():
    ids = topk_ids(50, 6, 4)                       # k > E: experts repeat within a token
    assert int(ids.max()) < 4 and ids.shape == (50, 6)
    assert int(topk_ids(50, 3, 4, "empty").max()) < 2
    assert topk_ids(50, 6, 4, "skewed").shape == (50, 6)


def test_empty_batch_and_generator():
    assert topk_ids(0, 2, 8).shape == (0, 2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for kind in ROUTING_KINDS:
        assert torch.equal(topk_ids(40, 2, 8, kind, generator=g1), topk_ids(40, 2, 8, kind, generator=g2))


@pytest.mark.parametrize("kwargs, name", [
    (dict(kind="zipf"), "kind"), (dict(drop=1.5), "drop"), (dict(num_experts=0), "num_experts"),
])
def test_bad_arguments_are_named(kwargs, name):
    args = dict(tokens=4, top_k=2, num_experts=8) | kwargs
    with pytest.raises(ValueError, match=name):
        topk_ids(**args)


def test_group_sizes_and_offsets():
    u = group_sizes(100, 8)
    assert u.tolist() == [16] + [12] * 7 and u.dtype == torch.int64
    s = group_sizes(16384, 128, "skewed")
    assert int(s.sum()) == 16384 and (s[:-1] >= s[1:]).all() and int(s[0]) > 16384 // 4
    assert offsets_of(torch.tensor([3, 0, 2])).tolist() == [0, 3, 3, 5]
    with pytest.raises(ValueError, match="kind"):
        group_sizes(10, 2, "holes")
