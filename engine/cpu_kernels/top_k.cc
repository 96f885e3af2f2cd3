// Top k of each row of x f32[S, V]: values f32[S, k] descending and their ids i32[S, k],
// ties by the lower id: exactly what lax.top_k returns.
//
// Why: the sampler's candidate search takes the top 257 or 4097 of a 49152-token row every
// step, and XLA CPU's top_k sorts far more than it needs (54 ms for 32 rows of 4097).
// Here a row is two linear passes (a bound on the k-th value, then the entries above it),
// a selection among those few and a sort of the k selected.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The float's bits made monotonic: orders as the values do (negative values flipped).
inline uint32_t ordered_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// One integer per entry that orders as (value descending, id ascending), so selection and
// sort never meet a tie: the value's ordered bits, then the complement of the id below them.
inline uint64_t order_key(uint32_t bits, uint32_t id) {
  return (static_cast<uint64_t>(bits) << 32) | ~id;
}

// A value every one of the top k reaches: split the row into at least k chunks; the k-th
// largest chunk maximum is reached by k entries (one per chunk), so the k-th largest entry
// is at least that. Only the entries above it need sorting out.
uint32_t lower_bound_of_top(const float* x, int64_t v, int64_t k) {
  const int64_t chunk = std::max<int64_t>(1, v / (2 * k));
  thread_local std::vector<uint32_t> maxima;
  maxima.clear();
  for (int64_t c = 0; c < v; c += chunk) {
    uint32_t m = 0;
    for (int64_t i = c; i < std::min(v, c + chunk); ++i) m = std::max(m, ordered_bits(x[i]));
    maxima.push_back(m);
  }
  const auto kth = maxima.begin() + (k - 1);
  std::nth_element(maxima.begin(), kth, maxima.end(), std::greater<uint32_t>());
  return *kth;
}

void top_k_row(const float* x, int64_t v, int64_t k, float* values, int32_t* ids) {
  if (k == 0) return;
  const uint32_t floor = lower_bound_of_top(x, v, k);
  thread_local std::vector<uint64_t> keys;
  keys.clear();
  for (int64_t i = 0; i < v; ++i) {
    const uint32_t bits = ordered_bits(x[i]);
    if (bits >= floor) keys.push_back(order_key(bits, static_cast<uint32_t>(i)));
  }
  const auto first = keys.begin(), kth = first + k;
  if (kth < keys.end()) std::nth_element(first, kth, keys.end(), std::greater<uint64_t>());
  std::sort(first, kth, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) {
    const uint32_t id = ~static_cast<uint32_t>(keys[j]);
    ids[j] = static_cast<int32_t>(id);
    values[j] = x[id];
  }
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::F32> values, ffi::ResultBuffer<ffi::S32> ids) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("top_k takes a rank-2 array");
  const int64_t rows = dims[0], v = dims[1], k = values->dimensions().back();
  if (k > v || v > (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("top_k needs k <= V < 2^31");
  }
  const float* in = x.typed_data();
  float* out_values = values->typed_data();
  int32_t* out_ids = ids->typed_data();
  jaxfire::parallel_for(pool, rows, [=](int64_t r) {
    top_k_row(in + r * v, v, k, out_values + r * k, out_ids + r * k);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfireTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
