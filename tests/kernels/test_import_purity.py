"""``import compass_kernels`` needs torch alone: it loads none of the model layer's packages."""

from __future__ import annotations

import json

from helpers import run_python

# packages that only extras install; none may load with `import compass_kernels`
EXTRAS_ONLY = ("matplotlib", "tqdm", "safetensors", "nvtx", "numpy", "transformers", "tokenizers", "ot",
               "compass_model")


def test_import_compass_kernels_loads_no_extra():
    # torch itself may load numpy and tqdm when they are installed: count only what compass_kernels adds
    out = run_python(
        "import sys, json\n"
        "import torch\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "import compass_kernels, compass_kernels.ranges\n"
        "compass_kernels.backend_info()\n"
        "after = {m.split('.')[0] for m in sys.modules}\n"
        "print(json.dumps({'before': sorted(before), 'added': sorted(after - before)}))\n")
    res = json.loads(out.strip().splitlines()[-1])
    added = [m for m in EXTRAS_ONLY if m in res["added"]]
    assert not added, f"import compass_kernels loaded {added}"
    # these are never loaded by torch itself either
    assert not [m for m in ("matplotlib", "safetensors", "nvtx", "transformers", "compass_model")
                if m in res["before"] + res["added"]]


def test_missing_triton_names_its_extra():
    out = run_python("import sys\n"
               "sys.modules['triton'] = None\n"
               "from compass_kernels import _backend\n"
               "print(_backend._triton_status())\n")
    assert "False" in out and "pip install 'compass-kernels[triton]'" in out, out
