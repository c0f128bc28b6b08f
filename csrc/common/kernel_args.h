// The typed kernel boundary, C++ side. Every entry point of _cpu and _cuda is declared once, in
// common/kernels.def, as a list of typed arguments; this header turns that table into one args
// struct per entry point (`route_args`, ...) and the entry point's declaration
// `void route(const route_args& a)` in compass::cpu (C++ build) or compass::cuda (nvcc build).
// common/kernel_bindings.h turns the same table into the pybind11 bindings and the signature table
// that compass_kernels/_boundary.py builds its keyword-argument callers from. See docs/design.md,
// "The kernel boundary".
//
// Argument kinds (what Python passes -> the field the implementation reads):
//   COMPASS_ROWS(x)          tensor with unit stride along its last dim -> Rows{data, stride, dtype}:
//                            stride is the row stride in elements (stride(-2); the row length when
//                            there are fewer than two rows), dtype a code of common/dtype.h
//   COMPASS_TENSOR(x)        contiguous tensor -> Tensor{data, dtype}
//   COMPASS_BUFFER(x, type)  contiguous tensor of one dtype (int64, int32, float32, uint8, boolean
//                            (torch.bool) or any) -> a typed pointer (Python checks the dtype with
//                            COMPASS_CHECK=1)
//   COMPASS_INT(x) -> int64_t, COMPASS_FLOAT(x) -> double, COMPASS_BOOL(x) -> bool
//   COMPASS_STREAM(x)        the current CUDA stream of the first tensor argument's device (Python
//                            fills it in) -> cudaStream_t
// A TENSOR argument may be None: its data pointer is then null (dtype -1); ROWS and BUFFER may not.
// COMPASS_ON_CUDA(fields) holds fields only the CUDA module's entry point takes (its stream).
#pragma once
#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

namespace compass {

struct Rows {
  void* data;
  int64_t stride;  // elements between rows
  int64_t dtype;   // DType code (common/dtype.h), -1 for None
  template <class T>
  T* as() const { return static_cast<T*>(data); }
};

struct Tensor {
  void* data;
  int64_t dtype;
  template <class T>
  T* as() const { return static_cast<T*>(data); }
};

// Element types of COMPASS_BUFFER(x, type).
namespace buffer {
using int64 = int64_t;
using int32 = int32_t;
using float32 = float;
using uint8 = uint8_t;
using boolean = uint8_t;  // torch.bool: one byte, 0 or 1
using any = void;
}  // namespace buffer

#ifdef __CUDACC__
using StreamHandle = cudaStream_t;
#else
using StreamHandle = void*;
#endif

// Python packs each field at the offset the module reports (kernel_bindings.h), so these sizes are
// part of the contract.
static_assert(sizeof(Rows) == 24 && sizeof(Tensor) == 16 && sizeof(void*) == 8, "64-bit fields");

}  // namespace compass

#ifdef __CUDACC__
#define COMPASS_NS cuda
#define COMPASS_ON_CUDA(...) __VA_ARGS__
#define COMPASS_ON_CPU(...)
#else
#define COMPASS_NS cpu
#define COMPASS_ON_CUDA(...)
#define COMPASS_ON_CPU(...) __VA_ARGS__
#endif

namespace compass::COMPASS_NS {
#define COMPASS_KERNEL_DECL(name) void name(const name##_args& a);
#include "common/kernel_structs.inc"
#undef COMPASS_KERNEL_DECL
}  // namespace compass::COMPASS_NS
