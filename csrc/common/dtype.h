// dtype codes of the kernel boundary: the one table. The compiled modules export it as
// `dtype_codes` ({torch dtype name: code}, common/kernel_bindings.h), from which
// compass_kernels/_ext.py builds DTYPE_CODES.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

// X(enumerator, code, torch name)
#define COMPASS_DTYPES(X)              \
  X(kFloat32, 0, "float32")            \
  X(kFloat64, 1, "float64")            \
  X(kFloat16, 2, "float16")            \
  X(kBFloat16, 3, "bfloat16")          \
  X(kInt32, 4, "int32")                \
  X(kInt64, 5, "int64")                \
  X(kFloat8E4M3, 6, "float8_e4m3fn")   \
  X(kFloat8E5M2, 7, "float8_e5m2")     \
  X(kUInt8, 8, "uint8")                \
  X(kInt8, 9, "int8")

namespace compass {

enum class DType : int {
#define COMPASS_DTYPE_ENUM(enumerator, code, name) enumerator = code,
  COMPASS_DTYPES(COMPASS_DTYPE_ENUM)
#undef COMPASS_DTYPE_ENUM
};

inline const char* dtype_name(int64_t code) {
#define COMPASS_DTYPE_NAME(enumerator, c, name) \
  if (code == c) return name;
  COMPASS_DTYPES(COMPASS_DTYPE_NAME)
#undef COMPASS_DTYPE_NAME
  return "unknown";
}

}  // namespace compass
