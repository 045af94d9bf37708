// GatherQmm::eval_gpu on Metal: one launch (gather_qmm/metal_plan.h chooses):
// metal/gather_qmm.metal's tiled kernel over sorted one-row pairs, or a
// quantized matmul kernel of metal/quantized_matmul.metal specialized for
// gathering (QMM_FC_GATHER), one (row, expert) pair per grid z. Indices are
// read by the kernels: out-of-range pairs read nothing and give NaN, as on
// the CPU.
#include <climits>
#include <stdexcept>
#include <string>

#include "../../metal/quantized_matmul_bindings.h"
#include "common/gpu.h"
#include "common/kernel_names.h"
#include "common/metal/library.h"
#include "gather_qmm/gather_qmm.h"
#include "gather_qmm/metal_plan.h"
#include "mlx/backend/metal/device.h"

namespace mlx_ext {

MLX_EXT_HAS_GPU(GatherQmm)

void GatherQmm::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  // GPU streams build gather_quantized_swiglu as two plain gathers (gather_qmm.cpp).
  if (swiglu_)
    throw std::runtime_error("[mlx_ext.gather_quantized_swiglu] the fused node has no Metal kernel");
  out.set_data(mx::allocator::malloc(out.nbytes()));
  // Inputs as gather_qmm.h documents them: x (X, M, K), w (E, rows, packed),
  // scales and biases (E, rows, groups), lhs and rhs (P,), bias (E, N) or (N,).
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& scales = inputs[2];
  const int64_t P = out.shape(0);
  const int64_t M = out.shape(1);
  const int64_t N = out.shape(2);
  const int64_t K = x.shape(2);
  if (P == 0 || M == 0 || N == 0) return;
  const int64_t x_stride = M * K;
  const int64_t w_stride = int64_t(w.shape(1)) * w.shape(2);
  const int64_t group_stride = int64_t(scales.shape(1)) * scales.shape(2);
  for (int64_t v : {P, M, N, K, int64_t(x.shape(0)), int64_t(w.shape(0)), x_stride, w_stride, group_stride})
    if (v > INT_MAX)
      throw std::invalid_argument("[mlx_ext.gather_qmm] the Metal kernels take pairs, rows, "
          "features and one matrix of x or w below 2^31 elements (got P=" + std::to_string(P) +
          ", M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=" + std::to_string(K) + ")");

  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  const auto launch = metal::gather_qmm_plan::plan(P, M, N, K, transpose_, sorted_);
  const bool over_pairs = metal::gather_qmm_plan::over_pairs(launch);
  const std::string name =
      metal::qmm_plan::kernel_name(launch, kernel_dtype_name(out.dtype()), group_size_, bits_);
  bool has_bias = has_bias_;
  bool gather = true; // declared by quantized_matmul.metal's kernels only
  mx::metal::MTLFCList constants = {{&has_bias, MTL::DataType::DataTypeBool, QMM_FC_HAS_BIAS}};
  if (!over_pairs) constants.emplace_back(&gather, MTL::DataType::DataTypeBool, QMM_FC_GATHER);
  auto* kernel = d.get_kernel(name, metal::library(d),
      name + (has_bias ? "_bias" : "_nobias") + "_gather", constants);

  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(kernel);
  enc.set_input_array(w, QMM_BUFFER_W);
  enc.set_input_array(scales, QMM_BUFFER_SCALES);
  enc.set_input_array(inputs[3], QMM_BUFFER_BIASES);
  enc.set_input_array(x, QMM_BUFFER_X);
  enc.set_output_array(out, QMM_BUFFER_OUT);
  enc.set_input_array(inputs[4], QMM_BUFFER_LHS);
  enc.set_input_array(inputs[5], QMM_BUFFER_RHS);
  const bool bias_per_expert = has_bias_ && inputs[6].ndim() == 2;
  if (has_bias_) enc.set_input_array(inputs[6], QMM_BUFFER_BIAS);
  // gather_qmm_t / gather_qmm_n take the pairs as rows: M = P (M is 1).
  const QmmShape shape{int(over_pairs ? P : M), int(N), int(K), int(x.shape(0)), int(w.shape(0)),
      int(x_stride), int(w_stride), int(group_stride), bias_per_expert ? int(N) : 0};
  enc.set_bytes(shape, QMM_BUFFER_SHAPE);
  enc.dispatch_threadgroups(
      MTL::Size(launch.groups[0], launch.groups[1], launch.groups[2]),
      MTL::Size(launch.threads, 1, 1));
}

} // namespace mlx_ext
