// Prefill and extend attention for XLA CPU (decode attention: decode_attention.cc).
//
// The cache is a pool of pages per layer, K and V each [num_pages, kv_heads, page_size, dim];
// a sequence reaches its positions through its page-table row (kernels.h's PagedRows), and
// every loop over cached positions walks them page by page.
//
// Prefill: a prompt's causal self-attention straight from its fused q/k/v projection, rotary
// embedding included, returning the keys and values in the cache's layout. Through XLA the
// split, the rotations, the transposes to and from the heads-first layout and the batched
// dots were a quarter of a 128-token prefill, nearly all of it copies and per-op overhead.
//
// Extend: the same for new tokens of sequences whose earlier positions their pages already
// hold (a prompt after its cached prefix, a chunk of a long one, several short prompts in
// one call): keys and values written into the pages in place, queries attending to their
// sequence's positions through its pages.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention_math.h"
#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxfire::attention;  // NOLINT: this file is their other half

// One sequence's new tokens for the two-pass attention of a prompt: token t of `len` sits at
// position start + t; tokens from `valid` on are padding. Its keys and values go to the pools
// `keys` / `values` through `rows`: a fresh prefill's own buffers [B, K, len, D] (row b one
// page of len positions) or the cache's pages. Positions from `capacity` on (its pages' end)
// are not stored.
template <class T>  // the pools' element type
struct Span {
  const float* qkv;        // [len, (H + 2K) D]
  const float *cos, *sin;  // [len, D / 2]
  T *keys, *values;
  float* out;  // [len, H D]
  jaxfire::PagedRows rows;
  int64_t start, len, valid, capacity;
};

// Pass one writes every new token's rotated key and value (and its rotated query into out);
// pass two, once all are written, attends: each query at position p sees the positions
// max(0, p + 1 - window) .. p of its sequence. Padding writes nothing to a cache;
// `zero_padding` (fresh buffers) fills its keys, values and out with zeros.
template <class T>
void span_attention(ffi::ThreadPool& pool, const Span<T>* spans, int64_t count,
                    int64_t num_heads, int64_t kv_heads, int64_t dim, int64_t window,
                    bool zero_padding) {
  const int64_t groups = num_heads / kv_heads, width = (num_heads + 2 * kv_heads) * dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const int64_t len = spans[0].len;  // the same for every span
  jaxfire::parallel_for(pool, count * len, [=](int64_t u) {
    const Span<T>& s = spans[u / len];
    const int64_t t = u % len, p = s.start + t;
    const Token token{s.qkv + t * width, s.cos + t * (dim / 2), s.sin + t * (dim / 2),
                      num_heads, kv_heads, dim};
    float* o = s.out + t * num_heads * dim;
    const bool real = t < s.valid;
    for (int64_t h = 0; h < kv_heads && p < s.capacity && (real || zero_padding); ++h) {
      T* k = s.keys + s.rows.at(h, p);
      T* v = s.values + s.rows.at(h, p);
      if (!real) {
        jaxfire::zero_row(k, dim);
        jaxfire::zero_row(v, dim);
        continue;
      }
      token.key(h, k, o);  // o: scratch until the rotated queries go there below
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
    const Span<T>& s = spans[u / (kv_heads * blocks)];
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
          const T* k = s.keys + offset;
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
  std::vector<Span<float>> spans;
  for (int64_t b = 0; b < rows; ++b) {
    page[b] = static_cast<int32_t>(b);
    spans.push_back(Span<float>{qkv.typed_data() + b * len * width, cos_table.typed_data(),
                         sin_table.typed_data(), keys->typed_data(), values->typed_data(),
                         out->typed_data() + b * len * num_heads * dim,
                         jaxfire::PagedRows{page.data() + b, len, kv_heads, dim}, 0, len,
                         std::clamp<int64_t>(valid - b * len, 0, len), len});
  }
  span_attention(pool, spans.data(), rows, num_heads, kv_heads, dim, window, true);
  return ffi::Error::Success();
}

// B sequences' T new tokens each, extending what their pages hold: qkv [B, T, (H + 2K) D],
// cos / sin [B, T, D / 2] of row b's positions starts[b] .. starts[b] + T - 1, the first
// valid[b] of them real, pages [B, pages_per_seq] the rows' page-table rows. Their rotated
// keys and values are written into the pools [num_pages, K, page_size, D] (float32, float16
// or bfloat16) in place (aliased to the results; nothing past a row's last page), then each
// query at position p attends to its sequence's positions max(0, p + 1 - window) .. p.
// -> out [B, T, H D] (zeros for padding). A row's result does not depend on the others.
ffi::Error ExtendAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                           ffi::Buffer<ffi::F32> cos_table, ffi::Buffer<ffi::F32> sin_table,
                           ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> valid,
                           ffi::Buffer<ffi::S32> pages, ffi::AnyBuffer, ffi::AnyBuffer,
                           ffi::ResultBuffer<ffi::F32> out, ffi::Result<ffi::AnyBuffer> keys,
                           ffi::Result<ffi::AnyBuffer> values, int64_t num_heads,
                           int64_t window) {
  const auto xd = qkv.dimensions();
  const auto cd = keys->dimensions();
  if (xd.size() != 3 || cd.size() != 4 || keys->element_type() != values->element_type()) {
    return ffi::Error::InvalidArgument(
        "qkv must be [B, T, (H + 2K) D] and caches [num_pages, K, page_size, D] of one type");
  }
  const int64_t rows = xd[0], len = xd[1], num_pages = cd[0], kv_heads = cd[1],
                page_size = cd[2], dim = cd[3];
  const int64_t pages_per_seq = rows == 0 ? 0 : pages.element_count() / rows;
  if (kv_heads <= 0 || num_heads % kv_heads != 0 || dim % 2 != 0 || pages_per_seq == 0 ||
      pages.element_count() != rows * pages_per_seq ||
      xd[2] != (num_heads + 2 * kv_heads) * dim ||
      cos_table.element_count() != rows * len * (dim / 2) || starts.element_count() != rows ||
      valid.element_count() != rows) {
    return ffi::Error::InvalidArgument("qkv, cos/sin, starts, valid, pages and caches disagree");
  }
  const int32_t* first = starts.typed_data();
  if (std::any_of(first, first + rows, [](int32_t s) { return s < 0; })) {
    return ffi::Error::InvalidArgument("starts must be >= 0");
  }
  if (const char* error =
          jaxfire::check_pages(pages.typed_data(), pages.element_count(), num_pages)) {
    return ffi::Error::InvalidArgument(error);
  }
  return jaxfire::with_kv_type(keys->element_type(), [&](auto kind) {
    using T = decltype(kind);
    const int64_t width = xd[2], half = dim / 2;
    std::vector<Span<T>> spans;
    for (int64_t b = 0; b < rows; ++b) {
      spans.push_back(Span<T>{
          qkv.typed_data() + b * len * width, cos_table.typed_data() + b * len * half,
          sin_table.typed_data() + b * len * half, static_cast<T*>(keys->untyped_data()),
          static_cast<T*>(values->untyped_data()), out->typed_data() + b * len * num_heads * dim,
          jaxfire::PagedRows{pages.typed_data() + b * pages_per_seq, page_size, kv_heads, dim},
          first[b], len, std::clamp<int64_t>(valid.typed_data()[b], 0, len),
          pages_per_seq * page_size});
    }
    span_attention(pool, spans.data(), rows, num_heads, kv_heads, dim, window, false);
    return ffi::Error::Success();
  });
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
                                  .Arg<ffi::AnyBuffer>()  // the caches, aliased to
                                  .Arg<ffi::AnyBuffer>()  // the last two results
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("window"));
