#!/usr/bin/env bash
# CI compile check for compass_kernels._cuda. Needs nvcc (CUDA 13) and the Python env with
# pybind11 and triton; needs no GPU. It
#   1. configures and builds only the _cuda target (clean first, so ptxas reports every kernel),
#   2. fails if any kernel or device function reports non-zero spill stores or loads (ptxas -v),
#   3. prints registers / spills / shared memory per kernel and architecture,
#   4. dumps the SASS with the cuobjdump shipped in triton's wheel and fails unless sm_90a code
#      is present; prints the number of SASS functions per architecture.
# Usage: .ci/cuda_check.sh [build-dir]   (default build/cuda-check)
set -euo pipefail

cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build/cuda-check}"
PYTHON="${PYTHON:-python}"
start=$(date +%s)

mkdir -p "$BUILD_DIR"
PTXAS_LOG="$BUILD_DIR/ptxas.log"
SASS_LOG="$BUILD_DIR/sass.txt"

echo "== configure ($BUILD_DIR)"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCOMPASS_CUDA=1 -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" >"$BUILD_DIR/configure.log" 2>&1 ||
  { cat "$BUILD_DIR/configure.log"; exit 1; }

echo "== build _cuda"
# --clean-first: an up-to-date object would print no ptxas lines and the check would see nothing.
if ! cmake --build "$BUILD_DIR" --target _cuda --clean-first >"$PTXAS_LOG" 2>&1; then
  cat "$PTXAS_LOG"
  echo "FAIL: build of _cuda failed" >&2
  exit 1
fi
build_end=$(date +%s)

echo "== ptxas report"
"$PYTHON" - "$PTXAS_LOG" <<'EOF'
import re, subprocess, sys

log = open(sys.argv[1]).read().splitlines()
entry_re = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
func_re = re.compile(r"Function properties for (\S+)")
spill_re = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
used_re = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")

rows, bad, cur = [], [], None  # cur = [name, arch, stack, spill_st, spill_ld, regs, smem]
for line in log:
    if m := entry_re.search(line):
        cur = [m.group(1), m.group(2), 0, 0, 0, None, 0]
        rows.append(cur)
    elif m := func_re.search(line):
        # Properties of the entry just announced, or of a non-inlined device function (whose
        # spills count too, but which gets no row of its own).
        if cur is None or m.group(1) != cur[0]:
            cur = [m.group(1), "(device fn)", 0, 0, 0, None, 0]
    elif (m := spill_re.search(line)) and cur is not None:
        cur[2:5] = [int(g) for g in m.groups()]
        if cur[3] or cur[4]:
            bad.append(f"{cur[0]} [{cur[1]}]: {cur[3]} B spill stores, {cur[4]} B spill loads")
    elif (m := used_re.search(line)) and cur is not None:
        cur[5] = int(m.group(1))
        cur[6] = int(m.group(2) or 0)

if not rows:
    sys.exit("FAIL: no 'Compiling entry function' lines in the build log (is -Xptxas=-v set?)")

names = sorted({r[0] for r in rows})
try:
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
except (OSError, subprocess.CalledProcessError):
    dem = names
short = {}
for n, d in zip(names, dem):
    d = re.sub(r"compass::cuda::(\(anonymous namespace\)::)?", "", d)
    d = re.sub(r"^void ", "", d)
    d = re.sub(r"\(.*\)$", "", d)  # drop the parameter list: the template arguments identify it
    short[n] = d

w = max(len(s) for s in short.values())
print(f"{'kernel':<{w}}  {'arch':<7} {'regs':>4} {'spill st':>8} {'spill ld':>8} {'stack':>5} {'smem':>6}")
for name, arch, stack, st, ld, regs, smem in sorted(rows, key=lambda r: (short[r[0]], r[1])):
    print(f"{short[name]:<{w}}  {arch:<7} {regs if regs is not None else '?':>4} {st:>8} {ld:>8} {stack:>5} {smem:>6}")
archs = sorted({r[1] for r in rows})
print(f"{len(rows)} kernel compilations ({', '.join(archs)}), max registers "
      f"{max(r[5] or 0 for r in rows)}")
if bad:
    print("FAIL: register spills:", *bad, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print("OK: zero spill stores / loads")
EOF

echo "== SASS (cuobjdump from triton's wheel)"
CUOBJDUMP="$("$PYTHON" -c 'import triton,os;print(os.path.join(os.path.dirname(triton.__file__),"backends/nvidia/bin/cuobjdump"))')"
SO="$(ls "$BUILD_DIR"/_cuda*.so | head -n 1)"
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

end=$(date +%s)
echo "== done in $((end - start)) s (build $((build_end - start)) s)"
