// Floating-point dtype tags of the CPU routing kernels: storage type S, accumulator type Acc, an
// exact load and torch's rounding store (common/half.h for the 16-bit types).
#pragma once
#include <cstdint>

#include "common/half.h"

namespace compass::cpu {

struct F32 {
  using S = float;
  using Acc = float;
  static float load(float v) { return v; }
  static float store(float a) { return a; }
};
struct F64 {
  using S = double;
  using Acc = double;
  static double load(double v) { return v; }
  static double store(double a) { return a; }
};
struct F16 {
  using S = uint16_t;
  using Acc = float;
  static float load(uint16_t v) { return fp16_to_f32(v); }
  static uint16_t store(float a) { return f32_to_fp16(a); }
};
struct BF16 {
  using S = uint16_t;
  using Acc = float;
  static float load(uint16_t v) { return bf16_to_f32(v); }
  static uint16_t store(float a) { return f32_to_bf16(a); }
};

// The routing backward's dot product from its 16 lane sums p (overwritten) and the scalar sum of
// the tail: lanes halved pairwise 8, 4, 2, 1, then + tail. The generic and AVX-512 loops both end
// here, so they agree bit for bit.
template <class Acc>
inline Acc pairwise_lane_sum(Acc* p, Acc tail) {
  for (int half = 8; half >= 1; half /= 2) {
    for (int l = 0; l < half; ++l) p[l] = p[l] + p[l + half];
  }
  return p[0] + tail;
}

}  // namespace compass::cpu
