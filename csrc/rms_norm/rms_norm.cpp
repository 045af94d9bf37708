// The op function (validation, graph building) and the Primitive's
// transforms, written with MLX ops (the gradient is not on the decode path).
// Kernel: cpu.cpp.
#include "rms_norm/rms_norm.h"

#include "common/checks.h"

namespace mlx_ext {
namespace {

constexpr const char* kOp = "rms_norm";

// r = rsqrt(mean(x^2) + eps) over the last axis, float32, keepdims.
mx::array inverse_rms(const mx::array& x32, float eps, const mx::Stream& s) {
  return mx::rsqrt(mx::add(mx::mean(mx::square(x32, s), -1, true, s), mx::array(eps), s), s);
}

} // namespace

mx::array rms_norm(const mx::array& x, const std::optional<mx::array>& weight, float eps,
    mx::StreamOrDevice s) {
  if (x.ndim() == 0) value_error(kOp, "x must have at least one dimension, got a scalar");
  check_kernel_float(kOp, "x", x);
  if (weight) {
    check_kernel_float(kOp, "weight", *weight);
    if (weight->ndim() != 1 || weight->shape(0) != x.shape(-1))
      value_error(kOp, "weight must have shape (", x.shape(-1), ",) for x with shape ", x.shape(),
          ", got ", weight->shape());
  }
  if (!(eps >= 0.0f)) value_error(kOp, "eps must be >= 0, got ", eps);
  const auto stream = kernel_stream<RMSNorm>(kOp, s);
  std::vector<mx::array> inputs{contiguous_input(x, stream)};
  if (weight) inputs.push_back(kernel_input(*weight, x.dtype(), stream));
  return mx::array(x.shape(), x.dtype(), std::make_shared<RMSNorm>(stream, eps, weight.has_value()),
      std::move(inputs));
}

// y = x r w with r = (mean(x^2) + eps)^(-1/2):
//   dx = r (g w) - x r^3 mean(x (g w)),  dw = sum over rows of g x r.
std::vector<mx::array> RMSNorm::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto& s = stream();
  const auto x = mx::astype(primals[0], mx::float32, s);
  const auto g = mx::astype(cotangents[0], mx::float32, s);
  const auto r = inverse_rms(x, eps_, s);
  const auto gw = has_weight_ ? mx::multiply(g, mx::astype(primals[1], mx::float32, s), s) : g;
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      auto mean_xgw = mx::mean(mx::multiply(x, gw, s), -1, true, s);
      auto r3 = mx::multiply(mx::multiply(r, r, s), r, s);
      auto dx = mx::subtract(mx::multiply(r, gw, s), mx::multiply(mx::multiply(x, r3, s), mean_xgw, s), s);
      grads.push_back(mx::astype(dx, primals[0].dtype(), s));
    } else {
      auto xr = mx::reshape(mx::multiply(mx::multiply(g, x, s), r, s), {-1, x.shape(-1)}, s);
      grads.push_back(mx::astype(mx::sum(xr, 0, false, s), primals[1].dtype(), s));
    }
  }
  return grads;
}

std::vector<mx::array> RMSNorm::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  const auto& s = stream();
  const auto x = mx::astype(primals[0], mx::float32, s);
  const auto r = inverse_rms(x, eps_, s);
  const auto w = has_weight_ ? std::optional<mx::array>(mx::astype(primals[1], mx::float32, s)) : std::nullopt;
  std::optional<mx::array> out;
  for (size_t i = 0; i < argnums.size(); ++i) {
    const auto t = mx::astype(tangents[i], mx::float32, s);
    mx::array term = [&] {
      if (argnums[i] == 0) {
        // d(x r) = r t - x r^3 mean(x t)
        auto r3 = mx::multiply(mx::multiply(r, r, s), r, s);
        auto d = mx::subtract(mx::multiply(r, t, s),
            mx::multiply(mx::multiply(x, r3, s), mx::mean(mx::multiply(x, t, s), -1, true, s), s), s);
        return w ? mx::multiply(d, *w, s) : d;
      }
      return mx::multiply(mx::multiply(x, r, s), t, s);
    }();
    out = out ? mx::add(*out, term, s) : term;
  }
  return {mx::astype(*out, primals[0].dtype(), s)};
}

std::pair<std::vector<mx::array>, std::vector<int>> RMSNorm::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  if (has_weight_ && axes[1] >= 0)
    value_error(kOp, "vmap over weight is not supported; map over x only");
  if (axes[0] == int(inputs[0].ndim()) - 1)
    value_error(kOp, "vmap over x's last (normalized) axis is not supported");
  std::optional<mx::array> weight;
  if (has_weight_) weight = inputs[1];
  return {{rms_norm(inputs[0], weight, eps_, stream())}, {axes[0]}};
}

bool RMSNorm::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const RMSNorm&>(other);
  return eps_ == o.eps_ && has_weight_ == o.has_weight_;
}

} // namespace mlx_ext
