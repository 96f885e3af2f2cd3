// Decode attention for XLA CPU: one query token per row against that row's own cached
// keys and values, read in place from the preallocated cache.
//
// Why: XLA sliced every layer's K and V out of the cache each step (a copy of the whole
// attended window) and ran the per-row scores and weighted sums as generic fusions; at
// batch 32 that was over half the decode step. Here each (row, KV head) reads only the
// positions its query can see, once, for all the query heads of its group.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
  if (n >= 8) {
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    sum = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  int64_t i = 0;
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

// q [B, K, G, D], caches [slots, K, S, D], positions [B] -> out [B, K, G, D]. Row b's
// query at position p sees keys max(0, p + 1 - window) .. p (window 0: no window).
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                           ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                           int64_t window) {
  const auto qd = q.dimensions();
  const auto cd = keys.dimensions();
  const auto vd = values.dimensions();
  if (qd.size() != 4 || cd.size() != 4 || vd.size() != 4 ||
      !std::equal(cd.begin(), cd.end(), vd.begin())) {
    return ffi::Error::InvalidArgument("q must be [B, K, G, D] and caches [slots, K, S, D]");
  }
  const int64_t rows = qd[0], kv_heads = qd[1], groups = qd[2], dim = qd[3], len = cd[2];
  if (cd[0] < rows || cd[1] != kv_heads || cd[3] != dim || positions.element_count() != rows) {
    return ffi::Error::InvalidArgument("q, caches and positions shapes disagree");
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const float* qp = q.typed_data();
  const float* kp = keys.typed_data();
  const float* vp = values.typed_data();
  const int32_t* pos = positions.typed_data();
  float* op = out->typed_data();

  jaxfire::parallel_for(pool, rows * kv_heads, [=](int64_t u) {
    const int64_t b = u / kv_heads, h = u % kv_heads;
    const int64_t last = std::min<int64_t>(pos[b], len - 1);
    const int64_t first = window > 0 ? std::max<int64_t>(0, last + 1 - window) : 0;
    const int64_t seen = std::max<int64_t>(0, last + 1 - first);
    const float* k = kp + ((b * kv_heads + h) * len + first) * dim;
    const float* v = vp + ((b * kv_heads + h) * len + first) * dim;
    thread_local std::vector<float> scores, query;
    scores.resize(seen * groups);
    query.resize(dim);
    for (int64_t g = 0; g < groups; ++g) {
      const float* qg = qp + ((b * kv_heads + h) * groups + g) * dim;
      float* o = op + ((b * kv_heads + h) * groups + g) * dim;
      std::fill(o, o + dim, 0.0f);
      if (seen == 0) continue;
      for (int64_t d = 0; d < dim; ++d) query[d] = qg[d] * scale;  // as the XLA path rounds
      float* s = scores.data() + g * seen;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < seen; ++t) top = std::max(top, s[t] = dot(query.data(), k + t * dim, dim));
      float total = 0.0f;
      for (int64_t t = 0; t < seen; ++t) total += s[t] = std::exp(s[t] - top);
      const float inv = 1.0f / total;
      for (int64_t t = 0; t < seen; ++t) axpy(s[t] * inv, v + t * dim, o, dim);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfireDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));
