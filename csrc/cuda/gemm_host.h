// Host-side helpers shared by the grouped GEMM entry points (bf16/fp16 and FP8): the current
// device's SM count and the size checks. No CUTLASS here.
#pragma once
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include <cuda_runtime.h>

#include "common/check.h"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm.h"

namespace compass {
namespace cuda {

struct Device {
  int id;
  int sm_count;
};

// The current device and its SM count, queried once per device: host-side calls, not stream
// operations, so fine under graph capture. The persistent grid and the per-SM TMA descriptor slots
// of the workspace are sized by it.
inline Device current_device(const char* what) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> sm_counts[kMaxDevices] = {};
  Device d{};
  cudaError_t err = cudaGetDevice(&d.id);
  if (err == cudaSuccess) {
    d.sm_count = d.id >= 0 && d.id < kMaxDevices ? sm_counts[d.id].load(std::memory_order_relaxed) : 0;
    if (d.sm_count <= 0) {
      err = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, d.id);
      if (err == cudaSuccess && d.id >= 0 && d.id < kMaxDevices)
        sm_counts[d.id].store(d.sm_count, std::memory_order_relaxed);
    }
  }
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("compass._cuda.") + what + ": " + cudaGetErrorString(err));
  return d;
}

inline void check_gemm_sizes(int64_t M, int64_t K, int64_t N, int64_t E, const char* what) {
  check_arg(M >= 0 && K >= 0 && N >= 0 && E >= 0, what,
            "sizes must be >= 0, got M=" + std::to_string(M) + " K=" + std::to_string(K) +
                " N=" + std::to_string(N) + " E=" + std::to_string(E));
  check_arg(M <= INT32_MAX && E <= INT32_MAX, what, "M and E must be < 2^31 (CUTLASS shapes are int32)");
}

// The checks every grouped GEMM entry point starts with: the sizes, and x's dtype shared by the
// operands in `others`. Returns x's dtype code.
template <class Args>
int check_gemm_args(const Args& a, const char* what, std::initializer_list<std::pair<const char*, int64_t>> others) {
  check_gemm_sizes(a.M, a.K, a.N, a.E, what);
  check_same_dtype("x", a.x.dtype, others);
  return static_cast<int>(a.x.dtype);
}

// Why K and N cannot be a CUTLASS grouped GEMM's (TMA rows of `align` elements, int32 shapes), or "".
inline std::string tma_shape_reason(int64_t K, int64_t N, int64_t align, const char* why) {
  if (K % align != 0 || N % align != 0)
    return "K = " + std::to_string(K) + " and N = " + std::to_string(N) + " must be multiples of " +
           std::to_string(align) + " (" + why + ")";
  if (K > INT32_MAX || N > INT32_MAX) return "K and N must be < 2^31";
  return "";
}

// The launch fields of a grouped GEMM call (cuda/grouped_gemm.h) on the current device.
inline GemmLaunch gemm_launch(int64_t M, int64_t K, int64_t N, int64_t E, void* workspace, int64_t workspace_bytes,
                              cudaStream_t stream, const char* what) {
  check_arg(workspace_bytes >= 0, what, "workspace_bytes must be >= 0");
  const Device dev = current_device(what);
  GemmLaunch l;
  l.M = M;
  l.K = K;
  l.N = N;
  l.E = E;
  l.workspace = workspace;
  l.workspace_bytes = static_cast<size_t>(workspace_bytes);
  l.device = dev.id;
  l.sm_count = dev.sm_count;
  l.stream = stream;
  return l;
}

}  // namespace cuda
}  // namespace compass
