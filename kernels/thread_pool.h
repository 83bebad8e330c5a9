// A small persistent thread pool with a blocking ParallelFor. Threads sleep between calls,
// except inside a LowLatencyScope: there a thread spins briefly (about 50 microseconds) for the
// next job before it sleeps, and the caller spins for the workers before it waits. Decoding one
// token makes ~240 small calls, and a sleep/wake round trip each (two futex transitions, 10-30
// us on a VM) costs more than the work of many of them. Spinning is opt-in, not the default:
// on a small machine shared by several processes (workers beside a coordinator, tests) spinning
// threads take cores from the others.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fedtune::kernels {

class ThreadPool {
 public:
  // n_threads <= 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // Splits [0, n) into contiguous chunks of at least `grain` and runs fn(begin, end, thread)
  // on the caller and the workers; returns when all chunks are done. Safe to call from several
  // threads (calls are serialised); not reentrant (fn must not call ParallelFor).
  void ParallelFor(int64_t n, int64_t grain,
                   const std::function<void(int64_t, int64_t, int)>& fn);

  // While at least one scope is alive, the pool's threads spin between jobs (see above).
  class LowLatencyScope {
   public:
    explicit LowLatencyScope(ThreadPool& pool) : pool_(pool) { pool_.spin_users_.fetch_add(1); }
    ~LowLatencyScope() { pool_.spin_users_.fetch_sub(1); }
    LowLatencyScope(const LowLatencyScope&) = delete;
    LowLatencyScope& operator=(const LowLatencyScope&) = delete;

   private:
    ThreadPool& pool_;
  };

 private:
  bool Spinning() const { return spin_users_.load(std::memory_order_relaxed) > 0; }
  void WorkerLoop(int index);
  std::vector<std::thread> workers_;
  std::mutex call_mu_;
  std::mutex mu_;
  std::condition_variable cv_start_, cv_done_;
  // The job's fields are written before generation_ is advanced (release) and read after it is
  // seen (acquire); a call returns only when pending_ is back to 0.
  const std::function<void(int64_t, int64_t, int)>* job_ = nullptr;
  int64_t n_ = 0, chunk_ = 0;
  int n_chunks_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> spin_users_{0};
};

// Process-wide pool used by the kernels; SetThreads before first use to size it.
ThreadPool& DefaultPool();
void SetThreads(int n_threads);

}  // namespace fedtune::kernels
