// CPU FP8 quantization: x [B, M, K] (fp32 / bf16 / fp16, unit stride along K) -> codes [B, M, K]
// (e4m3fn or e5m2, contiguous) and fp32 scales, with
//   scale = max(amax, 1e-12) / fmax,   code = cast(clamp(x / scale, -fmax, fmax))
// per tensor [B], per row [B, M], per 1 x bs block [B, M, ceil(K/bs)] or per bs x bs tile
// [B, ceil(M/bs), ceil(K/bs)]. Semantics and bit-exactness: compass_kernels/fp8_ref.py.
//
// Fusion: a row (or a 1 x bs block, or a bs x bs tile) is reduced and cast while it is in cache,
// so memory sees one read of x and one write of the codes; "tensor" needs the global amax first
// and reads x twice. amax runs on the integer bits of |x| (sign bit cleared): for IEEE formats the
// unsigned order of those bits is the order of |x|, with every NaN above inf, so a plain unsigned
// max vectorises and still lets NaN through (a float max with `a > m ? a : m` would drop it).
// x / scale is a true division, as torch computes it (a multiply by 1/scale differs in the last
// bit; the FMA-corrected reciprocal that would be exact measured slower than vdivps here); the
// cast saturates, which is the clamp (f32_to_fp8 maps |v| >= fmax and inf to fmax). Blocks with a
// finite amax cannot saturate and take the shorter f32_to_fp8_in_range (common/fp8.h).
//
// With AVX-512 (fp8_avx512.h) the row and block granularities run a pipeline instead of two
// passes per row: the loop that casts row r also reduces the block amaxes of row r + 1 and
// prefetches row r + 2, so x streams from memory once while the casts run
// (quantize_rows_pipelined). Single thread, rows in cache: bf16 ~125 -> ~90-100 ps per element,
// fp32 ~130 -> ~95 against the two-pass form below, which other CPUs and the tensor / block2d
// granularities keep.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"
#include "common/fp8.h"
#include "common/kernel_args.h"
#include "common/half.h"
#include "cpu/fp8_avx512.h"
#include "cpu/fp8_inputs.h"
#include "cpu/parallel.h"
#include "cpu/streaming.h"

namespace compass::cpu {
namespace {

using fp8::amax_bits;
using fp8::scale_from_amax;
using fp8::InBF16;
using fp8::InF16;
using fp8::InF32;
#ifdef COMPASS_AVX512_CAST
using fp8::cast_in_range_avx512;
using fp8::kHaveAvx512;
#endif

// The same three clones as routing.cpp: AVX-512 (BW for 16-bit lanes), AVX2, baseline x86-64.
#if defined(__x86_64__) && defined(__ELF__) && !defined(__clang__) && __GNUC__ >= 12
#define COMPASS_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define COMPASS_CLONES
#endif

// Below this many input bytes a parallel region (~5-10 us to wake 2 threads) costs more than it saves.
constexpr int64_t kParallelMinBytes = 256 * 1024;

enum Granularity : int { kTensor = 0, kRow = 1, kBlock = 2, kBlock2d = 3 };

// fn(std::true_type) when the codes stream past the cache (cpu/streaming.h: an output larger than
// the last-level cache, rows on 64-byte lines), else fn(std::false_type).
template <class Fn>
void with_stream(bool stream, Fn&& fn) {
  if (stream) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}


// out = fp8(x / scale). A finite scale means a finite amax, so no |x / scale| can be NaN or pass
// fmax (1 + 2^-23): the in-range cast (~25% fewer operations) gives the same codes. A block with
// inf or NaN takes the general cast, which saturates and keeps NaN. kStream: see cast64.
template <class In, class F, bool kStream = false>
inline void cast_run(const typename In::S* __restrict p, int64_t n, float scale, uint8_t* __restrict out) {
#ifdef COMPASS_AVX512_CAST
  if (kHaveAvx512 && n >= 64 && std::isfinite(scale)) return cast_in_range_avx512<In, F, kStream>(p, n, scale, out);
#endif
  if (std::isfinite(scale)) {
    for (int64_t i = 0; i < n; ++i) out[i] = f32_to_fp8_in_range<F>(In::load(p[i]) / scale);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = f32_to_fp8<F>(In::load(p[i]) / scale);
  }
}

// ---- kernels (one call per row or per tile; the clone is picked once per call) ----------------

// Cast p[0, n) with one scale, span by span, prefetching the same span of the next row (`next`,
// or null): the cast is compute-bound (~9 Gelem/s per thread) and would leave memory idle.
template <class In, class F, bool kStream = false>
inline void cast_prefetching(const typename In::S* p, int64_t n, float scale, uint8_t* out,
                             const typename In::S* next) {
  constexpr int64_t kSpan = 256;  // elements per prefetch batch (16 lines of fp32)
  for (int64_t k = 0; k < n; k += kSpan) {
    const int64_t m = std::min(kSpan, n - k);
    if (next) {
      const char* q = reinterpret_cast<const char*>(next + k);
      for (int64_t b = 0; b < m * int64_t(sizeof(typename In::S)); b += 64) __builtin_prefetch(q + b, 0, 3);
    }
    cast_run<In, F, kStream>(p + k, m, scale, out + k);
  }
}

// One row of K >= 1 elements in blocks of bs (bs >= K: one block, the "row" granularity): all the
// block scales first, then the casts, while the row is in L1/L2 (16 KiB for K = 4096 fp32). Two
// phases rather than amax-then-cast per block: no block's cast waits on its own reduction and
// scale division, which made 1 x 128 blocks ~30% slower than whole rows here (4.4 vs 6.5
// Gelem/s per thread, fp32, cached). The casts prefetch the next row: single thread, [8192, 4096]
// fp32 per row 7.5 -> 5.5 ms (a copy of the same bytes: 2.8 ms).
template <class In, class F>
COMPASS_CLONES void quantize_row(const typename In::S* p, int64_t K, int64_t bs, uint8_t* out,
                                 float* scale, const typename In::S* next) {
  const int64_t nkb = (K + bs - 1) / bs;
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t k0 = kb * bs;
    scale[kb] = scale_from_amax(In::load(amax_bits<In>(p + k0, std::min(bs, K - k0))), F::kMax);
  }
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t k0 = kb * bs;
    cast_prefetching<In, F>(p + k0, std::min(bs, K - k0), scale[kb], out + k0, next ? next + k0 : nullptr);
  }
}

template <class In>
COMPASS_CLONES typename In::S row_amax(const typename In::S* p, int64_t n) {
  return amax_bits<In>(p, n);
}

template <class In, class F, bool kStream>
COMPASS_CLONES void cast_row(const typename In::S* p, int64_t n, float scale, uint8_t* out,
                             const typename In::S* next) {
  cast_prefetching<In, F, kStream>(p, n, scale, out, next);
}

// One bs x bs tile: rows [m0, m1), columns [k0, k1).
template <class In, class F>
COMPASS_CLONES void quantize_tile(const typename In::S* p, int64_t stride_m, int64_t m0, int64_t m1,
                                  int64_t k0, int64_t k1, int64_t K, uint8_t* out, float* scale) {
  using S = typename In::S;
  S m = 0;
  for (int64_t r = m0; r < m1; ++r) {
    const S a = amax_bits<In>(p + r * stride_m + k0, k1 - k0);
    m = a > m ? a : m;
  }
  const float s = scale_from_amax(In::load(m), F::kMax);
  *scale = s;
  for (int64_t r = m0; r < m1; ++r) cast_run<In, F>(p + r * stride_m + k0, k1 - k0, s, out + r * K + k0);
}

#ifdef COMPASS_AVX512_CAST
// Rows [r0, r1) of the row / block granularities (step = K or the block size), pipelined: the
// casts of row r also take the block amaxes of row r + 1 (fp8::quantize_row_fused), so each row
// is read from memory once, overlapped with the previous row's arithmetic. The first row's
// amaxes come from a separate pass.
template <class In, class F, bool kStream, class RowPtr>
void quantize_rows_pipelined(RowPtr row_ptr, int64_t r0, int64_t r1, int64_t K, int64_t step, uint8_t* data,
                             float* scale) {
  using S = typename In::S;
  const int64_t nkb = (K + step - 1) / step;
  std::vector<S> cur(nkb), nxt(nkb);
  const S* p = row_ptr(r0);
  for (int64_t kb = 0; kb < nkb; ++kb) cur[kb] = row_amax<In>(p + kb * step, std::min(step, K - kb * step));
  for (int64_t r = r0; r < r1; ++r) {
    const S* next = r + 1 < r1 ? row_ptr(r + 1) : nullptr;
    const S* ahead = r + 2 < r1 ? row_ptr(r + 2) : nullptr;
    fp8::quantize_row_fused<In, F, kStream>(p, next, ahead, K, step, cur.data(), nxt.data(), scale + r * nkb, data + r * K);
    std::swap(cur, nxt);
    p = next;
  }
}
#endif

template <class In, class F>
void quantize_impl(const typename In::S* x, int64_t B, int64_t M, int64_t K, int64_t stride_b,
                   int64_t stride_m, int gran, int64_t bs, uint8_t* data, float* scale) {
  using S = typename In::S;
  const int64_t rows = B * M;
  const bool par = rows * K * int64_t(sizeof(S)) >= kParallelMinBytes;
  auto row_ptr = [&](int64_t r) { return x + (r / M) * stride_b + (r % M) * stride_m; };  // M >= 1 when rows > 0

  if (gran == kRow && K == 0) {  // the amax of nothing is 0
    std::fill(scale, scale + rows, scale_from_amax(0.0f, F::kMax));
    return;
  }
  if (gran == kRow || gran == kBlock) {
    const int64_t nkb = gran == kRow ? 1 : (K + bs - 1) / bs;
    const int64_t step = gran == kRow ? K : bs;
#ifdef COMPASS_AVX512_CAST
    if (kHaveAvx512) {  // each thread a contiguous range of rows, pipelined
      const bool stream = use_streaming_stores(data, K, rows * K) && step % 64 == 0;
      with_stream(stream, [&](auto kStream) {
        parallel_ranges(rows, par, [&](int64_t r0, int64_t r1) {
          if (r0 < r1) quantize_rows_pipelined<In, F, kStream()>(row_ptr, r0, r1, K, step, data, scale);
          if (kStream()) streaming_fence();
        });
      });
      return;
    }
#endif
#pragma omp parallel for schedule(static) if (par)
    for (int64_t r = 0; r < rows; ++r) {
      const S* next = r + 1 < rows ? row_ptr(r + 1) : nullptr;
      quantize_row<In, F>(row_ptr(r), K, step, data + r * K, scale + r * nkb, next);
    }
    return;
  }

  if (gran == kBlock2d) {
    const int64_t nmb = (M + bs - 1) / bs, nkb = (K + bs - 1) / bs;
    const int64_t tiles = B * nmb * nkb;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t b = t / (nmb * nkb), mb = (t / nkb) % nmb, kb = t % nkb;
      const int64_t m0 = mb * bs, k0 = kb * bs;
      quantize_tile<In, F>(x + b * stride_b, stride_m, m0, std::min(M, m0 + bs), k0, std::min(K, k0 + bs),
                           K, data + b * M * K, scale + t);
    }
    return;
  }

  // kTensor: the amax of each thread's rows, the max per matrix, then the casts (two reads of x).
  // Each thread casts its rows backwards, so it starts on the rows it reduced last, which are
  // still in the last-level cache (32 MiB here: up to half of a [8192, 4096] bf16 x).
  std::vector<S> row_max(rows);
  parallel_ranges(rows, par, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_max[r] = row_amax<In>(row_ptr(r), K);
  });
  std::vector<float> s(B);
  for (int64_t b = 0; b < B; ++b) {
    S m = 0;
    for (int64_t i = b * M; i < (b + 1) * M; ++i) m = row_max[i] > m ? row_max[i] : m;
    s[b] = scale_from_amax(In::load(m), F::kMax);
    scale[b] = s[b];
  }
  with_stream(use_streaming_stores(data, K, rows * K), [&](auto kStream) {
    parallel_ranges(rows, par, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        cast_row<In, F, kStream()>(row_ptr(r), K, s[r / M], data + r * K, r + 1 < r1 ? row_ptr(r + 1) : nullptr);
      }
      if (kStream()) streaming_fence();
    });
  });
}

template <class In>
void dispatch_out(int out_dtype, const void* x, int64_t B, int64_t M, int64_t K, int64_t sb, int64_t sm,
                  int gran, int64_t bs, uint8_t* data, float* scale) {
  const auto* xs = static_cast<const typename In::S*>(x);
  if (out_dtype == int(DType::kFloat8E4M3)) {
    quantize_impl<In, Fp8E4M3>(xs, B, M, K, sb, sm, gran, bs, data, scale);
  } else {
    quantize_impl<In, Fp8E5M2>(xs, B, M, K, sb, sm, gran, bs, data, scale);
  }
}

}  // namespace

void quantize_fp8(const quantize_fp8_args& a) {
  const int dtype = int(a.x.dtype), out_dtype = int(a.data.dtype), granularity = int(a.granularity);
  const int64_t B = a.B, M = a.M, K = a.K, stride_b = a.stride_b, stride_m = a.x.stride, block_size = a.block_size;
  check(dtype == int(DType::kFloat32) || dtype == int(DType::kBFloat16) || dtype == int(DType::kFloat16),
        "x must be float32, bfloat16 or float16, got code ", dtype, " (", dtype_name(dtype), ")");
  check(out_dtype == int(DType::kFloat8E4M3) || out_dtype == int(DType::kFloat8E5M2),
        "out_dtype must be float8_e4m3fn or float8_e5m2, got code ", out_dtype, " (", dtype_name(out_dtype), ")");
  check(a.granularity >= kTensor && a.granularity <= kBlock2d,
        "granularity must be 0 (tensor), 1 (row), 2 (block) or 3 (block2d), got ", a.granularity);
  check_nonneg("B", B);
  check_nonneg("M", M);
  check_nonneg("K", K);
  check_positive("block_size", block_size);
  if (M > 1) check_row_stride("stride_m", stride_m, K);
  if (B > 1 && M * K > 0) {
    check(stride_b >= (M - 1) * stride_m + K, "stride_b must be >= (M - 1) * stride_m + K = ",
          (M - 1) * stride_m + K, ", got ", stride_b);
  }
  const int64_t n = B * M * K;
  const int64_t nmb = (M + block_size - 1) / block_size, nkb = (K + block_size - 1) / block_size;
  const int64_t n_scale = granularity == kTensor ? B
                          : granularity == kRow  ? B * M
                          : granularity == kBlock ? B * M * nkb
                                                  : B * nmb * nkb;
  check_ptr("x", a.x.data, n);
  check_ptr("data", a.data.data, n);
  check_ptr("scale", a.scale, n_scale);
  if (B == 0 || (M == 0 && granularity != kTensor)) return;
  auto* d = a.data.as<uint8_t>();
  float* s = a.scale;
  auto run = [&](auto in) {
    dispatch_out<decltype(in)>(out_dtype, a.x.data, B, M, K, stride_b, stride_m, granularity, block_size, d, s);
  };
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: return run(InF32{});
    case DType::kBFloat16: return run(InBF16{});
    default: return run(InF16{});
  }
}

}  // namespace compass::cpu
