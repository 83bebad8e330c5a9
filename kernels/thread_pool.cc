#include "kernels/thread_pool.h"

#include <algorithm>
#include <memory>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fedtune::kernels {
namespace {

// ~50 us of polling (a pause is ~10-40 ns); then the thread sleeps on the condition variable.
constexpr int kSpins = 4096;

inline void Pause() {
#if defined(__x86_64__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  cv_start_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t g = generation_.load(std::memory_order_acquire);
    if (g == seen && Spinning()) {
      for (int i = 0; g == seen && i < kSpins && !stop_.load(std::memory_order_relaxed); ++i) {
        Pause();
        g = generation_.load(std::memory_order_acquire);
      }
    }
    if (g == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_start_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
      if (stop_.load()) return;
      g = generation_.load(std::memory_order_acquire);
    }
    if (stop_.load()) return;
    seen = g;
    const auto* job = job_;
    const int64_t n = n_, chunk = chunk_;
    if (index < n_chunks_) {
      const int64_t b = index * chunk, e = std::min(n, b + chunk);
      (*job)(b, e, index);
    }
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mu_);  // the caller may be asleep in cv_done_
      cv_done_.notify_one();
    }
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  const int threads = size();
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(grain, 1), (n + threads - 1) / threads);
  const int n_chunks = static_cast<int>((n + chunk - 1) / chunk);
  // Callers from different threads take turns (the pool is process-wide: several in-process
  // workers, or a server thread beside a trainer, may call kernels at the same time).
  std::lock_guard<std::mutex> turn(call_mu_);
  if (n_chunks <= 1 || workers_.empty()) {
    fn(0, n, 0);
    return;
  }
  job_ = &fn;
  n_ = n;
  chunk_ = chunk;
  n_chunks_ = n_chunks;
  pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mu_);  // sleeping workers test generation_ under mu_
    generation_.fetch_add(1, std::memory_order_release);
  }
  cv_start_.notify_all();
  fn(0, std::min(n, chunk), 0);
  if (Spinning()) {
    for (int i = 0; i < kSpins && pending_.load(std::memory_order_acquire) != 0; ++i) Pause();
  }
  if (pending_.load(std::memory_order_acquire) != 0) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
  }
  job_ = nullptr;
}

namespace {
std::unique_ptr<ThreadPool>& PoolSlot() {
  static std::unique_ptr<ThreadPool> pool;
  return pool;
}
// Guards the slot: two threads making their first kernel call at once (in-process workers) must
// not both create a pool, the second destroying the first while it runs a job (seen as a hang).
std::mutex& PoolSlotMutex() {
  static std::mutex m;
  return m;
}
}  // namespace

ThreadPool& DefaultPool() {
  std::lock_guard<std::mutex> l(PoolSlotMutex());
  auto& p = PoolSlot();
  if (!p) p = std::make_unique<ThreadPool>(0);
  return *p;
}

void SetThreads(int n_threads) {
  std::lock_guard<std::mutex> l(PoolSlotMutex());
  PoolSlot() = std::make_unique<ThreadPool>(n_threads);
}

}  // namespace fedtune::kernels
