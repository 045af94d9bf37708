#include "common/cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace mlx_ext::cpu {
namespace {

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

  void run(int64_t n_tasks, const std::function<void(int64_t)>& task) {
    std::unique_lock<std::mutex> job(job_mutex_, std::try_to_lock);
    if (!job.owns_lock() || workers_.empty() || n_tasks <= 1) {
      for (int64_t i = 0; i < n_tasks; ++i) task(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      n_tasks_ = n_tasks;
      next_.store(0);
      busy_workers_ = int(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    take_tasks(task, n_tasks);
    // Every worker must have left the job before `task` goes out of scope.
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_workers_ == 0; });
  }

 private:
  void take_tasks(const std::function<void(int64_t)>& task, int64_t n_tasks) {
    for (int64_t i = next_.fetch_add(1); i < n_tasks; i = next_.fetch_add(1)) task(i);
  }

  void work() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      const auto* task = task_;
      const int64_t n_tasks = n_tasks_;
      lock.unlock();
      take_tasks(*task, n_tasks);
      lock.lock();
      if (--busy_workers_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_mutex_; // one job at a time; a second caller runs inline
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t n_tasks_ = 0;
  int busy_workers_ = 0;
  std::atomic<int64_t> next_{0};
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
  pool()->run(n_tasks, task);
}

} // namespace mlx_ext::cpu
