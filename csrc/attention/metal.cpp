// The attention forward and backward on Metal: picks the kernels of
// metal/attention.metal (metal_plan.h), specializes them for the call's
// optional inputs (function constants) and binds them as
// metal/attention_bindings.h says. K/V are read in place where
// kv_strides.h allows (a slice of a cache), else copied.
#include <climits>
#include <string>

#include "../../metal/attention_bindings.h"
#include "attention/attention.h"
#include "attention/kv_strides.h"
#include "attention/metal_plan.h"
#include "common/gpu.h"
#include "common/kernel_names.h"
#include "common/metal/library.h"
#include "mlx/backend/gpu/copy.h"
#include "mlx/backend/metal/device.h"

namespace mlx_ext {

MLX_EXT_HAS_GPU(ScaledDotProductAttention)
MLX_EXT_HAS_GPU(ScaledDotProductAttentionVjp)

namespace {

namespace plan = metal::attention_plan;

[[noreturn]] void refuse(const std::string& what) {
  throw std::invalid_argument(std::string("[mlx_ext.") + kAttentionOp + "] " + what);
}

// The launch state shared by the forward and the backward: the call's K/V
// arrays as bound (copies made here are kept alive by the encoder), the
// shape argument and the pipeline's function constants.
struct Call {
  std::vector<mx::array> kv; // K arrays then V arrays (1 or 3 each)
  AttnShape shape{};
  bool mask_bool = false, mask_additive = false, has_sinks = false, has_kv_lengths = false;
  int64_t D = 0;
  const char* type_name = nullptr;
  int bits = 0;
};

int checked_int(int64_t value, const char* what) {
  if (value > INT_MAX) refuse(std::string("the Metal kernels take ") + what + " below 2^31");
  return int(value);
}

Call prepare(const AttentionConfig& c, const std::vector<mx::array>& inputs, const mx::Stream& s,
    mx::metal::CommandEncoder& enc) {
  const AttentionInputs idx(c);
  const auto& q = inputs[0];
  Call call;
  call.D = q.shape(3);
  if (plan::kernel_head_dim(call.D) == 0)
    refuse("the Metal kernels take head dims up to 256, got D=" + std::to_string(call.D));
  call.type_name = kernel_dtype_name(q.dtype());
  call.bits = c.bits;
  auto& sh = call.shape;
  sh.D = int(call.D);
  sh.B = q.shape(0);
  sh.Hq = q.shape(1);
  sh.L = q.shape(2);
  sh.Hkv = inputs[idx.k].shape(1);
  sh.S = inputs[idx.k].shape(2);
  sh.group_size = c.group_size;
  sh.causal = c.causal() ? 1 : 0;
  sh.window = c.window;
  sh.scale = c.scale;
  sh.chunks = 1;
  sh.chunk_len = sh.S;
  int* slots[6][2] = {{&sh.k_bs, &sh.k_hs}, {&sh.ks_bs, &sh.ks_hs}, {&sh.kb_bs, &sh.kb_hs},
      {&sh.v_bs, &sh.v_hs}, {&sh.vs_bs, &sh.vs_hs}, {&sh.vb_bs, &sh.vb_hs}};
  for (int which = 0; which < 2; ++which) {
    for (int part = 0; part < idx.n_kv; ++part) {
      mx::array x = inputs[(which == 0 ? idx.k : idx.v) + part];
      auto strides = kv_row_strides(x);
      if (!strides) {
        x = mx::contiguous_copy_gpu(x, s);
        enc.add_temporary(x);
        strides = std::make_pair(int64_t(x.shape(1)) * x.shape(2), int64_t(x.shape(2)));
      }
      const auto [bs, hs] = *strides;
      *slots[3 * which + part][0] = checked_int(bs, "K/V batch strides");
      *slots[3 * which + part][1] = checked_int(hs, "K/V head strides");
      call.kv.push_back(x);
    }
  }
  if (idx.mask >= 0) {
    const auto& mask = inputs[idx.mask];
    checked_int(int64_t(mask.size()), "masks of 2^31 elements");
    call.mask_bool = mask.dtype() == mx::bool_;
    call.mask_additive = !call.mask_bool;
    int stride = 1;
    int* out[4] = {&sh.mask_b, &sh.mask_h, &sh.mask_l, &sh.mask_s};
    for (int i = 3; i >= 0; --i) {
      *out[i] = mask.shape(i) == 1 ? 0 : stride;
      stride *= mask.shape(i);
    }
  }
  call.has_sinks = idx.sinks >= 0;
  call.has_kv_lengths = idx.kv_lengths >= 0;
  return call;
}

MTL::ComputePipelineState* kernel(mx::metal::Device& d, const Call& call, const plan::Launch& launch) {
  const std::string name = plan::kernel_name(launch, call.type_name, call.D, call.bits);
  bool mask_bool = call.mask_bool, mask_additive = call.mask_additive;
  bool has_sinks = call.has_sinks, has_kv_lengths = call.has_kv_lengths;
  const mx::metal::MTLFCList constants = {
      {&mask_bool, MTL::DataType::DataTypeBool, ATTN_FC_MASK_BOOL},
      {&mask_additive, MTL::DataType::DataTypeBool, ATTN_FC_MASK_ADDITIVE},
      {&has_sinks, MTL::DataType::DataTypeBool, ATTN_FC_HAS_SINKS},
      {&has_kv_lengths, MTL::DataType::DataTypeBool, ATTN_FC_HAS_KV_LENGTHS}};
  const std::string hash = name + (mask_bool ? "_mb" : "") + (mask_additive ? "_ma" : "") +
      (has_sinks ? "_sinks" : "") + (has_kv_lengths ? "_lens" : "");
  return d.get_kernel(name, metal::library(d), hash, constants);
}

// Binds q, K, V and the optional inputs (AttentionInputs order).
void bind_inputs(mx::metal::CommandEncoder& enc, const AttentionConfig& c, const Call& call,
    const std::vector<mx::array>& inputs) {
  const AttentionInputs idx(c);
  enc.set_input_array(inputs[0], ATTN_BUFFER_Q);
  static const int k_slots[3] = {ATTN_BUFFER_K, ATTN_BUFFER_K_SCALES, ATTN_BUFFER_K_BIASES};
  static const int v_slots[3] = {ATTN_BUFFER_V, ATTN_BUFFER_V_SCALES, ATTN_BUFFER_V_BIASES};
  for (int part = 0; part < idx.n_kv; ++part) {
    enc.set_input_array(call.kv[part], k_slots[part]);
    enc.set_input_array(call.kv[idx.n_kv + part], v_slots[part]);
  }
  if (idx.mask >= 0) enc.set_input_array(inputs[idx.mask], ATTN_BUFFER_MASK);
  if (idx.sinks >= 0) enc.set_input_array(inputs[idx.sinks], ATTN_BUFFER_SINKS);
  if (idx.kv_lengths >= 0) enc.set_input_array(inputs[idx.kv_lengths], ATTN_BUFFER_KV_LENGTHS);
}

void dispatch(mx::metal::CommandEncoder& enc, const plan::Launch& launch) {
  enc.dispatch_threadgroups(MTL::Size(launch.groups[0], launch.groups[1], launch.groups[2]),
      MTL::Size(launch.threads, 1, 1));
}

mx::array scratch(mx::Shape shape, mx::metal::CommandEncoder& enc) {
  mx::array a(std::move(shape), mx::float32, nullptr, {});
  a.set_data(mx::allocator::malloc(a.nbytes()));
  enc.add_temporary(a);
  return a;
}

} // namespace

void ScaledDotProductAttention::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  auto& lse = outputs[1];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  lse.set_data(mx::allocator::malloc(lse.nbytes()));
  if (out.size() == 0) return;
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);
  Call call = prepare(config_, inputs, s, enc);
  auto& sh = call.shape;
  checked_int(int64_t(out.size()), "outputs of 2^31 elements");

  const int64_t chunks = plan::decode(sh.L)
      ? plan::decode_chunks(sh.B, sh.Hq, sh.Hkv, sh.L, sh.S, plan::gpu_cores(d.get_architecture().back()))
      : 1;
  sh.chunks = int(chunks);
  sh.chunk_len = int(ceil_div(sh.S, chunks));
  const auto launch = plan::forward(sh.B, sh.Hq, sh.Hkv, sh.L, chunks);
  enc.set_compute_pipeline_state(kernel(d, call, launch));
  bind_inputs(enc, config_, call, inputs);
  enc.set_bytes(sh, ATTN_BUFFER_SHAPE);
  if (chunks == 1) {
    enc.set_output_array(out, ATTN_BUFFER_OUT);
    enc.set_output_array(lse, ATTN_BUFFER_LSE);
    dispatch(enc, launch);
    return;
  }
  // Split-K: float32 partials per chunk, merged by attn_merge.
  const mx::Shape rows{int(chunks), sh.B, sh.Hq, sh.L};
  auto part_m = scratch(rows, enc);
  auto part_l = scratch(rows, enc);
  auto part_acc = scratch({int(chunks), sh.B, sh.Hq, sh.L, int(call.D)}, enc);
  enc.set_output_array(part_m, ATTN_BUFFER_PARTIAL_M);
  enc.set_output_array(part_l, ATTN_BUFFER_PARTIAL_L);
  enc.set_output_array(part_acc, ATTN_BUFFER_PARTIAL_ACC);
  dispatch(enc, launch);

  const auto merge = plan::merge(sh.B, sh.Hq, sh.L);
  enc.set_compute_pipeline_state(kernel(d, call, merge));
  if (call.has_sinks) enc.set_input_array(inputs[AttentionInputs(config_).sinks], ATTN_BUFFER_SINKS);
  enc.set_input_array(part_m, ATTN_BUFFER_PARTIAL_M);
  enc.set_input_array(part_l, ATTN_BUFFER_PARTIAL_L);
  enc.set_input_array(part_acc, ATTN_BUFFER_PARTIAL_ACC);
  enc.set_output_array(out, ATTN_BUFFER_OUT);
  enc.set_output_array(lse, ATTN_BUFFER_LSE);
  enc.set_bytes(sh, ATTN_BUFFER_SHAPE);
  dispatch(enc, merge);
}

// Inputs: the forward's, then lse, delta and d_out; outputs dq (and dk, dv
// for float K/V). dq and dk / dv are separate kernels, each value with one
// writer.
void ScaledDotProductAttentionVjp::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);
  Call call = prepare(config_, inputs, s, enc);
  const auto& sh = call.shape;
  const int n = AttentionInputs(config_).count;
  for (const auto& o : outputs) checked_int(int64_t(o.size()), "gradients of 2^31 elements");

  auto bind_backward = [&](const plan::Launch& launch) {
    enc.set_compute_pipeline_state(kernel(d, call, launch));
    bind_inputs(enc, config_, call, inputs);
    enc.set_input_array(inputs[n], ATTN_BUFFER_LSE);
    enc.set_input_array(inputs[n + 1], ATTN_BUFFER_DELTA);
    enc.set_input_array(inputs[n + 2], ATTN_BUFFER_D_OUT);
    enc.set_bytes(sh, ATTN_BUFFER_SHAPE);
  };
  if (outputs[0].size() > 0) {
    const auto dq = plan::backward_dq(sh.B, sh.Hq, sh.L);
    bind_backward(dq);
    enc.set_output_array(outputs[0], ATTN_BUFFER_DQ);
    dispatch(enc, dq);
  }
  if (!config_.quantized() && outputs[1].size() > 0) {
    const auto dkv = plan::backward_dkv(sh.B, sh.Hkv, sh.S);
    bind_backward(dkv);
    enc.set_output_array(outputs[1], ATTN_BUFFER_DK);
    enc.set_output_array(outputs[2], ATTN_BUFFER_DV);
    dispatch(enc, dkv);
  }
}

} // namespace mlx_ext
