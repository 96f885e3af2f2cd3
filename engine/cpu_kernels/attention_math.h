// Helpers shared by the prefill/extend (attention.cc) and decode (decode_attention.cc)
// attention kernels: the softmax's exponentials, dot products, weighted sums over a
// sequence's pages, the rotary embedding and a view of one token's fused projection.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels.h"
#include "kv_storage.h"
#include "vector_math.h"

namespace jaxfire::attention {

// s[t] = e^(s[t] - top) for t < n; returns their sum.
inline float exp_shifted(float* s, int64_t n, float top) {
  int64_t t = 0;
  __m256 total = _mm256_setzero_ps();
  const __m256 shift = _mm256_set1_ps(top);
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), shift));
    _mm256_storeu_ps(s + t, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = hsum(total);
  for (; t < n; ++t) sum += s[t] = std::exp(s[t] - top);
  return sum;
}

// A row of the cache (dim floats) into L1, a few rows before it is read: the rows of one
// (sequence, head) are one short stream per call (a stream per page), too short for the
// hardware prefetcher.
constexpr int64_t kAhead = 8;
template <class T>
void prefetch_row(const T* row, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t i = 0; i < dim * static_cast<int64_t>(sizeof(T)); i += 64) {
    _mm_prefetch(bytes + i, _MM_HINT_T0);
  }
}

// a . b, b a row of the pool (any KV type). Four independent sums: a head's 64 products in
// one chain waited on the FMA latency.
template <class T>
float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), load8(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), load8(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  }
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) sum += a[i] * to_float(b[i]);
  return sum;
}

// o[d] = sum_t p[t] * v[t][d] over the value rows of positions first .. first + seen - 1 of KV
// head h, read through `rows` from the pool `values`. 64 columns at a time held in registers
// over all positions, page after page: an axpy per position stored the output and loaded it
// back, a chain through memory.
template <class T>
void weighted_sum(const float* p, const T* values, const jaxfire::PagedRows& rows, int64_t h,
                  int64_t first, int64_t seen, float* o) {
  const int64_t dim = rows.dim;
  int64_t d = 0;
  for (; d + 64 <= dim; d += 64) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0;
    rows.runs(h, first, seen, [&](int64_t t0, int64_t offset, int64_t n, int64_t) {
      const T* v = values + offset + d;
      for (int64_t t = 0; t < n; ++t) {
        const __m256 w = _mm256_broadcast_ss(p + t0 + t);
        const T* vt = v + t * dim;
        a0 = _mm256_fmadd_ps(w, load8(vt), a0);
        a1 = _mm256_fmadd_ps(w, load8(vt + 8), a1);
        a2 = _mm256_fmadd_ps(w, load8(vt + 16), a2);
        a3 = _mm256_fmadd_ps(w, load8(vt + 24), a3);
        a4 = _mm256_fmadd_ps(w, load8(vt + 32), a4);
        a5 = _mm256_fmadd_ps(w, load8(vt + 40), a5);
        a6 = _mm256_fmadd_ps(w, load8(vt + 48), a6);
        a7 = _mm256_fmadd_ps(w, load8(vt + 56), a7);
      }
    });
    const __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + d + 8 * i, acc[i]);
  }
  for (; d + 8 <= dim; d += 8) {
    __m256 a = _mm256_setzero_ps();
    rows.runs(h, first, seen, [&](int64_t t0, int64_t offset, int64_t n, int64_t) {
      const T* v = values + offset + d;
      for (int64_t t = 0; t < n; ++t) {
        a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + t0 + t), load8(v + t * dim), a);
      }
    });
    _mm256_storeu_ps(o + d, a);
  }
  for (; d < dim; ++d) {
    float sum = 0.0f;
    rows.runs(h, first, seen, [&](int64_t t0, int64_t offset, int64_t n, int64_t) {
      const T* v = values + offset + d;
      for (int64_t t = 0; t < n; ++t) sum = std::fma(p[t0 + t], to_float(v[t * dim]), sum);
    });
    o[d] = sum;
  }
}

// o = the softmax of the scores s (overwritten) weighting the value rows of positions
// first .. first + seen - 1 (seen > 0), as weighted_sum reads them.
template <class T>
void attend(float* s, const T* values, const jaxfire::PagedRows& rows, int64_t h, int64_t first,
            int64_t seen, float* o) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < seen; ++t) top = std::max(top, s[t]);
  const float inv = 1.0f / exp_shifted(s, seen, top);
  for (int64_t t = 0; t < seen; ++t) s[t] *= inv;
  weighted_sum(s, values, rows, h, first, seen, o);
}

// y = rotate-half rotary embedding of x [dim]: (x1 cos - x2 sin, x2 cos + x1 sin).
inline void rotate(const float* x, const float* cos, const float* sin, int64_t dim, float* y) {
  const int64_t half = dim / 2;
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + half + i);
    const __m256 c = _mm256_loadu_ps(cos + i), s = _mm256_loadu_ps(sin + i);
    _mm256_storeu_ps(y + i, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
    _mm256_storeu_ps(y + half + i, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
  }
  for (; i < half; ++i) {
    const float a = x[i], b = x[half + i];
    y[i] = a * cos[i] - b * sin[i];
    y[half + i] = b * cos[i] + a * sin[i];
  }
}

// One token of the fused projection, [(H + 2K) D]: H query heads, then K keys, then K
// values; its rotation's cos / sin [D / 2].
struct Token {
  const float *x, *cos, *sin;
  int64_t heads, kv_heads, dim;
  void query(int64_t h, float* out) const { rotate(x + h * dim, cos, sin, dim, out); }
  // The rotated key / the value of KV head h into a pool row (any KV type); `scratch`
  // holds dim floats.
  template <class T>
  void key(int64_t h, T* out, float* scratch) const {
    rotate(x + (heads + h) * dim, cos, sin, dim, scratch);
    store_row(scratch, dim, out);
  }
  template <class T>
  void value(int64_t h, T* out) const {
    store_row(x + (heads + kv_heads + h) * dim, dim, out);
  }
};

}  // namespace jaxfire::attention
