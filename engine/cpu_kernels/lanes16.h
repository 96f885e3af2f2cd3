// Sixteen float32 lanes: one row of a 16-column weight panel, the unit the matmul and the
// weight formats compute in. Built for AVX-512 it is one zmm register (512-bit FMAs, masked
// tails); built for AVX2, two ymm registers. Both do the same operation on each lane in the
// same order, so the two builds give the same bits (tests/test_cpu_kernel_isas.py).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kv_storage.h"

namespace jaxfire {

#ifdef __AVX512F__

struct Floats16 {
  __m512 v;
};
struct Words16 {  // sixteen 32-bit integers
  __m512i v;
};

inline Floats16 zeros16() { return {_mm512_setzero_ps()}; }
inline Floats16 splat16(float x) { return {_mm512_set1_ps(x)}; }
inline Floats16 load16(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Floats16 load16(const BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline Floats16 load16(const Half* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline Floats16 load16(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))};
}
inline Words16 load_words16(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
inline Floats16 fma16(Floats16 a, Floats16 b, Floats16 c) {
  return {_mm512_fmadd_ps(a.v, b.v, c.v)};
}
inline Floats16 add16(Floats16 a, Floats16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Floats16 mul16(Floats16 a, Floats16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Words16 shift_right(Words16 w, unsigned shift) {
  return {_mm512_srli_epi32(w.v, shift)};
}
// (w & mask) and (w >> shift) as floats.
inline Floats16 masked_to_float(Words16 w, uint32_t mask) {
  return {_mm512_cvtepi32_ps(_mm512_and_si512(w.v, _mm512_set1_epi32(mask)))};
}
inline Floats16 shifted_to_float(Words16 w, unsigned shift) {
  return {_mm512_cvtepi32_ps(_mm512_srli_epi32(w.v, shift))};
}
inline void store16(float* p, Floats16 a) { _mm512_storeu_ps(p, a.v); }
// The first `cols` (1..16) lanes only.
inline void store_first(float* p, Floats16 a, int64_t cols) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << cols) - 1), a.v);
}

#else

struct Floats16 {
  __m256 lo, hi;
};
struct Words16 {
  __m256i lo, hi;
};

inline Floats16 zeros16() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Floats16 splat16(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
template <typename T>
inline Floats16 load16(const T* p) {  // float, BFloat16 or Half: kv_storage.h's load8
  return {load8(p), load8(p + 8)};
}
inline Floats16 load16(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
inline Words16 load_words16(const uint8_t* p) {
  const __m256i* w = reinterpret_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(w), _mm256_loadu_si256(w + 1)};
}
inline Floats16 fma16(Floats16 a, Floats16 b, Floats16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline Floats16 add16(Floats16 a, Floats16 b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
inline Floats16 mul16(Floats16 a, Floats16 b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline Words16 shift_right(Words16 w, unsigned shift) {
  return {_mm256_srli_epi32(w.lo, shift), _mm256_srli_epi32(w.hi, shift)};
}
inline Floats16 masked_to_float(Words16 w, uint32_t mask) {
  const __m256i m = _mm256_set1_epi32(mask);
  return {_mm256_cvtepi32_ps(_mm256_and_si256(w.lo, m)),
          _mm256_cvtepi32_ps(_mm256_and_si256(w.hi, m))};
}
inline Floats16 shifted_to_float(Words16 w, unsigned shift) {
  return {_mm256_cvtepi32_ps(_mm256_srli_epi32(w.lo, shift)),
          _mm256_cvtepi32_ps(_mm256_srli_epi32(w.hi, shift))};
}
inline void store16(float* p, Floats16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline void store_first(float* p, Floats16 a, int64_t cols) {
  alignas(32) float out[16];
  _mm256_store_ps(out, a.lo);
  _mm256_store_ps(out + 8, a.hi);
  std::memcpy(p, out, cols * sizeof(float));
}

#endif

}  // namespace jaxfire
