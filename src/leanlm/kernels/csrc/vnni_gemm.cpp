// x times a 4- or 8-bit weight with x rounded to int8 per row and group, on AVX512-VNNI (W4A8,
// W8A8): the integer products of a group run as vpdpbusd (64 u8 × s8 multiply-adds an
// instruction, exact in int32), four times the fp32 FMA's rate, and the weight is never widened
// to floats — the path llama.cpp's Q4_0 / Q8_0 (× Q8_0 activations) and torchao's da8w4 take on
// these CPUs. With b bits and h = 2^(b−1):
//
//   w[n, k] = q[n, k] · s[g, n] + c[g, n]            c = m − h·s (torch's int4pack pair: (q − h)·s + m)
//   a[i, g] = max(max_{k∈g} |x[i, k]|, 1e-8) / 127,  x̂[i, k] = round(x[i, k] / a[i, g]) ∈ [−127, 127]
//   y[i, n] = Σ_g s[g, n] · (a[i, g] · Σ_{k∈g} q[n, k] x̂[i, k])  +  c[g, n] · Σ_{k∈g} x[i, k]
//
// The zero point's term uses the row's unrounded sum, so only the scaled part sees x̂. fp32
// accumulation across groups, rounded once to bf16. (A per-channel weight comes as groups of
// 128/64/32 columns with its (s, m) repeated, so that its activations are rounded per group too.)
//
// Layout (leanlm.kernels.cpu_vnni.pack): blocks of 64 output rows; in a block, every 8 input
// columns (an octet) hold two quads of 4 columns, each quad 4 lines of 64 bytes (16 rows x 4
// columns: byte 4l + t is row 16i + l's code for the quad's column t), so that one line is a
// u8 operand of vpdpbusd whose lane l sums row l's four columns. 8 bits: the two quads' lines one
// after the other (512 bytes an octet); 4 bits: one set of lines, the first quad in the low
// nibbles and the second in the high ones (256 bytes), split by an AND and a shift.
// sz [N/64, G, 64, 2] bf16: (s, m) per block, group and row. x [M, K] bf16 -> y [M, N] bf16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemm_tile.h"

namespace {

// x̂ (int8 [m, k]), a and X = Σ x (fp32 [m, groups]) of bf16 rows x, as in the header; the
// division is IEEE's and the rounding half to even (MXCSR's default), as torch.round(x / a)
void quantize_rows(const c10::BFloat16* x, int64_t m, int64_t k, int64_t gs, int8_t* xq, float* a, float* xs) {
  const int64_t groups = k / gs;
  at::parallel_for(0, m * groups, std::max<int64_t>(1, 32768 / gs), [&](int64_t begin, int64_t end) {
    for (int64_t rg = begin; rg < end; ++rg) {
      const c10::BFloat16* src = x + (rg / groups) * k + (rg % groups) * gs;
      int8_t* dst = xq + (rg / groups) * k + (rg % groups) * gs;
      float amax = 0.f, sum = 0.f;
      int64_t c = 0;
#if defined(__AVX512F__)
      if (gs % 16 == 0) {
        __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
        for (; c < gs; c += 16) {
          const __m512 v = load16(src + c);
          vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
          vsum = _mm512_add_ps(vsum, v);
        }
        amax = _mm512_reduce_max_ps(vmax);
        sum = _mm512_reduce_add_ps(vsum);
        const __m512 scale = _mm512_set1_ps(std::max(amax, 1e-8f) / 127.f);
        const __m512i lim = _mm512_set1_epi32(127);
        for (c = 0; c < gs; c += 16) {
          __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(load16(src + c), scale));
          q = _mm512_max_epi32(_mm512_min_epi32(q, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm512_cvtepi32_epi8(q));
        }
      }
#endif
      if (c == 0) {
        for (int64_t j = 0; j < gs; ++j) {
          amax = std::max(amax, std::fabs(to_float(src[j])));
          sum += to_float(src[j]);
        }
        const float scale = std::max(amax, 1e-8f) / 127.f;
        for (int64_t j = 0; j < gs; ++j)  // nearbyint: half to even
          dst[j] = static_cast<int8_t>(std::clamp(std::nearbyint(to_float(src[j]) / scale), -127.f, 127.f));
      }
      a[rg] = std::max(amax, 1e-8f) / 127.f;
      xs[rg] = sum;
    }
  });
}

#if defined(__AVX512F__)
#define LEANLM_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// (s, c = m − h·s) of a block's 64 rows for one group, from its (s, m) bf16 pairs: a pair read as
// a 32-bit word is m's bits above s's, so s = word << 16 and m = word & ~0xFFFF
LEANLM_VNNI void block_scales(const c10::BFloat16* gsz, float h, float* s, float* c) {
  const __m512 minus8 = _mm512_set1_ps(-h);
  for (int i = 0; i < 4; ++i) {
    const __m512i word = _mm512_loadu_si512(gsz + 32 * i);
    const __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(word, 16));
    const __m512 mv = _mm512_castsi512_ps(_mm512_and_si512(word, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
    _mm512_storeu_ps(s + 16 * i, sv);
    _mm512_storeu_ps(c + 16 * i, _mm512_fmadd_ps(minus8, sv, mv));
  }
}

// acc[r, 0:64] += s · (a · Σ q x̂) + c · X for R rows over one group of `octets` × 8 columns of
// Bits-bit codes (w: the block's first octet of the group; xq: the rows' codes from the group's first column,
// stride ldx; a, xs: the rows' scale and sum, stride lds). One or two rows keep the low and high
// nibbles' sums apart, so that eight vpdpbusd chains are in flight instead of four.
template <int R, int Bits>
LEANLM_VNNI void group_rows(const uint8_t* w, int64_t octets, const int8_t* xq, int64_t ldx, const float* a,
                            const float* xs, int64_t lds, const float* s, const float* c, float* acc) {
  constexpr int kSplit = R <= 2 ? 2 : 1;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512i d[R][4][kSplit];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < kSplit; ++h) d[r][i][h] = _mm512_setzero_si512();
  for (int64_t o = 0; o < octets; ++o) {
    const uint8_t* p = w + o * 8 * Bits * 8;  // an octet: 8 columns x 64 rows x Bits bits
    for (int b = 0; b < Bits * 8 * 8; b += 128) _mm_prefetch(reinterpret_cast<const char*>(p + 4096 + b), _MM_HINT_T0);
    __m512i lo[4], hi[4];
    for (int i = 0; i < 4; ++i) {
      if constexpr (Bits == 4) {
        const __m512i v = _mm512_loadu_si512(p + 64 * i);
        lo[i] = _mm512_and_si512(v, low4);
        hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      } else {
        lo[i] = _mm512_loadu_si512(p + 64 * i);
        hi[i] = _mm512_loadu_si512(p + 256 + 64 * i);
      }
    }
    for (int r = 0; r < R; ++r) {
      int32_t quad[2];
      std::memcpy(quad, xq + r * ldx + 8 * o, sizeof quad);
      const __m512i bl = _mm512_set1_epi32(quad[0]), bh = _mm512_set1_epi32(quad[1]);
      for (int i = 0; i < 4; ++i) {
        d[r][i][0] = _mm512_dpbusd_epi32(d[r][i][0], lo[i], bl);
        d[r][i][kSplit - 1] = _mm512_dpbusd_epi32(d[r][i][kSplit - 1], hi[i], bh);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 av = _mm512_set1_ps(a[r * lds]), xv = _mm512_set1_ps(xs[r * lds]);
    for (int i = 0; i < 4; ++i) {
      __m512i di = d[r][i][0];
      if constexpr (kSplit == 2) di = _mm512_add_epi32(di, d[r][i][1]);
      const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(di), av);
      __m512 y = _mm512_loadu_ps(acc + r * kBlock + 16 * i);
      y = _mm512_fmadd_ps(_mm512_loadu_ps(s + 16 * i), dot, y);
      y = _mm512_fmadd_ps(_mm512_loadu_ps(c + 16 * i), xv, y);
      _mm512_storeu_ps(acc + r * kBlock + 16 * i, y);
    }
  }
}

bool has_vnni() { return __builtin_cpu_supports("avx512vnni"); }
#else
bool has_vnni() { return false; }
#endif

constexpr int kVnniRows = 4;  // 4 rows x 4 accumulators + 8 weight vectors

at::Tensor vnni_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t gs, int64_t bits) {
  TORCH_CHECK(has_vnni(), "vnni_mm: this CPU has no AVX512-VNNI");
  TORCH_CHECK(bits == 4 || bits == 8, "vnni_mm: bits must be 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "vnni_mm: x must be a contiguous [M, K] bf16 tensor");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) * 8 == k * bits &&
                  packed.size(0) % kBlock == 0 && packed.is_contiguous(),
              "vnni_mm: packed must be uint8 [N, K·bits/8], N a multiple of 64 (leanlm's VNNI layout)");
  TORCH_CHECK(gs > 0 && gs % 8 == 0 && k % gs == 0, "vnni_mm: the group size must be a multiple of 8 dividing K");
  const int64_t n = packed.size(0), groups = k / gs, blocks = n / kBlock;
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 4 && sz.size(0) == blocks &&
                  sz.size(1) == groups && sz.size(2) == kBlock && sz.size(3) == 2,
              "vnni_mm: sz must be bf16 [N/64, K/gs, 64, 2]");
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  std::vector<int8_t> xq(m * k);
  std::vector<float> a(m * groups), xs(m * groups);
  quantize_rows(x.data_ptr<c10::BFloat16>(), m, k, gs, xq.data(), a.data(), xs.data());
#if defined(__AVX512F__)
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::BFloat16* szp = sz.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t col_bytes = kBlock * bits / 8;  // a block's bytes per input column
  const float h = bits == 4 ? 8.f : 128.f;
  at::parallel_for(0, blocks, block_grain(m, k), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(m * kBlock);
    float s[kBlock], c[kBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const uint8_t* block = wp + blk * k * col_bytes;
      for (int64_t g = 0; g < groups; ++g) {
        block_scales(szp + (blk * groups + g) * kBlock * 2, h, s, c);
        const uint8_t* w = block + g * gs * col_bytes;
        for_row_tiles<kVnniRows>(m, [&](auto rows, int64_t r) LEANLM_VNNI {
          constexpr int R = decltype(rows)::value;
          const int8_t* xr = xq.data() + r * k + g * gs;
          const float *ar = a.data() + r * groups + g, *xsr = xs.data() + r * groups + g;
          float* accr = acc.data() + r * kBlock;
          if (bits == 4) group_rows<R, 4>(w, gs / 8, xr, k, ar, xsr, groups, s, c, accr);
          else group_rows<R, 8>(w, gs / 8, xr, k, ar, xsr, groups, s, c, accr);
        });
      }
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < kBlock; ++j)
          yp[r * n + blk * kBlock + j] = static_cast<c10::BFloat16>(acc[r * kBlock + j]);
    }
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm_cpu, m) {
  m.def("vnni_mm(Tensor x, Tensor packed, Tensor sz, int group_size, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm_cpu, CPU, m) { m.impl("vnni_mm", &vnni_mm); }
