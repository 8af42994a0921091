// Element conversions shared by leanlm's CPU kernels: fp32 / bf16 / fp16 to fp32, one at a
// time or sixteen at a time where the CPU has AVX-512; and the rotary embedding of one head.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) {  // bf16 is the high half of an fp32
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// e^x of 16 floats (x ≤ 0 here): Cephes' expf — x = n·ln 2 + r, |r| ≤ ln 2 / 2, e^r by its
// degree-7 polynomial, then scaled by 2^n; within 2 ulp of expf, 0 below the float range.
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}
#endif

template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }  // round to nearest even, as torch casts

// one head's RoPE, as leanlm.kernels.rotary.reference rounds it:
// y = T(T(x ⊙ cos) + T(rotate_half(x) ⊙ sin)), rotate_half(x) = [−x₂, x₁]
template <typename T>
inline void rotate_row(const T* x, const T* c, const T* sn, T* y, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t j = 0; j < d; ++j) {
    const float rot = j < half ? -to_float(x[j + half]) : to_float(x[j - half]);
    const float a = to_float(round_to<T>(to_float(x[j]) * to_float(c[j])));
    const float r = to_float(round_to<T>(to_float(round_to<T>(rot)) * to_float(sn[j])));
    y[j] = round_to<T>(a + r);
  }
}

// n elements to fp32 (exactly: every source dtype is a subset of fp32)
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + kLanes <= n; i += kLanes) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

}  // namespace
