// QuantizedSwiGLU::eval_cpu: the stacked product through the quantized
// matmul's CPU driver (quantized_matmul/cpu_driver.h: GEMV for few rows,
// GEMM from 12, threads over output columns, float32 accumulation) into a
// scratch of 2 I columns per row in the output dtype (as the unfused
// product's output would be), then the epilogue silu(gate) * up in float32
// over the rows' I columns, on the thread pool when there are many. The
// scratch is the only intermediate; it never becomes an MLX array.
#include <vector>

#include "common/cpu/arrays.h"
#include "common/cpu/swiglu.h"
#include "mlx/backend/cpu/encoder.h"
#include "quantized_matmul/cpu_driver.h"
#include "quantized_swiglu/quantized_swiglu.h"

namespace mlx_ext {

void QuantizedSwiGLU::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);

  const auto& w = inputs[1];
  const int64_t K = int64_t(w.shape(1)) * 32 / bits_;
  const int64_t I = w.shape(0) / 2;
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                    w = mx::array::unsafe_weak_copy(w),
                    scales = mx::array::unsafe_weak_copy(inputs[2]),
                    biases = mx::array::unsafe_weak_copy(inputs[3]),
                    out = mx::array::unsafe_weak_copy(out),
                    K, I, group_size = group_size_, bits = bits_]() mutable {
    const int64_t M = I ? out.size() / I : 0;
    if (M == 0 || I == 0) return;
    std::vector<float> x_storage;
    // 2 I values per row in the output dtype: float32 words suffice for any.
    std::vector<float> both(M * 2 * I);
    cpu::QmmArgs a{};
    a.x = cpu::as_float32(x, x_storage);
    a.w = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
    a.scales = scales.data<void>();
    a.biases = biases.data<void>();
    a.bias = nullptr;
    a.out = both.data();
    a.type = cpu::float_type(out.dtype());
    a.M = M;
    a.N = 2 * I;
    a.K = K;
    a.group_size = group_size;
    a.bits = bits;
    cpu::run_quantized_matmul(cpu::quantized_matmul_kernels_for(cpu::current_isa()), a, true);
    // Each row of `both` holds its I gate values, then its I up values (in out's dtype).
    const auto* gate = reinterpret_cast<const uint8_t*>(both.data());
    cpu::swiglu(out.dtype(), gate, gate + I * out.itemsize(), out.data<void>(), {M, I, 2 * I, 2 * I, I});
  });
}

} // namespace mlx_ext
