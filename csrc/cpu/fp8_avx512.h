// The AVX-512 path of the CPU FP8 quantizer (fp8.cpp): the in-range cast 64 values at a time and
// the fused cast + next-row amax of the row pipeline. Defines COMPASS_AVX512_CAST where it is
// compiled (x86-64 GCC); fp8.cpp dispatches on kHaveAvx512 at run time.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/cpu_features.h"
#include "common/fp8.h"
#include "cpu/fp8_inputs.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COMPASS_AVX512_CAST 1
#include <immintrin.h>

namespace compass::cpu::fp8 {

// f32_to_fp8_in_range on 16 lanes: dword codes 0..255, the sign in bit 7.
template <class F>
COMPASS_AVX512_TARGET inline __m512i codes16(__m512 x, __m512 s) {
  const __m512i q = _mm512_castps_si512(_mm512_div_ps(x, s));
  const __m512i min_normal = _mm512_set1_epi32(int(F::kMinNormalBits));
  const __m512i a = _mm512_and_si512(q, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i e = _mm512_max_epu32(_mm512_and_si512(q, _mm512_set1_epi32(0x7F800000)), min_normal);
  const __m512i c = _mm512_add_epi32(e, _mm512_set1_epi32(int((uint32_t(F::kShift) << 23) + 0x400000u)));
  const __m512i sum = _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(c)));
  const __m512i code = _mm512_add_epi32(_mm512_sub_epi32(sum, c),
                                        _mm512_srli_epi32(_mm512_sub_epi32(e, min_normal), F::kShift));
  // code | (sign & 0x80): ternary-logic table A | (B & C) = 0xF8
  return _mm512_ternarylogic_epi32(code, _mm512_srli_epi32(q, 24), _mm512_set1_epi32(0x80), 0xF8);
}

// acc = max(acc, |p[0, 64)| as bits), in the input's own lane width (NaN bits win, as amax_bits).
template <class In>
COMPASS_AVX512_TARGET inline __m512i amax64(__m512i acc, const typename In::S* p) {
  if constexpr (std::is_same_v<In, InF32>) {
    const __m512i m = _mm512_set1_epi32(0x7FFFFFFF);
    for (int j = 0; j < 4; ++j) acc = _mm512_max_epu32(acc, _mm512_and_si512(_mm512_loadu_si512(p + 16 * j), m));
  } else {
    const __m512i m = _mm512_set1_epi16(0x7FFF);
    for (int j = 0; j < 2; ++j) acc = _mm512_max_epu16(acc, _mm512_and_si512(_mm512_loadu_si512(p + 32 * j), m));
  }
  return acc;
}

template <class In>
COMPASS_AVX512_TARGET inline typename In::S reduce_amax(__m512i acc) {
  if constexpr (std::is_same_v<In, InF32>) {
    return _mm512_reduce_max_epu32(acc);
  } else {
    // halve to 8 lanes, then phminposuw on the complement: the max of 8 unsigned words in one op
    const __m256i y = _mm256_max_epu16(_mm512_castsi512_si256(acc), _mm512_extracti64x4_epi64(acc, 1));
    const __m128i x = _mm_max_epu16(_mm256_castsi256_si128(y), _mm256_extracti128_si256(y, 1));
    const __m128i ones = _mm_set1_epi32(-1);
    return typename In::S(~_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(x, ones))) & 0xFFFF);
  }
}

// The in-range cast of 64 values, written out: GCC's vectorisation of the scalar form packs each
// 16 codes with a two-uop vpmovdb (and bf16 loads with a zero-extend and a shift); here bf16
// pairs are split by unpacking against zero (the value lands in the high half of each lane, no
// shift), and 64 codes leave through two saturating dword->word packs, one word->byte pack and
// one permute that restores the order the in-lane packs shuffled (~10% in cache). kStream: out is
// 64-byte aligned and the codes go out with a non-temporal store (cpu/streaming.h).
template <class In, class F, bool kStream>
[[gnu::always_inline]] COMPASS_AVX512_TARGET inline void cast64(const typename In::S* __restrict p, __m512 s,
                                                                uint8_t* __restrict out) {
  __m512i c0, c1, c2, c3;
  if constexpr (std::is_same_v<In, InBF16>) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 32);
    c0 = codes16<F>(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v0)), s);
    c1 = codes16<F>(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v0)), s);
    c2 = codes16<F>(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v1)), s);
    c3 = codes16<F>(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v1)), s);
  } else if constexpr (std::is_same_v<In, InF32>) {
    c0 = codes16<F>(_mm512_loadu_ps(p), s);
    c1 = codes16<F>(_mm512_loadu_ps(p + 16), s);
    c2 = codes16<F>(_mm512_loadu_ps(p + 32), s);
    c3 = codes16<F>(_mm512_loadu_ps(p + 48), s);
  } else {  // fp16: the hardware conversion is exact
    c0 = codes16<F>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), s);
    c1 = codes16<F>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))), s);
    c2 = codes16<F>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))), s);
    c3 = codes16<F>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 48))), s);
  }
  const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
  // bf16: unpacking put elements 8j..8j+3 / 8j+4..8j+7 of 128-bit lane j in two vectors and the
  // packs put them back in lane order, so only the 64-bit halves of the lanes need reordering;
  // fp32 / fp16 load in order, and after the packs lane j holds elements 4j.. of each 16.
  const __m512i ordered =
      std::is_same_v<In, InBF16>
          ? _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), bytes)
          : _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bytes);
  if constexpr (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out), ordered);
  } else {
    _mm512_storeu_si512(out, ordered);
  }
}

// out[0, n) = the in-range cast of p / scale (scale finite); kStream: out 64-byte aligned.
template <class In, class F, bool kStream>
COMPASS_AVX512_TARGET void cast_in_range_avx512(const typename In::S* __restrict p, int64_t n, float scale,
                                                uint8_t* __restrict out) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) cast64<In, F, kStream>(p + i, s, out + i);
  for (; i < n; ++i) out[i] = f32_to_fp8_in_range<F>(In::load(p[i]) / scale);
}

inline const bool kHaveAvx512 = have_avx512();

// One row of the row pipeline, blocks of bs (bs = K for the row granularity): block kb gets
// scale[kb] from the amax bits cur[kb] and its codes, and nxt[kb] becomes the amax bits of the
// same block of `next` (when next is not null), reduced in the same loop as the casts, so the
// next row's loads overlap this row's arithmetic and no separate amax pass streams it; `ahead`
// (the row after next, or null) is prefetched into L2 on the way. A block with a non-finite
// scale takes the general cast and a separate amax of next's block. kStream: out 64-byte aligned
// and bs, K multiples of 64, so every code leaves by a non-temporal store of cast64.
template <class In, class F, bool kStream>
COMPASS_AVX512_TARGET void quantize_row_fused(const typename In::S* p, const typename In::S* next,
                                              const typename In::S* ahead, int64_t K, int64_t bs,
                                              const typename In::S* cur, typename In::S* nxt, float* scale,
                                              uint8_t* out) {
  using S = typename In::S;
  const int64_t nkb = (K + bs - 1) / bs;
  for (int64_t kb = 0; kb < nkb; ++kb) scale[kb] = scale_from_amax(In::load(cur[kb]), F::kMax);
  for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bs, ++kb) {
    const int64_t len = bs < K - k0 ? bs : K - k0, n64 = len / 64 * 64;
    const float sc = scale[kb];
    const S* q = next ? next + k0 : nullptr;
    if (!std::isfinite(sc)) {
      for (int64_t i = 0; i < len; ++i) out[k0 + i] = f32_to_fp8<F>(In::load(p[k0 + i]) / sc);
      if (q) nxt[kb] = amax_bits<In>(q, len);
      continue;
    }
    const __m512 s = _mm512_set1_ps(sc);
    __m512i acc = _mm512_setzero_si512();
    for (int64_t i = 0; i < n64; i += 64) {
      cast64<In, F, kStream>(p + k0 + i, s, out + k0 + i);
      if (q) {
        acc = amax64<In>(acc, q + i);
        if (ahead) {
          const char* a = reinterpret_cast<const char*>(ahead + k0 + i);
          for (int b = 0; b < 64 * int(sizeof(S)); b += 64) _mm_prefetch(a + b, _MM_HINT_T1);
        }
      }
    }
    for (int64_t i = n64; i < len; ++i) out[k0 + i] = f32_to_fp8_in_range<F>(In::load(p[k0 + i]) / sc);
    if (q) {
      const S head = n64 > 0 ? reduce_amax<In>(acc) : S(0), tail = amax_bits<In>(q + n64, len - n64);
      nxt[kb] = head > tail ? head : tail;
    }
  }
}

}  // namespace compass::cpu::fp8
#endif
