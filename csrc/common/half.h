// bf16 / fp16 <-> float conversions for host code, bit-identical to PyTorch's (c10) scalar casts:
// round-to-nearest-even on the way down, NaN stays NaN (bf16 -> 0x7FC0, fp16 -> sign|0x7E00, as
// c10 does). Branch-free selects only, so loops over them auto-vectorize. The fp16 pair follows
// the FP16 library (Maratyszcza) that c10 uses; both need IEEE float arithmetic in the default
// rounding mode with denormals on (no -ffast-math / FTZ).
#pragma once
#include <cstdint>
#include <cstring>

namespace compass {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- bfloat16: the top 16 bits of a float ----------------------------------------------------
inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  // RNE: add 0x7FFF plus the lowest kept bit, then truncate. Overflow carries into the exponent,
  // which is the right answer (rounds up to the next binade or to inf).
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return uint16_t(is_nan ? 0x7FC0u : rounded);
}

// ---- IEEE half ----------------------------------------------------------------------------------
inline float fp16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // exponent+mantissa, sign shifted out
  // Normal (and inf/NaN): re-bias the exponent by 0xE0 << 23 then scale by 2^-112, so that
  // fp16's 0x1F exponent lands on fp32's 0xFF and NaN payloads survive.
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormal: put the mantissa under a 0.5 exponent and subtract 0.5 (exact).
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  // A mask, not `?:`, which GCC 12 keeps as a branch (no vectorization).
  const uint32_t sub_mask = 0u - uint32_t(two_w < (1u << 27));
  const uint32_t mag = (f32_bits(denormalized) & sub_mask) | (f32_bits(normalized) & ~sub_mask);
  return f32_from_bits(sign | mag);
}

inline uint16_t f32_to_fp16(float f) {
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  // 2^112 then 2^-110: values past fp16's range become inf, the rest are unchanged (x4).
  float abs_f = f32_from_bits(w & 0x7FFFFFFFu);
  float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
  // Adding 2^(e+...) makes the FPU round the mantissa to fp16's 10 bits (RNE, subnormals too).
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  // A mask, not `?:`: GCC 12 narrows that select to 16 bits and then cannot vectorize the loop.
  const uint32_t nan_mask = 0u - uint32_t(shl1_w > 0xFF000000u);
  return uint16_t((sign >> 16) | (0x7E00u & nan_mask) | (nonsign & ~nan_mask));
}

}  // namespace compass
