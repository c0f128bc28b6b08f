"""The FP8 GEMM accumulation bounds (tests/fp8_bounds.py) against an emulation of Hopper's FP8 MMA.

A compiled FP8 GEMM on an H100 / H200 keeps ~14 bits inside each 32-product k-step; the fp32 bound
the interpreter tests use would fail such a correct kernel by several times. The GPU bound must
hold for it, and the strict bound must still catch it (so the interpreter keeps the strict one).
"""

from __future__ import annotations

import torch

from fp8_bounds import calc_diff, emulate_hopper_fp8_dot, fp8_accumulation_bound


def _fp8_operands(M, K, N, positive: bool, gen):
    a = torch.rand(M, K, generator=gen) if positive else torch.randn(M, K, generator=gen)
    b = torch.rand(K, N, generator=gen) if positive else torch.randn(K, N, generator=gen)
    return a.to(torch.float8_e4m3fn).float(), b.to(torch.float8_e4m3fn).float()


def test_hopper_accumulation_breaks_the_fp32_bound_and_meets_the_gpu_bound():
    gen = torch.Generator().manual_seed(0)
    K = 2048
    a, b = _fp8_operands(8, K, 8, positive=True, gen=gen)  # same-sign terms: truncation adds up
    got = emulate_hopper_fp8_dot(a, b).double()
    exact = a.double() @ b.double()
    ref_abs = a.double().abs() @ b.double().abs()
    err = (got - exact).abs()
    strict = fp8_accumulation_bound(K, ref_abs, tensor_core=False)
    assert (err / strict).max() > 2, "the emulation must be what failed the strict bound on a GPU"
    assert (err <= fp8_accumulation_bound(K, ref_abs, tensor_core=True)).all()
    assert calc_diff(got, exact) < 1e-3


def test_gpu_bound_holds_for_mixed_signs_and_short_k():
    gen = torch.Generator().manual_seed(1)
    for K in (33, 336, 1408):
        a, b = _fp8_operands(6, K, 5, positive=False, gen=gen)
        got = emulate_hopper_fp8_dot(a, b).double()
        exact = a.double() @ b.double()
        ref_abs = a.double().abs() @ b.double().abs()
        assert ((got - exact).abs() <= fp8_accumulation_bound(K, ref_abs, tensor_core=True)).all()


def test_calc_diff():
    x = torch.randn(100, dtype=torch.float64)
    assert calc_diff(x, x) == 0.0 and calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    assert abs(calc_diff(x, -x) - 2.0) < 1e-12
