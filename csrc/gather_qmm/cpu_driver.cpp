#include "gather_qmm/cpu_driver.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu/thread_pool.h"
#include "common/math.h"
#include "quantized_matmul/cpu_driver.h"

namespace mlx_ext::cpu {
namespace {

// Tasks per thread of the whole pass: enough that uneven experts balance.
constexpr int64_t kGemvTasksPerThread = 16;
constexpr int64_t kQvmTasksPerThread = 4;

int64_t element_size(FloatType t) { return t == FloatType::f32 ? 4 : 2; }

// Fills `count` elements of `out` with a quiet NaN of its type.
void fill_nan(void* out, FloatType t, int64_t count) {
  if (t == FloatType::f32) {
    std::fill_n(static_cast<uint32_t*>(out), count, 0x7fc00000u);
  } else {
    std::fill_n(static_cast<uint16_t*>(out), count, t == FloatType::f16 ? 0x7e00 : 0x7fc0);
  }
}

// One expert's share of the call: the pairs routed to it (in `pairs`), their
// rows of x gathered into one (rows, K) block, and what its kernel needs.
struct ExpertBlock {
  int64_t expert;
  const int64_t* pairs;
  int64_t count;
  QmmArgs a;
  QmmArgs up; // the up projection's (up.w nullptr: none), sharing a's x
  bool gemm;
  int64_t chunk; // output columns per task
  int64_t tasks;
  std::vector<float> x; // (count * M, K)
  std::vector<float> sums, prepared; // GEMV: group sums, permuted x
  std::vector<float> packed; // GEMM: x packed into panels (PackedA)
  PackedA pa{};
  std::vector<uint8_t> staging, up_staging; // out rows, when the pairs' blocks are not adjacent in out
  int projections() const { return up.w ? 2 : 1; }
};

// An expert with fewer gathered rows than kGemmMinRows runs the quantized
// matmul's GEMV kernels (weights read once from their packed form for all
// rows), from there on its register-blocked GEMM: the same crossover and the
// same preparation of x as quantized_matmul/cpu_driver.cpp.
void prepare_gemv(const KernelTable& kt, ExpertBlock& b, int64_t share) {
  prepare_qmv(kt, b.a, b.sums, b.prepared);
  b.chunk = chunk_size(b.a.N, share * kGemvTasksPerThread, 8);
}

void prepare_gemm(const KernelTable& kt, ExpertBlock& b) {
  b.packed.resize(packed_x_size(kt, b.a));
  const int64_t panels = ceil_div(b.a.M, kt.plan.mr);
  pack_x_panels(kt, b.a, b.packed.data(), 0, panels);
  b.pa = PackedA{b.packed.data(), panels};
  b.chunk = kt.plan.nc;
}

} // namespace

void run_gather_qmm(const KernelTable& kt, const GatherQmmArgs& g) {
  const int64_t esize = element_size(g.type);
  const int64_t block_elems = g.M * g.N; // one pair's output block
  auto* out = static_cast<uint8_t*>(g.out);
  auto* up_out = static_cast<uint8_t*>(g.up_out);

  // Group the pairs by expert (a counting sort, stable: pairs keep their
  // order within an expert). Out-of-range pairs get NaN and read nothing.
  std::vector<int64_t> start(g.E + 1, 0);
  for (int64_t p = 0; p < g.P; ++p) {
    if (g.lhs[p] < g.X && g.rhs[p] < g.E) {
      ++start[g.rhs[p] + 1];
    } else {
      fill_nan(out + p * block_elems * esize, g.type, block_elems);
      if (g.up_w) fill_nan(up_out + p * block_elems * esize, g.type, block_elems);
    }
  }
  for (int64_t e = 0; e < g.E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> order(start[g.E]);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < g.P; ++p)
      if (g.lhs[p] < g.X && g.rhs[p] < g.E) order[next[g.rhs[p]]++] = p;
  }

  const int64_t rows = g.transpose ? g.N : g.K;
  const int64_t w_bytes = rows * (g.transpose ? g.K : g.N) * g.bits / 8;
  const int64_t group_elems = rows * ((g.transpose ? g.K : g.N) / g.group_size);
  std::vector<ExpertBlock> blocks;
  for (int64_t e = 0; e < g.E; ++e) {
    if (start[e + 1] == start[e]) continue;
    ExpertBlock b{};
    b.expert = e;
    b.pairs = order.data() + start[e];
    b.count = start[e + 1] - start[e];
    b.a.w = g.w + e * w_bytes;
    b.a.scales = static_cast<const uint8_t*>(g.scales) + e * group_elems * esize;
    b.a.biases = static_cast<const uint8_t*>(g.biases) + e * group_elems * esize;
    b.a.bias = g.bias && g.bias_per_expert
        ? static_cast<const uint8_t*>(g.bias) + e * g.N * esize
        : g.bias;
    b.a.type = g.type;
    b.a.M = b.count * g.M;
    b.a.N = g.N;
    b.a.K = g.K;
    b.a.group_size = g.group_size;
    b.a.bits = g.bits;
    b.gemm = b.a.M >= kGemmMinRows;
    if (g.up_w) {
      b.up = b.a;
      b.up.w = g.up_w + e * w_bytes;
      b.up.scales = static_cast<const uint8_t*>(g.up_scales) + e * group_elems * esize;
      b.up.biases = static_cast<const uint8_t*>(g.up_biases) + e * group_elems * esize;
    }
    blocks.push_back(std::move(b));
  }
  if (blocks.empty()) return;

  // Per expert, in parallel: gather its rows of x, then what its kernel
  // reads (group sums and permuted x for the GEMV, panels for the GEMM).
  // Each task's share of the pool sizes its GEMV chunks so that the whole
  // pass has about kGemvTasksPerThread tasks per thread.
  const int64_t share = ceil_div(num_threads(), int64_t(blocks.size()));
  parallel_for(int64_t(blocks.size()), [&](int64_t i) {
    ExpertBlock& b = blocks[i];
    b.x.resize(b.a.M * g.K);
    for (int64_t j = 0; j < b.count; ++j)
      std::memcpy(b.x.data() + j * g.M * g.K, g.x + int64_t(g.lhs[b.pairs[j]]) * g.M * g.K,
          g.M * g.K * sizeof(float));
    b.a.x = b.x.data();
    // The pairs' output blocks are adjacent in out (sorted indices, or one
    // pair): the kernels write there directly, else into staging.
    bool adjacent = true;
    for (int64_t j = 1; j < b.count; ++j) adjacent = adjacent && b.pairs[j] == b.pairs[0] + j;
    if (adjacent) {
      b.a.out = out + b.pairs[0] * block_elems * esize;
      if (b.up.w) b.up.out = up_out + b.pairs[0] * block_elems * esize;
    } else {
      b.staging.resize(b.count * block_elems * esize);
      b.a.out = b.staging.data();
      if (b.up.w) {
        b.up_staging.resize(b.count * block_elems * esize);
        b.up.out = b.up_staging.data();
      }
    }
    if (b.gemm) {
      prepare_gemm(kt, b);
    } else if (g.transpose) {
      prepare_gemv(kt, b, share);
    } else {
      b.chunk = std::min(kt.qvm_cols, chunk_size(g.N, share * kQvmTasksPerThread, 32));
    }
    b.tasks = ceil_div(g.N, b.chunk);
    if (b.up.w) { // the same prepared x (group sums, permuted or packed rows)
      b.up.x = b.a.x;
      b.up.x_group_sums = b.a.x_group_sums;
      b.up.x_prepared = b.a.x_prepared;
    }
  });

  // One pass over every expert's column chunks (of each projection).
  std::vector<int64_t> first_task(blocks.size() + 1, 0);
  for (size_t i = 0; i < blocks.size(); ++i)
    first_task[i + 1] = first_task[i] + blocks[i].tasks * blocks[i].projections();
  const int64_t scratch_size = [&] {
    int64_t panels = 0;
    for (const auto& b : blocks)
      if (b.gemm) panels = std::max(panels, b.pa.panels);
    return int64_t(kt.plan.kc) * kt.plan.nc + panels * kt.plan.mr * kt.plan.nc;
  }();
  parallel_for(first_task.back(), [&](int64_t t) {
    const size_t i = std::upper_bound(first_task.begin(), first_task.end(), t) - first_task.begin() - 1;
    const ExpertBlock& b = blocks[i];
    const int64_t local = t - first_task[i];
    const QmmArgs& a = local < b.tasks ? b.a : b.up;
    const int64_t n0 = (local % b.tasks) * b.chunk;
    if (b.gemm) {
      thread_local std::vector<float> scratch;
      if (int64_t(scratch.size()) < scratch_size) scratch.resize(scratch_size);
      (g.transpose ? kt.qmm_t : kt.qmm_n)(a, b.pa, n0, scratch.data());
    } else {
      (g.transpose ? kt.qmv : kt.qvm)(a, n0, std::min(g.N, n0 + b.chunk));
    }
  });

  for (const auto& b : blocks) {
    if (b.staging.empty()) continue;
    for (int64_t j = 0; j < b.count; ++j) {
      std::memcpy(out + b.pairs[j] * block_elems * esize,
          b.staging.data() + j * block_elems * esize, block_elems * esize);
      if (b.up.w)
        std::memcpy(up_out + b.pairs[j] * block_elems * esize,
            b.up_staging.data() + j * block_elems * esize, block_elems * esize);
    }
  }
}

} // namespace mlx_ext::cpu
