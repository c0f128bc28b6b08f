"""The benchmark harness: what every benchmark, profile and timed experiment shares.

* ``timers``: wall-clock medians on CPU (interleaved when several callables are compared) and
  device time on CUDA (a CUDA graph or an event pair), one clock for every timing in the repository;
* ``models``: the bytes each op must move and the FLOPs it must do, one definition per op, from
  which GB/s, TFLOP/s and fractions of a copy ceiling are computed;
* ``peers``: the plain-PyTorch implementations the kernels are measured against (the Megatron-style
  token dispatcher, the Hugging Face style expert loop, a loop of ``torch.mm``, ...);
* ``inputs``: routing ids and group sizes with the patterns the benchmarks and tests use (uniform,
  Zipf-skewed, empty experts, dropped ``-1`` slots, ...).

It imports torch only (no pytest, no numpy), so ``bench/``, ``profiling/``, the experiments and
the GPU scripts can use it from an installed package; ``import compass_kernels`` does not load it.
"""

from compass_kernels.benchmarking import inputs, models, peers, timers

__all__ = ["inputs", "models", "peers", "timers"]
