// The op function (validation, dtype and shape inference, graph building) and
// the Primitive's transforms. Kernels: cpu.cpp, metal.cpp, cuda.cpp.
#include "quantized_matmul/quantized_matmul.h"

#include "common/affine.h"
#include "common/checks.h"

namespace mlx_ext {
namespace {

constexpr const char* kOp = "quantized_matmul";

} // namespace

mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    bool transpose,
    int group_size,
    int bits,
    const std::string& mode,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s) {
  if (mode != "affine")
    value_error(kOp, "mode='", mode, "' is not supported; mlx_ext implements mode='affine'");
  check_affine_config(kOp, bits, group_size);
  if (!biases)
    value_error(kOp, "biases are required for mode='affine' (got None)");

  if (x.ndim() == 0) value_error(kOp, "x must have at least one dimension, got a scalar");
  check_kernel_float(kOp, "x", x);
  const auto [rows, cols] = affine_matrix_shape(kOp, w, bits);
  const int K = transpose ? cols : rows; // reduction length
  const int N = transpose ? rows : cols; // output features
  if (x.shape(-1) != K)
    value_error(kOp, "x has inner dimension ", x.shape(-1), " (shape ", x.shape(),
        ") but w with shape ", w.shape(), ", bits=", bits, ", transpose=",
        transpose ? "True" : "False", " expects ", K);
  check_affine_groups(kOp, w, scales, *biases, rows, cols, group_size, transpose ? "K" : "N");

  mx::Dtype out_type = mx::promote_types(x.dtype(), scales.dtype());
  if (bias) {
    check_kernel_float(kOp, "bias", *bias);
    if (bias->ndim() != 1 || bias->shape(0) != N)
      value_error(kOp, "bias must have shape (", N, ",), got ", bias->shape());
    out_type = mx::promote_types(out_type, bias->dtype());
  }

  const auto stream = kernel_stream<QuantizedMatmul>(kOp, s);
  std::vector<mx::array> inputs{kernel_input(x, out_type, stream), contiguous_input(w, stream),
      kernel_input(scales, out_type, stream), kernel_input(*biases, out_type, stream)};
  if (bias) inputs.push_back(kernel_input(*bias, out_type, stream));

  auto out_shape = x.shape();
  out_shape.back() = N;
  return mx::array(
      std::move(out_shape),
      out_type,
      std::make_shared<QuantizedMatmul>(stream, group_size, bits, transpose, bias.has_value()),
      std::move(inputs));
}

std::vector<mx::array> QuantizedMatmul::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto& cotan = cotangents[0];
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      // d/dx (x W^T) = g W: the same quantized matrix, read the other way.
      auto dx = quantized_matmul(cotan, primals[1], primals[2], primals[3], !transpose_,
          group_size_, bits_, "affine", std::nullopt, stream());
      grads.push_back(mx::astype(dx, primals[0].dtype(), stream()));
    } else if (arg == 4 && has_bias_) {
      std::vector<int> axes(cotan.ndim() - 1);
      for (int i = 0; i < int(axes.size()); ++i) axes[i] = i;
      auto db = axes.empty() ? cotan : mx::sum(cotan, axes, false, stream());
      grads.push_back(mx::astype(db, primals[4].dtype(), stream()));
    } else {
      value_error(kOp, "gradients with respect to the quantized weights (w, scales, biases) "
          "are not supported; differentiate with respect to x or bias only");
    }
  }
  return grads;
}

std::vector<mx::array> QuantizedMatmul::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  std::optional<mx::array> out;
  for (size_t i = 0; i < argnums.size(); ++i) {
    mx::array term = [&] {
      if (argnums[i] == 0)
        return quantized_matmul(tangents[i], primals[1], primals[2], primals[3], transpose_,
            group_size_, bits_, "affine", std::nullopt, stream());
      if (argnums[i] == 4 && has_bias_) return tangents[i];
      value_error(kOp, "derivatives with respect to the quantized weights (w, scales, biases) "
          "are not supported");
    }();
    out = out ? mx::add(*out, term, stream()) : term;
  }
  auto shape = output_shapes(primals)[0];
  return {mx::astype(mx::broadcast_to(*out, shape, stream()), primals[0].dtype(), stream())};
}

std::pair<std::vector<mx::array>, std::vector<int>> QuantizedMatmul::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  for (size_t i = 1; i < axes.size(); ++i)
    if (axes[i] >= 0)
      value_error(kOp, "vmap over w, scales, biases or bias is not supported; map over x only");
  // x already accepts any leading batch dimensions: move the mapped axis there.
  auto x = axes[0] >= 0 ? mx::moveaxis(inputs[0], axes[0], 0, stream()) : inputs[0];
  std::optional<mx::array> bias;
  if (has_bias_) bias = inputs[4];
  auto out = quantized_matmul(x, inputs[1], inputs[2], inputs[3], transpose_, group_size_,
      bits_, "affine", bias, stream());
  return {{out}, {axes[0] >= 0 ? 0 : -1}};
}

bool QuantizedMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_ && transpose_ == o.transpose_ &&
      has_bias_ == o.has_bias_;
}

std::vector<mx::Shape> QuantizedMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  const auto& w = inputs[1];
  shape.back() = transpose_ ? w.shape(0) : int(int64_t(w.shape(1)) * 32 / bits_);
  return {shape};
}

} // namespace mlx_ext
