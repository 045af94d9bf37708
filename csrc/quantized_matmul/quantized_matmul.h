// mlx_ext.quantized_matmul: x @ dequantize(w).T (transpose=True) or
// x @ dequantize(w) (transpose=False) for MLX's affine quantization and its
// fp modes (mxfp4, nvfp4, mxfp8: common/fp_formats.h), with an optional bias
// added in the kernel's epilogue. Same meaning and packing as
// mx.quantized_matmul; a w with leading batch dimensions is split into one
// 2-D product per batch element in the graph.
#pragma once

#include <optional>
#include <string>

#include "common/fp_formats.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlx_ext {

namespace mx = mlx::core;

mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    bool transpose,
    std::optional<int> group_size,
    std::optional<int> bits,
    const std::string& mode,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s = {});

// Inputs: x (..., K), w (2-D), scales, biases (affine mode only), and bias
// (N,) when has_bias; all contiguous and (but w, and an fp mode's uint8
// scales) of the output dtype.
class QuantizedMatmul : public mx::UnaryPrimitive {
 public:
  QuantizedMatmul(mx::Stream stream, int group_size, int bits, bool transpose, bool has_bias,
      QuantMode mode = QuantMode::affine)
      : mx::UnaryPrimitive(stream),
        group_size_(group_size),
        bits_(bits),
        transpose_(transpose),
        has_bias_(has_bias),
        mode_(mode) {}

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

  const char* name() const override { return "mlx_ext::QuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  int group_size() const { return group_size_; }
  int bits() const { return bits_; }
  bool transpose() const { return transpose_; }
  bool has_bias() const { return has_bias_; }
  QuantMode mode() const { return mode_; }
  // Where bias sits among the inputs: after biases, which fp modes lack.
  int bias_index() const { return mode_ == QuantMode::affine ? 4 : 3; }

 private:
  mx::array weight_grad_by_group(const std::vector<mx::array>& primals, const mx::array& cotan);
  mx::array scales_grad(const std::vector<mx::array>& primals, const mx::array& cotan);
  mx::array biases_grad(const std::vector<mx::array>& primals, const mx::array& cotan);

  int group_size_;
  int bits_;
  bool transpose_;
  bool has_bias_;
  QuantMode mode_;
};

} // namespace mlx_ext
