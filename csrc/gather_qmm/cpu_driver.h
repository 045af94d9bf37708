// Runs one gather_qmm on the CPU, free of MLX types (native tests can drive
// it). The (pair, expert) work is grouped by expert whatever the order of the
// indices: the rows of x routed to one expert are gathered into one
// contiguous block, so that each expert's packed weight is streamed once per
// call, by the quantized matmul's per-ISA kernels (quantized_matmul/
// cpu_kernels.h) for all of those rows at once. Every expert's GEMV / GEMM
// tasks then run in a single parallel pass (decode: all (row, expert) pairs
// at once, not one expert after another).
#pragma once

#include <cstdint>

#include "quantized_matmul/cpu_kernels.h"

namespace mlx_ext::cpu {

struct GatherQmmArgs {
  const float* x; // (X, M, K) float32, contiguous
  const uint32_t* lhs; // (P,) indices into x's X matrices
  const uint32_t* rhs; // (P,) indices into w's E experts
  const uint8_t* w; // (E, rows, packed) packed weights, bytes
  const void* scales; // (E, rows, rows_groups) of `type`
  const void* biases;
  const void* bias; // (E, N), (N,) or nullptr
  bool bias_per_expert; // bias is (E, N)
  void* out; // (P, M, N) of `type`
  // A second stack of experts shaped as w (a SwiGLU's up projections), run
  // on the same gathered rows into up_out, (P, M, N); up_w nullptr: none.
  const uint8_t* up_w;
  const void* up_scales;
  const void* up_biases;
  void* up_out;
  FloatType type;
  int64_t P, X, E, M, N, K;
  int group_size, bits;
  bool transpose;
};

// Pairs whose index is out of range (known only at run time) read nothing:
// their (M, N) output block is NaN.
void run_gather_qmm(const KernelTable& kernels, const GatherQmmArgs& a);

} // namespace mlx_ext::cpu
