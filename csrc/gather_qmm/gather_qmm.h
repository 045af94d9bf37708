// mlx_ext.gather_qmm: mx.gather_qmm's quantized matmul with matrix-level
// gather (affine mode), for mixtures of experts. x is (..., M, K), w a stack
// of packed matrices (..., N, K*bits/32) (transpose=True) or (..., K,
// N*bits/32); lhs_indices / rhs_indices hold flat indices into the batch
// dimensions of x and w. Pair p of the broadcast indices gives
//   out[p] = x[lhs[p]] @ dequantize(w[rhs[p]]).T (+ bias[rhs[p]]).
// mlx_ext.gather_quantized_swiglu is the same gather over two stacks of
// experts, a SwiGLU's gate and up projections, with the activation applied
// in the kernel: out[p] = silu(x[lhs[p]] @ gate[rhs[p]].T) * (x[lhs[p]] @
// up[rhs[p]].T). One primitive for what mlx-lm's SwitchGLU runs as two
// gathers and an elementwise op: x is gathered and grouped once.
// Kernels: cpu.cpp (expert-grouped, cpu_driver.cpp); metal.cpp (without
// swiglu, which Metal streams run as two gathers: one launch covering every
// (row, expert) pair; metal/quantized_matmul.metal, metal/gather_qmm.metal);
// cuda.cpp (with swiglu; cuda_plan.h: decode, grouped tiles, generic).
#pragma once

#include <optional>
#include <string>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlx_ext {

namespace mx = mlx::core;

mx::array gather_qmm(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const std::optional<mx::array>& lhs_indices,
    const std::optional<mx::array>& rhs_indices,
    bool transpose,
    std::optional<int> group_size,
    std::optional<int> bits,
    const std::string& mode,
    bool sorted_indices,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s = {});

mx::array gather_quantized_swiglu(
    const mx::array& x,
    const mx::array& w_gate,
    const mx::array& scales_gate,
    const std::optional<mx::array>& biases_gate,
    const mx::array& w_up,
    const mx::array& scales_up,
    const std::optional<mx::array>& biases_up,
    const std::optional<mx::array>& lhs_indices,
    const std::optional<mx::array>& rhs_indices,
    std::optional<int> group_size,
    std::optional<int> bits,
    const std::string& mode,
    bool sorted_indices,
    mx::StreamOrDevice s = {});

// Inputs: x (X, M, K) with X the flattened batch of x; w (E, rows, packed),
// scales and biases (E, rows, groups); lhs and rhs (P,) uint32, the
// broadcast indices flattened; bias (E, N) per expert or (N,) shared, when
// has_bias. With swiglu (transpose=True, no bias), inputs 6, 7, 8 are the up
// projections' w, scales and biases, shaped as 1, 2, 3 (the gate's). All
// contiguous; x, scales, biases, bias of the output dtype. The output is
// (P, M, N); the op function reshapes it. `sorted`: the caller's
// sorted_indices hint (pairs grouped by expert); it picks the Metal kernel
// (any order stays correct) and the CPU and CUDA, which group by expert
// anyway, ignore it.
class GatherQmm : public mx::UnaryPrimitive {
 public:
  GatherQmm(mx::Stream stream, int group_size, int bits, bool transpose, bool has_bias, bool swiglu = false,
      bool sorted = false)
      : mx::UnaryPrimitive(stream),
        group_size_(group_size),
        bits_(bits),
        transpose_(transpose),
        has_bias_(has_bias),
        swiglu_(swiglu),
        sorted_(sorted) {}

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

  const char* name() const override { return "mlx_ext::GatherQmm"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  std::vector<mx::array> swiglu_vjp(
      const std::vector<mx::array>& primals, const mx::array& cotan, const std::vector<int>& argnums);

  int group_size_;
  int bits_;
  bool transpose_;
  bool has_bias_;
  bool swiglu_;
  bool sorted_;
};

} // namespace mlx_ext
