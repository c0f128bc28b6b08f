"""The typed kernel boundary, Python side: keyword-argument callers built from a compiled module's
signature table.

Each entry point of ``_cpu`` / ``_cuda`` is declared once, in ``csrc/common/kernels.def``; the module
exports that table as ``module.signatures`` (``{name: (size, fields, doc)}``, each field
``(name, kind, offset, type)``) and its dtype codes as ``module.dtype_codes``. ``make_caller`` turns an
entry into a Python function, generated once at import, that takes the arguments by keyword, reads
what each kind asks of its value and packs the values at the reported offsets into the bytes the
binding copies into its args struct (``Kernels`` does that for every entry of a module):

- ``rows``: a tensor with >= 2 dims and unit stride along the last -> data pointer, row stride in
  elements (``stride(-2)``, or the row length when there are fewer than two rows: torch may report
  anything then) and dtype code;
- ``tensor``: a contiguous tensor -> data pointer and dtype code;
- ``buffer``: a contiguous tensor of the declared dtype -> data pointer; with ``check_buffers`` (in
  ``_ext``: ``COMPASS_CHECK=1`` at import) another dtype raises a TypeError naming the argument (the
  launchers allocate these buffers themselves, so the default skips the test on the hot path);
- ``int`` / ``float`` / ``bool`` -> int64 / double / bool;
- ``stream``: not an argument: the current stream of the first tensor argument's device, and the
  call runs with that device current (``torch.cuda.device``).

A ``tensor`` argument may be None (null pointer, dtype code -1); ``rows`` and ``buffer`` ones may not
(no test on the hot path). A dtype the table does not know packs as
-1, which a kernel that reads the dtype refuses.
"""

from __future__ import annotations

import keyword
import struct
from types import SimpleNamespace

import torch

# kind -> (struct format of its packed value, size in bytes)
_FORMATS = {"rows": ("Qqq", 24), "tensor": ("Qq", 16), "buffer": ("Q", 8), "int": ("q", 8), "float": ("d", 8),
            "bool": ("?", 1), "stream": ("Q", 8)}
# buffer element types (csrc/common/kernel_args.h, namespace buffer) -> the dtype Python must pass
_BUFFER_DTYPES = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32, "uint8": torch.uint8,
                  "boolean": torch.bool, "any": None}
_TENSOR_KINDS = ("rows", "tensor", "buffer")


def dtype_codes(table: dict[str, int]) -> dict[torch.dtype, int]:
    """``{torch.float32: 0, ...}`` from a module's ``dtype_codes`` (torch dtype names), skipping
    names this torch does not have."""
    return {getattr(torch, name): code for name, code in table.items() if hasattr(torch, name)}


def _wrong_dtype(kernel: str, buffers):
    """Raises for the first of ``buffers`` ((name, tensor, dtype) each) whose dtype is not the one declared."""
    for name, t, want in buffers:
        if t.dtype is not want:
            raise TypeError(f"compass_kernels kernel {kernel}: {name} must be a {want} tensor, got {t.dtype}")


def _caller_source(name: str, size: int, fields, check_buffers: bool = True) -> tuple[str, str]:
    """(struct format, source of the function ``name``) for one signature."""
    fmt, pos, values, typed, params = "=", 0, [], [], []
    first_tensor = next((f[0] for f in fields if f[1] in _TENSOR_KINDS), None)
    for fname, kind, offset, typ in sorted(fields, key=lambda f: f[2]):
        if kind not in _FORMATS:
            raise ValueError(f"kernel {name}: field {fname} has an unknown kind {kind!r} (a newer module?)")
        if not fname.isidentifier() or keyword.iskeyword(fname) or fname.startswith("_"):
            raise ValueError(f"kernel {name}: field name {fname!r} cannot be a keyword argument")
        if offset < pos:
            raise ValueError(f"kernel {name}: field {fname} overlaps the one before it")
        code, width = _FORMATS[kind]
        fmt += "x" * (offset - pos) + code
        pos = offset + width
        n = fname
        if kind == "stream":
            if first_tensor is None:
                raise ValueError(f"kernel {name}: a stream needs a tensor argument to take the device from")
            values.append(f"_stream({first_tensor}.device)")
            continue
        params.append(n)
        if kind == "rows":
            values += [f"{n}.data_ptr()", f"({n}.stride(-2) if {n}.size(-2) > 1 else {n}.size(-1))",
                       f"_code({n}.dtype, -1)"]
        elif kind == "tensor":  # the one kind that may be None
            values += [f"(0 if {n} is None else {n}.data_ptr())", f"(-1 if {n} is None else _code({n}.dtype, -1))"]
        elif kind == "buffer":
            if typ not in _BUFFER_DTYPES:
                raise ValueError(f"kernel {name}: buffer {fname} has an unknown element type {typ!r}")
            if _BUFFER_DTYPES[typ] is not None:
                typed.append((n, typ))
            values.append(f"{n}.data_ptr()")
        else:
            values.append(n)
    if pos > size:
        raise ValueError(f"kernel {name}: fields end at byte {pos}, past the args struct's {size}")
    fmt += "x" * (size - pos)
    # one test for all typed buffers on the hot path; _wrong_dtype then names the first one that is off
    checks = [f"    if {' or '.join(f'{n}.dtype is not _dt_{t}' for n, t in typed)}:",
              f"        _wrong('{name}', ({', '.join(f'({n!r}, {n}, _dt_{t})' for n, t in typed)},))"
              ] if typed and check_buffers else []
    call = f"_fn(_pack({', '.join(values)}))"
    if any(f[1] == "stream" for f in fields):  # a CUDA kernel launches on the current device
        body = [f"    with _device({first_tensor}.device):", f"        {call}"]
    else:
        body = [f"    {call}"]
    return fmt, "\n".join([f"def {name}(*, {', '.join(params)}):", *checks, *body])


def make_caller(name: str, signature, fn, codes: dict[torch.dtype, int], stream_of=None, device_guard=None,
                check_buffers: bool = True):
    """The keyword-argument caller of one entry point: ``signature`` is ``(size, fields, doc)`` as the
    module reports it, ``fn`` the binding (takes the packed bytes). An entry point with a ``stream``
    field runs inside ``device_guard(device)`` (``torch.cuda.device``) with ``stream_of(device)`` (the
    handle of the current stream) packed, both of the first tensor argument's device. ``check_buffers``:
    refuse a ``buffer`` of another dtype than declared (~35 ns per buffer per call)."""
    size, fields, doc = signature
    fmt, src = _caller_source(name, size, fields, check_buffers)
    pack = struct.Struct(fmt)
    assert pack.size == size, (name, fmt, pack.size, size)
    namespace = {"_fn": fn, "_pack": pack.pack, "_code": codes.get, "_stream": stream_of, "_device": device_guard,
                 "_wrong": _wrong_dtype,
                 **{f"_dt_{t}": d for t, d in _BUFFER_DTYPES.items() if d is not None}}
    exec(compile(src, f"<compass_kernels kernel {name}>", "exec"), namespace)  # noqa: S102 - our own table
    caller = namespace[name]
    caller.__doc__ = f"{doc}\n\nArguments (keyword only): " + ", ".join(
        f"{f[0]}: {f[1]}" + (f"[{f[3]}]" if f[3] else "") for f in fields if f[1] != "stream")
    caller.__qualname__ = caller.__name__ = name
    caller.signature = tuple(fields)
    return caller


class Kernels(SimpleNamespace):
    """The callers of one compiled module's kernel entry points, as attributes; anything else (the
    module's plain functions and attributes) is read from the module itself."""

    def __init__(self, module, codes: dict[torch.dtype, int], stream_of=None, device_guard=None,
                 check_buffers: bool = True):
        super().__init__(**{name: make_caller(name, sig, getattr(module, name), codes, stream_of, device_guard,
                                              check_buffers)
                            for name, sig in module.signatures.items()})
        object.__setattr__(self, "_module", module)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_module"), name)
