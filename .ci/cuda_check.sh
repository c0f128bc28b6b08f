#!/usr/bin/env bash
# CI compile check for compass_kernels._cuda, built the way users build it. Needs nvcc (CUDA 13)
# and the Python env with scikit-build-core, pybind11, cmake, ninja, triton and nvidia-cutlass
# (the `cuda-build` extra); needs no GPU. It
#   1. builds the wheel through pip (COMPASS_CUDA=1 pip wheel --no-build-isolation) into a fresh
#      scikit-build build directory, whose log holds every ptxas report, installs the wheel into
#      a folder and imports compass_kernels._cuda from it (outside the source tree),
#   2. dumps the SASS with the cuobjdump shipped in triton's wheel and fails unless sm_90a code
#      is present; prints the number of SASS functions per architecture,
#   3. prints registers / spills / shared memory / HGMMA and QGMMA counts per kernel,
#      architecture and source file, and fails if
#        - any kernel or device function reports non-zero spill stores or loads (ptxas -v),
#        - an sm_90a CUTLASS grouped GEMM kernel (cutlass::device_kernel<GemmUniversal>) has no
#          wgmma instruction of its kind: HGMMA for bf16/fp16, QGMMA for the FP8 (e4m3) kernels,
#          i.e. fell back to a non-tensor-core or stub path,
#        - the build configured sm_90a grouped GEMM instances (csrc/cuda/sm90/*.cu) but the .so
#          does not hold one GemmUniversal kernel per instance file.
# The SASS and ptxas checks below read the artefacts of that pip build (no second CUDA build).
# Usage: .ci/cuda_check.sh [build-dir]   (default build/cuda-check)
# Time: ~8 CPU-minutes in all (12 CUTLASS instances: 10 bf16/fp16 at ~26 s of nvcc CPU each, 2 FP8
# at ~35 s, plus the rest), i.e. ~4 min of wall time on 2 idle cores (239 s measured); 14 min was
# measured with 8 instances and the 2 cores ~3x oversubscribed by other jobs.
set -euo pipefail

cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build/cuda-check}"
PYTHON="${PYTHON:-python}"
start=$(date +%s)

# A fresh build directory: an up-to-date object would print no ptxas lines and the check would see nothing.
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"
PTXAS_LOG="$BUILD_DIR/ptxas.log"
SASS_LOG="$BUILD_DIR/sass.txt"
SKBUILD_DIR="$BUILD_DIR/skbuild"

echo "== pip wheel with COMPASS_CUDA=1 (build dir $SKBUILD_DIR)"
# -v: pip shows the backend's output (configure messages, ninja's lines and each ptxas -v report).
if ! COMPASS_CUDA=1 "$PYTHON" -m pip wheel . -v --no-build-isolation --no-deps -w "$BUILD_DIR/wheel" \
    -C build-dir="$SKBUILD_DIR" -C cmake.define.COMPASS_CUDA=1 >"$PTXAS_LOG" 2>&1; then
  tail -n 60 "$PTXAS_LOG"
  echo "FAIL: COMPASS_CUDA=1 pip wheel failed (log: $PTXAS_LOG)" >&2
  exit 1
fi
build_end=$(date +%s)
# Number of sm_90a grouped GEMM instance files the configure step took.
SM90_INSTANCES="$(sed -n 's/.*compass: \([0-9]*\) sm_90a CUTLASS grouped GEMM instances.*/\1/p' "$PTXAS_LOG" | head -n 1)"
SM90_INSTANCES="${SM90_INSTANCES:-0}"
echo "   sm_90a CUTLASS grouped GEMM instances: $SM90_INSTANCES; build $((build_end - start)) s"
if [ "$SM90_INSTANCES" = 0 ]; then
  echo "FAIL: the pip CUDA build configured no sm_90a CUTLASS grouped GEMM instance" >&2
  exit 1
fi

echo "== import compass_kernels._cuda from the installed wheel"
"$PYTHON" -m pip install -q --no-deps --no-index --target "$BUILD_DIR/site" "$BUILD_DIR"/wheel/*.whl
# -P and another working directory: the source tree's compass_kernels must not shadow the wheel.
(cd "$BUILD_DIR" && PYTHONPATH="$PWD/site" "$PYTHON" -P -c '
import os, sys
import compass_kernels, compass_kernels._cuda as m
site = os.path.realpath("site")
assert os.path.realpath(compass_kernels.__file__).startswith(site), compass_kernels.__file__
print("   imported", m.__file__, "archs", getattr(m, "archs", "?"))
')

echo "== SASS (cuobjdump from triton's wheel)"
CUOBJDUMP="$("$PYTHON" -c 'import triton,os;print(os.path.join(os.path.dirname(triton.__file__),"backends/nvidia/bin/cuobjdump"))')"
SO="$(ls "$SKBUILD_DIR"/_cuda*.so | head -n 1)"
"$CUOBJDUMP" --dump-sass "$SO" >"$SASS_LOG"
# SASS functions per architecture: count "Function :" lines inside each "Fatbin elf code" section.
awk '
  /^Fatbin elf code/ { elf = 1; next }
  /^Fatbin ptx code/ { elf = 0; next }
  elf && /arch = / { arch = $3 }
  elf && /Function :/ { n[arch]++ }
  END { for (a in n) printf "  %-8s %d SASS functions\n", a, n[a] }
' "$SASS_LOG" | sort
if ! awk '/^Fatbin elf code/{elf=1;next} /^Fatbin ptx code/{elf=0;next} elf && /arch = sm_90a/{found=1} END{exit !found}' "$SASS_LOG"; then
  echo "FAIL: no sm_90a SASS in $SO" >&2
  exit 1
fi
echo "OK: sm_90a SASS present ($SO)"

echo "== ptxas + SASS report"
"$PYTHON" - "$PTXAS_LOG" "$SASS_LOG" "$SM90_INSTANCES" <<'EOF'
import collections, os, re, subprocess, sys

log = open(sys.argv[1]).read().splitlines()
sass = open(sys.argv[2]).read().splitlines()
sm90_instances = int(sys.argv[3])

# ---- ptxas -v: one row per (entry function, arch), tagged with the source file being built.
# Ninja prints "[i/n] Building CUDA object .../<file>.cu.o" when a command finishes, followed
# by that command's (buffered) output, so the last such line names the source of what follows.
src_re = re.compile(r"^\s*\[\d+/\d+\] Building \w+ object \S*?([\w.]+)\.o$")  # pip -v indents
entry_re = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
func_re = re.compile(r"Function properties for (\S+)")
spill_re = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
used_re = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")

rows, bad, cur, src = [], [], None, "?"  # cur = [name, arch, stack, spill_st, spill_ld, regs, smem, src]
for line in log:
    if m := src_re.search(line):
        src = m.group(1)
    elif m := entry_re.search(line):
        cur = [m.group(1), m.group(2), 0, 0, 0, None, 0, src]
        rows.append(cur)
    elif m := func_re.search(line):
        # Properties of the entry just announced, or of a non-inlined device function (whose
        # spills count too, but which gets no row of its own).
        if cur is None or m.group(1) != cur[0]:
            cur = [m.group(1), "(device fn)", 0, 0, 0, None, 0, src]
    elif (m := spill_re.search(line)) and cur is not None:
        cur[2:5] = [int(g) for g in m.groups()]
        if cur[3] or cur[4]:
            bad.append(tuple(cur))
    elif (m := used_re.search(line)) and cur is not None:
        cur[5] = int(m.group(1))
        cur[6] = int(m.group(2) or 0)

if not rows:
    sys.exit("FAIL: no 'Compiling entry function' lines in the build log (is -Xptxas=-v set?)")

# ---- SASS: HGMMA (16-bit) and QGMMA (FP8) sm_90 wgmma instructions per (function, arch).
hgmma = collections.Counter()
qgmma = collections.Counter()
elf, arch, fn = False, None, None
for line in sass:
    if line.startswith("Fatbin elf code"):
        elf = True
    elif line.startswith("Fatbin ptx code"):
        elf = False
    elif elf and "arch = " in line:
        arch = line.split("arch = ")[1].split()[0]
    elif elf and "Function :" in line:
        fn = line.split("Function :")[1].strip()
        hgmma[(fn, arch)] += 0
        qgmma[(fn, arch)] += 0
    elif elf and fn and "HGMMA" in line:
        hgmma[(fn, arch)] += 1
    elif elf and fn and "QGMMA" in line:
        qgmma[(fn, arch)] += 1

names = sorted({r[0] for r in rows})
try:
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
except (OSError, subprocess.CalledProcessError):
    dem = names
demangled = dict(zip(names, dem))
def drop_params(d):
    """Drops the trailing (balanced) parameter list: the template arguments identify a kernel."""
    if not d.endswith(")"):
        return d
    depth = 0
    for i in range(len(d) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(d[i], 0)
        if depth == 0:
            return d[:i]
    return d

def is_sm90_gemm(name, arch):
    # Matched on the mangled name: c++filt gives up on CUTLASS's 2,000-character templates.
    return arch.startswith("sm_90") and name.startswith("_ZN7cutlass13device_kernel") and "GemmUniversal" in name

def is_fp8(name):
    return "float_e4m3_t" in name or "float_e5m2_t" in name

short = {}
for n, d in demangled.items():
    if n.startswith("_ZN7cutlass13device_kernel"):  # name the schedule and the element type only
        sched = re.search(r"KernelPtrArrayTmaWarpSpecialized(Cooperative|Pingpong)(FP8Blockwise|FP8FastAccum)?", n)
        elem = re.search(r"(bfloat16_t|half_t)", n)
        elem = elem.group(1) if elem else "?"
        if is_fp8(n):  # e4m3 inputs; the output type, and the scaling (blockwise mainloop or EVT epilogue)
            elem = "e4m3->" + elem
            scaling = ", blockwise scales" if "Blockwise" in n else ", row scales (EVT)" if "ColBroadcast" in n else ""
        else:
            scaling = ""
        d = (f"cutlass GemmUniversal<{elem}, PtrArray{sched.group(1) if sched else '?'}{scaling}>"
             if "GemmUniversal" in n else "cutlass device_kernel<?>")
    d = re.sub(r"compass::cuda::(\(anonymous namespace\)::)?", "", d)
    d = re.sub(r"^void ", "", d)
    d = drop_params(d)
    d = re.sub(r"\(GemmOp\)(\d)", lambda m: ("kXW", "kXWt", "kWgrad")[int(m.group(1))], d)
    d = d.replace("cutlass::bfloat16_t", "bf16").replace("cutlass::half_t", "f16")
    short[n] = d

w = max(len(s) for s in short.values())
ws = max(len(r[7]) for r in rows)
print(f"{'kernel':<{w}}  {'source':<{ws}}  {'arch':<7} {'regs':>4} {'spill st':>8} {'spill ld':>8} {'stack':>5} {'smem':>6} "
      f"{'HGMMA':>5} {'QGMMA':>5}")
no_hgmma, gemm_kernels = [], set()
for name, arch, stack, st, ld, regs, smem, src in sorted(rows, key=lambda r: (r[7], short[r[0]], r[1])):
    n_hgmma, n_qgmma = hgmma.get((name, arch)), qgmma.get((name, arch))
    if is_sm90_gemm(name, arch):
        gemm_kernels.add(name)
        kind, count = ("QGMMA", n_qgmma) if is_fp8(name) else ("HGMMA", n_hgmma)
        if not count:
            no_hgmma.append(f"{short[name]} [{arch}, {src}]: {count or 0} {kind}")
    hcol = "-" if n_hgmma is None else str(n_hgmma)
    qcol = "-" if n_qgmma is None else str(n_qgmma)
    print(f"{short[name]:<{w}}  {src:<{ws}}  {arch:<7} {regs if regs is not None else '?':>4} {st:>8} {ld:>8} "
          f"{stack:>5} {smem:>6} {hcol:>5} {qcol:>5}")
archs = sorted({r[1] for r in rows})
fp8_kernels = sorted(n for n in gemm_kernels if is_fp8(n))
print(f"{len(rows)} kernel compilations ({', '.join(archs)}), max registers "
      f"{max(r[5] or 0 for r in rows)}; {len(gemm_kernels)} sm_90a CUTLASS grouped GEMM kernels, HGMMA "
      f"counts {sorted(hgmma[(n, 'sm_90a')] for n in gemm_kernels if not is_fp8(n))}, QGMMA counts (FP8) "
      f"{sorted(qgmma[(n, 'sm_90a')] for n in fp8_kernels)}")

fail = False
if bad:
    print("FAIL: register spills:", *(f"{short.get(n, n[:160])} [{a}, {src}]: {st} B spill stores, {ld} B spill loads"
                                      for n, a, _, st, ld, _, _, src in bad), sep="\n  ", file=sys.stderr)
    fail = True
if no_hgmma:
    print("FAIL: sm_90a grouped GEMM kernels without HGMMA (16-bit) / QGMMA (FP8):", *no_hgmma, sep="\n  ",
          file=sys.stderr)
    fail = True
if len(gemm_kernels) != sm90_instances:
    print(f"FAIL: {sm90_instances} sm_90a grouped GEMM instance files configured, but {len(gemm_kernels)} "
          "CUTLASS GemmUniversal kernels compiled for sm_90a", file=sys.stderr)
    fail = True
if fail:
    sys.exit(1)
print("OK: zero spill stores / loads" + (f"; HGMMA in all {len(gemm_kernels) - len(fp8_kernels)} 16-bit and QGMMA "
                                          f"in all {len(fp8_kernels)} FP8 sm_90a grouped GEMM kernels"
                                          if gemm_kernels else ""))
EOF

end=$(date +%s)
echo "== done in $((end - start)) s (build $((build_end - start)) s)"
