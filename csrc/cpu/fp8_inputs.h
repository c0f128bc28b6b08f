// Input formats of the CPU FP8 quantizer (fp8.cpp, fp8_avx512.h): raw bits in, float out, the amax
// on the bits of |x|, and the scale from an amax.
#pragma once
#include <cstdint>

#include "common/half.h"

namespace compass::cpu::fp8 {

// fp32 is read as uint32_t so that nothing here type-puns through a float pointer.
struct InF32 {
  using S = uint32_t;
  static S abs_bits(S v) { return v & 0x7FFFFFFFu; }
  static float load(S v) { return f32_from_bits(v); }
};
struct InBF16 {
  using S = uint16_t;
  static S abs_bits(S v) { return S(v & 0x7FFFu); }
  static float load(S v) { return bf16_to_f32(v); }
};
struct InF16 {
  using S = uint16_t;
  static S abs_bits(S v) { return S(v & 0x7FFFu); }
  static float load(S v) { return fp16_to_f32(v); }
};

// max |x| over p[0, n) as the bits of |x| in S's format (NaN wins over everything).
template <class In>
inline typename In::S amax_bits(const typename In::S* __restrict p, int64_t n) {
  using S = typename In::S;
  S m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const S a = In::abs_bits(p[i]);
    m = a > m ? a : m;
  }
  return m;
}

inline constexpr float kAmaxFloor = 1e-12f;

// NaN stays NaN: the comparison is false for it.
inline float scale_from_amax(float amax, float fmax) {
  return (amax < kAmaxFloor ? kAmaxFloor : amax) / fmax;
}

}  // namespace compass::cpu::fp8
