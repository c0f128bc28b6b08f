// CUTLASS sm_90a grouped GEMM instance: bfloat16, y = x @ w[e], w [E, K, N], the 128x256 tile.
// One instance per file so that ninja compiles them in parallel; see grouped_gemm_sm90.cuh.
#include "cuda/sm90/grouped_gemm_sm90.cuh"

namespace compass {
namespace cuda {
COMPASS_SM90_GROUPED_GEMM_INSTANCE_TILE(kSm90Bf16XWWide, "sm90_bf16_xw_coop128x256x64", cutlass::bfloat16_t, GemmOp::kXW,
                                        sm90::WideCooperativeTile);
}  // namespace cuda
}  // namespace compass
