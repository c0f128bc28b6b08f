"""MoE token routing: ``route`` -> ``permute`` -> (experts) -> ``unpermute``.

This is Compass-v3's "custom memcpy operator" for the MoE dispatch and combine stages: the combine
(unpermute) gathers each token's k expert outputs and sums them with the router weights in one pass,
fp32 accumulation, no atomics, deterministic, instead of index_select + multiply + index_add.

Stack (docs/design.md, op anatomy): references in ``routing_ref`` -> backend launchers here -> the
ops declared with ``_opdef.define`` (custom op, fake tensors, autograd, eager fast path) -> the public
functions ``route``, ``permute``, ``unpermute``. No host synchronisation on the fast path: shapes come from arguments, value checks
that read data run eagerly on CPU tensors and on GPU only with ``COMPASS_CHECK=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compass_kernels import _backend, _ext
from compass_kernels._opdef import define
from compass_kernels.fp8 import Fp8Tensor
from compass_kernels.routing_ref import (
    num_rows_bound,
    permute_ref,
    route_ref,
    unpermute_bwd_ref,
    unpermute_ref,
)

__all__ = ["RoutingPlan", "route", "permute", "unpermute"]

_ALL = ("torch", "cpu", "triton", "cuda")


@dataclass(frozen=True)
class RoutingPlan:
    """Where every (token, slot) goes in the expert-contiguous permuted buffer.

    row_id_map        [T, k] int64  row of each (token, slot); -1 where dropped or unrouted
    tokens_per_expert [E] int64     kept assignments per expert (capacity applied, padding excluded)
    expert_offsets    [E + 1] int64 start row of each expert's segment (padding included)
    num_rows          int           static row count of the permuted buffer (>= expert_offsets[-1])
    """

    row_id_map: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    num_rows: int
    num_tokens: int
    topk: int
    num_experts: int

    def __post_init__(self):
        """Checks a hand-built plan's tensors (the kernels index them as contiguous int64 arrays)
        and copies any that are not contiguous."""
        T, k, E = self.num_tokens, self.topk, self.num_experts
        r, n, o = self.row_id_map, self.tokens_per_expert, self.expert_offsets
        i64 = torch.int64
        if (isinstance(r, torch.Tensor) and isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor)
                and r.dtype is i64 and n.dtype is i64 and o.dtype is i64 and r.shape == (T, k) and n.shape == (E,)
                and o.shape == (E + 1,) and r.is_contiguous() and n.is_contiguous() and o.is_contiguous()
                and r.get_device() == n.get_device() == o.get_device() and r.is_meta == n.is_meta == o.is_meta
                and r.is_cpu == n.is_cpu == o.is_cpu):
            return  # what route returns: nothing to check further (about 1 us)
        for name, shape in (("row_id_map", (T, k)), ("tokens_per_expert", (E,)), ("expert_offsets", (E + 1,))):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != i64:
                raise TypeError(f"RoutingPlan.{name} must be an int64 tensor, got {getattr(t, 'dtype', type(t))}")
            if tuple(t.shape) != shape:
                raise ValueError(f"RoutingPlan.{name} must have shape {list(shape)} (num_tokens, topk, num_experts), "
                                 f"got {list(t.shape)}")
            if t.device != self.row_id_map.device:
                raise ValueError(f"RoutingPlan.{name} is on {t.device} but row_id_map is on {self.row_id_map.device}")
            if not t.is_contiguous():
                object.__setattr__(self, name, t.contiguous())


# ---------------------------------------------------------------------------------------------
# validation (names the argument and what was expected)


def _check_topk_ids(topk_ids, num_experts: int) -> None:
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [T, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.numel() == 0 or not _ext.values_readable(topk_ids):
        return
    if topk_ids.device.type == "cpu" and _backend.resolve("route", topk_ids.device) == "cpu":
        return  # the kernel checks every id in its counting pass, with the same message
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        raise ValueError(f"topk_ids must hold values in [-1, num_experts) = [-1, {num_experts}), found {bad}")


def _check_plan(plan) -> None:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan (from compass_kernels.route), got {type(plan).__name__}")


def _check_probs(probs, plan: RoutingPlan, device) -> None:
    if probs is None:
        return
    if not isinstance(probs, torch.Tensor) or not probs.dtype.is_floating_point:
        raise TypeError(f"probs must be a floating-point tensor, got {getattr(probs, 'dtype', type(probs))}")
    if tuple(probs.shape) != (plan.num_tokens, plan.topk):
        raise ValueError(f"probs must have shape [T, k] = [{plan.num_tokens}, {plan.topk}], got {tuple(probs.shape)}")
    if probs.device != device:
        raise ValueError(f"probs is on {probs.device}, expected {device}")


def _check_rows(name: str, t, rows, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (from the plan), got {t.shape[0]}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the plan is on {device}")


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    """Kernels take a row stride but need unit stride along the hidden dim and rows that do not
    overlap: anything else (a transposed view, an expanded stride-0 tensor such as the gradient of
    ``.sum()``) is copied first."""
    if t.is_contiguous():
        return t
    rows_ok = t.shape[0] <= 1 or t.stride(0) >= t.shape[1]
    return t if rows_ok and (t.stride(-1) == 1 or t.shape[-1] <= 1) else t.contiguous()


# ---------------------------------------------------------------------------------------------
# backend launchers: validate nothing (the public functions did), allocate, launch


def _triton():
    from compass_kernels.triton import routing as tr

    return tr


def _route_impl(topk_ids, num_experts: int, capacity: int, align: int):
    backend = _backend.resolve("route", topk_ids.device)
    cap = None if capacity < 0 else capacity
    if backend == "torch":
        return route_ref(topk_ids, num_experts, cap, align)
    T, k = topk_ids.shape
    ids = topk_ids.contiguous()
    row = _ext.empty(T, k, dtype=torch.int64, device=ids.device)
    tpe = _ext.empty(num_experts, dtype=torch.int64, device=ids.device)
    off = _ext.empty(num_experts + 1, dtype=torch.int64, device=ids.device)
    if backend == "triton":
        tr = _triton()
        ws = _ext.empty(tr.route_workspace_numel(T, k, num_experts), dtype=torch.int64, device=ids.device)
        tr.route(ids, num_experts, capacity, align, row, tpe, off, ws)
        return row, tpe, off
    kernels = _ext.kernels(backend)
    cws: torch.Tensor | None = None
    if backend == "cuda":
        cws = _ext.empty(kernels.route_workspace_numel(T, k, num_experts), dtype=torch.int64, device=ids.device)
    kernels.route(topk_ids=ids, T=T, k=k, E=num_experts, capacity=capacity, align=align, row_id_map=row,
                  tokens_per_expert=tpe, expert_offsets=off, workspace=cws)
    return row, tpe, off


def _permute_impl(x, row_id_map, expert_offsets, tokens_per_expert, num_rows: int):
    backend = _backend.resolve("permute", x.device)
    if backend == "torch":
        return permute_ref(x, row_id_map, num_rows)
    x = _rowmajor(x)
    T, H = x.shape
    k = row_id_map.shape[1]
    E = tokens_per_expert.shape[0]
    out = _ext.empty(num_rows, H, dtype=x.dtype, device=x.device)
    if backend == "triton":
        _triton().permute(x, row_id_map, expert_offsets, tokens_per_expert, out)
        return out
    _ext.kernels(backend).permute(
        x=x, elem_size=x.element_size(), T=T, H=H, row_id_map=row_id_map, k=k, expert_offsets=expert_offsets,
        tokens_per_expert=tokens_per_expert, E=E, num_rows=num_rows, out=out)
    return out


def _unpermute_impl(y, row_id_map, probs):
    backend = _backend.resolve("unpermute", y.device)
    if backend == "torch":
        return unpermute_ref(y, row_id_map, probs)
    y = _rowmajor(y)
    probs = None if probs is None else probs.contiguous()
    R, H = y.shape
    T, k = row_id_map.shape
    out = _ext.empty(T, H, dtype=y.dtype, device=y.device)
    if backend == "triton":
        _triton().unpermute(y, row_id_map, probs, out)
        return out
    _ext.kernels(backend).unpermute(
        y=y, num_rows=R, H=H, row_id_map=row_id_map, T=T, k=k, probs=probs, out=out)
    return out


def _unpermute_bwd_impl(grad_out, y, row_id_map, expert_offsets, tokens_per_expert, probs):
    backend = _backend.resolve("unpermute_bwd", y.device)
    if backend == "torch":
        return unpermute_bwd_ref(grad_out, y, row_id_map, probs)
    grad_out, y, probs = _rowmajor(grad_out), _rowmajor(y), probs.contiguous()
    R, H = y.shape
    T, k = row_id_map.shape
    E = tokens_per_expert.shape[0]
    grad_y = _ext.empty(R, H, dtype=y.dtype, device=y.device)
    grad_probs = _ext.empty(T, k, dtype=probs.dtype, device=y.device)
    if backend == "triton":
        _triton().unpermute_bwd(grad_out, y, row_id_map, expert_offsets, tokens_per_expert, probs,
                                grad_y, grad_probs)
        return grad_y, grad_probs
    _ext.kernels(backend).unpermute_bwd(
        grad_out=grad_out, y=y, num_rows=R, H=H, row_id_map=row_id_map, T=T, k=k, expert_offsets=expert_offsets,
        tokens_per_expert=tokens_per_expert, E=E, probs=probs, grad_y=grad_y, grad_probs=grad_probs)
    return grad_y, grad_probs


# ---------------------------------------------------------------------------------------------
# autograd formulas and the op declarations (compass_kernels._opdef)


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3])


def _permute_backward(ctx, grad):
    row_id_map, expert_offsets, tokens_per_expert = ctx.saved_tensors
    # d x[t] = sum_j grad[row(t, j)]: the unweighted combine.
    return _unpermute_op(grad, row_id_map, expert_offsets, tokens_per_expert, None), None, None, None, None


def _unpermute_setup(ctx, inputs, output):
    y, row_id_map, expert_offsets, tokens_per_expert, probs = inputs
    ctx.has_probs = probs is not None
    ctx.num_rows = y.shape[0]
    ctx.save_for_backward(y if probs is not None else None, row_id_map, expert_offsets, tokens_per_expert, probs)


def _unpermute_backward(ctx, grad):
    y, row_id_map, expert_offsets, tokens_per_expert, probs = ctx.saved_tensors
    if not ctx.has_probs:  # d y[row(t, j)] = grad[t]: a plain dispatch
        grad_y = _permute_op(grad, row_id_map, expert_offsets, tokens_per_expert, ctx.num_rows)
        return grad_y, None, None, None, None
    grad_y, grad_probs = _unpermute_bwd_op(grad, y, row_id_map, expert_offsets, tokens_per_expert, probs)
    return grad_y, None, None, None, grad_probs


def _unpermute_bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_bwd_backward(ctx, g_grad_y, g_grad_probs):
    """Double backward of unpermute with probs. With grad_y = scatter(probs * grad_out) and
    grad_probs = <grad_out, y[row]>: d grad_out = unpermute(g_grad_y, probs) + unpermute(y, g_grad_probs),
    and one unpermute_bwd(grad_out, g_grad_y, ..., g_grad_probs) gives d y = scatter(g_grad_probs *
    grad_out) and d probs = <grad_out, g_grad_y[row]>."""
    grad_out, y, row_id_map, expert_offsets, tokens_per_expert, probs = ctx.saved_tensors
    g_grad_y = torch.zeros_like(y) if g_grad_y is None else g_grad_y
    g_grad_probs = torch.zeros_like(probs) if g_grad_probs is None else g_grad_probs
    d_out = d_y = d_probs = None
    if ctx.needs_input_grad[0]:
        d_out = (_unpermute_op(g_grad_y, row_id_map, expert_offsets, tokens_per_expert, probs)
                 + _unpermute_op(y, row_id_map, expert_offsets, tokens_per_expert, g_grad_probs))
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[5]:
        d_y, d_probs = _unpermute_bwd_op(grad_out, g_grad_y, row_id_map, expert_offsets, tokens_per_expert,
                                         g_grad_probs)
    return d_out, d_y, None, None, None, d_probs


@define("route", impl=_route_impl, backends=_ALL)
def _route_op(topk_ids: torch.Tensor, num_experts: int, capacity: int, align: int) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]:
    dev = topk_ids.device
    return (topk_ids.new_empty(topk_ids.shape, dtype=torch.int64),
            torch.empty(num_experts, dtype=torch.int64, device=dev),
            torch.empty(num_experts + 1, dtype=torch.int64, device=dev))


@define("permute", impl=_permute_impl, backends=_ALL, backward=_permute_backward, setup_context=_permute_setup,
        eager_on=("x",))
def _permute_op(x: torch.Tensor, row_id_map: torch.Tensor, expert_offsets: torch.Tensor,
                tokens_per_expert: torch.Tensor, num_rows: int) -> torch.Tensor:
    return x.new_empty(num_rows, x.shape[1])


def _unpermute_launch(y, row_id_map, expert_offsets, tokens_per_expert, probs):
    # expert_offsets and tokens_per_expert are only read by the backward (to zero padding rows).
    return _unpermute_impl(y, row_id_map, probs)


@define("unpermute", impl=_unpermute_launch, backends=_ALL, backward=_unpermute_backward,
        setup_context=_unpermute_setup, eager_on=("y", "probs"))
def _unpermute_op(y: torch.Tensor, row_id_map: torch.Tensor, expert_offsets: torch.Tensor,
                  tokens_per_expert: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    return y.new_empty(row_id_map.shape[0], y.shape[1])


@define("unpermute_bwd", impl=_unpermute_bwd_impl, backends=_ALL, backward=_unpermute_bwd_backward,
        setup_context=_unpermute_bwd_setup, eager_on=("grad_out", "y", "probs"))
def _unpermute_bwd_op(grad_out: torch.Tensor, y: torch.Tensor, row_id_map: torch.Tensor,
                      expert_offsets: torch.Tensor, tokens_per_expert: torch.Tensor,
                      probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return y.new_empty(y.shape), probs.new_empty(probs.shape)


# ---------------------------------------------------------------------------------------------
# public API


def route(topk_ids: torch.Tensor, num_experts: int, capacity: int | None = None, align: int = 1) -> RoutingPlan:
    """Plan the dispatch of ``topk_ids [T, k]`` (int32/int64, entries in [-1, E)) to E experts.

    Within an expert, assignments keep (token, slot) order; an assignment's row is
    ``expert_offsets[e] + rank``. ``capacity=C`` drops ranks >= C (row -1); ``align=A`` pads each
    expert's segment to a multiple of A rows (zero rows, never read back). ``num_rows`` is a static
    bound (T * k without capacity or align), so nothing here waits on the device.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be an int >= 1, got {align!r}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0, got {capacity!r}")
    _check_topk_ids(topk_ids, num_experts)
    T, k = topk_ids.shape
    row_id_map, tokens_per_expert, expert_offsets = _route_op(
        topk_ids, num_experts, -1 if capacity is None else capacity, align
    )
    return RoutingPlan(
        row_id_map=row_id_map,
        tokens_per_expert=tokens_per_expert,
        expert_offsets=expert_offsets,
        num_rows=num_rows_bound(T, k, num_experts, capacity, align),
        num_tokens=T,
        topk=k,
        num_experts=num_experts,
    )


def permute(x: torch.Tensor, plan: RoutingPlan, probs: torch.Tensor | None = None):
    """Dispatch: ``x [T, H]`` -> ``[num_rows, H]`` in expert-contiguous order (bit-exact, any dtype).

    Padding rows are zero. With ``probs [T, k]`` also returns the permuted probs ``[num_rows]``.
    Differentiable in x and probs. An ``Fp8Tensor`` ("row" or "block" scales) comes back as one,
    its codes and scale rows moved together.
    """
    if isinstance(x, Fp8Tensor):
        return _permute_fp8(x, plan, probs)
    _check_plan(plan)
    _check_rows("x", x, plan.num_tokens, plan.row_id_map.device)
    _check_probs(probs, plan, x.device)
    xp = _permute_op(x, plan.row_id_map, plan.expert_offsets, plan.tokens_per_expert, plan.num_rows)
    if probs is None:
        return xp
    # probs are per (token, slot): permute them as T*k rows of width 1.
    T, k = plan.num_tokens, plan.topk
    pp = _permute_op(probs.reshape(T * k, 1), plan.row_id_map.reshape(T * k, 1), plan.expert_offsets,
                    plan.tokens_per_expert, plan.num_rows)
    return xp, pp.reshape(plan.num_rows)


def unpermute(y: torch.Tensor, plan: RoutingPlan, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Combine: ``out[t] = sum_j probs[t, j] * y[row(t, j)]`` over routed slots -> ``[T, H]``.

    Gather and weighted sum fused in one pass, fp32 accumulation (fp64 for fp64), no atomics,
    deterministic; output in y's dtype. Weight 1 without probs. Differentiable in y and probs
    (``d probs[t, j] = <grad_out[t], y[row(t, j)]>``).
    """
    _check_plan(plan)
    _check_rows("y", y, plan.num_rows, plan.row_id_map.device)
    if not y.dtype.is_floating_point or y.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"y must be float32, float64, float16 or bfloat16, got {y.dtype}")
    _check_probs(probs, plan, y.device)
    return _unpermute_op(y, plan.row_id_map, plan.expert_offsets, plan.tokens_per_expert, probs)


def _permute_fp8(q: Fp8Tensor, plan: RoutingPlan, probs):
    """``permute`` of an Fp8Tensor ``[T, K]``: the codes and the per-token scales (``[T]`` for "row",
    ``[T, ceil(K/bs)]`` for "block") move together, bit-exact; padding rows get zero codes and zero
    scales. A "tensor" scale applies to every row and is kept."""
    if q.data.dim() != 2 or q.granularity not in ("row", "block", "tensor"):
        raise ValueError(f"permute needs an Fp8Tensor [T, K] with per-token scales (granularity 'row' or "
                         f"'block'), got shape {tuple(q.shape)} with granularity {q.granularity!r}")
    out = permute(q.data, plan, probs)
    data, pp = out if probs is not None else (out, None)
    if q.granularity == "tensor":
        scale = q.scale
    elif q.granularity == "row":
        scale = permute(q.scale[:, None], plan).reshape(data.shape[0])
    else:
        scale = permute(q.scale, plan)
    qp = Fp8Tensor(data, scale, q.granularity, q.block_size)
    return qp if probs is None else (qp, pp)
