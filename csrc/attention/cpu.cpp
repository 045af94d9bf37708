// eval_cpu of the attention forward and backward: hands the evaluated inputs
// to the CPU driver (cpu_driver.cpp) on the stream's thread.
#include <array>
#include <cstring>

#include "attention/attention.h"
#include "attention/cpu_driver.h"
#include "attention/kv_strides.h"
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

// K/V arrays are read in place where kv_strides.h allows (a slice
// [..., :S, :] of a cache is not copied); anything else is copied to
// contiguous rows into `storage` first.
cpu::KvRows kv_rows(const mx::array& x, std::vector<char>& storage) {
  if (const auto strides = kv_row_strides(x)) return {x.data<void>(), strides->first, strides->second};
  const auto& st = x.strides();
  const int64_t size = x.itemsize();
  storage.resize(x.nbytes());
  const char* src = x.data<char>();
  char* dst = storage.data();
  for (int b = 0; b < x.shape(0); ++b)
    for (int h = 0; h < x.shape(1); ++h)
      for (int s = 0; s < x.shape(2); ++s)
        for (int d = 0; d < x.shape(3); ++d, dst += size)
          std::memcpy(dst, src + (b * st[0] + h * st[1] + s * st[2] + d * st[3]) * size, size);
  return {storage.data(), int64_t(x.shape(1)) * x.shape(2), x.shape(2)};
}

// What K/V copies a call needed (kv_rows), kept until its kernels are done.
using KvStorage = std::array<std::vector<char>, 6>;

// The kernels' view of the forward's inputs (`inputs` may continue past
// them); call when the inputs' data is ready (inside the dispatched task).
cpu::AttentionArgs attention_args(
    const AttentionConfig& config, const std::vector<mx::array>& inputs, KvStorage& storage) {
  const AttentionInputs idx(config);
  const auto& q = inputs[0];
  const auto& k = inputs[idx.k];
  cpu::AttentionArgs a{};
  a.q = q.data<void>();
  for (int part = 0; part < idx.n_kv; ++part) {
    auto* k_rows = part == 0 ? &a.k.x : part == 1 ? &a.k.scales : &a.k.biases;
    auto* v_rows = part == 0 ? &a.v.x : part == 1 ? &a.v.scales : &a.v.biases;
    *k_rows = kv_rows(inputs[idx.k + part], storage[part]);
    *v_rows = kv_rows(inputs[idx.v + part], storage[3 + part]);
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

// Weak copies of `arrays` for a dispatched task (MLX keeps the buffers alive
// until the stream has run it).
std::vector<mx::array> weak_copies(const std::vector<mx::array>& arrays) {
  std::vector<mx::array> out;
  for (const auto& x : arrays) out.push_back(mx::array::unsafe_weak_copy(x));
  return out;
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
  encoder.dispatch([config = config_, in = weak_copies(inputs), out = weak_copies(outputs)]() mutable {
    KvStorage storage;
    auto a = attention_args(config, in, storage);
    a.out = out[0].data<void>();
    a.lse = out[1].data<float>();
    if (a.B * a.Hq * a.L == 0) return;
    cpu::run_attention(cpu::attention_kernels_for(cpu::current_isa()), a);
  });
}

void ScaledDotProductAttentionVjp::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = prepare(stream(), inputs, outputs);
  encoder.dispatch([config = config_, in = weak_copies(inputs), out = weak_copies(outputs)]() mutable {
    KvStorage storage;
    const auto a = attention_args(config, in, storage);
    const int n = AttentionInputs(config).count;
    cpu::AttentionGrads g{};
    g.lse = in[n].data<float>();
    g.delta = in[n + 1].data<float>();
    g.d_out = in[n + 2].data<void>();
    g.dq = out[0].data<void>();
    if (!config.quantized()) {
      g.dk = out[1].data<void>();
      g.dv = out[2].data<void>();
    }
    if (a.B * a.Hq * a.L == 0 && a.B * a.Hkv * a.S == 0) return;
    const auto isa = cpu::current_isa();
    cpu::run_attention_backward(cpu::attention_backward_kernels_for(isa),
        cpu::attention_kernels_for(isa).key_block, a, g);
  });
}

} // namespace mlx_ext
