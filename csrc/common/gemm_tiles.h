// The tile choice of the forward grouped GEMM (y rows of group e = x rows @ w[e]) on sm_90a, from
// the shape alone: plain C++ with no CUDA, so that the CPU module can expose it to the tests and
// to `compass info` on machines without a GPU.
//
// Two tiles are compiled per dtype and layout (csrc/cuda/sm90/): 128x128 and 128x256, both
// cooperative (two consumer warpgroups on one tile), cluster 1x1, 64-deep k-steps. The choice is a
// wave-quantization model: the persistent scheduler hands out E * ceil(m / TM) * ceil(N / TN)
// output tiles (m = M / E, the group size if routing were uniform: the real sizes stay on the
// device) to sm_count SMs, so the GEMM takes ceil(tiles / sm_count) waves, each costing the tile's
// area over the rate at which that tile computes. K scales every tile's time alike and drops out.
// The relative rate of 128x256 (1.15: it loads each A tile once per 256 columns instead of 128,
// and Hopper bf16 GEMMs with it are commonly reported ~10-20% above 128x128: not measured here) is an
// assumption until measured: bench/gpu_bench.py times both tiles (COMPASS_GEMM_TILE) on a GPU.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace compass {

struct GemmTile {
  int m, n;
  double rate;  // throughput relative to 128x128 on a large problem
  const char* name;
};

inline constexpr GemmTile kForwardTiles[] = {{128, 128, 1.0, "128x128"}, {128, 256, 1.15, "128x256"}};
inline constexpr int kNumForwardTiles = 2;

// Modelled time of the forward grouped GEMM with tile t, in units of (128 x 128 tile-waves).
inline double forward_tile_cost(const GemmTile& t, int64_t M, int64_t N, int64_t E, int sm_count) {
  if (M <= 0 || N <= 0 || E <= 0 || sm_count <= 0) return 0.0;
  const int64_t m = (M + E - 1) / E;  // rows per group, rounded up
  const int64_t tiles = E * ((m + t.m - 1) / t.m) * ((N + t.n - 1) / t.n);
  const int64_t waves = (tiles + sm_count - 1) / sm_count;
  return double(waves) * (double(t.m) * t.n / (128.0 * 128.0)) / t.rate;
}

// Index into kForwardTiles: COMPASS_GEMM_TILE=128x128|128x256 forces one (for benchmarking; any
// other value gives -1, which callers report), otherwise the lowest modelled cost, ties to 128x128.
inline int choose_forward_tile(int64_t M, int64_t N, int64_t E, int sm_count) {
  if (const char* force = std::getenv("COMPASS_GEMM_TILE"); force != nullptr && *force != '\0') {
    for (int i = 0; i < kNumForwardTiles; ++i)
      if (std::strcmp(force, kForwardTiles[i].name) == 0) return i;
    return -1;
  }
  int best = 0;
  double best_cost = forward_tile_cost(kForwardTiles[0], M, N, E, sm_count);
  for (int i = 1; i < kNumForwardTiles; ++i) {
    const double c = forward_tile_cost(kForwardTiles[i], M, N, E, sm_count);
    if (c < best_cost) best = i, best_cost = c;
  }
  return best;
}

}  // namespace compass
