// parallel_for for the FFI kernels: a team of spinning helper threads, else XLA's pool.
//
// Why a team of our own: a batch-1 decode step is ~120 kernel calls of ~90 us each, and a
// helper woken through XLA's pool arrived so late that the second core bought only 1.2x.
// The team's helpers spin for a short while after each call, so the next call, a few
// microseconds later, finds them awake; then they sleep.
#pragma once

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxfire {

// Units [0, units) claimed one at a time by whoever takes part; the caller takes part too,
// so a call never waits on a helper that has not started, only on units already claimed.
// The units are dealt in contiguous lanes, one per thread expected, each claimed from its
// front: a thread streams through its own lane's weights in address order (what the
// hardware prefetcher follows) and only then takes over what is left of the others'.
struct Job {
  static constexpr int kMaxLanes = 16;
  Job(void (*call)(const void*, int64_t), const void* fn, int64_t units, int lanes)
      : call(call),
        fn(fn),
        units(units),
        lanes(static_cast<int>(std::min<int64_t>({std::max(lanes, 1), kMaxLanes, units}))) {
    for (int l = 0; l < this->lanes; ++l) {
      next[l].store(units * l / this->lanes, std::memory_order_relaxed);
      end[l] = units * (l + 1) / this->lanes;
    }
  }
  void (*call)(const void* fn, int64_t u);
  const void* fn;
  int64_t units;
  int lanes;
  std::atomic<int64_t> next[kMaxLanes];
  int64_t end[kMaxLanes];
  std::atomic<int> joined{0};
  std::atomic<int64_t> done{0};
  void drain() {
    const int first = joined.fetch_add(1, std::memory_order_relaxed) % lanes;
    for (int i = 0; i < lanes; ++i) {
      const int l = (first + i) % lanes;
      for (int64_t u; (u = next[l].fetch_add(1, std::memory_order_relaxed)) < end[l];) {
        call(fn, u);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  }
  void wait() const {
    while (done.load(std::memory_order_acquire) < units) _mm_pause();
  }
};

class Team {
 public:
  // One team per process, never destroyed: its threads outlive static destructors.
  static Team& get() {
    static Team* team = new Team();
    return *team;
  }

  int threads() const { return helpers_ + 1; }

  // Runs the job with the helpers, or returns false when another call holds the team.
  bool run(Job& job) {
    if (helpers_ == 0 || !busy_.try_lock()) return false;
    job_ = &job;
    generation_.fetch_add(1);  // odd: a job is on
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      wake_.notify_all();
    }
    job.drain();
    job.wait();
    generation_.fetch_add(1);  // even: no job; a helper that saw the odd one has joined
    while (active_.load() != 0) _mm_pause();
    busy_.unlock();
    return true;
  }

 private:
  static constexpr std::chrono::microseconds kSpin{50};

  Team() {
    cpu_set_t set;
    int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    helpers_ = std::max(cpus, 1) - 1;
    for (int i = 0; i < helpers_; ++i) {
      std::thread([this] {
        pthread_setname_np(pthread_self(), "jaxfire-helper");  // in top and perf
        serve();
      }).detach();
    }
  }

  void serve() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t gen;
      auto since = std::chrono::steady_clock::now();
      for (int spins = 1; (gen = generation_.load()) == seen; ++spins) {
        _mm_pause();
        if (spins % 256 == 0 && std::chrono::steady_clock::now() - since > kSpin) {
          std::unique_lock<std::mutex> lock(sleep_mu_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1);
          since = std::chrono::steady_clock::now();
        }
      }
      seen = gen;
      if (gen % 2 == 0) continue;
      // Joining is counted before the generation is checked again, and the caller bumps
      // the generation before it waits for active_ to drain: a late helper never touches
      // a finished job.
      active_.fetch_add(1);
      if (generation_.load() == gen) job_->drain();
      active_.fetch_sub(1);
    }
  }

  int helpers_ = 0;
  std::mutex busy_;
  Job* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> active_{0};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mu_;
  std::condition_variable wake_;
};

// Runs fn(u) for u in [0, units): on the team when it is free, else with helpers from
// XLA's pool (which the caller may itself belong to, hence Job's drain-and-wait).
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t units, Fn fn) {
  if (units <= 0) return;
  if (units == 1) return fn(0);
  auto call = [](const void* f, int64_t u) { (*static_cast<const Fn*>(f))(u); };
  Team& team = Team::get();
  Job job(call, &fn, units, team.threads());
  if (team.run(job)) return;
  auto owned = std::make_shared<Fn>(std::move(fn));
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), units - 1);
  auto shared = std::make_shared<Job>(call, owned.get(), units, static_cast<int>(helpers) + 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared, owned] { shared->drain(); });
  shared->drain();
  shared->wait();
}

}  // namespace jaxfire
