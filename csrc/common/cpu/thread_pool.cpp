#include "common/cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#endif

namespace mlx_ext::cpu {
namespace {

using Task = std::function<void(int64_t)>;

// How long a worker spins after its last job before it sleeps.
constexpr auto kSpin = std::chrono::microseconds(100);

// One step of a spin-wait: a pause instruction, and every 64th step a yield
// of the core, so that a spinning thread never starves one that shares its
// core (more threads than free cores: another process, a second CPU stream).
inline void relax(uint32_t step) {
  if (step % 64 == 0) {
    std::this_thread::yield();
  } else {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__) || defined(__arm__)
    asm volatile("yield");
#endif
  }
}

// The job word: epoch << 32 | kOpen | workers inside.
constexpr uint64_t kOpen = uint64_t(1) << 31;
constexpr uint64_t kInside = kOpen - 1;
inline uint64_t epoch_of(uint64_t word) { return word >> 32; }

class Pool {
 public:
  explicit Pool(int n_threads) {
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this] { work(); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int size() const { return int(workers_.size()) + 1; }

  void run(int64_t n_tasks, const Task& task) {
    if (workers_.empty() || busy_.exchange(true, std::memory_order_acquire)) {
      for (int64_t i = 0; i < n_tasks; ++i) task(i);
      return;
    }
    task_ = &task;
    n_tasks_ = n_tasks;
    next_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
    word_.store((epoch_of(word_.load(std::memory_order_relaxed)) + 1) << 32 | kOpen);
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lock(mutex_); }
      wake_.notify_all();
    }
    take_tasks();
    word_.fetch_and(~kOpen, std::memory_order_relaxed);
    for (uint32_t i = 1; word_.load(std::memory_order_acquire) & kInside; ++i) relax(i);
    std::exception_ptr error = std::move(error_);
    error_ = nullptr;
    busy_.store(false, std::memory_order_release);
    if (error) std::rethrow_exception(error);
  }

 private:
  void take_tasks() {
    const int64_t n = n_tasks_;
    try {
      for (int64_t i = next_.fetch_add(1, std::memory_order_relaxed); i < n;
           i = next_.fetch_add(1, std::memory_order_relaxed))
        (*task_)(i);
    } catch (...) {
      if (!failed_.exchange(true, std::memory_order_relaxed)) error_ = std::current_exception();
      next_.store(n, std::memory_order_relaxed); // skip the tasks not yet started
    }
  }

  bool new_job(uint64_t seen) const { return stop_ || epoch_of(word_.load()) != seen; }

  void wait_for_job(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (uint32_t i = 1; !new_job(seen); ++i) {
      if (i % 64 == 0 && std::chrono::steady_clock::now() > until) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return new_job(seen); });
        sleepers_.fetch_sub(1);
        return;
      }
      relax(i);
    }
  }

  void work() {
    uint64_t seen = 0;
    while (true) {
      wait_for_job(seen);
      if (stop_) return;
      uint64_t word = word_.load();
      seen = epoch_of(word);
      while ((word & kOpen) && epoch_of(word) == seen) {
        if (word_.compare_exchange_weak(word, word + 1, std::memory_order_acquire)) {
          take_tasks();
          word_.fetch_sub(1, std::memory_order_release);
          break;
        }
      }
    }
  }

  // What a spinning worker reads, and the job it then joins: one cache line.
  alignas(64) std::atomic<uint64_t> word_{0};
  std::atomic<bool> stop_{false};
  const Task* task_ = nullptr;
  int64_t n_tasks_ = 0;
  // The task counter, on a line of its own.
  alignas(64) std::atomic<int64_t> next_{0};
  // Mostly the caller's.
  alignas(64) std::atomic<bool> busy_{false}; // one job at a time; a second caller runs inline
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
};

int default_threads() {
  if (const char* env = std::getenv("MLX_EXT_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

std::mutex pool_mutex;
std::shared_ptr<Pool> pool_ptr;

std::shared_ptr<Pool> pool() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (!pool_ptr) pool_ptr = std::make_shared<Pool>(default_threads());
  return pool_ptr;
}

} // namespace

int num_threads() {
  return pool()->size();
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("[mlx_ext.set_num_threads] n must be >= 1, got " + std::to_string(n));
  auto fresh = std::make_shared<Pool>(n);
  std::lock_guard<std::mutex> lock(pool_mutex);
  pool_ptr = std::move(fresh); // a job still running keeps the old pool alive
}

void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& task) {
  if (n_tasks <= 1) {
    if (n_tasks == 1) task(0);
    return;
  }
  pool()->run(n_tasks, task);
}

} // namespace mlx_ext::cpu
