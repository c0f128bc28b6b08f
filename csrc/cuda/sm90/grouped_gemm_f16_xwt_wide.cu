// CUTLASS sm_90a grouped GEMM instance: float16, y = x @ w[e]^T, w [E, N, K], the 128x256 tile.
// One instance per file so that ninja compiles them in parallel; see grouped_gemm_sm90.cuh.
#include "cuda/sm90/grouped_gemm_sm90.cuh"

namespace compass {
namespace cuda {
COMPASS_SM90_GROUPED_GEMM_INSTANCE_TILE(kSm90F16XWtWide, "sm90_f16_xwt_coop128x256x64", cutlass::half_t, GemmOp::kXWt,
                                        sm90::WideCooperativeTile);
}  // namespace cuda
}  // namespace compass
