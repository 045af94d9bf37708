// Dispatch cost of mlx_ext::cpu::parallel_for: the wall time of one call with
// n trivial tasks (each bumps its own cache line), timed call by call.
//
//     thread_pool [calls]
//
// For threads in {1, 2}, gap in {0, 20} us of caller work before each call
// (0: back to back, like the many small jobs of a decode step) and n_tasks in
// {1, 2, 8, 32, 128}, prints one line "threads n_tasks gap_us median_ns".
// Built and run by bench/bench_thread_pool.py.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/cpu/thread_pool.h"

namespace {

using Clock = std::chrono::steady_clock;

struct alignas(64) Slot {
  int64_t runs = 0;
};

void busy_for(std::chrono::nanoseconds d) {
  const auto end = Clock::now() + d;
  while (Clock::now() < end) {
  }
}

double median_ns(int64_t n_tasks, std::chrono::nanoseconds gap, int calls) {
  const int warmup = std::max(10, calls / 10);
  std::vector<Slot> slots(n_tasks);
  std::vector<int64_t> times;
  times.reserve(calls);
  for (int c = 0; c < warmup + calls; ++c) {
    busy_for(gap);
    const auto t0 = Clock::now();
    mlx_ext::cpu::parallel_for(n_tasks, [&](int64_t i) { ++slots[i].runs; });
    const auto t1 = Clock::now();
    if (c >= warmup) times.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
  }
  for (const auto& s : slots) {
    if (s.runs != warmup + calls) {
      std::fprintf(stderr, "a task ran %lld times, not %d\n", (long long)s.runs, warmup + calls);
      std::exit(1);
    }
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return double(times[times.size() / 2]);
}

} // namespace

int main(int argc, char** argv) {
  const int calls = argc > 1 ? std::atoi(argv[1]) : 5000;
  for (int threads : {1, 2}) {
    mlx_ext::cpu::set_num_threads(threads);
    for (int gap_us : {0, 20}) {
      for (int64_t n_tasks : {1, 2, 8, 32, 128}) {
        const double ns = median_ns(n_tasks, std::chrono::microseconds(gap_us), gap_us ? calls / 5 : calls);
        std::printf("%d %lld %d %.0f\n", threads, (long long)n_tasks, gap_us, ns);
        std::fflush(stdout);
      }
    }
  }
}
