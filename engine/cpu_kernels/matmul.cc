// y[M, N] = x[M, K] @ W for XLA CPU, float32 accumulation, W pre-packed in 16-column panels
// in one of four formats (see __init__.py for the layouts):
//   float32 [panels, K, 16], bfloat16 [panels, K, 16], q8: uint8 [panels, K/32, 640],
//   symmetric q8: uint8 [panels, K/32, 544] or q4: uint8 [panels, K/32, 320], blocks of 32
//   rows holding a scale (and an offset) per column and 8- or 4-bit codes, each weight =
//   fma(scale, code, offset): GGUF's Q4_0/Q4_1/Q8_0 weights, exactly.
//
// Why: XLA's CPU dots read a small-batch [K, N] weight at a fraction of memory speed (batch
// 4 took 3x as long as batch 1) and its bfloat16 dots run 10-30x slower than float32.
// Decode is a stream over the weights, so this kernel streams each panel once per 48 rows,
// keeps the sums of up to 6 rows in registers, and reads the weights in fewer bytes.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "weight_formats.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxfire;  // NOLINT: kPanel, kQuantBlock and the weight formats
constexpr int64_t kRowBlock = 6;   // rows whose sums stay in registers (12 accumulators)
constexpr int64_t kRowChunk = 48;  // rows per work unit: the x chunk stays in L2
constexpr int64_t kPanelsPerUnit = 1;

template <typename F>
inline void fma_row(const F& block, int64_t j, const float* x, Floats16& sum) {
  sum = fma16(splat16(x[j]), block.load(j), sum);
}

// One row is a stream over the panel: four independent sums hide the FMA latency that a
// single chain would wait on (named, for the reason below).
template <typename F>
void panel_row(const float* x, int64_t k_dim, const uint8_t* panel, float* y, int64_t cols) {
  Floats16 s0 = zeros16(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t kb = 0; kb < k_dim; kb += F::kBlock) {
    const F block(panel, kb / F::kBlock);
    const int64_t rows = std::min(F::kBlock, k_dim - kb);
    prefetch_ahead<F>(panel, kb);
    int64_t j = 0;
    for (; j + 4 <= rows; j += 4) {
      fma_row(block, j, x + kb, s0);
      fma_row(block, j + 1, x + kb, s1);
      fma_row(block, j + 2, x + kb, s2);
      fma_row(block, j + 3, x + kb, s3);
    }
    for (; j < rows; ++j) fma_row(block, j, x + kb, s0);
  }
  store_first(y, add16(add16(s0, s1), add16(s2, s3)), cols);
}

// A single row against a q4/q8 panel takes one FMA a weight: sum_j x_j * (d * c_j + m) is
// d * sum_j x_j c_j + m * sum_j x_j, the second sum (xsum, one per block) shared by every
// panel. A row has no other rows to share the decoding of a weight with, and decoding
// with the scale and offset took as long as the multiply. This adds one block's four
// partial sums of x * code to the row's total.
template <typename F>
inline Floats16 add_block(const F& block, float xsum, Floats16 a0, Floats16 a1, Floats16 a2,
                          Floats16 a3, Floats16 sum) {
  if constexpr (F::kOffsets) sum = fma16(block.m, splat16(xsum), sum);
  return fma16(block.d, add16(add16(a0, a1), add16(a2, a3)), sum);
}

// One row against a q8 panel, either kind (q4: q4_panel_row, below).
template <typename F>
void q8_panel_row(const float* x, const float* xsum, int64_t k_dim, const uint8_t* panel,
                  float* y, int64_t cols) {
  Floats16 sum = zeros16();
  for (int64_t kb = 0; kb < k_dim; kb += kQuantBlock) {
    const F block(panel, kb / kQuantBlock);
    prefetch_ahead<F>(panel, kb);
    Floats16 a0 = zeros16(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 8
    for (int64_t j = 0; j < kQuantBlock; j += 4) {
      a0 = fma16(splat16(x[kb + j]), block.codes(j), a0);
      a1 = fma16(splat16(x[kb + j + 1]), block.codes(j + 1), a1);
      a2 = fma16(splat16(x[kb + j + 2]), block.codes(j + 2), a2);
      a3 = fma16(splat16(x[kb + j + 3]), block.codes(j + 3), a3);
    }
    sum = add_block(block, xsum[kb / kQuantBlock], a0, a1, a2, a3, sum);
  }
  store_first(y, sum, cols);
}

// One row against a q4 panel, no shifts: row r of a group of 8 masked in its word is
// code * 2^4r, exactly a float once converted, and x_j comes pre-scaled by 2^-4r (x_scaled,
// exact too), so each product is x_j * code as if computed directly. Per 8 weights an and, a
// conversion and an FMA: bound by the conversion's one pipe. (Widening and shifting nibbles
// ran 25% slower, bound by the shuffle pipes; batch-1 decode was bound by it.)
void q4_panel_row(const float* x, const float* x_scaled, const float* xsum, int64_t k_dim,
                  const uint8_t* panel, float* y, int64_t cols) {
  Floats16 sum = zeros16();
  for (int64_t kb = 0; kb < k_dim; kb += kQuantBlock) {
    const Q4Format block(panel, kb / kQuantBlock);
    prefetch_ahead<Q4Format>(panel, kb);
    Floats16 a0 = zeros16(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 4
    for (int64_t g = 0; g < kQuantBlock / 8; ++g) {
      const Words16 w = load_words16(block.q + g * kPanel * 4);
      const float* xs = x_scaled + kb + 8 * g;
      a0 = fma16(splat16(xs[0]), masked_to_float(w, 15u), a0);
      a1 = fma16(splat16(xs[1]), masked_to_float(w, 15u << 4), a1);
      a2 = fma16(splat16(xs[2]), masked_to_float(w, 15u << 8), a2);
      a3 = fma16(splat16(xs[3]), masked_to_float(w, 15u << 12), a3);
      a0 = fma16(splat16(xs[4]), masked_to_float(w, 15u << 16), a0);
      a1 = fma16(splat16(xs[5]), masked_to_float(w, 15u << 20), a1);
      a2 = fma16(splat16(xs[6]), masked_to_float(w, 15u << 24), a2);
      // Row 7's mask would reach the sign bit: shifted down instead, against x unscaled.
      a3 = fma16(splat16(x[kb + 8 * g + 7]), shifted_to_float(w, 28), a3);
    }
    sum = add_block(block, xsum[kb / kQuantBlock], a0, a1, a2, a3, sum);
  }
  store_first(y, sum, cols);
}

// R rows against one panel: y[r, 0:cols] = sum_k x[r, k] * W[k, 0:cols]. Named
// accumulators, not an array: GCC kept an accumulator array in memory inside the k loop
// (a store per FMA, a third of the speed).
template <int R, typename F>
void panel_rows(const float* x, int64_t k_dim, const uint8_t* panel, float* y, int64_t ldy,
                int64_t cols) {
  Floats16 a0 = zeros16(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
#define JAXFIRE_ROW(r) \
  if constexpr (R > r) a##r = fma16(splat16(x[r * k_dim + kb + j]), w, a##r);
  for (int64_t kb = 0; kb < k_dim; kb += F::kBlock) {
    const F block(panel, kb / F::kBlock);
    const int64_t rows = F::kQuant ? F::kBlock : std::min(F::kBlock, k_dim - kb);
    prefetch_ahead<F>(panel, kb);
#pragma GCC unroll 32
    for (int64_t j = 0; j < rows; ++j) {
      const Floats16 w = block.load(j);
      JAXFIRE_ROW(0) JAXFIRE_ROW(1) JAXFIRE_ROW(2) JAXFIRE_ROW(3) JAXFIRE_ROW(4) JAXFIRE_ROW(5)
    }
  }
#undef JAXFIRE_ROW
  const Floats16 acc[6] = {a0, a1, a2, a3, a4, a5};
  for (int r = 0; r < R; ++r) store_first(y + r * ldy, acc[r], cols);
}

template <typename F>
void panel_block(int64_t rows, const float* x, const float* x_scaled, const float* xsum,
                 int64_t k_dim, const uint8_t* panel, float* y, int64_t ldy, int64_t cols) {
  switch (rows) {
    case 1:
      if constexpr (std::is_same_v<F, Q4Format>) {
        return q4_panel_row(x, x_scaled, xsum, k_dim, panel, y, cols);
      } else if constexpr (F::kQuant) {
        return q8_panel_row<F>(x, xsum, k_dim, panel, y, cols);
      } else {
        return panel_row<F>(x, k_dim, panel, y, cols);
      }
    case 2: return panel_rows<2, F>(x, k_dim, panel, y, ldy, cols);
    case 3: return panel_rows<3, F>(x, k_dim, panel, y, ldy, cols);
    case 4: return panel_rows<4, F>(x, k_dim, panel, y, ldy, cols);
    case 5: return panel_rows<5, F>(x, k_dim, panel, y, ldy, cols);
    default: return panel_rows<6, F>(x, k_dim, panel, y, ldy, cols);
  }
}

using Format = jaxfire::Packed::Format;

struct Matmul {
  const float* x;
  const float* xsums;  // [m, k / 32]: each row's sum per quant block (q4/q8 formats only)
  const float* x_scaled;  // [k]: the last row's x_j * 2^-4(j % 8) (q4 only; q4_panel_row)
  const uint8_t* w;
  float* y;
  int64_t m, k, n, panels, panel_bytes, panel_groups;

  // One unit: up to kRowChunk rows against up to kPanelsPerUnit panels.
  template <typename F>
  void unit(int64_t u) const {
    const int64_t row0 = (u / panel_groups) * kRowChunk;
    const int64_t row_end = std::min(m, row0 + kRowChunk);
    const int64_t p0 = (u % panel_groups) * kPanelsPerUnit;
    const int64_t p_end = std::min(panels, p0 + kPanelsPerUnit);
    for (int64_t p = p0; p < p_end; ++p) {
      const int64_t cols = std::min(kPanel, n - p * kPanel);
      const uint8_t* panel = w + p * panel_bytes;
      if constexpr (!std::is_same_v<F, F32Format>) {
        if (row_end - row0 > kRowBlock) {
          // Several row blocks (a prefill) share the panel: decode it to float32 once
          // rather than once per block of rows.
          thread_local std::vector<float> decoded;
          decoded.resize(k * kPanel);
          decode_panel<F>(panel, k, decoded.data());
          panel = reinterpret_cast<const uint8_t*>(decoded.data());
          rows<F32Format>(row0, row_end, panel, p, cols);
          continue;
        }
      }
      rows<F>(row0, row_end, panel, p, cols);
    }
  }

  // Blocks of at most kRowBlock rows, as even as they divide (8 rows: 4 + 4, not 6 + 2): a
  // block of one or two rows has too few independent sums to hide the FMA latency. Each
  // row's sums run in the same order whatever its block, so a row's result does not depend
  // on its neighbours. A block of one row is only ever a chunk of one row (see xsums).
  template <typename F>
  void rows(int64_t row0, int64_t row_end, const uint8_t* panel, int64_t p, int64_t cols) const {
    for (int64_t r = row0, blocks = (row_end - row0 + kRowBlock - 1) / kRowBlock; r < row_end;
         --blocks) {
      const int64_t size = (row_end - r + blocks - 1) / blocks;
      panel_block<F>(size, x + r * k, x_scaled, xsums + r * (k / kQuantBlock), k, panel,
                     y + r * n + p * kPanel, n, cols);
      r += size;
    }
  }

  template <typename F>
  void run(ffi::ThreadPool& pool) const {
    const int64_t units = panel_groups * ((m + kRowChunk - 1) / kRowChunk);
    jaxfire::parallel_for(pool, units, [self = *this](int64_t u) { self.unit<F>(u); });
  }
};

}  // namespace

namespace jaxfire {

const char* describe_packed(ffi::AnyBuffer w, Packed* out) {
  const auto wd = w.dimensions();
  if (wd.size() != 3) return "packed weight must be rank 3";
  switch (w.element_type()) {
    case ffi::DataType::F32: out->format = Format::kF32, out->k = wd[1]; break;
    case ffi::DataType::BF16: out->format = Format::kBF16, out->k = wd[1]; break;
    case ffi::DataType::U8:  // the bytes of a block tell the quantized formats apart
      switch (wd[2]) {
        case Q4Format::kBlockBytes: out->format = Format::kQ4; break;
        case Q8Format::kBlockBytes: out->format = Format::kQ8; break;
        case Q8SymmetricFormat::kBlockBytes: out->format = Format::kQ8Symmetric; break;
        default: return "packed q4/q8 weight has unknown blocks";
      }
      out->k = wd[1] * kQuantBlock;
      break;
    default: return "packed weight must be f32, bf16 or u8 (q4/q8)";
  }
  const bool plain = out->format == Format::kF32 || out->format == Format::kBF16;
  if (plain && wd[2] != kPanel) return "packed weight has the wrong panel layout";
  out->data = static_cast<const uint8_t*>(w.untyped_data());
  out->panels = wd[0];
  out->panel_bytes = wd[0] == 0 ? 0 : static_cast<int64_t>(w.size_bytes()) / wd[0];
  return nullptr;
}

void matmul(ffi::ThreadPool& pool, const float* x, int64_t m, const Packed& w, float* y,
            int64_t n) {
  const int64_t k = w.k;
  if (m == 0 || k == 0) return;
  const bool quant = w.format != Format::kF32 && w.format != Format::kBF16;
  // The one-row path reads x's block sums (and, for q4, x scaled), and only a chunk of one
  // row takes it: a call of one row, or the last chunk of a longer one (summing every row,
  // serial float adds, cost a prefill a few percent).
  thread_local std::vector<float> xsums, x_scaled;
  if (quant && (m - 1) % kRowChunk == 0) {
    const int64_t blocks = k / kQuantBlock;
    xsums.resize(m * blocks);
    const float* row = x + (m - 1) * k;
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = row + b * kQuantBlock;
      xsums[(m - 1) * blocks + b] = std::accumulate(xb, xb + kQuantBlock, 0.0f);
    }
    if (w.format == Format::kQ4) {
      x_scaled.resize(k);
      constexpr float kScale[8] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f,
                                   0x1p-16f, 0x1p-20f, 0x1p-24f, 0x1p-28f};
      for (int64_t j = 0; j < k; ++j) x_scaled[j] = row[j] * kScale[j % 8];
    }
  }
  const Matmul mm{x, xsums.data(), x_scaled.data(), w.data, y, m, k, n, w.panels,
                  w.panel_bytes, (w.panels + kPanelsPerUnit - 1) / kPanelsPerUnit};
  switch (w.format) {
    case Format::kF32: mm.run<F32Format>(pool); break;
    case Format::kBF16: mm.run<BF16Format>(pool); break;
    case Format::kQ8: mm.run<Q8Format>(pool); break;
    case Format::kQ8Symmetric: mm.run<Q8SymmetricFormat>(pool); break;
    case Format::kQ4: mm.run<Q4Format>(pool); break;
  }
}

}  // namespace jaxfire

namespace {

// Rows of x from `valid` on are padding (a prompt's bucket past its length): their
// outputs are left zero rather than computed.
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                      ffi::Buffer<ffi::S32> valid, ffi::ResultBuffer<ffi::F32> y) {
  jaxfire::Packed packed;
  if (const char* error = jaxfire::describe_packed(w, &packed)) {
    return ffi::Error::InvalidArgument(error);
  }
  const int64_t k = packed.k, n = y->dimensions().back();
  if (!packed.maps(x.dimensions().back(), n)) {
    return ffi::Error::InvalidArgument("x, packed weight and y shapes disagree");
  }
  if (valid.element_count() != 1) return ffi::Error::InvalidArgument("valid must be a scalar");
  if (x.element_count() == 0 || k == 0) return ffi::Error::Success();
  const int64_t rows = static_cast<int64_t>(x.element_count()) / k;
  const int64_t m = std::clamp<int64_t>(valid.typed_data()[0], 0, rows);
  std::fill(y->typed_data() + m * n, y->typed_data() + rows * n, 0.0f);
  jaxfire::matmul(pool, x.typed_data(), m, packed, y->typed_data(), n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfireMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
