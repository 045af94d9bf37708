// The package's own CPU thread pool (MLX runs each CPU stream on one thread).
// Size: the number of cores, or MLX_EXT_NUM_THREADS, or set_num_threads().
#pragma once

#include <cstdint>
#include <functional>

namespace mlx_ext::cpu {

int num_threads();
void set_num_threads(int n); // n >= 1; takes effect for the next parallel_for

// Runs task(i) for every i in [0, n_tasks) on the pool; the calling thread
// works too and returns when all tasks are done. Tasks are handed out one at a
// time from a shared counter, so uneven tasks balance. If the pool is busy
// (a kernel on another stream), the caller runs all tasks itself.
void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& task);

} // namespace mlx_ext::cpu
