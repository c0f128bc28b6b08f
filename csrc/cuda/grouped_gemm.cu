// Grouped GEMM entry points of compass_kernels._cuda: argument checks, the choice of compiled
// instance, and the device's SM count. The kernels are the CUTLASS sm_90a instances in sm90/
// (built only when CUTLASS is found and 90a is targeted: COMPASS_HAVE_SM90_GROUPED_GEMM); the
// Python layer asks grouped_gemm_supported() first and otherwise uses the Triton backend.
//
// Contract (all pointers are device pointers; no host read of device data, no allocation, no
// sync, so the ops are CUDA-graph capturable; scratch is the caller's `workspace`):
//   grouped_gemm: y [M, N] rows offsets[e]:offsets[e+1] = x[rows] @ w[e] (w [E, K, N]) or
//     @ w[e]^T (trans_b, w [E, N, K]); fp32 accumulation; rows outside [offsets[0], offsets[E])
//     are zero; K = 0 -> y = 0.
//   grouped_gemm_wgrad: dw[e] = x_e^T @ dy_e ([E, K, N]) or dy_e^T @ x_e (trans_b, [E, N, K]);
//     empty groups -> exact zeros.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/gemm_tiles.h"
#include "common/check.h"
#include "common/kernel_args.h"
#include "cuda/common.cuh"
#include "cuda/grouped_gemm.h"
#include "cuda/gemm_host.h"

namespace compass {
namespace cuda {
namespace {

// The compiled instance for (dtype, op) and, for the forward layouts, the tile: index `tile` of
// kForwardTiles (common/gemm_tiles.h; 0 = 128x128, 1 = 128x256). Wgrad has one tile (pingpong
// 128x128, see sm90/grouped_gemm_sm90.cuh).
const GroupedGemmInstance* find_instance(int dtype, GemmOp op, int tile = 0) {
#if defined(COMPASS_HAVE_SM90_GROUPED_GEMM)
  const bool fwd_t = op == GemmOp::kXWt, wide = tile == 1;
  switch (static_cast<DType>(dtype)) {
    case DType::kBFloat16:
      if (op == GemmOp::kWgrad) return &kSm90Bf16Wgrad;
      return fwd_t ? (wide ? &kSm90Bf16XWtWide : &kSm90Bf16XWt) : (wide ? &kSm90Bf16XWWide : &kSm90Bf16XW);
    case DType::kFloat16:
      if (op == GemmOp::kWgrad) return &kSm90F16Wgrad;
      return fwd_t ? (wide ? &kSm90F16XWtWide : &kSm90F16XWt) : (wide ? &kSm90F16XWWide : &kSm90F16XW);
    default: break;
  }
#else
  (void)dtype;
  (void)op;
  (void)tile;
#endif
  return nullptr;
}

// The forward tile for this shape on this device (COMPASS_GEMM_TILE may force one).
int forward_tile(int64_t M, int64_t N, int64_t E, int sm_count, const char* what) {
  const int tile = choose_forward_tile(M, N, E, sm_count);
  check_arg(tile >= 0, what, std::string("COMPASS_GEMM_TILE must be 128x128 or 128x256, got ") +
                                 std::getenv("COMPASS_GEMM_TILE"));
  return tile;
}

// Why (dtype, K, N) cannot be served, or "" if it can.
std::string unsupported_reason(int dtype, int64_t K, int64_t N) {
#if !defined(COMPASS_HAVE_SM90_GROUPED_GEMM)
  (void)dtype;
  (void)K;
  (void)N;
  return "this _cuda build has no sm_90a CUTLASS grouped GEMM (needs CUTLASS headers and 90a in "
         "COMPASS_CUDA_ARCHS)";
#else
  if (find_instance(dtype, GemmOp::kXW) == nullptr)
    return std::string("dtype ") + dtype_name(dtype) + " has no CUTLASS instance (bfloat16 and float16 only)";
  if (K < 0 || N < 0) return "K and N must be >= 0";
  return tma_shape_reason(K, N, 8, "TMA needs 16-byte rows");  // 16-bit elements
#endif
}

const GroupedGemmInstance& instance_or_throw(int dtype, GemmOp op, int64_t K, int64_t N, const char* what,
                                             int tile = 0) {
  const std::string why = unsupported_reason(dtype, K, N);
  check_arg(why.empty(), what, why);
  return *find_instance(dtype, op, tile);
}

GemmOp fwd_op(bool trans_b) { return trans_b ? GemmOp::kXWt : GemmOp::kXW; }

}  // namespace

bool grouped_gemm_supported(int dtype, bool trans_b, int64_t K, int64_t N) {
  (void)trans_b;  // every layout is compiled for each supported dtype
  return unsupported_reason(dtype, K, N).empty();
}

int64_t grouped_gemm_workspace_bytes(int64_t M, int64_t K, int64_t N, int64_t E, int dtype, bool trans_b) {
  const char* what = "grouped_gemm_workspace_bytes";
  check_gemm_sizes(M, K, N, E, what);
  const int sm_count = current_device(what).sm_count;
  const GroupedGemmInstance& inst =
      instance_or_throw(dtype, fwd_op(trans_b), K, N, what, forward_tile(M, N, E, sm_count, what));
  return static_cast<int64_t>(inst.workspace_bytes(E, sm_count));
}

int64_t grouped_gemm_wgrad_workspace_bytes(int64_t M, int64_t K, int64_t N, int64_t E, int dtype, bool trans_b) {
  const char* what = "grouped_gemm_wgrad_workspace_bytes";
  (void)trans_b;  // the workspace holds E groups' arguments whichever operand comes first
  check_gemm_sizes(M, K, N, E, what);
  const GroupedGemmInstance& inst = instance_or_throw(dtype, GemmOp::kWgrad, K, N, what);  // both layouts
  return static_cast<int64_t>(inst.workspace_bytes(E, current_device(what).sm_count));
}

void grouped_gemm(const grouped_gemm_args& a) {
  const char* what = "grouped_gemm";
  const int64_t M = a.M, K = a.K, N = a.N, E = a.E;
  const int dtype = check_gemm_args(a, what, {{"w", a.w.dtype}, {"y", a.y.dtype}});
  const int sm_count = current_device(what).sm_count;
  const GroupedGemmInstance& inst =
      instance_or_throw(dtype, fwd_op(a.trans_b), K, N, what, forward_tile(M, N, E, sm_count, what));
  if (M == 0 || N == 0) return;  // y is empty
  check_arg(a.y.data != nullptr && a.offsets != nullptr, what, "y and offsets must not be null");
  check_arg(K == 0 || (a.x.data != nullptr && (E == 0 || a.w.data != nullptr)), what, "x and w must not be null");
  GroupedGemmCall call;
  static_cast<GemmLaunch&>(call) = gemm_launch(M, K, N, E, a.workspace, a.workspace_bytes, a.stream, what);
  call.a = a.x.data;
  call.b = a.w.data;
  call.offsets = a.offsets;
  call.d = a.y.data;
  inst.run(call);
}

void grouped_gemm_wgrad(const grouped_gemm_wgrad_args& a) {
  const char* what = "grouped_gemm_wgrad";
  const int dtype = check_gemm_args(a, what, {{"dy", a.dy.dtype}, {"dw", a.dw.dtype}});
  const GroupedGemmInstance& inst = instance_or_throw(dtype, GemmOp::kWgrad, a.K, a.N, what);  // both layouts
  const int64_t M = a.M, K = a.K, N = a.N, E = a.E;
  if (E == 0 || K == 0 || N == 0) return;  // dw is empty
  check_arg(a.dw.data != nullptr && a.offsets != nullptr, what, "dw and offsets must not be null");
  check_arg(M == 0 || (a.x.data != nullptr && a.dy.data != nullptr), what, "x and dy must not be null");
  // dw[e] = a_e^T @ b_e with (a, b) = (x, dy) -> [K, N], or (dy, x) -> [N, K] for trans_b.
  GroupedGemmCall call;
  static_cast<GemmLaunch&>(call) = gemm_launch(M, a.trans_b ? N : K, a.trans_b ? K : N, E, a.workspace,
                                               a.workspace_bytes, a.stream, what);
  call.a = a.trans_b ? a.dy.data : a.x.data;
  call.b = a.trans_b ? a.x.data : a.dy.data;
  call.offsets = a.offsets;
  call.d = a.dw.data;
  inst.run(call);
}

}  // namespace cuda
}  // namespace compass
