// QuantizedMatmul::eval_cpu: converts x to float32 once and hands the
// problem to the CPU driver (cpu_driver.cpp) on the stream's thread.
#include <vector>

#include "common/cpu/arrays.h"
#include "mlx/backend/cpu/encoder.h"
#include "quantized_matmul/cpu_driver.h"
#include "quantized_matmul/quantized_matmul.h"

namespace mlx_ext {

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
                    biases = mode_ == QuantMode::affine
                        ? std::optional<mx::array>(mx::array::unsafe_weak_copy(inputs[3]))
                        : std::nullopt,
                    bias = has_bias_
                        ? std::optional<mx::array>(mx::array::unsafe_weak_copy(inputs[bias_index()]))
                        : std::nullopt,
                    out = mx::array::unsafe_weak_copy(out),
                    K, N, group_size = group_size_, bits = bits_, transpose = transpose_, mode = mode_]() mutable {
    const int64_t M = N ? out.size() / N : 0;
    if (M == 0 || N == 0) return;
    std::vector<float> x_storage;
    cpu::QmmArgs a{};
    a.x = cpu::as_float32(x, x_storage);
    a.w = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
    a.scales = scales.data<void>();
    a.biases = biases ? biases->data<void>() : nullptr;
    a.bias = bias ? bias->data<void>() : nullptr;
    a.out = out.data<void>();
    a.type = cpu::float_type(out.dtype());
    a.M = M;
    a.N = N;
    a.K = K;
    a.group_size = group_size;
    a.bits = bits;
    a.mode = int(mode);
    const auto isa = cpu::current_isa();
    cpu::run_quantized_matmul(mode == QuantMode::affine ? cpu::quantized_matmul_kernels_for(isa)
                                                        : cpu::quantized_matmul_fp_kernels_for(isa),
        a, transpose);
  });
}

} // namespace mlx_ext
