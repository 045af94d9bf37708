#include "quantized_matmul/cpu_driver.h"

#include <algorithm>
#include <vector>

#include "common/cpu/thread_pool.h"
#include "common/math.h"

namespace mlx_ext::cpu {

void prepare_qmv(const KernelTable& kt, QmmArgs& a, std::vector<float>& sums, std::vector<float>& prepared) {
  const int64_t groups = a.K / a.group_size;
  // The group sums meet the biases: only the affine mode has them.
  sums.resize(a.biases ? a.M * groups : 0);
  for (int64_t m = 0; a.biases && m < a.M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) s += a.x[m * a.K + k];
      sums[m * groups + g] = s;
    }
  a.x_group_sums = sums.data();
  prepared.resize(a.M * a.K);
  a.x_prepared = kt.qmv_prepare(a, prepared.data()) ? prepared.data() : nullptr;
}

int64_t packed_x_size(const KernelTable& kt, const QmmArgs& a) {
  return ceil_div(a.K, kt.plan.kc) * ceil_div(a.M, kt.plan.mr) * kt.plan.mr * kt.plan.kc;
}

void pack_x_panels(const KernelTable& kt, const QmmArgs& a, float* packed, int64_t p0, int64_t p1) {
  const auto& plan = kt.plan;
  const int64_t panels = ceil_div(a.M, plan.mr);
  const int64_t k_blocks = ceil_div(a.K, plan.kc);
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      float* dst = packed + (kb * panels + p) * plan.mr * plan.kc;
      const int64_t k0 = kb * plan.kc;
      const int64_t kc = std::min<int64_t>(plan.kc, a.K - k0);
      for (int64_t k = 0; k < kc; ++k)
        for (int i = 0; i < plan.mr; ++i) {
          const int64_t m = p * plan.mr + i;
          dst[k * plan.mr + i] = m < a.M ? a.x[m * a.K + k0 + k] : 0.0f;
        }
    }
}

namespace {

void run_qmv(const KernelTable& kt, QmmArgs& a) {
  std::vector<float> sums, prepared;
  prepare_qmv(kt, a, sums, prepared);
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
  std::vector<float> packed(packed_x_size(kt, a));
  parallel_for(panels, [&](int64_t p) { pack_x_panels(kt, a, packed.data(), p, p + 1); });
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
