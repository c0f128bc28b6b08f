"""The byte counts behind bench/baseline_cpu.json: its fraction_of_copy entries were measured when
permute and unpermute were charged their activations only; the harness adds the row map and the
gates. The shift must stay far inside report.py's slack, or the stored baseline would need a rerun."""

from __future__ import annotations

import json

import pytest

from compass_kernels.benchmarking.models import permute_bytes, unpermute_bytes
from helpers import REPO_ROOT

T, H = 8192, 2048                                      # bench/test_routing_bench.py
SHAPES = {"E16k2": 2, "E128k8": 8}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", ["permute", "unpermute"])
def test_op_fractions_of_copy_in_the_baseline_stay_comparable(op, shape):
    k = SHAPES[shape]
    base = json.loads((REPO_ROOT / "bench" / "baseline_cpu.json").read_text())
    assert f"op/{shape}/{op}/fraction_of_copy" in base
    activations = (T + T * k) * H * 4                  # the earlier count, also the copy's bytes
    now = (permute_bytes if op == "permute" else unpermute_bytes)(T, H, k, 4)
    assert 0 < now / activations - 1 < 0.002           # report.py's default slack is 25%
