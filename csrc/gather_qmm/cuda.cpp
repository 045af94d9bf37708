// GatherQmm::eval_gpu for MLX's CUDA backend: fills GatherParams
// (cuda_params.h) and launches what cuda_plan.h chooses through MLX's command
// encoder (common/cuda/launcher.h). Both gather_qmm and the fused
// gather_quantized_swiglu (swiglu_: inputs 6-8 are the up projections) run
// here. Indices are read by the kernels, never by the host: out-of-range
// pairs read nothing and give NaN, as on the CPU and Metal.
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/cuda/launcher.h"
#include "common/errors.h"
#include "common/gpu.h"
#include "common/kernel_names.h"
#include "gather_qmm/cuda_params.h"
#include "gather_qmm/cuda_plan.h"
#include "gather_qmm/gather_qmm.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

namespace mlx_ext {

// Off unless MLX_EXT_CUDA_GATHER=1: in their first run on a GPU (H200,
// 2026-12-03, bench/results/h200/gather_qmm.md) these kernels failed 40 of 51
// checks of tests/test_gather_qmm_cuda.py (the tensor-core paths, run-time
// out-of-range pairs, the fused SwiGLU) and ran slower than mx.gather_qmm at
// M = 1 and 8. Until they pass, a CUDA stream is refused up front as in a
// build without them (checks.h: kernel_stream), and patch leaves mlx-lm's MoE
// layers to MLX; the variable turns them on to debug them.
template <>
bool has_gpu_kernels<GatherQmm>() {
  const char* on = std::getenv("MLX_EXT_CUDA_GATHER");
  return on && std::string(on) == "1";
}

void GatherQmm::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  using namespace cuda;
  const char* op = swiglu_ ? "gather_quantized_swiglu" : "gather_qmm";
  auto& s = stream();
  auto& enc = mx::cu::get_command_encoder(s);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  // Inputs as gather_qmm.h documents them.
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const int64_t P = out.shape(0), M = out.shape(1), N = out.shape(2), K = x.shape(2);
  if (P == 0 || M == 0 || N == 0) return;
  if (mx::cu::device(s.device).compute_capability_major() < 8)
    runtime_error(op, "the CUDA kernels need compute capability 8.0 or newer");
  for (int64_t v : {M, N, K, int64_t(x.shape(0)), int64_t(w.shape(0))})
    if (v > INT_MAX) runtime_error(op, "the CUDA kernels take M, N, K and batches below 2^31");
  if (P * M > INT_MAX) runtime_error(op, "the CUDA kernels take fewer than 2^31 rows of pairs (P M)");

  const mx::array* w_up = swiglu_ ? &inputs[6] : nullptr;
  const mx::array* bias = has_bias_ ? &inputs[6] : nullptr;
  auto aligned = [](const mx::array& a) { return reinterpret_cast<uintptr_t>(mx::gpu_ptr<void>(a)) % 16 == 0; };
  GatherParams p{};
  p.x = mx::gpu_ptr<void>(x);
  p.w = mx::gpu_ptr<uint32_t>(w);
  p.scales = mx::gpu_ptr<void>(inputs[2]);
  p.biases = mx::gpu_ptr<void>(inputs[3]);
  p.lhs = mx::gpu_ptr<uint32_t>(inputs[4]);
  p.rhs = mx::gpu_ptr<uint32_t>(inputs[5]);
  if (w_up) {
    p.w_up = mx::gpu_ptr<uint32_t>(*w_up);
    p.scales_up = mx::gpu_ptr<void>(inputs[7]);
    p.biases_up = mx::gpu_ptr<void>(inputs[8]);
  }
  p.bias = bias ? mx::gpu_ptr<void>(*bias) : nullptr;
  p.bias_per_expert = bias && bias->ndim() == 2;
  p.out = mx::gpu_ptr<void>(out);
  p.P = P;
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  p.X = x.shape(0);
  p.E = w.shape(0);
  p.group_size = group_size_;
  p.bits = bits_;

  const gather_plan::Problem problem{P, int(M), int(N), int(K), p.E, bits_, group_size_, transpose_,
      kernel_dtype_name(out.dtype()), aligned(x) && aligned(w) && (!w_up || aligned(*w_up)), swiglu_};
  const auto plan = gather_plan::plan(problem);
  Launcher launch(enc, s.device.index, op);
  const Launcher::Arrays reads{&x, &w, &inputs[2], &inputs[3], &inputs[4], &inputs[5], w_up,
      w_up ? &inputs[7] : nullptr, w_up ? &inputs[8] : nullptr, bias};
  if (plan.path != gather_plan::Path::tiles) {
    launch(plan.main, p, reads, {&out});
    return;
  }
  // order (P), offsets (E + 2), tile_offsets (E + 1), cursor (E + 1): ints.
  const int64_t E = p.E;
  auto groups = launch.scratch((P + 3 * E + 4) * 4);
  int* base = mx::gpu_ptr<int>(groups);
  p.order = base;
  p.offsets = base + P;
  p.tile_offsets = p.offsets + E + 2;
  p.cursor = p.tile_offsets + E + 1;
  p.tile_rows = plan.tile_rows;
  // gather_group also writes the NaN rows of out-of-range pairs into out.
  launch(plan.group, p, {&inputs[4], &inputs[5]}, {&groups, &out});
  launch(plan.main, p, {&x, &w, &inputs[2], &inputs[3], &inputs[4], &inputs[5], &groups, w_up,
      w_up ? &inputs[7] : nullptr, w_up ? &inputs[8] : nullptr, bias}, {&out});
}

} // namespace mlx_ext
