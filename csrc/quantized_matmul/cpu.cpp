// QuantizedMatmul::eval_cpu: converts x to float32 once and hands the
// problem to the CPU driver (cpu_driver.cpp) on the stream's thread.
#include <algorithm>
#include <vector>

#include "common/thread_pool.h"
#include "mlx/backend/cpu/encoder.h"
#include "quantized_matmul/cpu_driver.h"
#include "quantized_matmul/quantized_matmul.h"

namespace mlx_ext {
namespace {

using cpu::FloatType;

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
    const int64_t M = N ? out.size() / N : 0;
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
    cpu::run_quantized_matmul(cpu::kernels_for(cpu::current_isa()), a, transpose);
  });
}

} // namespace mlx_ext
