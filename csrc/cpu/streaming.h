// Non-temporal ("streaming") stores, shared by the CPU kernels that write a large output once:
// permute and unpermute's backward (routing.cpp), the FP8 codes (fp8.cpp).
//
// An ordinary store first reads its destination line (read-for-ownership). When the output is
// larger than the last-level cache nothing gains from that read, and it is half again the traffic
// of a copy; non-temporal stores skip it. Below the threshold the output would still be in cache
// for the op that reads it next, so ordinary stores stay.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace compass::cpu {

constexpr int64_t kStreamMinBytes = int64_t(32) << 20;

// Whether to stream an output of total_bytes written in rows of row_bytes starting at dst: large
// enough, and every row starts on a 64-byte line.
inline bool use_streaming_stores(const void* dst, int64_t row_bytes, int64_t total_bytes) {
#if defined(__x86_64__)
  return total_bytes >= kStreamMinBytes && row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0;
#else
  (void)dst, (void)row_bytes, (void)total_bytes;
  return false;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One 64-byte non-temporal store per line (dst 64-byte aligned), then 16-byte ones for the rest.
COMPASS_AVX512_TARGET inline void stream_bytes_avx512(char* dst, const char* src, int64_t n) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
  }
  for (; i < n; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
}
#endif

// dst (16-byte aligned) = src, n a multiple of 16 bytes, with non-temporal stores: whole lines
// with AVX-512 where dst is 64-byte aligned (the case use_streaming_stores admits), SSE2 otherwise.
inline void stream_bytes(char* dst, const char* src, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (have_avx512() && reinterpret_cast<uintptr_t>(dst) % 64 == 0) return stream_bytes_avx512(dst, src, n);
#endif
#if defined(__x86_64__)
  for (int64_t i = 0; i < n; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
#else
  std::memcpy(dst, src, n);
#endif
}

// Non-temporal stores are weakly ordered: each thread fences its own before the region ends.
inline void streaming_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace compass::cpu
