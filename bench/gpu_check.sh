#!/usr/bin/env bash
# One prepared GPU run (the `device` tool, when a task is lent one): build _cuda there, run the GPU
# tests and the compiled Triton tests, then the GPU benchmark table. About 5-8 minutes on an H200.
#   carry: .whl (nvidia_cutlass wheel: pip download --no-deps nvidia-cutlass -d .whl)
set -uo pipefail
export TRITON_INTERPRET=0 COMPASS_POISON=1 PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv
COMPASS_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tee "$OUT/build.log" | tail -5
python3 -m compass_kernels.cli info | tee "$OUT/info.json"
python3 -m pytest tests/gpu tests/triton -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
python3 bench/gpu_bench.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/bench.log"
