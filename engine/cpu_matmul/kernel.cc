// y[M, N] = x[M, K] @ W for XLA CPU, W pre-packed as [ceil(N / 16), K, 16] float32 or
// bfloat16 (accumulated in float32 either way).
//
// Why: XLA's CPU dots read a small-batch [K, N] weight at a fraction of memory speed
// (batch 4 took 3x as long as batch 1), and its bfloat16 dots run 10-30x slower than
// float32. Decode is a stream over the weights, so this kernel streams each 16-column
// panel once per 48 rows, keeps the partial sums of up to 6 rows in registers, and lets
// bfloat16 checkpoints stay bfloat16 in memory (half the bytes, the same values).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;     // output columns per packed panel (two AVX registers)
constexpr int64_t kRowBlock = 6;   // rows whose sums stay in registers (12 accumulators)
constexpr int64_t kRowChunk = 48;  // rows per work unit: x chunk stays in L2
constexpr int64_t kPanelsPerUnit = 4;

inline void load_panel(const float* w, __m256* lo, __m256* hi) {
  *lo = _mm256_loadu_ps(w);
  *hi = _mm256_loadu_ps(w + 8);
}

inline __m256 bf16x8_to_f32(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline void load_panel(const uint16_t* w, __m256* lo, __m256* hi) {
  *lo = bf16x8_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  *hi = bf16x8_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8)));
}

// R rows of x against one panel: y[r, 0:cols] = sum_k x[r, k] * panel[k, 0:cols].
// Named accumulators, not an array: GCC kept an accumulator array in memory inside the k
// loop (a store per FMA, a third of the speed).
template <int R, typename W>
void panel_rows(const float* x, int64_t k_dim, const W* panel, float* y, int64_t ldy,
                int64_t cols) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
         a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
#define JAXFIRE_ROW(r)                                           \
  if constexpr (R > r) {                                         \
    const __m256 xr = _mm256_broadcast_ss(x + r * k_dim + k);    \
    a##r##0 = _mm256_fmadd_ps(xr, lo, a##r##0);                  \
    a##r##1 = _mm256_fmadd_ps(xr, hi, a##r##1);                  \
  }
  for (int64_t k = 0; k < k_dim; ++k) {
    __m256 lo, hi;
    load_panel(panel + k * kPanel, &lo, &hi);
    JAXFIRE_ROW(0) JAXFIRE_ROW(1) JAXFIRE_ROW(2) JAXFIRE_ROW(3) JAXFIRE_ROW(4) JAXFIRE_ROW(5)
  }
#undef JAXFIRE_ROW
  const __m256 acc[6][2] = {{a00, a01}, {a10, a11}, {a20, a21},
                            {a30, a31}, {a40, a41}, {a50, a51}};
  alignas(32) float out[kPanel];
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(out, acc[r][0]);
    _mm256_store_ps(out + 8, acc[r][1]);
    std::memcpy(y + r * ldy, out, cols * sizeof(float));
  }
}

// One row is a stream over the panel: four independent pairs of sums hide the FMA
// latency that a single chain would wait on.
template <typename W>
void panel_row(const float* x, int64_t k_dim, const W* panel, float* y, int64_t cols) {
  __m256 s[4][2];
  for (auto& pair : s) pair[0] = pair[1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= k_dim; k += 4) {
    for (int j = 0; j < 4; ++j) {
      __m256 lo, hi;
      load_panel(panel + (k + j) * kPanel, &lo, &hi);
      const __m256 xk = _mm256_broadcast_ss(x + k + j);
      s[j][0] = _mm256_fmadd_ps(xk, lo, s[j][0]);
      s[j][1] = _mm256_fmadd_ps(xk, hi, s[j][1]);
    }
  }
  for (; k < k_dim; ++k) {
    __m256 lo, hi;
    load_panel(panel + k * kPanel, &lo, &hi);
    const __m256 xk = _mm256_broadcast_ss(x + k);
    s[0][0] = _mm256_fmadd_ps(xk, lo, s[0][0]);
    s[0][1] = _mm256_fmadd_ps(xk, hi, s[0][1]);
  }
  alignas(32) float out[kPanel];
  _mm256_store_ps(out, _mm256_add_ps(_mm256_add_ps(s[0][0], s[1][0]),
                                     _mm256_add_ps(s[2][0], s[3][0])));
  _mm256_store_ps(out + 8, _mm256_add_ps(_mm256_add_ps(s[0][1], s[1][1]),
                                         _mm256_add_ps(s[2][1], s[3][1])));
  std::memcpy(y, out, cols * sizeof(float));
}

template <typename W>
void panel_block(int64_t rows, const float* x, int64_t k_dim, const W* panel, float* y,
                 int64_t ldy, int64_t cols) {
  switch (rows) {
    case 1: return panel_row(x, k_dim, panel, y, cols);
    case 2: return panel_rows<2>(x, k_dim, panel, y, ldy, cols);
    case 3: return panel_rows<3>(x, k_dim, panel, y, ldy, cols);
    case 4: return panel_rows<4>(x, k_dim, panel, y, ldy, cols);
    case 5: return panel_rows<5>(x, k_dim, panel, y, ldy, cols);
    default: return panel_rows<6>(x, k_dim, panel, y, ldy, cols);
  }
}

struct Work {
  const float* x;
  const void* w;
  bool bf16;
  float* y;
  int64_t m, k, n, panels, panel_groups, units;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  template <typename W>
  void unit(int64_t u) const {
    const int64_t row0 = (u / panel_groups) * kRowChunk;
    const int64_t row_end = std::min(m, row0 + kRowChunk);
    const int64_t p0 = (u % panel_groups) * kPanelsPerUnit;
    const int64_t p_end = std::min(panels, p0 + kPanelsPerUnit);
    for (int64_t p = p0; p < p_end; ++p) {
      const W* panel = static_cast<const W*>(w) + p * k * kPanel;
      const int64_t cols = std::min(kPanel, n - p * kPanel);
      for (int64_t r = row0; r < row_end; r += kRowBlock) {
        panel_block(std::min(kRowBlock, row_end - r), x + r * k, k, panel,
                    y + r * n + p * kPanel, n, cols);
      }
    }
  }

  // Claims units until none are left; any number of threads may run this at once.
  void drain() {
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
      bf16 ? unit<uint16_t>(u) : unit<float>(u);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  if (wd.size() != 3 || wd[2] != kPanel) {
    return ffi::Error::InvalidArgument("packed weight must be [panels, K, 16]");
  }
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  if (!bf16 && w.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("packed weight must be float32 or bfloat16");
  }
  const int64_t k = wd[1];
  const int64_t n = yd.back();
  if (x.dimensions().back() != k || (n + kPanel - 1) / kPanel != wd[0]) {
    return ffi::Error::InvalidArgument("x, packed weight and y shapes disagree");
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.untyped_data();
  work->bf16 = bf16;
  work->y = y->typed_data();
  work->m = static_cast<int64_t>(x.element_count()) / k;
  work->k = k;
  work->n = n;
  work->panels = wd[0];
  work->panel_groups = (wd[0] + kPanelsPerUnit - 1) / kPanelsPerUnit;
  work->units = work->panel_groups * ((work->m + kRowChunk - 1) / kRowChunk);
  if (work->m == 0) return ffi::Error::Success();

  // Helpers join while units remain; the caller works too, so it never waits on a
  // helper that has not started (the pool may be busy, or be this very thread's pool).
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->units - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->drain(); });
  work->drain();
  while (work->done.load(std::memory_order_acquire) < work->units) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfireMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
