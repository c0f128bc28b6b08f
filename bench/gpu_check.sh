#!/usr/bin/env bash
# The one-call GPU run: everything a lent GPU machine should answer, in at most ten minutes.
#
#   bash bench/gpu_check.sh                         # on the GPU machine, from the repository root
#   COMPASS_GPU_DRY_RUN=1 bash bench/gpu_check.sh   # the same steps on a CPU machine (CI)
#
# Steps, each under `timeout`, logged to $OUT/<step>.log with its status and seconds:
#   wheels     install the wheels the image lacks from $COMPASS_WHEELS (default .whl/; e.g.
#              nvidia_cutlass, scikit_build_core, pathspec, pytest_xdist), no index, into $SITE
#   preflight  one second: Python headers, scikit-build-core, pybind11, cmake, ninja, nvcc, torch,
#              triton, the GPU
#   build      COMPASS_CUDA=1 pip wheel --no-build-isolation, then install it into $SITE
#   import     compass_kernels must come from $SITE (not the source tree) with _cpu and _cuda
#   smoke      bench/gpu_smoke.py: one PASS / FAIL / SKIP line per CUDA and Triton entry point
#   bench      bench/gpu_bench.py: the timing table, each row printed as measured
#   tests      tests/kernels/gpu and tests/kernels/triton compiled (TRITON_INTERPRET=0, COMPASS_POISON=1), -n 8 with
#              pytest-xdist, else serial; no -x
#   sanitizer  compute-sanitizer memcheck over the smoke's CUDA checks (tiny shapes)
# Every Python step runs from $OUT with `python -P`, so the source tree never shadows the built
# package. The dry run (COMPASS_GPU_DRY_RUN=1) uses the package already installed in the current
# environment (CI installed it), runs the Triton checks in the interpreter and the benchmark at tiny
# shapes, reports the CUDA-only steps as SKIP and exits 0 when nothing failed.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DRY="${COMPASS_GPU_DRY_RUN:-0}"
OUT="${OUT:-/tmp/compass-gpu-check}"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
SITE="${SITE:-$OUT/site}"
WHEELS="${COMPASS_WHEELS:-$REPO/.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# Seconds for all steps together (the interpreter on a loaded CI machine is slow: more for the dry run).
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  BUDGET="${COMPASS_GPU_BUDGET_S:-1200}" SMOKE_S=400
else
  export TRITON_INTERPRET=0
  BUDGET="${COMPASS_GPU_BUDGET_S:-590}" SMOKE_S=90
fi
start=$SECONDS
SUMMARY=()
FAILED=0

# step NAME SECONDS COMMAND...: runs COMMAND under timeout (capped by the remaining budget) from $OUT,
# tees its output to $OUT/NAME.log and records "STATUS NAME (s)".
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - (SECONDS - start)))
  [ "$limit" -gt "$left" ] && limit="$left"
  if [ "$limit" -lt 5 ]; then
    SUMMARY+=("SKIP $name: out of time (budget ${BUDGET} s)")
    echo "== SKIP $name: out of time" | tee "$OUT/$name.log"
    return 0
  fi
  echo "== $name (timeout ${limit} s)"
  local t0=$SECONDS rc
  (cd "$OUT" && timeout --kill-after=5 "$limit" "$@") 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0)) status=PASS
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status="FAIL (timed out after ${limit} s)"
  elif [ "$rc" != 0 ]; then
    status="FAIL (exit $rc)"
  fi
  [ "$status" = PASS ] || FAILED=$((FAILED + 1))
  SUMMARY+=("$status $name (${dt} s)")
  echo "== $status $name in ${dt} s"
}

skip() {  # skip NAME WHY
  SUMMARY+=("SKIP $1: $2")
  echo "== SKIP $1: $2" | tee "$OUT/$1.log"
}

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
else
  skip wheels "no wheels in $WHEELS"
fi

step preflight 10 "$PY" -P - <<'EOF'
# Package metadata and --version lines only (no imports of torch / CUTLASS): about a second.
import importlib.metadata as md, os, shutil, subprocess, sys, sysconfig
def ver(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "MISSING"
def cmd(*args, line=-1):
    if not shutil.which(args[0]):
        return "MISSING"
    out = subprocess.run(args, capture_output=True, text=True, timeout=3).stdout.strip().splitlines()
    return out[line] if out else "?"
inc = sysconfig.get_paths()["include"]
rows = {"python": sys.version.split()[0],
        "Python.h": "present" if os.path.exists(os.path.join(inc, "Python.h")) else f"MISSING in {inc}"}
for dist in ("scikit-build-core", "pybind11", "nvidia-cutlass", "cmake", "ninja", "torch", "triton",
             "pytest", "pytest-xdist"):
    rows[dist] = ver(dist)
rows["cmake on PATH"] = cmd("cmake", "--version", line=0)
rows["nvcc"] = cmd("nvcc", "--version")
rows["compute-sanitizer"] = shutil.which("compute-sanitizer") or "MISSING"
rows["gpu"] = cmd("nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader")
for k, v in rows.items():
    print(f"  {k:18} {v}")
EOF

if [ "$DRY" = 1 ]; then
  skip build "CUDA-only step (dry run): the installed package is used"
else
  rm -rf "$OUT/wheel"
  step build 300 env COMPASS_CUDA=1 "$PY" -m pip wheel "$REPO" -v --no-build-isolation --no-deps \
    -w "$OUT/wheel" -C build-dir="$OUT/skbuild" -C cmake.define.COMPASS_CUDA=1
  step install 30 sh -c "'$PY' -m pip install -q --no-index --no-deps --upgrade --target '$SITE' '$OUT'/wheel/*.whl"
fi

WANT_CUDA=$([ "$DRY" = 1 ] && echo 0 || echo 1)
step import 60 "$PY" -P -c "
import os, sys, json
import compass_kernels as ck
from compass_kernels import _ext
here = os.path.realpath(os.path.dirname(ck.__file__))
print('compass_kernels from', here)
assert here != os.path.realpath('$REPO/compass_kernels'), 'the source tree shadows the installed package'
assert _ext.cpu_module is not None, _ext.cpu_missing
assert $WANT_CUDA == 0 or _ext.cuda_module is not None, _ext.cuda_missing
print(json.dumps(ck.backend_info()['built'], indent=1))
"

# On CPU every Triton check must run and pass (the CUDA ones SKIP): at least 15 of them.
step smoke "$SMOKE_S" "$PY" -P "$REPO/bench/gpu_smoke.py" $([ "$DRY" = 1 ] && echo --min-pass 15)

if [ "$DRY" = 1 ]; then
  step bench 400 "$PY" -P "$REPO/bench/gpu_bench.py" --dry-run --only routing,fp8 --json "$OUT/bench.jsonl"
else
  step bench 150 "$PY" -P "$REPO/bench/gpu_bench.py" --json "$OUT/bench.jsonl"
fi

XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8" || echo "")
if [ "$DRY" = 1 ]; then  # the interpreter suite runs in CI's test step; here the GPU files and the launch table
  step tests 300 env COMPASS_POISON=1 "$PY" -P -m pytest --rootdir "$REPO" -c "$REPO/pyproject.toml" -q \
    -p no:cacheprovider $XDIST "$REPO/tests/kernels/gpu" "$REPO/tests/kernels/triton/test_launch_options.py"
else
  step tests 150 env COMPASS_POISON=1 "$PY" -P -m pytest --rootdir "$REPO" -c "$REPO/pyproject.toml" -q \
    -p no:cacheprovider $XDIST "$REPO/tests/kernels/gpu" "$REPO/tests/kernels/triton"
fi

if [ "$DRY" = 1 ]; then
  skip sanitizer "CUDA-only step (dry run)"
elif command -v compute-sanitizer >/dev/null; then
  step sanitizer 60 compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
    "$PY" -P "$REPO/bench/gpu_smoke.py" --filter cuda:
else
  skip sanitizer "compute-sanitizer not on PATH"
fi

echo "== summary ($((SECONDS - start)) s, logs in $OUT)" | tee "$OUT/summary.txt"
printf '  %s\n' "${SUMMARY[@]}" | tee -a "$OUT/summary.txt"
[ "$FAILED" = 0 ]
