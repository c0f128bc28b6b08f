// CUTLASS 3.x grouped GEMM for sm_90a (TMA + warp-specialised wgmma, persistent group scheduler),
// driven entirely from the device: a small prep kernel reads `offsets` and writes each group's
// problem shape, A/B/D pointers and strides into the caller's workspace; CUTLASS gets only the
// device arrays (host problem shapes = nullptr), so the host never learns the group sizes and the
// launch is CUDA-graph capturable (no sync, no allocation, no memset: see run() below).
//
// Included by the instance files sm90/grouped_gemm_<dtype>_<op>.cu, one CUTLASS instance each
// (about 90 s of nvcc per instance on 2 cores: one file each lets ninja build them in parallel).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/common.cuh"
#include "cuda/grouped_gemm.h"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "the sm_90a grouped GEMM needs CUDA >= 12.3 (device-side TMA descriptor updates)"
#endif

namespace compass {
namespace cuda {
namespace sm90 {

// ---- tile configurations --------------------------------------------------------------------
// Forward layouts get two tiles, 128x128 and 128x256 (common/gemm_tiles.h picks one from the
// shape); wgrad one. 10 bf16/fp16 instances at ~26 s of nvcc CPU each (.ci/cuda_check.sh).
// Cluster 1x1: a 2-CTA cluster rounds every group's tile count up to a multiple of 2, which
// wastes a tile per group on the small, ragged groups of fine-grained MoE.

// Forward (y = x @ w[e]): groups are row blocks of x with K in the thousands; both consumer
// warpgroups share one 128x128 tile (64 rows each), the standard Hopper bf16 config.
struct CooperativeTile {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};

// The wide forward tile: each consumer warpgroup owns 64 x 256 accumulators (128 fp32 registers a
// thread), and each A tile loaded feeds 256 output columns instead of 128.
struct WideCooperativeTile {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
// Wgrad (dw[e] = x_e^T dy_e): the reduction runs over the group's rows, often only 1-4 k-tiles of
// 64 (E = 128 experts x ~128 rows), so the epilogue costs as much as the mainloop; pingpong
// overlaps one warpgroup's epilogue with the other's MMAs.
struct PingpongTile {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

// CUTLASS layout tags: A is [M, K], B is [K, N] ("RowMajor B" = N contiguous), D is [M, N].
template <GemmOp kOp> struct OpTraits;
template <> struct OpTraits<GemmOp::kXW> {  // A = x rows (K-major), B = w[e] [K, N] (N-major)
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::RowMajor;
  using Tile = CooperativeTile;
};
template <> struct OpTraits<GemmOp::kXWt> {  // A = x rows (K-major), B = w[e]^T, w[e] [N, K] (K-major)
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using Tile = CooperativeTile;
};
template <> struct OpTraits<GemmOp::kWgrad> {  // A = a_e^T (M-major), B = b_e (N-major)
  using LayoutA = cutlass::layout::ColumnMajor;
  using LayoutB = cutlass::layout::RowMajor;
  using Tile = PingpongTile;
};

template <class Element, GemmOp kOp, class TileT = typename OpTraits<kOp>::Tile>
struct KernelConfig {
  using Traits = OpTraits<kOp>;
  using Tile = TileT;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA rows
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K)

  // D = acc (fp32) rounded to Element; no C operand (void), so no epilogue load warp.
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Tile::TileShape,
      typename Tile::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlign, Element, LayoutD*, kAlign, typename Tile::EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, typename Traits::LayoutA*, kAlign,
      Element, typename Traits::LayoutB*, kAlign, float, typename Tile::TileShape,
      typename Tile::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      typename Tile::KernelSchedule>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using Shape = typename ProblemShape::UnderlyingProblemShape;
  using ElementA = typename GemmKernel::ElementA;
  using ElementB = typename GemmKernel::ElementB;
  using ElementD = typename GemmKernel::ElementD;
  using StrideA = typename GemmKernel::InternalStrideA;  // per-group strides: (M, K, L) modes
  using StrideB = typename GemmKernel::InternalStrideB;  // (N, K, L)
  using StrideD = typename GemmKernel::InternalStrideD;  // (M, N, L)

  // The prep kernel fills in the one dynamic stride of each; make sure the majorness it assumes
  // is the one the layout tags above produced.
  template <int kMode, class S>
  static constexpr bool unit_in = cute::is_constant<1, cute::remove_cvref_t<decltype(cute::get<kMode>(S{}))>>::value;
  static_assert(kOp == GemmOp::kWgrad ? unit_in<0, StrideA> : unit_in<1, StrideA>, "A majorness");
  static_assert(kOp == GemmOp::kXWt ? unit_in<1, StrideB> : unit_in<0, StrideB>, "B majorness");
  static_assert(unit_in<1, StrideD>, "D must be row-major");
  static_assert(sizeof(Element) == 2, "16-bit operands only (8 elements per 16-byte TMA row unit)");
};

// Per-group argument arrays, carved out of the caller's workspace.
template <class Cfg>
struct GroupArrays {
  typename Cfg::Shape* shapes;
  const typename Cfg::ElementA** ptr_a;
  const typename Cfg::ElementB** ptr_b;
  typename Cfg::ElementD** ptr_d;
  typename Cfg::StrideA* stride_a;
  typename Cfg::StrideB* stride_b;
  typename Cfg::StrideD* stride_d;
};

// Stride<int64_t, _1, _0> or Stride<_1, int64_t, _0>: sets the one dynamic (leading) stride.
template <class Stride>
__host__ __device__ __forceinline__ Stride leading_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<0>(s))>>) {
    cute::get<1>(s) = ld;
  } else {
    cute::get<0>(s) = ld;
  }
  return s;
}

// offsets[e] clamped to [0, M]: the identity for valid offsets, and no out-of-bounds pointer for
// invalid ones (they are validated in Python only with COMPASS_CHECK=1).
// (Plain comparisons: std::min/max bind their arguments to references, and nvcc then keeps an
// int64 zero in a stack slot.)
__host__ __device__ __forceinline__ int64_t clamped_offset(const int64_t* __restrict__ offsets, int64_t e, int64_t M) {
  const int64_t o = offsets[e];
  return o < 0 ? 0 : (o > M ? M : o);
}

constexpr int kPrepThreads = 256;
constexpr int kElemsPerUnit = 8;  // 16-bit elements per 16-byte store

// One launch before the GEMM:
//   thread e < E writes group e's problem shape, pointers and strides;
//   all threads zero, grid-stride, what the GEMM will not write:
//     forward: y rows outside [offsets[0], offsets[E]) (all rows when zero_all, i.e. K = 0);
//     wgrad:   d[e] of every empty group (the GEMM gets an empty problem for it).
// Row lengths (N; K * N for wgrad) are multiples of 8 elements (grouped_gemm_supported), so
// every zeroed range is whole 16-byte units.
// The per-thread body is __host__ __device__ so that a host test can run it over a simulated grid.
template <class Cfg, GemmOp kOp>
__host__ __device__ __forceinline__ void grouped_gemm_prep_thread(
    int64_t tid, int64_t nthreads, const typename Cfg::ElementA* a, const typename Cfg::ElementB* b,
    const int64_t* __restrict__ offsets, typename Cfg::ElementD* d, int64_t M, int64_t K, int64_t N, int E,
    bool zero_all, const GroupArrays<Cfg>& g) {
  for (int64_t t = tid; t < E; t += nthreads) {  // one iteration: the grid has >= E threads
    const int e = static_cast<int>(t);
    const int64_t lo = clamped_offset(offsets, e, M);
    const int64_t hi = clamped_offset(offsets, e + 1, M);
    const int64_t rows = hi > lo ? hi - lo : 0;
    if constexpr (kOp == GemmOp::kWgrad) {
      // d[e] [K, N] = a_e^T [K, rows] @ b_e [rows, N]: the GEMM (M, N, K) = (K, N, rows), A = a_e^T
      // (M-major, leading dimension K), B = b_e (N-major, leading dimension N). An empty group
      // gets an empty problem: it has no tiles, whereas (K, N, 0) would run the epilogue on an
      // accumulator that no MMA initialised (the mainloop skips k_tile_count = 0 entirely).
      g.shapes[e] = rows > 0 ? cute::make_shape(static_cast<int>(K), static_cast<int>(N), static_cast<int>(rows))
                             : cute::make_shape(0, 0, 0);
      g.ptr_a[e] = a + lo * K;
      g.ptr_b[e] = b + lo * N;
      g.ptr_d[e] = d + static_cast<int64_t>(e) * K * N;
      g.stride_a[e] = leading_stride<typename Cfg::StrideA>(K);
      g.stride_b[e] = leading_stride<typename Cfg::StrideB>(N);
    } else {
      // y[lo : lo + rows] = x[lo : lo + rows] @ B_e; a 0-row group has 0 tiles.
      g.shapes[e] = cute::make_shape(static_cast<int>(rows), static_cast<int>(N), static_cast<int>(K));
      g.ptr_a[e] = a + lo * K;
      g.ptr_b[e] = b + static_cast<int64_t>(e) * K * N;
      g.ptr_d[e] = d + lo * N;
      g.stride_a[e] = leading_stride<typename Cfg::StrideA>(K);
      g.stride_b[e] = leading_stride<typename Cfg::StrideB>(kOp == GemmOp::kXW ? N : K);
    }
    g.stride_d[e] = leading_stride<typename Cfg::StrideD>(N);
  }

  uint4* out = reinterpret_cast<uint4*>(d);
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  if constexpr (kOp == GemmOp::kWgrad) {
    const int64_t units = K * N / kElemsPerUnit;  // one d[e]
    for (int e = 0; e < E; ++e) {
      if (clamped_offset(offsets, e + 1, M) > clamped_offset(offsets, e, M)) continue;  // uniform
      uint4* dst = out + static_cast<int64_t>(e) * units;
      for (int64_t i = tid; i < units; i += nthreads) dst[i] = zero;
    }
  } else {
    const int64_t row_units = N / kElemsPerUnit;
    const int64_t first = zero_all ? M : clamped_offset(offsets, 0, M);
    const int64_t end = clamped_offset(offsets, E, M);
    const int64_t last = zero_all ? M : (end > first ? end : first);
    const int64_t head = first * row_units;       // rows [0, first)
    const int64_t tail = (M - last) * row_units;  // rows [last, M)
    for (int64_t i = tid; i < head + tail; i += nthreads) out[i < head ? i : last * row_units + (i - head)] = zero;
  }
}

template <class Cfg, GemmOp kOp>
__global__ void __launch_bounds__(kPrepThreads)
grouped_gemm_prep_kernel(const typename Cfg::ElementA* a, const typename Cfg::ElementB* b,
                         const int64_t* __restrict__ offsets, typename Cfg::ElementD* d, int64_t M,
                         int64_t K, int64_t N, int E, bool zero_all, GroupArrays<Cfg> g) {
  grouped_gemm_prep_thread<Cfg, kOp>(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                     static_cast<int64_t>(gridDim.x) * blockDim.x, a, b, offsets, d, M, K, N, E,
                                     zero_all, g);
}

// ---- host side ------------------------------------------------------------------------------

template <class Element, GemmOp kOp, class Tile = typename OpTraits<kOp>::Tile>
struct GroupedGemmSm90 {
  using Cfg = KernelConfig<Element, kOp, Tile>;
  using Gemm = typename Cfg::Gemm;
  static constexpr size_t kAlignBytes = 128;  // TMA descriptors in global memory need 64

  // Byte offsets of the workspace regions.
  struct Carve {
    size_t shapes, ptr_a, ptr_b, ptr_d, stride_a, stride_b, stride_d, cutlass, total;
  };

  static typename Gemm::Arguments base_arguments(int64_t E, int device, int sm_count) {
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape.num_groups = static_cast<int32_t>(E);
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    return args;
  }

  static Carve carve(int64_t E, int sm_count) {
    size_t off = 0;
    auto take = [&](size_t bytes) {
      const size_t at = off;
      off = ceil_div(off + bytes, kAlignBytes) * kAlignBytes;
      return at;
    };
    const size_t n = static_cast<size_t>(E);
    Carve c{};
    c.shapes = take(n * sizeof(typename Cfg::Shape));
    c.ptr_a = take(n * sizeof(void*));
    c.ptr_b = take(n * sizeof(void*));
    c.ptr_d = take(n * sizeof(void*));
    c.stride_a = take(n * sizeof(typename Cfg::StrideA));
    c.stride_b = take(n * sizeof(typename Cfg::StrideB));
    c.stride_d = take(n * sizeof(typename Cfg::StrideD));
    // Per-SM TMA descriptor slots (A, B, D per consumer warpgroup); independent of the shapes.
    c.cutlass = take(Gemm::get_workspace_size(base_arguments(E, 0, sm_count)));
    c.total = off;
    return c;
  }

  static size_t workspace_bytes(int64_t E, int sm_count) { return carve(E, sm_count).total; }

  static void run(const GroupedGemmCall& c) {
    const char* what = kOp == GemmOp::kWgrad ? "grouped_gemm_wgrad" : "grouped_gemm";
    check_arg(c.M >= 0 && c.K >= 0 && c.N >= 0 && c.E >= 0, what, "sizes must be >= 0");
    check_arg(c.M <= INT_MAX && c.K <= INT_MAX && c.N <= INT_MAX && c.E <= INT_MAX, what,
              "M, K, N and E must be < 2^31 (CUTLASS problem shapes are int32)");
    check_arg(c.K % Cfg::kAlign == 0 && c.N % Cfg::kAlign == 0, what,
              "K and N must be multiples of " + std::to_string(Cfg::kAlign) + " (16-byte TMA rows)");
    check_arg(c.sm_count > 0, what, "sm_count must be > 0");
    const Carve w = carve(c.E, c.sm_count);
    check_arg(c.workspace != nullptr && c.workspace_bytes >= w.total, what,
              "workspace has " + std::to_string(c.workspace_bytes) + " bytes, needs " + std::to_string(w.total) +
                  " (" + what + "_workspace_bytes on this device)");
    check_arg(aligned_to(c.workspace, kAlignBytes), what, "workspace must be 128-byte aligned");
    for (const void* p : {c.a, c.b, static_cast<const void*>(c.d)})
      check_arg(aligned_to(p, 16), what, "operands must be 16-byte aligned (TMA)");

    char* base = static_cast<char*>(c.workspace);
    GroupArrays<Cfg> g{
        reinterpret_cast<typename Cfg::Shape*>(base + w.shapes),
        reinterpret_cast<const typename Cfg::ElementA**>(base + w.ptr_a),
        reinterpret_cast<const typename Cfg::ElementB**>(base + w.ptr_b),
        reinterpret_cast<typename Cfg::ElementD**>(base + w.ptr_d),
        reinterpret_cast<typename Cfg::StrideA*>(base + w.stride_a),
        reinterpret_cast<typename Cfg::StrideB*>(base + w.stride_b),
        reinterpret_cast<typename Cfg::StrideD*>(base + w.stride_d),
    };

    // K = 0: y is all zeros and there is no GEMM (zero k-tiles would store garbage, see above).
    const bool zero_all = kOp != GemmOp::kWgrad && c.K == 0;
    const bool gemm = c.E > 0 && c.M > 0 && c.K > 0 && c.N > 0;

    // Enough threads for the E groups; for the zeroing a few blocks per SM, each looping.
    const int64_t zero_units = kOp == GemmOp::kWgrad ? c.K * c.N / kElemsPerUnit : c.M * c.N / kElemsPerUnit;
    const int64_t zero_blocks = std::min<int64_t>(ceil_div<int64_t>(zero_units, kPrepThreads), 4 * c.sm_count);
    const int64_t blocks = std::max<int64_t>({ceil_div<int64_t>(c.E, kPrepThreads), zero_blocks, 1});
    grouped_gemm_prep_kernel<Cfg, kOp><<<static_cast<unsigned>(blocks), kPrepThreads, 0, c.stream>>>(
        static_cast<const typename Cfg::ElementA*>(c.a), static_cast<const typename Cfg::ElementB*>(c.b),
        c.offsets, static_cast<typename Cfg::ElementD*>(c.d), c.M, c.K, c.N, static_cast<int>(c.E), zero_all, g);
    check_launch(what);
    if (!gemm) return;

    typename Gemm::Arguments args = base_arguments(c.E, c.device, c.sm_count);
    args.problem_shape.problem_shapes = g.shapes;
    args.problem_shape.host_problem_shapes = nullptr;  // group sizes stay on the device
    args.mainloop.ptr_A = g.ptr_a;
    args.mainloop.dA = g.stride_a;
    args.mainloop.ptr_B = g.ptr_b;
    args.mainloop.dB = g.stride_b;
    // epilogue.thread: alpha = 1, beta = 0 (the defaults); C is void, so ptr_C / dC stay null.
    args.epilogue.ptr_D = g.ptr_d;
    args.epilogue.dD = g.stride_d;

    // None of these touch the stream except run(): can_implement and initialize are host-side
    // (initialize encodes the TMA descriptors with cuTensorMapEncodeTiled and sets the kernel's
    // smem attribute; the group scheduler and this epilogue need no workspace memset).
    Gemm op;
    check_status(Gemm::can_implement(args), what, "can_implement");
    check_status(op.initialize(args, base + w.cutlass, c.stream), what, "initialize");
    check_status(op.run(c.stream), what, "run");  // run() reads cudaGetLastError itself
  }

  static void check_status(cutlass::Status st, const char* what, const char* step) {
    if (st != cutlass::Status::kSuccess)
      throw std::runtime_error(std::string("compass._cuda.") + what + ": CUTLASS " + step + " failed: " +
                               cutlass::cutlassGetStatusString(st));
  }
};

}  // namespace sm90
}  // namespace cuda
}  // namespace compass

// Defines the GroupedGemmInstance `var` declared in cuda/grouped_gemm.h (the op's default tile, or
// `tile`, one of the tile structs above, with the _TILE form).
#define COMPASS_SM90_GROUPED_GEMM_INSTANCE_TILE(var, name, element, op, tile)                         \
  const ::compass::cuda::GroupedGemmInstance var = {                                                  \
      name, op, &::compass::cuda::sm90::GroupedGemmSm90<element, op, tile>::workspace_bytes,          \
      &::compass::cuda::sm90::GroupedGemmSm90<element, op, tile>::run}
#define COMPASS_SM90_GROUPED_GEMM_INSTANCE(var, name, element, op) \
  COMPASS_SM90_GROUPED_GEMM_INSTANCE_TILE(var, name, element, op, ::compass::cuda::sm90::OpTraits<op>::Tile)
