"""A ``"compass"`` experts implementation for Hugging Face transformers >= 5.

transformers' MoE families decorate their experts module with ``@use_experts_implementation``;
its forward ``(hidden_states [T, D], top_k_index [T, k], top_k_weights [T, k]) -> [T, D]`` is then
looked up by name in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``. ``register()`` adds
``experts_forward`` there, after which

    AutoModelForCausalLM.from_config(cfg, experts_implementation="compass")
    model.set_experts_implementation("compass")      # or model.config._experts_implementation = "compass"

run the model's experts through the same parts as ``compass_model.MoE`` (``compass_kernels.moe_blocks``): the ``TokenDispatcher``
(``ck.route`` + ``ck.permute``, then ``ck.unpermute`` with the routing weights: gather and weighted
sum in one pass, fp32 accumulation) and ``grouped_mlp`` (two ``ck.grouped_gemm``, expert biases,
the module's own gate). The model's router is left as it is.

Layouts (the decorator's flags, read from the module): ``is_transposed`` (weights ``[E, in, out]``
instead of nn.Linear's ``[E, out, in]``), ``is_concatenated`` (False: gate / up interleaved, which
only the module's own ``_apply_gate`` can split, so it must define one), ``has_bias``
(``gate_up_proj_bias`` / ``up_proj_bias``, ``down_proj_bias``), ``has_gate`` (False: ``up_proj``
and ``act_fn``), ``has_post_expert_norm`` (``post_expert_norm`` on each expert output row). Under
transformers' expert parallelism (``_is_expert_parallel``) ids >= ``num_experts`` mark slots for
other ranks; they become compass's ``-1`` slots (no row, no output, zero gradient). A decorator flag
this module does not know, set to anything but its default, raises ``NotImplementedError`` naming it.
"""

from __future__ import annotations

import inspect

import torch

from compass_kernels.moe_blocks import TokenDispatcher, grouped_mlp

__all__ = ["MIN_TRANSFORMERS", "experts_forward", "register"]

MIN_TRANSFORMERS = 5
# the decorator's layout flags handled here; any other one must keep its default
SUPPORTED_FLAGS = ("is_transposed", "is_concatenated", "has_bias", "has_gate", "has_post_expert_norm")
_NOT_FLAGS = ("experts_class", "experts_interface")


def _transformers_moe():
    """``transformers.integrations.moe``, or an ImportError saying what to install."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("the compass experts implementation needs Hugging Face transformers >= 5: "
                          "pip install 'compass-kernels[hf]'") from e
    version = getattr(transformers, "__version__", "0")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TRANSFORMERS:
        raise ImportError(f"the compass experts implementation needs transformers >= {MIN_TRANSFORMERS} (the "
                          f"@use_experts_implementation hook), found {version}: pip install 'compass-kernels[hf]'")
    from transformers.integrations import moe

    return moe


def _other_flags(moe) -> dict:
    """The decorator's flags this adapter does not handle, with their defaults."""
    params = inspect.signature(moe.use_experts_implementation).parameters
    return {n: p.default for n, p in params.items() if n not in (*SUPPORTED_FLAGS, *_NOT_FLAGS)}


_UNHANDLED: dict | None = None


def check_layout(module) -> None:
    """Raise for a layout this implementation would get wrong (the error names the flag)."""
    global _UNHANDLED
    if _UNHANDLED is None:
        _UNHANDLED = _other_flags(_transformers_moe())
    for flag, default in _UNHANDLED.items():
        value = getattr(module, flag, default)
        if value != default:
            raise NotImplementedError(f"{type(module).__name__}: the compass experts implementation does not "
                                      f"support the layout flag {flag}={value!r} (only {flag}={default!r})")
    for flag in SUPPORTED_FLAGS:
        value = getattr(module, flag, None)
        if not isinstance(value, bool):
            raise ValueError(f"{type(module).__name__}.{flag} must be a bool (set by @use_experts_implementation), "
                             f"got {value!r}")
    if module.has_gate and not module.is_concatenated and \
            getattr(type(module)._apply_gate, "__name__", "") == "_default_apply_gate":
        raise NotImplementedError(f"{type(module).__name__}: is_concatenated=False (interleaved gate / up) needs the "
                                  f"module's own _apply_gate; the default one splits concatenated halves")


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"compass"`` experts forward: ``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` over the
    slots with a local expert, in ``hidden_states``' dtype. See the module docstring for layouts."""
    check_layout(self)
    E = self.num_experts
    ids = top_k_index
    if self._is_expert_parallel:          # other ranks' experts: sentinel ids >= E -> no slot
        ids = torch.where(ids < E, ids, torch.full_like(ids, -1))
    prefix = "gate_up_proj" if self.has_gate else "up_proj"
    w_in, w_out = getattr(self, prefix), self.down_proj
    b_in = getattr(self, f"{prefix}_bias") if self.has_bias else None
    b_out = self.down_proj_bias if self.has_bias else None
    dispatcher = TokenDispatcher(E)
    d = dispatcher.dispatch(hidden_states.to(w_in.dtype), ids)
    y = grouped_mlp(d.rows, d.offsets, w_in, w_out, act=self._apply_gate if self.has_gate else self.act_fn,
                    trans_b=not self.is_transposed, b_in=b_in, b_out=b_out)
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y)
    return dispatcher.combine(y, d, top_k_weights).to(hidden_states.dtype)


def register(name: str = "compass") -> str:
    """Register ``experts_forward`` as transformers' experts implementation ``name`` and return the
    name. Idempotent; raises ImportError without transformers >= 5, ValueError if ``name`` is taken
    by another implementation."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    moe = _transformers_moe()
    registry = moe.ALL_EXPERTS_FUNCTIONS
    if name == "eager" or (name in registry and registry[name] is not experts_forward):
        raise ValueError(f"name {name!r} is already an experts implementation of transformers; pick another")
    moe.ExpertsInterface.register(name, experts_forward)
    return name
