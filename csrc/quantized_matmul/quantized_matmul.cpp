// The op function (validation, dtype and shape inference, graph building) and
// the Primitive's transforms. Kernels: cpu.cpp, metal.cpp, cuda.cpp.
#include "quantized_matmul/quantized_matmul.h"

#include "common/errors.h"

namespace mlx_ext {
namespace {

constexpr const char* kOp = "quantized_matmul";

bool valid_bits(int bits) {
  return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8;
}

bool valid_group_size(int gs) {
  return gs == 32 || gs == 64 || gs == 128;
}

// Logical (rows, cols) of the quantized matrix from its packed shape.
std::pair<int, int> unpacked_shape(const mx::array& w, int bits) {
  const int64_t packed_cols = w.shape(-1);
  if ((packed_cols * 32) % bits != 0)
    value_error(kOp, "w with shape ", w.shape(), " cannot hold ", bits, "-bit values (",
        packed_cols, " uint32 words per row is not a whole number of values)");
  return {w.shape(0), int(packed_cols * 32 / bits)};
}

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
  if (!valid_bits(bits))
    value_error(kOp, "bits=", bits, " is not supported; use one of 2, 3, 4, 5, 6, 8");
  if (!valid_group_size(group_size))
    value_error(kOp, "group_size=", group_size, " is not supported; use one of 32, 64, 128");
  if (!biases)
    value_error(kOp, "biases are required for mode='affine' (got None)");

  if (x.ndim() == 0) value_error(kOp, "x must have at least one dimension, got a scalar");
  if (!is_kernel_float(x.dtype()))
    type_error_(kOp, "x must be float32, float16 or bfloat16, got ", x.dtype());
  if (w.dtype() != mx::uint32)
    type_error_(kOp, "w must be uint32 (as packed by mx.quantize), got ", w.dtype());
  if (w.ndim() != 2)
    value_error(kOp, "w must be 2-D (rows, packed columns), got shape ", w.shape());
  if (!is_kernel_float(scales.dtype()))
    type_error_(kOp, "scales must be float32, float16 or bfloat16, got ", scales.dtype());
  if (biases->dtype() != scales.dtype())
    type_error_(kOp, "biases must have the dtype of scales (", scales.dtype(), "), got ",
        biases->dtype());

  const auto [rows, cols] = unpacked_shape(w, bits);
  const int K = transpose ? cols : rows; // reduction length
  const int N = transpose ? rows : cols; // output features
  if (x.shape(-1) != K)
    value_error(kOp, "x has inner dimension ", x.shape(-1), " (shape ", x.shape(),
        ") but w with shape ", w.shape(), ", bits=", bits, ", transpose=",
        transpose ? "True" : "False", " expects ", K);
  if (cols % group_size != 0)
    value_error(kOp, transpose ? "K" : "N", "=", cols, " (from w with shape ", w.shape(),
        ") is not a multiple of group_size=", group_size);
  const mx::Shape group_shape{rows, cols / group_size};
  if (scales.shape() != group_shape)
    value_error(kOp, "scales must have shape ", group_shape, ", got ", scales.shape());
  if (biases->shape() != group_shape)
    value_error(kOp, "biases must have shape ", group_shape, ", got ", biases->shape());

  mx::Dtype out_type = mx::promote_types(x.dtype(), scales.dtype());
  if (bias) {
    if (!is_kernel_float(bias->dtype()))
      type_error_(kOp, "bias must be float32, float16 or bfloat16, got ", bias->dtype());
    if (bias->ndim() != 1 || bias->shape(0) != N)
      value_error(kOp, "bias must have shape (", N, ",), got ", bias->shape());
    out_type = mx::promote_types(out_type, bias->dtype());
  }

  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::gpu && !QuantizedMatmul::has_gpu_kernels())
    value_error(kOp, "stream=", stream, " is a GPU stream but this build of mlx_ext has no GPU "
        "kernels; pass stream=mx.cpu");
  // Kernels read one float type and contiguous rows. Arrays already evaluated
  // that way (weights, typically) skip the Contiguous node: a decode step
  // then has one graph node per matmul instead of five.
  auto contiguous = [&](const mx::array& a) {
    if (a.is_available() && a.flags().row_contiguous) return a;
    return mx::contiguous(a, false, stream);
  };
  auto prepare = [&](const mx::array& a) { return contiguous(mx::astype(a, out_type, stream)); };
  std::vector<mx::array> inputs{prepare(x), contiguous(w), prepare(scales), prepare(*biases)};
  if (bias) inputs.push_back(prepare(*bias));

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
