// Decode attention for XLA CPU: one token per row, straight from its fused q/k/v projection:
// the rotary embedding, the new key and value written into the row's page in place, and
// attention over the row's own cached positions, walked page by page through its page-table
// row. XLA sliced every layer's K and V out of the cache each step (a copy of the whole
// attended window) and ran the per-row scores and weighted sums as generic fusions; at batch
// 32 that was over half the decode step. Here each (row, KV head) reads only the positions
// its query can see, once, for all the query heads of its group. layer.cc calls
// decode_attention too, inside its whole-layer kernel.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
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

// The work of one token per row, by (row b, KV head h) unit: the new key and value into its
// page, then for each query head g of the group the scores of the positions it sees (a key
// row read once for the group) and their softmax's weighted sum of the values. Split so
// that few units (batch 1: as many as KV heads, 3 for 2 threads) can spread positions and
// query heads over the threads, each score and each sum computed as in one unit.
template <class T>
struct DecodeUnits {
  const DecodeGeometry& geo;
  const float *xp, *cp, *sp;
  const int32_t *pos, *table;
  T *kp, *vp;
  float* op;
  int64_t groups, width, capacity;
  float scale;

  DecodeUnits(const DecodeGeometry& g, const float* xp, const float* cp, const float* sp,
              const int32_t* pos, const int32_t* table, T* kp, T* vp, float* op)
      : geo(g), xp(xp), cp(cp), sp(sp), pos(pos), table(table), kp(kp), vp(vp), op(op),
        groups(g.heads / g.kv_heads), width((g.heads + 2 * g.kv_heads) * g.dim),
        capacity(g.pages_per_seq * g.page_size),
        scale(1.0f / std::sqrt(static_cast<float>(g.dim))) {}

  Token token(int64_t b) const {
    const int64_t half = geo.dim / 2;
    return Token{xp + b * width, cp + b * half, sp + b * half, geo.heads, geo.kv_heads, geo.dim};
  }
  PagedRows rows(int64_t b) const {
    return PagedRows{table + b * geo.pages_per_seq, geo.page_size, geo.kv_heads, geo.dim};
  }
  // The positions row b's query sees: first .. first + seen - 1.
  std::pair<int64_t, int64_t> span(int64_t b) const {
    const int64_t last = std::min<int64_t>(pos[b], capacity - 1);
    const int64_t first = geo.window > 0 ? std::max<int64_t>(0, last + 1 - geo.window) : 0;
    return {first, std::max<int64_t>(0, last + 1 - first)};
  }
  // The new key (rotated) and value of (b, h) into their page; `scratch` holds dim floats.
  void write(int64_t b, int64_t h, float* scratch) const {
    if (pos[b] < 0 || pos[b] >= capacity) return;
    const PagedRows r = rows(b);
    token(b).key(h, kp + r.at(h, pos[b]), scratch);
    token(b).value(h, vp + r.at(h, pos[b]));
  }
  // scores[g * stride + t] for t in [from, from + count) of the span, every query head g of
  // the group; `query` holds groups * dim floats.
  void score(int64_t b, int64_t h, int64_t from, int64_t count, float* scores, int64_t stride,
             float* query) const {
    const int64_t dim = geo.dim;
    for (int64_t g = 0; g < groups; ++g) {
      float* qg = query + g * dim;
      token(b).query(h * groups + g, qg);
      for (int64_t i = 0; i < dim; ++i) qg[i] *= scale;
    }
    rows(b).runs(h, span(b).first + from, count,
                 [&](int64_t t0, int64_t offset, int64_t n, int64_t next) {
      const T* k = kp + offset;
      for (int64_t t = 0; t < n; ++t) {
        // kAhead rows on, into the next page once this one ends.
        prefetch_row(t + kAhead < n ? k + (t + kAhead) * dim : kp + next + (t + kAhead - n) * dim,
                     dim);
        prefetch_row(vp + offset + t * dim, dim);  // read by the weighted sums next
        for (int64_t g = 0; g < groups; ++g) {
          scores[g * stride + from + t0 + t] = dot(query + g * dim, k + t * dim, dim);
        }
      }
    });
  }
  // Query head g of (b, h): the softmax of its scores (seen of them, overwritten) weighting
  // the values, into the output.
  void finish(int64_t b, int64_t h, int64_t g, float* scores) const {
    const auto [first, seen] = span(b);
    float* o = op + (b * geo.heads + h * groups + g) * geo.dim;
    if (seen == 0) return std::fill(o, o + geo.dim, 0.0f);
    attend(scores, vp, rows(b), h, first, seen, o);
  }
};

template <class T>
void decode_attention(ffi::ThreadPool& pool, const DecodeGeometry& geo, const float* xp,
                      const float* cp, const float* sp, const int32_t* pos, const int32_t* table,
                      T* kp, T* vp, float* op) {
  const DecodeUnits<T> w(geo, xp, cp, sp, pos, table, kp, vp, op);
  const int64_t units = geo.rows * geo.kv_heads, groups = w.groups, dim = geo.dim;
  if (units >= 2 * Team::get().threads()) {  // enough units: each whole on one thread
    parallel_for(pool, units, [&w, groups, dim, kv_heads = geo.kv_heads](int64_t u) {
      const int64_t b = u / kv_heads, h = u % kv_heads, seen = w.span(b).second;
      thread_local std::vector<float> scores, query;
      query.resize(groups * dim);
      scores.resize(seen * groups);
      w.write(b, h, query.data());
      w.score(b, h, 0, seen, scores.data(), seen, query.data());
      for (int64_t g = 0; g < groups; ++g) w.finish(b, h, g, scores.data() + g * seen);
    });
    return;
  }
  // Few units: the writes first (every score may read its row's new key), then chunks of
  // positions, then each query head's softmax and sum, each spread over the threads.
  constexpr int64_t kChunk = 64;
  thread_local std::vector<float> scores, scratch;
  thread_local std::vector<int64_t> at;  // where unit u's scores start
  at.assign(units + 1, 0);
  scratch.resize(dim);
  int64_t chunks = 0;
  for (int64_t u = 0; u < units; ++u) {
    const int64_t b = u / geo.kv_heads, seen = w.span(b).second;
    w.write(b, u % geo.kv_heads, scratch.data());
    at[u + 1] = at[u] + seen * groups;
    chunks = std::max(chunks, (seen + kChunk - 1) / kChunk);
  }
  scores.resize(at[units]);
  float* all = scores.data();
  const int64_t* starts = at.data();
  const int64_t kv_heads = geo.kv_heads;
  parallel_for(pool, units * chunks, [=, &w](int64_t v) {
    const int64_t u = v / chunks, from = v % chunks * kChunk;
    const int64_t b = u / kv_heads, seen = w.span(b).second;
    if (from >= seen) return;
    thread_local std::vector<float> query;
    query.resize(groups * dim);
    w.score(b, u % kv_heads, from, std::min(kChunk, seen - from), all + starts[u], seen,
            query.data());
  });
  parallel_for(pool, units * groups, [=, &w](int64_t v) {
    const int64_t u = v / groups, g = v % groups, b = u / kv_heads;
    w.finish(b, u % kv_heads, g, all + starts[u] + g * w.span(b).second);
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
