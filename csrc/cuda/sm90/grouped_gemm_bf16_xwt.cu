// CUTLASS sm_90a grouped GEMM instance: bfloat16, y = x @ w[e]^T, w [E, N, K] (nn.Linear layout).
// One instance per file so that ninja compiles them in parallel; see grouped_gemm_sm90.cuh.
#include "cuda/sm90/grouped_gemm_sm90.cuh"

namespace compass {
namespace cuda {
COMPASS_SM90_GROUPED_GEMM_INSTANCE(kSm90Bf16XWt, "sm90_bf16_xwt_coop128x128x64", cutlass::bfloat16_t, GemmOp::kXWt);
}  // namespace cuda
}  // namespace compass
