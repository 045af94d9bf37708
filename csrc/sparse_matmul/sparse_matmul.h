// mlx_ext.sparse_matmul: x @ W.T (+ bias) for a sparse W of shape (N, K)
// stored in one of four formats (mlx_ext.sparse: CSR, Bitmask, BSR, NM).
//
// One Primitive for all formats: the format is a static tag beside the
// format's arrays, so the transforms (vjp, jvp, vmap) and the graph building
// are written once, and a GPU backend adds one eval_gpu that switches on the
// tag, as eval_cpu does.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlx_ext {

namespace mx = mlx::core;

enum class SparseFormat : int { csr = 0, bitmask = 1, bsr = 2, nm = 3 };

// What the arrays of a format cannot say by their shapes: static, part of the
// Primitive. Arrays by format (values first; the rest is the pattern):
//   csr:     data (nnz,), indices (nnz,) uint16 | uint32, indptr (N + 1,) int32
//   bitmask: values (nnz,), mask (N, ceil(K / 32)) uint32 (bit k % 32 of word
//            k / 32 is set where W[n, k] is stored), row_ptr (N + 1,) int32
//   bsr:     data (nnzb, block_n, block_k), indices (nnzb,) int32 block
//            columns, indptr (N / block_n + 1,) int32
//   nm:      values (N, K n / m) float, or w_q, scales, biases of MLX's affine
//            quantization of them (bits > 0); then codes (N, words) uint32,
//            the position in [0, m) of each kept value within its group of m,
//            code_bits (2 for m = 4, 4 for m = 8) each, little-endian words.
struct SparseLayout {
  SparseFormat format;
  int N, K;
  int block_n = 1, block_k = 1; // bsr
  int n = 0, m = 0; // nm
  int bits = 0, group_size = 0; // nm with quantized values; bits == 0: float values
  int code_bits() const { return m == 8 ? 4 : 2; }
  bool quantized() const { return bits > 0; }
  // The number of arrays that hold values (1, or 3 for quantized N:M).
  int value_arrays() const { return quantized() ? 3 : 1; }
  bool operator==(const SparseLayout&) const = default;
};

SparseFormat parse_sparse_format(const std::string& format);

// transpose=true: x (..., K) @ W.T -> (..., N), the op users call;
// transpose=false: x (..., N) @ W -> (..., K), the x-gradient.
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
    mx::StreamOrDevice s = {});

// Inputs: x (float32 | float16 | bfloat16, row-contiguous), the format's
// arrays, and bias (N,) of the output dtype when has_bias.
class SparseMatmul : public mx::UnaryPrimitive {
 public:
  SparseMatmul(mx::Stream stream, SparseLayout layout, bool transpose, bool has_bias)
      : mx::UnaryPrimitive(stream), layout_(layout), transpose_(transpose), has_bias_(has_bias) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  const char* name() const override { return "mlx_ext::SparseMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  const SparseLayout& layout() const { return layout_; }
  bool transpose() const { return transpose_; }

 private:
  SparseLayout layout_;
  bool transpose_;
  bool has_bias_;
};

// The gradient of the stored values on their fixed pattern, a sampled
// dense-dense product: dvalues[j] = sum_m g[m, row_j] x[m, col_j] for the
// stored value j at (row_j, col_j). Inputs: g (M, N) and x (M, K) float32,
// then the format's arrays (float values). Output: the values' shape and dtype.
class SparseSampledMatmul : public mx::UnaryPrimitive {
 public:
  SparseSampledMatmul(mx::Stream stream, SparseLayout layout)
      : mx::UnaryPrimitive(stream), layout_(layout) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "mlx_ext::SparseSampledMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return layout_ == static_cast<const SparseSampledMatmul&>(other).layout_;
  }

 private:
  SparseLayout layout_;
};

} // namespace mlx_ext
