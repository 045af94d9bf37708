// Which CUDA kernels run a gather_qmm (or the fused gather_quantized_swiglu),
// on what grids: the choice cuda.cpp's eval_gpu makes, as plain C++ (no MLX or
// CUDA types) so that tests/test_cuda_plan_gather.py checks it without a GPU.
//   - decode: few pair-rows (P M <= kDecodeMaxRows): gather_tc_decode, one
//     launch over every pair (gather_tc.cu).
//   - tiles: more pair-rows: gather_group (the pairs grouped by expert on the
//     device, whatever the order of the indices: sorted_indices is not
//     needed) then gather_tc_tiles over tiles of tile_rows pair-rows of one
//     expert, each expert's W read once per tile.
//   - generic: what the tensor-core kernels do not take (float32 x,
//     transpose=False, other bit widths, K % (128 / bits) != 0, unaligned):
//     one thread per output element (gather_generic.cu).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/cuda/kernel_launch.h"
#include "common/math.h"
#include "gather_qmm/cuda_params.h"

namespace mlx_ext::cuda::gather_plan {

// Up to this many pair-rows the decode kernel (each expert's rows in tiles
// of 8, its W read once per tile); above, the grouping pass and 32-row tiles
// (8 for 2-bit W). Not tuned on hardware yet (mlx-lm's decode: M = 1 pair-row
// per pair, P = tokens * top-k, 8 for one token at top-8, 64 for 8 tokens).
constexpr int64_t kDecodeMaxRows = 64;
static_assert(kDecodeMaxRows <= GATHER_DECODE_MAX_ROWS, "decode rows live in shared memory");
constexpr int kElementThreads = 256;

struct Problem {
  int64_t P; // pairs
  int M, N, K; // out (P, M, N), x (X, M, K)
  int E; // experts (matrices in w's batch)
  int bits, group_size;
  bool transpose;
  std::string dtype; // of x and out, as common/kernel_names.h spells it
  bool aligned; // x, w (and w_up) data 16-byte aligned
  bool swiglu; // two stacks, silu(gate) * up (transpose, no bias)
};

enum class Path { decode, tiles, generic };

struct Plan {
  Path path;
  KernelLaunch group; // tiles: gather_group, before main
  KernelLaunch main;
  int tile_rows = 0; // tiles: pair-rows per tile (GatherParams::tile_rows)
};

inline bool tensor_core_ok(const Problem& pr) {
  const bool bits_ok = pr.bits == 2 || pr.bits == 4 || pr.bits == 8;
  return pr.transpose && pr.dtype != "float32" && bits_ok && pr.K > 0 &&
      pr.K % gather_tc_k_multiple(pr.bits) == 0 && pr.aligned &&
      pr.P * pr.M < (int64_t(1) << 31) && ceil_div(pr.N, GATHER_TC_ROWS) <= kMaxGridYZ;
}

// P, M, N >= 1; K a multiple of group_size; swiglu only with transpose.
inline Plan plan(const Problem& pr) {
  const std::string swiglu = pr.swiglu ? "_swiglu" : "";
  const int64_t pair_rows = pr.P * pr.M;
  Plan plan;
  if (!tensor_core_ok(pr)) {
    plan.path = Path::generic;
    plan.main = {"gather_generic_" + std::string(pr.transpose ? "t_" : "n_") + pr.dtype + swiglu,
        {ceil_div(pair_rows * pr.N, kElementThreads), 1, 1}, kElementThreads, 0};
    return plan;
  }
  const std::string suffix = pr.dtype + "_b" + std::to_string(pr.bits);
  const int64_t n_blocks = ceil_div(pr.N, GATHER_TC_ROWS);
  if (pair_rows <= kDecodeMaxRows) {
    plan.path = Path::decode;
    plan.main = {"gather_tc_decode_" + suffix + swiglu, {pr.P, n_blocks, 1}, GATHER_TC_THREADS, 0};
    return plan;
  }
  plan.path = Path::tiles;
  plan.tile_rows = pr.bits == 2 ? 8 : 32;
  plan.group = {"gather_group_" + pr.dtype, {1, 1, 1}, GATHER_GROUP_THREADS, 0};
  // At most one partial tile per expert that has pairs.
  const int64_t tiles = ceil_div(pair_rows, plan.tile_rows) + std::min<int64_t>(pr.E, pr.P);
  plan.main = {"gather_tc_tiles_" + suffix + "_m" + std::to_string(plan.tile_rows) + swiglu,
      {tiles, n_blocks, 1}, GATHER_TC_THREADS, 0};
  return plan;
}

} // namespace mlx_ext::cuda::gather_plan
