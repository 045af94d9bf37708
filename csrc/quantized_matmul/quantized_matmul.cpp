// The op function (validation, dtype and shape inference, graph building) and
// the Primitive's transforms. Kernels: cpu.cpp, metal.cpp, cuda.cpp.
#include "quantized_matmul/quantized_matmul.h"

#include "common/affine.h"
#include "common/checks.h"
#include "common/grad.h"

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
    std::optional<int> group_size_or_default,
    std::optional<int> bits_or_default,
    const std::string& mode,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s) {
  if (mode != "affine")
    value_error(kOp, "mode='", mode, "' is not supported; mlx_ext implements mode='affine'");
  // MLX's defaults for mode="affine" where the caller passes None.
  const int group_size = group_size_or_default.value_or(64);
  const int bits = bits_or_default.value_or(4);
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
    } else if (arg == 2 || arg == 3) {
      grads.push_back(arg == 2 ? scales_grad(primals, cotan) : biases_grad(primals, cotan));
    } else if (arg == 4 && has_bias_) {
      grads.push_back(bias_grad(cotan, primals[4].dtype(), stream()));
    } else {
      value_error(kOp, "gradients with respect to the packed weights w are not supported "
          "(as in MLX); differentiate with respect to x, scales, biases or bias");
    }
  }
  return grads;
}

// The gradient of the dequantized matrix W (rows, cols), split into its groups:
// (rows, cols / group_size, group_size). out = x W^T (transpose) or x W, so
// dW = g^T x or x^T g over every row of x.
mx::array QuantizedMatmul::weight_grad_by_group(
    const std::vector<mx::array>& primals, const mx::array& cotan) {
  const auto& s = stream();
  const auto x = mx::reshape(primals[0], {-1, primals[0].shape(-1)}, s);
  const auto g = mx::reshape(mx::astype(cotan, x.dtype(), s), {-1, cotan.shape(-1)}, s);
  auto dw = transpose_ ? mx::matmul(mx::transpose(g, s), x, s)
                       : mx::matmul(mx::transpose(x, s), g, s);
  return mx::unflatten(dw, -1, {-1, group_size_}, s);
}

// d/d scale of a group = the sum over the group of dW * q (w = scale * q +
// bias), as MLX's QuantizedMatmul::vjp defines it.
mx::array QuantizedMatmul::scales_grad(const std::vector<mx::array>& primals, const mx::array& cotan) {
  const auto& s = stream();
  const auto& scales = primals[2];
  auto q = mx::dequantize(primals[1], mx::ones_like(scales, s), mx::zeros_like(scales, s),
      group_size_, bits_, "affine", std::nullopt, std::nullopt, s);
  q = mx::unflatten(q, -1, {-1, group_size_}, s);
  auto ds = mx::sum(mx::multiply(weight_grad_by_group(primals, cotan), q, s), -1, false, s);
  return mx::astype(ds, scales.dtype(), s);
}

// d/d bias of a group = the sum over the group of dW.
mx::array QuantizedMatmul::biases_grad(const std::vector<mx::array>& primals, const mx::array& cotan) {
  const auto& s = stream();
  auto db = mx::sum(weight_grad_by_group(primals, cotan), -1, false, s);
  return mx::astype(db, primals[3].dtype(), s);
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
