#include "quantized_matmul/cpu_driver.h"

#include <algorithm>
#include <vector>

#include "common/cpu/thread_pool.h"
#include "common/math.h"

namespace mlx_ext::cpu {
namespace {

// Below this many rows of x the weights are read once per kernel call
// straight from their packed form (GEMV); from here on, dequantizing tiles
// for the register-blocked GEMM is cheaper.
constexpr int64_t kGemmMinRows = 12;

// Splits [0, n) into about `tasks` ranges whose bounds are multiples of `align`.
int64_t chunk_size(int64_t n, int64_t tasks, int64_t align) {
  return std::max(align, round_up(ceil_div(n, tasks), align));
}

void run_qmv(const KernelTable& kt, QmmArgs& a) {
  const int64_t groups = a.K / a.group_size;
  // The group sums meet the biases: only the affine mode has them.
  std::vector<float> sums(a.biases ? a.M * groups : 0);
  for (int64_t m = 0; a.biases && m < a.M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) s += a.x[m * a.K + k];
      sums[m * groups + g] = s;
    }
  a.x_group_sums = sums.data();
  std::vector<float> prepared(a.M * a.K);
  a.x_prepared = kt.qmv_prepare(a, prepared.data()) ? prepared.data() : nullptr;
  const int64_t chunk = chunk_size(a.N, 16 * num_threads(), 8);
  parallel_for(ceil_div(a.N, chunk), [&](int64_t t) {
    kt.qmv(a, t * chunk, std::min(a.N, (t + 1) * chunk));
  });
}

void run_qvm(const KernelTable& kt, const QmmArgs& a) {
  const int64_t chunk =
      std::min(kt.qvm_cols, chunk_size(a.N, 4 * num_threads(), 32));
  parallel_for(ceil_div(a.N, chunk), [&](int64_t t) {
    kt.qvm(a, t * chunk, std::min(a.N, (t + 1) * chunk));
  });
}

void run_gemm(const KernelTable& kt, const QmmArgs& a, bool transpose) {
  const auto& plan = kt.plan;
  const int64_t panels = ceil_div(a.M, plan.mr);
  const int64_t k_blocks = ceil_div(a.K, plan.kc);
  // Pack x into mr-row panels, one kc-deep slab per K block (layout in
  // cpu_kernels.h: PackedA).
  std::vector<float> packed(k_blocks * panels * plan.mr * plan.kc);
  parallel_for(panels, [&](int64_t p) {
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      float* dst = packed.data() + (kb * panels + p) * plan.mr * plan.kc;
      const int64_t k0 = kb * plan.kc;
      const int64_t kc = std::min<int64_t>(plan.kc, a.K - k0);
      for (int64_t k = 0; k < kc; ++k)
        for (int i = 0; i < plan.mr; ++i) {
          const int64_t m = p * plan.mr + i;
          dst[k * plan.mr + i] = m < a.M ? a.x[m * a.K + k0 + k] : 0.0f;
        }
    }
  });
  const PackedA pa{packed.data(), panels};
  const int64_t scratch_size = int64_t(plan.kc) * plan.nc + panels * plan.mr * plan.nc;
  auto* gemm = transpose ? kt.qmm_t : kt.qmm_n;
  parallel_for(ceil_div(a.N, plan.nc), [&](int64_t t) {
    thread_local std::vector<float> scratch;
    if (int64_t(scratch.size()) < scratch_size) scratch.resize(scratch_size);
    gemm(a, pa, t * plan.nc, scratch.data());
  });
}

} // namespace

void run_quantized_matmul(const KernelTable& kernels, QmmArgs a, bool transpose) {
  if (a.M >= kGemmMinRows) {
    run_gemm(kernels, a, transpose);
  } else if (transpose) {
    run_qmv(kernels, a);
  } else {
    run_qvm(kernels, a);
  }
}

} // namespace mlx_ext::cpu
