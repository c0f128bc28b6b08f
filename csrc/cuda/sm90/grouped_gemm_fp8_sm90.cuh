// CUTLASS 3.x FP8 (e4m3 x e4m3 -> bf16) grouped GEMM for sm_90a, y[rows_e] = x[rows_e] @ w[e]^T
// with two scalings (layouts in cuda/grouped_gemm_fp8.h):
//   kRowRow        per-row x scales and per-output-channel w scales, applied in a fused epilogue
//                  (an EVT: y = bf16(sw[e, n] * (sx[m] * acc)), both scale vectors read through
//                  per-group pointer arrays, so no fp32 staging buffer and no second kernel);
//   kBlockBlock2d  DeepSeek-V3 1x128 x-blocks and 128x128 w-blocks, applied to the fp32
//                  accumulator once per 128-wide k-tile inside the mainloop (CUTLASS's
//                  KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise).
// Both accumulate in fp32: the row kernel uses CUTLASS's FP8 mainloop that promotes wgmma's
// limited-precision accumulator into fp32 registers every 4 wgmmas (128 of K, the DeepSeek-V3
// recipe), not the FP8FastAccum one that lets wgmma accumulate the whole K.
//
// Driven from the device exactly like the bf16 grouped GEMM (grouped_gemm_sm90.cuh): a prep
// kernel reads `offsets` and writes each group's shape, pointers (x, w, y and both scales),
// strides and scale layouts into the caller's workspace, and zeroes the rows of y that no group
// covers; CUTLASS gets device arrays only (host problem shapes = nullptr). No host read of device
// data, no allocation, no sync: CUDA-graph capturable.
//
// Included by the instance files sm90/grouped_gemm_fp8_<scaling>_<out>.cu, one CUTLASS instance
// each (~40 s of nvcc CPU time per instance, 1.4x a bf16 instance).
#pragma once

#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/float8.h>
#include <cutlass/functional.h>

#include "cuda/grouped_gemm_fp8.h"
#include "cuda/sm90/grouped_gemm_sm90.cuh"  // CUTLASS includes, leading_stride, clamped_offset

namespace compass {
namespace cuda {
namespace sm90 {

// ---- tile configuration ---------------------------------------------------------------------
// One tile per scaling (CI budget: every instance is another nvcc run). 128x128x128 cooperative is the
// standard Hopper FP8 tile (the same 32 KiB per stage as bf16 128x128x64) and the blockwise
// mainloop's only choice: one 128-wide k-block per k-tile, one w-scale per 128-wide n-tile.
// Cluster 1x2 (two CTAs on adjacent n-tiles of the same m-tile, A multicast to both): unlike a
// 2x1 cluster along M, it costs nothing on ragged groups, since every group has the same N (a
// spare tile per m-tile only when ceil(N / 128) is odd); it halves x's L2->SM traffic, which
// matters at the large-K shapes (K = 7168) where FP8 is bandwidth-hungry.
struct Fp8Tile {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};

// A = x rows [rows, K] K-major ("RowMajor"); B = w[e]^T, w[e] [N, K] K-major ("ColumnMajor" B);
// D = y rows [rows, N] row-major.
struct Fp8Layouts {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;  // 16-byte TMA rows of 1-byte elements
};

template <class ElementD, Fp8Scaling kScaling>
struct Fp8Config;

// Per-row scales: the standard FP8 ptr-array mainloop and an EVT epilogue.
template <class ElementD_>
struct Fp8Config<ElementD_, Fp8Scaling::kRowRow> : Fp8Tile, Fp8Layouts {
  static constexpr bool kBlockwise = false;
  using OutElement = ElementD_;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD_>::value;

  // sx[m]: a column vector broadcast along N, per-group pointer x_scale + offsets[e], which is
  // only 4-byte aligned (alignment 1: scalar loads, predicated on the group's rows).
  using ScaleX = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float*, float,
                                                             cute::Stride<cute::_1, cute::_0, cute::_0>, 1>;
  // sw[e, n]: a row vector broadcast along M, per-group pointer w_scale + e * N (staged in smem
  // once per tile, predicated on N).
  using ScaleW = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float*, float,
                                                             cute::Stride<cute::_0, cute::_1, cute::_0>, 1>;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using AccTimesSx = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch, ScaleX>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementD_, float, kRound>, ScaleW, AccTimesSx>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignD, ElementD_, LayoutD*,
      kAlignD, EpilogueSchedule, Fusion>::CollectiveOp;

  // FP8 inputs + KernelPtrArrayTmaWarpSpecializedCooperative -> MainloopSm90ArrayTmaGmmaWarp-
  // SpecializedFP8 (fp32 promotion every mma_promotion_interval = 4 wgmmas, the default).
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA*, kAlignAB, ElementB, LayoutB*,
      kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using LayoutSFA = char;  // unused (no scale layouts in this mainloop)
  using LayoutSFB = char;
};

// 1x128 / 128x128 block scales: CUTLASS's blockwise-scaled ptr-array mainloop; the epilogue only
// rounds the (already scaled) fp32 accumulator to the output type.
template <class ElementD_>
struct Fp8Config<ElementD_, Fp8Scaling::kBlockBlock2d> : Fp8Tile, Fp8Layouts {
  static constexpr bool kBlockwise = true;
  using OutElement = ElementD_;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD_>::value;

  // Scale granularity (M, N, K) = (1, 128, 128), both scale tensors K-major: SFA [rows, KB] at
  // x_scale + offsets[e] * KB, SFB [NB, KB] at w_scale + e * NB * KB (KB = ceil(K/128),
  // NB = ceil(N/128)). With a K-major SFA the per-group layout does not depend on the group's
  // row count, so a row slice of x_scale is the group's SFA; the (default) M-major SFA would be
  // [KB, rows_e] per group, i.e. a per-group transpose of x_scale. (CUTLASS's header says "Sm90
  // only supports MN major" for these configs, but the sm_90 ptr-array mainloop reads the scales
  // through the generic layouts below with per-element cp.async, and with a 128-wide k-tile the
  // shared-memory scale layouts of the two majornesses coincide; K-major/K-major on this exact
  // tile and schedule is what SGLang's Hopper FP8 blockwise MoE GEMM ships.)
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K,
                                                                cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::epilogue::thread::Identity, ElementD_, float, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignD, ElementD_, LayoutD*,
      kAlignD, EpilogueSchedule, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB,
      ElementB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;

  static_assert(Mainloop::ScaleGranularityM == 1 && Mainloop::ScaleGranularityN == kFp8ScaleBlock &&
                    Mainloop::ScaleGranularityK == kFp8ScaleBlock,
                "1x128 x blocks, 128x128 w blocks");
  static_assert(!Mainloop::MMajorSFA && !Mainloop::NMajorSFB, "K-major scale layouts (row slices of x_scale)");
};

template <class Out, Fp8Scaling kScaling>
struct Fp8KernelConfig : Fp8Config<Out, kScaling> {
  using Base = Fp8Config<Out, kScaling>;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K)
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, typename Base::Mainloop, typename Base::Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using Shape = typename ProblemShape::UnderlyingProblemShape;
  using ElementA = typename GemmKernel::ElementA;
  using ElementB = typename GemmKernel::ElementB;
  using ElementD = typename GemmKernel::ElementD;
  using StrideA = typename GemmKernel::InternalStrideA;  // (M, K, L)
  using StrideB = typename GemmKernel::InternalStrideB;  // (N, K, L)
  using StrideD = typename GemmKernel::InternalStrideD;  // (M, N, L)

  template <int kMode, class S>
  static constexpr bool unit_in = cute::is_constant<1, cute::remove_cvref_t<decltype(cute::get<kMode>(S{}))>>::value;
  static_assert(unit_in<1, StrideA> && unit_in<1, StrideB>, "A and B must be K-major (FP8 wgmma)");
  static_assert(unit_in<1, StrideD>, "D must be row-major");
  static_assert(sizeof(ElementA) == 1 && sizeof(ElementB) == 1, "e4m3 operands");
  static_assert(sizeof(ElementD) == 2, "16-bit output (8 elements per 16-byte zeroing unit)");
};

// Per-group argument arrays, carved out of the caller's workspace.
template <class Cfg>
struct Fp8GroupArrays {
  typename Cfg::Shape* shapes;
  const typename Cfg::ElementA** ptr_a;
  const typename Cfg::ElementB** ptr_b;
  typename Cfg::ElementD** ptr_d;
  const float** ptr_sa;  // x scales of group e (row: x_scale + lo; block: x_scale + lo * KB)
  const float** ptr_sb;  // w scales of group e (row: w_scale + e * N; block: + e * NB * KB)
  typename Cfg::StrideA* stride_a;
  typename Cfg::StrideB* stride_b;
  typename Cfg::StrideD* stride_d;
  typename Cfg::LayoutSFA* layout_sfa;  // blockwise only
  typename Cfg::LayoutSFB* layout_sfb;
};

// One launch before the GEMM:
//   thread e < E writes group e's problem shape, pointers, strides (and scale layouts);
//   all threads zero, grid-stride, the rows of y outside [offsets[0], offsets[E]) (all rows when
//   zero_all, i.e. K = 0). N is a multiple of 16, so each zeroed row is whole 16-byte units.
// __host__ __device__ so that a host test can run it over a simulated grid.
template <class Cfg>
__host__ __device__ __forceinline__ void grouped_gemm_fp8_prep_thread(
    int64_t tid, int64_t nthreads, const typename Cfg::ElementA* x, const float* x_scale,
    const typename Cfg::ElementB* w, const float* w_scale, const int64_t* __restrict__ offsets,
    typename Cfg::ElementD* y, int64_t M, int64_t K, int64_t N, int E, bool zero_all, const Fp8GroupArrays<Cfg>& g) {
  const int64_t kb = (K + kFp8ScaleBlock - 1) / kFp8ScaleBlock;  // k-blocks of 128
  const int64_t nb = (N + kFp8ScaleBlock - 1) / kFp8ScaleBlock;  // n-blocks of 128
  for (int64_t t = tid; t < E; t += nthreads) {  // one iteration: the grid has >= E threads
    const int e = static_cast<int>(t);
    const int64_t lo = clamped_offset(offsets, e, M);
    const int64_t hi = clamped_offset(offsets, e + 1, M);
    const int64_t rows = hi > lo ? hi - lo : 0;
    // y[lo : lo + rows] = x[lo : lo + rows] @ w[e]^T; a 0-row group has 0 tiles.
    const auto shape = cute::make_shape(static_cast<int>(rows), static_cast<int>(N), static_cast<int>(K));
    g.shapes[e] = shape;
    g.ptr_a[e] = x + lo * K;
    g.ptr_b[e] = w + static_cast<int64_t>(e) * N * K;
    g.ptr_d[e] = y + lo * N;
    g.stride_a[e] = leading_stride<typename Cfg::StrideA>(K);
    g.stride_b[e] = leading_stride<typename Cfg::StrideB>(K);
    g.stride_d[e] = leading_stride<typename Cfg::StrideD>(N);
    if constexpr (Cfg::kBlockwise) {
      g.ptr_sa[e] = x_scale + lo * kb;
      g.ptr_sb[e] = w_scale + static_cast<int64_t>(e) * nb * kb;
      // The sm_90 blockwise mainloop derives these from the problem shape itself (load_init);
      // written anyway so that the arguments are complete for a CUTLASS that reads them.
      g.layout_sfa[e] = Cfg::ScaleConfig::tile_atom_to_shape_SFA(shape);
      g.layout_sfb[e] = Cfg::ScaleConfig::tile_atom_to_shape_SFB(shape);
    } else {
      g.ptr_sa[e] = x_scale + lo;
      g.ptr_sb[e] = w_scale + static_cast<int64_t>(e) * N;
    }
  }

  uint4* out = reinterpret_cast<uint4*>(y);
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  constexpr int64_t kElemsPerUnit = 16 / sizeof(typename Cfg::ElementD);
  const int64_t row_units = N / kElemsPerUnit;
  const int64_t first = zero_all ? M : clamped_offset(offsets, 0, M);
  const int64_t end = clamped_offset(offsets, E, M);
  const int64_t last = zero_all ? M : (end > first ? end : first);
  const int64_t head = first * row_units;       // rows [0, first)
  const int64_t tail = (M - last) * row_units;  // rows [last, M)
  for (int64_t i = tid; i < head + tail; i += nthreads) out[i < head ? i : last * row_units + (i - head)] = zero;
}

template <class Cfg>
__global__ void __launch_bounds__(kPrepThreads)
grouped_gemm_fp8_prep_kernel(const typename Cfg::ElementA* x, const float* x_scale, const typename Cfg::ElementB* w,
                             const float* w_scale, const int64_t* __restrict__ offsets, typename Cfg::ElementD* y,
                             int64_t M, int64_t K, int64_t N, int E, bool zero_all, Fp8GroupArrays<Cfg> g) {
  grouped_gemm_fp8_prep_thread<Cfg>(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                    static_cast<int64_t>(gridDim.x) * blockDim.x, x, x_scale, w, w_scale, offsets, y, M,
                                    K, N, E, zero_all, g);
}

// ---- host side ------------------------------------------------------------------------------

template <class ElementD, Fp8Scaling kScaling>
struct GroupedGemmFp8Sm90 {
  using Cfg = Fp8KernelConfig<ElementD, kScaling>;
  using Gemm = typename Cfg::Gemm;
  static constexpr size_t kAlignBytes = 128;  // TMA descriptors in global memory need 64

  struct Carve {
    size_t shapes, ptr_a, ptr_b, ptr_d, ptr_sa, ptr_sb, stride_a, stride_b, stride_d, layout_sfa, layout_sfb, cutlass,
        total;
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
    const size_t n_layouts = Cfg::kBlockwise ? n : 0;
    Carve c{};
    c.shapes = take(n * sizeof(typename Cfg::Shape));
    c.ptr_a = take(n * sizeof(void*));
    c.ptr_b = take(n * sizeof(void*));
    c.ptr_d = take(n * sizeof(void*));
    c.ptr_sa = take(n * sizeof(void*));
    c.ptr_sb = take(n * sizeof(void*));
    c.stride_a = take(n * sizeof(typename Cfg::StrideA));
    c.stride_b = take(n * sizeof(typename Cfg::StrideB));
    c.stride_d = take(n * sizeof(typename Cfg::StrideD));
    c.layout_sfa = take(n_layouts * sizeof(typename Cfg::LayoutSFA));
    c.layout_sfb = take(n_layouts * sizeof(typename Cfg::LayoutSFB));
    // Per-SM TMA descriptor slots (A, B, and D per consumer warpgroup); independent of the shapes.
    c.cutlass = take(Gemm::get_workspace_size(base_arguments(E, 0, sm_count)));
    c.total = off;
    return c;
  }

  static size_t workspace_bytes(int64_t E, int sm_count) { return carve(E, sm_count).total; }

  static void check_status(cutlass::Status st, const char* what, const char* step) {
    if (st != cutlass::Status::kSuccess)
      throw std::runtime_error(std::string("compass._cuda.") + what + ": CUTLASS " + step + " failed: " +
                               cutlass::cutlassGetStatusString(st));
  }

  static void run(const GroupedGemmFp8Call& c) {
    const char* what = "grouped_gemm_fp8";
    check_arg(c.M >= 0 && c.K >= 0 && c.N >= 0 && c.E >= 0, what, "sizes must be >= 0");
    check_arg(c.M <= INT_MAX && c.K <= INT_MAX && c.N <= INT_MAX && c.E <= INT_MAX, what,
              "M, K, N and E must be < 2^31 (CUTLASS problem shapes are int32)");
    check_arg(c.K % kFp8TmaAlignElems == 0 && c.N % kFp8TmaAlignElems == 0, what,
              "K and N must be multiples of 16 (16-byte TMA rows of float8 elements)");
    check_arg(c.sm_count > 0, what, "sm_count must be > 0");
    const Carve wc = carve(c.E, c.sm_count);
    check_arg(c.workspace != nullptr && c.workspace_bytes >= wc.total, what,
              "workspace has " + std::to_string(c.workspace_bytes) + " bytes, needs " + std::to_string(wc.total) +
                  " (grouped_gemm_fp8_workspace_bytes on this device)");
    check_arg(aligned_to(c.workspace, kAlignBytes), what, "workspace must be 128-byte aligned");
    for (const void* p : {c.x, c.w, static_cast<const void*>(c.y)})
      check_arg(aligned_to(p, 16), what, "x, w and y must be 16-byte aligned (TMA)");
    for (const void* p : {static_cast<const void*>(c.x_scale), static_cast<const void*>(c.w_scale)})
      check_arg(aligned_to(p, 4), what, "x_scale and w_scale must be 4-byte aligned float32");

    char* base = static_cast<char*>(c.workspace);
    Fp8GroupArrays<Cfg> g{
        reinterpret_cast<typename Cfg::Shape*>(base + wc.shapes),
        reinterpret_cast<const typename Cfg::ElementA**>(base + wc.ptr_a),
        reinterpret_cast<const typename Cfg::ElementB**>(base + wc.ptr_b),
        reinterpret_cast<typename Cfg::ElementD**>(base + wc.ptr_d),
        reinterpret_cast<const float**>(base + wc.ptr_sa),
        reinterpret_cast<const float**>(base + wc.ptr_sb),
        reinterpret_cast<typename Cfg::StrideA*>(base + wc.stride_a),
        reinterpret_cast<typename Cfg::StrideB*>(base + wc.stride_b),
        reinterpret_cast<typename Cfg::StrideD*>(base + wc.stride_d),
        reinterpret_cast<typename Cfg::LayoutSFA*>(base + wc.layout_sfa),
        reinterpret_cast<typename Cfg::LayoutSFB*>(base + wc.layout_sfb),
    };

    // K = 0: y is all zeros and there is no GEMM (zero k-tiles would leave the accumulator
    // uninitialised: both FP8 mainloops skip the MMA prologue when k_tile_count = 0).
    const bool zero_all = c.K == 0;
    const bool gemm = c.E > 0 && c.M > 0 && c.K > 0 && c.N > 0;
    if (c.M == 0 || c.N == 0) return;  // y is empty; nothing to zero, nothing to compute

    const int64_t zero_units = c.M * c.N / (16 / static_cast<int64_t>(sizeof(ElementD)));
    const int64_t zero_blocks = std::min<int64_t>(ceil_div<int64_t>(zero_units, kPrepThreads), 4 * c.sm_count);
    const int64_t blocks = std::max<int64_t>({ceil_div<int64_t>(c.E, kPrepThreads), zero_blocks, 1});
    grouped_gemm_fp8_prep_kernel<Cfg><<<static_cast<unsigned>(blocks), kPrepThreads, 0, c.stream>>>(
        static_cast<const typename Cfg::ElementA*>(c.x), c.x_scale, static_cast<const typename Cfg::ElementB*>(c.w),
        c.w_scale, c.offsets, static_cast<typename Cfg::ElementD*>(c.y), c.M, c.K, c.N, static_cast<int>(c.E),
        zero_all, g);
    check_launch(what);
    if (!gemm) return;

    typename Gemm::Arguments args = base_arguments(c.E, c.device, c.sm_count);
    args.problem_shape.problem_shapes = g.shapes;
    args.problem_shape.host_problem_shapes = nullptr;  // group sizes stay on the device
    args.mainloop.ptr_A = g.ptr_a;
    args.mainloop.dA = g.stride_a;
    args.mainloop.ptr_B = g.ptr_b;
    args.mainloop.dB = g.stride_b;
    args.epilogue.ptr_C = nullptr;  // C is void: no source load
    args.epilogue.dC = nullptr;
    args.epilogue.ptr_D = g.ptr_d;
    args.epilogue.dD = g.stride_d;
    if constexpr (Cfg::kBlockwise) {
      args.mainloop.ptr_SFA = g.ptr_sa;
      args.mainloop.layout_SFA = g.layout_sfa;
      args.mainloop.ptr_SFB = g.ptr_sb;
      args.mainloop.layout_SFB = g.layout_sfb;
      // epilogue.thread: Identity(acc) has no arguments.
    } else {
      // epilogue.thread = EVT(mul_out; ScaleW, EVT(mul; AccFetch, ScaleX)): op_0 is the first
      // child, op_2 the node (the ComputeFn nodes take no arguments).
      auto& fusion = args.epilogue.thread;
      fusion.op_0.ptr_row = g.ptr_sb;  // sw[e] rows: [N] each
      fusion.op_0.null_default = 0.f;
      fusion.op_1.op_1.ptr_col = g.ptr_sa;  // sx[offsets[e]:]: [rows_e] each
      fusion.op_1.op_1.null_default = 0.f;
      // mainloop.mma_promotion_interval stays 4 (fp32 promotion every 128 of K).
    }

    // can_implement and initialize are host-side (initialize encodes the TMA descriptors with
    // cuTensorMapEncodeTiled and sets the kernel's smem attribute; the group scheduler and these
    // epilogues need no workspace memset); run() enqueues the cluster launch on c.stream.
    Gemm op;
    check_status(Gemm::can_implement(args), what, "can_implement");
    check_status(op.initialize(args, base + wc.cutlass, c.stream), what, "initialize");
    check_status(op.run(c.stream), what, "run");
  }
};

}  // namespace sm90
}  // namespace cuda
}  // namespace compass

// Defines the GroupedGemmFp8Instance `var` declared in cuda/grouped_gemm_fp8.h.
#define COMPASS_SM90_GROUPED_GEMM_FP8_INSTANCE(var, name, element, dtype_code, scaling)                \
  const ::compass::cuda::GroupedGemmFp8Instance var = {                                              \
      name, scaling, static_cast<int>(dtype_code),                                                    \
      &::compass::cuda::sm90::GroupedGemmFp8Sm90<element, scaling>::workspace_bytes,                  \
      &::compass::cuda::sm90::GroupedGemmFp8Sm90<element, scaling>::run}
