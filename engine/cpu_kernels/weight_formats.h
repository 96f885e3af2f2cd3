// The formats a packed weight's panels come in (cpu_kernels.pack; __init__.py has the
// layouts), each read a block at a time as float32 registers: plain float32 or bfloat16
// [K, 16], and blocks of 32 rows of 8- or 4-bit codes with a scale (and an offset) per
// column, each weight = fma(scale, code, offset), GGUF's Q4_0/Q4_1/Q8_0 weights exactly;
// decode_panel expands a whole panel.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "lanes16.h"

namespace jaxfire {

inline constexpr int64_t kQuantBlock = 32;  // rows per q4/q8 block (__init__.py's QUANT_BLOCK)

// A format reads one block of a panel: rows kb .. kb + kBlock of the weight, 16 columns,
// each row as Floats16 (lanes16.h).

// Plain float32 or bfloat16 values, [K, 16] row after row.
template <typename T>
struct PlainFormat {
  static constexpr int64_t kBlock = 4;
  static constexpr bool kQuant = false;
  static constexpr int64_t kBlockBytes = kBlock * kPanel * sizeof(T);
  const T* p;
  PlainFormat(const uint8_t* panel, int64_t b)
      : p(reinterpret_cast<const T*>(panel + b * kBlockBytes)) {}
  Floats16 load(int64_t j) const { return load16(p + j * kPanel); }
};
using F32Format = PlainFormat<float>;
using BF16Format = PlainFormat<BFloat16>;

// Blocks of 32 rows, each weight = fma(scale, code, offset) with a scale and an offset per
// column (one rounding: the stored float32 value exactly). Q8: float32 scales and offsets,
// int8 codes [32][16] (640 bytes). Q8 symmetric (GGUF's Q8_0): float16 scales, no offsets,
// int8 codes (544 bytes). Q4: float16 scales and offsets, codes 0..15 in 32-bit words, one
// per (group of 8 rows, column), row r of the group in bits 4r .. 4r+3 (320 bytes).
enum class Quant { kQ8, kQ8Symmetric, kQ4 };

template <Quant kKind>
struct QuantFormat {
  static constexpr int64_t kBlock = kQuantBlock;  // K is a multiple: blocks are always whole
  static constexpr bool kQuant = true;
  static constexpr bool kFour = kKind == Quant::kQ4;
  static constexpr bool kOffsets = kKind != Quant::kQ8Symmetric;
  static constexpr int64_t kSideBytes =
      kKind == Quant::kQ8 ? 2 * kPanel * 4 : (kOffsets ? 2 : 1) * kPanel * 2;
  static constexpr int64_t kBlockBytes = kSideBytes + kBlock * kPanel / (kFour ? 2 : 1);
  Floats16 d, m = zeros16();  // scales, offsets
  const uint8_t* q;
  QuantFormat(const uint8_t* panel, int64_t b) {
    const uint8_t* s = panel + b * kBlockBytes;
    if constexpr (kKind == Quant::kQ8) {
      const float* f = reinterpret_cast<const float*>(s);
      d = load16(f), m = load16(f + kPanel);
    } else {
      const Half* h = reinterpret_cast<const Half*>(s);
      d = load16(h);
      if constexpr (kOffsets) m = load16(h + kPanel);
    }
    q = s + kSideBytes;
  }
  // The codes of row j as floats; j is a constant once the block loop is unrolled, so Q4's
  // nibble choice costs one shift.
  Floats16 codes(int64_t j) const {
    if constexpr (kFour) {
      const Words16 w = load_words16(q + (j / 8) * kPanel * 4);
      return masked_to_float(shift_right(w, 4 * (j % 8)), 15);
    } else {
      return load16(reinterpret_cast<const int8_t*>(q + j * kPanel));
    }
  }
  Floats16 load(int64_t j) const {
    if constexpr (kOffsets) return fma16(d, codes(j), m);
    return mul16(d, codes(j));
  }
};
using Q8Format = QuantFormat<Quant::kQ8>;
using Q8SymmetricFormat = QuantFormat<Quant::kQ8Symmetric>;
using Q4Format = QuantFormat<Quant::kQ4>;

// The hardware prefetcher ramps up too slowly for these short streams (a few hundred KB
// per call): asking kPrefetchBytes ahead made batch-1 calls 10-30% faster.
inline constexpr int64_t kPrefetchBytes = 8192;

template <typename F>
inline void prefetch_ahead(const uint8_t* panel, int64_t kb) {
  const char* ahead = reinterpret_cast<const char*>(panel + (kb / F::kBlock) * F::kBlockBytes);
  for (int64_t o = 0; o < F::kBlockBytes; o += 64) {
    _mm_prefetch(ahead + kPrefetchBytes + o, _MM_HINT_T0);
  }
}

// A panel in float32 [K, 16] (F32Format's layout).
template <typename F>
inline void decode_panel(const uint8_t* panel, int64_t k_dim, float* out) {
  for (int64_t kb = 0; kb < k_dim; kb += F::kBlock) {
    const F block(panel, kb / F::kBlock);
    const int64_t rows = F::kQuant ? F::kBlock : std::min(F::kBlock, k_dim - kb);
    prefetch_ahead<F>(panel, kb);
#pragma GCC unroll 32
    for (int64_t j = 0; j < rows; ++j) store16(out + (kb + j) * kPanel, block.load(j));
  }
}

}  // namespace jaxfire
