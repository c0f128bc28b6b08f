"""One declaration per op: the ``torch.library`` custom op, its fake, its autograd, its backend
table and fallbacks, the eager fast path and the op's profiler range.

An op file writes its launcher (``impl``: picks the backend with ``_backend.resolve`` and runs it)
and declares the op once::

    @define("permute", impl=_permute_impl, backends=("torch", "cpu", "triton", "cuda"),
            setup_context=_permute_setup, backward=_permute_backward)
    def _permute_op(x: torch.Tensor, row_id_map: torch.Tensor, ..., num_rows: int) -> torch.Tensor:
        return x.new_empty(num_rows, x.shape[1])

The decorated function is the signature and the fake: its type hints are the op's schema
(``compass::permute``), its body gives the outputs' shapes and dtypes to tracers. The result, an
``OpDef``, is what the public function calls: ``_permute_op(x, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from compass_kernels import _backend, _ext, ranges

_OPT_TENSOR = torch._C.OptionalType.ofTensor()


class OpDef:
    """A compass op. Calling it runs ``impl`` directly when ``_ext.eager`` allows (plain eager mode,
    plain tensors, no gradient to record: it skips the dispatcher, autograd and dynamo wrappers) and
    the custom op ``op`` otherwise (graphs, fake and meta tensors, dispatch and function modes,
    autograd). Either way ``impl`` runs inside the op's range (``ranges.op_range``).

    name      short name: the backend table's key and ``compass::<name>``
    op        the ``torch.library`` custom op (``opcheck``, graphs; backward formulas call the OpDef)
    impl      the launcher, called with the op's arguments (tests may replace it)
    """

    def __init__(self, name: str, fake: Callable, impl: Callable, backends: Iterable[str],
                 backward: Callable | None = None, setup_context: Callable | None = None,
                 fallbacks: Iterable[tuple[str, str, str]] = (), eager_on: Iterable[str] | None = None):
        self.name = name
        self.qualname = f"compass::{name}"
        self.impl = impl
        schema = torch.library.infer_schema(fake, mutates_args=())
        args = torch._C.parse_schema(self.qualname + schema).arguments
        tensors = [i for i, a in enumerate(args) if a.type.isSubtypeOf(_OPT_TENSOR)]
        if eager_on is not None:
            names = [a.name for a in args]
            unknown = [n for n in eager_on if n not in names or names.index(n) not in tensors]
            if unknown:
                raise ValueError(f"{self.qualname}: eager_on names {unknown}, which are not tensor arguments")
            tensors = [names.index(n) for n in eager_on]
        self._tensors = tuple(tensors)  # the arguments _ext.eager checks (each check costs ~0.5-1 us)
        self.op = torch.library.custom_op(self.qualname, self._dispatched, mutates_args=(), schema=schema)
        self.op.register_fake(fake)
        if backward is not None:
            self.op.register_autograd(backward, setup_context=setup_context)
        self.differentiable = backward is not None
        _backend.register(name, *backends)
        for frm, to, when in fallbacks:
            _backend.declare_fallback(name, frm, to, when)
        self.__doc__ = fake.__doc__

    def _dispatched(self, *args):
        """The custom op's kernel (every device): the launcher inside the op's range."""
        rng = ranges.op_range(self.qualname)
        if rng is None:
            return self.impl(*args)
        with rng:
            return self.impl(*args)

    def __call__(self, *args):
        tensors = [args[i] for i in self._tensors]
        if _ext.eager(*tensors):
            rng = ranges.op_range(self.qualname, record=True)
            if rng is None:
                return self.impl(*args)
            with rng:
                return self.impl(*args)
        if self.differentiable:
            _ext.reject_func_grad(self.name, *tensors)
        return self.op(*args)

    def __repr__(self) -> str:
        return f"OpDef({self.qualname})"


def define(name: str, *, impl: Callable, backends: Iterable[str], backward: Callable | None = None,
           setup_context: Callable | None = None, fallbacks: Iterable[tuple[str, str, str]] = (),
           eager_on: Iterable[str] | None = None) -> Callable[[Callable], OpDef]:
    """Declare the op ``compass::<name>`` on the decorated signature-and-fake function.

    impl            the launcher: takes the op's arguments, returns its outputs
    backends        the backends ``impl`` implements (``_backend.register``)
    backward        ``backward(ctx, *grads)`` and ``setup_context(ctx, inputs, output)`` as for
                    ``register_autograd``; None for an op without a gradient
    fallbacks       ``(from, to, when)``: the run-time hand-overs ``impl`` may make
                    (``_backend.record_fallback`` records the one it takes)
    eager_on        the tensor arguments whose state decides the eager fast path (default: all);
                    leave out only tensors that come from another compass op and never need a
                    gradient (a RoutingPlan's maps)
    """

    def declare(fake: Callable) -> OpDef:
        return OpDef(name, fake, impl, backends, backward, setup_context, fallbacks, eager_on)

    return declare
