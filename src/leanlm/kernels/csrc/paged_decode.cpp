// Decode attention over the serving engine's paged K/V cache, on the CPU.
//
// One query per request (the engine's steady state). Work item r reads request r's keys through
// its block table straight from the cache, in the cache's dtype, a whole slot row (every K/V
// head) at a time, each K/V head once for its query-head group; no gathered copy of K/V is ever
// made. Scores,
// softmax and the weighted sum of values are fp32, in the order of the torch reference
// (leanlm.kernels.paged_attention.decode_reference): s_j = (q · k_j)·scale, p_j = e^{s_j − max s}
// / Σ_j e^{s_j − max s}, o = Σ_j p_j v_j. Work items run in parallel on ATen's thread pool.
//
// rotary_decode (and rotary_decode_qkv, on the fused q/k/v projection's output) takes the step's
// q, k and v unrotated: each work item first rotates its request's k and q (norm_rotary.cpp's
// roundings, cpu_vec.h's rotate_row) and writes its k and v to its slot, then reads its keys as
// above — what two rotary ops, two K/V row stores and paged_decode would compute, in one op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_vec.h"

namespace {

// Rows come from scattered blocks: ask for the one kAhead keys on while this one is scored.
constexpr int64_t kAhead = 4;
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
}

// q · k, q in fp32, k converted as it is read
template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + kLanes <= n; i += kLanes) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += q[i] * to_float(k[i]);
  return s;
}

// y += p·x, x converted as it is read
template <typename T>
inline void axpy(float p, const T* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + kLanes <= n; i += kLanes)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(pv, load16(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += p * to_float(x[i]);
}

// s[0:n] <- e^{s_j − max s} / Σ_j e^{s_j − max s}
inline void softmax(float* s, int64_t n) {
  int64_t j = 0;
  float top = -std::numeric_limits<float>::infinity(), total = 0.f;
#if defined(__AVX512F__)
  __m512 vtop = _mm512_set1_ps(top);
  for (; j + kLanes <= n; j += kLanes) vtop = _mm512_max_ps(vtop, _mm512_loadu_ps(s + j));
  top = _mm512_reduce_max_ps(vtop);
#endif
  for (; j < n; ++j) top = std::max(top, s[j]);
  j = 0;
#if defined(__AVX512F__)
  const __m512 vmax = _mm512_set1_ps(top);
  __m512 vsum = _mm512_setzero_ps();
  for (; j + kLanes <= n; j += kLanes) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmax));
    _mm512_storeu_ps(s + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  total = _mm512_reduce_add_ps(vsum);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - top);
    total += s[j];
  }
  j = 0;
#if defined(__AVX512F__)
  const __m512 vtotal = _mm512_set1_ps(total);
  for (; j + kLanes <= n; j += kLanes) _mm512_storeu_ps(s + j, _mm512_div_ps(_mm512_loadu_ps(s + j), vtotal));
#endif
  for (; j < n; ++j) s[j] /= total;
}

#if defined(__AVX512F__)
// out lane i = the sum of v[i]'s lanes, for 16 vectors: a transpose-and-add tree (45 ops where 16
// horizontal reductions take ~110)
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's sums of v[4i..4i+3]
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xEE));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
}

// One head of D = 16·C: s[j] = (q · k_j)·scale over the request's keys (rows: their slots; base:
// the head's first element in the cache), q held in registers and 16 keys' sums reduced at once;
// then o = Σ_j p_j v_j with o in registers (the same order of multiply-adds as axpy's).
template <int C, typename T>
void head_scores(const float* q, const T* base, int64_t stride, const int64_t* rows, int64_t len, float scale,
                 float* s, const T* ahead, int64_t row_bytes) {
  __m512 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    __m512 v[16];
    for (int t = 0; t < 16; ++t) {
      if (ahead && j + t + kAhead < len) prefetch(ahead + rows[j + t + kAhead] * stride, row_bytes);
      const T* k = base + rows[j + t] * stride;
      __m512 acc = _mm512_mul_ps(qv[0], load16(k));
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], load16(k + 16 * c), acc);
      v[t] = acc;
    }
    _mm512_storeu_ps(s + j, _mm512_mul_ps(sum16(v), _mm512_set1_ps(scale)));
  }
  for (; j < len; ++j) s[j] = dot(q, base + rows[j] * stride, 16 * C) * scale;
}

template <int C, typename T>
void head_values(const float* p, const T* base, int64_t stride, const int64_t* rows, int64_t len, T* out) {
  __m512 a[C];
  for (int c = 0; c < C; ++c) a[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    const __m512 pv = _mm512_set1_ps(p[j]);
    const T* v = base + rows[j] * stride;
    for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(pv, load16(v + 16 * c), a[c]);
  }
  float o[16 * C];
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + 16 * c, a[c]);
  for (int i = 0; i < 16 * C; ++i) out[i] = static_cast<T>(o[i]);
}
#endif

// The step's own K/V and the rotary tables, for rotary_decode: request r's work item rotates its
// k and q, and stores its k and v in its slot, before it reads its keys.
struct Fresh {
  at::Tensor k, v, cos, sin, slots;  // k/v [R, kv_heads, D]; cos/sin [R, D]; slots [R] int64
};

template <typename scalar_t>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& tables, const at::Tensor& lens, int64_t block_size, double scale,
            int64_t window, at::Tensor& out, const Fresh* fresh = nullptr) {
  const int64_t requests = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t group = heads / k_cache.size(1), width = tables.size(1);
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);
  const int64_t row_bytes = k_cache.size(1) * d * static_cast<int64_t>(sizeof(scalar_t));

  // The step's own K/V first, every row's before any row attends: rows of one request (drafts to
  // verify) read each other's keys, as the reference, which stores them all and then attends.
  if (fresh) {
    at::parallel_for(0, requests, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* c = fresh->cos.data_ptr<scalar_t>() + r * fresh->cos.stride(0);
        const scalar_t* sn = fresh->sin.data_ptr<scalar_t>() + r * fresh->sin.stride(0);
        const int64_t slot = fresh->slots.data_ptr<int64_t>()[r];
        const scalar_t* k = fresh->k.data_ptr<scalar_t>() + r * fresh->k.stride(0);
        const scalar_t* v = fresh->v.data_ptr<scalar_t>() + r * fresh->v.stride(0);
        scalar_t* kc = const_cast<scalar_t*>(kp) + slot * ks0;
        scalar_t* vc = const_cast<scalar_t*>(vp) + slot * vs0;
        for (int64_t h = 0; h < k_cache.size(1); ++h) {
          rotate_row(k + h * fresh->k.stride(1), c, sn, kc + h * ks1, d);
          std::copy(v + h * fresh->v.stride(1), v + h * fresh->v.stride(1) + d, vc + h * vs1);
        }
      }
    });
  }

  // One request per work item: a slot's K (or V) row holds every K/V head side by side, and a
  // block's slots are contiguous, so the request's keys are read as whole, sequential rows.
  at::parallel_for(0, requests, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(heads * d), acc(heads * d), scores;
    std::vector<int64_t> rows;
    std::vector<scalar_t> rotated(fresh ? d : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = lp[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0, len = n - first;
      scores.resize(heads * len);
      if (fresh) {
        const scalar_t* c = fresh->cos.data_ptr<scalar_t>() + r * fresh->cos.stride(0);
        const scalar_t* sn = fresh->sin.data_ptr<scalar_t>() + r * fresh->sin.stride(0);
        for (int64_t h = 0; h < heads; ++h) {
          rotate_row(qp + r * qs0 + h * qs1, c, sn, rotated.data(), d);
          widen(rotated.data(), qf.data() + h * d, d);
        }
      } else {
        for (int64_t h = 0; h < heads; ++h) widen(qp + r * qs0 + h * qs1, qf.data() + h * d, d);
      }
      const int32_t* table = tp + r * width;
      auto slot_of = [&](int64_t pos) {
        return static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size;
      };
#if defined(__AVX512F__)
      if (d == 64 || d == 128) {  // head by head, q and o in registers
        rows.resize(len);
        for (int64_t j = 0; j < len; ++j) rows[j] = slot_of(first + j);
        for (int64_t j = 0; j < std::min(len, kAhead); ++j) prefetch(kp + rows[j] * ks0, row_bytes);
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* kh = kp + (h / group) * ks1;
          const scalar_t* ahead = h == 0 ? kp : nullptr;  // the first head's pass fetches whole rows
          float* s = scores.data() + h * len;
          if (d == 64) head_scores<4>(qf.data() + h * d, kh, ks0, rows.data(), len, fscale, s, ahead, row_bytes);
          else head_scores<8>(qf.data() + h * d, kh, ks0, rows.data(), len, fscale, s, ahead, row_bytes);
          softmax(scores.data() + h * len, len);
          const scalar_t* vh = vp + (h / group) * vs1;
          scalar_t* o = op + r * os0 + h * os1;
          if (d == 64) head_values<4>(scores.data() + h * len, vh, vs0, rows.data(), len, o);
          else head_values<8>(scores.data() + h * len, vh, vs0, rows.data(), len, o);
        }
        continue;
      }
#endif
      for (int64_t j = 0; j < len; ++j) {
        const scalar_t* row = kp + slot_of(first + j) * ks0;
        if (j + kAhead < len) prefetch(kp + slot_of(first + j + kAhead) * ks0, row_bytes);
        prefetch(vp + slot_of(first + j) * vs0, row_bytes);  // for the second pass
        for (int64_t h = 0; h < heads; ++h)
          scores[h * len + j] = dot(qf.data() + h * d, row + (h / group) * ks1, d) * fscale;
      }
      for (int64_t h = 0; h < heads; ++h) softmax(scores.data() + h * len, len);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < len; ++j) {
        const scalar_t* row = vp + slot_of(first + j) * vs0;
        for (int64_t h = 0; h < heads; ++h) axpy(scores[h * len + j], row + (h / group) * vs1, acc.data() + h * d, d);
      }
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* o = op + r * os0 + h * os1;
        for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(acc[h * d + i]);
      }
    }
  });
}

// q [R, H, D]; caches [slots, kv_heads, D] (q's dtype, unit stride on D); block_tables [R, W]
// int32; seq_lens [R] int64 (keys per request, ≥ 1); window ≤ 0: none. -> [R, H, D].
at::Tensor run_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size,
                      double scale, int64_t window, const Fresh* fresh) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q and caches must be 3-d");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "q must be float32, bfloat16 or float16");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "q and the caches need unit stride on the head dimension");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of K/V heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous(), "block_tables: contiguous int32");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous(), "seq_lens: contiguous int64");
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  switch (q.scalar_type()) {
    case at::kFloat: decode<float>(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, window, out, fresh); break;
    case at::kBFloat16: decode<c10::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, window, out, fresh); break;
    default: decode<c10::Half>(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, window, out, fresh);
  }
  return out;
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size,
                        double scale, int64_t window) {
  return run_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, window, nullptr);
}

// paged_decode of a step's unrotated q [R, H, D] whose own k/v [R, kv_heads, D] (unrotated) go to
// the caches first: per request, k and q rotated by cos/sin [R, D] (leanlm.kernels.rotary's
// roundings), k and v written to slot slots[r], then its keys read: what rotary, two K/V row
// stores and paged_decode compute, in one op.
at::Tensor rotary_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         int64_t block_size, double scale, int64_t window) {
  const int64_t r = q.size(0), d = q.size(2);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(0) == r && v.size(0) == r && k.size(1) == k_cache.size(1) &&
                  v.size(1) == v_cache.size(1) && k.size(2) == d && v.size(2) == d,
              "rotary_decode: k and v must be [R, kv_heads, D] like q and the caches");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == r && cos.size(1) == d && d % 2 == 0,
              "rotary_decode: cos and sin must be [R, D] (D even)");
  for (const at::Tensor* t : {&k, &v, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->stride(-1) == 1,
                "rotary_decode: k, v, cos and sin in q's dtype, with unit stride on D");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == r && slots.is_contiguous(),
              "rotary_decode: slots must be contiguous int64 [R]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "rotary_decode: contiguous caches");
  Fresh fresh{k, v, cos, sin, slots};
  return run_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, window, &fresh);
}

// rotary_decode of one projection's output qkv [R, (H + 2·kv_heads)·D] (q, k and v side by side,
// as the fused q/k/v linear makes them), cos/sin [..., R, D] -> [R, H·D], the o projection's input
at::Tensor rotary_decode_qkv(const at::Tensor& qkv, int64_t heads, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size,
                             double scale, int64_t window) {
  TORCH_CHECK(k_cache.dim() == 3, "rotary_decode_qkv: caches [slots, kv_heads, D]");
  const int64_t kv_heads = k_cache.size(1), d = k_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && heads > 0 && qkv.size(1) == (heads + 2 * kv_heads) * d,
              "rotary_decode_qkv: qkv must be [R, (heads + 2 kv_heads) D] with unit stride on its columns");
  TORCH_CHECK(cos.size(-1) == d && sin.sizes() == cos.sizes() && cos.numel() == qkv.size(0) * d,
              "rotary_decode_qkv: cos and sin must hold one [D] row per request");
  const int64_t r = qkv.size(0);
  const at::Tensor q = qkv.narrow(1, 0, heads * d).view({r, heads, d});
  const at::Tensor k = qkv.narrow(1, heads * d, kv_heads * d).view({r, kv_heads, d});
  const at::Tensor v = qkv.narrow(1, (heads + kv_heads) * d, kv_heads * d).view({r, kv_heads, d});
  return rotary_decode(q, k, v, cos.reshape({r, d}), sin.reshape({r, d}), k_cache, v_cache, slots, block_tables,
                       seq_lens, block_size, scale, window)
      .view({r, heads * d});
}

}  // namespace

TORCH_LIBRARY(leanlm_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "int block_size, float scale, int window) -> Tensor");
  m.def("rotary_decode(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, Tensor block_tables, Tensor seq_lens, int block_size, float scale, "
        "int window) -> Tensor");
  m.def("rotary_decode_qkv(Tensor qkv, int heads, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor block_tables, Tensor seq_lens, int block_size, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm_cpu, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("rotary_decode", &rotary_decode);
  m.impl("rotary_decode_qkv", &rotary_decode_qkv);
}
