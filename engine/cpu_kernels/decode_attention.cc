// Decode attention for XLA CPU: one token per row, straight from its fused q/k/v projection:
// the rotary embedding, the new key and value written into the row's page in place, and
// attention over the row's own cached positions, walked page by page through its page-table
// row. XLA sliced every layer's K and V out of the cache each step (a copy of the whole
// attended window) and ran the per-row scores and weighted sums as generic fusions; at batch
// 32 that was over half the decode step. Here each (row, KV head) reads only the positions
// its query can see, once, for all the query heads of its group. layer.cc calls
// decode_attention too, inside its whole-layer kernel.
#include <cstdint>
#include <vector>

#include "attention_math.h"
#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jaxfire::attention;  // NOLINT: the helpers this kernel shares with attention.cc

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

template <class T>
void decode_attention(ffi::ThreadPool& pool, const DecodeGeometry& geo, const float* xp,
                      const float* cp, const float* sp, const int32_t* pos, const int32_t* table,
                      T* kp, T* vp, float* op) {
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
    // Scores position by position for every query of the group (a key row is read once for
    // the group), then each query's weighted sum of the values, its output in registers.
    thread_local std::vector<float> scores, query;
    query.resize(groups * dim);
    if (pos[b] >= 0 && pos[b] < capacity) {
      token.key(h, kp + rows.at(h, pos[b]), query.data());
      token.value(h, vp + rows.at(h, pos[b]));
    }
    const int64_t last = std::min<int64_t>(pos[b], capacity - 1);
    const int64_t first = window > 0 ? std::max<int64_t>(0, last + 1 - window) : 0;
    const int64_t seen = std::max<int64_t>(0, last + 1 - first);
    scores.resize(seen * groups);
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
      const T *k = kp + offset, *v = vp + offset;
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

template void decode_attention<float>(ffi::ThreadPool&, const DecodeGeometry&, const float*,
                                      const float*, const float*, const int32_t*,
                                      const int32_t*, float*, float*, float*);
template void decode_attention<Half>(ffi::ThreadPool&, const DecodeGeometry&, const float*,
                                     const float*, const float*, const int32_t*, const int32_t*,
                                     Half*, Half*, float*);
template void decode_attention<BFloat16>(ffi::ThreadPool&, const DecodeGeometry&, const float*,
                                         const float*, const float*, const int32_t*,
                                         const int32_t*, BFloat16*, BFloat16*, float*);

}  // namespace jaxfire

namespace {

// qkv [B, (H + 2K) D] (one token per row: queries, keys, values side by side), cos / sin
// [B, D / 2], positions [B], page table [B, pages_per_seq], pools [num_pages, K, page_size, D]
// (float32, float16 or bfloat16) updated in place (aliased to the results) -> out [B, H D].
// Row b's key (rotated) and value go to position p = positions[b] of its sequence, in page
// table[b, p / page_size] (none past its last page); its query at p sees positions
// max(0, p + 1 - window) .. p (window 0: no window).
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                           ffi::Buffer<ffi::F32> cos_table, ffi::Buffer<ffi::F32> sin_table,
                           ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> table,
                           ffi::AnyBuffer, ffi::AnyBuffer, ffi::ResultBuffer<ffi::F32> out,
                           ffi::Result<ffi::AnyBuffer> keys, ffi::Result<ffi::AnyBuffer> values,
                           int64_t num_heads, int64_t window) {
  const auto xd = qkv.dimensions();
  const auto cd = keys->dimensions();
  const auto vd = values->dimensions();
  const auto td = table.dimensions();
  if (xd.size() != 2 || cd.size() != 4 || td.size() != 2 ||
      !std::equal(cd.begin(), cd.end(), vd.begin()) ||
      keys->element_type() != values->element_type()) {
    return ffi::Error::InvalidArgument(
        "qkv must be [B, (H + 2K) D], the page table [B, pages] and caches "
        "[num_pages, K, page_size, D] of one type");
  }
  const jaxfire::DecodeGeometry geo{xd[0], num_heads, cd[1], cd[0], cd[2], td[1], cd[3], window};
  if (const char* error = jaxfire::check_decode_geometry(
          geo, xd[1], positions.element_count(), cos_table.element_count(), table.typed_data(),
          table.element_count())) {
    return ffi::Error::InvalidArgument(error);
  }
  return jaxfire::with_kv_type(keys->element_type(), [&](auto kind) {
    using T = decltype(kind);
    jaxfire::decode_attention(pool, geo, qkv.typed_data(), cos_table.typed_data(),
                              sin_table.typed_data(), positions.typed_data(), table.typed_data(),
                              static_cast<T*>(keys->untyped_data()),
                              static_cast<T*>(values->untyped_data()), out->typed_data());
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfireDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page table
                                  .Arg<ffi::AnyBuffer>()  // the caches, aliased to
                                  .Arg<ffi::AnyBuffer>()  // the last two results
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("window"));
