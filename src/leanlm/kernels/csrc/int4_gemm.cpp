// A few rows (a batched decode step, a prefill) times a 4-bit weight in torch's CPU int4pack
// layout, reading and unpacking the weight once for all rows.
//
// torch's _weight_int4pack_mm_for_cpu unpacks the weight again for every few rows: at one row
// it streams the weight at ~70% of copy bandwidth, at 16 rows it falls to ~10%, below the bf16
// GEMM (benchmarks/RESULTS.md, "CPU linear kernels streamed from memory"). Here each thread owns
// blocks of 64 output rows; for each group of `gs` input columns it unpacks the block's [gs, 64]
// tile once (in L1), then multiplies every input row by it from there:
//
//   w[n, k] = (q[n, k] − 8) · s[g, n] + z[g, n]          (g = k / gs; torch's int4pack meaning)
//   y[m, n] = Σ_k x[m, k] · w[n, k]                       (fp32 accumulation, rounded once)
//
// Two ways to hold the tile: bf16 codes for AVX512-BF16 dot products, scale and offset applied
// per group (below, where the CPU has them), or the dequantized fp32 weights for fp32 FMAs.
//
// Layout (leanlm.quant.linear.int4pack): blocks of 64 output rows, each stored k-major as 32
// bytes per input column, byte j holding row j (low nibble) and row j + 32 (high nibble).
// sz [G, N, 2] bf16: (s, z) per group and output row. x [M, K] bf16 -> y [M, N] bf16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm_tile.h"

namespace {

// the block's tile for one group: tile[kk * 64 + j] = w[block row j, group column kk]
void dequant_tile(const uint8_t* cols, const c10::BFloat16* sz, int64_t gs, float* tile) {
  float s[kBlock], z[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) {
    s[j] = to_float(sz[j * 2]);
    z[j] = to_float(sz[j * 2 + 1]) - 8.f * s[j];  // (q − 8)·s + z = q·s + (z − 8s)
  }
#if defined(__AVX512F__)
  __m512 vs[4], vz[4];
  for (int i = 0; i < 4; ++i) {
    vs[i] = _mm512_loadu_ps(s + 16 * i);
    vz[i] = _mm512_loadu_ps(z + 16 * i);
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t kk = 0; kk < gs; ++kk) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + kk * 32));
    const __m256i lo = _mm256_and_si256(b, low4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
    const __m128i parts[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                              _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
    for (int i = 0; i < 4; ++i) {
      const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[i]));
      _mm512_storeu_ps(tile + kk * kBlock + 16 * i, _mm512_fmadd_ps(q, vs[i], vz[i]));
    }
  }
#else
  for (int64_t kk = 0; kk < gs; ++kk)
    for (int64_t j = 0; j < 32; ++j) {
      const uint8_t b = cols[kk * 32 + j];
      tile[kk * kBlock + j] = static_cast<float>(b & 15) * s[j] + z[j];
      tile[kk * kBlock + j + 32] = static_cast<float>(b >> 4) * s[j + 32] + z[j + 32];
    }
#endif
}


#if defined(__AVX512F__)
// The AVX512-BF16 path (vdpbf16ps: 32 multiply-adds an instruction, twice fp32 FMA's), with no
// float dequantization at all: the bf16 number whose bits are 0x4300 | q is exactly 128 + q, so
// the codes become bf16 by an OR. Per group g and input row, vdpbf16ps sums
//   A = Σ_k x_k · (128 + q_k)      (bf16 products are exact in fp32)
// and the group's scale and offset are applied once, in fp32:
//   Σ_k x_k · w_k = s · (A − 136 · X) + z · X,   X = Σ_k x_k   (q − 8 = (128 + q) − 136)
// The tile holds pairs of input columns: lane l of vector i holds (q[row, 2p], q[row, 2p+1]) for
// row = kLaneRow[16 i + l] (the order the byte interleave gives; un-permuted on the way out).
#define LEANLM_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int kLaneRow[kBlock] = {
    0,  1,  2,  3,  4,  5,  6,  7,  16, 17, 18, 19, 20, 21, 22, 23,  // low nibbles, unpacklo
    8,  9,  10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31,  // low nibbles, unpackhi
    32, 33, 34, 35, 36, 37, 38, 39, 48, 49, 50, 51, 52, 53, 54, 55,  // high nibbles, unpacklo
    40, 41, 42, 43, 44, 45, 46, 47, 56, 57, 58, 59, 60, 61, 62, 63};  // high nibbles, unpackhi

LEANLM_BF16 void codes_tile(const uint8_t* cols, int64_t gs, int32_t* tile) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m512i magic = _mm512_set1_epi16(0x4300);
  for (int64_t p = 0; p < gs / 2; ++p) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + 2 * p * 32));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + (2 * p + 1) * 32));
    const __m256i il[2] = {_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1)};
    for (int h = 0; h < 2; ++h) {
      const __m256i lo = _mm256_and_si256(il[h], low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(il[h], 4), low4);
      _mm512_storeu_si512(tile + p * kBlock + 16 * h, _mm512_or_si512(_mm512_cvtepu8_epi16(lo), magic));
      _mm512_storeu_si512(tile + p * kBlock + 32 + 16 * h, _mm512_or_si512(_mm512_cvtepu8_epi16(hi), magic));
    }
  }
}

// The group's s and zc = z − 136 s of the block's 64 rows, in lane order, from sz's (s, z) bf16
// pairs: a pair read as a 32-bit word is z's bits above s's, so s = word << 16, z = word & ~0xFFFF;
// rows [16j, 16j + 16) come in natural order and 128-bit quarters are shuffled into the lanes.
LEANLM_BF16 void group_scales(const c10::BFloat16* gsz, float* s, float* zc) {
  __m512 sr[4], zr[4];
  for (int j = 0; j < 4; ++j) {
    const __m512i word = _mm512_loadu_si512(gsz + 32 * j);
    sr[j] = _mm512_castsi512_ps(_mm512_slli_epi32(word, 16));
    zr[j] = _mm512_castsi512_ps(_mm512_and_si512(word, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
  }
  const __m512 minus136 = _mm512_set1_ps(-136.f);
  for (int i = 0; i < 4; ++i) {  // lanes 16i..16i+15 (kLaneRow): quarters {0,1} or {2,3} of two row vectors
    const int j = (i / 2) * 2;
    const __m512 sv = i % 2 == 0 ? _mm512_shuffle_f32x4(sr[j], sr[j + 1], 0x44) : _mm512_shuffle_f32x4(sr[j], sr[j + 1], 0xEE);
    const __m512 zv = i % 2 == 0 ? _mm512_shuffle_f32x4(zr[j], zr[j + 1], 0x44) : _mm512_shuffle_f32x4(zr[j], zr[j + 1], 0xEE);
    _mm512_storeu_ps(s + 16 * i, sv);
    _mm512_storeu_ps(zc + 16 * i, _mm512_fmadd_ps(minus136, sv, zv));
  }
}

// acc[r, lanes] += s · A + zc · X for R rows, A over the group's pairs (x: bf16 rows of stride
// ldx from the group's first column; xsum: the rows' X; s, zc = z − 136 s in lane order)
template <int R>
LEANLM_BF16 void group_rows(const c10::BFloat16* x, int64_t ldx, const float* xsum, int64_t lds,
                            const int32_t* tile, int64_t gs, const float* s, const float* zc, float* acc) {
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < gs / 2; ++p) {
    const int32_t* t = tile + p * kBlock;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(t), w1 = (__m512bh)_mm512_loadu_si512(t + 16),
                   w2 = (__m512bh)_mm512_loadu_si512(t + 32), w3 = (__m512bh)_mm512_loadu_si512(t + 48);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * p, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      a[r][0] = _mm512_dpbf16_ps(a[r][0], xv, w0);
      a[r][1] = _mm512_dpbf16_ps(a[r][1], xv, w1);
      a[r][2] = _mm512_dpbf16_ps(a[r][2], xv, w2);
      a[r][3] = _mm512_dpbf16_ps(a[r][3], xv, w3);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 xs = _mm512_set1_ps(xsum[r * lds]);
    for (int i = 0; i < 4; ++i) {
      __m512 c = _mm512_loadu_ps(acc + r * kBlock + 16 * i);
      c = _mm512_fmadd_ps(_mm512_loadu_ps(s + 16 * i), a[r][i], c);
      c = _mm512_fmadd_ps(_mm512_loadu_ps(zc + 16 * i), xs, c);
      _mm512_storeu_ps(acc + r * kBlock + 16 * i, c);
    }
  }
}

bool has_bf16() { return __builtin_cpu_supports("avx512bf16"); }
#else
bool has_bf16() { return false; }
#endif

at::Tensor int4pack_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t gs, bool bf16) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4pack_mm: x must be [M, K] bf16");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) * 2 == k &&
                  packed.size(0) % kBlock == 0 && packed.is_contiguous(),
              "int4pack_mm: packed must be uint8 [N, K/2], N a multiple of 64 (leanlm's int4pack layout)");
  const int64_t n = packed.size(0);
  TORCH_CHECK(gs > 0 && k % gs == 0, "int4pack_mm: the group size must divide K");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 &&
                  sz.size(0) == k / gs && sz.size(1) == n && sz.size(2) == 2,
              "int4pack_mm: sz must be bf16 [K/gs, N, 2]");
  TORCH_CHECK(x.is_contiguous(), "int4pack_mm: x must be contiguous");
  const int64_t groups = k / gs;
  at::Tensor y = at::empty({m, n}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::BFloat16* szp = sz.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t grain = block_grain(m, k);
#if defined(__AVX512F__)
  if (bf16 && has_bf16() && gs % 2 == 0) {
    const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
    std::vector<float> xsum(m * groups);  // X per row and group
    for (int64_t r = 0; r < m; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        float sum = 0.f;
        for (int64_t c = 0; c < gs; ++c) sum += to_float(xp[r * k + g * gs + c]);
        xsum[r * groups + g] = sum;
      }
    const float* xs = xsum.data();
    at::parallel_for(0, n / kBlock, grain, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> tile(gs / 2 * kBlock);
      std::vector<float> acc(m * kBlock);
      float s[kBlock], zc[kBlock];
      for (int64_t blk = begin; blk < end; ++blk) {
        std::fill(acc.begin(), acc.end(), 0.f);
        const uint8_t* block = wp + blk * k * 32;  // k columns x 32 bytes
        for (int64_t g = 0; g < groups; ++g) {
          const c10::BFloat16* gsz = szp + (g * n + blk * kBlock) * 2;
          group_scales(gsz, s, zc);
          codes_tile(block + g * gs * 32, gs, tile.data());
          for_row_tiles(m, [&](auto rows, int64_t r) LEANLM_BF16 {  // (inlinable into the tile loop)
            group_rows<decltype(rows)::value>(xp + r * k + g * gs, k, xs + r * groups + g, groups, tile.data(),
                                              gs, s, zc, acc.data() + r * kBlock);
          });
        }
        for (int64_t r = 0; r < m; ++r)
          for (int l = 0; l < kBlock; ++l)
            yp[r * n + blk * kBlock + kLaneRow[l]] = static_cast<c10::BFloat16>(acc[r * kBlock + l]);
      }
    });
    return y;
  }
#endif
  std::vector<float> xf(m * k);  // x widened once (a broadcast from fp32 is one instruction)
  widen(x.data_ptr<c10::BFloat16>(), xf.data(), m * k);
  at::parallel_for(0, n / kBlock, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(gs * kBlock), acc(m * kBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const uint8_t* block = wp + blk * k * 32;  // k columns x 32 bytes
      for (int64_t g = 0; g < groups; ++g) {
        dequant_tile(block + g * gs * 32, szp + (g * n + blk * kBlock) * 2, gs, tile.data());
        for_row_tiles(m, [&](auto rows, int64_t r) {
          tile_rows<decltype(rows)::value>(xf.data() + r * k + g * gs, k, tile.data(), gs,
                                           acc.data() + r * kBlock);
        });
      }
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < kBlock; ++j)
          yp[r * n + blk * kBlock + j] = static_cast<c10::BFloat16>(acc[r * kBlock + j]);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm_cpu, m) {
  m.def("int4pack_mm(Tensor x, Tensor packed, Tensor sz, int group_size, bool bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm_cpu, CPU, m) { m.impl("int4pack_mm", &int4pack_mm); }
