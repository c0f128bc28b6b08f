// Host-side contract between the FP8 grouped GEMM entry points (grouped_gemm_fp8.cu) and the
// compiled CUTLASS sm_90a instances (sm90/grouped_gemm_fp8_*.cu). No CUTLASS in here, as in
// grouped_gemm.h: only the instance files pay for the CUTLASS templates.
//
// The product, for each group e with rows [offsets[e], offsets[e + 1]):
//   y[rows] = (sx ⊙ x_q[rows]) @ (sw[e] ⊙ w_q[e])^T,   fp32 accumulation, bf16 out,
// x_q [M, K] and w_q [E, N, K] float8_e4m3fn, both K-major (w in the nn.Linear layout), so both
// wgmma operands are K-major, the only majorness FP8 wgmma reads from shared memory.
//
// Scale layouts (fp32, contiguous, row-major; 4-byte aligned):
//   kRowRow        x_scale [M]                      (one per row of x, "row")
//                  w_scale [E, N]                   (one per output channel, "row")
//                  applied in the epilogue: y[m, n] = bf16(sw[e, n] * (sx[m] * acc[m, n])).
//   kBlockBlock2d  x_scale [M, ceil(K / 128)]       (1 x 128 blocks, "block": row m, k-block kb
//                                                    at x_scale[m * ceil(K/128) + kb], i.e.
//                                                    K-major: exactly quantize_fp8's layout,
//                                                    no transpose)
//                  w_scale [E, ceil(N / 128), ceil(K / 128)]  (128 x 128 blocks, "block2d":
//                                                    w_scale[(e * NB + nb) * KB + kb])
//                  applied per 128-wide k-block to the fp32 accumulator inside the mainloop
//                  (CUTLASS's blockwise-scaled ptr-array GEMM, DeepSeek-V3 style), block size
//                  fixed at 128.
// (Unlike DeepGEMM and CUTLASS's own example 68, which want M-major activation scales, these
// instances are built with K-major scale layouts for both operands, so the Python layer passes
// q.scale as quantize_fp8 produces it.)
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/grouped_gemm.h"  // GemmLaunch

namespace compass {
namespace cuda {

// Granularity codes shared with compass_kernels (Fp8Tensor.granularity). Keep in sync.
enum class Fp8Granularity : int { kTensor = 0, kRow = 1, kBlock = 2, kBlock2d = 3 };

// The (x granularity, w granularity) pairs that have a compiled kernel (a separate CUTLASS
// instance each: the scaling lives in the mainloop for blocks and in the epilogue for rows).
enum class Fp8Scaling : int {
  kRowRow = 0,        // x "row", w "row"
  kBlockBlock2d = 1,  // x "block", w "block2d", block size 128
};

constexpr int64_t kFp8ScaleBlock = 128;  // the only block size the blockwise instance serves
constexpr int64_t kFp8TmaAlignElems = 16;  // K and N multiples of 16: 16-byte TMA rows of 1-byte x/w

// One launch. All pointers are device pointers; `offsets` [E + 1] int64 stays on the device.
struct GroupedGemmFp8Call : GemmLaunch {
  const void* x = nullptr;        // [M, K] e4m3
  const float* x_scale = nullptr;  // see the layouts above
  const void* w = nullptr;        // [E, N, K] e4m3
  const float* w_scale = nullptr;
  const int64_t* offsets = nullptr;
  void* y = nullptr;  // [M, N] out dtype
};

struct GroupedGemmFp8Instance {
  const char* name;
  Fp8Scaling scaling;
  int out_dtype;  // DType code of y
  size_t (*workspace_bytes)(int64_t E, int sm_count);
  void (*run)(const GroupedGemmFp8Call& call);
};

// Defined in sm90/grouped_gemm_fp8_<scaling>_<out>.cu (one CUTLASS instance each); referenced
// only when the build defines COMPASS_HAVE_SM90_GROUPED_GEMM.
extern const GroupedGemmFp8Instance kSm90Fp8RowBf16;
extern const GroupedGemmFp8Instance kSm90Fp8BlockBf16;

// Entry points of compass_kernels._cuda besides the kernels of common/kernels.def (grouped_gemm_fp8.cu).
bool grouped_gemm_fp8_supported(int x_gran, int w_gran, int64_t K, int64_t N, int out_dtype);
int64_t grouped_gemm_fp8_workspace_bytes(int64_t M, int64_t K, int64_t N, int64_t E, int x_gran, int w_gran,
                                         int out_dtype);

}  // namespace cuda
}  // namespace compass
