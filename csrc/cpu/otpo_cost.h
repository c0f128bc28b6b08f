// The OTPO cost of one preference pair on the CPU (ot.cpp solves on it).
#pragma once
#include <cstdint>
#include <vector>

namespace compass::cpu {

// Per-thread scratch, reused across pairs.
template <class T>
struct OtpoCostWork {
  std::vector<double> mu;  // [D]
  std::vector<T> p, np;    // centred chosen rows [nc, D], their squared norms [nc]
  std::vector<T> qt, nq;   // centred rejected rows transposed [D, ldq], squared norms [ldq]
  std::vector<T> g;        // one row block of p q^T [rows, ldq]
};

// cost [nc, nr] (row stride nr) = sqrt(max(np_i + nq_j - 2 p_i . q_j, 0)) + 1e-6 over the valid
// tokens ic [nc] of hc [L, D] and ir [nr] of hr [L, D], with p = hc - mu, q = hr - mu centred on
// the mean mu of all nc + nr valid tokens (distances are unchanged; the cancellation error of the
// identity, ~6e-8 ||p||^2 in fp32, shrinks with the norms). Padding rows are never read. Returns
// max cost (0 when nc or nr is 0). T: float or double; sums of mu in double.
template <class T>
T otpo_pair_cost(const T* hc, const T* hr, const int64_t* ic, int64_t nc, const int64_t* ir, int64_t nr,
                 int64_t D, T* cost, OtpoCostWork<T>& work);

extern template float otpo_pair_cost<float>(const float*, const float*, const int64_t*, int64_t, const int64_t*,
                                            int64_t, int64_t, float*, OtpoCostWork<float>&);
extern template double otpo_pair_cost<double>(const double*, const double*, const int64_t*, int64_t,
                                              const int64_t*, int64_t, int64_t, double*, OtpoCostWork<double>&);

}  // namespace compass::cpu
