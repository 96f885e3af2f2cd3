// Attention for XLA CPU.
//
// The cache is a pool of pages per layer, K and V each [num_pages, kv_heads, page_size, dim];
// a sequence reaches its positions through its page-table row (kernels.h's PagedRows), and
// every loop over cached positions walks them page by page.
//
// Decode: one token per row, straight from its fused q/k/v projection: the rotary embedding,
// the new key and value written into the row's page in place, and attention over the row's
// own cached positions. XLA sliced every layer's K and V out of the cache each step
// (a copy of the whole attended window) and ran the per-row scores and weighted sums as
// generic fusions; at batch 32 that was over half the decode step. Here each (row, KV head)
// reads only the positions its query can see, once, for all the query heads of its group.
//
// Prefill: a prompt's causal self-attention straight from its fused q/k/v projection, rotary
// embedding included, returning the keys and values in the cache's layout. Through XLA the
// split, the rotations, the transposes to and from the heads-first layout and the batched
// dots were a quarter of a 128-token prefill, nearly all of it copies and per-op overhead.
//
// Extend: the same for new tokens of a sequence whose earlier positions its pages already
// hold (a prompt sharing a prefix with the slot's last one): keys and values written into
// its pages in place, queries attending to the sequence's positions through its pages.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vector_math.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxfire::exp8;
using jaxfire::hsum;

// s[t] = e^(s[t] - top) for t < n; returns their sum.
float exp_shifted(float* s, int64_t n, float top) {
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
inline void prefetch_row(const float* row, int64_t dim) {
  for (int64_t i = 0; i < dim; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
  }
}

// Four independent sums: a head's 64 products in one chain waited on the FMA latency.
float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// o[d] = sum_t p[t] * v[t][d] over the value rows of positions first .. first + seen - 1 of KV
// head h, read through `rows` from the pool `values`. 64 columns at a time held in registers
// over all positions, page after page: an axpy per position stored the output and loaded it
// back, a chain through memory.
void weighted_sum(const float* p, const float* values, const jaxfire::PagedRows& rows, int64_t h,
                  int64_t first, int64_t seen, float* o) {
  const int64_t dim = rows.dim;
  int64_t d = 0;
  for (; d + 64 <= dim; d += 64) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0;
    rows.runs(h, first, seen, [&](int64_t t0, int64_t offset, int64_t n, int64_t) {
      const float* v = values + offset + d;
      for (int64_t t = 0; t < n; ++t) {
        const __m256 w = _mm256_broadcast_ss(p + t0 + t);
        const float* vt = v + t * dim;
        a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt), a0);
        a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8), a1);
        a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 16), a2);
        a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 24), a3);
        a4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 32), a4);
        a5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 40), a5);
        a6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 48), a6);
        a7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 56), a7);
      }
    });
    const __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + d + 8 * i, acc[i]);
  }
  for (; d + 8 <= dim; d += 8) {
    __m256 a = _mm256_setzero_ps();
    rows.runs(h, first, seen, [&](int64_t t0, int64_t offset, int64_t n, int64_t) {
      const float* v = values + offset + d;
      for (int64_t t = 0; t < n; ++t) {
        a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + t0 + t), _mm256_loadu_ps(v + t * dim), a);
      }
    });
    _mm256_storeu_ps(o + d, a);
  }
  for (; d < dim; ++d) {
    float sum = 0.0f;
    rows.runs(h, first, seen, [&](int64_t t0, int64_t offset, int64_t n, int64_t) {
      const float* v = values + offset + d;
      for (int64_t t = 0; t < n; ++t) sum = std::fma(p[t0 + t], v[t * dim], sum);
    });
    o[d] = sum;
  }
}

// o = the softmax of the scores s (overwritten) weighting the value rows of positions
// first .. first + seen - 1 (seen > 0), as weighted_sum reads them.
void attend(float* s, const float* values, const jaxfire::PagedRows& rows, int64_t h,
            int64_t first, int64_t seen, float* o) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < seen; ++t) top = std::max(top, s[t]);
  const float inv = 1.0f / exp_shifted(s, seen, top);
  for (int64_t t = 0; t < seen; ++t) s[t] *= inv;
  weighted_sum(s, values, rows, h, first, seen, o);
}

// y = rotate-half rotary embedding of x [dim]: (x1 cos - x2 sin, x2 cos + x1 sin).
void rotate(const float* x, const float* cos, const float* sin, int64_t dim, float* y) {
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
  void key(int64_t h, float* out) const { rotate(x + (heads + h) * dim, cos, sin, dim, out); }
  void value(int64_t h, float* out) const {
    const float* v = x + (heads + kv_heads + h) * dim;
    std::copy(v, v + dim, out);
  }
};

// One sequence's new tokens for the two-pass attention of a prompt: token t of `len` sits at
// position start + t; tokens from `valid` on are padding. Its keys and values go to the pools
// `keys` / `values` through `rows`: a fresh prefill's own buffers [B, K, len, D] (row b one
// page of len positions) or the cache's pages. Positions from `capacity` on (its pages' end)
// are not stored.
struct Span {
  const float* qkv;            // [len, (H + 2K) D]
  const float *cos, *sin;      // [len, D / 2]
  float *keys, *values, *out;  // out [len, H D]
  jaxfire::PagedRows rows;
  int64_t start, len, valid, capacity;
};

// Pass one writes every new token's rotated key and value (and its rotated query into out);
// pass two, once all are written, attends: each query at position p sees the positions
// max(0, p + 1 - window) .. p of its sequence. Padding writes nothing to a cache;
// `zero_padding` (fresh buffers) fills its keys, values and out with zeros.
void span_attention(ffi::ThreadPool& pool, const Span* spans, int64_t count, int64_t num_heads,
                    int64_t kv_heads, int64_t dim, int64_t window, bool zero_padding) {
  const int64_t groups = num_heads / kv_heads, width = (num_heads + 2 * kv_heads) * dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const int64_t len = spans[0].len;  // the same for every span
  jaxfire::parallel_for(pool, count * len, [=](int64_t u) {
    const Span& s = spans[u / len];
    const int64_t t = u % len, p = s.start + t;
    const Token token{s.qkv + t * width, s.cos + t * (dim / 2), s.sin + t * (dim / 2),
                      num_heads, kv_heads, dim};
    float* o = s.out + t * num_heads * dim;
    const bool real = t < s.valid;
    for (int64_t h = 0; h < kv_heads && p < s.capacity && (real || zero_padding); ++h) {
      float* k = s.keys + s.rows.at(h, p);
      float* v = s.values + s.rows.at(h, p);
      if (!real) {
        std::fill(k, k + dim, 0.0f);
        std::fill(v, v + dim, 0.0f);
        continue;
      }
      token.key(h, k);
      token.value(h, v);
    }
    if (!real) return std::fill(o, o + num_heads * dim, 0.0f);
    for (int64_t h = 0; h < num_heads; ++h) token.query(h, o + h * dim);
  });

  // (span, KV head, block of 8 queries) units: the scores, softmax and weighted sum of each
  // query head of the group, in place of its rotated query.
  constexpr int64_t kBlock = 8;
  const int64_t blocks = (len + kBlock - 1) / kBlock;
  jaxfire::parallel_for(pool, count * kv_heads * blocks, [=](int64_t u) {
    const Span& s = spans[u / (kv_heads * blocks)];
    const int64_t h = u / blocks % kv_heads, blk = u % blocks;
    thread_local std::vector<float> scores, query;
    query.resize(dim);
    for (int64_t t = blk * kBlock; t < std::min(s.valid, (blk + 1) * kBlock); ++t) {
      const int64_t last = std::min(s.start + t, s.capacity - 1);
      const int64_t first = window > 0 ? std::max<int64_t>(0, last + 1 - window) : 0;
      const int64_t seen = last + 1 - first;
      scores.resize(seen);
      for (int64_t g = 0; g < groups; ++g) {
        float* o = s.out + (t * num_heads + h * groups + g) * dim;
        for (int64_t i = 0; i < dim; ++i) query[i] = o[i] * scale;  // as decode rounds
        s.rows.runs(h, first, seen, [&](int64_t t0, int64_t offset, int64_t n, int64_t) {
          const float* k = s.keys + offset;
          for (int64_t j = 0; j < n; ++j) scores[t0 + j] = dot(query.data(), k + j * dim, dim);
        });
        attend(scores.data(), s.values, s.rows, h, first, seen, o);
      }
    }
  });
}

// qkv [B, T, (H + 2K) D] (queries, keys, values side by side, token t at position t),
// cos / sin [T, D / 2], valid (tokens from this one on, over [B, T], are padding) ->
// out [B, T, H D], keys and values [B, K, T, D] with the keys rotated. The query at position
// t sees keys max(0, t + 1 - window) .. t (window 0: no window); padding gets zeros.
ffi::Error PrefillAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                            ffi::Buffer<ffi::F32> cos_table, ffi::Buffer<ffi::F32> sin_table,
                            ffi::Buffer<ffi::S32> valid_rows, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> keys, ffi::ResultBuffer<ffi::F32> values,
                            int64_t num_heads, int64_t window) {
  const auto xd = qkv.dimensions();
  const auto kd = keys->dimensions();
  if (xd.size() != 3 || kd.size() != 4) {
    return ffi::Error::InvalidArgument("qkv must be [B, T, (H + 2K) D] and keys [B, K, T, D]");
  }
  const int64_t rows = xd[0], len = xd[1], kv_heads = kd[1], dim = kd[3];
  const int64_t width = (num_heads + 2 * kv_heads) * dim;
  if (xd[2] != width || kd[0] != rows || kd[2] != len || num_heads % kv_heads != 0 ||
      cos_table.element_count() != len * (dim / 2) || dim % 2 != 0) {
    return ffi::Error::InvalidArgument("qkv, cos/sin and keys shapes disagree");
  }
  const int64_t valid = std::clamp<int64_t>(valid_rows.typed_data()[0], 0, rows * len);
  std::vector<int32_t> page(rows);  // row b's buffers are page b of len positions
  std::vector<Span> spans;
  for (int64_t b = 0; b < rows; ++b) {
    page[b] = static_cast<int32_t>(b);
    spans.push_back(Span{qkv.typed_data() + b * len * width, cos_table.typed_data(),
                         sin_table.typed_data(), keys->typed_data(), values->typed_data(),
                         out->typed_data() + b * len * num_heads * dim,
                         jaxfire::PagedRows{page.data() + b, len, kv_heads, dim}, 0, len,
                         std::clamp<int64_t>(valid - b * len, 0, len), len});
  }
  span_attention(pool, spans.data(), rows, num_heads, kv_heads, dim, window, true);
  return ffi::Error::Success();
}

// One sequence's T new tokens extending what its pages hold: qkv [1, T, (H + 2K) D],
// cos / sin [T, D / 2] of their positions start .. start + T - 1, the first `valid` of them
// real, pages [pages_per_seq] its page-table row. Their rotated keys and values are written
// into the pools [num_pages, K, page_size, D] in place (aliased to the results; nothing past
// its last page), then each query at position p attends to the sequence's positions
// max(0, p + 1 - window) .. p. -> out [1, T, H D] (zeros for padding).
ffi::Error ExtendAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                           ffi::Buffer<ffi::F32> cos_table, ffi::Buffer<ffi::F32> sin_table,
                           ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> valid,
                           ffi::Buffer<ffi::S32> pages, ffi::Buffer<ffi::F32>,
                           ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> keys, ffi::ResultBuffer<ffi::F32> values,
                           int64_t num_heads, int64_t window) {
  const auto xd = qkv.dimensions();
  const auto cd = keys->dimensions();
  if (xd.size() != 3 || xd[0] != 1 || cd.size() != 4) {
    return ffi::Error::InvalidArgument(
        "qkv must be [1, T, (H + 2K) D] and caches [num_pages, K, page_size, D]");
  }
  const int64_t len = xd[1], num_pages = cd[0], kv_heads = cd[1], page_size = cd[2],
                dim = cd[3], pages_per_seq = pages.element_count();
  if (kv_heads <= 0 || num_heads % kv_heads != 0 || dim % 2 != 0 || pages_per_seq == 0 ||
      xd[2] != (num_heads + 2 * kv_heads) * dim || cos_table.element_count() != len * (dim / 2)) {
    return ffi::Error::InvalidArgument("qkv, cos/sin, pages and caches shapes disagree");
  }
  const int64_t first = start.typed_data()[0];
  if (first < 0) return ffi::Error::InvalidArgument("start must be >= 0");
  if (const char* error = jaxfire::check_pages(pages.typed_data(), pages_per_seq, num_pages)) {
    return ffi::Error::InvalidArgument(error);
  }
  const Span span{qkv.typed_data(), cos_table.typed_data(), sin_table.typed_data(),
                  keys->typed_data(), values->typed_data(), out->typed_data(),
                  jaxfire::PagedRows{pages.typed_data(), page_size, kv_heads, dim}, first, len,
                  std::clamp<int64_t>(valid.typed_data()[0], 0, len), pages_per_seq * page_size};
  span_attention(pool, &span, 1, num_heads, kv_heads, dim, window, false);
  return ffi::Error::Success();
}

}  // namespace

namespace jaxfire {

const char* check_pages(const int32_t* pages, int64_t count, int64_t num_pages) {
  for (int64_t i = 0; i < count; ++i) {
    if (pages[i] < 0 || pages[i] >= num_pages) return "a page id is outside the page pool";
  }
  return nullptr;
}

const char* check_decode_geometry(const DecodeGeometry& g, int64_t qkv_width, int64_t positions,
                                  int64_t cos_elements, const int32_t* table,
                                  int64_t table_elements) {
  if (g.kv_heads <= 0 || g.heads % g.kv_heads != 0 || g.dim % 2 != 0 || g.pages_per_seq <= 0 ||
      qkv_width != (g.heads + 2 * g.kv_heads) * g.dim || positions != g.rows ||
      cos_elements != g.rows * (g.dim / 2) || table_elements != g.rows * g.pages_per_seq) {
    return "qkv, cos/sin, positions, page table and caches shapes disagree";
  }
  return check_pages(table, table_elements, g.num_pages);
}

void decode_attention(ffi::ThreadPool& pool, const DecodeGeometry& geo, const float* xp,
                      const float* cp, const float* sp, const int32_t* pos, const int32_t* table,
                      float* kp, float* vp, float* op) {
  const int64_t kv_heads = geo.kv_heads, dim = geo.dim, window = geo.window;
  const int64_t capacity = geo.pages_per_seq * geo.page_size;
  const int64_t num_heads = geo.heads, groups = num_heads / kv_heads;
  const int64_t width = (num_heads + 2 * kv_heads) * dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  parallel_for(pool, geo.rows * kv_heads, [=](int64_t u) {
    const int64_t b = u / kv_heads, h = u % kv_heads;
    const Token token{xp + b * width, cp + b * (dim / 2), sp + b * (dim / 2), num_heads,
                      kv_heads, dim};
    const PagedRows rows{table + b * geo.pages_per_seq, geo.page_size, kv_heads, dim};
    if (pos[b] >= 0 && pos[b] < capacity) {
      token.key(h, kp + rows.at(h, pos[b]));
      token.value(h, vp + rows.at(h, pos[b]));
    }
    const int64_t last = std::min<int64_t>(pos[b], capacity - 1);
    const int64_t first = window > 0 ? std::max<int64_t>(0, last + 1 - window) : 0;
    const int64_t seen = std::max<int64_t>(0, last + 1 - first);
    // Scores position by position for every query of the group (a key row is read once for
    // the group), then each query's weighted sum of the values, its output in registers.
    thread_local std::vector<float> scores, query;
    scores.resize(seen * groups);
    query.resize(groups * dim);
    float* oh = op + b * num_heads * dim + h * groups * dim;
    if (seen == 0) {
      std::fill(oh, oh + groups * dim, 0.0f);
      return;
    }
    for (int64_t g = 0; g < groups; ++g) {
      float* qg = query.data() + g * dim;
      token.query(h * groups + g, qg);
      for (int64_t i = 0; i < dim; ++i) qg[i] *= scale;
    }
    rows.runs(h, first, seen, [&](int64_t t0, int64_t offset, int64_t n, int64_t next) {
      const float *k = kp + offset, *v = vp + offset;
      for (int64_t t = 0; t < n; ++t) {
        // kAhead rows on, into the next page once this one ends.
        prefetch_row(t + kAhead < n ? k + (t + kAhead) * dim : kp + next + (t + kAhead - n) * dim,
                     dim);
        prefetch_row(v + t * dim, dim);  // read by the weighted sums next
        for (int64_t g = 0; g < groups; ++g) {
          scores[g * seen + t0 + t] = dot(query.data() + g * dim, k + t * dim, dim);
        }
      }
    });
    for (int64_t g = 0; g < groups; ++g) {
      attend(scores.data() + g * seen, vp, rows, h, first, seen, oh + g * dim);
    }
  });
}

}  // namespace jaxfire

namespace {

// qkv [B, (H + 2K) D] (one token per row: queries, keys, values side by side), cos / sin
// [B, D / 2], positions [B], page table [B, pages_per_seq], pools [num_pages, K, page_size, D]
// updated in place (aliased to the results) -> out [B, H D]. Row b's key (rotated) and value
// go to position p = positions[b] of its sequence, in page table[b, p / page_size] (none past
// its last page); its query at p sees positions max(0, p + 1 - window) .. p (window 0: no
// window).
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                           ffi::Buffer<ffi::F32> cos_table, ffi::Buffer<ffi::F32> sin_table,
                           ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> table,
                           ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> keys,
                           ffi::ResultBuffer<ffi::F32> values, int64_t num_heads, int64_t window) {
  const auto xd = qkv.dimensions();
  const auto cd = keys->dimensions();
  const auto vd = values->dimensions();
  const auto td = table.dimensions();
  if (xd.size() != 2 || cd.size() != 4 || td.size() != 2 ||
      !std::equal(cd.begin(), cd.end(), vd.begin())) {
    return ffi::Error::InvalidArgument(
        "qkv must be [B, (H + 2K) D], the page table [B, pages] and caches "
        "[num_pages, K, page_size, D]");
  }
  const jaxfire::DecodeGeometry geo{xd[0], num_heads, cd[1], cd[0], cd[2], td[1], cd[3], window};
  if (const char* error = jaxfire::check_decode_geometry(
          geo, xd[1], positions.element_count(), cos_table.element_count(), table.typed_data(),
          table.element_count())) {
    return ffi::Error::InvalidArgument(error);
  }
  jaxfire::decode_attention(pool, geo, qkv.typed_data(), cos_table.typed_data(),
                            sin_table.typed_data(), positions.typed_data(), table.typed_data(),
                            keys->typed_data(), values->typed_data(), out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfirePrefillAttention, PrefillAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfireExtendAttention, ExtendAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the caches, aliased to
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the last two results
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfireDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page table
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the caches, aliased to
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the last two results
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("window"));
