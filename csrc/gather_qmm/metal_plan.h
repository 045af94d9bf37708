// Which Metal kernel runs a gather_qmm, and on what grid. Pure C++ (no MLX,
// no Metal) so that the emulator tests call it too.
//   - Sorted indices, one row per pair and at least kRowsMinPairs pairs
//     (mlx-lm's prefill): gather_qmm_t / gather_qmm_n of metal/gather_qmm.metal,
//     the pairs as the rows of 32x32 tiles, one pass per run of equal experts.
//   - Otherwise (decode, several rows per pair, unsorted): the quantized
//     matmul's affine kernels (metal/quantized_matmul.metal) launched with the
//     function constant QMM_FC_GATHER: the plan of one (M, N, K) product
//     (quantized_matmul/metal_plan.h: qmv_fast / qmv / qvm up to 8 rows per
//     pair, qmm_t / qmm_n above) with one grid z per pair.
#pragma once

#include <cstdint>
#include <string_view>

#include "common/math.h"
#include "quantized_matmul/metal_plan.h"

namespace mlx_ext::metal::gather_qmm_plan {

// From this many sorted one-row pairs (one full 32-row tile) the tiled kernel
// over pairs, which streams each expert's weights about once per tile run
// instead of once per pair. Not tuned on hardware.
constexpr int64_t kRowsMinPairs = 32;

// Whether `launch` is gather_qmm.metal's kernel (gather_qmm_t / gather_qmm_n:
// no gather function constant, shape.M = P) rather than a quantized matmul
// kernel in gather mode.
inline bool over_pairs(const qmm_plan::Launch& launch) {
  return std::string_view(launch.kernel).substr(0, 10) == "gather_qmm";
}

// P pairs, each x (M, K) times one expert's quantized matrix into out (M, N);
// P, M, N >= 1. `sorted`: the caller's sorted_indices (pairs grouped by expert).
inline qmm_plan::Launch plan(int64_t P, int64_t M, int64_t N, int64_t K, bool transpose, bool sorted) {
  if (sorted && M == 1 && P >= kRowsMinPairs) {
    return {transpose ? "gather_qmm_t" : "gather_qmm_n", {ceil_div(N, 32), ceil_div(P, 32), 1}, 128};
  }
  qmm_plan::Launch launch = qmm_plan::plan(M, N, K, transpose);
  launch.groups[2] = P;
  return launch;
}

} // namespace mlx_ext::metal::gather_qmm_plan
