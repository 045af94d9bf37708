// QuantizedMatmul::eval_gpu for MLX's CUDA backend: fills the kernels'
// parameters (cuda_params.h) and launches what cuda_plan.h chooses, through
// MLX's command encoder (common/cuda/launcher.h), which finds the kernels in
// the images embedded in this library (common/cuda/registry.h).
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/cuda/launcher.h"
#include "common/errors.h"
#include "common/gpu.h"
#include "common/kernel_names.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"
#include "quantized_matmul/cuda_params.h"
#include "quantized_matmul/cuda_plan.h"
#include "quantized_matmul/quantized_matmul.h"

namespace mlx_ext {
namespace cuda {

namespace {

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// MLX_EXT_CUDA_WGMMA=0 turns the Hopper GEMM off (tests run the mma.sync
// GEMM on an H100 that way).
bool wgmma_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("MLX_EXT_CUDA_WGMMA");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

// The arrays of one call: inputs (x, w, scales, biases, bias or nullptr) and out.
struct Operands {
  const mx::array *x, *w, *scales, *biases, *bias, *out;
};

// The prep kernels into scratch buffers, the mma.sync GEMM, and for float32 x
// (plan.parts == 3: its bfloat16 planes) the sum of the planes' products.
void run_tensor_core(Launcher& launch, const qmm_plan::Plan& plan, QmmParams p, const Operands& a) {
  const int G = p.K / p.group_size;
  const int64_t rows = plan.gemm_rows;
  const bool planes = plan.parts > 1;
  p.n_pad = plan.n_pad;
  p.m_pad = plan.m_pad;
  auto scales_t = launch.scratch(int64_t(G) * p.n_pad * 4);
  auto biases_t = launch.scratch(int64_t(G) * p.n_pad * 4);
  auto x_sums_t = launch.scratch(int64_t(G) * p.m_pad * 4);
  auto x_planes = launch.scratch(planes ? rows * p.K * 2 : 0); // bfloat16
  p.scales_t = mx::gpu_ptr<float>(scales_t);
  p.biases_t = mx::gpu_ptr<float>(biases_t);
  p.x_sums_t = mx::gpu_ptr<float>(x_sums_t);
  p.x_planes = mx::gpu_ptr<void>(x_planes);
  launch(plan.prep_scales, p, {a.scales, a.biases}, {&scales_t, &biases_t});
  launch(plan.prep_x, p, {a.x}, {&x_sums_t, &x_planes});

  QmmParams g = p;
  g.M = rows;
  if (!planes) {
    launch(plan.main, g, {a.x, a.w, &scales_t, &biases_t, &x_sums_t, a.bias}, {a.out});
    return;
  }
  auto partial = launch.scratch(rows * p.N * 4);
  g.x = p.x_planes;
  g.bias = nullptr;
  g.out = mx::gpu_ptr<void>(partial);
  launch(plan.main, g, {&x_planes, a.w, &scales_t, &biases_t, &x_sums_t}, {&partial});
  QmmParams r = p;
  r.x = g.out;
  r.parts = plan.parts;
  launch(plan.reduce, r, {&partial, a.bias}, {a.out});
}

} // namespace
} // namespace cuda

MLX_EXT_HAS_GPU(QuantizedMatmul)

void QuantizedMatmul::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  using namespace cuda;
  auto& s = stream();
  auto& enc = mx::cu::get_command_encoder(s);
  out.set_data(mx::allocator::malloc(out.nbytes()));

  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const int K = transpose_ ? int(int64_t(w.shape(1)) * 32 / bits_) : w.shape(0);
  const int N = out.ndim() ? out.shape(-1) : 1;
  const int64_t M = N ? out.size() / N : 0;
  if (M == 0 || N == 0) return;
  auto& device = mx::cu::device(s.device);
  if (device.compute_capability_major() < qmm_plan::kMinComputeCapability)
    runtime_error("quantized_matmul", "the CUDA kernels need compute capability 8.0 or newer");

  const bool affine = mode_ == QuantMode::affine; // fp modes: uint8 scales, no biases
  const mx::array* bias = has_bias_ ? &inputs[bias_index()] : nullptr;
  const Operands a{&x, &w, &inputs[2], affine ? &inputs[3] : nullptr, bias, &out};
  QmmParams p{};
  p.x = mx::gpu_ptr<void>(x);
  p.w = mx::gpu_ptr<uint32_t>(w);
  p.scales = mx::gpu_ptr<void>(inputs[2]);
  p.biases = affine ? mx::gpu_ptr<void>(inputs[3]) : nullptr;
  p.bias = bias ? mx::gpu_ptr<void>(*bias) : nullptr;
  p.out = mx::gpu_ptr<void>(out);
  p.M = M;
  p.N = N;
  p.K = K;
  p.group_size = group_size_;
  p.bits = bits_;

  Launcher launch(enc, s.device.index, "quantized_matmul");
  const std::string dtype = kernel_dtype_name(out.dtype());
  if (!affine) {
    const auto plan = qmm_plan::plan_fp(M, N, transpose_, dtype, mode_name(mode_));
    launch(plan.main, p, {a.x, a.w, a.scales, a.bias}, {&out});
    return;
  }
  const qmm_plan::Problem problem{
      M, N, K, bits_, group_size_, transpose_, dtype, aligned16(p.x), aligned16(p.w)};
  const qmm_plan::Gpu gpu{device.compute_capability_major(), device.compute_capability_minor(),
      launch.has(qmm_plan::wgmma_kernel(dtype, bits_)), wgmma_enabled()};
  const qmm_plan::Plan plan = qmm_plan::plan(problem, gpu);
  p.k_split = plan.k_split;

  const Launcher::Arrays all_inputs{a.x, a.w, a.scales, a.biases, a.bias};
  if (plan.path == qmm_plan::Path::tensor_core) {
    run_tensor_core(launch, plan, p, a);
  } else if (plan.parts == 1) {
    launch(plan.main, p, all_inputs, {&out});
  } else { // qmv_n over slices of K: float partials, then their sum
    auto partials = launch.scratch(plan.parts * M * N * 4);
    QmmParams q = p;
    q.out = mx::gpu_ptr<void>(partials);
    launch(plan.main, q, all_inputs, {&partials});
    QmmParams r = p;
    r.x = q.out;
    r.parts = plan.parts;
    launch(plan.reduce, r, {&partials, a.bias}, {&out});
  }
}

} // namespace mlx_ext
