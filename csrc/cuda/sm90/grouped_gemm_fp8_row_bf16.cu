// CUTLASS sm_90a FP8 grouped GEMM instance: e4m3 x e4m3 -> bfloat16, per-row x scales and
// per-output-channel w scales applied in the epilogue. See grouped_gemm_fp8_sm90.cuh.
#include "cuda/sm90/grouped_gemm_fp8_sm90.cuh"

namespace compass {
namespace cuda {
COMPASS_SM90_GROUPED_GEMM_FP8_INSTANCE(kSm90Fp8RowBf16, "sm90_fp8_row_bf16_coop128x128x128_c1x2", cutlass::bfloat16_t,
                                       DType::kBFloat16, Fp8Scaling::kRowRow);
}  // namespace cuda
}  // namespace compass
