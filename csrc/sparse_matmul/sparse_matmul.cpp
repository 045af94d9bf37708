// The op function (validation of the format's static structure, dtype and
// shape inference, graph building) and the Primitives' transforms. The
// contents of the pattern (index ranges, sorted rows) are validated where
// they arrive, by the containers of mlx_ext.sparse. Kernels: cpu.cpp.
#include "sparse_matmul/sparse_matmul.h"

#include "common/affine.h"
#include "common/checks.h"
#include "common/grad.h"

namespace mlx_ext {
namespace {

constexpr const char* kOp = "sparse_matmul";

void check_dtype(const mx::array& a, mx::Dtype dtype, const char* name) {
  if (a.dtype() != dtype) type_error_(kOp, name, " must be ", dtype, ", got ", a.dtype());
}

void check_shape(const mx::array& a, const mx::Shape& shape, const char* name) {
  if (a.shape() != shape) value_error(kOp, name, " must have shape ", shape, ", got ", a.shape());
}

void check_row_pointers(const mx::array& p, int rows, const char* name) {
  check_dtype(p, mx::int32, name);
  check_shape(p, {rows + 1}, name);
}

void check_values_1d(const mx::array& v, const char* name) {
  check_kernel_float(kOp, name, v);
  if (v.ndim() != 1) value_error(kOp, name, " must be 1-D, got shape ", v.shape());
}

// Checks every array of `layout` against the others and the shape (N, K).
void check_layout(const SparseLayout& l, const std::vector<mx::array>& a) {
  const size_t expected = l.format == SparseFormat::nm ? 1 + l.value_arrays() : 3;
  if (a.size() != expected)
    value_error(kOp, "the format needs ", expected, " arrays, got ", a.size());
  if (l.N < 1 || l.K < 1) value_error(kOp, "shape must be positive, got (", l.N, ", ", l.K, ")");
  switch (l.format) {
    case SparseFormat::csr:
      check_values_1d(a[0], "data");
      if (a[1].dtype() != mx::uint16 && a[1].dtype() != mx::uint32)
        type_error_(kOp, "indices must be uint16 or uint32, got ", a[1].dtype());
      if (a[1].dtype() == mx::uint16 && l.K > 65536)
        value_error(kOp, "uint16 indices cannot address K=", l.K, " columns");
      check_shape(a[1], a[0].shape(), "indices");
      check_row_pointers(a[2], l.N, "indptr");
      break;
    case SparseFormat::bitmask:
      check_values_1d(a[0], "values");
      check_dtype(a[1], mx::uint32, "mask");
      check_shape(a[1], {l.N, int((l.K + 31) / 32)}, "mask");
      check_row_pointers(a[2], l.N, "row_ptr");
      break;
    case SparseFormat::bsr: {
      check_kernel_float(kOp, "data", a[0]);
      if (l.block_n < 1 || l.block_k < 1 || l.N % l.block_n || l.K % l.block_k)
        value_error(kOp, "block (", l.block_n, ", ", l.block_k, ") does not divide shape (",
            l.N, ", ", l.K, ")");
      if (a[0].ndim() != 3 || a[0].shape(1) != l.block_n || a[0].shape(2) != l.block_k)
        value_error(kOp, "data must have shape (nnzb, ", l.block_n, ", ", l.block_k, "), got ",
            a[0].shape());
      check_dtype(a[1], mx::int32, "indices");
      check_shape(a[1], {a[0].shape(0)}, "indices");
      check_row_pointers(a[2], l.N / l.block_n, "indptr");
      break;
    }
    case SparseFormat::nm: {
      if ((l.m != 4 && l.m != 8) || l.n < 1 || l.n >= l.m)
        value_error(kOp, "n:m=", l.n, ":", l.m, " is not supported; m must be 4 or 8, 0 < n < m");
      if (l.K % l.m) value_error(kOp, "K=", l.K, " is not a multiple of m=", l.m);
      const int kc = l.K / l.m * l.n;
      if (l.quantized()) {
        if (l.bits != 4 && l.bits != 8)
          value_error(kOp, "bits=", l.bits, " is not supported for N:M values; use 4 or 8");
        check_affine_config(kOp, l.bits, l.group_size);
        const auto [rows, cols] = affine_matrix_shape(kOp, a[0], l.bits);
        if (rows != l.N || cols != kc)
          value_error(kOp, "w_q holds a (", rows, ", ", cols, ") matrix, expected (", l.N, ", ",
              kc, ")");
        check_affine_groups(kOp, a[0], a[1], a[2], rows, cols, l.group_size, "K n / m");
      } else {
        check_kernel_float(kOp, "values", a[0]);
        check_shape(a[0], {l.N, kc}, "values");
      }
      const auto& codes = a.back();
      check_dtype(codes, mx::uint32, "codes");
      check_shape(codes, {l.N, int((int64_t(kc) * l.code_bits() + 31) / 32)}, "codes");
      break;
    }
  }
}

std::vector<mx::array> contiguous_all(const std::vector<mx::array>& arrays, const mx::Stream& s) {
  std::vector<mx::array> out;
  for (const auto& a : arrays) out.push_back(contiguous_input(a, s));
  return out;
}

// a as a row-contiguous (rows, a.shape(-1)) float32 matrix.
mx::array as_matrix_f32(const mx::array& a, const mx::Stream& s) {
  return kernel_input(mx::reshape(a, {-1, a.shape(-1)}, s), mx::float32, s);
}

mx::array matmul_node(const mx::array& x, const SparseLayout& l, std::vector<mx::array> arrays,
    const std::optional<mx::array>& bias, bool transpose, const mx::Stream& s) {
  mx::Dtype out_type = mx::promote_types(x.dtype(), arrays[l.quantized() ? 1 : 0].dtype());
  if (bias) out_type = mx::promote_types(out_type, bias->dtype());
  auto x_in = x;
#if defined(MLX_EXT_CUDA)
  if (s.device == mx::Device::gpu) {
    // The CUDA kernels (cuda.cpp) read x and the values in the output's
    // dtype: cast here, exactly (the promoted dtype holds both). The Metal
    // kernels read the values in their own dtype (metal.cpp).
    x_in = mx::astype(x, out_type, s);
    for (int i = l.quantized() ? 1 : 0; i < (l.quantized() ? 3 : 1); ++i)
      arrays[i] = mx::astype(arrays[i], out_type, s);
  }
#endif
  std::vector<mx::array> inputs{contiguous_input(x_in, s)};
  for (auto& a : contiguous_all(arrays, s)) inputs.push_back(std::move(a));
  if (bias) inputs.push_back(kernel_input(*bias, out_type, s));
  auto shape = x.shape();
  shape.back() = transpose ? l.N : l.K;
  return mx::array(std::move(shape), out_type,
      std::make_shared<SparseMatmul>(s, l, transpose, bias.has_value()), std::move(inputs));
}

} // namespace

SparseFormat parse_sparse_format(const std::string& format) {
  if (format == "csr") return SparseFormat::csr;
  if (format == "bitmask") return SparseFormat::bitmask;
  if (format == "bsr") return SparseFormat::bsr;
  if (format == "nm") return SparseFormat::nm;
  value_error(kOp, "format='", format, "' is not one of 'csr', 'bitmask', 'bsr', 'nm'");
}

mx::array sparse_matmul(
    const mx::array& x,
    const std::string& format,
    const std::vector<mx::array>& arrays,
    std::pair<int, int> shape,
    std::pair<int, int> block,
    std::pair<int, int> nm,
    int bits,
    int group_size,
    const std::optional<mx::array>& bias,
    bool transpose,
    mx::StreamOrDevice s) {
  SparseLayout l{parse_sparse_format(format), shape.first, shape.second, block.first,
      block.second, nm.first, nm.second, bits, group_size};
  if (l.format != SparseFormat::nm && bits != 0)
    value_error(kOp, "bits=", bits, ": only the N:M format has quantized values");
  check_layout(l, arrays);

  if (x.ndim() == 0) value_error(kOp, "x must have at least one dimension, got a scalar");
  check_kernel_float(kOp, "x", x);
  const int inner = transpose ? l.K : l.N;
  if (x.shape(-1) != inner)
    value_error(kOp, "x has inner dimension ", x.shape(-1), " (shape ", x.shape(),
        ") but the sparse matrix of shape (", l.N, ", ", l.K, ") expects ", inner);
  if (bias) {
    check_kernel_float(kOp, "bias", *bias);
    const int outer = transpose ? l.N : l.K;
    if (bias->ndim() != 1 || bias->shape(0) != outer)
      value_error(kOp, "bias must have shape (", outer, ",), got ", bias->shape());
  }
  const auto stream = kernel_stream<SparseMatmul>(kOp, s);
  return matmul_node(x, l, arrays, bias, transpose, stream);
}

std::vector<mx::array> SparseMatmul::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto& cotan = cotangents[0];
  const auto& x = primals[0];
  const int n_arrays = int(primals.size()) - 1 - (has_bias_ ? 1 : 0);
  const std::vector<mx::array> arrays(primals.begin() + 1, primals.begin() + 1 + n_arrays);
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      // d/dx (x W^T) = g W: the same pattern read the other way.
      auto dx = matmul_node(cotan, layout_, arrays, std::nullopt, !transpose_, stream());
      grads.push_back(mx::astype(dx, x.dtype(), stream()));
    } else if (arg == 1 && !layout_.quantized()) {
      // dW[n, k] = sum_m g[m, n] x[m, k] on the stored (n, k) only; with
      // transpose=false (out = x W) x and g swap roles.
      auto g2 = as_matrix_f32(cotan, stream()), x2 = as_matrix_f32(x, stream());
      std::vector<mx::array> inputs{transpose_ ? g2 : x2, transpose_ ? x2 : g2};
      for (const auto& a : arrays) inputs.push_back(a);
      const auto& values = arrays[0];
      grads.push_back(mx::array(values.shape(), values.dtype(),
          std::make_shared<SparseSampledMatmul>(stream(), layout_), std::move(inputs)));
    } else if (arg == int(primals.size()) - 1 && has_bias_) {
      grads.push_back(bias_grad(cotan, primals.back().dtype(), stream()));
    } else {
      value_error(kOp, "gradients with respect to the sparsity pattern or quantized values "
          "are not supported; differentiate with respect to x, float values or bias");
    }
  }
  return grads;
}

std::vector<mx::array> SparseMatmul::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  const int n_arrays = int(primals.size()) - 1 - (has_bias_ ? 1 : 0);
  const std::vector<mx::array> arrays(primals.begin() + 1, primals.begin() + 1 + n_arrays);
  std::optional<mx::array> out;
  for (size_t i = 0; i < argnums.size(); ++i) {
    mx::array term = [&] {
      if (argnums[i] == 0)
        return matmul_node(tangents[i], layout_, arrays, std::nullopt, transpose_, stream());
      if (argnums[i] == 1 && !layout_.quantized()) {
        // Linear in the values: the same pattern holding the tangent.
        auto with_tangent = arrays;
        with_tangent[0] = mx::astype(tangents[i], arrays[0].dtype(), stream());
        return matmul_node(primals[0], layout_, with_tangent, std::nullopt, transpose_, stream());
      }
      if (argnums[i] == int(primals.size()) - 1 && has_bias_) return tangents[i];
      value_error(kOp, "derivatives with respect to the sparsity pattern or quantized values "
          "are not supported");
    }();
    out = out ? mx::add(*out, term, stream()) : term;
  }
  auto shape = output_shapes(primals)[0];
  return {mx::astype(mx::broadcast_to(*out, shape, stream()), primals[0].dtype(), stream())};
}

std::pair<std::vector<mx::array>, std::vector<int>> SparseMatmul::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  for (size_t i = 1; i < axes.size(); ++i)
    if (axes[i] >= 0) value_error(kOp, "vmap over the sparse matrix or bias is not supported");
  // x already accepts any leading batch dimensions: move the mapped axis there.
  auto x = axes[0] >= 0 ? mx::moveaxis(inputs[0], axes[0], 0, stream()) : inputs[0];
  const int n_arrays = int(inputs.size()) - 1 - (has_bias_ ? 1 : 0);
  std::vector<mx::array> arrays(inputs.begin() + 1, inputs.begin() + 1 + n_arrays);
  std::optional<mx::array> bias;
  if (has_bias_) bias = inputs.back();
  auto out = matmul_node(x, layout_, arrays, bias, transpose_, stream());
  return {{out}, {axes[0] >= 0 ? 0 : -1}};
}

bool SparseMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const SparseMatmul&>(other);
  return layout_ == o.layout_ && transpose_ == o.transpose_ && has_bias_ == o.has_bias_;
}

std::vector<mx::Shape> SparseMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = transpose_ ? layout_.N : layout_.K;
  return {shape};
}

} // namespace mlx_ext
