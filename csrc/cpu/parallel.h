// Shared OpenMP helper of the CPU kernels.
#pragma once
#include <cstdint>

#ifdef COMPASS_OPENMP
#include <omp.h>
#endif

namespace compass::cpu {

// Runs fn(t0, t1) on each thread's contiguous share of [0, n); serially unless `parallel`.
template <class Fn>
void parallel_ranges(int64_t n, bool parallel, Fn&& fn) {
#pragma omp parallel if (parallel)
  {
#ifdef COMPASS_OPENMP
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
    const int64_t nt = 1, id = 0;
#endif
    fn(n * id / nt, n * (id + 1) / nt);
  }
}

}  // namespace compass::cpu
