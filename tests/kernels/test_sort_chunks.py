"""sort_chunks: reference vs a Python loop, bit-exact backends, autograd, opcheck, torch.compile."""

from __future__ import annotations

import importlib

import pytest
import torch

import compass_kernels as ck
from compass_kernels import _backend
from compass_kernels.sort_chunks import sort_chunks_ref

# the package's sort_chunks attribute is the function; the op lives in the module
sc_mod = importlib.import_module("compass_kernels.sort_chunks")

CASES = [
    # (split_sizes, sorted_idxs, R, num_rows): R may exceed sum(sizes); num_rows None -> R
    ([5, 3, 4], [2, 0, 1], 12, None),
    ([3, 0, 5, 2, 0], [2, 0, 4, 3, 1], 10, None),           # empty chunks
    ([7], [0], 7, None),                                      # S = 1
    ([0, 0, 0], [1, 2, 0], 0, None),                          # zero rows
    ([0, 0], [1, 0], 4, None),                                # all chunks empty, R > 0
    ([2, 3, 1], [1, 2, 0], 9, None),                          # rows past the chunks are not read
    ([2, 3, 1], [2, 1, 0], 6, 11),                            # num_rows > R: zero tail
    ([4, 4, 4], [2, 0, 1], 12, 7),                            # num_rows < total: truncated
    ([], [], 5, None),                                        # S = 0
    ([1, 0, 2, 6, 0, 3, 1, 5], [4, 0, 5, 1, 6, 2, 7, 3], 18, None),  # the EP (source, expert) transpose
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.int32]


def loop_ref(x, sizes, order, num_rows=None):
    """The oracle: slice the chunks on the host, concatenate in order, pad or cut to num_rows."""
    n = x.shape[0] if num_rows is None else num_rows
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    parts = [x[starts[i]: starts[i] + sizes[i]] for i in order]
    out = torch.cat(parts + [x.new_zeros(n, x.shape[1])])
    return out[:n]


def _x(R, H, dtype):
    x = torch.randn(R, H) * 4
    if dtype == torch.int32:
        return (x * 1000).to(torch.int32)
    return x.to(dtype)


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _args(sizes, order):
    return torch.tensor(sizes, dtype=torch.int64), torch.tensor(order, dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_loop(case, dtype):
    sizes, order, R, num_rows = case
    x = _x(R, 5, dtype)
    out = sort_chunks_ref(x, *_args(sizes, order), num_rows)
    assert torch.equal(_bits(out), _bits(loop_ref(x, sizes, order, num_rows)))


def _skip_unimplemented(backend):
    if backend not in _backend._registry.impls["sort_chunks"]:
        pytest.skip(f"sort_chunks has no {backend} backend")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_backend_bit_exact(kernel_backend, case, dtype):
    _skip_unimplemented(kernel_backend)
    sizes, order, R, num_rows = case
    H = 37 if dtype != torch.float64 else 3
    x = _x(R, H, dtype)
    if dtype == torch.float32 and R:
        x[0, 0] = float("nan")                     # payload bits and -0.0 must survive
        x[-1, -1] = -0.0
    out = ck.sort_chunks(x, *_args(sizes, order), num_rows=num_rows)
    assert torch.equal(_bits(out), _bits(loop_ref(x, sizes, order, num_rows)))


def test_backend_random_and_strided(kernel_backend):
    _skip_unimplemented(kernel_backend)
    g = torch.Generator().manual_seed(3)
    S = 24
    sizes = torch.randint(0, 6, (S,), generator=g)
    sizes[::5] = 0
    order = torch.randperm(S, generator=g)
    R = int(sizes.sum()) + 3
    x = torch.randn(R, 80, dtype=torch.bfloat16)[:, 5:70]   # row stride 80 > H = 65
    out = ck.sort_chunks(x, sizes, order, num_rows=R + 2)
    assert torch.equal(_bits(out), _bits(loop_ref(x, sizes.tolist(), order.tolist(), R + 2)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcheck(backend):
    if not _backend.backend_status(backend, "cpu")[0]:
        pytest.skip(f"{backend} does not serve CPU tensors here")
    sizes, order = _args([2, 0, 3, 1], [3, 2, 0, 1])
    with ck.use_backend(backend):
        for R, n in ((6, None), (8, 10), (6, 4)):
            x = torch.randn(R, 3, dtype=torch.float64, requires_grad=True)
            f = lambda t, n=n: ck.sort_chunks(t, sizes, order, num_rows=n)  # noqa: E731
            torch.autograd.gradcheck(f, (x,))
            torch.autograd.gradgradcheck(f, (x,))


def test_backward_is_inverse_order():
    sizes, order = _args([3, 1, 4, 2], [1, 3, 0, 2])
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    out = ck.sort_chunks(x, sizes, order)
    (gx,) = torch.autograd.grad(out, x, out.detach())
    assert torch.equal(gx, x.detach())


@pytest.mark.parametrize("R", [0, 11])
def test_opcheck(R):
    sizes, order = _args([4, 0, 5, 2] if R else [0, 0], [2, 0, 3, 1] if R else [1, 0])
    x = torch.randn(R, 6, requires_grad=True)
    torch.library.opcheck(sc_mod._sort_chunks_op.op, (x, sizes, order, R))
    torch.library.opcheck(sc_mod._sort_chunks_op.op, (x, sizes, order, R + 3))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_compile_fullgraph(backend):
    def f(x, sizes, order):
        y = ck.sort_chunks(x * 2, sizes, order)          # exact arithmetic: compiled == eager bitwise
        return ck.sort_chunks(y + y, sizes[order], torch.argsort(order))

    with ck.use_backend(None if backend == "auto" else backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, dynamic=True)
        for S, R in ((5, 17), (7, 30)):                        # new sizes must not break the graph
            sizes = torch.randint(0, 5, (S,))
            sizes[-1] = R - int(sizes[:-1].sum()) if R > int(sizes[:-1].sum()) else 0
            order = torch.randperm(S)
            x = torch.randn(R, 9, requires_grad=True)
            out = compiled(x, sizes, order)
            ref = f(x, sizes, order)
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
            g = torch.randn_like(out)
            torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                                       rtol=0, atol=0)


def test_errors():
    x = torch.randn(6, 2)
    sizes, order = _args([2, 4], [1, 0])
    with pytest.raises(TypeError, match="split_sizes must be int64"):
        ck.sort_chunks(x, sizes.int(), order)
    with pytest.raises(TypeError, match="sorted_idxs must be int64"):
        ck.sort_chunks(x, sizes, order.int())
    with pytest.raises(ValueError, match="x must be 2-D"):
        ck.sort_chunks(x.reshape(-1), sizes, order)
    with pytest.raises(ValueError, match="one per chunk"):
        ck.sort_chunks(x, sizes, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="split_sizes must be >= 0"):
        ck.sort_chunks(x, torch.tensor([-1, 7]), order)
    with pytest.raises(ValueError, match="permutation"):
        ck.sort_chunks(x, sizes, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="num_rows"):
        ck.sort_chunks(x, sizes, order, num_rows=-1)
