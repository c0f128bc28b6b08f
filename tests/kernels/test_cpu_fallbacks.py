"""The portable fallbacks of the hand-vectorised CPU paths, exercised on an AVX-512 machine.

COMPASS_CPU_NO_AVX512=1 (csrc/common/cpu_features.h, read once per process) turns off the AVX-512
FP8 row pipeline (csrc/cpu/fp8_avx512.h), the wide OTPO distance tile (csrc/cpu/otpo_cost.cpp), the
64-byte non-temporal row copies (csrc/cpu/streaming.h) and the AVX-512 routing loops
(csrc/cpu/routing_avx512.h), so a CPU without AVX-512 runs what these subprocesses run: the FP8 tests
(bit-exact against the reference), the OTPO tests and the routing tests of those loops.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import compass_kernels
from helpers import cpu_backends

HERE = Path(__file__).parent


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="compass_kernels._cpu not built")
@pytest.mark.parametrize("target,min_passed", [
    ("test_fp8.py", 250),                                           # (Triton-only cases skip)
    ("test_ot.py::test_otpo_cpu_cost_tiles_on_awkward_shapes", 6),
    ("test_ot.py::test_otpo_default_matches_official_function", 8),
    ("test_ot.py::test_otpo_valid_scale_matches_valid_pairs_loop", 8),
    ("test_permute.py::test_permute_streaming_rows_bit_exact", 1),  # SSE2 non-temporal stores
    ("test_unpermute.py::test_unpermute_backward_streaming_rows", 3),
    ("test_unpermute.py::test_unpermute_streaming_rows_bit_exact", 9),
    ("test_unpermute.py::test_unpermute_backward_cpu_bits", 6),              # generic 16-bit loops
    ("test_unpermute.py::test_unpermute_matches_reference", 100),
])
def test_without_avx512_paths(target, min_passed):
    # The child imports the compass_kernels this process imported (installed, or the source tree
    # with its built module); run from tests/, a source checkout without the .so cannot shadow it.
    pkg_root = str(Path(compass_kernels.__file__).resolve().parents[1])
    env = dict(os.environ, COMPASS_CPU_NO_AVX512="1",
               PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE / target)],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= min_passed, proc.stdout[-2000:]   # not skipped for want of _cpu
