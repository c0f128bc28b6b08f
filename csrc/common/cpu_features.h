// Run-time CPU feature checks for the hand-vectorised CPU paths, with one switch to turn them off:
// COMPASS_CPU_NO_AVX512=1 makes every such path take its portable fallback, which is how the
// tests exercise those fallbacks on an AVX-512 machine (tests/kernels/test_cpu_fallbacks.py). Read once.
#pragma once
#include <cstdlib>
#include <cstring>

// The target attribute of the hand-written AVX-512 functions: the features have_avx512() checks.
#if defined(__x86_64__) && defined(__GNUC__)
#define COMPASS_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#endif

namespace compass {

inline bool avx512_paths_disabled() {
  static const bool off = [] {
    const char* v = std::getenv("COMPASS_CPU_NO_AVX512");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }();
  return off;
}

// AVX-512 F, BW, VL and DQ (x86-64-v4), unless disabled.
inline bool have_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return yes && !avx512_paths_disabled();
#else
  return false;
#endif
}

}  // namespace compass
