#!/usr/bin/env bash
# GPU timeline of one MoE layer forward, naive HF-style loop against the fused compass path, with the
# stage NVTX ranges (domain "compass": router, permute, expert_fc1, activation, expert_fc2, unpermute)
# inside compass.naive / compass.fused ranges. Needs a CUDA GPU and nsys; not runnable on CPU machines.
#   profiling/nsys_moe.sh [out-prefix] [moe_breakdown.py args...]
#   e.g. profiling/nsys_moe.sh out/moe_h200 --tokens 16384 --d-model 4096 --ffn 2816 --dtype bfloat16
# Writes <prefix>.nsys-rep, <prefix>_summary.json, <prefix>_trace.json (torch.profiler) and the
# per-range table of `nsys stats --report nvtx_sum` (unsynchronised device-side view). moe_breakdown.py
# itself synchronises at each stage exit on CUDA, so its own table is the serialised view.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${1:-out/moe_nsys}; shift || true
mkdir -p "$(dirname "$PREFIX")"
command -v nsys >/dev/null || { echo "nsys not found (Nsight Systems); on CPU use python profiling/moe_breakdown.py" >&2; exit 2; }
export PYTHONUNBUFFERED=1
nsys profile -t cuda,nvtx --force-overwrite true -o "$PREFIX" \
  python profiling/moe_breakdown.py --device cuda --dtype bfloat16 --iters 5 \
    --trace "${PREFIX}_trace.json" --json "${PREFIX}_summary.json" "$@"
nsys stats --report nvtx_sum --format table "$PREFIX.nsys-rep" | tee "${PREFIX}_nvtx.txt"
