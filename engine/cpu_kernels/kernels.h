// The kernels' building blocks that more than one FFI handler runs: the packed-weight matmul
// (matmul.cc) and one-token attention on the paged cache (attention.cc), called by their own
// handlers and by the fused decoder layer (layer.cc); the page-table addressing every
// attention kernel shares.
#pragma once

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace jaxfire {

// Output columns per panel of a packed weight (__init__.py's PANEL).
inline constexpr int64_t kPanel = 16;

// A weight packed by cpu_kernels.pack: its format and geometry.
struct Packed {
  enum class Format { kF32, kBF16, kQ8, kQ8Symmetric, kQ4 };
  const uint8_t* data;
  Format format;
  int64_t k, panels, panel_bytes;
  // True when it maps k_in inputs to n_out outputs.
  bool maps(int64_t k_in, int64_t n_out) const {
    return k == k_in && (n_out + kPanel - 1) / kPanel == panels;
  }
};

// Reads w's format from its type and shape into *out; returns an error message, or nullptr.
const char* describe_packed(xla::ffi::AnyBuffer w, Packed* out);

// y[m, n] = x[m, k] @ w, float32 accumulation, parallel over the pool.
void matmul(xla::ffi::ThreadPool& pool, const float* x, int64_t m, const Packed& w, float* y,
            int64_t n);

// Where a sequence's keys (or values) lie in a layer's page pool [pages][kv_heads][page_size]
// [dim] (of any element type): position p of KV head h is row p % page_size of page
// pages[p / page_size]. Within a page one head's positions are contiguous, so ranges are
// walked page by page (`runs`), each run a plain stream of rows as a slot of the unpaged cache
// was.
struct PagedRows {
  const int32_t* pages;  // the sequence's page-table row
  int64_t page_size, kv_heads, dim;

  // Offset in elements from the pool's start of row `offset` of KV head h in the sequence's
  // page `page` (an index into its table row).
  int64_t at(int64_t h, int64_t page, int64_t offset) const {
    return ((pages[page] * kv_heads + h) * page_size + offset) * dim;
  }
  // The offset of position p of KV head h.
  int64_t at(int64_t h, int64_t p) const { return at(h, p / page_size, p % page_size); }

  // f(t, offset, n, next) for each run of positions first .. first + count - 1 within one page:
  // the n rows from position first + t lie contiguous from `offset`; `next` is where the
  // following run starts (for prefetching across the page boundary), or offset + n * dim
  // after the last run. One division per call: the runs after the first start a page.
  template <class F>
  void runs(int64_t h, int64_t first, int64_t count, F&& f) const {
    if (count <= 0) return;
    int64_t page = first / page_size, t = 0, offset = at(h, page, first % page_size);
    for (int64_t n = std::min(count, page_size - first % page_size); t < count; ++page) {
      const int64_t next = t + n < count ? at(h, page + 1, 0) : offset + n * dim;
      f(t, offset, n, next);
      t += n;
      offset = next;
      n = std::min(count - t, page_size);
    }
  }
};

// An error message unless every page id in pages [count] is a page of a pool of num_pages.
const char* check_pages(const int32_t* pages, int64_t count, int64_t num_pages);

// The geometry of one-token attention: pools [num_pages, kv_heads, page_size, dim], a page
// table [rows, pages_per_seq].
struct DecodeGeometry {
  int64_t rows, heads, kv_heads, num_pages, page_size, pages_per_seq, dim, window;
};

// An error message when qkv's width, the positions', cos table's and page table's sizes do
// not fit g, or a page id is out of the pool; else nullptr.
const char* check_decode_geometry(const DecodeGeometry& g, int64_t qkv_width, int64_t positions,
                                  int64_t cos_elements, const int32_t* table,
                                  int64_t table_elements);

// One token per row from its fused projection qkv [rows, (H + 2K) D] with cos / sin
// [rows, D / 2]: the rotated key and the value written at positions[b] of sequence row b
// (through its page-table row table[b]), the query attending to the row's visible positions;
// out [rows, H D].
// T: the pools' element type (float, or kv_storage.h's Half or BFloat16).
template <class T>
void decode_attention(xla::ffi::ThreadPool& pool, const DecodeGeometry& g, const float* qkv,
                      const float* cos, const float* sin, const int32_t* positions,
                      const int32_t* table, T* keys, T* values, float* out);

}  // namespace jaxfire
