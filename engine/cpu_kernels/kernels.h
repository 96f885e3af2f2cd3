// The kernels' building blocks that more than one FFI handler runs: the packed-weight matmul
// (matmul.cc) and one-token attention on the cache (attention.cc), called by their own
// handlers and by the fused decoder layer (layer.cc).
#pragma once

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

// The geometry of one-token attention: caches [slots, kv_heads, len, dim].
struct DecodeGeometry {
  int64_t rows, heads, kv_heads, len, dim, window;
};

// An error message when qkv's width, the cache's slots, the positions' and cos table's
// sizes do not fit g; else nullptr.
const char* check_decode_geometry(const DecodeGeometry& g, int64_t qkv_width, int64_t slots,
                                  int64_t positions, int64_t cos_elements);

// One token per row from its fused projection qkv [rows, (H + 2K) D] with cos / sin
// [rows, D / 2]: the rotated key and the value written at positions[b] of cache row b,
// the query attending to the row's visible positions; out [rows, H D].
void decode_attention(xla::ffi::ThreadPool& pool, const DecodeGeometry& g, const float* qkv,
                      const float* cos, const float* sin, const int32_t* positions, float* keys,
                      float* values, float* out);

}  // namespace jaxfire
