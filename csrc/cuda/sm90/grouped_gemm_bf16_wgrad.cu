// CUTLASS sm_90a grouped GEMM instance: bfloat16, dw[e] = a_e^T @ b_e (K-grouped weight gradient).
// One instance per file so that ninja compiles them in parallel; see grouped_gemm_sm90.cuh.
#include "cuda/sm90/grouped_gemm_sm90.cuh"

namespace compass {
namespace cuda {
COMPASS_SM90_GROUPED_GEMM_INSTANCE(kSm90Bf16Wgrad, "sm90_bf16_wgrad_pingpong128x128x64", cutlass::bfloat16_t, GemmOp::kWgrad);
}  // namespace cuda
}  // namespace compass
