// A few rows times a bf16 weight, for CPUs without AVX512-BF16 (or AMX): fp32 FMAs on the weight
// widened as it is read, where oneDNN emulates bf16 and runs 2–4x slower than its own fp32 GEMM
// at 8–32 rows (benchmarks/RESULTS.md, "A CPU without bf16 instructions").
//
//   y[m, n] = bf16(Σ_k x[m, k] · w[n, k] + b[n])        (fp32 products and sums, rounded once)
//
// bf16 is the high half of an fp32, so widening is exact: the products are those of fp32 on the
// same values. Layout (leanlm.kernels.cpu_linear.to_blocks): w's rows in blocks of 64 (the last
// one zero-padded), each block k-major — wb[b, k, j] = w[64 b + j, k] — so a thread streams one
// block's K x 128 bytes in order (prefetching 2 KB ahead). Up to kRows input rows widen the
// weight in registers as they multiply, all 64 columns at once; 7–12 rows do too, 32 columns at
// a time (one weight load per 2 x rows multiply-adds: 1.1–1.4x the fp32-tile path at 8 rows); more
// rows widen a [kCols, 64] slice once into an fp32 tile in L1 and multiply every row tile by it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "gemm_tile.h"

namespace {

constexpr int64_t kCols = 64;  // input columns per fp32 tile: 16 KB

at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& wb, const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "bf16_mm: x must be a contiguous [M, K] bf16 tensor");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(wb.dim() == 3 && wb.scalar_type() == at::kBFloat16 && wb.is_contiguous() && wb.size(1) == k &&
                  wb.size(2) == kBlock,
              "bf16_mm: the weight must be bf16 [blocks, K, 64] (leanlm's blocked layout) with x's K");
  const int64_t blocks = wb.size(0);
  TORCH_CHECK(n > (blocks - 1) * kBlock && n <= blocks * kBlock, "bf16_mm: n must fall in the last block");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kBFloat16),
              "bf16_mm: the bias must be bf16 [n]");
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({m, n}, x.options());
  std::vector<float> xf(m * k);  // x widened once (a broadcast from fp32 is one instruction)
  widen(x.data_ptr<c10::BFloat16>(), xf.data(), m * k);
  const float* xp = xf.data();
  const c10::BFloat16* wp = wb.data_ptr<c10::BFloat16>();
  const c10::BFloat16* bp = bias ? b.data_ptr<c10::BFloat16>() : nullptr;
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, blocks, block_grain(m, k), [&](int64_t begin, int64_t end) {
    const bool halves = m > kRows && m <= 2 * kRows;  // 7–12 rows: two column halves, in registers
    const bool widened = m > 2 * kRows;
    std::vector<float> acc(m * kBlock), tile(widened ? kCols * kBlock : 0);
    for (int64_t blk = begin; blk < end; ++blk) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const c10::BFloat16* block = wp + blk * k * kBlock;
      if (halves) {
        auto half_tiles = [&](auto rows, int64_t) {
          constexpr int R = decltype(rows)::value;
          for (int64_t h = 0; h < kBlock; h += kBlock / 2) tile_rows<R, 2>(xp, k, block + h, k, acc.data() + h);
        };
        with_rows<2 * kRows, kRows + 1>(m, 0, half_tiles);
      }
      for (int64_t k0 = 0; k0 < k && !halves; k0 += kCols) {
        const int64_t kn = std::min(kCols, k - k0);
        const c10::BFloat16* slice = block + k0 * kBlock;
        if (widened) widen(slice, tile.data(), kn * kBlock);
        for_row_tiles(m, [&](auto rows, int64_t r) {
          constexpr int R = decltype(rows)::value;
          if (widened)
            tile_rows<R>(xp + r * k + k0, k, tile.data(), kn, acc.data() + r * kBlock);
          else
            tile_rows<R>(xp + r * k + k0, k, slice, kn, acc.data() + r * kBlock);
        });
      }
      const int64_t cols = std::min(kBlock, n - blk * kBlock);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < cols; ++j) {
          const float bj = bp ? to_float(bp[blk * kBlock + j]) : 0.f;
          yp[r * n + blk * kBlock + j] = static_cast<c10::BFloat16>(acc[r * kBlock + j] + bj);
        }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm_cpu, m) { m.def("bf16_mm(Tensor x, Tensor wb, Tensor? bias, int n) -> Tensor"); }

TORCH_LIBRARY_IMPL(leanlm_cpu, CPU, m) { m.impl("bf16_mm", &bf16_mm); }
