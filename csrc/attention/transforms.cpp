// The attention primitive under MLX's transforms. vjp: the fused backward
// (ScaledDotProductAttentionVjp, kernels in cpu_backward_kernels.cpp) from
// the saved log-sum-exp; jvp: forward mode through the same attention in MLX
// ops (the L x S scores materialised); vmap: the mapped axis folded into B.
#include "attention/attention.h"
#include "common/checks.h"

namespace mlx_ext {
namespace {

constexpr const char* kOp = kAttentionOp;

// Refuses a derivative with respect to an input that has none here.
void check_differentiable(const AttentionConfig& c, int arg) {
  const AttentionInputs idx(c);
  if (c.quantized() && arg >= idx.k && arg < idx.v + idx.n_kv)
    value_error(kOp, "derivatives with respect to quantized k and v (w_q, scales, biases) are "
        "not supported; differentiate with respect to q and sinks");
  if (arg == idx.mask) value_error(kOp, "derivatives with respect to mask are not supported");
  if (arg == idx.kv_lengths) value_error(kOp, "kv_lengths (int32) has no derivative");
}

// {out, lse} of the prepared inputs in MLX ops, float32 inside: what the
// kernels compute, for forward-mode derivatives.
std::vector<mx::array> dense_attention(
    const std::vector<mx::array>& in, const AttentionConfig& c, const mx::Stream& s) {
  const AttentionInputs idx(c);
  const auto& q = in[0];
  const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2), D = q.shape(3);
  auto kv = [&](int i) {
    auto x = c.quantized() ? mx::dequantize(in[i], in[i + 1], in[i + 2], c.group_size, c.bits,
                                 "affine", std::nullopt, mx::float32, s)
                           : mx::astype(in[i], mx::float32, s);
    return mx::expand_dims(x, 2, s); // (B, Hkv, 1, S, D)
  };
  const auto k = kv(idx.k), v = kv(idx.v);
  const int Hkv = k.shape(1), S = k.shape(3);
  auto q5 = mx::reshape(mx::astype(q, mx::float32, s), {B, Hkv, Hq / Hkv, L, D}, s);
  auto scores = mx::multiply(mx::matmul(q5, mx::swapaxes(k, -1, -2, s), s),
      mx::array(c.scale), s);
  scores = mx::reshape(scores, {B, Hq, L, S}, s);

  auto lens = idx.kv_lengths >= 0
      ? mx::clip(in[idx.kv_lengths], mx::array(0), mx::array(S), s)
      : mx::full({B}, S, mx::int32, s);
  const auto j = mx::arange(S, mx::int32, s);
  auto visible = mx::less(j, mx::reshape(lens, {B, 1, 1, 1}, s), s);
  if (c.causal()) {
    auto pos = mx::subtract(mx::add(mx::reshape(mx::arange(L, mx::int32, s), {1, 1, L, 1}, s),
        mx::reshape(lens, {B, 1, 1, 1}, s), s), mx::array(L), s);
    visible = mx::logical_and(visible, mx::less_equal(j, pos, s), s);
    if (c.window)
      visible = mx::logical_and(visible,
          mx::greater(j, mx::subtract(pos, mx::array(c.window), s), s), s);
  }
  if (c.mask == MaskKind::boolean) visible = mx::logical_and(visible, in[idx.mask], s);
  if (c.mask == MaskKind::additive) scores = mx::add(scores, in[idx.mask], s);
  visible = mx::broadcast_to(visible, {B, Hq, L, S}, s);

  const mx::array neg_inf(-std::numeric_limits<float>::infinity());
  auto top = mx::max(mx::where(visible, scores, neg_inf, s), -1, true, s);
  std::optional<mx::array> sinks;
  if (c.has_sinks) {
    sinks = mx::reshape(in[idx.sinks], {1, Hq, 1, 1}, s);
    top = mx::maximum(top, *sinks, s);
  }
  // Any shift gives the same softmax: a constant one (0 for empty rows).
  top = mx::stop_gradient(mx::where(mx::isinf(top, s), mx::array(0.0f), top, s), s);
  auto e = mx::where(visible, mx::exp(mx::subtract(scores, top, s), s), mx::array(0.0f), s);
  auto total = mx::sum(e, -1, true, s);
  if (sinks) total = mx::add(total, mx::exp(mx::subtract(*sinks, top, s), s), s);
  auto p = mx::divide(e, mx::where(mx::greater(total, mx::array(0.0f), s), total,
      mx::array(1.0f), s), s);
  auto out = mx::matmul(mx::reshape(p, {B, Hkv, Hq / Hkv, L, S}, s), v, s);
  out = mx::astype(mx::reshape(out, {B, Hq, L, D}, s), q.dtype(), s);
  auto lse = mx::squeeze(mx::add(mx::log(total, s), top, s), -1, s);
  return {out, lse};
}

// x with the vmapped axis (or a broadcast one) folded into its batch axis:
// (n, batch, ...) -> (n * batch, ...).
mx::array fold_batch(const mx::array& x, int axis, int n, int batch, const mx::Stream& s) {
  auto y = axis >= 0 ? mx::moveaxis(x, axis, 0, s) : mx::expand_dims(x, 0, s);
  auto shape = y.shape();
  shape[0] = n;
  shape[1] = batch;
  y = mx::broadcast_to(y, shape, s);
  shape.erase(shape.begin());
  shape[0] = n * batch;
  return contiguous_input(mx::reshape(y, shape, s), s);
}

} // namespace

std::vector<mx::array> ScaledDotProductAttention::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  // lse is not returned by the op function: only out's cotangent is nonzero.
  const auto s = stream();
  const AttentionInputs idx(config_);
  for (int arg : argnums) check_differentiable(config_, arg);
  const auto& q = primals[0];
  const auto& out = outputs[0];
  const auto& lse = outputs[1];
  auto d_out = contiguous_input(mx::astype(cotangents[0], q.dtype(), s), s);
  auto delta = mx::sum(mx::multiply(mx::astype(d_out, mx::float32, s),
      mx::astype(out, mx::float32, s), s), -1, false, s);

  std::vector<mx::array> grads_qkv;
  auto qkv = [&](int i) -> const mx::array& {
    if (grads_qkv.empty()) {
      std::vector<mx::array> inputs(primals.begin(), primals.end());
      inputs.insert(inputs.end(), {lse, delta, d_out});
      std::vector<mx::Shape> shapes{q.shape()};
      std::vector<mx::Dtype> dtypes{q.dtype()};
      if (!config_.quantized()) {
        shapes.insert(shapes.end(), {primals[idx.k].shape(), primals[idx.v].shape()});
        dtypes.insert(dtypes.end(), {q.dtype(), q.dtype()});
      }
      grads_qkv = mx::array::make_arrays(std::move(shapes), std::move(dtypes),
          std::make_shared<ScaledDotProductAttentionVjp>(s, config_), std::move(inputs));
    }
    return grads_qkv[i];
  };

  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(qkv(0));
    } else if (arg == idx.k) {
      grads.push_back(qkv(1));
    } else if (arg == idx.v) {
      grads.push_back(qkv(2));
    } else { // sinks: d lse / d sink = p_sink, and d out / d sink = -p_sink out
      const int Hq = q.shape(1);
      auto p_sink = mx::exp(mx::subtract(mx::reshape(primals[arg], {1, Hq, 1}, s), lse, s), s);
      grads.push_back(mx::negative(mx::sum(mx::multiply(p_sink, delta, s), {0, 2}, false, s), s));
    }
  }
  return grads;
}

std::vector<mx::array> ScaledDotProductAttention::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  for (int arg : argnums) check_differentiable(config_, arg);
  std::vector<mx::array> at;
  for (int arg : argnums) at.push_back(primals[arg]);
  auto f = [&](const std::vector<mx::array>& x) {
    auto inputs = primals;
    for (size_t i = 0; i < argnums.size(); ++i) inputs[argnums[i]] = x[i];
    return dense_attention(inputs, config_, stream());
  };
  return mx::jvp(f, at, tangents).second;
}

std::pair<std::vector<mx::array>, std::vector<int>> ScaledDotProductAttention::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  const auto s = stream();
  const AttentionInputs idx(config_);
  if (idx.sinks >= 0 && axes[idx.sinks] >= 0)
    value_error(kOp, "vmap over sinks is not supported");
  int n = 1;
  for (size_t i = 0; i < inputs.size(); ++i)
    if (axes[i] >= 0) n = inputs[i].shape(axes[i]);
  const int B = inputs[0].shape(axes[0] == 0 ? 1 : 0);
  std::vector<mx::array> folded;
  for (int i = 0; i < int(inputs.size()); ++i) {
    const bool shared = i == idx.sinks || (i == idx.mask && axes[i] < 0 && inputs[i].shape(0) == 1);
    folded.push_back(shared ? inputs[i] : fold_batch(inputs[i], axes[i], n, B, s));
  }
  auto outs = attention_node(std::move(folded), config_, s);
  for (auto& o : outs) {
    auto shape = o.shape();
    shape[0] = B;
    shape.insert(shape.begin(), n);
    o = mx::reshape(o, shape, s);
  }
  return {outs, {0, 0}};
}

bool ScaledDotProductAttention::is_equivalent(const mx::Primitive& other) const {
  return config_ == static_cast<const ScaledDotProductAttention&>(other).config_;
}

bool ScaledDotProductAttentionVjp::is_equivalent(const mx::Primitive& other) const {
  return config_ == static_cast<const ScaledDotProductAttentionVjp&>(other).config_;
}

std::vector<mx::Shape> ScaledDotProductAttention::output_shapes(
    const std::vector<mx::array>& inputs) {
  const auto& q = inputs[0];
  return {q.shape(), mx::Shape{q.shape(0), q.shape(1), q.shape(2)}};
}

} // namespace mlx_ext
