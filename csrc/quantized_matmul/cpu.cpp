// QuantizedMatmul::eval_cpu: converts x to float32 once, picks the GEMV path
// (small M) or the blocked GEMM (large M) and spreads output columns over the
// package's thread pool. The arithmetic lives in cpu_kernels.cpp.
#include <algorithm>
#include <vector>

#include "common/cpu_isa.h"
#include "common/thread_pool.h"
#include "mlx/backend/cpu/encoder.h"
#include "quantized_matmul/cpu_kernels.h"
#include "quantized_matmul/quantized_matmul.h"

namespace mlx_ext {
namespace {

using cpu::FloatType;

// Below this many rows of x the weights are read once per kernel call
// straight from their packed form (GEMV); from here on, dequantizing tiles
// for the register-blocked GEMM is cheaper.
constexpr int64_t kGemmMinRows = 12;

const cpu::KernelTable& kernel_table() {
  switch (cpu::current_isa()) {
#if defined(MLX_EXT_HAVE_ISA_avx512)
    case cpu::Isa::avx512: return cpu::avx512::kernels;
#endif
#if defined(MLX_EXT_HAVE_ISA_avx2)
    case cpu::Isa::avx2: return cpu::avx2::kernels;
#endif
#if defined(MLX_EXT_HAVE_ISA_neon)
    case cpu::Isa::neon: return cpu::neon::kernels;
#endif
    default: return cpu::scalar::kernels;
  }
}

FloatType float_type(mx::Dtype t) {
  if (t == mx::float16) return FloatType::f16;
  if (t == mx::bfloat16) return FloatType::bf16;
  return FloatType::f32;
}

float to_float(const mx::array& x, int64_t i) {
  switch (x.dtype()) {
    case mx::float16: return float(x.data<mx::float16_t>()[i]);
    case mx::bfloat16: return float(x.data<mx::bfloat16_t>()[i]);
    default: return x.data<float>()[i];
  }
}

// x as a contiguous float32 (M, K) matrix: the array itself when it already
// is one, else a converted copy held in `storage`.
const float* x_as_float(const mx::array& x, std::vector<float>& storage) {
  if (x.dtype() == mx::float32) return x.data<float>();
  const int64_t n = x.size();
  storage.resize(n);
  const int64_t chunk = 1 << 16;
  cpu::parallel_for((n + chunk - 1) / chunk, [&](int64_t t) {
    const int64_t end = std::min(n, (t + 1) * chunk);
    for (int64_t i = t * chunk; i < end; ++i) storage[i] = to_float(x, i);
  });
  return storage.data();
}

// Splits [0, n) into about `tasks` ranges whose bounds are multiples of `align`.
int64_t chunk_size(int64_t n, int64_t tasks, int64_t align) {
  const int64_t per = (n + tasks - 1) / tasks;
  return std::max(align, (per + align - 1) / align * align);
}

void run_qmv(const cpu::KernelTable& kt, cpu::QmmArgs& a) {
  const int64_t groups = a.K / a.group_size;
  std::vector<float> sums(a.M * groups);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) s += a.x[m * a.K + k];
      sums[m * groups + g] = s;
    }
  a.x_group_sums = sums.data();
  std::vector<float> prepared(a.M * a.K);
  a.x_prepared = kt.qmv_prepare(a, prepared.data()) ? prepared.data() : nullptr;
  const int64_t chunk = chunk_size(a.N, 16 * cpu::num_threads(), 8);
  cpu::parallel_for((a.N + chunk - 1) / chunk, [&](int64_t t) {
    kt.qmv(a, t * chunk, std::min(a.N, (t + 1) * chunk));
  });
}

void run_qvm(const cpu::KernelTable& kt, const cpu::QmmArgs& a) {
  const int64_t chunk =
      std::min(kt.qvm_cols, chunk_size(a.N, 4 * cpu::num_threads(), 32));
  cpu::parallel_for((a.N + chunk - 1) / chunk, [&](int64_t t) {
    kt.qvm(a, t * chunk, std::min(a.N, (t + 1) * chunk));
  });
}

void run_gemm(const cpu::KernelTable& kt, const cpu::QmmArgs& a, bool transpose) {
  const auto& plan = kt.plan;
  const int64_t panels = (a.M + plan.mr - 1) / plan.mr;
  const int64_t k_blocks = (a.K + plan.kc - 1) / plan.kc;
  // Pack x into mr-row panels, one kc-deep slab per K block (layout in
  // cpu_kernels.h: PackedA).
  std::vector<float> packed(k_blocks * panels * plan.mr * plan.kc);
  cpu::parallel_for(panels, [&](int64_t p) {
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
  const cpu::PackedA pa{packed.data(), panels};
  const int64_t scratch_size = int64_t(plan.kc) * plan.nc + panels * plan.mr * plan.nc;
  auto* gemm = transpose ? kt.qmm_t : kt.qmm_n;
  cpu::parallel_for((a.N + plan.nc - 1) / plan.nc, [&](int64_t t) {
    thread_local std::vector<float> scratch;
    if (int64_t(scratch.size()) < scratch_size) scratch.resize(scratch_size);
    gemm(a, pa, t * plan.nc, scratch.data());
  });
}

} // namespace

void QuantizedMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);

  const auto& w = inputs[1];
  const int64_t K = transpose_ ? int64_t(w.shape(1)) * 32 / bits_ : w.shape(0);
  const int64_t N = out.ndim() ? out.shape(-1) : 1;
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                    w = mx::array::unsafe_weak_copy(w),
                    scales = mx::array::unsafe_weak_copy(inputs[2]),
                    biases = mx::array::unsafe_weak_copy(inputs[3]),
                    bias = has_bias_ ? std::optional<mx::array>(mx::array::unsafe_weak_copy(inputs[4]))
                                     : std::nullopt,
                    out = mx::array::unsafe_weak_copy(out),
                    K, N, group_size = group_size_, bits = bits_, transpose = transpose_]() mutable {
    const int64_t M = K ? x.size() / K : 0;
    if (M == 0 || N == 0) return;
    std::vector<float> x_storage;
    cpu::QmmArgs a{};
    a.x = x_as_float(x, x_storage);
    a.w = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
    a.scales = scales.data<void>();
    a.biases = biases.data<void>();
    a.bias = bias ? bias->data<void>() : nullptr;
    a.out = out.data<void>();
    a.type = float_type(out.dtype());
    a.M = M;
    a.N = N;
    a.K = K;
    a.group_size = group_size;
    a.bits = bits;
    const auto& kt = kernel_table();
    if (M >= kGemmMinRows) {
      run_gemm(kt, a, transpose);
    } else if (transpose) {
      run_qmv(kt, a);
    } else {
      run_qvm(kt, a);
    }
  });
}

} // namespace mlx_ext
