// Checks of csrc/common/cpu/thread_pool.cpp, one per command-line name (run
// by tests/test_thread_pool.py, also under ThreadSanitizer and
// AddressSanitizer). Prints "ok <name>" and exits 0, or says what failed and
// exits 1.
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/cpu/thread_pool.h"

namespace {

using mlx_ext::cpu::parallel_for;
using mlx_ext::cpu::set_num_threads;
using Clock = std::chrono::steady_clock;

#define CHECK(cond, ...)                                                 \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::fprintf(stderr, "%s:%d: failed: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                 \
      std::fprintf(stderr, "\n");                                        \
      std::exit(1);                                                      \
    }                                                                    \
  } while (0)

// Runs a job of n tasks and checks that each ran exactly once.
void run_counted(int64_t n, const char* what) {
  std::vector<std::atomic<int>> runs(n);
  parallel_for(n, [&](int64_t i) { runs[i].fetch_add(1, std::memory_order_relaxed); });
  for (int64_t i = 0; i < n; ++i)
    CHECK(runs[i].load() == 1, "%s: n_tasks=%lld: task %lld ran %d times", what, (long long)n,
          (long long)i, runs[i].load());
}

// Waits (bounded) until flag is set; false on timeout.
bool wait_for(const std::atomic<bool>& flag) {
  const auto until = Clock::now() + std::chrono::seconds(5);
  while (!flag.load()) {
    if (Clock::now() > until) return false;
    std::this_thread::yield();
  }
  return true;
}

// A job with a task per thread, each waiting until a worker has run one: it
// completes only if workers take part (after an exception too). The callers'
// (bounded) wait fails the check when no worker comes.
void workers_take_part(const char* what) {
  const auto caller = std::this_thread::get_id();
  std::atomic<bool> worker_ran{false};
  parallel_for(mlx_ext::cpu::num_threads(), [&](int64_t) {
    if (std::this_thread::get_id() != caller) worker_ran = true;
    CHECK(wait_for(worker_ran), "%s: no worker took a task", what);
  });
}

void every_task_once() {
  for (int threads : {1, 2, 3, 4, 8}) {
    set_num_threads(threads);
    for (int64_t n : {0, 1, 2, 3, 7, 8, 9, 31, 64, 257, 1000, 10007})
      for (int rep = 0; rep < 20; ++rep) run_counted(n, "every_task_once");
  }
}

struct TaskError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// parallel_for(n) where task(i) throws TaskError("task i") when throws(i)
// holds; checks that one of those exceptions reaches the caller, that no task
// runs after parallel_for threw, and that the pool works afterwards.
void expect_throw(int64_t n, const std::function<bool(int64_t)>& throws, const char* what) {
  std::atomic<int64_t> ran{0};
  std::string message;
  try {
    parallel_for(n, [&](int64_t i) {
      if (throws(i)) throw TaskError("task " + std::to_string(i));
      std::this_thread::sleep_for(std::chrono::microseconds(i % 3 * 50));
      ran.fetch_add(1);
    });
  } catch (const TaskError& e) {
    message = e.what();
  }
  CHECK(!message.empty(), "%s: no TaskError reached the caller", what);
  CHECK(message.rfind("task ", 0) == 0 && throws(std::stoll(message.substr(5))),
        "%s: unexpected message '%s'", what, message.c_str());
  const int64_t after_throw = ran.load();
  std::this_thread::sleep_for(std::chrono::milliseconds(1));
  CHECK(ran.load() == after_throw, "%s: tasks ran after parallel_for threw", what);
  run_counted(100, what);
  if (mlx_ext::cpu::num_threads() > 1) workers_take_part(what);
}

void exception_first_or_last_task() {
  for (int threads : {1, 2, 4}) {
    set_num_threads(threads);
    for (int64_t n : {1, 2, 5, 64}) {
      for (int rep = 0; rep < 10; ++rep) {
        expect_throw(n, [](int64_t i) { return i == 0; }, "first task");
        expect_throw(n, [n](int64_t i) { return i == n - 1; }, "last task");
        expect_throw(n, [](int64_t) { return true; }, "every task");
      }
    }
  }
}

// The throwing task runs on a worker: tasks on the calling thread wait until
// a worker has thrown.
void exception_on_worker() {
  for (int threads : {2, 4}) {
    set_num_threads(threads);
    for (int rep = 0; rep < 50; ++rep) {
      const auto caller = std::this_thread::get_id();
      std::atomic<bool> thrown{false};
      bool caught = false;
      try {
        parallel_for(16, [&](int64_t i) {
          if (std::this_thread::get_id() != caller) {
            thrown = true;
            throw std::out_of_range("worker task " + std::to_string(i));
          }
          CHECK(wait_for(thrown), "no worker took a task");
        });
      } catch (const std::out_of_range& e) {
        caught = std::strncmp(e.what(), "worker task ", 12) == 0;
      }
      CHECK(caught, "threads=%d: the worker's std::out_of_range did not reach the caller", threads);
      run_counted(50, "after exception_on_worker");
      workers_take_part("after exception_on_worker");
    }
  }
}

// The throwing task runs on the calling thread while workers are busy.
void exception_on_caller() {
  for (int threads : {1, 2, 4}) {
    set_num_threads(threads);
    for (int rep = 0; rep < 50; ++rep) {
      const auto caller = std::this_thread::get_id();
      std::atomic<bool> thrown{false};
      std::atomic<int> ran{0};
      int caught = 0;
      try {
        parallel_for(16, [&](int64_t) {
          if (std::this_thread::get_id() == caller) {
            thrown = true;
            throw 42; // not even a std::exception
          }
          CHECK(wait_for(thrown), "the caller took no task");
          ran.fetch_add(1);
        });
      } catch (int e) {
        caught = e;
      }
      CHECK(caught == 42, "threads=%d: the caller's exception did not propagate", threads);
      const int after_throw = ran.load();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      CHECK(ran.load() == after_throw, "threads=%d: tasks ran after parallel_for threw", threads);
      run_counted(50, "after exception_on_caller");
      if (threads > 1) workers_take_part("after exception_on_caller");
    }
  }
}

// Workers asleep after a long idle time wake up for the next job.
void sleeping_workers_wake() {
  for (int threads : {2, 4}) {
    set_num_threads(threads);
    for (int rep = 0; rep < 3; ++rep) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      workers_take_part("sleeping_workers_wake");
    }
  }
}

// Two threads call parallel_for at once (MLX runs kernels on two CPU streams):
// one gets the pool, the other runs its tasks inline; both must be right.
void concurrent_callers() {
  for (int threads : {2, 4}) {
    set_num_threads(threads);
    auto caller = [] {
      for (int job = 0; job < 3000; ++job) run_counted(1 + job % 40, "concurrent_callers");
    };
    std::thread other(caller);
    caller();
    other.join();
  }
}

// set_num_threads replaces the pool while another thread runs jobs on it.
void resize_while_running() {
  set_num_threads(2);
  std::atomic<bool> done{false};
  std::thread runner([&] {
    for (int job = 0; job < 2000; ++job) {
      std::vector<std::atomic<int>> runs(64);
      parallel_for(64, [&](int64_t i) {
        if (i % 16 == 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
        runs[i].fetch_add(1);
      });
      for (auto& r : runs) CHECK(r.load() == 1, "resize_while_running: a task ran %d times", r.load());
    }
    done = true;
  });
  for (int i = 0; !done.load(); ++i) {
    set_num_threads(1 + i % 4);
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  runner.join();
}

// Many small jobs back to back, the pattern of a decode step.
void many_small_jobs() {
  for (int threads : {2, 3}) {
    set_num_threads(threads);
    std::atomic<int64_t> sum{0};
    int64_t expected = 0;
    for (int job = 0; job < 100000; ++job) {
      const int64_t n = 2 + job % 7;
      parallel_for(n, [&](int64_t i) { sum.fetch_add(i + 1, std::memory_order_relaxed); });
      expected += n * (n + 1) / 2;
    }
    CHECK(sum.load() == expected, "many_small_jobs: sum %lld, expected %lld", (long long)sum.load(),
          (long long)expected);
  }
}

double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// Workers spin only briefly after a job: an idle process uses no CPU.
void idle_uses_no_cpu() {
  set_num_threads(4);
  for (int job = 0; job < 1000; ++job) run_counted(8, "idle_uses_no_cpu");
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const double before = cpu_seconds();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double used = cpu_seconds() - before;
  CHECK(used < 0.03, "idle_uses_no_cpu: %.0f ms of CPU in 300 ms of idleness", used * 1e3);
}

const std::map<std::string, void (*)()> kChecks = {
    {"every_task_once", every_task_once},
    {"exception_first_or_last_task", exception_first_or_last_task},
    {"exception_on_worker", exception_on_worker},
    {"exception_on_caller", exception_on_caller},
    {"sleeping_workers_wake", sleeping_workers_wake},
    {"concurrent_callers", concurrent_callers},
    {"resize_while_running", resize_while_running},
    {"many_small_jobs", many_small_jobs},
    {"idle_uses_no_cpu", idle_uses_no_cpu},
};

} // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const auto check = kChecks.find(argv[i]);
    CHECK(check != kChecks.end(), "unknown check '%s'", argv[i]);
    check->second();
    std::printf("ok %s\n", argv[i]);
  }
  return argc > 1 ? 0 : 2;
}
