// dtype codes shared with compass_kernels/_ext.py (DTYPE_CODES). Keep the two in sync.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace compass {

enum class DType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kFloat8E4M3 = 6,
  kFloat8E5M2 = 7,
  kUInt8 = 8,
  kInt8 = 9,
};

inline const char* dtype_name(int code) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
    case DType::kFloat8E5M2: return "float8_e5m2";
    case DType::kUInt8: return "uint8";
    case DType::kInt8: return "int8";
  }
  return "unknown";
}

}  // namespace compass
