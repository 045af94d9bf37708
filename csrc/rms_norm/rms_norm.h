// mlx_ext.rms_norm: what mx.fast.rms_norm means, as one CPU primitive.
//   out = x * rsqrt(mean(x^2 over the last axis) + eps) * weight
// MLX's CPU backend runs mx.fast.rms_norm as its fallback graph (square, sum,
// rsqrt, two multiplies, casts): ~6 primitives of a few microseconds of
// dispatch each, 61 times per decode step of a 30-layer model. Here: one.
#pragma once

#include <optional>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlx_ext {

namespace mx = mlx::core;

mx::array rms_norm(const mx::array& x, const std::optional<mx::array>& weight, float eps,
    mx::StreamOrDevice s = {});

// Inputs: x (..., D) and, when has_weight, weight (D,) in x's dtype; contiguous.
class RMSNorm : public mx::UnaryPrimitive {
 public:
  RMSNorm(mx::Stream stream, float eps, bool has_weight)
      : mx::UnaryPrimitive(stream), eps_(eps), has_weight_(has_weight) {}

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

  const char* name() const override { return "mlx_ext::RMSNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float eps_;
  bool has_weight_;
};

} // namespace mlx_ext
