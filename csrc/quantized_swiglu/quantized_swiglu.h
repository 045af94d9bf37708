// mlx_ext.quantized_swiglu: SwiGLU's gate and up projections as one quantized
// product with the activation in its epilogue. w stacks the gate rows over
// the up rows, (2 I, K) in MLX's affine format; for x (..., K):
//   out = silu(x @ gate.T) * (x @ up.T), (..., I),  silu(g) = g / (1 + exp(-g)).
// One primitive where the unfused layer is two products and an elementwise op:
// at one decode token their per-call costs, not their bytes, are the time.
#pragma once

#include <optional>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlx_ext {

namespace mx = mlx::core;

mx::array quantized_swiglu(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    std::optional<int> group_size,
    std::optional<int> bits,
    mx::StreamOrDevice s = {});

// Inputs: x (..., K), w (2 I, K * bits / 32) uint32, scales and biases
// (2 I, K / group_size); all contiguous and (but w) in the output dtype.
class QuantizedSwiGLU : public mx::UnaryPrimitive {
 public:
  QuantizedSwiGLU(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

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

  const char* name() const override { return "mlx_ext::QuantizedSwiGLU"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  // (gate, up), each (..., I), in float32, from the same quantized matrix.
  std::pair<mx::array, mx::array> projections(const std::vector<mx::array>& primals);
  int group_size_;
  int bits_;
};

} // namespace mlx_ext
