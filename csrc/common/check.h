// Argument checks for the kernel entry points (common/kernels.def). Every failure throws std::invalid_argument
// (pybind11 turns it into ValueError) with a message naming the argument and what was expected.
// The Python layer validates first; these are defence in depth against out-of-bounds writes.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/dtype.h"

namespace compass {

// check(cond, "x must be ", 3, " got ", 4): the message is only built on failure.
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

template <class... Parts>
inline void check(bool cond, const Parts&... parts) {
  if (!cond) fail(parts...);
}

inline void check_nonneg(const char* name, int64_t v) {
  check(v >= 0, name, " must be >= 0, got ", v);
}

inline void check_positive(const char* name, int64_t v) {
  check(v >= 1, name, " must be >= 1, got ", v);
}

// A buffer that will be touched (numel > 0) must not be null.
inline void check_ptr(const char* name, const void* p, int64_t numel) {
  check(p != nullptr || numel == 0, name, " is a null pointer but ", numel, " elements are accessed");
}

// Row strides are in elements; rows may be padded (stride > H) but must not overlap.
inline void check_row_stride(const char* name, int64_t stride, int64_t H) {
  check(stride >= H, name, " must be >= H = ", H, " (row stride in elements), got ", stride);
}

// Tensors that must have `first`'s dtype (one storage type for a kernel's operands).
inline void check_same_dtype(const char* first, int64_t dtype,
                             std::initializer_list<std::pair<const char*, int64_t>> others) {
  for (const auto& [name, code] : others)
    check(code == dtype, name, " must have ", first, "'s dtype ", dtype_name(dtype), ", got ", dtype_name(code));
}

inline bool is_float_dtype(int code) {
  return code == int(DType::kFloat32) || code == int(DType::kFloat64) ||
         code == int(DType::kFloat16) || code == int(DType::kBFloat16);
}

inline void check_float_dtype(const char* name, int code) {
  check(is_float_dtype(code), name, " must be float32, float64, float16 or bfloat16, got code ",
        code, " (", dtype_name(code), ")");
}

}  // namespace compass
