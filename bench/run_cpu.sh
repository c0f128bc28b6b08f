#!/usr/bin/env bash
# CPU benchmarks: every suite, then the table and the baseline check.
#
# glibc serves allocations above 32 MiB with fresh mmap pages and unmaps them on free, so every new
# [8192 x 2048] fp32 output pays ~35 ms of page faults on these machines: 6x the permute kernel
# itself (5.7 ms). PyTorch on CPU is normally run with a caching malloc (jemalloc/tcmalloc) for
# this reason; here glibc's own tunables keep freed memory in the heap. Ours and every peer run
# under the same allocator.
set -euo pipefail
cd "$(dirname "$0")/.."
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}
mkdir -p out
pytest bench "$@" --benchmark-only --benchmark-enable --benchmark-json out/bench.json -q -p no:cacheprovider
python bench/report.py out/bench.json
