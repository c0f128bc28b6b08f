// CPU batched Sinkhorn (balanced and unbalanced entropic OT), OpenMP over the pairs of the batch.
// Semantics (iteration, convergence criterion, zero-mass entries): compass_kernels/ot_ref.py.
//
// Per pair the solver keeps absorbed potentials alpha [n], beta [m] and scalings u [n], v [m]:
//   K_ij = exp((alpha_i + beta_j - C_ij) / eps),   plan_ij = K_ij u_i v_j,
//   f = alpha + eps log u, g = beta + eps log v are the log-domain potentials of ot_ref.
// K is computed once (alpha_i = min_j C_ij, beta = 0, so K <= 1 with a 1 in every row) and each
// iteration is two matrix-vector products plus n + m divisions (balanced) or exp/log pairs:
//   u_i = (a_i / (K v)_i)^fi * exp(alpha_i (fi - 1) / eps)      (fi = tau / (tau + eps), or 1)
// A scaling that leaves the band [lo, hi], or a sum that under- or overflows (eps = 0.001
// underflows exp(-C/eps) for C ~ 1), is replaced by an exact log-sum-exp update of that row's
// (column's) potential, absorbed into alpha (beta) with u = 1; only that row (column) of K is
// recomputed. K is stored in the input's precision (an fp32 K halves the two streams over it per
// iteration: at 192 x 192 both fit L2 and an iteration costs ~6.5 us (fp32) / ~7 us (fp64) on one
// core here, at L = 2048 K leaves L2); potentials, scalings and sums are float64 (the convergence
// test needs relative changes of 1e-6 resolved). K entries that would be denormal are flushed to
// zero: below e^-87 (fp32) or e^-690 (fp64); with the band [1e-10, 1e10] (fp32) or [1e-50, 1e50]
// (fp64) a flushed entry carries plan mass below 1e-18 (1e-200), and no slow denormal arithmetic
// is done.
//
// Speed (n = m = 192, one core of this machine): glibc pow made the unbalanced iteration 39 us
// against 13 us balanced, and 37k scalar exps made K cost 170 us (now 7 us and 60 us, K
// included in the 60 us of setup and plan writing). The hot loops are therefore
// branch-free and vectorisable (vexp / vlog below, ~1 ulp) and compiled for AVX-512, AVX2 and
// baseline x86-64, picked at load time (GCC target_clones); a different vector width changes
// the order of the row sums, so results agree across machines to rounding, not bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#ifdef COMPASS_OPENMP
#include <omp.h>
#endif

#include "common/check.h"
#include "common/dtype.h"
#include "common/kernel_args.h"
#include "common/vmath.h"
#include "cpu/otpo_cost.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define COMPASS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define COMPASS_CLONES
#endif

namespace compass::cpu {
namespace {

using vmath::exp_parts;
using vmath::ExpParts;
using vmath::sel;
using vmath::vexp;
using vmath::vlog;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- hot loops (cloned per instruction set) ---------------------------------------------------

// Smallest exponent whose exp is a normal number of the storage type; below it K is 0.
template <class T>
constexpr double kFlush = sizeof(T) == 4 ? -87.0 : -690.0;

inline double kexp(double x, double flush) { return sel(x < flush, 0.0, vexp(x)); }

// exp(x) for a float result, 0 below -87 as kexp (K entries, fp32 storage): vexp's range reduction
// (exp_parts), Taylor to degree 8 (truncation < 3e-10 relative, under 0.01 float ulp; setup -25%).
inline double kexp_f32(double x) {
  const double xc = sel(x < -87.0, -87.0, sel(x > 100.0, 100.0, x));  // > FLT_MAX from 88.73
  const ExpParts e = exp_parts(xc);
  const double y = vmath::horner<vmath::InvFactorial, 8>(e.r) * e.two_n;
  return sel(x < -87.0, 0.0, sel(x > 100.0, kInf, y));  // the float cast takes y > FLT_MAX to inf
}

// Kr[j] = exp((alpha + beta[j] - C[j]) / eps) over a whole row; beta = -inf marks a dead column.
template <class T>
COMPASS_CLONES void k_row(T* Kr, const T* Cr, double alpha, const double* beta, double inv_eps, int64_t m) {
  if constexpr (sizeof(T) == 4) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j)
      Kr[j] = static_cast<T>(kexp_f32((alpha + beta[j] - static_cast<double>(Cr[j])) * inv_eps));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j)
      Kr[j] = static_cast<T>(kexp((alpha + beta[j] - static_cast<double>(Cr[j])) * inv_eps, kFlush<T>));
  }
}

// min_j C[j] + pen[j] (pen = 0 on live columns, inf on dead ones)
template <class T>
COMPASS_CLONES double k_row_min(const T* Cr, const double* pen, int64_t m) {
  double lo = kInf;
#pragma omp simd reduction(min : lo)
  for (int64_t j = 0; j < m; ++j) lo = std::min(lo, static_cast<double>(Cr[j]) + pen[j]);
  return lo;
}

// s[rows[r]] = K[rows[r], :] . v for the live rows, four rows per pass: one accumulator chain per
// row would be add-latency bound (~2x slower at m = 192).
template <class T>
COMPASS_CLONES void k_row_sums(double* s, const T* K, const double* v, const int64_t* rows, int64_t nrows,
                               int64_t m) {
  int64_t r = 0;
  for (; r + 4 <= nrows; r += 4) {
    const T* K0 = K + rows[r] * m;
    const T* K1 = K + rows[r + 1] * m;
    const T* K2 = K + rows[r + 2] * m;
    const T* K3 = K + rows[r + 3] * m;
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t j = 0; j < m; ++j) {
      s0 += static_cast<double>(K0[j]) * v[j];
      s1 += static_cast<double>(K1[j]) * v[j];
      s2 += static_cast<double>(K2[j]) * v[j];
      s3 += static_cast<double>(K3[j]) * v[j];
    }
    s[rows[r]] = s0;
    s[rows[r + 1]] = s1;
    s[rows[r + 2]] = s2;
    s[rows[r + 3]] = s3;
  }
  for (; r < nrows; ++r) {
    const T* Ki = K + rows[r] * m;
    double s0 = 0.0;
#pragma omp simd reduction(+ : s0)
    for (int64_t j = 0; j < m; ++j) s0 += static_cast<double>(Ki[j]) * v[j];
    s[rows[r]] = s0;
  }
}

// t = K^T u over the live rows (K rows contiguous).
template <class T>
COMPASS_CLONES void k_col_sums(double* t, const T* K, const double* u, const int64_t* rows, int64_t nrows,
                               int64_t m) {
  for (int64_t j = 0; j < m; ++j) t[j] = 0.0;
  for (int64_t r = 0; r < nrows; ++r) {
    const double ui = u[rows[r]];
    const T* Ki = K + rows[r] * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) t[j] += static_cast<double>(Ki[j]) * ui;
  }
}

// out[i] = (w[i] / s[i])^fi * exp(lc[i]) = exp(fi (log w[i] - log s[i]) + lc[i]), or w / s when
// balanced. Lanes with s out of range produce garbage that the caller's range check rejects.
COMPASS_CLONES void k_scalings(double* out, const double* s, const double* w, const double* logw, const double* lc,
                               double fi, bool balanced, int64_t n) {
  if (balanced) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] / s[i];
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double si = sel((s[i] > 1e-300) & (s[i] < 1e300), s[i], 1.0);  // &: no short circuit
    out[i] = vexp(fi * (logw[i] - vlog(si)) + lc[i]);
  }
}

// F[i] = pot[i] / eps + log(x[i]) for positive normal x (others: garbage, not read).
COMPASS_CLONES void k_log_scalings(double* F, const double* pot, const double* x, double inv_eps, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double xi = sel((x[i] >= 1e-300) & (x[i] <= 1e300), x[i], 1.0);
    F[i] = pot[i] * inv_eps + vlog(xi);
  }
}

template <class T>
COMPASS_CLONES void k_plan_row(T* Pr, const T* Kr, double ui, const double* v, int64_t m) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) Pr[j] = static_cast<T>(static_cast<double>(Kr[j]) * ui * v[j]);
}

// ---- per-pair solver -------------------------------------------------------------------------

struct Params {
  double eps, inv_eps, fi, cexp;  // cexp = (fi - 1) / eps: a scaling carries exp(potential * cexp)
  double lo, hi;                  // band of the scalings before absorption
  bool balanced;
  int64_t max_iter, check_every;
  double tol;
};

// Per-thread scratch, sized once per call. K [n, m] in the storage type; row vectors [n], column
// vectors [m] in float64.
template <class T>
struct Work {
  std::vector<T> K;
  std::vector<double> u, alpha, lca, av, loga, s, Fo, Fn;   // rows
  std::vector<double> v, beta, lcb, bv, logb, t, Go, Gn;    // columns
  std::vector<double> pot, pen;
  std::vector<int64_t> rows, cols, bad;  // live rows / columns (positive mass), rejected entries
  void resize(int64_t n, int64_t m) {
    K.assign(static_cast<size_t>(n * m), T(0));
    for (auto* x : {&u, &alpha, &lca, &av, &loga, &s, &Fo, &Fn}) x->assign(n, 0.0);
    for (auto* x : {&v, &beta, &lcb, &bv, &logb, &t, &Go, &Gn}) x->assign(m, 0.0);
    pot.assign(std::max(n, m), 0.0);
    pen.assign(m, 0.0);
    rows.reserve(n);
    cols.reserve(m);
    bad.reserve(std::max(n, m));
  }
};


// |new - old|, with -inf == -inf counting as no change.
inline double change(double nw, double old) { return nw == old ? 0.0 : std::fabs(nw - old); }

template <class T>
struct Pair {
  const T* C;
  int64_t n, m;
  const Params& p;
  Work<T>& w;

  bool in_band(double x) const { return x >= p.lo && x <= p.hi; }  // false for NaN, inf, 0

  double c(int64_t i, int64_t j) const { return static_cast<double>(C[i * m + j]); }

  // Live rows / columns and their masses; false when a side is empty (zero plan).
  bool setup(const T* a, const T* b) {
    auto& W = w;
    W.rows.clear();
    W.cols.clear();
    for (int64_t i = 0; i < n; ++i) {
      W.av[i] = static_cast<double>(a[i]);
      W.u[i] = 0.0;
      W.alpha[i] = -kInf;
      if (W.av[i] > 0) W.rows.push_back(i);
    }
    for (int64_t j = 0; j < m; ++j) {
      W.bv[j] = static_cast<double>(b[j]);
      W.v[j] = 0.0;
      W.beta[j] = -kInf;
      W.pen[j] = kInf;
      if (W.bv[j] > 0) W.cols.push_back(j);
    }
    return !W.rows.empty() && !W.cols.empty();
  }

  void init() {
    auto& W = w;
    for (int64_t i = 0; i < n; ++i)  // live rows are all written below
      if (!(W.av[i] > 0)) std::fill(&W.K[i * m], &W.K[i * m] + m, T(0));
    for (int64_t j : W.cols) {
      W.v[j] = 1.0;
      W.beta[j] = 0.0;
      W.pen[j] = 0.0;
      W.logb[j] = std::log(W.bv[j]);
      W.lcb[j] = 0.0;
    }
    for (int64_t i : W.rows) {
      const double lo = k_row_min(C + i * m, W.pen.data(), m);
      W.alpha[i] = std::isfinite(lo) ? lo : 0.0;
      W.u[i] = 1.0;
      W.loga[i] = std::log(W.av[i]);
      W.lca[i] = W.alpha[i] * p.cexp;
      k_row(&W.K[i * m], C + i * m, W.alpha[i], W.beta.data(), p.inv_eps, m);
    }
  }

  // Exact log-domain update of row i's potential from the column potentials in W.pot, absorbed.
  void log_update_row(int64_t i) {
    auto& W = w;
    double mx = -kInf;
    for (int64_t j : W.cols) mx = std::max(mx, (W.pot[j] - c(i, j)) * p.inv_eps);
    if (mx == -kInf) {  // no column reachable at finite cost: the row carries no mass
      W.alpha[i] = -kInf;
      W.u[i] = 0.0;
      std::fill(&W.K[i * m], &W.K[i * m] + m, T(0));
      return;
    }
    double acc = 0.0;
    for (int64_t j : W.cols) acc += std::exp((W.pot[j] - c(i, j)) * p.inv_eps - mx);
    W.alpha[i] = p.fi * p.eps * (W.loga[i] - (mx + std::log(acc)));
    W.u[i] = 1.0;
    W.lca[i] = W.alpha[i] * p.cexp;
    k_row(&W.K[i * m], C + i * m, W.alpha[i], W.beta.data(), p.inv_eps, m);
  }

  void log_update_col(int64_t j) {
    auto& W = w;
    double mx = -kInf;
    for (int64_t i : W.rows) mx = std::max(mx, (W.pot[i] - c(i, j)) * p.inv_eps);
    if (mx == -kInf) {
      W.beta[j] = -kInf;
      W.v[j] = 0.0;
      for (int64_t i : W.rows) W.K[i * m + j] = T(0);
      return;
    }
    double acc = 0.0;
    for (int64_t i : W.rows) acc += std::exp((W.pot[i] - c(i, j)) * p.inv_eps - mx);
    W.beta[j] = p.fi * p.eps * (W.logb[j] - (mx + std::log(acc)));
    W.v[j] = 1.0;
    W.lcb[j] = W.beta[j] * p.cexp;
    for (int64_t i : W.rows)
      W.K[i * m + j] = static_cast<T>(kexp((W.alpha[i] + W.beta[j] - c(i, j)) * p.inv_eps, kFlush<T>));
  }

  void update_rows() {
    auto& W = w;
    k_row_sums(W.s.data(), W.K.data(), W.v.data(), W.rows.data(), static_cast<int64_t>(W.rows.size()), m);
    k_scalings(W.Fn.data(), W.s.data(), W.av.data(), W.loga.data(), W.lca.data(), p.fi, p.balanced, n);
    W.bad.clear();
    for (int64_t i : W.rows) {
      const double si = W.s[i];
      if (si > 1e-300 && si < 1e300 && in_band(W.Fn[i])) {
        W.u[i] = W.Fn[i];
      } else {
        W.bad.push_back(i);
      }
    }
    if (W.bad.empty()) return;
    for (int64_t j : W.cols) W.pot[j] = W.beta[j] + p.eps * std::log(W.v[j]);  // g_j
    for (int64_t i : W.bad) log_update_row(i);
  }

  void update_cols() {
    auto& W = w;
    k_col_sums(W.t.data(), W.K.data(), W.u.data(), W.rows.data(), static_cast<int64_t>(W.rows.size()), m);
    k_scalings(W.Gn.data(), W.t.data(), W.bv.data(), W.logb.data(), W.lcb.data(), p.fi, p.balanced, m);
    W.bad.clear();
    for (int64_t j : W.cols) {
      const double tj = W.t[j];
      if (tj > 1e-300 && tj < 1e300 && in_band(W.Gn[j])) {
        W.v[j] = W.Gn[j];
      } else {
        W.bad.push_back(j);
      }
    }
    if (W.bad.empty()) return;
    for (int64_t i : W.rows) W.pot[i] = W.alpha[i] + p.eps * std::log(W.u[i]);  // f_i
    for (int64_t j : W.bad) log_update_col(j);
  }

  // Total log-scalings f / eps, g / eps; dead entries (potential -inf) give -inf.
  void log_scalings(double* F, double* G) const {
    k_log_scalings(F, w.alpha.data(), w.u.data(), p.inv_eps, n);
    k_log_scalings(G, w.beta.data(), w.v.data(), p.inv_eps, m);
  }

  // NaN in, NaN out (ot_ref.nonfinite_pairs): a NaN, infinite or negative mass, or a NaN or -inf cost
  // between a live row and a live column (after init(), which zeroes pen on live columns).
  bool invalid_mass(const T* a, const T* b) const {
    for (int64_t i = 0; i < n; ++i)
      if (!(std::isfinite(static_cast<double>(a[i])) && a[i] >= 0)) return true;
    for (int64_t j = 0; j < m; ++j)
      if (!(std::isfinite(static_cast<double>(b[j])) && b[j] >= 0)) return true;
    return false;
  }

  bool invalid_cost() const {
    int bad = 0;  // !(x > -inf): NaN or -inf; pen is 0 on live columns (vectorisable, no early exit)
    for (int64_t i : w.rows) {
      const T* r = C + i * m;
      for (int64_t j = 0; j < m; ++j) bad |= (w.pen[j] == 0) & !(static_cast<double>(r[j]) > -kInf);
    }
    return bad != 0;
  }

  // Iterates to convergence (or max_iter); false (and no iteration) when a side has no mass. Sets
  // nan_input (and runs nothing) for invalid input.
  bool nan_input = false;
  bool run(const T* a, const T* b, int32_t* iters) {
    auto& W = w;
    *iters = 0;
    const bool live = setup(a, b);
    nan_input = invalid_mass(a, b);
    if (!live || nan_input) return false;
    init();
    nan_input = invalid_cost();
    if (nan_input) return false;
    int64_t it = 1;
    for (; it <= p.max_iter; ++it) {
      const bool check = it % p.check_every == 0;
      if (check) log_scalings(W.Fo.data(), W.Go.data());
      update_rows();
      update_cols();
      if (check) {
        log_scalings(W.Fn.data(), W.Gn.data());
        double err = 0.0;
        for (int64_t i : W.rows) err = std::max(err, change(W.Fn[i], W.Fo[i]));
        for (int64_t j : W.cols) err = std::max(err, change(W.Gn[j], W.Go[j]));
        if (err < p.tol) break;
      }
    }
    *iters = static_cast<int32_t>(std::min(it, p.max_iter));
    return true;
  }

  void write_plan(T* P) const {
    for (int64_t i = 0; i < n; ++i) k_plan_row(P + i * m, &w.K[i * m], w.u[i], w.v.data(), m);
  }

  // Row and column sums of the plan: row_i = u_i (K v)_i, col_j = v_j (K^T u)_j (live entries).
  void marginals(double* row, double* col) {
    auto& W = w;
    std::fill(row, row + n, 0.0);
    const auto nrows = static_cast<int64_t>(W.rows.size());
    k_row_sums(W.s.data(), W.K.data(), W.v.data(), W.rows.data(), nrows, m);
    for (int64_t i : W.rows) row[i] = W.u[i] * W.s[i];
    k_col_sums(W.t.data(), W.K.data(), W.u.data(), W.rows.data(), nrows, m);
    for (int64_t j = 0; j < m; ++j) col[j] = W.v[j] * W.t[j];
  }
};

template <class T>
void sinkhorn_batch(const T* C, const T* a, const T* b, int64_t B, int64_t n, int64_t m, const Params& p,
                    T* P, int32_t* iters) {
  const int64_t nm = n * m;
  // Pairs converge after different iteration counts: dynamic scheduling, one pair at a time.
#pragma omp parallel if (B > 1)
  {
    Work<T> w;
    w.resize(n, m);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < B; ++k) {
      Pair<T> pair{C + k * nm, n, m, p, w};
      if (pair.run(a + k * n, b + k * m, iters + k)) {
        pair.write_plan(P + k * nm);
      } else {  // an empty side: zero plan; invalid input: NaN plan
        std::fill(P + k * nm, P + (k + 1) * nm, pair.nan_input ? std::numeric_limits<T>::quiet_NaN() : T(0));
      }
    }
  }
}

// Whether the listed rows of h [L, D] hold only finite numbers.
template <class T>
bool all_finite(const T* h, const std::vector<int64_t>& rows, int64_t D) {
  for (int64_t i : rows)
    for (int64_t d = 0; d < D; ++d)
      if (!std::isfinite(static_cast<double>(h[i * D + d]))) return false;
  return true;
}

// OTPO weights from the hidden states h_c, h_r [B, L, D] and masks [B, L]: per pair, the cost of the
// valid tokens (otpo_cost.cpp), divided by m = max(its maximum, scale_floor[k]) when m exceeds 1
// (scale_floor: what the official scale's masked rows add, 0 for the valid-pairs scale); unbalanced
// Sinkhorn with unit masses; weights n * marginal / S.
template <class T>
void otpo_batch(const T* h_c, const T* h_r, const uint8_t* mask_c, const uint8_t* mask_r, int64_t B, int64_t L,
                int64_t D, const Params& p, const T* scale_floor, T* w_c, T* w_r, int32_t* iters) {
#pragma omp parallel if (B > 1)
  {
    Work<T> w;
    w.resize(L, L);
    OtpoCostWork<T> cw;
    std::vector<T> cost(static_cast<size_t>(L * L)), ones(L, T(1));
    std::vector<int64_t> ic, ir;
    std::vector<double> row(L), col(L);
    ic.reserve(L);
    ir.reserve(L);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < B; ++k) {
      T* wc = w_c + k * L;
      T* wr = w_r + k * L;
      std::fill(wc, wc + L, T(0));
      std::fill(wr, wr + L, T(0));
      iters[k] = 0;
      ic.clear();
      ir.clear();
      for (int64_t i = 0; i < L; ++i) {
        if (mask_c[k * L + i]) ic.push_back(i);
        if (mask_r[k * L + i]) ir.push_back(i);
      }
      const auto nc = static_cast<int64_t>(ic.size()), nr = static_cast<int64_t>(ir.size());
      if (nc == 0 || nr == 0) continue;  // an empty side: zero weights
      const T* hk_c = h_c + k * L * D;
      const T* hk_r = h_r + k * L * D;
      if (!all_finite(hk_c, ic, D) || !all_finite(hk_r, ir, D)) {
        for (int64_t i : ic) wc[i] = std::numeric_limits<T>::quiet_NaN();  // NaN in, NaN out
        for (int64_t i : ir) wr[i] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      const T cmax =
          std::max(otpo_pair_cost(hk_c, hk_r, ic.data(), nc, ir.data(), nr, D, cost.data(), cw), scale_floor[k]);
      if (cmax > 1) {
        for (int64_t e = 0; e < nc * nr; ++e) cost[e] /= cmax;
      }
      Pair<T> pair{cost.data(), nc, nr, p, w};
      pair.run(ones.data(), ones.data(), iters + k);
      pair.marginals(row.data(), col.data());
      double total = 0.0;
      for (int64_t a = 0; a < nc; ++a) total += row[a];
      const double scale = total > 0 ? static_cast<double>(std::min(nc, nr)) / total : 0.0;
      for (int64_t a = 0; a < nc; ++a) wc[ic[a]] = static_cast<T>(row[a] * scale);
      for (int64_t b = 0; b < nr; ++b) wr[ir[b]] = static_cast<T>(col[b] * scale);
    }
  }
}

// Checks the solver arguments and derives the constants; tau < 0 (or inf) means balanced.
Params make_params(int dtype, double eps, double tau, int64_t max_iter, double tol, int64_t check_every) {
  check(eps > 0 && std::isfinite(eps), "eps must be > 0 and finite, got ", eps);
  check_positive("max_iter", max_iter);
  check_positive("check_every", check_every);
  check(tol >= 0, "tol must be >= 0, got ", tol);
  check(dtype == int(DType::kFloat32) || dtype == int(DType::kFloat64),
        "dtype must be float32 or float64, got code ", dtype, " (", dtype_name(dtype), ")");
  Params p{};
  p.eps = eps;
  p.inv_eps = 1.0 / eps;
  p.balanced = tau < 0 || std::isinf(tau);
  p.fi = p.balanced ? 1.0 : tau / (tau + eps);
  p.cexp = (p.fi - 1.0) / eps;
  p.lo = dtype == int(DType::kFloat32) ? 1e-10 : 1e-50;
  p.hi = 1.0 / p.lo;
  p.max_iter = max_iter;
  p.check_every = check_every;
  p.tol = tol;
  return p;
}

}  // namespace

// cost [B, n, m], a [B, n], b [B, m], plan [B, n, m]: contiguous, one float dtype (fp32 / fp64).
// tau < 0 (or inf) means balanced. iters [B] int32 receives the iterations each pair ran.
void sinkhorn(const sinkhorn_args& args) {
  const int64_t B = args.B, n = args.n, m = args.m, dtype = args.cost.dtype;
  check_nonneg("B", B);
  check_nonneg("n", n);
  check_nonneg("m", m);
  check(!(args.tau == 0) && !std::isnan(args.tau), "tau must be > 0 (or < 0 for balanced), got ", args.tau);
  const Params p = make_params(int(dtype), args.eps, args.tau, args.max_iter, args.tol, args.check_every);
  check_same_dtype("cost", dtype, {{"a", args.a.dtype}, {"b", args.b.dtype}, {"plan", args.plan.dtype}});
  check_ptr("cost", args.cost.data, B * n * m);
  check_ptr("a", args.a.data, B * n);
  check_ptr("b", args.b.data, B * m);
  check_ptr("plan", args.plan.data, B * n * m);
  check_ptr("iters", args.iters, B);
  if (B == 0) return;
  int32_t* it = args.iters;
  if (n == 0 || m == 0) {
    std::fill(it, it + B, 0);
    return;
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    sinkhorn_batch(args.cost.as<const T>(), args.a.as<const T>(), args.b.as<const T>(), B, n, m, p,
                   args.plan.as<T>(), it);
  };
  if (dtype == int(DType::kFloat32)) run(float{}); else run(double{});
}

// h_c / h_r [B, L, D] hidden states, mask_c / mask_r [B, L] bool, scale_floor [B] (the cost scale's
// lower bound per pair), w_c / w_r [B, L], iters [B]: contiguous; hidden states, floor and weights share
// one float dtype (fp32 / fp64). tau > 0.
void otpo_weights(const otpo_weights_args& args) {
  const int64_t B = args.B, L = args.L, D = args.D, dtype = args.h_c.dtype;
  check_nonneg("B", B);
  check_nonneg("L", L);
  check_nonneg("D", D);
  check(args.tau > 0 && std::isfinite(args.tau), "tau must be > 0 and finite, got ", args.tau);
  const Params p = make_params(int(dtype), args.eps, args.tau, args.max_iter, args.tol, args.check_every);
  check_same_dtype("h_c", dtype, {{"h_r", args.h_r.dtype}, {"scale_floor", args.scale_floor.dtype},
                                  {"w_c", args.w_c.dtype}, {"w_r", args.w_r.dtype}});
  for (auto [name, ptr, size] : {std::tuple<const char*, const void*, int64_t>{"h_c", args.h_c.data, B * L * D},
                                 {"h_r", args.h_r.data, B * L * D}, {"mask_c", args.mask_c, B * L},
                                 {"mask_r", args.mask_r, B * L}, {"scale_floor", args.scale_floor.data, B},
                                 {"w_c", args.w_c.data, B * L}, {"w_r", args.w_r.data, B * L},
                                 {"iters", args.iters, B}})
    check_ptr(name, ptr, size);
  if (B == 0) return;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    otpo_batch(args.h_c.as<const T>(), args.h_r.as<const T>(), args.mask_c, args.mask_r, B, L, D, p,
               args.scale_floor.as<const T>(), args.w_c.as<T>(), args.w_r.as<T>(), args.iters);
  };
  if (dtype == int(DType::kFloat32)) run(float{}); else run(double{});
}

}  // namespace compass::cpu
