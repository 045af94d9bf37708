// The op function (validation, dtype and shape inference, graph building) and
// the Primitive's transforms. Kernels: cpu.cpp, metal.cpp, cuda.cpp.
#include "quantized_matmul/quantized_matmul.h"

#include "common/affine.h"
#include "common/checks.h"
#include "common/grad.h"

namespace mlx_ext {
namespace {

constexpr const char* kOp = "quantized_matmul";


// The affine mode's biases among the Primitive's inputs; fp modes have none.
std::optional<mx::array> biases_of(const std::vector<mx::array>& inputs, QuantMode m) {
  if (m == QuantMode::affine) return inputs[3];
  return std::nullopt;
}

QuantMode parse_mode(const std::string& mode) {
  for (auto m : {QuantMode::affine, QuantMode::mxfp4, QuantMode::nvfp4, QuantMode::mxfp8})
    if (mode == mode_name(m)) return m;
  value_error(kOp, "mode='", mode, "' is not supported; use 'affine', 'mxfp4', 'nvfp4' or 'mxfp8'");
}

// An fp mode's one group size and bit width (None takes them), its uint8
// scales and its lack of biases.
void check_fp_mode(QuantMode m, int group_size, int bits, const mx::array& scales,
    const std::optional<mx::array>& biases) {
  const auto spec = mode_spec(m);
  if (group_size != spec.group_size)
    value_error(kOp, "group_size=", group_size, " is not supported for mode='", mode_name(m),
        "'; it has group_size=", spec.group_size, " (or None)");
  if (bits != spec.bits)
    value_error(kOp, "bits=", bits, " is not supported for mode='", mode_name(m), "'; it has bits=",
        spec.bits, " (or None)");
  if (biases)
    value_error(kOp, "biases must be None for mode='", mode_name(m),
        "' (its groups have a scale and no bias), got an array of shape ", biases->shape());
  if (scales.dtype() != mx::uint8)
    type_error_(kOp, "scales must be uint8 for mode='", mode_name(m), "' (as mx.quantize returns "
        "them), got ", scales.dtype());
}

// The 2-D product: w, scales (and biases) are matrices.
mx::array quantized_matmul_2d(const mx::array& x, const mx::array& w, const mx::array& scales,
    const std::optional<mx::array>& biases, bool transpose, int group_size, int bits, QuantMode qmode,
    const std::optional<mx::array>& bias, mx::StreamOrDevice s) {
  const bool affine = qmode == QuantMode::affine;
  const auto [rows, cols] = affine_matrix_shape(kOp, w, bits);
  const int K = transpose ? cols : rows; // reduction length
  const int N = transpose ? rows : cols; // output features
  if (x.shape(-1) != K)
    value_error(kOp, "x has inner dimension ", x.shape(-1), " (shape ", x.shape(),
        ") but w with shape ", w.shape(), ", bits=", bits, ", transpose=",
        transpose ? "True" : "False", " expects ", K);
  if (affine) {
    check_affine_groups(kOp, w, scales, *biases, rows, cols, group_size, transpose ? "K" : "N");
  } else {
    if (cols % group_size != 0)
      value_error(kOp, transpose ? "K" : "N", "=", cols, " (from w with shape ", w.shape(),
          ") is not a multiple of group_size=", group_size);
    const mx::Shape group_shape{rows, cols / group_size};
    if (scales.shape() != group_shape)
      value_error(kOp, "scales must have shape ", group_shape, ", got ", scales.shape());
  }

  // fp modes' scales are uint8 codes: the output takes x's dtype, as in MLX.
  mx::Dtype out_type = affine ? mx::promote_types(x.dtype(), scales.dtype()) : x.dtype();
  if (bias) {
    check_kernel_float(kOp, "bias", *bias);
    if (bias->ndim() != 1 || bias->shape(0) != N)
      value_error(kOp, "bias must have shape (", N, ",), got ", bias->shape());
    out_type = mx::promote_types(out_type, bias->dtype());
  }

  const auto stream = kernel_stream<QuantizedMatmul>(kOp, s);
  std::vector<mx::array> inputs{kernel_input(x, out_type, stream), contiguous_input(w, stream)};
  if (affine) {
    inputs.push_back(kernel_input(scales, out_type, stream));
    inputs.push_back(kernel_input(*biases, out_type, stream));
  } else {
    inputs.push_back(contiguous_input(scales, stream));
  }
  if (bias) inputs.push_back(kernel_input(*bias, out_type, stream));

  auto out_shape = x.shape();
  out_shape.back() = N;
  return mx::array(
      std::move(out_shape),
      out_type,
      std::make_shared<QuantizedMatmul>(stream, group_size, bits, transpose, bias.has_value(), qmode),
      std::move(inputs));
}

// w with leading batch dimensions (as mx.quantized_matmul takes them): x's
// batch dimensions (all but its last two) broadcast against w's, as in
// matmul, and each batch element is one 2-D product; their results are
// stacked. A 1-D x is one row.
mx::array batched_quantized_matmul(const mx::array& x_in, const mx::array& w, const mx::array& scales,
    const std::optional<mx::array>& biases, bool transpose, int group_size, int bits, QuantMode qmode,
    const std::optional<mx::array>& bias, mx::StreamOrDevice s) {
  const mx::Shape w_batch(w.shape().begin(), w.shape().end() - 2);
  auto same_batch = [&](const mx::array& a, const char* name) {
    if (a.ndim() != w.ndim() || !std::equal(w_batch.begin(), w_batch.end(), a.shape().begin()))
      value_error(kOp, name, " must have the batch dimensions of w (shape ", w.shape(), "), got shape ",
          a.shape());
  };
  same_batch(scales, "scales");
  if (biases) same_batch(*biases, "biases");
  const bool vector = x_in.ndim() == 1;
  const auto x = vector ? mx::expand_dims(x_in, 0, s) : x_in;
  const mx::Shape x_batch(x.shape().begin(), x.shape().end() - 2);
  mx::Shape batch;
  try {
    batch = mx::broadcast_shapes(x_batch, w_batch);
  } catch (const std::invalid_argument&) {
    value_error(kOp, "the batch dimensions of x (shape ", x_in.shape(), ") and w (shape ", w.shape(),
        ") do not broadcast");
  }
  auto flat = [&](const mx::array& a) {
    auto shape = batch;
    shape.insert(shape.end(), a.shape().end() - 2, a.shape().end());
    return mx::reshape(mx::broadcast_to(a, shape, s), {-1, shape.end()[-2], shape.end()[-1]}, s);
  };
  const auto xb = flat(x), wb = flat(w), sb = flat(scales);
  std::optional<mx::array> bb;
  if (biases) bb = flat(*biases);
  std::vector<mx::array> outs;
  for (int b = 0; b < xb.shape(0); ++b) {
    auto at = [&](const mx::array& a) { return mx::squeeze(mx::slice(a, {b, 0, 0}, {b + 1, a.shape(1), a.shape(2)}, s), 0, s); };
    std::optional<mx::array> bias_b;
    if (bb) bias_b = at(*bb);
    outs.push_back(quantized_matmul_2d(at(xb), at(wb), at(sb), bias_b, transpose, group_size, bits, qmode, bias, s));
  }
  if (outs.empty()) // an empty batch: validate the shapes on one element, return nothing
    value_error(kOp, "the batch of x (shape ", x_in.shape(), ") and w (shape ", w.shape(), ") is empty");
  auto out_shape = batch;
  out_shape.push_back(x.shape(-2));
  out_shape.push_back(outs[0].shape(-1));
  auto out = mx::reshape(mx::stack(outs, 0, s), out_shape, s);
  return vector ? mx::squeeze(out, -2, s) : out;
}

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
  const QuantMode qmode = parse_mode(mode);
  // MLX's defaults where the caller passes None: the mode's own.
  const int group_size = group_size_or_default.value_or(mode_spec(qmode).group_size);
  const int bits = bits_or_default.value_or(mode_spec(qmode).bits);
  if (qmode == QuantMode::affine) {
    check_affine_config(kOp, bits, group_size);
    if (!biases)
      value_error(kOp, "biases are required for mode='affine' (got None)");
  } else {
    check_fp_mode(qmode, group_size, bits, scales, biases);
  }
  if (x.ndim() == 0) value_error(kOp, "x must have at least one dimension, got a scalar");
  check_kernel_float(kOp, "x", x);
  if (w.dtype() != mx::uint32)
    type_error_(kOp, "w must be uint32 (as packed by mx.quantize), got ", w.dtype());
  if (w.ndim() < 2)
    value_error(kOp, "w must have at least 2 dimensions (..., rows, packed columns), got shape ", w.shape());
  if (w.ndim() > 2)
    return batched_quantized_matmul(x, w, scales, biases, transpose, group_size, bits, qmode, bias, s);
  return quantized_matmul_2d(x, w, scales, biases, transpose, group_size, bits, qmode, bias, s);
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
      auto dx = quantized_matmul(cotan, primals[1], primals[2], biases_of(primals, mode_), !transpose_,
          group_size_, bits_, mode_name(mode_), std::nullopt, stream());
      grads.push_back(mx::astype(dx, primals[0].dtype(), stream()));
    } else if (arg == bias_index() && has_bias_) {
      grads.push_back(bias_grad(cotan, primals[arg].dtype(), stream()));
    } else if (mode_ == QuantMode::affine && (arg == 2 || arg == 3)) {
      grads.push_back(arg == 2 ? scales_grad(primals, cotan) : biases_grad(primals, cotan));
    } else if (arg == 2) {
      value_error(kOp, "gradients with respect to the uint8 scales of mode='", mode_name(mode_),
          "' are not supported (as in MLX); differentiate with respect to x or bias");
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
        return quantized_matmul(tangents[i], primals[1], primals[2], biases_of(primals, mode_), transpose_,
            group_size_, bits_, mode_name(mode_), std::nullopt, stream());
      if (argnums[i] == bias_index() && has_bias_) return tangents[i];
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
  if (has_bias_) bias = inputs[bias_index()];
  auto out = quantized_matmul(x, inputs[1], inputs[2], biases_of(inputs, mode_), transpose_, group_size_,
      bits_, mode_name(mode_), bias, stream());
  return {{out}, {axes[0] >= 0 ? 0 : -1}};
}

bool QuantizedMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_ && transpose_ == o.transpose_ &&
      has_bias_ == o.has_bias_ && mode_ == o.mode_;
}

std::vector<mx::Shape> QuantizedMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  const auto& w = inputs[1];
  shape.back() = transpose_ ? w.shape(0) : int(int64_t(w.shape(1)) * 32 / bits_);
  return {shape};
}

} // namespace mlx_ext
