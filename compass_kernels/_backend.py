"""Backend selection: one resolution per (op, device type), an override for tests and users.

Order (docs/design.md): a CUDA tensor goes to ``cuda`` if built, else ``triton``, else ``torch``; a CPU
tensor goes to ``cpu`` if built, else ``torch``. ``COMPASS_BACKEND=<name>`` or
``use_backend(name)`` override. An explicitly requested backend that cannot serve raises; an
automatic fallback to a slower backend warns once (a silent slow path is a bug in a kernel library).
A backend may also hand a call it cannot serve (a dtype, a shape, an older GPU) to another one at run
time: each op declares those fallbacks with their condition (``declare_fallback``), the launcher
records the one it takes (``record_fallback``: warned once, shown by ``backend_info``).
"""

from __future__ import annotations

import contextvars
import os
import threading
import warnings
from dataclasses import dataclass, field

import torch

from compass_kernels import _ext

BACKENDS = ("torch", "cpu", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("compass_backend", default=None)
_lock = threading.Lock()
_cache: dict[tuple[str, str, str | None], str] = {}
_warned: set[tuple[str, str, str]] = set()
_last_choice: dict[tuple[str, str], str] = {}
_taken: dict[tuple[str, str], dict[str, str]] = {}  # (op, device type) -> the last fallback taken at run time


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton not importable: {e} (pip install 'compass-kernels[triton]')"
    return True, "triton " + triton.__version__


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_status(name: str, device_type: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device_type`` tensors, and why (not)."""
    if name == "torch":
        return True, "reference (pure PyTorch)"
    if name == "cpu":
        if device_type != "cpu":
            return False, "the cpu backend serves CPU tensors only"
        if _ext.cpu_module is None:
            return False, _ext.cpu_missing or "compass_kernels._cpu not built"
        return True, "compass_kernels._cpu (OpenMP)" if _ext.cpu_module.openmp else "compass_kernels._cpu (no OpenMP)"
    if name == "cuda":
        if device_type != "cuda":
            return False, "the cuda backend serves CUDA tensors only"
        if _ext.cuda_module is None:
            why = _ext.build_info.CUDA_REASON if _ext.build_info is not None else None
            return False, f"compass_kernels._cuda not built ({why or _ext.cuda_missing})"
        return True, "compass_kernels._cuda"
    if name == "triton":
        ok, why = _triton_status()
        if not ok:
            return False, why
        if device_type == "cuda" or (device_type == "cpu" and _interpreting()):
            return True, why + (" (interpreter)" if device_type == "cpu" else "")
        return False, "triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


@dataclass
class _Registry:
    impls: dict[str, set[str]] = field(default_factory=dict)  # op -> backends implementing it
    fallbacks: dict[str, dict[tuple[str, str], str]] = field(default_factory=dict)  # op -> {(from, to): when}


_registry = _Registry()


def register(op: str, *backends: str) -> None:
    """Declare which backends implement ``op`` (the op file does this at import)."""
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}")
    _registry.impls.setdefault(op, set()).update(backends)


def declare_fallback(op: str, frm: str, to: str, when: str) -> None:
    """Declare that ``op``'s ``frm`` backend hands a call to ``to`` when ``when`` holds."""
    for b in (frm, to):
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}")
    _registry.fallbacks.setdefault(op, {})[(frm, to)] = when


def record_fallback(op: str, device: torch.device, frm: str, to: str) -> None:
    """A launcher of ``op`` handed this call from ``frm`` to ``to`` (a declared fallback): record it as
    the op's last choice on this device type and warn once. Host-side only, no device sync."""
    when = _registry.fallbacks.get(op, {}).get((frm, to))
    if when is None:
        raise RuntimeError(f"compass: {op} fell back from {frm!r} to {to!r}, a fallback it did not declare")
    dev = device.type
    wkey = (op, dev, f"{frm}->{to}")
    if wkey in _warned and _last_choice.get((op, dev)) == to:
        return
    with _lock:
        _last_choice[(op, dev)] = to
        _taken[(op, dev)] = {"from": frm, "to": to, "when": when}
    if wkey not in _warned:
        _warned.add(wkey)
        warnings.warn(f"compass: {op} on {dev} falls back from the {frm!r} to the {to!r} backend ({when})",
                      RuntimeWarning, stacklevel=3)


def _declared_fallbacks(op: str) -> list[dict[str, str]]:
    """The op's declared run-time fallbacks, then the automatic ones of its backend table: a
    backend of a device's order that the op does not implement hands the op to the next one."""
    out = [{"from": f, "to": t, "when": w} for (f, t), w in _registry.fallbacks.get(op, {}).items()]
    impl = _registry.impls.get(op, {"torch"})
    for order in _AUTO_ORDER.values():
        for i, name in enumerate(order[:-1]):
            if name not in impl:
                to = next((n for n in order[i + 1:] if n in impl), "torch")
                out.append({"from": name, "to": to, "when": f"always: {op} has no {name} implementation"})
    return out


def requested() -> str | None:
    name = _override.get()
    if name is None:
        name = os.environ.get("COMPASS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"COMPASS_BACKEND / use_backend got {name!r}; expected one of {BACKENDS}")
    return name


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device``. Cached per (op, device type, override)."""
    dev = device.type
    want = requested()
    key = (op, dev, want)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    implemented = _registry.impls.get(op, {"torch"})
    if want is not None:
        ok, why = backend_status(want, dev)
        if want not in implemented:
            ok, why = False, f"{op} has no {want} implementation (has: {sorted(implemented)})"
        if not ok:
            if _ext.shadow_note and _ext.shadow_note not in why:
                why = f"{why}; {_ext.shadow_note}"
            raise RuntimeError(f"compass backend {want!r} was requested for {op} on {dev} but cannot serve: {why}")
        choice = want
    else:
        order = _AUTO_ORDER.get(dev, ("torch",))
        choice, skipped = "torch", []
        for name in order:
            ok, why = backend_status(name, dev)
            if ok and name in implemented:
                choice = name
                break
            skipped.append(f"{name}: {why if not ok else 'not implemented for ' + op}")
        if choice != order[0]:
            wkey = (op, dev, choice)
            if wkey not in _warned:
                _warned.add(wkey)
                warnings.warn(
                    f"compass: {op} on {dev} falls back to the {choice!r} backend ({'; '.join(skipped)})",
                    RuntimeWarning,
                    stacklevel=3,
                )
    with _lock:
        _cache[key] = choice
        _last_choice[(op, dev)] = choice
    return choice


class use_backend:
    """Force a backend: ``use_backend("torch")`` sets it, ``with use_backend("cpu"):`` scopes it.

    ``use_backend(None)`` returns to automatic selection.
    """

    def __init__(self, name: str | None):
        if name is not None and name not in BACKENDS:
            raise ValueError(f"use_backend got {name!r}; expected one of {BACKENDS} or None")
        self._token = _override.set(name)

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        _override.reset(self._token)


def backend_info() -> dict:
    """What is built, what each device would get, and why anything is missing.

    ``chosen["op@device"]``: the backend the op's last call used (or would use); ``fallbacks[op]``:
    every hand-over that can happen (from, to, when); ``fallbacks_taken["op@device"]``: the last
    one that did."""
    info: dict = {"built": {}, "chosen": {}, "override": requested()}
    for dev in ("cpu", "cuda"):
        for name in BACKENDS:
            ok, why = backend_status(name, dev)
            info["built"][f"{name}@{dev}"] = {"available": ok, "why": why}
    for op in sorted(_registry.impls):
        for dev in ("cpu", "cuda"):
            order = _AUTO_ORDER[dev]
            choice = next(
                (n for n in order if n in _registry.impls[op] and backend_status(n, dev)[0]), "torch"
            )
            info["chosen"][f"{op}@{dev}"] = _last_choice.get((op, dev), choice)
    info["fallbacks"] = {op: _declared_fallbacks(op) for op in sorted(_registry.impls)}
    info["fallbacks_taken"] = {f"{op}@{dev}": dict(entry) for (op, dev), entry in sorted(_taken.items())}
    if _ext.build_info is not None:
        info["cuda_build"] = {"built": _ext.build_info.CUDA_BUILD, "why": _ext.build_info.CUDA_REASON,
                              "archs": _ext.build_info.CUDA_ARCHS}
    return info
