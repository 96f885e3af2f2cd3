// The token embedding of a tied model read from its packed LM head: out[t] = column
// tokens[t] of the head (panels of 16 columns, any cpu_kernels.pack format) as float32,
// exactly the embedding row the head was packed from (packing is lossless).
//
// Why: a tied model's embedding is the head's matrix, which the CPU kernels pack for the
// logits; a float32 copy of it just for the lookup held 108 MiB of the default model's
// 200 MiB of weights.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "weight_formats.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxfire;  // NOLINT: kPanel and the weight formats
using Format = Packed::Format;
constexpr int64_t kTokensPerUnit = 32;

// Column `column` of w as float32 [w.k]: its panel expanded (a few microseconds), one
// column kept. An id past the last panel reads as the zero padding past the vocabulary.
void column(const Packed& w, int64_t column, float* out) {
  if (column < 0 || column >= w.panels * kPanel) return std::fill(out, out + w.k, 0.0f);
  thread_local std::vector<float> panel;
  panel.resize(w.k * kPanel);
  const uint8_t* p = w.data + (column / kPanel) * w.panel_bytes;
  switch (w.format) {
    case Format::kF32: decode_panel<F32Format>(p, w.k, panel.data()); break;
    case Format::kBF16: decode_panel<BF16Format>(p, w.k, panel.data()); break;
    case Format::kQ8: decode_panel<Q8Format>(p, w.k, panel.data()); break;
    case Format::kQ8Symmetric: decode_panel<Q8SymmetricFormat>(p, w.k, panel.data()); break;
    case Format::kQ4: decode_panel<Q4Format>(p, w.k, panel.data()); break;
  }
  for (int64_t j = 0; j < w.k; ++j) out[j] = panel[j * kPanel + column % kPanel];
}

ffi::Error EmbedImpl(ffi::ThreadPool pool, ffi::AnyBuffer head, ffi::Buffer<ffi::S32> tokens,
                     ffi::ResultBuffer<ffi::F32> out) {
  Packed w;
  if (const char* error = describe_packed(head, &w)) return ffi::Error::InvalidArgument(error);
  const int64_t n = static_cast<int64_t>(tokens.element_count());
  if (static_cast<int64_t>(out->element_count()) != n * w.k) {
    return ffi::Error::InvalidArgument("out must be [tokens, hidden]");
  }
  const int32_t* ids = tokens.typed_data();
  float* y = out->typed_data();
  const int64_t units = (n + kTokensPerUnit - 1) / kTokensPerUnit;
  parallel_for(pool, units, [&](int64_t u) {
    for (int64_t t = u * kTokensPerUnit; t < std::min(n, (u + 1) * kTokensPerUnit); ++t) {
      column(w, ids[t], y + t * w.k);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfireEmbed, EmbedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
