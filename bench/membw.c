// The memory bounds of this machine for the routing kernels' access patterns: how long 2 threads
// take to read 128 MiB, to write 128 MiB with non-temporal stores, and to do what permute does
// for T=8192 H=2048 fp32 k=2 (read 64 MiB, write each line twice, non-temporal). permute cannot
// beat the third, nor unpermute the first (it reads the 128 MiB permuted rows). The last two
// figures copy each 8 KiB row of x to k = 2 whole destination rows, in order and scattered at
// random: permute's expert segments (16-32 near-sequential write streams) lie between the two.
//   cc -O2 -march=x86-64-v4 -fopenmp bench/membw.c -o /tmp/membw && OMP_NUM_THREADS=2 /tmp/membw
#define _POSIX_C_SOURCE 200809L
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void stream_row(char* dst, const char* src, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm512_stream_si512((__m512i*)(dst + i), _mm512_loadu_si512(src + i));
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  const size_t n = (size_t)128 << 20;
  char *x = aligned_alloc(64, n / 2), *y = aligned_alloc(64, n), *z = aligned_alloc(64, n);
  memset(x, 1, n / 2), memset(y, 2, n), memset(z, 3, n);
  const int64_t nrows = (int64_t)n / 8192;  // destination rows; a fixed random permutation of them
  int64_t* scatter = malloc(sizeof(int64_t) * nrows);
  for (int64_t i = 0; i < nrows; ++i) scatter[i] = i;
  srand(1);
  for (int64_t i = nrows - 1; i > 0; --i) {
    const int64_t j = rand() % (i + 1), v = scatter[i];
    scatter[i] = scatter[j], scatter[j] = v;
  }
  for (int rep = 0; rep < 5; ++rep) {
    __m512i acc = _mm512_setzero_si512();
    const double t0 = now();
#pragma omp parallel
    {
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for
      for (size_t i = 0; i < n; i += 256) {
        a0 = _mm512_max_epu32(a0, _mm512_load_si512(y + i));
        a1 = _mm512_max_epu32(a1, _mm512_load_si512(y + i + 64));
        a2 = _mm512_max_epu32(a2, _mm512_load_si512(y + i + 128));
        a3 = _mm512_max_epu32(a3, _mm512_load_si512(y + i + 192));
      }
#pragma omp critical
      acc = _mm512_max_epu32(acc, _mm512_max_epu32(_mm512_max_epu32(a0, a1), _mm512_max_epu32(a2, a3)));
    }
    const double t1 = now();
#pragma omp parallel for
    for (size_t i = 0; i < n; i += 64) _mm512_stream_si512((__m512i*)(z + i), _mm512_set1_epi32((int)i));
    _mm_sfence();
    const double t2 = now();
#pragma omp parallel for
    for (size_t i = 0; i < n / 2; i += 64) {
      const __m512i v = _mm512_load_si512(x + i);
      _mm512_stream_si512((__m512i*)(z + 2 * i), v);
      _mm512_stream_si512((__m512i*)(z + 2 * i + 64), v);
    }
    _mm_sfence();
    const double t3 = now();
    const int64_t row = 8192, rows = (int64_t)(n / 2) / row;  // x: 8192 rows of 8 KiB, 2 copies each
#pragma omp parallel for
    for (int64_t t = 0; t < rows; ++t) {
      for (int64_t j = 0; j < 2; ++j) stream_row(z + (2 * t + j) * row, x + t * row, row);
    }
    _mm_sfence();
    const double t4 = now();
#pragma omp parallel for
    for (int64_t t = 0; t < rows; ++t) {
      for (int64_t j = 0; j < 2; ++j) stream_row(z + scatter[2 * t + j] * row, x + t * row, row);
    }
    _mm_sfence();
    const double t5 = now();
    printf("read 128 MiB %.2f ms (%.0f GB/s) | non-temporal write 128 MiB %.2f ms (%.0f GB/s) | "
           "read 64 + non-temporal write 128 MiB %.2f ms | rows in order %.2f ms, scattered %.2f ms [%d]\n",
           (t1 - t0) * 1e3, n / (t1 - t0) / 1e9, (t2 - t1) * 1e3, n / (t2 - t1) / 1e9, (t3 - t2) * 1e3,
           (t4 - t3) * 1e3, (t5 - t4) * 1e3, _mm_cvtsi128_si32(_mm512_castsi512_si128(acc)) & 1);
  }
  return 0;
}
