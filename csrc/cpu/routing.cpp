// CPU routing kernels: route (stable counting sort), permute (row scatter), unpermute (weighted
// gather-combine over top-k) and its backward. Contract: common/kernels.def.
// Data movement is bit-exact with the torch reference; sums run in slot order j = 0..k-1 with a
// separate multiply and add (-ffp-contract=off), so unpermute matches `acc = acc + w * y.float()`.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef COMPASS_OPENMP
#include <omp.h>
#endif

#include "common/check.h"
#include "common/dtype.h"
#include "common/kernel_args.h"
#include "cpu/float_tags.h"
#include "cpu/parallel.h"
#include "cpu/routing_avx512.h"
#include "cpu/streaming.h"

namespace compass::cpu {
namespace {

int max_threads() {
#ifdef COMPASS_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Below these sizes a parallel region (~5 us to wake 2 threads here) costs more than it saves.
constexpr int64_t kRouteParallelMin = 16384;      // assignments
constexpr int64_t kMoveParallelMin = 256 * 1024;  // bytes moved

// Hot loops are compiled for AVX-512 (BW: 16-bit lanes for bf16/fp16), AVX2 and baseline x86-64
// and picked at load time. -ffp-contract=off still holds in every clone (no FMA): a*b+c stays two
// roundings, as torch computes it. Numbers at unpermute.
// "arch=x86-64-v4" in target_clones needs GCC >= 12; elsewhere the baseline build is used.
#if defined(__x86_64__) && defined(__ELF__) && !defined(__clang__) && __GNUC__ >= 12
#define COMPASS_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define COMPASS_CLONES
#endif

// ---- dtype dispatch (tags: cpu/float_tags.h) ----------------------------------------------------
template <class Fn>
void dispatch_float(const char* name, int code, Fn&& fn) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: return fn(F32{});
    case DType::kFloat64: return fn(F64{});
    case DType::kFloat16: return fn(F16{});
    case DType::kBFloat16: return fn(BF16{});
    default: check_float_dtype(name, code);
  }
}

// Scalar probs / grad_probs access. Every float dtype widens to double exactly, so casting the
// double to the accumulator type equals torch's direct `probs.to(acc_dtype)`.
double read_scalar(const void* p, int code, int64_t i) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat64: return static_cast<const double*>(p)[i];
    case DType::kFloat16: return fp16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

// v is a float or double accumulator; half types go through float as c10's casts do.
void write_scalar(void* p, int code, int64_t i, double v) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: static_cast<float*>(p)[i] = float(v); return;
    case DType::kFloat64: static_cast<double*>(p)[i] = v; return;
    case DType::kFloat16: static_cast<uint16_t*>(p)[i] = f32_to_fp16(float(v)); return;
    default: static_cast<uint16_t*>(p)[i] = f32_to_bf16(float(v)); return;
  }
}

// ---- shared validation -------------------------------------------------------------------------
// Serial O(T*k): ~10 us for 16K slots, noise next to moving the rows, and it keeps every later
// memcpy in bounds.
void check_row_ids(const int64_t* rows, int64_t T, int64_t k, int64_t num_rows) {
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t r = rows[i];
    check(r >= -1 && r < num_rows, "row_id_map contains ", r, " at [", i / k, ", ", i % k,
          "]; expected values in [-1, num_rows) with num_rows = ", num_rows);
  }
}

void check_segments(const int64_t* offsets, const int64_t* tpe, int64_t E, int64_t num_rows) {
  check(offsets[0] >= 0, "expert_offsets[0] must be >= 0, got ", offsets[0]);
  for (int64_t e = 0; e < E; ++e) {
    check(offsets[e] <= offsets[e + 1], "expert_offsets must be non-decreasing, got ",
          "expert_offsets[", e, "] = ", offsets[e], " > expert_offsets[", e + 1,
          "] = ", offsets[e + 1]);
    check(tpe[e] >= 0, "tokens_per_expert[", e, "] must be >= 0, got ", tpe[e]);
  }
  check(offsets[E] <= num_rows, "expert_offsets[E] = ", offsets[E], " must be <= num_rows = ",
        num_rows);
}

// Zero the rows of a permuted buffer that no slot writes: each expert's padding
// [offsets[e] + tpe[e], offsets[e+1]) and the tail [offsets[E], num_rows). Ranges are cut into
// pieces of <= 256 KiB so a long tail (num_rows is a static bound) splits across threads.
void zero_unused_rows(char* out, int64_t row_bytes, const int64_t* offsets, const int64_t* tpe,
                      int64_t E, int64_t num_rows) {
  if (row_bytes == 0) return;
  const int64_t piece = std::max<int64_t>(1, (256 * 1024) / row_bytes);
  std::vector<std::pair<int64_t, int64_t>> pieces;  // [begin, end) rows
  auto add = [&](int64_t b, int64_t e) {
    for (; b < e; b += piece) pieces.emplace_back(b, std::min(e, b + piece));
  };
  for (int64_t e = 0; e < E; ++e) {
    add(std::min(offsets[e] + tpe[e], offsets[e + 1]), offsets[e + 1]);
  }
  add(offsets[E], num_rows);
  const int64_t n = static_cast<int64_t>(pieces.size());
  int64_t zero_bytes = 0;
  for (auto& p : pieces) zero_bytes += (p.second - p.first) * row_bytes;
#pragma omp parallel for schedule(dynamic, 1) if (zero_bytes >= kMoveParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const auto [begin, end] = pieces[i];
    std::memset(out + begin * row_bytes, 0, (end - begin) * row_bytes);
  }
}

// ---- streaming (non-temporal) row copies (cpu/streaming.h) ---------------------------------------
// permute, and unpermute's backward (grad_y), write each of their T*k rows once, and at MoE sizes
// the buffer is larger than the last-level cache, so they stream it. T=8192, H=2048 fp32 on this
// EPYC: permute 0.62-0.91 -> 0.70-1.0 of a copy of the same bytes with 16-byte stores, and
// E16k2 3.3-3.8 -> 2.5-2.8 ms with whole-line (AVX-512) ones; route + permute + unpermute forward
// and backward, E=16 k=2, 22.6-23.7 -> 20.9-22.7 ms. unpermute's sums and the backward's scaled
// rows stream from the AVX-512 registers: cpu/routing_avx512.h has their numbers.

// ---- route --------------------------------------------------------------------------------------
// Stable counting sort over the flattened [T*k] ids, in chunks: per-chunk histograms, an exclusive
// prefix over chunks per expert, then each chunk ranks its assignments in order. O(T*k + E*chunks),
// no sort. Chunks (not threads) own the histograms, so the result does not depend on how many
// threads OpenMP actually hands out.
template <class I>
void route_impl(const I* ids, int64_t T, int64_t k, int64_t E, int64_t capacity, int64_t align,
                int64_t* row_id_map, int64_t* tpe, int64_t* offsets) {
  const int64_t n = T * k;
  const int64_t nc = n < kRouteParallelMin ? 1 : std::max(1, max_threads());
  auto chunk_begin = [&](int64_t c) { return n * c / nc; };
  // [chunks, E] with rows at least a cache line apart: with neighbouring chunks' counters on one
  // line (false sharing) 131K assignments took 281 us on 2 threads vs 156 us serial; padded, 99 us.
  const int64_t ld = (E + 7) / 8 * 8 + 8;
  std::vector<int64_t> hist(nc * ld, 0);  // becomes each chunk's first rank per expert
  std::vector<int64_t> first_bad(nc, n);

#pragma omp parallel for schedule(static, 1) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    int64_t* h = hist.data() + c * ld;
    for (int64_t i = chunk_begin(c), end = chunk_begin(c + 1); i < end; ++i) {
      const int64_t v = ids[i];
      if (v >= 0 && v < E) {
        ++h[v];
      } else if (v != -1) {
        first_bad[c] = i;
        break;
      }
    }
  }
  const int64_t bad = *std::min_element(first_bad.begin(), first_bad.end());
  if (bad < n) {
    fail("topk_ids must hold values in [-1, num_experts) = [-1, ", E, "), found ", int64_t(ids[bad]), " at [",
         bad / k, ", ", bad % k, "]");
  }

  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t count = 0;
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t h = hist[c * ld + e];
      hist[c * ld + e] = count;
      count += h;
    }
    tpe[e] = capacity >= 0 ? std::min(count, capacity) : count;
    offsets[e + 1] = offsets[e] + (tpe[e] + align - 1) / align * align;
  }

#pragma omp parallel for schedule(static, 1) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    int64_t* next_rank = hist.data() + c * ld;
    for (int64_t i = chunk_begin(c), end = chunk_begin(c + 1); i < end; ++i) {
      const int64_t v = ids[i];
      if (v < 0) {
        row_id_map[i] = -1;
        continue;
      }
      const int64_t rank = next_rank[v]++;
      row_id_map[i] = (capacity < 0 || rank < capacity) ? offsets[v] + rank : -1;
    }
  }
}

// ---- unpermute ----------------------------------------------------------------------------------
// The k source rows of a token stream through one loop together (up to 4 at a time) and the sum
// goes straight to out: one pass keeps more cache misses in flight than k separate axpy passes.
// Single thread, T=8192 H=2048 k=2 fp32 on this EPYC (memcpy 39 GB/s): axpy passes through an L1
// accumulator 9-13 GB/s; fused 2-row loop 12 (SSE2) / 28 (AVX2) / 33 (AVX-512) GB/s, hence
// target_clones; the same loop cut into 512-element chunks 24 GB/s, hence whole rows when k <= 4.
// Per element the sum is still ((0 + w0*y0) + w1*y1) + ... in slot order: bit-identical to the
// reference.
constexpr int64_t kChunk = 2048;  // k > 4: H per pass, so the fp32 partial sum (8 KiB) stays in L1
constexpr int kGroup = 4;        // rows fused per pass

// a = (first ? 0 : acc) + w[0]*src[0] + ... + w[R-1]*src[R-1], then to out (last) or back to acc.
template <class Tag, int R, bool kFirst, bool kLast>
COMPASS_CLONES void combine_rows(const typename Tag::S* const* src, const typename Tag::Acc* w,
                                 int64_t n, typename Tag::Acc* acc, typename Tag::S* out) {
  using Acc = typename Tag::Acc;
  const typename Tag::S* p[R];
  Acc wr[R];
  for (int r = 0; r < R; ++r) p[r] = src[r], wr[r] = w[r];
  for (int64_t i = 0; i < n; ++i) {
    Acc a = kFirst ? Acc(0) : acc[i];
    for (int r = 0; r < R; ++r) a = a + wr[r] * Tag::load(p[r][i]);
    if (kLast) {
      out[i] = Tag::store(a);
    } else {
      acc[i] = a;
    }
  }
}

// kStream (with kLast): the sums leave through non-temporal stores (combine_rows_avx512; the caller
// checks AVX-512, the dtype and the alignment). The 16-bit types take the AVX-512 loop at every
// size where the CPU has it (cpu/routing_avx512.h).
template <class Tag, bool kFirst, bool kLast, bool kStream = false>
void combine_group(int r, const typename Tag::S* const* src, const typename Tag::Acc* w, int64_t n,
                   typename Tag::Acc* acc, typename Tag::S* out) {
#ifdef COMPASS_ROUTING_AVX512
  if constexpr (kStream ? kAvx512Tag<Tag> : kHalfTag<Tag>) {
    if (have_avx512()) {
      switch (r) {
        case 1: return combine_rows_avx512<Tag, 1, kFirst, kLast, kStream>(src, w, n, acc, out);
        case 2: return combine_rows_avx512<Tag, 2, kFirst, kLast, kStream>(src, w, n, acc, out);
        case 3: return combine_rows_avx512<Tag, 3, kFirst, kLast, kStream>(src, w, n, acc, out);
        default: return combine_rows_avx512<Tag, 4, kFirst, kLast, kStream>(src, w, n, acc, out);
      }
    }
  }
#endif
  switch (r) {
    case 1: return combine_rows<Tag, 1, kFirst, kLast>(src, w, n, acc, out);
    case 2: return combine_rows<Tag, 2, kFirst, kLast>(src, w, n, acc, out);
    case 3: return combine_rows<Tag, 3, kFirst, kLast>(src, w, n, acc, out);
    default: return combine_rows<Tag, 4, kFirst, kLast>(src, w, n, acc, out);
  }
}

// Tokens [t0, t1): one thread's share. stream (kAvx512Tag, AVX-512, out rows 64-byte aligned and
// past kStreamMinBytes in all): the final sums go to out with non-temporal stores.
template <class Tag>
void unpermute_tokens(const typename Tag::S* y, int64_t stride_y, int64_t H, const int64_t* rows,
                      int64_t k, const void* probs, int probs_dtype, typename Tag::S* out,
                      int64_t t0, int64_t t1, bool stream) {
  using S = typename Tag::S;
  using Acc = typename Tag::Acc;
  const size_t n_slots = size_t(std::max<int64_t>(k, 1));
  std::vector<const S*> src(n_slots);  // the token's routed rows and weights, in slot order
  std::vector<Acc> w(n_slots);
  Acc acc[kChunk];
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = rows[t * k + j];
      if (r < 0) continue;
      src[m] = y + r * stride_y;
      w[m] = probs ? Acc(read_scalar(probs, probs_dtype, t * k + j)) : Acc(1);
      ++m;
    }
    S* o = out + t * H;
    if (m == 0) {  // no routed slot: the empty sum
      std::fill(o, o + H, Tag::store(Acc(0)));
      continue;
    }
    if (m <= kGroup) {  // one pass over the whole row, no partial sums (the k = 2 case)
      if (stream) {
        combine_group<Tag, true, true, true>(int(m), src.data(), w.data(), H, acc, o);
      } else {
        combine_group<Tag, true, true>(int(m), src.data(), w.data(), H, acc, o);
      }
      continue;
    }
    const S* chunk_src[kGroup];
    for (int64_t h0 = 0; h0 < H; h0 += kChunk) {
      const int64_t n = std::min(kChunk, H - h0);
      for (int64_t g = 0; g < m; g += kGroup) {
        const int r = int(std::min<int64_t>(kGroup, m - g));
        for (int i = 0; i < r; ++i) chunk_src[i] = src[g + i] + h0;
        const bool first = g == 0, last = g + r == m;
        if (stream && last && n * int64_t(sizeof(S)) % 64 == 0) {
          if (first) combine_group<Tag, true, true, true>(r, chunk_src, &w[g], n, acc, o + h0);
          else combine_group<Tag, false, true, true>(r, chunk_src, &w[g], n, acc, o + h0);
        } else if (first && last) combine_group<Tag, true, true>(r, chunk_src, &w[g], n, acc, o + h0);
        else if (first) combine_group<Tag, true, false>(r, chunk_src, &w[g], n, acc, o + h0);
        else if (last) combine_group<Tag, false, true>(r, chunk_src, &w[g], n, acc, o + h0);
        else combine_group<Tag, false, false>(r, chunk_src, &w[g], n, acc, o + h0);
      }
    }
  }
}

// ---- unpermute backward -------------------------------------------------------------------------
// One pass over grad_out[t] for up to 4 routed slots at once: dst_r = w_r * g (rounded to S) and
// <g, y_r>; streaming the slots together keeps more misses in flight, as in unpermute. The dots
// keep 16 partial sums per slot in a GCC/Clang vector (one zmm, two ymm or four xmm): the
// strict-IEEE build cannot reassociate one running sum, and the auto-vectorized form of this loop
// kept the partial sums on the stack and re-checked aliasing every 16 elements (single thread,
// T=8192 H=2048 k=2: bf16 10 GB/s per-slot and auto-vectorized, 22 GB/s like this; memcpy 37).
template <class Acc>
struct Lanes {
  typedef Acc type __attribute__((vector_size(16 * sizeof(Acc))));
};

// Blocks of 16 go through a local array: the conversion loops vectorize, and no aliasing check
// between dst and g / y is needed. V by reference: a 64-byte vector by value changes the ABI.
template <class Tag, class V>
inline void load_lanes(const typename Tag::S* p, V& v) {
  typename Tag::Acc tmp[16];
  for (int l = 0; l < 16; ++l) tmp[l] = Tag::load(p[l]);
  std::memcpy(&v, tmp, sizeof(v));
}
// kStream: p is 16-byte aligned and the 16 values leave with non-temporal stores (see
// stream_bytes); sizeof(S) * 16 is a multiple of 16 bytes for every S.
template <class Tag, bool kStream, class V>
inline void store_lanes(typename Tag::S* p, const V& v) {
  typename Tag::Acc tmp[16];
  std::memcpy(tmp, &v, sizeof(v));
  if constexpr (kStream) {
    typename Tag::S out[16];
    for (int l = 0; l < 16; ++l) out[l] = Tag::store(tmp[l]);
    stream_bytes(reinterpret_cast<char*>(p), reinterpret_cast<const char*>(out), int64_t(sizeof(out)));
  } else {
    for (int l = 0; l < 16; ++l) p[l] = Tag::store(tmp[l]);
  }
}

template <class Tag, int R, bool kStream>
COMPASS_CLONES void scale_and_dot(const typename Tag::S* g, const typename Tag::S* const* y,
                                  const typename Tag::Acc* w, typename Tag::S* const* dst,
                                  int64_t H, typename Tag::Acc* dots) {
  using S = typename Tag::S;
  using Acc = typename Tag::Acc;
  using V = typename Lanes<Acc>::type;
  constexpr int64_t L = 16;
  const S* yr[R];
  S* dr[R];
  V wr[R], part[R];
  for (int r = 0; r < R; ++r) {
    yr[r] = y[r], dr[r] = dst[r], part[r] = V{};
    for (int l = 0; l < L; ++l) wr[r][l] = w[r];
  }
  int64_t i = 0;
  for (; i + L <= H; i += L) {
    V gv, yv;
    load_lanes<Tag>(g + i, gv);
    for (int r = 0; r < R; ++r) {
      load_lanes<Tag>(yr[r] + i, yv);
      part[r] = part[r] + gv * yv;
      store_lanes<Tag, kStream>(dr[r] + i, V(wr[r] * gv));
    }
  }
  Acc tail[R] = {};
  for (; i < H; ++i) {
    const Acc gv = Tag::load(g[i]);
    for (int r = 0; r < R; ++r) {
      dr[r][i] = Tag::store(w[r] * gv);
      tail[r] = tail[r] + gv * Tag::load(yr[r][i]);
    }
  }
  for (int r = 0; r < R; ++r) {
    Acc p[L];
    std::memcpy(p, &part[r], sizeof(p));
    dots[r] = pairwise_lane_sum(p, tail[r]);
  }
}

// kStream: dst rows leave through non-temporal stores. With AVX-512 the fp32 / 16-bit streamed
// rows and every 16-bit row take scale_and_dot_avx512 (cpu/routing_avx512.h); the generic loop
// streams only whole lines (fp32, fp64), since 16 buffered 16-bit values are half a line and
// streamed half-lines made the fp16 backward 3-4x slower than ordinary stores (the caller checks).
template <class Tag, bool kStream>
void scale_and_dot_n(int r, const typename Tag::S* g, const typename Tag::S* const* y, const typename Tag::Acc* w,
                     typename Tag::S* const* dst, int64_t H, typename Tag::Acc* dots) {
#ifdef COMPASS_ROUTING_AVX512
  if constexpr (kStream ? kAvx512Tag<Tag> : kHalfTag<Tag>) {
    if (have_avx512()) {
      switch (r) {
        case 1: return scale_and_dot_avx512<Tag, 1, kStream>(g, y, w, dst, H, dots);
        case 2: return scale_and_dot_avx512<Tag, 2, kStream>(g, y, w, dst, H, dots);
        case 3: return scale_and_dot_avx512<Tag, 3, kStream>(g, y, w, dst, H, dots);
        default: return scale_and_dot_avx512<Tag, 4, kStream>(g, y, w, dst, H, dots);
      }
    }
  }
#endif
  switch (r) {
    case 1: return scale_and_dot<Tag, 1, kStream>(g, y, w, dst, H, dots);
    case 2: return scale_and_dot<Tag, 2, kStream>(g, y, w, dst, H, dots);
    case 3: return scale_and_dot<Tag, 3, kStream>(g, y, w, dst, H, dots);
    default: return scale_and_dot<Tag, 4, kStream>(g, y, w, dst, H, dots);
  }
}

template <class Tag>
void unpermute_bwd_tokens(const typename Tag::S* g, int64_t stride_g, const typename Tag::S* y,
                          int64_t stride_y, int64_t H, const int64_t* rows, int64_t k,
                          const void* probs, int probs_dtype, typename Tag::S* grad_y,
                          void* grad_probs, int64_t t0, int64_t t1, bool stream) {
  using S = typename Tag::S;
  using Acc = typename Tag::Acc;
  const size_t n = size_t(std::max<int64_t>(k, 1));
  std::vector<const S*> src(n);  // the token's routed slots: y rows, grad_y rows, weights, slots
  std::vector<S*> dst(n);
  std::vector<Acc> w(n), dots(n);
  std::vector<int64_t> slot(n);
  // Rows scaled by w stream where scale_and_dot_n can stream them: see there.
  const bool stream_rows = stream && ((kAvx512Tag<Tag> && have_avx512()) || sizeof(S) * 16 % 64 == 0);
  for (int64_t t = t0; t < t1; ++t) {
    const S* g_t = g + t * stride_g;
    int64_t m = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = rows[t * k + j];
      if (row < 0) {
        if (probs) write_scalar(grad_probs, probs_dtype, t * k + j, 0.0);
      } else if (!probs) {
        if (stream) {
          stream_bytes(reinterpret_cast<char*>(grad_y + row * H), reinterpret_cast<const char*>(g_t),
                             H * int64_t(sizeof(S)));
        } else {
          std::memcpy(grad_y + row * H, g_t, H * sizeof(S));
        }
      } else {
        src[m] = y + row * stride_y;
        dst[m] = grad_y + row * H;
        w[m] = Acc(read_scalar(probs, probs_dtype, t * k + j));
        slot[m++] = j;
      }
    }
    for (int64_t b = 0; b < m; b += kGroup) {
      const int64_t r = std::min<int64_t>(kGroup, m - b);
      if (stream_rows) {
        scale_and_dot_n<Tag, true>(int(r), g_t, &src[b], &w[b], &dst[b], H, &dots[b]);
      } else {
        scale_and_dot_n<Tag, false>(int(r), g_t, &src[b], &w[b], &dst[b], H, &dots[b]);
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      write_scalar(grad_probs, probs_dtype, t * k + slot[i], double(dots[i]));
    }
  }
  if (stream) streaming_fence();
}

}  // namespace

// ---- entry points (arguments: common/kernels.def) ------------------------------------------------

namespace {
// The routing plan's buffers every kernel after route reads: row_id_map [T, k] with rows in
// [-1, num_rows), and (with E >= 0) expert_offsets [E + 1] / tokens_per_expert [E] segments inside
// [0, num_rows).
// The arguments unpermute and its backward share: float dtypes for the rows and the weights, sizes.
void check_combine(int dtype, const void* probs, int probs_dtype, int64_t num_rows, int64_t H, int64_t T, int64_t k) {
  check_float_dtype("dtype", dtype);
  if (probs) check_float_dtype("probs_dtype", probs_dtype);
  check_nonneg("num_rows", num_rows);
  check_nonneg("H", H);
  check_nonneg("T", T);
  check_nonneg("k", k);
}

void check_plan(const int64_t* rows, int64_t T, int64_t k, int64_t num_rows, const int64_t* offsets,
                const int64_t* tpe, int64_t E) {
  check_ptr("row_id_map", rows, T * k);
  if (E >= 0) {
    check_ptr("expert_offsets", offsets, E + 1);
    check_ptr("tokens_per_expert", tpe, E);
  }
  check_row_ids(rows, T, k, num_rows);
  if (E >= 0) check_segments(offsets, tpe, E, num_rows);
}
}  // namespace

void route(const route_args& a) {
  check_nonneg("T", a.T);
  check_nonneg("k", a.k);
  check_positive("E", a.E);
  check_positive("align", a.align);
  check(a.topk_ids.dtype == int(DType::kInt64) || a.topk_ids.dtype == int(DType::kInt32),
        "topk_ids must be int32 or int64, got code ", a.topk_ids.dtype, " (", dtype_name(a.topk_ids.dtype), ")");
  check_ptr("topk_ids", a.topk_ids.data, a.T * a.k);
  check_ptr("row_id_map", a.row_id_map, a.T * a.k);
  check_ptr("tokens_per_expert", a.tokens_per_expert, a.E);
  check_ptr("expert_offsets", a.expert_offsets, a.E + 1);
  auto run = [&](const auto* ids) {
    route_impl(ids, a.T, a.k, a.E, a.capacity, a.align, a.row_id_map, a.tokens_per_expert, a.expert_offsets);
  };
  if (a.topk_ids.dtype == int(DType::kInt64)) {
    run(a.topk_ids.as<const int64_t>());
  } else {
    run(a.topk_ids.as<const int32_t>());
  }
}

void permute(const permute_args& a) {
  const int64_t T = a.T, H = a.H, k = a.k, num_rows = a.num_rows, elem_size = a.elem_size;
  check_positive("elem_size", elem_size);
  check_nonneg("T", T);
  check_nonneg("H", H);
  check_nonneg("k", k);
  check_positive("E", a.E);
  check_nonneg("num_rows", num_rows);
  check_row_stride("stride_x", a.x.stride, H);
  check_ptr("x", a.x.data, T * H);
  check_ptr("out", a.out, num_rows * H);
  const int64_t* rows = a.row_id_map;
  check_plan(rows, T, k, num_rows, a.expert_offsets, a.tokens_per_expert, a.E);

  const int64_t row_bytes = H * elem_size;  // int64 throughout: rows * row_bytes passes 2^31
  if (row_bytes == 0) return;
  const char* src = a.x.as<const char>();
  char* dst = static_cast<char*>(a.out);
  const int64_t stride_bytes = a.x.stride * elem_size;
  const bool stream = use_streaming_stores(dst, row_bytes, T * k * row_bytes);
#pragma omp parallel if (T * k * row_bytes >= kMoveParallelMin)
  {
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < T; ++t) {
      const char* x_t = src + t * stride_bytes;  // read once, written to up to k rows
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = rows[t * k + j];
        if (r < 0) continue;
        if (stream) {
          stream_bytes(dst + r * row_bytes, x_t, row_bytes);
        } else {
          std::memcpy(dst + r * row_bytes, x_t, row_bytes);
        }
      }
    }
    if (stream) streaming_fence();
  }
  zero_unused_rows(dst, row_bytes, a.expert_offsets, a.tokens_per_expert, a.E, num_rows);
}

void unpermute(const unpermute_args& a) {
  check_combine(int(a.y.dtype), a.probs.data, int(a.probs.dtype), a.num_rows, a.H, a.T, a.k);
  const int64_t T = a.T, H = a.H, k = a.k, num_rows = a.num_rows;
  check_row_stride("stride_y", a.y.stride, H);
  check_ptr("y", a.y.data, num_rows * H);
  check_ptr("out", a.out, T * H);
  const int64_t* rows = a.row_id_map;
  check_plan(rows, T, k, num_rows, nullptr, nullptr, -1);
  if (H == 0) return;
  dispatch_float("dtype", int(a.y.dtype), [&](auto tag) {
    using Tag = decltype(tag);
    using S = typename Tag::S;
    const int64_t bytes = T * (k + 1) * H * int64_t(sizeof(S));
    const int64_t row_bytes = H * int64_t(sizeof(S));
    const bool stream = kAvx512Tag<Tag> && have_avx512() && use_streaming_stores(a.out, row_bytes, T * row_bytes);
    parallel_ranges(T, bytes >= kMoveParallelMin, [&](int64_t t0, int64_t t1) {
      unpermute_tokens<Tag>(a.y.as<const S>(), a.y.stride, H, rows, k, a.probs.data, int(a.probs.dtype),
                            static_cast<S*>(a.out), t0, t1, stream);
      if (stream) streaming_fence();
    });
  });
}

void unpermute_bwd(const unpermute_bwd_args& a) {
  const int64_t T = a.T, H = a.H, k = a.k, num_rows = a.num_rows;
  const int dtype = int(a.grad_out.dtype);
  const void* p = a.probs.data;
  const int probs_dtype = int(a.probs.dtype);
  check_combine(dtype, p, probs_dtype, num_rows, H, T, k);
  check_positive("E", a.E);
  check_row_stride("stride_g", a.grad_out.stride, H);
  check_ptr("grad_out", a.grad_out.data, T * H);
  check_ptr("grad_y", a.grad_y, num_rows * H);
  if (p) {
    check(a.y.dtype == dtype, "y must have grad_out's dtype ", dtype_name(dtype), ", got ", dtype_name(a.y.dtype));
    check_row_stride("stride_y", a.y.stride, H);
    check_ptr("y", a.y.data, num_rows * H);
    check_ptr("grad_probs", a.grad_probs, T * k);
  }
  const int64_t* rows = a.row_id_map;
  check_plan(rows, T, k, num_rows, a.expert_offsets, a.tokens_per_expert, a.E);

  void* gp = a.grad_probs;
  if (H == 0) {  // no rows to move; the dot products are empty sums
    if (p) for (int64_t i = 0; i < T * k; ++i) write_scalar(gp, probs_dtype, i, 0.0);
    return;
  }
  dispatch_float("dtype", dtype, [&](auto tag) {
    using Tag = decltype(tag);
    using S = typename Tag::S;
    const int64_t bytes = T * k * H * int64_t(sizeof(S)) * (p ? 3 : 2);
    const int64_t row_bytes = H * int64_t(sizeof(S));
    const bool stream = use_streaming_stores(a.grad_y, row_bytes, T * k * row_bytes);
    parallel_ranges(T, bytes >= kMoveParallelMin, [&](int64_t t0, int64_t t1) {
      unpermute_bwd_tokens<Tag>(a.grad_out.as<const S>(), a.grad_out.stride, a.y.as<const S>(), a.y.stride, H,
                                rows, k, p, probs_dtype, static_cast<S*>(a.grad_y), gp, t0, t1, stream);
    });
    zero_unused_rows(static_cast<char*>(a.grad_y), row_bytes, a.expert_offsets, a.tokens_per_expert, a.E,
                     num_rows);
  });
}

}  // namespace compass::cpu
