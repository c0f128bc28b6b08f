// The AVX-512 loops of the CPU routing kernels (routing.cpp) for fp32, bf16 and fp16: unpermute's
// weighted sum of up to 4 rows (combine_rows_avx512) and its backward's scaled copies and dot
// products (scale_and_dot_avx512). Each does the generic loop's fp32 operations in the same order
// and rounds as its Tag does, so the bits are the same; kStream sends 64-byte lines to memory with
// non-temporal stores (cpu/streaming.h). Defines COMPASS_ROUTING_AVX512 where it is compiled
// (x86-64 GCC); routing.cpp dispatches on have_avx512() at run time.
//
// Why: the generic loops of the 16-bit types convert through common/half.h's bit arithmetic,
// which GCC vectorises poorly (in cache, T=1024 H=2048 k=2: fp16 unpermute 349 -> 104 us, its
// backward 1440 -> 180 us), and the streamed forms skip the read-for-ownership of outputs larger
// than the last-level cache and the 16-value buffer per store of the generic backward (T=8192
// H=2048: unpermute E16k2 fp32 2.9 -> 2.4-2.6 ms in a fast-memory window, bf16 2.6-3.0 -> 2.3-2.5,
// fp16 4.0-4.3 -> 2.4-2.8; backward fp32 7.2-7.8 -> 6.2-6.8 ms, bf16 / fp16, whose buffered stores
// went out in 16-byte halves of lines, 14.4-15.9 -> 3.9-4.2 ms). Sums streamed through an L1 row
// buffer instead had measured slower than ordinary stores.
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/cpu_features.h"
#include "cpu/float_tags.h"

namespace compass::cpu {

// The tags with AVX-512 loops, and those (16-bit) that take them at every size.
template <class Tag>
constexpr bool kHalfTag = std::is_same_v<Tag, BF16> || std::is_same_v<Tag, F16>;
template <class Tag>
constexpr bool kAvx512Tag = std::is_same_v<Tag, F32> || kHalfTag<Tag>;

}  // namespace compass::cpu

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COMPASS_ROUTING_AVX512 1
#include <immintrin.h>

namespace compass::cpu {

// 16 values of S as fp32 (exact), and 16 fp32 values rounded to a 16-bit S as Tag::store does
// (common/half.h): round to nearest even; NaN to 0x7FC0 (bf16) or sign | 0x7E00 (fp16).
template <class Tag>
COMPASS_AVX512_TARGET inline __m512 load16(const typename Tag::S* p) {
  if constexpr (std::is_same_v<Tag, F32>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<Tag, BF16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

template <class Tag>
COMPASS_AVX512_TARGET inline __m256i round16(__m512 a) {
  const __m512i u = _mm512_castps_si512(a);
  const __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
  if constexpr (std::is_same_v<Tag, BF16>) {
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  } else {  // the hardware conversion rounds as c10 does; only its NaN keeps payload bits
    const __m256i h = _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i nan_code = _mm512_cvtepi32_epi16(
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)),
                        _mm512_set1_epi32(0x7E00)));
    return _mm256_mask_mov_epi16(h, nan, nan_code);
  }
}

// 16 lanes per fp32 vector; kStream moves whole 64-byte lines: one fp32 vector or two rounded to 16 bits.
template <class Tag, bool kStream>
constexpr int kVectors = kStream ? 64 / (16 * int(sizeof(typename Tag::S))) : 1;

// a[0, kVectors) as S to out: one non-temporal 64-byte line (out 64-byte aligned), or 16 values
// with an ordinary store.
template <class Tag, bool kStream>
COMPASS_AVX512_TARGET inline void store_vectors(typename Tag::S* out, const __m512* a) {
  if constexpr (std::is_same_v<Tag, F32>) {
    if constexpr (kStream) {
      _mm512_stream_ps(out, a[0]);
    } else {
      _mm512_storeu_ps(out, a[0]);
    }
  } else if constexpr (kStream) {
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(round16<Tag>(a[0])), round16<Tag>(a[1]), 1);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out), both);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), round16<Tag>(a[0]));
  }
}

// routing.cpp's combine_rows<Tag, R, kFirst, kLast>: a = (first ? 0 : acc) + w[0]*src[0] + ...,
// to out (last) or back to acc, 16 lanes at a time, then the scalar form for the last n % 16.
// kStream (with kLast): n a multiple of 64 / sizeof(S), out 64-byte aligned.
template <class Tag, int R, bool kFirst, bool kLast, bool kStream>
COMPASS_AVX512_TARGET void combine_rows_avx512(const typename Tag::S* const* src, const float* w, int64_t n,
                                               float* acc, typename Tag::S* out) {
  static_assert(kLast || !kStream, "only the final sums are streamed");
  constexpr int kV = kVectors<Tag, kStream>;
  using S = typename Tag::S;
  __m512 wr[R];
  const S* p[R];
  for (int r = 0; r < R; ++r) wr[r] = _mm512_set1_ps(w[r]), p[r] = src[r];
  int64_t i = 0;
  for (; i + 16 * kV <= n; i += 16 * kV) {
    __m512 a[kV];
    for (int v = 0; v < kV; ++v) {
      const int64_t j = i + 16 * v;
      a[v] = kFirst ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + j);
      for (int r = 0; r < R; ++r) a[v] = _mm512_add_ps(a[v], _mm512_mul_ps(wr[r], load16<Tag>(p[r] + j)));
    }
    if constexpr (kLast) {
      store_vectors<Tag, kStream>(out + i, a);
    } else {
      _mm512_storeu_ps(acc + i, a[0]);
    }
  }
  for (; i < n; ++i) {
    float a = kFirst ? 0.0f : acc[i];
    for (int r = 0; r < R; ++r) a = a + w[r] * Tag::load(p[r][i]);
    if constexpr (kLast) {
      out[i] = Tag::store(a);
    } else {
      acc[i] = a;
    }
  }
}

// routing.cpp's scale_and_dot<Tag, R, kStream>: dst_r = w_r * g rounded to S, and <g, y_r> as 16
// lane sums in order, a scalar sum of the last H % 16, the lanes halved pairwise 8, 4, 2, 1, plus
// the tail. kStream: H a multiple of 64 / sizeof(S), dst rows 64-byte aligned.
template <class Tag, int R, bool kStream>
COMPASS_AVX512_TARGET void scale_and_dot_avx512(const typename Tag::S* g, const typename Tag::S* const* y,
                                                const float* w, typename Tag::S* const* dst, int64_t H, float* dots) {
  constexpr int kV = kVectors<Tag, kStream>;
  __m512 wr[R], part[R];
  for (int r = 0; r < R; ++r) wr[r] = _mm512_set1_ps(w[r]), part[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 * kV <= H; i += 16 * kV) {
    __m512 gv[kV];
    for (int v = 0; v < kV; ++v) gv[v] = load16<Tag>(g + i + 16 * v);
    for (int r = 0; r < R; ++r) {
      __m512 d[kV];
      for (int v = 0; v < kV; ++v) {
        part[r] = _mm512_add_ps(part[r], _mm512_mul_ps(gv[v], load16<Tag>(y[r] + i + 16 * v)));
        d[v] = _mm512_mul_ps(wr[r], gv[v]);
      }
      store_vectors<Tag, kStream>(dst[r] + i, d);
    }
  }
  float tail[R] = {};
  for (; i < H; ++i) {
    const float gv = Tag::load(g[i]);
    for (int r = 0; r < R; ++r) {
      dst[r][i] = Tag::store(w[r] * gv);
      tail[r] = tail[r] + gv * Tag::load(y[r][i]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float p[16];
    _mm512_storeu_ps(p, part[r]);
    dots[r] = pairwise_lane_sum(p, tail[r]);
  }
}

}  // namespace compass::cpu
#endif
