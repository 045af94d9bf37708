// The package's own CPU thread pool (MLX runs each CPU stream on one thread).
// Size: the number of cores, or MLX_EXT_NUM_THREADS, or set_num_threads().
//
// Design (thread_pool.cpp). A pool of n threads is the caller plus n - 1
// workers. One atomic word describes the current job: its epoch (bumped per
// job), an "open" bit and the number of workers inside it.
//  - Between jobs a worker spins on that word for about 100 us after its last
//    job (pause instructions, and every 64th step a yield of the core so that
//    it never starves a thread that shares its core), then sleeps on a
//    condition variable: an idle process uses no CPU.
//  - The caller publishes a job by writing the task and its size, then
//    storing a new epoch with the open bit (release). It touches the mutex
//    and condition variable only when a worker sleeps; a wake-up is never
//    lost because the caller stores the word then loads the sleeper count,
//    and a worker increments the count then checks the word (all seq_cst).
//  - A worker joins with a compare-exchange that increments the count only
//    while the job is open and has the epoch it saw (acquire), so it never
//    enters a finished job; it leaves with a release decrement.
//  - Tasks are handed out one at a time from an atomic counter. The caller
//    works too, then clears the open bit and spin-waits until the count is
//    zero (acquire): when parallel_for returns or throws, no worker uses the
//    task any more, and all their writes are visible. A worker that comes late
//    skips the job; none has to come.
//  - A task's exception is caught where it ran; the first is kept, the tasks
//    not yet started are skipped, and the caller rethrows it after the join.
#pragma once

#include <cstdint>
#include <functional>

namespace mlx_ext::cpu {

int num_threads();
void set_num_threads(int n); // n >= 1; takes effect for the next parallel_for

// Runs task(i) for every i in [0, n_tasks) on the pool; the calling thread
// works too and returns when all tasks are done. Tasks are handed out one at a
// time from a shared counter, so uneven tasks balance. If the pool is busy
// (a kernel on another stream), the caller runs all tasks itself. If a task
// throws, the first exception is rethrown to the caller once every worker has
// left the job; tasks not yet started may not run.
void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& task);

} // namespace mlx_ext::cpu
