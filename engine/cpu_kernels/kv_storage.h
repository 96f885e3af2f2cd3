// The element types a KV cache page pool may hold (float32, float16, bfloat16), and the
// conversions the attention kernels read and write them through: 8 lanes into float32
// registers (F16C for float16, a shift for bfloat16), rows of float32 rounded to nearest even
// as XLA's convert rounds. Half-precision pools halve the cache and the bytes decode reads.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace jaxfire {

struct Half {  // IEEE 754 binary16
  uint16_t bits;
};
struct BFloat16 {  // the upper half of a float32
  uint16_t bits;
};

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float to_float(float x) { return x; }
inline float to_float(Half x) { return _cvtsh_ss(x.bits); }
inline float to_float(BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// out[0 .. n) = x[0 .. n) in the pool's type, rounded to nearest even.
inline void store_row(const float* x, int64_t n, float* out) { std::copy(x, x + n, out); }
inline void store_row(const float* x, int64_t n, Half* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i) out[i].bits = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}
inline void store_row(const float* x, int64_t n, BFloat16* out) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
      out[i].bits = static_cast<uint16_t>((u >> 16) | 0x40u);
      continue;
    }
    out[i].bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

template <class T>
void zero_row(T* out, int64_t n) {
  std::memset(static_cast<void*>(out), 0, n * sizeof(T));
}

// f(T{}) with T the C++ type of a pool of `type`, or an error for another type.
template <class F>
xla::ffi::Error with_kv_type(xla::ffi::DataType type, F&& f) {
  switch (type) {
    case xla::ffi::DataType::F32:
      return f(float{});
    case xla::ffi::DataType::F16:
      return f(Half{});
    case xla::ffi::DataType::BF16:
      return f(BFloat16{});
    default:
      return xla::ffi::Error::InvalidArgument("the KV cache must be float32, float16 or bfloat16");
  }
}

}  // namespace jaxfire
