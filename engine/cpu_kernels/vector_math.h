// Vector math shared by the kernels: e^x and a horizontal sum of 8 floats.
#pragma once

#include <immintrin.h>

namespace jaxfire {

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact to
// float precision), e^r by its Taylor polynomial to r^7 (truncation ~1e-8 relative), 2^n
// built in the exponent bits. Scalar std::exp, one call a score, was most of the attention
// kernel's time at batch 32. x is clamped to [-87, 88], where 2^n stays a normal float: a
// term of e^-87 ~ 1.6e-38 instead of smaller is nothing against a softmax total of at least
// 1, and e^88 ~ 1.7e38 stands for anything larger (silu's e^-x of a very negative x).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606820309417e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  }
  const __m256i two_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

inline float hsum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

}  // namespace jaxfire
