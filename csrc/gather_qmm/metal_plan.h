// Which Metal kernel runs a gather_qmm, and on what grid: the quantized
// matmul's affine kernels (metal/quantized_matmul.metal) launched with the
// function constant QMM_FC_GATHER, the plan of one (M, N, K) product
// (quantized_matmul/metal_plan.h: qmv_fast / qmv / qvm up to 8 rows per pair,
// qmm_t / qmm_n above) with one grid z per pair. Pure C++ (no MLX, no Metal)
// so that the emulator tests call it too.
#pragma once

#include <cstdint>

#include "quantized_matmul/metal_plan.h"

namespace mlx_ext::metal::gather_qmm_plan {

// P pairs, each x (M, K) times one expert's quantized matrix into out (M, N);
// P, M, N >= 1.
inline qmm_plan::Launch plan(int64_t P, int64_t M, int64_t N, int64_t K, bool transpose) {
  qmm_plan::Launch launch = qmm_plan::plan(M, N, K, transpose);
  launch.groups[2] = P;
  return launch;
}

} // namespace mlx_ext::metal::gather_qmm_plan
