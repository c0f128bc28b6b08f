"""Triton grouped GEMM kernels against the float64 reference loop (grouped_gemm_ref).

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set here unless the
environment already chose); with TRITON_INTERPRET=0 on a CUDA machine the same tests run the
compiled kernels on the GPU (and add bf16, whose tl.dot the interpreter gets wrong). Outputs are
poisoned with NaN, so a row or tile the kernel forgets to write fails.
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from compass_kernels.grouped_gemm_ref import grouped_gemm_ref, grouped_gemm_wgrad_ref  # noqa: E402
from compass_kernels.triton import grouped_gemm as gg  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
TINY = gg.GemmConfig(16, 16, 16, num_warps=4, num_stages=2)  # many tiles and K steps per case


# ----------------------------------------------------------------------------------------------
# Inputs and the error bound
# ----------------------------------------------------------------------------------------------

def make_offsets(M: int, E: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """offsets [E + 1] int64 for a grouping pattern.

    full:  groups cover [0, M), random sizes (empty groups likely)
    gaps:  offsets[0] > 0 and offsets[E] < M (head and tail rows must be zeroed)
    one:   all rows in one group (the middle expert), the others empty
    empty: every group empty, all rows zero
    """
    if kind == "one":
        offs = [0] * (E // 2 + 1) + [M] * (E - E // 2)
    elif kind == "empty":
        offs = [M // 2] * (E + 1)
    else:
        lo, hi = (0, M) if kind == "full" else (min(M, 1 + M // 10), max(0, M - 1 - M // 7))
        hi = max(lo, hi)
        cuts = sorted(torch.randint(lo, hi + 1, (E - 1,), generator=gen).tolist())
        offs = [lo] + cuts + [hi]
        if E >= 3 and kind == "full":  # force an empty group in the middle
            offs[E // 2] = offs[E // 2 + 1]
    return torch.tensor(offs, dtype=torch.int64, device=DEVICE)


def randn(shape, dtype, gen, row_pad: int = 0):
    """Fresh random values; row_pad > 0 gives a view with row stride > the row length."""
    rows, cols = shape[0], shape[-1]
    if row_pad:
        full = torch.randn(rows, cols + row_pad, generator=gen).to(dtype)
        return full.to(DEVICE)[:, :cols]
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_close_to_ref(got, ref64, abs64, k: int):
    """|got - ref| <= eps_out/2 |ref| + 1.01 k eps_acc sum|terms| + tiny: one rounding to the
    output dtype plus the worst case of k additions in the accumulator (fp32; fp64 for fp64),
    tight enough that fp16 accumulation fails the wgrad cases. Interpreter gap: its fp32 -> 16-bit
    cast truncates instead of rounding to nearest, so 16-bit outputs get a whole ulp there."""
    got = got.cpu()
    eps_out = torch.finfo(got.dtype).eps
    eps_acc = torch.finfo(torch.float64 if got.dtype == torch.float64 else torch.float32).eps
    rounding = eps_out if (INTERPRET and got.dtype.itemsize == 2) else eps_out / 2
    bound = rounding * ref64.abs() + 1.01 * k * eps_acc * abs64
    bound += torch.finfo(got.dtype).tiny
    assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) or overflowed elements"
    err = (got.double() - ref64).abs()
    assert (err <= bound).all(), f"max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}"


def gemm_ref64(x, w, offsets, trans_b):
    """(reference, reference of |x| |w|) in float64 from the lead's reference loop."""
    xd, wd, o = x.cpu().double(), w.cpu().double(), offsets.cpu()
    return grouped_gemm_ref(xd, wd, o, trans_b), grouped_gemm_ref(xd.abs(), wd.abs(), o, trans_b)


def wgrad_ref64(x, dy, offsets, trans_b):
    xd, dyd, o = x.cpu().double(), dy.cpu().double(), offsets.cpu()
    E = o.numel() - 1
    return (grouped_gemm_wgrad_ref(xd, dyd, o, E, trans_b),
            grouped_gemm_wgrad_ref(xd.abs(), dyd.abs(), o, E, trans_b))


def run_gemm(x, w, offsets, trans_b, config=None):
    N = w.shape[1] if trans_b else w.shape[2]
    out = nan_like((x.shape[0], N), x.dtype)
    gg.grouped_gemm(x, w, offsets, trans_b, out, config)
    return out


def run_wgrad(x, dy, offsets, trans_b, config=None):
    E, K, N = offsets.numel() - 1, x.shape[1], dy.shape[1]
    out = nan_like((E, N, K) if trans_b else (E, K, N), x.dtype)
    gg.grouped_gemm_wgrad(x, dy, offsets, trans_b, out, config)
    return out


def check_gemm(x, w, offsets, trans_b, config=None):
    out = run_gemm(x, w, offsets, trans_b, config)
    ref, ref_abs = gemm_ref64(x, w, offsets, trans_b)
    assert_close_to_ref(out, ref, ref_abs, x.shape[1])
    o = offsets.cpu().tolist()
    outside = torch.cat([out[: o[0]], out[o[-1]:]]).cpu()
    assert torch.equal(outside, torch.zeros_like(outside)), "rows outside the groups must be 0"


def check_wgrad(x, dy, offsets, trans_b, config=None):
    out = run_wgrad(x, dy, offsets, trans_b, config)
    ref, ref_abs = wgrad_ref64(x, dy, offsets, trans_b)
    sizes = offsets.cpu().diff()
    assert_close_to_ref(out, ref, ref_abs, int(sizes.max()) if sizes.numel() else 0)
    empty = out[(sizes == 0).to(out.device)].cpu()
    assert torch.equal(empty, torch.zeros_like(empty)), "empty groups must get exact zeros"


# ----------------------------------------------------------------------------------------------
# Shapes: every (M, K) pair; N and E cycle so that all (N, E) pairs occur; the grouping pattern
# and the tile config alternate. Each case runs both dtypes and both layouts.
# ----------------------------------------------------------------------------------------------

_KINDS = ["gaps", "full", "one", "empty"]
CASES = [(M, K, [1, 8, 24][i % 3], [1, 3, 8][(i // 3) % 3], _KINDS[(i + i // 4) % 4], i % 2 == 0)
         for i, (M, K) in enumerate(itertools.product([0, 1, 37, 100], [0, 1, 16, 33]))]


def _id(case):
    M, K, N, E, kind, tiny = case
    return f"M{M}-K{K}-N{N}-E{E}-{kind}-{'tiny' if tiny else 'heur'}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_grouped_gemm(case):
    M, K, N, E, kind, tiny = case
    gen = torch.Generator().manual_seed(M * 7919 + K * 31 + N * 7 + E)
    offsets = make_offsets(M, E, kind, gen)
    for dtype, trans_b in itertools.product(DTYPES, (False, True)):
        x = randn((M, K), dtype, gen, row_pad=3 if trans_b else 0)
        w = randn((E, N, K) if trans_b else (E, K, N), dtype, gen)
        check_gemm(x, w, offsets, trans_b, TINY if tiny else None)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_grouped_gemm_wgrad(case):
    M, K, N, E, kind, tiny = case
    gen = torch.Generator().manual_seed(M * 7919 + K * 31 + N * 7 + E + 1)
    offsets = make_offsets(M, E, kind, gen)
    for dtype, trans_b in itertools.product(DTYPES, (False, True)):
        x = randn((M, K), dtype, gen, row_pad=2 if trans_b else 0)
        dy = randn((M, N), dtype, gen, row_pad=0 if trans_b else 5)
        check_wgrad(x, dy, offsets, trans_b, TINY if tiny else None)


@pytest.mark.parametrize("chunk,programs", [(4, 1), (4, 3), (8, 4)])
def test_grouped_gemm_group_chunks(monkeypatch, chunk, programs):
    """More groups than fit in one register chunk: each program advances through the chunks
    (1 and 3 programs: every program sees several chunks, some tiles past the real count)."""
    monkeypatch.setattr(gg, "_GROUP_CHUNK", chunk)
    monkeypatch.setattr(gg, "_INTERPRET_PROGRAMS", programs)
    if not INTERPRET:
        monkeypatch.setattr(gg, "_num_programs", lambda device: programs)
    gen = torch.Generator().manual_seed(chunk * 10 + programs)
    M, K, N = 100, 33, 24
    for E, kind in [(8, "gaps"), (13, "full"), (6, "one")]:
        offsets = make_offsets(M, E, kind, gen)
        x = randn((M, K), torch.float32, gen)
        w = randn((E, K, N), torch.float32, gen)
        check_gemm(x, w, offsets, False, TINY)


def test_grouped_gemm_many_experts():
    """E = 1024 (5 chunks of 256 groups with the default chunk), most groups empty."""
    gen = torch.Generator().manual_seed(5)
    M, K, N, E = 100, 16, 8, 1024
    offsets = make_offsets(M, E, "gaps", gen)
    x = randn((M, K), torch.float16, gen)
    w = randn((E, N, K), torch.float16, gen)
    check_gemm(x, w, offsets, True)


@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_fp64(trans_b):
    """fp64 operands accumulate in fp64 (the op layer's float64 path)."""
    gen = torch.Generator().manual_seed(64 + trans_b)
    M, K, N, E = 100, 33, 24, 3
    offsets = make_offsets(M, E, "gaps", gen)
    x = randn((M, K), torch.float64, gen)
    w = randn((E, N, K) if trans_b else (E, K, N), torch.float64, gen)
    check_gemm(x, w, offsets, trans_b, TINY)
    check_wgrad(x, randn((M, N), torch.float64, gen), offsets, trans_b, TINY)


def test_config_validation():
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        gg.GemmConfig(48, 64, 64)
    with pytest.raises(ValueError, match="num_warps"):
        gg.GemmConfig(64, 64, 64, num_warps=3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for mpg, N, K in [(2048, 1408, 2048), (1024, 2048, 1408), (128, 256, 1024), (4, 8, 16)]:
            for cfg in (gg.gemm_config(mpg, N, K, dtype), gg.wgrad_config(mpg, K, N, dtype)):
                stage = cfg.block_k * (cfg.block_m + cfg.block_n) * dtype.itemsize
                assert cfg.num_stages * stage <= 227 * 1024
