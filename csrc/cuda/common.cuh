// Shared device helpers for the _cuda kernels: error checks, element conversions, reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace compass {
namespace cuda {

// ---- host-side checks ------------------------------------------------------------------------

// Throws with the CUDA error string; used after every launch (cudaGetLastError catches bad
// launch configurations synchronously, no device sync needed).
inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("compass._cuda.") + what + ": " + cudaGetErrorString(err));
  }
}

inline void check_arg(bool ok, const char* what, const std::string& msg) {
  if (!ok) throw std::invalid_argument(std::string("compass._cuda.") + what + ": " + msg);
}

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// ---- element conversions (all round-to-nearest-even, as torch's .to()) -----------------------

// Accumulator type: fp32 for every floating dtype except fp64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename A> __device__ __forceinline__ A to_acc(float x) { return x; }
template <typename A> __device__ __forceinline__ A to_acc(double x) { return static_cast<A>(x); }
template <typename A> __device__ __forceinline__ A to_acc(__half x) { return static_cast<A>(to_float(x)); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 x) {
  return static_cast<A>(to_float(x));
}

// Exact arithmetic helpers: explicit _rn intrinsics so that nvcc never contracts a*b+c into an
// FMA (the torch reference rounds the product and the sum separately).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Router probabilities come in any float dtype, read k times per token: a runtime switch on
// the (block-uniform) dtype code costs nothing there and saves 4x kernel instantiations.
template <typename A>
__device__ __forceinline__ A load_prob(const void* p, int dtype, int64_t i) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat64: return static_cast<A>(static_cast<const double*>(p)[i]);
    case DType::kFloat16: return to_acc<A>(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return to_acc<A>(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<A>(static_cast<const float*>(p)[i]);
  }
}

template <typename A>
__device__ __forceinline__ void store_prob(void* p, int dtype, int64_t i, A v) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    // Direct double->half/bf16 conversions: going through float would round twice.
    case DType::kFloat16: static_cast<__half*>(p)[i] = __double2half(static_cast<double>(v)); break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __double2bfloat16(static_cast<double>(v));
      break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v); break;
  }
}

// ---- raw vector loads -------------------------------------------------------------------------

// N elements of T moved as one 16-byte (or narrower) transaction, unpacked with memcpy (which
// nvcc lowers to register moves) rather than type punning.
template <typename T, int N>
struct Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  Pack<T, N> out;
  if constexpr (sizeof(T) * N == 16) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&out, &raw, 16);
  } else {
    static_assert(N == 1, "only 16-byte packs or single elements");
    out.v[0] = p[0];
  }
  return out;
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& in) {
  if constexpr (sizeof(T) * N == 16) {
    uint4 raw;
    memcpy(&raw, &in, 16);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
    static_assert(N == 1, "only 16-byte packs or single elements");
    p[0] = in.v[0];
  }
}

// ---- reductions -------------------------------------------------------------------------------

// Butterfly-free tree sum to lane 0 with a fixed shape: deterministic for a fixed blockDim.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace cuda
}  // namespace compass
