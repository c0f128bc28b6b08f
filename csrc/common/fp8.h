// float <-> FP8 (e4m3fn, e5m2) conversions for host code.
//
// float -> fp8 rounds to nearest even (subnormals included), saturates finite overflow and +-inf
// to +-max (448 for e4m3fn, 57344 for e5m2) and keeps NaN (0x7F, with the input's sign bit).
// On every input that PyTorch's cast handles without overflow (|x| < 464 for e4m3fn, < 61440 for
// e5m2) and on NaN the code is bit-identical to c10's fp8e4m3fn_from_fp32_value /
// fp8e5m2_from_fp32_value; past that, torch gives NaN (older e4m3fn) or inf (e5m2) where these
// saturate. Quantization clamps to +-max before casting, so there the two agree everywhere.
// The rounding follows c10: subnormals by adding a power of two (the FPU rounds the mantissa),
// normals by an integer RNE on the fp32 bits. Selects are masks, not branches, so loops over
// these vectorise. Needs IEEE float arithmetic with denormals on (no -ffast-math / FTZ).
#pragma once
#include <cstdint>

#include "common/half.h"

namespace compass {

// One format's constants. Exponent bias Eb and mantissa bits Mb: e4m3fn (7, 3), e5m2 (15, 2).
struct Fp8E4M3 {
  static constexpr float kMax = 448.0f;
  static constexpr uint32_t kMaxBits = 0x43E00000u;         // 448.0f
  static constexpr uint32_t kMaxCode = 0x7Eu;               // 0 1111 110
  static constexpr uint32_t kMinNormalBits = 121u << 23;    // 2^-6
  static constexpr uint32_t kDenormMagic = 141u << 23;      // 2^14: ulp 2^-9, the subnormal step
  static constexpr int kShift = 20;                         // 23 - 3 mantissa bits
  static constexpr uint32_t kRebias = uint32_t(7 - 127) << 23;
};
struct Fp8E5M2 {
  static constexpr float kMax = 57344.0f;
  static constexpr uint32_t kMaxBits = 0x47600000u;         // 57344.0f
  static constexpr uint32_t kMaxCode = 0x7Bu;               // 0 11110 11
  static constexpr uint32_t kMinNormalBits = 113u << 23;    // 2^-14
  static constexpr uint32_t kDenormMagic = 134u << 23;      // 2^7: ulp 2^-16, the subnormal step
  static constexpr int kShift = 21;                         // 23 - 2 mantissa bits
  static constexpr uint32_t kRebias = uint32_t(15 - 127) << 23;
};

template <class F>
inline uint8_t f32_to_fp8(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t a = u ^ sign;  // |f| as bits; integer order is float order for non-NaN
  const uint32_t nan_mask = 0u - uint32_t(a > 0x7F800000u);
  // Saturate on the bits: anything at or past max (inf included) becomes max, whose code is exact.
  const uint32_t sat = a < F::kMaxBits ? a : F::kMaxBits;
  // Subnormal: adding 2^k puts the subnormal step at the fp32 ulp, so the FPU rounds (RNE).
  const uint32_t sub = f32_bits(f32_from_bits(sat) + f32_from_bits(F::kDenormMagic)) - F::kDenormMagic;
  // Normal: re-bias the exponent and round the dropped mantissa bits to nearest even.
  const uint32_t odd = (sat >> F::kShift) & 1u;
  const uint32_t nrm = (sat + F::kRebias + ((1u << (F::kShift - 1)) - 1u) + odd) >> F::kShift;
  const uint32_t sub_mask = 0u - uint32_t(sat < F::kMinNormalBits);
  const uint32_t mag = (sub & sub_mask) | (nrm & ~sub_mask);
  return uint8_t(((mag & ~nan_mask) | (0x7Fu & nan_mask)) | (sign >> 24));
}

// The same code for |f| below F's overflow midpoint (464 for e4m3fn, 61440 for e5m2) and not NaN,
// in fewer operations: the quantizers call it when the block's amax is finite, which bounds
// |x / scale| by fmax (1 + 2^-23). Adding c = 1.5 * 2^(max(e, emin) + kShift) to |f| (e: f's
// binade, emin: the smallest normal binade of F) makes the FPU round |f| to F's grid in that
// binade (RNE, subnormals included), and the integer difference of the sum's bits and c's is
// |f| in grid steps: 8..16 for a normal e4m3 binade (16 is the carry into the next one), 0..8
// below it. Adding 8 per binade above emin gives the code. No step makes a denormal float (a
// multiply by 2^(bias - 127) would, and x86 takes a ~100-cycle assist per denormal result).
// Bit-identical to f32_to_fp8 on that range: checked exhaustively over all 2^32 inputs.
template <class F>
inline uint8_t f32_to_fp8_in_range(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t a = u & 0x7FFFFFFFu;
  uint32_t e = a & 0x7F800000u;
  e = e > F::kMinNormalBits ? e : F::kMinNormalBits;
  const uint32_t c = e + (uint32_t(F::kShift) << 23) + 0x400000u;
  const uint32_t steps = f32_bits(f32_from_bits(a) + f32_from_bits(c)) - c;
  const uint32_t code = steps + ((e - F::kMinNormalBits) >> F::kShift);
  return uint8_t(code | ((u >> 24) & 0x80u));
}

inline uint8_t f32_to_fp8e4m3fn(float f) { return f32_to_fp8<Fp8E4M3>(f); }
inline uint8_t f32_to_fp8e5m2(float f) { return f32_to_fp8<Fp8E5M2>(f); }

// e5m2 is the top byte of an IEEE half, so its decode is fp16's.
inline float fp8e5m2_to_f32(uint8_t v) { return fp16_to_f32(uint16_t(uint16_t(v) << 8)); }

// e4m3fn: no infinities; S.1111.111 is NaN. Normals re-bias the exponent (7 -> 127); subnormals
// are mant * 2^-9 (exact in fp32).
inline float fp8e4m3fn_to_f32(uint8_t v) {
  const uint32_t sign = uint32_t(v & 0x80u) << 24;
  const uint32_t e = (v >> 3) & 0xFu, m = v & 0x7u;
  const uint32_t normal = ((e + 120u) << 23) | (m << 20);
  const uint32_t sub = f32_bits(float(m) * 0x1.0p-9f);
  uint32_t mag = e == 0 ? sub : normal;
  mag = (v & 0x7Fu) == 0x7Fu ? 0x7FC00000u : mag;
  return f32_from_bits(sign | mag);
}

}  // namespace compass
