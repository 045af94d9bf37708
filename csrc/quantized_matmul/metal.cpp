// QuantizedMatmul::eval_gpu on Metal: picks a kernel of
// metal/quantized_matmul.metal (metal_plan.h; plan_fp for the fp modes),
// specializes it for the bias epilogue and binds it as
// metal/quantized_matmul_bindings.h says.
#include <climits>
#include <string>

#include "../../metal/quantized_matmul_bindings.h"
#include "common/gpu.h"
#include "common/kernel_names.h"
#include "common/metal/library.h"
#include "mlx/backend/metal/device.h"
#include "quantized_matmul/metal_plan.h"
#include "quantized_matmul/quantized_matmul.h"

namespace mlx_ext {

MLX_EXT_HAS_GPU(QuantizedMatmul)

void QuantizedMatmul::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const auto& x = inputs[0];
  const int64_t N = out.shape(-1);
  const int64_t K = x.shape(-1);
  const int64_t M = N ? int64_t(out.size()) / N : 0;
  if (M == 0 || N == 0) return;
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX)
    throw std::invalid_argument("[mlx_ext.quantized_matmul] the Metal kernels take M, N and K "
        "below 2^31 (got M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=" +
        std::to_string(K) + ")");

  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  const bool affine = mode_ == QuantMode::affine;
  const auto launch = affine ? metal::qmm_plan::plan(M, N, K, transpose_)
                             : metal::qmm_plan::plan_fp(M, N, K, transpose_);
  const char* type_name = kernel_dtype_name(out.dtype());
  const std::string name = affine
      ? metal::qmm_plan::kernel_name(launch, type_name, group_size_, bits_)
      : metal::qmm_plan::fp_kernel_name(launch, type_name, mode_name(mode_));
  bool has_bias = has_bias_;
  bool gather = false; // gather_qmm's launches set it (gather_qmm/metal.cpp)
  const mx::metal::MTLFCList constants = {
      {&has_bias, MTL::DataType::DataTypeBool, QMM_FC_HAS_BIAS},
      {&gather, MTL::DataType::DataTypeBool, QMM_FC_GATHER}};
  auto* kernel = d.get_kernel(
      name, metal::library(d), name + (has_bias ? "_bias" : "_nobias"), constants);

  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(kernel);
  enc.set_input_array(inputs[1], QMM_BUFFER_W);
  enc.set_input_array(inputs[2], QMM_BUFFER_SCALES);
  if (affine) enc.set_input_array(inputs[3], QMM_BUFFER_BIASES); // fp modes have none
  enc.set_input_array(x, QMM_BUFFER_X);
  enc.set_output_array(out, QMM_BUFFER_OUT);
  if (has_bias_) enc.set_input_array(inputs[bias_index()], QMM_BUFFER_BIAS);
  const QmmShape shape{int(M), int(N), int(K), 0, 0, 0, 0, 0, 0}; // the gather fields unused
  enc.set_bytes(shape, QMM_BUFFER_SHAPE);
  enc.dispatch_threadgroups(
      MTL::Size(launch.groups[0], launch.groups[1], launch.groups[2]),
      MTL::Size(launch.threads, 1, 1));
}

} // namespace mlx_ext
