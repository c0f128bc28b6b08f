// FP8 grouped GEMM entry points of compass_kernels._cuda: argument checks, the choice of
// compiled instance (by scale granularities and output dtype), and the device's SM count. The
// kernels are the CUTLASS sm_90a instances in sm90/grouped_gemm_fp8_*.cu (built only with
// COMPASS_HAVE_SM90_GROUPED_GEMM); the Python layer asks grouped_gemm_fp8_supported() first and
// otherwise uses another backend.
//
// Contract (all pointers are device pointers; no host read of device data, no allocation, no
// sync, so the op is CUDA-graph capturable; scratch is the caller's `workspace`):
//   y [M, N] rows offsets[e]:offsets[e+1] = (sx ⊙ x_q[rows]) @ (sw[e] ⊙ w_q[e])^T, x_q [M, K] and
//   w_q [E, N, K] float8_e4m3fn, fp32 accumulation, bf16 out; rows outside
//   [offsets[0], offsets[E]) are zero; K = 0 -> y = 0. Scale layouts: cuda/grouped_gemm_fp8.h.
#include <cstdint>
#include <string>

#include "common/check.h"
#include "common/kernel_args.h"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm_fp8.h"
#include "cuda/gemm_host.h"

namespace compass {
namespace cuda {
namespace {

const char* granularity_name(int g) {
  switch (static_cast<Fp8Granularity>(g)) {
    case Fp8Granularity::kTensor: return "tensor";
    case Fp8Granularity::kRow: return "row";
    case Fp8Granularity::kBlock: return "block";
    case Fp8Granularity::kBlock2d: return "block2d";
  }
  return "unknown";
}

// The compiled instance for (x granularity, w granularity, out dtype), or nullptr.
// Two instances only (each ~40 s of nvcc CPU time in the CI's compile check): bf16 out. An fp16 out would be
// two more instances, and per-tensor scales are served by the row instance once the caller
// expands them to per-row vectors (M + E*N floats).
const GroupedGemmFp8Instance* find_instance(int x_gran, int w_gran, int out_dtype) {
#if defined(COMPASS_HAVE_SM90_GROUPED_GEMM)
  if (static_cast<DType>(out_dtype) != DType::kBFloat16) return nullptr;
  const auto xg = static_cast<Fp8Granularity>(x_gran);
  const auto wg = static_cast<Fp8Granularity>(w_gran);
  if (xg == Fp8Granularity::kRow && wg == Fp8Granularity::kRow) return &kSm90Fp8RowBf16;
  if (xg == Fp8Granularity::kBlock && wg == Fp8Granularity::kBlock2d) return &kSm90Fp8BlockBf16;
#else
  (void)x_gran;
  (void)w_gran;
  (void)out_dtype;
#endif
  return nullptr;
}

// Why (x_gran, w_gran, K, N, out_dtype) cannot be served, or "" if it can.
std::string unsupported_reason(int x_gran, int w_gran, int64_t K, int64_t N, int out_dtype) {
#if !defined(COMPASS_HAVE_SM90_GROUPED_GEMM)
  (void)x_gran;
  (void)w_gran;
  (void)K;
  (void)N;
  (void)out_dtype;
  return "this _cuda build has no sm_90a CUTLASS grouped GEMM (needs CUTLASS headers and 90a in "
         "COMPASS_CUDA_ARCHS)";
#else
  if (find_instance(x_gran, w_gran, static_cast<int>(DType::kBFloat16)) == nullptr)
    return std::string("granularities (x=") + granularity_name(x_gran) + ", w=" + granularity_name(w_gran) +
           ") have no CUTLASS instance (x=row with w=row, or x=block with w=block2d, block size 128)";
  if (find_instance(x_gran, w_gran, out_dtype) == nullptr)
    return std::string("out dtype ") + dtype_name(out_dtype) + " has no CUTLASS instance (bfloat16 only)";
  if (K < 0 || N < 0) return "K and N must be >= 0";
  return tma_shape_reason(K, N, kFp8TmaAlignElems, "TMA needs 16-byte rows of float8 elements");
#endif
}

const GroupedGemmFp8Instance& instance_or_throw(int x_gran, int w_gran, int64_t K, int64_t N, int out_dtype,
                                                const char* what) {
  const std::string why = unsupported_reason(x_gran, w_gran, K, N, out_dtype);
  check_arg(why.empty(), what, why);
  return *find_instance(x_gran, w_gran, out_dtype);
}

}  // namespace

bool grouped_gemm_fp8_supported(int x_gran, int w_gran, int64_t K, int64_t N, int out_dtype) {
  return unsupported_reason(x_gran, w_gran, K, N, out_dtype).empty();
}

int64_t grouped_gemm_fp8_workspace_bytes(int64_t M, int64_t K, int64_t N, int64_t E, int x_gran, int w_gran,
                                         int out_dtype) {
  const char* what = "grouped_gemm_fp8_workspace_bytes";
  check_gemm_sizes(M, K, N, E, what);
  const GroupedGemmFp8Instance& inst = instance_or_throw(x_gran, w_gran, K, N, out_dtype, what);
  // Independent of M: the scales are read in place (no transposed copy in the workspace).
  return static_cast<int64_t>(inst.workspace_bytes(E, current_device(what).sm_count));
}

void grouped_gemm_fp8(const grouped_gemm_fp8_args& a) {
  const char* what = "grouped_gemm_fp8";
  const int64_t M = a.M, K = a.K, N = a.N, E = a.E;
  check_gemm_args(a, what, {{"w", a.w.dtype}});
  const GroupedGemmFp8Instance& inst =
      instance_or_throw(int(a.x_gran), int(a.w_gran), K, N, int(a.y.dtype), what);
  if (M == 0 || N == 0) return;  // y is empty
  check_arg(a.y.data != nullptr && a.offsets != nullptr, what, "y and offsets must not be null");
  check_arg(K == 0 || (a.x.data != nullptr && a.x_scale != nullptr &&
                       (E == 0 || (a.w.data != nullptr && a.w_scale != nullptr))),
            what, "x, x_scale, w and w_scale must not be null");
  GroupedGemmFp8Call call;
  static_cast<GemmLaunch&>(call) = gemm_launch(M, K, N, E, a.workspace, a.workspace_bytes, a.stream, what);
  call.x = a.x.data;
  call.x_scale = a.x_scale;
  call.w = a.w.data;
  call.w_scale = a.w_scale;
  call.offsets = a.offsets;
  call.y = a.y.data;
  inst.run(call);
}

}  // namespace cuda
}  // namespace compass
