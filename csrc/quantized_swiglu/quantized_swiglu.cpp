// The op function (validation, dtype and shape inference, graph building) and
// the Primitive's transforms, written with mlx_ext.quantized_matmul on the
// same packed matrix. Kernel: cpu.cpp.
#include "quantized_swiglu/quantized_swiglu.h"

#include "common/affine.h"
#include "common/checks.h"
#include "quantized_matmul/quantized_matmul.h"

namespace mlx_ext {
namespace {

constexpr const char* kOp = "quantized_swiglu";

mx::array sigmoid(const mx::array& g, const mx::Stream& s) { return mx::sigmoid(g, s); }

} // namespace

mx::array quantized_swiglu(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    std::optional<int> group_size_or_default,
    std::optional<int> bits_or_default,
    mx::StreamOrDevice s) {
  const int group_size = group_size_or_default.value_or(64);
  const int bits = bits_or_default.value_or(4);
  check_affine_config(kOp, bits, group_size);
  if (x.ndim() == 0) value_error(kOp, "x must have at least one dimension, got a scalar");
  check_kernel_float(kOp, "x", x);
  const auto [rows, K] = affine_matrix_shape(kOp, w, bits);
  if (rows % 2 != 0)
    value_error(kOp, "w must stack the gate rows over the up rows (an even number of rows), got ",
        rows, " rows (shape ", w.shape(), ")");
  if (x.shape(-1) != K)
    value_error(kOp, "x has inner dimension ", x.shape(-1), " (shape ", x.shape(), ") but w with shape ",
        w.shape(), " and bits=", bits, " expects ", K);
  check_affine_groups(kOp, w, scales, biases, rows, K, group_size, "K");

  const auto out_type = mx::promote_types(x.dtype(), scales.dtype());
  const auto stream = kernel_stream<QuantizedSwiGLU>(kOp, s);
  // As quantized_matmul: everything but w in the output dtype (weights stored
  // in it need no cast node per call), the product accumulated in float32.
  std::vector<mx::array> inputs{kernel_input(x, out_type, stream), contiguous_input(w, stream),
      kernel_input(scales, out_type, stream), kernel_input(biases, out_type, stream)};
  auto out_shape = x.shape();
  out_shape.back() = rows / 2;
  return mx::array(std::move(out_shape), out_type,
      std::make_shared<QuantizedSwiGLU>(stream, group_size, bits), std::move(inputs));
}

std::pair<mx::array, mx::array> QuantizedSwiGLU::projections(const std::vector<mx::array>& primals) {
  const auto& s = stream();
  auto x = mx::astype(primals[0], mx::float32, s);
  auto both = quantized_matmul(x, primals[1], primals[2], primals[3], true, group_size_, bits_,
      "affine", std::nullopt, s);
  auto halves = mx::split(both, 2, -1, s);
  return {halves[0], halves[1]};
}

// out = silu(g) u with g, u linear in x: d out = (silu'(g) u) dg + silu(g) du,
// silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))).
std::vector<mx::array> QuantizedSwiGLU::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto& s = stream();
  for (int arg : argnums)
    if (arg != 0)
      value_error(kOp, "gradients with respect to w, scales or biases are not supported; "
          "differentiate with respect to x");
  auto [g, u] = projections(primals);
  auto c = mx::astype(cotangents[0], mx::float32, s);
  auto sg = sigmoid(g, s);
  auto silu = mx::multiply(g, sg, s);
  auto dsilu = mx::multiply(sg, mx::add(mx::array(1.0f), mx::multiply(g, mx::subtract(mx::array(1.0f), sg, s), s), s), s);
  auto d_both = mx::concatenate({mx::multiply(mx::multiply(c, dsilu, s), u, s), mx::multiply(c, silu, s)}, -1, s);
  auto dx = quantized_matmul(d_both, primals[1], primals[2], primals[3], false, group_size_, bits_,
      "affine", std::nullopt, s);
  return {mx::astype(dx, primals[0].dtype(), s)};
}

std::vector<mx::array> QuantizedSwiGLU::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  const auto& s = stream();
  if (argnums.size() != 1 || argnums[0] != 0)
    value_error(kOp, "derivatives with respect to w, scales or biases are not supported");
  auto [g, u] = projections(primals);
  auto t = mx::astype(tangents[0], mx::float32, s);
  auto d_both = quantized_matmul(t, primals[1], primals[2], primals[3], true, group_size_, bits_,
      "affine", std::nullopt, s);
  auto halves = mx::split(d_both, 2, -1, s);
  auto sg = sigmoid(g, s);
  auto dsilu = mx::multiply(sg, mx::add(mx::array(1.0f), mx::multiply(g, mx::subtract(mx::array(1.0f), sg, s), s), s), s);
  auto out = mx::add(mx::multiply(mx::multiply(dsilu, u, s), halves[0], s),
      mx::multiply(mx::multiply(g, sg, s), halves[1], s), s);
  return {mx::astype(out, primals[0].dtype(), s)};
}

std::pair<std::vector<mx::array>, std::vector<int>> QuantizedSwiGLU::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  for (size_t i = 1; i < axes.size(); ++i)
    if (axes[i] >= 0)
      value_error(kOp, "vmap over w, scales or biases is not supported; map over x only");
  // x accepts any leading batch dimensions: move the mapped axis there.
  auto x = axes[0] >= 0 ? mx::moveaxis(inputs[0], axes[0], 0, stream()) : inputs[0];
  auto out = quantized_swiglu(x, inputs[1], inputs[2], inputs[3], group_size_, bits_, stream());
  return {{out}, {axes[0] >= 0 ? 0 : -1}};
}

bool QuantizedSwiGLU::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedSwiGLU&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

std::vector<mx::Shape> QuantizedSwiGLU::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0) / 2;
  return {shape};
}

} // namespace mlx_ext
