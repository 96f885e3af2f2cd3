// One Llama decoder layer for one token per row, in one call: RMSNorm, the fused q/k/v
// projection, attention on the paged cache in place, the output projection and its residual,
// RMSNorm, the fused gate/up projection, SiLU(gate) * up, the down projection and its
// residual.
//
// Why: as separate XLA ops a batch-1 step was ~150 kernel calls and ~200 small fusions
// between them (norms, residuals, the SiLU, splits), each a dispatch by XLA's thunk executor,
// and the weight streams ran at 12-14 GB/s against the 16-18 the machine reads. Here the
// phases follow each other on the same spinning team of threads, and nothing between them
// leaves the cache.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "kv_storage.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// y = weight * (x * rsqrt(mean(x^2) + eps)), row by row [rows, d], as engine.model.RMSNorm.
void rms_norm(const float* x, const float* weight, int64_t rows, int64_t d, float eps,
              float* y) {
  for (int64_t r = 0; r < rows; ++r, x += d, y += d) {
    int64_t i = 0;
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= d; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float sum = jaxfire::hsum(acc);
    for (; i < d; ++i) sum += x[i] * x[i];
    const float scale = 1.0f / std::sqrt(sum / static_cast<float>(d) + eps);
    for (i = 0; i < d; ++i) y[i] = weight[i] * (x[i] * scale);
  }
}

// h[r, i] = silu(gate) * up for each row's [gate (inter) | up (inter)], silu(g) = g / (1 + e^-g).
void silu_mul(const float* gate_up, int64_t rows, int64_t inter, float* h) {
  for (int64_t r = 0; r < rows; ++r, gate_up += 2 * inter, h += inter) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= inter; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate_up + i), u = _mm256_loadu_ps(gate_up + inter + i);
      const __m256 e = jaxfire::exp8(_mm256_sub_ps(zero, g));
      _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u));
    }
    for (; i < inter; ++i) {
      const float g = gate_up[i];
      h[i] = g / (1.0f + std::exp(-g)) * gate_up[inter + i];
    }
  }
}

void add_into(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

// x [B, D] -> y [B, D]: the layer's output for one token per row at positions [B]. Weights
// are packed (cpu_kernels.pack): wqkv [D -> (H + 2K) Dh], wo [H Dh -> D], wgu [D -> 2 I]
// (gate then up), wdown [I -> D]; norms f32[D]; cos / sin [B, Dh / 2]; row b's page-table
// row table[b] (table [B, pages_per_seq]); the page pools [num_pages, K, page_size, Dh]
// (float32, float16 or bfloat16) are updated in place (aliased to the last two results).
// Rows from valid_rows (an int32 scalar) on are not computed: their outputs are zeros and
// nothing is written to their pages, so a program of B rows serves fewer live ones.
ffi::Error DecodeLayer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> input_norm, ffi::AnyBuffer wqkv,
                       ffi::Buffer<ffi::F32> cos_table, ffi::Buffer<ffi::F32> sin_table,
                       ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> table,
                       ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer wo,
                       ffi::Buffer<ffi::F32> post_norm, ffi::AnyBuffer wgu, ffi::AnyBuffer wdown,
                       ffi::Buffer<ffi::S32> valid_rows, ffi::ResultBuffer<ffi::F32> y,
                       ffi::Result<ffi::AnyBuffer> keys, ffi::Result<ffi::AnyBuffer> values,
                       int64_t num_heads, int64_t window, float eps) {
  const auto xd = x.dimensions();
  const auto cd = keys->dimensions();
  const auto td = table.dimensions();
  if (xd.size() != 2 || cd.size() != 4 || td.size() != 2 ||
      keys->element_type() != values->element_type()) {
    return ffi::Error::InvalidArgument(
        "x must be [B, D], the page table [B, pages] and caches [num_pages, K, page_size, Dh]");
  }
  const int64_t d = xd[1];
  jaxfire::DecodeGeometry geo{xd[0], num_heads, cd[1], cd[0], cd[2], td[1], cd[3], window};
  jaxfire::Packed qkv_w, o_w, gu_w, down_w;
  for (auto [buffer, packed] : {std::pair{&wqkv, &qkv_w}, std::pair{&wo, &o_w},
                                std::pair{&wgu, &gu_w}, std::pair{&wdown, &down_w}}) {
    if (const char* error = jaxfire::describe_packed(*buffer, packed)) {
      return ffi::Error::InvalidArgument(error);
    }
  }
  const int64_t width = (num_heads + 2 * geo.kv_heads) * geo.dim, inter = down_w.k;
  if (!qkv_w.maps(d, width) || !o_w.maps(num_heads * geo.dim, d) || !gu_w.maps(d, 2 * inter) ||
      !down_w.maps(inter, d) || input_norm.element_count() != d ||
      post_norm.element_count() != d) {
    return ffi::Error::InvalidArgument("x, norms and packed weights shapes disagree");
  }
  if (const char* error =
          jaxfire::check_decode_geometry(geo, width, positions.element_count(),
                                         cos_table.element_count(), table.typed_data(),
                                         table.element_count())) {
    return ffi::Error::InvalidArgument(error);
  }
  if (valid_rows.element_count() != 1) {
    return ffi::Error::InvalidArgument("valid_rows must be a scalar");
  }
  const int64_t rows = std::clamp<int64_t>(valid_rows.typed_data()[0], 0, geo.rows);
  std::fill(y->typed_data() + rows * d, y->typed_data() + geo.rows * d, 0.0f);
  geo.rows = rows;  // rows are laid out one after another: the first ones are a batch
  // Reused between calls: first touches of fresh pages are slow on this kind of VM.
  thread_local std::vector<float> h, qkv, attn, gate_up, act;
  h.resize(rows * d);
  qkv.resize(rows * width);
  attn.resize(rows * num_heads * geo.dim);
  gate_up.resize(rows * 2 * inter);
  act.resize(rows * inter);
  const float* in = x.typed_data();
  float* out = y->typed_data();

  rms_norm(in, input_norm.typed_data(), rows, d, eps, h.data());
  jaxfire::matmul(pool, h.data(), rows, qkv_w, qkv.data(), width);
  const ffi::Error attended = jaxfire::with_kv_type(keys->element_type(), [&](auto kind) {
    using T = decltype(kind);
    jaxfire::decode_attention(pool, geo, qkv.data(), cos_table.typed_data(),
                              sin_table.typed_data(), positions.typed_data(), table.typed_data(),
                              static_cast<T*>(keys->untyped_data()),
                              static_cast<T*>(values->untyped_data()), attn.data());
    return ffi::Error::Success();
  });
  if (attended.failure()) return attended;
  jaxfire::matmul(pool, attn.data(), rows, o_w, out, d);
  add_into(out, in, rows * d);
  rms_norm(out, post_norm.typed_data(), rows, d, eps, h.data());
  jaxfire::matmul(pool, h.data(), rows, gu_w, gate_up.data(), 2 * inter);
  silu_mul(gate_up.data(), rows, inter, act.data());
  jaxfire::matmul(pool, act.data(), rows, down_w, h.data(), d);
  add_into(out, h.data(), rows * d);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfireDecodeLayer, DecodeLayer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // input norm
                                  .Arg<ffi::AnyBuffer>()         // wqkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page table
                                  .Arg<ffi::AnyBuffer>()         // the caches, aliased to
                                  .Arg<ffi::AnyBuffer>()         // the last two results
                                  .Arg<ffi::AnyBuffer>()         // wo
                                  .Arg<ffi::Buffer<ffi::F32>>()  // post-attention norm
                                  .Arg<ffi::AnyBuffer>()         // wgu
                                  .Arg<ffi::AnyBuffer>()         // wdown
                                  .Arg<ffi::Buffer<ffi::S32>>()  // valid rows
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("eps"));
