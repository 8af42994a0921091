// The register tile shared by leanlm's CPU GEMMs for a few rows (int4_gemm.cpp, bf16_gemm.cpp):
// each thread owns blocks of 64 output rows and multiplies every input row by a block's weights,
// k-major ([k][64]: the 64 rows' weights of one input column side by side), from L1.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu_vec.h"

namespace {

constexpr int64_t kBlock = 64;  // output rows per block
constexpr int kRows = 6;  // input rows per register tile: 6 x 4 accumulators + 4 weights + 1

// blocks per parallel chunk: enough multiply-adds per chunk that a small layer runs on one thread
inline int64_t block_grain(int64_t m, int64_t k) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * std::max<int64_t>(m, 4)));
}

// f(R, r) with R = rows clamped to [Min, Max], as a compile-time constant
// (std::integral_constant<int, R>): only R in [Min, Max] are instantiated
template <int Max, int Min = 1, typename F>
void with_rows(int64_t rows, int64_t r, F& f) {
  if constexpr (Max > Min) {
    if (rows < Max) return with_rows<Max - 1, Min>(rows, r, f);
  }
  f(std::integral_constant<int, Max>{}, r);
}

// f(rows, r) for the input rows [r, r + rows), all of them in register tiles of at most Max
// rows and as even as can be (8 rows: 4 + 4, not 6 + 2, whose 2-row tile does half the
// multiply-adds per weight load); rows is a compile-time constant (std::integral_constant<int, R>)
template <int Max = kRows, typename F>
void for_row_tiles(int64_t m, F&& f) {
  const int64_t tiles = (m + Max - 1) / Max;
  int64_t r = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = (m - r) / (tiles - t);  // the remaining rows over the remaining tiles
    with_rows<Max>(rows, r, f);
    r += rows;
  }
}

// acc[r, 0:16C] += Σ_kk x[r, kk] · tile[kk, 0:16C] for R rows (x: fp32 rows of stride ldx;
// tile: fp32, or bf16 widened exactly to fp32 as it is loaded; tile and acc rows kBlock apart):
// C = 4, a block's 64 columns, for up to kRows rows; C = 2, half of them, for 7–12 rows, which
// then widen the weight in registers too (24 accumulators at most)
template <int R, int C = 4, typename W>
void tile_rows(const float* x, int64_t ldx, const W* tile, int64_t kn, float* acc) {
#if defined(__AVX512F__)
  __m512 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) a[r][i] = _mm512_loadu_ps(acc + r * kBlock + 16 * i);
  for (int64_t kk = 0; kk < kn; ++kk) {
    const W* t = tile + kk * kBlock;
    if constexpr (sizeof(W) == 2) {  // streamed from memory: ask for the rows 2 KB ahead
      for (int i = 0; i < C; i += 2) _mm_prefetch(reinterpret_cast<const char*>(t + 16 * kBlock + 16 * i), _MM_HINT_T0);
    }
    __m512 w[C];
    for (int i = 0; i < C; ++i) w[i] = load16(t + 16 * i);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + kk]);
      for (int i = 0; i < C; ++i) a[r][i] = _mm512_fmadd_ps(xv, w[i], a[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) _mm512_storeu_ps(acc + r * kBlock + 16 * i, a[r][i]);
#else
  for (int r = 0; r < R; ++r)
    for (int64_t kk = 0; kk < kn; ++kk)
      for (int64_t j = 0; j < 16 * C; ++j) acc[r * kBlock + j] += x[r * ldx + kk] * to_float(tile[kk * kBlock + j]);
#endif
}

}  // namespace
