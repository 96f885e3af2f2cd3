// parallel_for over XLA's intra-op thread pool, for the FFI kernels.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace jaxfire {

// Runs fn(u) for u in [0, units). Helpers join while units remain and the caller works
// too, so it never waits on a helper that has not started (the pool may be busy, or be
// the very pool this thread belongs to); it waits only for units already claimed.
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t units, Fn fn) {
  struct Shared {
    Fn fn;
    int64_t units;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    Shared(Fn f, int64_t n) : fn(std::move(f)), units(n) {}
    void drain() {
      for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
        fn(u);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  if (units <= 0) return;
  auto shared = std::make_shared<Shared>(std::move(fn), units);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), units - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->drain(); });
  shared->drain();
  while (shared->done.load(std::memory_order_acquire) < units) _mm_pause();
}

}  // namespace jaxfire
