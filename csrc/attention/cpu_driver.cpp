#include "attention/cpu_driver.h"

#include <algorithm>
#include <vector>

#include "common/cpu/thread_pool.h"
#include "common/math.h"

namespace mlx_ext::cpu {
namespace {

// Query rows per task (over all the query heads of one kv head): enough to
// reuse each K/V tile many times, few enough for the rows' accumulators to
// stay in L1/L2 (64 rows x D=256 floats = 64 KiB).
constexpr int64_t kRowsPerTask = 64;
// Split keys when there are fewer tasks than this many per thread.
constexpr int64_t kTasksPerThread = 4;

// Query rows per task of each query head (a task covers all G of one kv head).
int64_t query_block(const AttentionArgs& a) {
  return std::min(a.L, std::max<int64_t>(1, kRowsPerTask / (a.Hq / a.Hkv)));
}

} // namespace

void run_attention(const AttentionKernels& kt, const AttentionArgs& a) {
  const int64_t rows = query_block(a);
  const int64_t q_blocks = ceil_div(a.L, rows);
  const int64_t tasks = a.B * a.Hkv * q_blocks;
  const int64_t wanted = kTasksPerThread * num_threads();

  // Decode and other small-L calls: split the keys into chunks so that every
  // thread reads its own part of K/V, then merge the chunks' partial results.
  int64_t chunks = 1;
  int64_t chunk_len = std::max<int64_t>(a.S, 1);
  if (tasks < wanted && a.S > kt.key_block) {
    chunks = std::min(ceil_div(a.S, kt.key_block), ceil_div(wanted, tasks));
    chunk_len = round_up(ceil_div(a.S, chunks), kt.key_block);
    chunks = ceil_div(a.S, chunk_len);
  }
  auto task_at = [&](int64_t t) {
    const int64_t c = t % chunks;
    t /= chunks;
    const int64_t qb = t % q_blocks;
    t /= q_blocks;
    return AttentionTask{t / a.Hkv, t % a.Hkv, qb * rows, std::min(a.L, (qb + 1) * rows),
        c * chunk_len, std::min(a.S, (c + 1) * chunk_len)};
  };
  if (chunks == 1) {
    parallel_for(tasks, [&](int64_t t) { kt.attend(a, task_at(t), nullptr); });
    return;
  }
  const int64_t n_rows = a.B * a.Hq * a.L;
  std::vector<float> m(chunks * n_rows), l(chunks * n_rows), acc(chunks * n_rows * a.D);
  AttentionPartials p{m.data(), l.data(), acc.data(), 0};
  parallel_for(tasks * chunks, [&](int64_t t) {
    AttentionPartials pt = p;
    pt.chunk = t % chunks;
    kt.attend(a, task_at(t), &pt);
  });
  const int64_t merge_rows = std::max<int64_t>(1, ceil_div(n_rows, wanted));
  parallel_for(ceil_div(n_rows, merge_rows), [&](int64_t t) {
    kt.merge(a, p, chunks, t * merge_rows, std::min(n_rows, (t + 1) * merge_rows));
  });
}

void run_attention_backward(
    const AttentionBackwardKernels& kt, int key_block, const AttentionArgs& a,
    const AttentionGrads& g) {
  const int64_t rows = std::max<int64_t>(1, query_block(a));
  const int64_t q_blocks = ceil_div(a.L, rows);
  parallel_for(a.B * a.Hkv * q_blocks, [&](int64_t t) {
    const int64_t qb = t % q_blocks, bh = t / q_blocks;
    kt.dq(a, g, AttentionTask{bh / a.Hkv, bh % a.Hkv, qb * rows, std::min(a.L, (qb + 1) * rows), 0, a.S});
  });
  if (!g.dk) return;
  const int64_t k_blocks = ceil_div(a.S, key_block);
  parallel_for(a.B * a.Hkv * k_blocks, [&](int64_t t) {
    const int64_t kb = t % k_blocks, bh = t / k_blocks;
    kt.dkv(a, g, AttentionTask{bh / a.Hkv, bh % a.Hkv, 0, a.L, kb * key_block,
        std::min(a.S, (kb + 1) * key_block)});
  });
}

} // namespace mlx_ext::cpu
