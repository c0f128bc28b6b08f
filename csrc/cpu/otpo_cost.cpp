// The OTPO cost of one preference pair: centring, squared norms and the distance GEMM p q^T fused
// in one pass per pair, with the cost (sqrt, + 1e-6, running max) written from each block of the
// product while it is in L1. Semantics: otpo_cost.h and compass_kernels/ot_ref.py (otpo_cost_ref).
//
// Why not BLAS: the torch GEMM here is MKL, which takes its AVX2 path on this AMD CPU and reached
// ~107 GFLOP/s per core on [192 x 256] x [256 x 192] (half the AVX-512 FMA peak); the GEMM was half
// of an OTPO call at B = 16, L = 192, D = 256. The register tile below is the classic one: rows of p
// broadcast, q transposed so that 16 (fp32) columns sit in one AVX-512 register, 6 rows x 4 registers
// of accumulators (24 of 32 registers), one FMA per accumulator per element of D.
//
// The tile is written with GCC vector types, so each target_clones clone gets its own instruction
// set (AVX-512: one register per vector; AVX2: two; baseline: four), and the tile shape is picked
// at run time so that the accumulators stay in registers (6 x 4 vectors with 32 registers, 6 x 1
// with 16). This file is built with -ffp-contract=fast (CMakeLists.txt) so that `acc += a * b`
// is one FMA: its sums differ from MKL's in rounding only.
#include "cpu/otpo_cost.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/cpu_features.h"

namespace compass::cpu {
namespace {

#if defined(__x86_64__) && defined(__ELF__) && !defined(__clang__) && __GNUC__ >= 12
#define COMPASS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
inline bool wide_registers() { return have_avx512(); }
#else
#define COMPASS_CLONES
inline bool wide_registers() { return false; }
#endif

constexpr int64_t kVecBytes = 64;
constexpr int kTileRows = 6;  // rows of p per register tile
template <class T>
constexpr int64_t kLanes = kVecBytes / sizeof(T);  // 16 floats, 8 doubles
template <class T>
struct VecOf;  // GCC ignores vector_size on a dependent type: one specialisation per element type
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};
template <class T>
using Vec = typename VecOf<T>::type;

// G[r, 0 : NV lanes) = sum_d P[r, d] * QT[d, 0 : NV lanes) for r < R: R x NV accumulators.
template <int R, int NV, class T>
[[gnu::always_inline]] inline void tile(const T* P, int64_t D, const T* QT, int64_t ldq, T* G) {
  constexpr int64_t W = kLanes<T>;
  Vec<T> acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec<T>{};
  for (int64_t d = 0; d < D; ++d) {
    Vec<T> b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], QT + d * ldq + v * W, sizeof(Vec<T>));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T a = P[r * D + d];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(G + r * ldq + v * W, &acc[r][v], sizeof(Vec<T>));
}

// G [R, ldq] = P [R, D] QT [D, ldq] (ldq a multiple of the lanes): NV-register column blocks, then
// single registers for the rest.
template <int R, int NV, class T>
[[gnu::always_inline]] inline void row_block(const T* P, int64_t D, const T* QT, int64_t ldq, T* G) {
  constexpr int64_t W = kLanes<T>;
  int64_t j = 0;
  for (; j + NV * W <= ldq; j += NV * W) tile<R, NV>(P, D, QT + j, ldq, G + j);
  for (; j < ldq; j += W) tile<R, 1>(P, D, QT + j, ldq, G + j);
}

// C[j] = sqrt(max(ni + nq[j] - 2 G[j], 0)) + 1e-6 (the identity can come out slightly < 0); max C.
template <class T>
[[gnu::always_inline]] inline T cost_row(T* C, const T* G, T ni, const T* nq, int64_t m) {
  T mx = T(0);
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < m; ++j) {
    const T d2 = (ni + nq[j]) + T(-2) * G[j];
    const T c = std::sqrt(d2 > T(0) ? d2 : T(0)) + T(1e-6);
    C[j] = c;
    mx = mx > c ? mx : c;
  }
  return mx;
}

// out = h - mu (double arithmetic, rounded once); returns ||out||^2.
template <class T>
[[gnu::always_inline]] inline T centre_row(T* out, const T* h, const double* mu, int64_t D) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) {
    const T x = static_cast<T>(static_cast<double>(h[d]) - mu[d]);
    out[d] = x;
    acc += x * x;
  }
  return acc;
}

template <class T>
COMPASS_CLONES T pair_cost(const T* hc, const T* hr, const int64_t* ic, int64_t nc, const int64_t* ir, int64_t nr,
                           int64_t D, T* cost, OtpoCostWork<T>& w) {
  constexpr int64_t W = kLanes<T>;
  const int64_t ldq = (nr + W - 1) / W * W;
  w.mu.assign(D, 0.0);
  auto add_rows = [&](const T* h, const int64_t* idx, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const T* x = h + idx[i] * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) w.mu[d] += static_cast<double>(x[d]);
    }
  };
  add_rows(hc, ic, nc);
  add_rows(hr, ir, nr);
  const double inv = 1.0 / static_cast<double>(nc + nr);
  for (int64_t d = 0; d < D; ++d) w.mu[d] *= inv;

  w.p.resize(nc * D);
  w.np.resize(nc);
  for (int64_t a = 0; a < nc; ++a) w.np[a] = centre_row(w.p.data() + a * D, hc + ic[a] * D, w.mu.data(), D);
  // q transposed, one rejected token at a time through a row buffer (w.g, which later holds the
  // product blocks); pad columns are zero.
  w.qt.assign(D * ldq, T(0));
  w.nq.assign(ldq, T(0));
  std::vector<T>& row = w.g;
  row.resize(std::max<int64_t>(D, kTileRows * ldq));
  for (int64_t b = 0; b < nr; ++b) {
    w.nq[b] = centre_row(row.data(), hr + ir[b] * D, w.mu.data(), D);
    T* col = w.qt.data() + b;
    for (int64_t d = 0; d < D; ++d) col[d * ldq] = row[d];
  }

  T mx = T(0);
  const T* P = w.p.data();
  T* G = w.g.data();
  const bool wide = wide_registers();
  int64_t a = 0;
  for (; a + kTileRows <= nc; a += kTileRows) {
    if (wide) {
      row_block<kTileRows, 4>(P + a * D, D, w.qt.data(), ldq, G);
    } else {
      row_block<kTileRows, 1>(P + a * D, D, w.qt.data(), ldq, G);
    }
    for (int r = 0; r < kTileRows; ++r) mx = std::max(mx, cost_row(cost + (a + r) * nr, G + r * ldq, w.np[a + r], w.nq.data(), nr));
  }
  for (; a < nc; ++a) {
    if (wide) {
      row_block<1, 4>(P + a * D, D, w.qt.data(), ldq, G);
    } else {
      row_block<1, 1>(P + a * D, D, w.qt.data(), ldq, G);
    }
    mx = std::max(mx, cost_row(cost + a * nr, G, w.np[a], w.nq.data(), nr));
  }
  return mx;
}

}  // namespace

template <class T>
T otpo_pair_cost(const T* hc, const T* hr, const int64_t* ic, int64_t nc, const int64_t* ir, int64_t nr,
                 int64_t D, T* cost, OtpoCostWork<T>& work) {
  if (nc == 0 || nr == 0) return T(0);
  return pair_cost(hc, hr, ic, nc, ir, nr, D, cost, work);
}

template float otpo_pair_cost<float>(const float*, const float*, const int64_t*, int64_t, const int64_t*, int64_t,
                                     int64_t, float*, OtpoCostWork<float>&);
template double otpo_pair_cost<double>(const double*, const double*, const int64_t*, int64_t, const int64_t*,
                                       int64_t, int64_t, double*, OtpoCostWork<double>&);

}  // namespace compass::cpu
