// Dispatch cost of mlx_ext::cpu::parallel_for: the wall time of one call with
// n trivial tasks, timed call by call.
//
//     thread_pool [calls]
//
// For threads in {1, 2}, gap in {0, 20} us of caller work before each call
// (0: back to back, like the many small jobs of a decode step) and n_tasks in
// {1, 2, 8, 32, 128}, prints one line "threads n_tasks gap_us median_ns".
// Built and run by bench/bench_thread_pool.py.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/cpu/thread_pool.h"

namespace {

using Clock = std::chrono::steady_clock;

void busy_for(std::chrono::nanoseconds d) {
  const auto end = Clock::now() + d;
  while (Clock::now() < end) {
  }
}

// A task that does nothing the compiler can remove and touches no memory, so
// that no cache line moves between cores but the pool's own.
void trivial(int64_t i) {
  asm volatile("" : : "r"(i));
}

double median_ns(int64_t n_tasks, std::chrono::nanoseconds gap, int calls) {
  const int warmup = std::max(10, calls / 10);
  std::vector<int64_t> times;
  times.reserve(calls);
  for (int c = 0; c < warmup + calls; ++c) {
    busy_for(gap);
    const auto t0 = Clock::now();
    mlx_ext::cpu::parallel_for(n_tasks, [](int64_t i) { trivial(i); });
    const auto t1 = Clock::now();
    if (c >= warmup) times.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return double(times[times.size() / 2]);
}

// Every task ran once (a pool that skips or repeats tasks would look fast).
void check(int64_t n_tasks) {
  std::vector<std::atomic<int>> runs(n_tasks);
  mlx_ext::cpu::parallel_for(n_tasks, [&](int64_t i) { runs[i].fetch_add(1); });
  for (const auto& r : runs) {
    if (r.load() != 1) {
      std::fprintf(stderr, "a task ran %d times\n", r.load());
      std::exit(1);
    }
  }
}

} // namespace

int main(int argc, char** argv) {
  const int calls = argc > 1 ? std::atoi(argv[1]) : 5000;
  for (int threads : {1, 2}) {
    mlx_ext::cpu::set_num_threads(threads);
    for (int gap_us : {0, 20}) {
      for (int64_t n_tasks : {1, 2, 8, 32, 128}) {
        check(n_tasks);
        const double ns = median_ns(n_tasks, std::chrono::microseconds(gap_us), gap_us ? calls / 5 : calls);
        std::printf("%d %lld %d %.0f\n", threads, (long long)n_tasks, gap_us, ns);
        std::fflush(stdout);
      }
    }
  }
}
