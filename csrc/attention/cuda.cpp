// eval_gpu of the attention forward and backward for MLX's CUDA backend:
// fills the kernels' parameters (cuda_params.h) and launches what
// cuda_plan.h chooses, through MLX's command encoder (common/cuda/launcher.h).
// K/V are read in place when each (batch, kv head)'s rows are contiguous (a
// slice [..., :S, :] of a preallocated cache, broadcasts); the op function
// makes anything else row-contiguous in the graph (attention.cpp, kv_input),
// and what still cannot be read in place is copied here (Inputs).
#include <cstdint>
#include <deque>
#include <vector>

#include "attention/attention.h"
#include "attention/cuda_params.h"
#include "attention/cuda_plan.h"
#include "attention/kv_strides.h"
#include "common/cuda/launcher.h"
#include "common/errors.h"
#include "common/gpu.h"
#include "common/kernel_names.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

namespace mlx_ext {
namespace cuda {
namespace {

// The call's input arrays as the kernels read them: in place where they can
// be, else a row-contiguous copy (Launcher::row_contiguous). The op function
// already makes K/V row-contiguous in the graph unless the kernels read them
// in place (attention.cpp: kv_input), so copies here are rare: a view at an
// offset the vector loads cannot take, which mx::contiguous leaves as it is.
class Inputs {
 public:
  Inputs(mx::cu::CommandEncoder& enc, Launcher& launch, const std::vector<mx::array>& in)
      : enc_(enc), launch_(launch), in_(in) {}

  // Registers every input (and copy) as read by the next kernel node (MLX's
  // encoder orders nodes by the buffers declared before each one).
  void declare_reads() const {
    for (const auto& a : in_) enc_.set_input_array(a);
    for (const auto& a : copies_) enc_.set_input_array(a);
  }

  // x, or its copy, row-contiguous and `align`-byte aligned.
  const mx::array& contiguous(const mx::array& x, int align) {
    if (x.flags().row_contiguous && aligned(x, align)) return x;
    return copies_.emplace_back(launch_.row_contiguous(x));
  }

  // K/V rows: in place where kv_strides.h allows and aligned, else from a copy.
  AttnRows rows(const mx::array& x, int align) {
    auto strides = kv_row_strides(x);
    const mx::array* used = &x;
    if (!strides || !aligned(x, align)) {
      used = &copies_.emplace_back(launch_.row_contiguous(x));
      strides = kv_row_strides(*used);
    }
    return {mx::gpu_ptr<void>(*used), strides->first, strides->second};
  }

 private:
  static bool aligned(const mx::array& x, int align) {
    return reinterpret_cast<uintptr_t>(mx::gpu_ptr<void>(x)) % align == 0;
  }
  mx::cu::CommandEncoder& enc_;
  Launcher& launch_;
  const std::vector<mx::array>& in_;
  std::deque<mx::array> copies_; // stable references for the params
};

// The alignment the kernels' loads of a K/V array need: 16 bytes for float
// values (and float16 / bfloat16 q in the tensor-core kernel), 8 for 8-bit
// codes, 4 for 4-bit ones; scales and biases are read one value at a time.
int kv_align(int bits) { return bits == 0 ? 16 : bits == 8 ? 8 : 4; }

// The parameters shared by the forward and the backward (AttentionInputs order).
AttnParams attention_params(const AttentionConfig& c, const std::vector<mx::array>& in, Inputs& arrays,
    const mx::array*& q_used) {
  const AttentionInputs idx(c);
  AttnParams p{};
  const auto& q = arrays.contiguous(in[0], 16);
  q_used = &q;
  p.q = mx::gpu_ptr<void>(q);
  auto kv = [&](int first) {
    AttnKv r{};
    r.x = arrays.rows(in[first], kv_align(c.bits));
    if (c.quantized()) {
      r.scales = arrays.rows(in[first + 1], 1);
      r.biases = arrays.rows(in[first + 2], 1);
    }
    return r;
  };
  p.k = kv(idx.k);
  p.v = kv(idx.v);
  if (idx.mask >= 0) {
    const auto& mask = arrays.contiguous(in[idx.mask], 1);
    p.mask = mx::gpu_ptr<void>(mask);
    p.mask_is_bool = mask.dtype() == mx::bool_;
    int64_t stride = 1;
    for (int i = 3; i >= 0; --i) {
      p.mask_strides[i] = mask.shape(i) == 1 ? 0 : stride;
      stride *= mask.shape(i);
    }
  }
  if (idx.sinks >= 0) p.sinks = mx::gpu_ptr<float>(arrays.contiguous(in[idx.sinks], 4));
  if (idx.kv_lengths >= 0) p.kv_lengths = mx::gpu_ptr<int32_t>(arrays.contiguous(in[idx.kv_lengths], 4));
  p.B = q.shape(0);
  p.Hq = q.shape(1);
  p.L = q.shape(2);
  p.D = q.shape(3);
  p.Hkv = in[idx.k].shape(1);
  p.S = in[idx.k].shape(2);
  p.scale = c.scale;
  p.causal = c.causal();
  p.window = c.window;
  p.bits = c.bits;
  p.group_size = c.group_size;
  return p;
}

attn_plan::Problem problem(const AttnParams& p, const mx::array& q) {
  return {p.B, p.Hq, p.Hkv, p.L, p.S, p.D, p.bits, kernel_dtype_name(q.dtype())};
}

void check_device(const mx::cu::Device& device) {
  if (device.compute_capability_major() < attn_plan::kMinComputeCapability)
    runtime_error(kAttentionOp, "the CUDA kernels need compute capability 8.0 or newer");
}

} // namespace
} // namespace cuda

MLX_EXT_HAS_GPU(ScaledDotProductAttention)
MLX_EXT_HAS_GPU(ScaledDotProductAttentionVjp)

void ScaledDotProductAttention::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  using namespace cuda;
  auto& s = stream();
  auto& enc = mx::cu::get_command_encoder(s);
  auto& out = outputs[0];
  auto& lse = outputs[1];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  lse.set_data(mx::allocator::malloc(lse.nbytes()));
  if (out.size() == 0) return;
  auto& device = mx::cu::device(s.device);
  check_device(device);

  Launcher launch(enc, s.device.index, kAttentionOp);
  Inputs arrays(enc, launch, inputs);
  const mx::array* q = nullptr;
  AttnParams p = attention_params(config_, inputs, arrays, q);
  p.out = mx::gpu_ptr<void>(out);
  p.lse = mx::gpu_ptr<float>(lse);
  const auto plan = attn_plan::plan_forward(problem(p, *q),
      {device.compute_capability_major(), device.compute_capability_minor()});

  if (plan.path == attn_plan::Path::mma) {
    arrays.declare_reads();
    launch(plan.main, p, {}, {&out, &lse});
    return;
  }
  const int64_t rows = int64_t(p.B) * p.Hq * p.L;
  auto partials = launch.scratch(plan.partial_floats * 4);
  p.part_acc = mx::gpu_ptr<float>(partials);
  p.part_ml = p.part_acc + plan.chunks * rows * p.D;
  p.chunks = plan.chunks;
  p.chunk_len = plan.chunk_len;
  arrays.declare_reads();
  launch(plan.main, p, {}, {&partials});
  arrays.declare_reads(); // the sinks
  launch(plan.merge, p, {&partials}, {&out, &lse});
}

void ScaledDotProductAttentionVjp::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  using namespace cuda;
  auto& s = stream();
  auto& enc = mx::cu::get_command_encoder(s);
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& device = mx::cu::device(s.device);
  check_device(device);

  Launcher launch(enc, s.device.index, kAttentionOp);
  Inputs arrays(enc, launch, inputs);
  const mx::array* q = nullptr;
  AttnParams p = attention_params(config_, inputs, arrays, q);
  const int n = AttentionInputs(config_).count;
  p.bwd_lse = mx::gpu_ptr<float>(arrays.contiguous(inputs[n], 4));
  p.delta = mx::gpu_ptr<float>(arrays.contiguous(inputs[n + 1], 4));
  p.d_out = mx::gpu_ptr<void>(arrays.contiguous(inputs[n + 2], 16));
  p.dq = mx::gpu_ptr<void>(outputs[0]);
  if (!config_.quantized()) {
    p.dk = mx::gpu_ptr<void>(outputs[1]);
    p.dv = mx::gpu_ptr<void>(outputs[2]);
  }
  const auto plan = attn_plan::plan_backward(problem(p, *q));

  if (p.L > 0 && p.B * p.Hq > 0) {
    arrays.declare_reads();
    launch(plan.dq, p, {}, {&outputs[0]});
  }
  if (!config_.quantized() && p.S > 0 && p.B * p.Hkv > 0) {
    arrays.declare_reads();
    launch(plan.dkv, p, {}, {&outputs[1], &outputs[2]});
  }
}

} // namespace mlx_ext
