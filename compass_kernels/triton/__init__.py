"""Triton kernels of Compass (GPU; tested on CPU under ``TRITON_INTERPRET=1``).

Each module holds private ``@triton.jit`` kernels and thin host launchers that pick block
sizes and launch; argument validation lives in the op layer above.
``python -m compass_kernels.triton.aot`` compiles every kernel ahead of time for sm_90 without
a GPU (see ``aot.py``).
"""
