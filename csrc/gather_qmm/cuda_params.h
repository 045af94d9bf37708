// The one argument of every CUDA kernel of gather_qmm, filled by cuda.cpp
// (host, g++) and read by the kernels (gather_*.cu, nvcc): plain C++ only, no
// MLX or CUDA types, so that both compilers see the same layout.
#pragma once

#include <cstdint>

#include "common/math.h"

namespace mlx_ext::cuda {

// Layout (gather_qmm.h, GatherQmm): x (X, M, K) row-major; w (E, rows,
// packed) as MLX packs one matrix per expert, scales / biases (E, rows,
// groups); lhs, rhs (P,) uint32: pair p multiplies x[lhs[p]] (M rows) by
// expert rhs[p]; out (P, M, N). A "pair-row" r = p * M + m is row m of pair
// p: out row r, x row lhs[p] * M + m. transpose: w is (E, N, K*bits/32).
struct GatherParams {
  const void* x;
  const uint32_t* w;
  const void* scales;
  const void* biases;
  // gather_quantized_swiglu: the up projections (w is the gate's), same
  // shapes; out = silu(x W_gate^T) * (x W_up^T). nullptr otherwise.
  const uint32_t* w_up;
  const void* scales_up;
  const void* biases_up;
  const void* bias; // (E, N) when bias_per_expert, (N,) otherwise, or nullptr
  const uint32_t* lhs;
  const uint32_t* rhs;
  void* out;
  // Written by gather_group (the prefill's grouping pass), read by the tiled
  // kernel: order (P,) the valid pairs grouped by expert, then the invalid
  // ones (an index out of range); offsets (E + 2,) where each expert's pairs
  // start in order (offsets[E]: the invalid ones, offsets[E + 1] = P);
  // tile_offsets (E + 1,) the first tile of each expert (tile_offsets[E]:
  // the number of tiles); cursor (E + 1,) scratch.
  int* order;
  int* offsets;
  int* tile_offsets;
  int* cursor;
  int64_t P;
  int M, N, K;
  int X, E; // matrices in the batch of x and of w
  int group_size, bits;
  int bias_per_expert;
  int tile_rows; // gather_group: pair-rows per tile of the tiled kernel
};

// The tensor-core kernels (gather_tc.cu): GATHER_TC_ROWS rows of W per
// block of GATHER_TC_THREADS threads (4 warps over the 4 quarters of K, as
// quantized_matmul/qmv_tc.cu), 8 pair-rows per x tile; 2-, 4- and 8-bit W
// with K a multiple of one lane's 16-byte chunk, 128 / bits values (the last
// span of 4 chunks may be partial, unlike qmv_tc's).
constexpr int GATHER_TC_ROWS = 16, GATHER_TC_THREADS = 128;
constexpr MLX_EXT_HOST_DEVICE int gather_tc_k_multiple(int bits) { return 128 / bits; }
// The decode kernel lists one expert's pair-rows in shared memory: at most
// this many pair-rows (P M) per call.
constexpr int GATHER_DECODE_MAX_ROWS = 256;
// The grouping pass: one block of this many threads.
constexpr int GATHER_GROUP_THREADS = 1024;

} // namespace mlx_ext::cuda
