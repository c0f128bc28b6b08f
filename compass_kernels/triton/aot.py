"""Compile every Triton kernel of the package ahead of time for sm_90, without a GPU.

    python -m compass_kernels.triton.aot [--arch 90] [--filter SUBSTRING] [--jobs N]

Each kernel module listed in ``MODULES`` defines ``AOT_CASES``, a list of tuples

    (kernel, signature, constexprs, name)            or
    (kernel, signature, constexprs, name, options)

``signature`` maps runtime argument names to Triton types ("*bf16", "*i64", "i32", ...);
constexpr arguments may be left out of it (they are filled in from ``constexprs``). ``options``
is a dict: ``launch``, the kernel's entry in the launch table (``launch.py``) the launcher uses
too, so the compile options (fp fusion, warps, stages) are the launcher's own; ``num_warps`` and
``num_stages`` only where the launcher picks them per shape; ``div16``, the names of integer
arguments to compile as multiples of 16, as the JIT does for such values at launch, and
``expect_in_ptx``, strings the PTX must contain (``("wgmma",)`` for Hopper matrix kernels).
A kernel the table marks ``bit_exact`` fails the check if its PTX holds an ``fma`` instruction.
Pointer arguments are always compiled as 16-byte aligned (what the JIT sees for torch
allocations).

For each case this prints shared memory bytes, num_warps, registers and spill bytes (from
``ptxas -v`` on the generated PTX, with the flags Triton itself uses) and exits non-zero if a
compile fails, ptxas reports spills, an expected PTX string is missing or a bit-exact kernel
was contracted into FMAs. Kernels must be real
JIT functions: with ``TRITON_INTERPRET=1`` they are interpreter objects and cannot be compiled,
so running this module as a script unsets it before triton is imported.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
    print("aot: TRITON_INTERPRET unset for this run (interpreted kernels cannot be compiled)")

import argparse  # noqa: E402
import importlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

# Kernel modules whose AOT_CASES are compiled; later kernel files add themselves here.
MODULES = [
    "compass_kernels.triton.routing",
    "compass_kernels.triton.sort_chunks",
    "compass_kernels.triton.ot",
    "compass_kernels.triton.grouped_gemm",
    "compass_kernels.triton.fp8",
]


def collect_cases(modules=MODULES):
    """The ahead-of-time compile cases (``AOT_CASES``) of the kernel modules."""
    cases = []
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        for case in getattr(mod, "AOT_CASES", []):
            kernel, signature, constexprs, name, *rest = case
            cases.append((mod_name, kernel, signature, constexprs, name, rest[0] if rest else {}))
    return cases


def _ptxas_usage(ptx: str, arch: str) -> tuple[int | None, int, str]:
    """(registers, spill bytes, raw log) from ``ptxas -v`` with Triton's own flags."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
             "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return (int(regs.group(1)) if regs else None), spills, log


def compile_case(case, capability: int = 90):
    """Compile one case; returns a result dict (never raises, errors are reported)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from compass_kernels.triton.launch import LAUNCH, fma_lines, launch

    mod_name, kernel, signature, constexprs, name, options = case
    row = {"name": name, "module": mod_name}
    if not isinstance(kernel, JITFunction):
        row["error"] = (f"{type(kernel).__name__} is not a JITFunction: unset TRITON_INTERPRET "
                        "before importing triton")
        return row
    try:
        sig = {}
        for arg in kernel.arg_names:
            if arg in constexprs:
                sig[arg] = "constexpr"
            elif arg in signature:
                sig[arg] = signature[arg]
            else:
                raise KeyError(f"argument {arg!r} has neither a type nor a constexpr value")
        div16 = set(options.get("div16", ()))
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
                 if sig[arg].startswith("*") or arg in div16}
        src = ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs), attrs=attrs)
        if "launch" not in options:
            raise KeyError("the case names no launch-table entry (options['launch'])")
        opts = launch(options["launch"], **{k: options[k] for k in ("num_warps", "num_stages")
                                            if k in options})
        row["options"] = opts
        t0 = time.perf_counter()
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)
        row["seconds"] = time.perf_counter() - t0
        md = compiled.metadata
        row["shared"] = md.shared
        row["num_warps"] = md.num_warps
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        row["regs"], row["spills"], row["ptxas_log"] = _ptxas_usage(compiled.asm["ptx"], arch)
        row["cubin_bytes"] = len(compiled.asm.get("cubin", b""))
        row["expected"] = list(options.get("expect_in_ptx", ()))
        row["missing"] = [s for s in row["expected"] if s not in compiled.asm["ptx"]]
        row["bit_exact"] = LAUNCH[options["launch"]].bit_exact
        row["fma"] = fma_lines(compiled.asm["ptx"]) if row["bit_exact"] else []
    except Exception as e:  # report every failure, keep going
        row["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    return row


def _compile_index(args):
    index, capability, filt = args
    case = [c for c in collect_cases() if filt in c[4]][index]
    return compile_case(case, capability)


def main(argv=None) -> int:
    """Compile every case for ``--arch``; returns the exit code (1 when a case fails, spills or misses an expected instruction)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    p.add_argument("--filter", default="", help="only cases whose name contains this")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--verbose", action="store_true", help="print the ptxas log of each case")
    args = p.parse_args(argv)

    cases = [c for c in collect_cases() if args.filter in c[4]]
    t0 = time.perf_counter()
    if args.jobs > 1 and len(cases) > 1:
        # Each worker re-imports the modules and compiles case i (kernels do not pickle).
        with ProcessPoolExecutor(max_workers=args.jobs) as ex:
            rows = list(ex.map(_compile_index,
                               [(i, args.arch, args.filter) for i in range(len(cases))]))
    else:
        rows = [compile_case(c, args.arch) for c in cases]

    width = max([len(r["name"]) for r in rows] + [4])
    print(f"{'name':<{width}}  {'smem':>6}  {'warps':>5}  {'regs':>4}  {'spill':>5}  {'s':>5}")
    failed = 0
    for r in rows:
        if "error" in r:
            failed += 1
            print(f"{r['name']:<{width}}  FAILED: {r['error']}")
            continue
        bad = r["spills"] > 0 or bool(r["missing"]) or bool(r["fma"])
        failed += bad
        regs = "?" if r["regs"] is None else r["regs"]
        found = [s for s in r["expected"] if s not in r["missing"]]
        print(f"{r['name']:<{width}}  {r['shared']:>6}  {r['num_warps']:>5}  {regs:>4}  "
              f"{r['spills']:>5}  {r['seconds']:>5.1f}" + ("  SPILLS" if r["spills"] else "")
              + "".join(f"  ptx:{s}" for s in found)
              + "".join(f"  MISSING:{s}" for s in r["missing"])
              + (f"  FMA in a bit-exact kernel ({len(r['fma'])}: {r['fma'][0]})" if r["fma"] else ""))
        if args.verbose:
            print(r["ptxas_log"])
    print(f"{len(rows)} cases for sm_{args.arch}, {failed} failed, "
          f"{time.perf_counter() - t0:.0f} s")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
