// eval_cpu of the attention forward and backward: hands the evaluated inputs
// to the CPU driver (cpu_driver.cpp) on the stream's thread.
#include "attention/attention.h"
#include "attention/cpu_driver.h"
#include "common/cpu/arrays.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlx_ext {
namespace {

// Element strides of a (Bm, Hm, Lm, Sm) mask broadcast over (B, Hq, L, S).
void broadcast_strides(const mx::array& mask, int64_t* strides) {
  int64_t stride = 1;
  for (int i = 3; i >= 0; --i) {
    strides[i] = mask.shape(i) == 1 ? 0 : stride;
    stride *= mask.shape(i);
  }
}

// The kernels' view of the forward's inputs (`inputs` may continue past them).
cpu::AttentionArgs attention_args(const AttentionConfig& config, const std::vector<mx::array>& inputs) {
  const AttentionInputs idx(config);
  const auto& q = inputs[0];
  const auto& k = inputs[idx.k];
  cpu::AttentionArgs a{};
  a.q = q.data<void>();
  a.k = k.data<void>();
  a.v = inputs[idx.v].data<void>();
  if (config.quantized()) {
    a.k_scales = inputs[idx.k + 1].data<void>();
    a.k_biases = inputs[idx.k + 2].data<void>();
    a.v_scales = inputs[idx.v + 1].data<void>();
    a.v_biases = inputs[idx.v + 2].data<void>();
  }
  if (idx.mask >= 0) {
    const auto& mask = inputs[idx.mask];
    a.mask = mask.data<void>();
    a.mask_is_bool = mask.dtype() == mx::bool_;
    broadcast_strides(mask, a.mask_strides);
  }
  if (idx.sinks >= 0) a.sinks = inputs[idx.sinks].data<float>();
  if (idx.kv_lengths >= 0) a.kv_lengths = inputs[idx.kv_lengths].data<int32_t>();
  a.type = cpu::float_type(q.dtype());
  a.B = q.shape(0);
  a.Hq = q.shape(1);
  a.L = q.shape(2);
  a.D = q.shape(3);
  a.Hkv = k.shape(1);
  a.S = k.shape(2);
  a.scale = config.scale;
  a.causal = config.causal();
  a.window = config.window;
  a.bits = config.bits;
  a.group_size = config.group_size;
  return a;
}

// Allocates the outputs and registers every array with the stream's encoder.
mx::cpu::CommandEncoder& prepare(const mx::Stream& stream, const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) encoder.set_input_array(in);
  for (auto& o : outputs) encoder.set_output_array(o);
  return encoder;
}

} // namespace

void ScaledDotProductAttention::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = prepare(stream(), inputs, outputs);
  auto a = attention_args(config_, inputs);
  a.out = outputs[0].data<void>();
  a.lse = outputs[1].data<float>();
  // Raw pointers only: MLX keeps the buffers alive until the stream has run this.
  encoder.dispatch([a]() {
    if (a.B * a.Hq * a.L == 0) return;
    cpu::run_attention(cpu::attention_kernels_for(cpu::current_isa()), a);
  });
}

void ScaledDotProductAttentionVjp::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = prepare(stream(), inputs, outputs);
  const auto a = attention_args(config_, inputs);
  const int n = AttentionInputs(config_).count;
  cpu::AttentionGrads g{};
  g.lse = inputs[n].data<float>();
  g.delta = inputs[n + 1].data<float>();
  g.d_out = inputs[n + 2].data<void>();
  g.dq = outputs[0].data<void>();
  if (!config_.quantized()) {
    g.dk = outputs[1].data<void>();
    g.dv = outputs[2].data<void>();
  }
  encoder.dispatch([a, g]() {
    if (a.B * a.Hq * a.L == 0 && a.B * a.Hkv * a.S == 0) return;
    const auto isa = cpu::current_isa();
    cpu::run_attention_backward(cpu::attention_backward_kernels_for(isa),
        cpu::attention_kernels_for(isa).key_block, a, g);
  });
}

} // namespace mlx_ext
