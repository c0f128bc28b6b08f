// Host-side contract between the grouped GEMM entry points (grouped_gemm.cu) and the compiled
// CUTLASS sm_90a instances (sm90/grouped_gemm_*.cu). No CUTLASS in here: grouped_gemm.cu and
// module.cu stay cheap to compile, and only the instance files pay for the CUTLASS templates.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace compass {
namespace cuda {

// The three operand layouts the MoE expert GEMMs need (each is a separate CUTLASS instance:
// wgmma's operand majorness is a compile-time property).
enum class GemmOp : int {
  kXW = 0,     // y[rows_e] = x[rows_e] @ w[e],    x [M, K], w [E, K, N]  (B N-major)
  kXWt = 1,    // y[rows_e] = x[rows_e] @ w[e]^T,  x [M, K], w [E, N, K]  (B K-major)
  kWgrad = 2,  // d[e] = a_e^T @ b_e,  a [M, K], b [M, N], d [E, K, N]  (A M-major, B N-major)
};

// What every grouped GEMM launch (bf16/fp16 here, FP8 in grouped_gemm_fp8.h) carries besides its
// operands: the problem sizes, the caller's device scratch, the device and the stream.
struct GemmLaunch {
  int64_t M = 0, K = 0, N = 0, E = 0;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int device = 0;
  int sm_count = 0;  // the persistent grid and the per-SM TMA descriptor slots
  cudaStream_t stream = nullptr;
};

// One launch. All pointers are device pointers; `offsets` [E + 1] int64 stays on the device.
// Forward (kXW, kXWt): a = x [M, K], b = w, d = y [M, N].
// Wgrad: a [M, K] and b [M, N] are the two row-grouped operands, d = dw [E, K, N]; the caller
// maps (x, dy) or (dy, x) onto (a, b) so that both wgrad layouts are this one.
struct GroupedGemmCall : GemmLaunch {
  const void* a = nullptr;
  const void* b = nullptr;
  const int64_t* offsets = nullptr;
  void* d = nullptr;
};

// A compiled instance: its name (for error messages and backend_info), the device scratch it
// needs for E groups on a device with sm_count SMs, and its launcher.
struct GroupedGemmInstance {
  const char* name;
  GemmOp op;
  size_t (*workspace_bytes)(int64_t E, int sm_count);
  void (*run)(const GroupedGemmCall& call);
};

// Defined in sm90/grouped_gemm_<dtype>_<op>[_wide].cu, one CUTLASS instance per file; referenced only
// when the build defines COMPASS_HAVE_SM90_GROUPED_GEMM (CMake: CUTLASS found and 90a targeted).
extern const GroupedGemmInstance kSm90Bf16XW;
extern const GroupedGemmInstance kSm90Bf16XWt;
extern const GroupedGemmInstance kSm90Bf16Wgrad;
extern const GroupedGemmInstance kSm90F16XW;
extern const GroupedGemmInstance kSm90F16XWt;
extern const GroupedGemmInstance kSm90F16Wgrad;
// The forward layouts' 128x256 tile (common/gemm_tiles.h chooses between the two).
extern const GroupedGemmInstance kSm90Bf16XWWide;
extern const GroupedGemmInstance kSm90Bf16XWtWide;
extern const GroupedGemmInstance kSm90F16XWWide;
extern const GroupedGemmInstance kSm90F16XWtWide;

// Entry points of compass_kernels._cuda besides the kernels of common/kernels.def (grouped_gemm.cu).
bool grouped_gemm_supported(int dtype, bool trans_b, int64_t K, int64_t N);
int64_t grouped_gemm_workspace_bytes(int64_t M, int64_t K, int64_t N, int64_t E, int dtype, bool trans_b);
int64_t grouped_gemm_wgrad_workspace_bytes(int64_t M, int64_t K, int64_t N, int64_t E, int dtype, bool trans_b);

}  // namespace cuda
}  // namespace compass
