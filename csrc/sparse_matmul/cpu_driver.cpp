#include "sparse_matmul/cpu_driver.h"

#include <algorithm>
#include <functional>
#include <vector>

#include "common/cpu/thread_pool.h"
#include "common/math.h"

namespace mlx_ext::cpu {
namespace {

// What a row costs beside its stored values (empty rows still write outputs).
constexpr int64_t kRowCost = 8;

// cost[r]: the cost of rows [0, r) of W, for r in [0, N].
std::vector<int64_t> row_costs(const SparseW& w) {
  std::vector<int64_t> cost(w.N + 1, 0);
  for (int64_t r = 0; r < w.N; ++r) {
    int64_t stored;
    switch (w.kind) {
      case SparseKind::csr:
      case SparseKind::bitmask: stored = w.row_ptr[r + 1] - w.row_ptr[r]; break;
      case SparseKind::bsr: {
        const int64_t br = r / w.block_n;
        stored = int64_t(w.row_ptr[br + 1] - w.row_ptr[br]) * w.block_k;
        break;
      }
      default: stored = w.K / w.m * w.n;
    }
    cost[r + 1] = cost[r] + stored + kRowCost;
  }
  return cost;
}

// Row bounds of about `tasks` ranges of equal cost (threads over rows,
// balanced by stored values rather than by rows), each a multiple of align.
std::vector<int64_t> balanced_rows(const SparseW& w, int64_t tasks, int64_t align) {
  const auto cost = row_costs(w);
  std::vector<int64_t> bounds{0};
  for (int64_t t = 1; t < tasks; ++t) {
    const int64_t target = cost.back() * t / tasks;
    const int64_t r = (std::lower_bound(cost.begin(), cost.end(), target) - cost.begin()) / align * align;
    if (r > bounds.back() && r < w.N) bounds.push_back(r);
  }
  bounds.push_back(w.N);
  return bounds;
}

void for_row_ranges(const SparseW& w, int64_t tasks, const std::function<void(int64_t, int64_t)>& f,
    int64_t align = 1) {
  const auto bounds = balanced_rows(w, tasks, align);
  parallel_for(int64_t(bounds.size()) - 1, [&](int64_t t) { f(bounds[t], bounds[t + 1]); });
}

// x (M, K) transposed into panels of `width` rows (layout: XPanels), in xt.
void pack_panels(const float* x, int64_t M, int64_t K, int width, std::vector<float>& xt) {
  const int64_t tiles = ceil_div(M, width);
  xt.resize(tiles * K * width);
  parallel_for(tiles, [&](int64_t t) {
    // Writes in order; the reads walk `width` rows of x side by side.
    float* dst = xt.data() + t * K * width;
    const int64_t rows = std::min<int64_t>(width, M - t * width);
    const float* src = x + t * width * K;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = 0; i < rows; ++i) dst[k * width + i] = src[i * K + k];
      for (int64_t i = rows; i < width; ++i) dst[k * width + i] = 0.0f;
    }
  });
}

// a (rows, cols) -> (cols, rows).
std::vector<float> transposed(const float* a, int64_t rows, int64_t cols) {
  std::vector<float> t(rows * cols);
  parallel_for(ceil_div(cols, 64), [&](int64_t b) {
    for (int64_t c = b * 64; c < std::min(cols, (b + 1) * 64); ++c)
      for (int64_t r = 0; r < rows; ++r) t[c * rows + r] = a[r * cols + c];
  });
  return t;
}

void run_rows(const SparseKernelTable& kt, const SparseW& w, const float* x, int64_t M,
    const SparseOut& out) {
  // Up to kGatherRows rows of x: one pass of the decode kernel per row (the
  // task's rows of W stay in cache between passes), cheaper there than the
  // panel path's decoding of every stored value, which small M does not
  // amortize. Single-thread CPU time at 4096x4096, M = 8: 2:4 9 ms against
  // 38, Bitmask 50% 17 against 25, CSR 50% 23 against 25. More rows: panels
  // as wide as the kernel takes (or one vector, for a few rows), the values
  // decoded once per call and reused by every panel; formats with a register-
  // tile path (kt.tile_plan) take it instead, in panels of its width.
  constexpr int64_t kGatherRows = 8;
  const int narrow = kt.panel_width / 4;
  const TilePlan tiles = M <= kGatherRows ? TilePlan{0, 1, 0} : kt.tile_plan(w, M);
  const int width = M <= kGatherRows ? 1 : tiles.width ? tiles.width : M <= narrow ? narrow : kt.panel_width;
  // Kept by the calling thread between calls: a fresh buffer of M x K floats
  // costs its page faults on every call (a tenth of a BSR prefill's time).
  thread_local std::vector<float> packed;
  if (width > 1) pack_panels(x, M, w.K, width, packed);
  const XPanels xp{width > 1 ? packed.data() : x, M, ceil_div(M, width), width};
  // At least 16 tasks a thread, and no more than about kTaskRows rows of W
  // each: the panel prefill keeps every panel's sums of its rows (tiles x rows
  // x width floats, 256 KiB at 128 rows and M = 512), which must stay in L2.
  constexpr int64_t kTaskRows = 128;
  const int64_t tasks = tiles.tasks_per_thread
      ? tiles.tasks_per_thread * num_threads()
      : std::max<int64_t>(16 * num_threads(), width > 1 ? ceil_div(w.N, kTaskRows) : 1);
  for_row_ranges(
      w, tasks, [&](int64_t r0, int64_t r1) { kt.matmul_rows(w, xp, out, r0, r1); },
      tiles.width ? tiles.row_align : 1);
  if (packed.size() > (size_t(64) << 20) / sizeof(float)) std::vector<float>().swap(packed); // over 64 MiB: not kept
}

} // namespace

void run_sparse_matmul(const SparseKernelTable& kernels, const SparseW& w, const float* x,
    int64_t M, const SparseOut& out, bool transpose) {
  if (transpose) return run_rows(kernels, w, x, M, out);
  // x W = x (W^T)^T: W^T as CSR (a deterministic counting sort, no float
  // atomics), then the same row kernels.
  const int64_t nnz = row_costs(w).back() - kRowCost * w.N;
  std::vector<int32_t> col_ptr(w.K + 1);
  std::vector<uint32_t> rows(nnz);
  std::vector<float> values(nnz);
  kernels.transpose(w, col_ptr.data(), rows.data(), values.data());
  SparseW wt{};
  wt.kind = SparseKind::csr;
  wt.value_type = FloatType::f32;
  wt.values = values.data();
  wt.pattern = rows.data();
  wt.row_ptr = col_ptr.data();
  wt.wide_columns = true;
  wt.N = w.K;
  wt.K = w.N;
  run_rows(kernels, wt, x, M, out);
}

void run_sparse_sampled(const SparseKernelTable& kernels, const SparseW& w, const float* g,
    const float* x, int64_t M, void* dvalues) {
  const auto gt = transposed(g, M, w.N);
  const auto xt = transposed(x, M, w.K);
  for_row_ranges(w, 16 * num_threads(), [&](int64_t r0, int64_t r1) {
    kernels.sampled_rows(w, gt.data(), xt.data(), M, dvalues, r0, r1);
  });
}

} // namespace mlx_ext::cpu
