"""Grouped GEMM over expert-contiguous rows: ``y[offsets[e]:offsets[e+1]] = x[...] @ w[e]``.

The MoE experts run as one grouped GEMM over the rows that ``permute`` produced (``offsets`` is
``plan.expert_offsets``). Any group may be empty, sizes need no alignment, rows outside
``[offsets[0], offsets[-1])`` are zero. Autograd: dx is a grouped GEMM with w transposed, dw the
K-grouped GEMM ``dw[e] = x_e^T dy_e``; ``ctx.needs_input_grad`` skips what is not needed.
"""

from __future__ import annotations

import torch

from compass_kernels import _backend, _ext
from compass_kernels._opdef import define
from compass_kernels.grouped_gemm_ref import grouped_gemm_ref, grouped_gemm_wgrad_ref

__all__ = ["grouped_gemm"]

_ALL = ("torch", "cpu", "triton", "cuda")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HALF = (torch.bfloat16, torch.float16)


def _check(x, w, offsets, trans_b: bool) -> None:
    for name, t, dim in (("x", x, 2), ("w", w, 3), ("offsets", offsets, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    layout = "[E, N, K]" if trans_b else "[E, K, N]"
    K = w.shape[2] if trans_b else w.shape[1]
    if x.shape[1] != K:
        raise ValueError(f"x [M, K] has K = {x.shape[1]} but w {layout} has K = {K}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if w.dtype != x.dtype:
        raise TypeError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64 (plan.expert_offsets), got {offsets.dtype}")
    if offsets.shape[0] != w.shape[0] + 1:
        raise ValueError(f"offsets must have E + 1 = {w.shape[0] + 1} entries for w with E = {w.shape[0]}, "
                         f"got {offsets.shape[0]}")
    for name, t in (("w", w), ("offsets", offsets)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")
    N = w.shape[1] if trans_b else w.shape[2]
    if K * N >= 2**31:
        raise ValueError(f"w[e] must have fewer than 2^31 elements, got K x N = {K} x {N}")
    check_offset_values(offsets, x.shape[0])


def check_offset_values(offsets: torch.Tensor, M: int) -> None:
    """Value checks that read ``offsets``: eager CPU tensors only (free there), or GPU tensors with
    COMPASS_CHECK=1 (they synchronise); never under torch.compile or another tracer."""
    if not _ext.values_readable(offsets):
        return
    if offsets.numel() and (offsets.diff() < 0).any():
        raise ValueError(f"offsets must be non-decreasing, got {offsets.tolist()}")
    if offsets.numel() and (int(offsets[0]) < 0 or int(offsets[-1]) > M):
        raise ValueError(f"offsets must lie in [0, M] = [0, {M}], got {offsets[0].item()}..{offsets[-1].item()}")


# ---------------------------------------------------------------------------------------------
# backends


# CPU: groups go to torch's BLAS as few, batched calls. One torch.mm per small group leaves both BLAS
# threads splitting a small product (and paying a thread-team handoff per group); a torch.bmm into a
# contiguous output gives each thread whole products (torch loops item by item otherwise). Adjacent
# equal-size groups (uniform routing) are one bmm over zero-copy [n, m, K] views; many unequal groups
# are one padded bmm (below); otherwise any two groups form a batch of 2 through as_strided views (a
# constant batch stride always exists for two items); groups of >= _CPU_BIG rows run alone.
_CPU_BIG = 1024  # rows; a product this tall already keeps both threads busy
_CPU_PAD = 32  # rows a group may be padded by (its extra rows land in rows that are written later)


def _pair(t: torch.Tensor, e: int, f: int, m: int | None = None) -> torch.Tensor:
    """[2, ...] view of items (or rows) e and f (e < f) of t; with m, rows e.. and f.. of a 2-D t, m each."""
    if m is None:
        return t.as_strided((2, *t.shape[1:]), ((f - e) * t.stride(0), *t.stride()[1:]),
                            t.storage_offset() + e * t.stride(0))
    return t.as_strided((2, m, t.shape[1]), ((f - e) * t.stride(0), t.stride(0), t.stride(1)),
                        t.storage_offset() + e * t.stride(0))


def _cpu_schedule(b: list[int], pad: bool, M: int):
    """Yields ("run", e, f): groups e..f-1 are nonempty and of equal size; ("one", e); or
    ("pair", e, g, m): groups e < g (nothing nonempty between) over their first m rows, where m may pass
    g's end by up to _CPU_PAD rows when pad is set (those rows belong to later groups or to the tail)."""
    E = len(b) - 1
    sz = [b[e + 1] - b[e] for e in range(E)]
    nxt = [E] * (E + 1)  # first nonempty group at or after e
    for e in range(E - 1, -1, -1):
        nxt[e] = e if sz[e] else nxt[e + 1]
    e = nxt[0]
    while e < E:
        m = sz[e]
        f = e + 1
        while f < E and sz[f] == m:
            f += 1
        if f - e >= 2:
            yield "run", e, f
            e = nxt[f]
            continue
        g = nxt[e + 1]
        if m >= _CPU_BIG or g >= E or sz[g] >= _CPU_BIG:
            yield "one", e
            e = g
            continue
        mg = sz[g]
        padded = pad and mg < m <= mg + _CPU_PAD and b[g] + m <= M
        yield "pair", e, g, (m if padded else min(m, mg))
        e = nxt[g + 1]


# Many unequal groups (fine-grained experts, 100-200 rows each): one torch.bmm over the groups padded
# to the tallest, instead of one BLAS call per group. torch hands a bmm whose output is contiguous to
# MKL's strided batch GEMM: one parallel region with whole products per thread, where a loop of mm
# calls opens one region per group and splits each small product across the threads (on a busy
# machine every region waits for a descheduled thread). The price: a gather of x's rows into the
# padded batch, one of the outputs back, and the padding's FLOPs, so it runs only when padding adds
# at most _PAD_WASTE of the rows.
_PAD_MIN_GROUPS = 8
_PAD_WASTE = 0.5


def _padded_span(b: list[int]) -> tuple[int, int, int] | None:
    """(e, f, m): the nonempty groups lie in e..f-1, the tallest has m rows; None when padding them
    all to m rows does not pay (few groups, a group of >= _CPU_BIG rows, or too much padding)."""
    E = len(b) - 1
    sz = [b[i + 1] - b[i] for i in range(E)]
    live = [i for i in range(E) if sz[i]]
    if len(live) < _PAD_MIN_GROUPS:
        return None
    e, f = live[0], live[-1] + 1
    m = max(sz)
    if m >= _CPU_BIG or (f - e) * m > (1 + _PAD_WASTE) * (b[f] - b[e]) or len(set(sz[e:f])) == 1:
        return None
    return e, f, m


def _padded_rows(b: list[int], e: int, f: int, m: int, M: int):
    """Gather indices of groups e..f-1 padded to m rows each: (src [(f - e) m], pad [(f - e) m] bool,
    dst [b[f] - b[e]]). src repeats each group's last row (an empty group's, a neighbour's) where pad
    is set; dst is the padded position of every real row, in order."""
    n = f - e
    start = torch.tensor(b[e:f], dtype=torch.int64)
    size = torch.tensor(b[e + 1: f + 1], dtype=torch.int64) - start
    j = torch.arange(m, dtype=torch.int64)[None, :]
    src = (start[:, None] + torch.minimum(j, (size - 1).clamp(min=0)[:, None])).clamp(max=M - 1)
    group = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), size)
    dst = group * m + torch.arange(b[f] - b[e], dtype=torch.int64) - (start - b[e])[group]
    return src.view(-1), (j >= size[:, None]).view(-1), dst


def _gemm_cpu_padded(x, wk, b: list[int], e: int, f: int, m: int, y: torch.Tensor) -> None:
    """y[b[e]:b[f]] = the groups e..f-1 through one bmm over [f - e, m, K] (padding rows computed, dropped)."""
    n, K, N = f - e, x.shape[1], wk.shape[2]
    src, _, dst = _padded_rows(b, e, f, m, x.shape[0])
    yp = torch.bmm(x.index_select(0, src).view(n, m, K), wk[e:f])
    torch.index_select(yp.view(n * m, N), 0, dst, out=y[b[e]: b[f]])


def _wgrad_cpu_padded(a_, b_, b: list[int], e: int, f: int, m: int, dw: torch.Tensor) -> None:
    """dw[e:f] = a_e^T b_e for the groups e..f-1 through one bmm over them padded to m rows; the
    padding rows of the narrower operand are zeroed, so they add nothing (each dw[e] is summed in
    the GEMM's accumulator and rounded once, 16-bit included)."""
    n = f - e
    src, pad, _ = _padded_rows(b, e, f, m, a_.shape[0])
    pa, pb = a_.index_select(0, src), b_.index_select(0, src)
    (pa if pa.shape[1] <= pb.shape[1] else pb).masked_fill_(pad[:, None], 0)
    torch.bmm(pa.view(n, m, -1).transpose(1, 2), pb.view(n, m, -1), out=dw[e:f])


def _gemm_cpu(x, w, offsets, trans_b: bool) -> torch.Tensor:
    """Each group's product written straight into its slice of y by torch's BLAS (no cat copies), or
    many unequal groups through one padded bmm.

    Offsets live in host memory here, so reading them (tolist) is not a device sync; this path only
    serves CPU tensors.
    """
    M, K = x.shape
    wk = w.transpose(1, 2) if trans_b else w  # [E, K, N] view
    N = wk.shape[2]
    y = _ext.empty(M, N, dtype=x.dtype, device=x.device)
    b = offsets.tolist()
    y[: b[0]].zero_()
    span = _padded_span(b) if K else None
    if span is not None:
        _gemm_cpu_padded(x, wk, b, *span, y)
        y[b[-1]:].zero_()
        return y
    for op, e, *rest in _cpu_schedule(b, True, M):
        s = b[e]
        if op == "run":
            f = rest[0]
            n, m = f - e, b[e + 1] - s
            torch.bmm(x[s: s + n * m].view(n, m, K), wk[e:f], out=y[s: s + n * m].view(n, m, N))
        elif op == "one":
            torch.mm(x[s: b[e + 1]], wk[e], out=y[s: b[e + 1]])
        else:  # a padded pair writes past g's rows, into rows a later call (or the zeroing below) rewrites
            g, m = rest
            torch.bmm(_pair(x, s, b[g], m), _pair(wk, e, g), out=_pair(y, s, b[g], m))
            for h in (e, g):
                if b[h + 1] - b[h] > m:
                    torch.mm(x[b[h] + m: b[h + 1]], wk[h], out=y[b[h] + m: b[h + 1]])
    y[b[-1]:].zero_()
    return y


def _wgrad_cpu(x, dy, offsets, num_groups: int, trans_b: bool) -> torch.Tensor:
    K, N = x.shape[1], dy.shape[1]
    dw = _ext.empty(num_groups, *((N, K) if trans_b else (K, N)), dtype=x.dtype, device=x.device)
    a_, b_ = (dy, x) if trans_b else (x, dy)  # dw[e] = a_e^T b_e
    b = offsets.tolist()
    span = _padded_span(b) if x.shape[0] else None
    if span is not None:
        e, f, m = span
        _wgrad_cpu_padded(a_, b_, b, e, f, m, dw)
        dw[:e].zero_()
        dw[f:].zero_()
        return dw
    done = [False] * num_groups
    for op, e, *rest in _cpu_schedule(b, False, x.shape[0]):  # no padding: extra rows would add to dw
        s = b[e]
        if op == "run":
            f = rest[0]
            n, m = f - e, b[e + 1] - s
            torch.bmm(a_[s: s + n * m].view(n, m, -1).transpose(1, 2), b_[s: s + n * m].view(n, m, -1), out=dw[e:f])
            done[e:f] = [True] * n
        elif op == "one":
            torch.mm(a_[s: b[e + 1]].t(), b_[s: b[e + 1]], out=dw[e])
            done[e] = True
        else:
            g, m = rest
            if x.dtype in _HALF and b[e + 1] - s != b[g + 1] - b[g]:
                # Unequal 16-bit groups: adding the longer group's extra rows to a product already
                # rounded to 16 bits would round twice. Both groups go zero-padded into one buffer
                # (an O(rows * (K + N)) copy) and one bmm, so each dw[h] is summed in fp32 and rounded once.
                m = max(b[e + 1] - s, b[g + 1] - b[g])
                pa, pb = a_.new_zeros(2, m, a_.shape[1]), b_.new_zeros(2, m, b_.shape[1])
                for i, h in enumerate((e, g)):
                    pa[i, : b[h + 1] - b[h]] = a_[b[h]: b[h + 1]]
                    pb[i, : b[h + 1] - b[h]] = b_[b[h]: b[h + 1]]
                torch.bmm(pa.transpose(1, 2), pb, out=_pair(dw, e, g))
            else:  # equal sizes, or fp32 / fp64 partial sums (rounded in the accumulation precision)
                torch.bmm(_pair(a_, s, b[g], m).transpose(1, 2), _pair(b_, s, b[g], m), out=_pair(dw, e, g))
                for h in (e, g):
                    if b[h + 1] - b[h] > m:
                        dw[h].addmm_(a_[b[h] + m: b[h + 1]].t(), b_[b[h] + m: b[h + 1]])
            done[e] = done[g] = True
    for e in range(num_groups):
        if not done[e]:
            dw[e].zero_()
    return dw


def _triton():
    from compass_kernels.triton import grouped_gemm as tg

    return tg


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    """Kernels need unit stride along the last dim; the row stride is free."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _cutlass_serves(*tensors, trans_b: bool, K: int, N: int) -> bool:
    """The sm_90a CUTLASS instances take bf16/fp16 with 16-byte aligned rows on a Hopper GPU;
    everything else (fp32, Ampere, odd K or N) runs the Triton kernel."""
    t0 = tensors[0]
    return (t0.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(t0.device)[0] == 9
            and _ext.kernels("cuda").grouped_gemm_supported(_ext.dtype_code(t0.dtype), trans_b, K, N)
            and all(t.data_ptr() % 16 == 0 for t in tensors))


def _gemm_cuda(x, w, offsets, trans_b):
    M, K = x.shape
    E, N = w.shape[0], (w.shape[1] if trans_b else w.shape[2])
    x, w, offsets = x.contiguous(), w.contiguous(), offsets.contiguous()
    if not _cutlass_serves(x, w, trans_b=trans_b, K=K, N=N):
        return None
    m, code = _ext.cuda, _ext.dtype_code(x.dtype)
    y = _ext.empty(M, N, dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        nbytes = m.grouped_gemm_workspace_bytes(M, K, N, E, code, trans_b)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
        m.grouped_gemm(x=x, w=w, offsets=offsets, y=y, M=M, K=K, N=N, E=E, trans_b=trans_b, workspace=ws,
                       workspace_bytes=nbytes)
    return y


def _wgrad_cuda(x, dy, offsets, num_groups, trans_b):
    M, K = x.shape
    N = dy.shape[1]
    x, dy, offsets = x.contiguous(), dy.contiguous(), offsets.contiguous()
    if not _cutlass_serves(x, dy, trans_b=trans_b, K=K, N=N):
        return None
    m, code = _ext.cuda, _ext.dtype_code(x.dtype)
    dw = _ext.empty(num_groups, *((N, K) if trans_b else (K, N)), dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        nbytes = m.grouped_gemm_wgrad_workspace_bytes(M, K, N, num_groups, code, trans_b)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
        m.grouped_gemm_wgrad(x=x, dy=dy, offsets=offsets, dw=dw, M=M, K=K, N=N, E=num_groups, trans_b=trans_b,
                             workspace=ws, workspace_bytes=nbytes)
    return dw


def _gemm_impl(x, w, offsets, trans_b):
    backend = _backend.resolve("grouped_gemm", x.device)
    if backend == "cpu":
        return _gemm_cpu(x, w, offsets, trans_b)
    if backend == "cuda":
        y = _gemm_cuda(x, w, offsets, trans_b)
        if y is not None:
            return y
        backend = "triton"
        _backend.record_fallback("grouped_gemm", x.device, "cuda", "triton")
    if backend == "triton":
        y = _ext.empty(x.shape[0], w.shape[1] if trans_b else w.shape[2], dtype=x.dtype, device=x.device)
        _triton().grouped_gemm(_rowmajor(x), w.contiguous(), offsets.contiguous(), trans_b, y)
        return y
    return grouped_gemm_ref(x, w, offsets, trans_b)


def _wgrad_impl(x, dy, offsets, num_groups, trans_b):
    backend = _backend.resolve("grouped_gemm_wgrad", x.device)
    if backend == "cpu":
        return _wgrad_cpu(x, dy, offsets, num_groups, trans_b)
    if backend == "cuda":
        dw = _wgrad_cuda(x, dy, offsets, num_groups, trans_b)
        if dw is not None:
            return dw
        backend = "triton"
        _backend.record_fallback("grouped_gemm_wgrad", x.device, "cuda", "triton")
    if backend == "triton":
        K, N = x.shape[1], dy.shape[1]
        dw = _ext.empty(num_groups, *((N, K) if trans_b else (K, N)), dtype=x.dtype, device=x.device)
        _triton().grouped_gemm_wgrad(_rowmajor(x), _rowmajor(dy), offsets.contiguous(), trans_b, dw)
        return dw
    return grouped_gemm_wgrad_ref(x, dy, offsets, num_groups, trans_b)


# ---------------------------------------------------------------------------------------------
# autograd formulas and the op declarations (compass_kernels._opdef)


def _setup(ctx, inputs, output):
    x, w, offsets, trans_b = inputs
    ctx.trans_b = trans_b
    ctx.save_for_backward(x, w, offsets)


def _backward(ctx, dy):
    x, w, offsets = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:  # dx = dy @ w[e]^T: the same grouped GEMM with the layout flipped
        dx = _gemm_op(dy, w, offsets, not ctx.trans_b)
    if ctx.needs_input_grad[1]:
        dw = _wgrad_op(x, dy, offsets, w.shape[0], ctx.trans_b)
    return dx, dw, None, None


def _wgrad_setup(ctx, inputs, output):
    x, dy, offsets, num_groups, trans_b = inputs
    ctx.trans_b = trans_b
    ctx.save_for_backward(x, dy, offsets)


def _wgrad_backward(ctx, g):
    """Double backward: dw[e] = x_e^T dy_e gives d x_e = dy_e g_e^T and d dy_e = x_e g_e (with trans_b,
    dw[e] = dy_e^T x_e: d x_e = dy_e g_e and d dy_e = x_e g_e^T); both are grouped GEMMs."""
    x, dy, offsets = ctx.saved_tensors
    dx = ddy = None
    if ctx.needs_input_grad[0]:
        dx = _gemm_op(dy, g, offsets, not ctx.trans_b)
    if ctx.needs_input_grad[1]:
        ddy = _gemm_op(x, g, offsets, ctx.trans_b)
    return dx, ddy, None, None, None


_CUTLASS_DECLINES = (("cuda", "triton", ("the CUTLASS sm_90a kernels do not serve the call: a dtype other than "
                                          "bf16/fp16, a GPU other than sm_90, a K or N they do not support, or "
                                          "operands not 16-byte aligned")),)


@define("grouped_gemm", impl=_gemm_impl, backends=_ALL, backward=_backward, setup_context=_setup,
        fallbacks=_CUTLASS_DECLINES)
def _gemm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_b: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1] if trans_b else w.shape[2])


@define("grouped_gemm_wgrad", impl=_wgrad_impl, backends=_ALL, backward=_wgrad_backward,
        setup_context=_wgrad_setup, fallbacks=_CUTLASS_DECLINES)
def _wgrad_op(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, num_groups: int,
              trans_b: bool) -> torch.Tensor:
    K, N = x.shape[1], dy.shape[1]
    return x.new_empty(num_groups, *((N, K) if trans_b else (K, N)))


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, trans_b: bool = False) -> torch.Tensor:
    """``x [M, K]``, ``w [E, K, N]`` (``[E, N, K]`` with ``trans_b=True``, the nn.Linear layout),
    ``offsets [E + 1]`` int64 -> ``y [M, N]`` with ``y[offsets[e]:offsets[e+1]] = x[...] @ w[e]``.

    fp32 accumulation for fp32/bf16/fp16 (fp64 for fp64); rows outside the groups are zero.
    """
    _check(x, w, offsets, trans_b)
    return _gemm_op(x, w, offsets, trans_b)
