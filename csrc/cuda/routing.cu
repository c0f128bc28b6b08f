// MoE routing kernels: route (expert ids -> stable row map), permute (scatter tokens into
// expert-sorted rows), unpermute (gather + weighted combine over top-k) and its backward.
// Arguments: common/kernels.def. Everything is launched on the caller's stream with no host
// sync, no allocation and no host read of device data, so the ops are CUDA-graph capturable.
#include <algorithm>
#include <cstdint>
#include <string>

#include "common/kernel_args.h"
#include "cuda/common.cuh"

namespace compass {
namespace cuda {
namespace {

// ============================================================================================
// route
// ============================================================================================
// Stable ranks without atomics deciding order. The N = T*k assignments are cut into chunks of
// kChunk; three launches:
//   1. route_count  : one block per chunk -> counts[c, e] (int32 workspace)
//   2. route_scan   : per expert, exclusive scan of counts over chunks (in place -> chunk base
//                     ranks) and the totals -> tokens_per_expert (capacity-clipped)
//   3. route_assign : one block per chunk: padded offsets (every block rescans E, which is cheaper
//                     than a 4th launch), then stable ranks within the chunk, -> row_id_map.
// Within a chunk each warp owns a contiguous slice of kWarpSlice assignments and walks it 32 at a
// time in order (__match_any_sync + popc of lower peers); per-warp per-expert counters in shared
// memory, scanned over warps, give the rank of every assignment among the chunk's earlier ones.
constexpr int kRouteThreads = 256;
constexpr int kRouteWarps = kRouteThreads / 32;
constexpr int kChunk = 2048;
constexpr int kWarpSlice = kChunk / kRouteWarps;  // 256 assignments = 8 steps of 32 lanes
constexpr int kSteps = kWarpSlice / 32;
static_assert(kWarpSlice % 32 == 0, "a warp slice is whole 32-lane steps");

// Out-of-range ids are treated like -1 (unrouted): no device assert on the fast path; the Python
// layer validates ids when COMPASS_CHECK=1.
template <typename I>
__device__ __forceinline__ int load_expert(const I* __restrict__ ids, int64_t i, int64_t n, int E) {
  if (i >= n) return -1;
  const I e = ids[i];
  return (e >= 0 && e < static_cast<I>(E)) ? static_cast<int>(e) : -1;
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

template <typename I>
__global__ void __launch_bounds__(kRouteThreads)
route_count_kernel(const I* __restrict__ ids, int64_t n, int E, int* __restrict__ counts /*[nc, E]*/) {
  extern __shared__ int hist[];  // [E]
  for (int e = threadIdx.x; e < E; e += kRouteThreads) hist[e] = 0;
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int lane = threadIdx.x & 31;
  for (int s = 0; s < kChunk / kRouteThreads; ++s) {
    const int e = load_expert(ids, base + s * kRouteThreads + threadIdx.x, n, E);
    // Warp-aggregated: one shared atomic per distinct expert in the warp, so a skewed router
    // (all tokens on one expert) does not serialise 32 atomics on one address. Counts only:
    // the order of these atomics does not matter.
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && lane == 31 - __clz(peers)) atomicAdd(&hist[e], __popc(peers));
  }
  __syncthreads();
  int* row = counts + static_cast<int64_t>(blockIdx.x) * E;
  for (int e = threadIdx.x; e < E; e += kRouteThreads) row[e] = hist[e];
}

// grid: ceil(E / 32) blocks of 32 x 32 threads; thread (x, y) = (expert, segment of chunks).
__global__ void __launch_bounds__(1024)
route_scan_kernel(int* __restrict__ counts /*[nc, E], in place*/, int64_t nc, int E, int64_t capacity,
                  int64_t* __restrict__ tokens_per_expert) {
  __shared__ int part[32][33];
  const int e = blockIdx.x * 32 + threadIdx.x;
  const int seg = threadIdx.y;
  const int64_t per = ceil_div<int64_t>(nc, 32);
  const int64_t c0 = seg * per;
  const int64_t c1 = std::min<int64_t>(nc, c0 + per);
  int sum = 0;
  if (e < E)
    for (int64_t c = c0; c < c1; ++c) sum += counts[c * E + e];
  part[seg][threadIdx.x] = sum;
  __syncthreads();
  if (seg == 0) {
    int run = 0;
    for (int s = 0; s < 32; ++s) {
      const int v = part[s][threadIdx.x];
      part[s][threadIdx.x] = run;
      run += v;
    }
    if (e < E) tokens_per_expert[e] = capacity >= 0 ? std::min<int64_t>(run, capacity) : run;
  }
  __syncthreads();
  if (e < E) {
    int run = part[seg][threadIdx.x];
    for (int64_t c = c0; c < c1; ++c) {
      const int v = counts[c * E + e];
      counts[c * E + e] = run;  // chunk base rank of expert e
      run += v;
    }
  }
}

// Exclusive scan of one int64 per thread over the block (kRouteThreads threads).
__device__ int64_t block_exclusive_scan(int64_t v, int64_t* warp_tot /*[kRouteWarps] smem*/, int64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  if (lane == 31) warp_tot[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    int64_t t = lane < kRouteWarps ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < kRouteWarps; o <<= 1) {
      const int64_t n = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += n;
    }
    if (lane < kRouteWarps) warp_tot[lane] = t;  // inclusive
  }
  __syncthreads();
  *total = warp_tot[kRouteWarps - 1];
  return inc - v + (warp > 0 ? warp_tot[warp - 1] : 0);
}

template <typename I>
__global__ void __launch_bounds__(kRouteThreads)
route_assign_kernel(const I* __restrict__ ids, int64_t n, int E, int64_t capacity, int64_t align,
                    const int* __restrict__ chunk_base /*[nc, E]*/,
                    const int64_t* __restrict__ tokens_per_expert, int64_t* __restrict__ row_id_map,
                    int64_t* __restrict__ expert_offsets) {
  extern __shared__ int64_t smem[];
  int64_t* offs = smem;                                   // [E + 1]
  int* cnt = reinterpret_cast<int*>(offs + E + 1);        // [kRouteWarps, E]
  __shared__ int64_t warp_tot[kRouteWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // (a) expert_offsets: exclusive scan of tokens_per_expert rounded up to `align`. Each thread
  // takes a contiguous run of experts so the scan is one block-wide pass.
  {
    const int per = ceil_div(E, kRouteThreads);
    const int e0 = threadIdx.x * per, e1 = min(E, e0 + per);
    int64_t local = 0;
    for (int e = e0; e < e1; ++e) local += ceil_div(tokens_per_expert[e], align) * align;
    int64_t total;
    int64_t run = block_exclusive_scan(local, warp_tot, &total);
    for (int e = e0; e < e1; ++e) {
      offs[e] = run;
      run += ceil_div(tokens_per_expert[e], align) * align;
    }
    if (threadIdx.x == 0) offs[E] = total;
    for (int i = threadIdx.x; i < kRouteWarps * E; i += kRouteThreads) cnt[i] = 0;
  }
  __syncthreads();
  if (blockIdx.x == 0)
    for (int e = threadIdx.x; e <= E; e += kRouteThreads) expert_offsets[e] = offs[e];

  const int64_t chunk0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  if (chunk0 >= n) return;  // T = 0: the single block only wrote expert_offsets (uniform exit)

  // (b) rank of each assignment among the earlier ones of its warp slice with the same expert.
  const int64_t slice0 = chunk0 + warp * kWarpSlice;
  int* my_cnt = cnt + warp * E;
  int ex[kSteps], rk[kSteps];
#pragma unroll
  for (int s = 0; s < kSteps; ++s) ex[s] = load_expert(ids, slice0 + s * 32 + lane, n, E);
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int e = ex[s];
    const unsigned peers = __match_any_sync(0xffffffffu, e);  // invalid lanes (-1) group apart
    rk[s] = e >= 0 ? my_cnt[e] + __popc(peers & lanemask_lt()) : 0;
    __syncwarp();  // every peer has read the counter before the highest peer bumps it
    if (e >= 0 && lane == 31 - __clz(peers)) my_cnt[e] += __popc(peers);
    __syncwarp();
  }
  __syncthreads();

  // (c) per expert: turn the per-warp counts into exclusive bases, starting at the chunk's base
  // rank (assignments of this expert in all earlier chunks, from route_scan).
  for (int e = threadIdx.x; e < E; e += kRouteThreads) {
    int run = chunk_base[static_cast<int64_t>(blockIdx.x) * E + e];
    for (int w = 0; w < kRouteWarps; ++w) {
      const int v = cnt[w * E + e];
      cnt[w * E + e] = run;
      run += v;
    }
  }
  __syncthreads();

  // (d) global rank = chunk base + earlier warps + within-warp rank; drop past capacity.
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int64_t i = slice0 + s * 32 + lane;
    if (i >= n) break;
    const int e = ex[s];
    int64_t row = -1;
    if (e >= 0) {
      const int64_t rank = static_cast<int64_t>(my_cnt[e]) + rk[s];
      if (capacity < 0 || rank < capacity) row = offs[e] + rank;
    }
    row_id_map[i] = row;
  }
}

// ============================================================================================
// zeroing of the rows nobody writes (shared by permute and unpermute_bwd)
// ============================================================================================
// The destination rows of expert e are [off[e], off[e] + tpe[e]); the rest of its segment
// (alignment padding) and the tail [off[E], num_rows) must read as zero. Their number depends on
// device data, so the grid covers the static num_rows in tiles of kZeroRows rows and each block
// zeroes the non-destination part of its tile. These blocks ride in the same launch as the
// scatter (blockIdx.x >= token_blocks) to save a launch on small, latency-bound shapes.
constexpr int kRowThreads = 128;
constexpr int kZeroRows = 32;

template <int B> struct RawBytes;
template <> struct RawBytes<1> { using type = uint8_t; };
template <> struct RawBytes<2> { using type = uint16_t; };
template <> struct RawBytes<4> { using type = uint32_t; };
template <> struct RawBytes<8> { using type = uint2; };
template <> struct RawBytes<16> { using type = uint4; };

template <typename U>
__device__ void zero_unrouted_rows(U* __restrict__ out, int64_t units_per_row,
                                   const int64_t* __restrict__ offsets,
                                   const int64_t* __restrict__ tokens_per_expert, int E,
                                   int64_t num_rows, int64_t tile) {
  const int64_t r0 = tile * kZeroRows;
  const int64_t r1 = std::min<int64_t>(r0 + kZeroRows, num_rows);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  // Largest e in [0, E] with offsets[e] <= r0 (offsets are non-decreasing; every thread does the
  // same search on the same addresses, so the loads are warp broadcasts).
  int lo = 0, hi = E;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (offsets[mid] <= r0) lo = mid; else hi = mid - 1;
  }
  for (int e = lo; e <= E; ++e) {
    const int64_t start = offsets[e];
    if (e > lo && start >= r1) break;
    const int64_t pad_lo = e < E ? start + tokens_per_expert[e] : start;
    const int64_t pad_hi = e < E ? offsets[e + 1] : num_rows;
    const int64_t a = std::max(pad_lo, r0), b = std::min(pad_hi, r1);
    if (a >= b) continue;
    U* dst = out + a * units_per_row;  // rows a..b-1 are contiguous
    const int64_t len = (b - a) * units_per_row;
    for (int64_t i = tid; i < len; i += nthreads) dst[i] = U{};
  }
}

// tx threads per row (a multiple of 32, so warps never straddle rows), 128 / tx rows per block.
inline dim3 row_block(int64_t units_per_row) {
  const int tx = units_per_row <= 32 ? 32 : units_per_row <= 64 ? 64 : 128;
  return dim3(tx, kRowThreads / tx);
}

// ============================================================================================
// permute: out[row_id_map[t, j]] = x[t], one row of x read once and written k times
// ============================================================================================
constexpr int kCopyUnroll = 4;  // 4 independent 16-byte loads in flight per thread

template <typename V>
__global__ void __launch_bounds__(kRowThreads)
permute_kernel(const V* __restrict__ x, int64_t stride_x /*in V units*/, int64_t T, int64_t units_per_row,
               const int64_t* __restrict__ row_id_map, int k, const int64_t* __restrict__ offsets,
               const int64_t* __restrict__ tokens_per_expert, int E, int64_t num_rows,
               V* __restrict__ out, int64_t token_blocks) {
  if (blockIdx.x >= token_blocks) {
    zero_unrouted_rows(out, units_per_row, offsets, tokens_per_expert, E, num_rows,
                       static_cast<int64_t>(blockIdx.x) - token_blocks);
    return;
  }
  extern __shared__ int64_t rows_smem[];  // [blockDim.y, k]
  int64_t* rows = rows_smem + threadIdx.y * k;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  for (int j = threadIdx.x; j < k; j += blockDim.x) rows[j] = t < T ? row_id_map[t * k + j] : -1;
  __syncthreads();
  if (t >= T) return;
  const V* src = x + t * stride_x;
  for (int64_t u0 = threadIdx.x; u0 < units_per_row; u0 += kCopyUnroll * blockDim.x) {
    V v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t c = u0 + u * blockDim.x;
      if (c < units_per_row) v[u] = src[c];
    }
    for (int j = 0; j < k; ++j) {
      const int64_t row = rows[j];
      if (row < 0) continue;
      V* dst = out + row * units_per_row;
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int64_t c = u0 + u * blockDim.x;
        if (c < units_per_row) dst[c] = v[u];
      }
    }
  }
}

// ============================================================================================
// unpermute: out[t] = sum_j w_j * y[row_j], in slot order, product and sum rounded separately
// ============================================================================================
template <typename T, int N>
__global__ void __launch_bounds__(kRowThreads)
unpermute_kernel(const T* __restrict__ y, int64_t stride_y, int64_t H, const int64_t* __restrict__ row_id_map,
                 int64_t num_tokens, int k, const void* __restrict__ probs, int probs_dtype,
                 T* __restrict__ out) {
  using A = acc_t<T>;
  extern __shared__ int64_t smem[];
  int64_t* rows = smem + threadIdx.y * k;                                       // [blockDim.y, k]
  A* w = reinterpret_cast<A*>(smem + blockDim.y * k) + threadIdx.y * k;         // [blockDim.y, k]
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    rows[j] = t < num_tokens ? row_id_map[t * k + j] : -1;
    w[j] = (probs != nullptr && t < num_tokens) ? load_prob<A>(probs, probs_dtype, t * k + j) : A(1);
  }
  __syncthreads();
  if (t >= num_tokens) return;
  const int64_t packs = H / N;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = A(0);  // 0 + (-0) = +0, as torch's zeros-initialised sum
    // 4 slots unrolled: 4 independent row gathers in flight; nvcc's default (8) made ptxas spill
    // at its 32-register target on sm_80.
#pragma unroll 4
    for (int j = 0; j < k; ++j) {
      const int64_t row = rows[j];
      if (row < 0) continue;
      const Pack<T, N> v = load_pack<T, N>(y + row * stride_y + p * N);
      const A wj = w[j];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = add_rn(acc[i], mul_rn(wj, to_acc<A>(v.v[i])));
    }
    Pack<T, N> o;
#pragma unroll
    for (int i = 0; i < N; ++i) o.v[i] = from_acc<T>(acc[i]);
    store_pack<T, N>(out + t * H + p * N, o);
  }
}

// ============================================================================================
// unpermute_bwd: grad_y[row_j] = w_j * grad_out[t]; grad_probs[t, j] = <grad_out[t], y[row_j]>
// ============================================================================================
template <typename T, int N>
__global__ void __launch_bounds__(kRowThreads)
unpermute_bwd_kernel(const T* __restrict__ g, int64_t stride_g, const T* __restrict__ y, int64_t stride_y,
                     int64_t H, const int64_t* __restrict__ row_id_map, int64_t num_tokens, int k,
                     const int64_t* __restrict__ offsets, const int64_t* __restrict__ tokens_per_expert,
                     int E, int64_t num_rows, const void* __restrict__ probs, int probs_dtype,
                     T* __restrict__ grad_y, void* __restrict__ grad_probs, int64_t token_blocks) {
  using A = acc_t<T>;
  using U = typename RawBytes<sizeof(T) * N>::type;
  if (blockIdx.x >= token_blocks) {
    zero_unrouted_rows(reinterpret_cast<U*>(grad_y), H / N, offsets, tokens_per_expert, E, num_rows,
                       static_cast<int64_t>(blockIdx.x) - token_blocks);
    return;
  }
  extern __shared__ int64_t smem[];
  int64_t* rows = smem + threadIdx.y * k;                                        // [blockDim.y, k]
  A* w = reinterpret_cast<A*>(smem + blockDim.y * k) + threadIdx.y * k;          // [blockDim.y, k]
  A* red = reinterpret_cast<A*>(smem + blockDim.y * k) + blockDim.y * k;         // [2, blockDim.y, 4]
  const bool has_probs = probs != nullptr;  // block-uniform
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = t < num_tokens;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    rows[j] = live ? row_id_map[t * k + j] : -1;
    w[j] = (has_probs && live) ? load_prob<A>(probs, probs_dtype, t * k + j) : A(1);
  }
  __syncthreads();
  const int64_t packs = H / N;
  const T* g_row = g + (live ? t : 0) * stride_g;
  const int warps_per_row = blockDim.x >> 5;
  // No early return for t >= num_tokens: those threads still take part in the reductions.
  for (int j = 0; j < k; ++j) {
    const int64_t row = rows[j];
    const A wj = w[j];
    A dot = A(0);
    if (row >= 0) {
      T* gy = grad_y + row * H;
      const T* y_row = y + row * stride_y;
      if (has_probs) {
        for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
          const Pack<T, N> gv = load_pack<T, N>(g_row + p * N);  // re-read per slot: an L1 hit
          const Pack<T, N> yv = load_pack<T, N>(y_row + p * N);
          Pack<T, N> o;
#pragma unroll
          for (int i = 0; i < N; ++i) {
            const A gi = to_acc<A>(gv.v[i]);
            o.v[i] = from_acc<T>(mul_rn(wj, gi));
            dot = fma(gi, to_acc<A>(yv.v[i]), dot);
          }
          store_pack<T, N>(gy + p * N, o);
        }
      } else {
        for (int64_t p = threadIdx.x; p < packs; p += blockDim.x)
          store_pack<T, N>(gy + p * N, load_pack<T, N>(g_row + p * N));  // bit copy
      }
    }
    if (has_probs) {
      // Fixed-shape reduction (warp tree, then warps of the row in order): deterministic.
      // Double-buffered by slot parity so one barrier per slot suffices.
      dot = warp_sum(dot);
      A* r = red + ((j & 1) * blockDim.y + threadIdx.y) * 4;
      if ((threadIdx.x & 31) == 0) r[threadIdx.x >> 5] = dot;
      __syncthreads();
      if (threadIdx.x == 0 && live) {
        A s = r[0];
        for (int i = 1; i < warps_per_row; ++i) s = s + r[i];
        store_prob<A>(grad_probs, probs_dtype, t * k + j, row >= 0 ? s : A(0));
      }
    }
  }
}

// ---- host-side helpers -----------------------------------------------------------------------

// Largest width in {16, 8, 4, 2, 1} bytes that divides every address and row length in bytes.
inline int vector_bytes(std::initializer_list<int64_t> quantities) {
  for (int w : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t q : quantities) ok = ok && (q % w == 0);
    if (ok) return w;
  }
  return 1;
}

inline int64_t grid_limit_check(int64_t blocks, const char* what) {
  check_arg(blocks <= 0x7fffffffLL, what, "grid too large: " + std::to_string(blocks) + " blocks");
  return blocks;
}

constexpr size_t kMaxDefaultSmem = 48 * 1024;

inline void check_smem(size_t bytes, const char* what, const char* why) {
  check_arg(bytes <= kMaxDefaultSmem, what,
            std::string(why) + " needs " + std::to_string(bytes) + " bytes of shared memory (max 49152)");
}

}  // namespace

// ============================================================================================
// host launchers
// ============================================================================================

int64_t route_workspace_numel(int64_t T, int64_t k, int64_t E) {
  const int64_t n = T * k;
  const int64_t chunks = ceil_div<int64_t>(n, kChunk);
  return ceil_div<int64_t>(chunks * E, 2);  // int32 counts packed into the int64 workspace
}

void route(const route_args& a) {
  const char* what = "route";
  const int64_t T = a.T, k = a.k, E = a.E, capacity = a.capacity, align = a.align;
  check_arg(a.workspace.data == nullptr || a.workspace.dtype == int(DType::kInt64), what, "workspace must be int64");
  int64_t* const workspace = a.workspace.as<int64_t>();
  const cudaStream_t stream = a.stream;
  check_arg(a.topk_ids.dtype == int(DType::kInt64) || a.topk_ids.dtype == int(DType::kInt32), what,
            std::string("topk_ids must be int32 or int64, got ") + dtype_name(a.topk_ids.dtype));
  check_arg(T >= 0 && k >= 0, what, "T and k must be >= 0");
  check_arg(E >= 0 && E <= 0x7fffffffLL, what, "E out of range");
  check_arg(align >= 1, what, "align must be >= 1, got " + std::to_string(align));
  const int64_t n = T * k;
  // Ranks and per-chunk counts are int32: 2^31 assignments is far above any MoE batch.
  check_arg(n < (int64_t{1} << 31), what, "T * k must be < 2^31");
  const int64_t chunks = ceil_div<int64_t>(n, kChunk);
  check_arg(chunks == 0 || workspace != nullptr || E == 0, what, "workspace is null");
  int* counts = reinterpret_cast<int*>(workspace);
  const int e32 = static_cast<int>(E);

  const size_t assign_smem = (E + 1) * sizeof(int64_t) + size_t(kRouteWarps) * E * sizeof(int);
  // Above 48 KiB (E > ~1200) opt in to the larger carve-out; a per-function attribute, not a
  // stream operation, so it is fine under graph capture.
  auto opt_in = [&](auto kernel, size_t bytes) {
    if (bytes > kMaxDefaultSmem)
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  };

  auto run = [&](auto tag) {
    using I = decltype(tag);
    const I* id = a.topk_ids.as<const I>();
    if (chunks > 0 && E > 0) {
      opt_in(route_count_kernel<I>, E * sizeof(int));
      route_count_kernel<I><<<chunks, kRouteThreads, E * sizeof(int), stream>>>(id, n, e32, counts);
      check_launch("route (count)");
    }
    if (E > 0) {  // also for T = 0: writes tokens_per_expert = 0
      route_scan_kernel<<<ceil_div<int64_t>(E, 32), dim3(32, 32), 0, stream>>>(counts, chunks, e32, capacity,
                                                                               a.tokens_per_expert);
      check_launch("route (scan)");
    }
    opt_in(route_assign_kernel<I>, assign_smem);
    route_assign_kernel<I><<<std::max<int64_t>(chunks, 1), kRouteThreads, assign_smem, stream>>>(
        id, n, e32, capacity, align, counts, a.tokens_per_expert, a.row_id_map, a.expert_offsets);
    check_launch("route (assign)");
  };
  if (a.topk_ids.dtype == int(DType::kInt64)) run(int64_t{}); else run(int32_t{});
}

void permute(const permute_args& a) {
  const char* what = "permute";
  const int64_t elem_size = a.elem_size, T = a.T, H = a.H, k = a.k, E = a.E, num_rows = a.num_rows;
  const int64_t stride_x = a.x.stride;
  const void* x = a.x.data;
  void* out = a.out;
  check_arg(T >= 0 && H >= 0 && k >= 0 && E >= 0 && num_rows >= 0, what, "sizes must be >= 0");
  check_arg(elem_size >= 1, what, "elem_size must be >= 1");
  const int64_t row_bytes = H * elem_size;
  if (row_bytes == 0 || (T == 0 && num_rows == 0)) return;
  const int vb = vector_bytes({static_cast<int64_t>(reinterpret_cast<uintptr_t>(x)),
                               static_cast<int64_t>(reinterpret_cast<uintptr_t>(out)), row_bytes,
                               stride_x * elem_size});
  const int64_t units = row_bytes / vb;
  const dim3 block = row_block(units);
  const int64_t token_blocks = ceil_div<int64_t>(T, block.y);
  const int64_t blocks = grid_limit_check(token_blocks + ceil_div<int64_t>(num_rows, kZeroRows), what);
  const size_t smem = size_t(block.y) * k * sizeof(int64_t);
  check_smem(smem, what, "k slots");

  auto run = [&](auto tag) {
    using V = decltype(tag);
    permute_kernel<V><<<blocks, block, smem, a.stream>>>(
        static_cast<const V*>(x), stride_x * elem_size / vb, T, units, a.row_id_map, static_cast<int>(k),
        a.expert_offsets, a.tokens_per_expert, static_cast<int>(E), num_rows, static_cast<V*>(out), token_blocks);
  };
  switch (vb) {
    case 16: run(uint4{}); break;
    case 8: run(uint2{}); break;
    case 4: run(uint32_t{}); break;
    case 2: run(uint16_t{}); break;
    default: run(uint8_t{}); break;
  }
  check_launch(what);
}

namespace {
// Calls f(T{}) for the float dtype code; throws for anything else.
template <typename F>
void dispatch_float(int dtype, const char* what, const char* name, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default:
      throw std::invalid_argument(std::string("compass._cuda.") + what + ": " + name +
                                  " must be float32, float64, float16 or bfloat16, got " + dtype_name(dtype) +
                                  " (code " + std::to_string(dtype) + ")");
  }
}

inline void check_probs_dtype(const void* probs, int probs_dtype, const char* what) {
  if (probs == nullptr) return;
  dispatch_float(probs_dtype, what, "probs", [](auto) {});
}
}  // namespace

void unpermute(const unpermute_args& a) {
  const char* what = "unpermute";
  const int64_t num_rows = a.num_rows, H = a.H, T = a.T, k = a.k, stride_y = a.y.stride;
  const void* y = a.y.data;
  const void* probs = a.probs.data;
  const int probs_dtype = int(a.probs.dtype);
  void* out = a.out;
  check_arg(T >= 0 && H >= 0 && k >= 0 && num_rows >= 0, what, "sizes must be >= 0");
  check_probs_dtype(probs, probs_dtype, what);
  dispatch_float(int(a.y.dtype), what, "y", [&](auto tag) {
    using T_ = decltype(tag);
    using A = acc_t<T_>;
    if (T == 0 || H == 0) return;
    constexpr int kPack = 16 / sizeof(T_);
    const bool vec = aligned_to(y, 16) && aligned_to(out, 16) && H % kPack == 0 &&
                     (stride_y * int64_t(sizeof(T_))) % 16 == 0;
    const int64_t packs = vec ? H / kPack : H;
    const dim3 block = row_block(packs);
    const int64_t blocks = grid_limit_check(ceil_div<int64_t>(T, block.y), what);
    const size_t smem = size_t(block.y) * k * (sizeof(int64_t) + sizeof(A));
    check_smem(smem, what, "k slots");
    auto launch = [&](auto kernel) {
      kernel<<<blocks, block, smem, a.stream>>>(static_cast<const T_*>(y), stride_y, H, a.row_id_map, T,
                                                static_cast<int>(k), probs, probs_dtype, static_cast<T_*>(out));
      check_launch(what);
    };
    if (vec) launch(unpermute_kernel<T_, kPack>); else launch(unpermute_kernel<T_, 1>);
  });
}

void unpermute_bwd(const unpermute_bwd_args& a) {
  const char* what = "unpermute_bwd";
  const int64_t num_rows = a.num_rows, H = a.H, T = a.T, k = a.k, E = a.E;
  const int64_t stride_g = a.grad_out.stride, stride_y = a.y.stride;
  const void* grad_out = a.grad_out.data;
  const void* y = a.y.data;
  const void* probs = a.probs.data;
  const int probs_dtype = int(a.probs.dtype);
  void* grad_y = a.grad_y;
  void* grad_probs = a.grad_probs;
  check_arg(T >= 0 && H >= 0 && k >= 0 && E >= 0 && num_rows >= 0, what, "sizes must be >= 0");
  check_probs_dtype(probs, probs_dtype, what);
  check_arg(probs == nullptr || grad_probs != nullptr, what, "grad_probs is null while probs is given");
  check_arg(y == nullptr || a.y.dtype == a.grad_out.dtype, what, "y must have grad_out's dtype");
  dispatch_float(int(a.grad_out.dtype), what, "grad_out", [&](auto tag) {
    using T_ = decltype(tag);
    using A = acc_t<T_>;
    constexpr int kPack = 16 / sizeof(T_);
    // grad_probs must be written even for H = 0 (an empty dot is 0), so only T = 0 and
    // num_rows = 0 together mean there is nothing to do.
    const int64_t zero_tiles = H > 0 ? ceil_div<int64_t>(num_rows, kZeroRows) : 0;
    const bool vec = aligned_to(grad_out, 16) && aligned_to(grad_y, 16) && (y == nullptr || aligned_to(y, 16)) &&
                     H % kPack == 0 && (stride_g * int64_t(sizeof(T_))) % 16 == 0 &&
                     (stride_y * int64_t(sizeof(T_))) % 16 == 0;
    const int64_t packs = vec ? H / kPack : H;
    const dim3 block = row_block(packs);
    const bool token_work = T > 0 && (H > 0 || probs != nullptr);
    const int64_t token_blocks = token_work ? ceil_div<int64_t>(T, block.y) : 0;
    const int64_t blocks = grid_limit_check(token_blocks + zero_tiles, what);
    if (blocks == 0) return;
    const size_t smem = size_t(block.y) * k * (sizeof(int64_t) + sizeof(A)) + 2 * block.y * 4 * sizeof(A);
    check_smem(smem, what, "k slots");
    auto launch = [&](auto kernel) {
      kernel<<<blocks, block, smem, a.stream>>>(static_cast<const T_*>(grad_out), stride_g,
                                              static_cast<const T_*>(y), stride_y, H, a.row_id_map, T,
                                              static_cast<int>(k), a.expert_offsets, a.tokens_per_expert,
                                              static_cast<int>(E), num_rows, probs, probs_dtype,
                                              static_cast<T_*>(grad_y), grad_probs, token_blocks);
      check_launch(what);
    };
    if (vec) launch(unpermute_bwd_kernel<T_, kPack>); else launch(unpermute_bwd_kernel<T_, 1>);
  });
}

}  // namespace cuda
}  // namespace compass
