// GatherQmm::eval_cpu: converts x to float32 once and hands the problem to
// the CPU driver (cpu_driver.cpp) on the stream's thread. The fused SwiGLU
// has the driver write the gate projections into out and the up projections
// into a scratch of out's size and dtype (what the unfused products would
// hold), then applies silu(gate) * up in float32 in place.
#include <vector>

#include "common/cpu/arrays.h"
#include "common/cpu/swiglu.h"
#include "gather_qmm/cpu_driver.h"
#include "gather_qmm/gather_qmm.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlx_ext {

void GatherQmm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);

  const auto& x = inputs[0];
  const auto& w = inputs[1];
  cpu::GatherQmmArgs g{};
  g.P = out.shape(0);
  g.M = out.shape(1);
  g.N = out.shape(2);
  g.X = x.shape(0);
  g.K = x.shape(2);
  g.E = w.shape(0);
  g.group_size = group_size_;
  g.bits = bits_;
  g.transpose = transpose_;
  g.type = cpu::float_type(out.dtype());
  g.bias_per_expert = has_bias_ && inputs[6].ndim() == 2;
  encoder.dispatch([x = mx::array::unsafe_weak_copy(x),
                    w = mx::array::unsafe_weak_copy(w),
                    scales = mx::array::unsafe_weak_copy(inputs[2]),
                    biases = mx::array::unsafe_weak_copy(inputs[3]),
                    lhs = mx::array::unsafe_weak_copy(inputs[4]),
                    rhs = mx::array::unsafe_weak_copy(inputs[5]),
                    bias = has_bias_ ? std::optional<mx::array>(mx::array::unsafe_weak_copy(inputs[6]))
                                     : std::nullopt,
                    up_w = swiglu_ ? std::optional<mx::array>(mx::array::unsafe_weak_copy(inputs[6])) : std::nullopt,
                    up_scales = swiglu_ ? std::optional<mx::array>(mx::array::unsafe_weak_copy(inputs[7]))
                                        : std::nullopt,
                    up_biases = swiglu_ ? std::optional<mx::array>(mx::array::unsafe_weak_copy(inputs[8]))
                                        : std::nullopt,
                    out = mx::array::unsafe_weak_copy(out), g]() mutable {
    if (g.P == 0 || g.M == 0 || g.N == 0) return;
    std::vector<float> x_storage;
    g.x = cpu::as_float32(x, x_storage);
    g.lhs = lhs.data<uint32_t>();
    g.rhs = rhs.data<uint32_t>();
    g.w = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
    g.scales = scales.data<void>();
    g.biases = biases.data<void>();
    g.bias = bias ? bias->data<void>() : nullptr;
    g.out = out.data<void>();
    std::vector<uint8_t> up_out;
    if (up_w) {
      up_out.resize(out.nbytes());
      g.up_w = reinterpret_cast<const uint8_t*>(up_w->data<uint32_t>());
      g.up_scales = up_scales->data<void>();
      g.up_biases = up_biases->data<void>();
      g.up_out = up_out.data();
    }
    cpu::run_gather_qmm(cpu::quantized_matmul_kernels_for(cpu::current_isa()), g);
    if (!up_w) return;
    const int64_t rows = g.P * g.M;
    cpu::swiglu(out.dtype(), out.data<void>(), up_out.data(), out.data<void>(), {rows, g.N, g.N, g.N, g.N});
  });
}

} // namespace mlx_ext
