// Which Metal kernel of metal/quantized_matmul.metal runs a quantized matmul,
// and on what grid. Pure C++ (no MLX, no Metal) so that the emulator tests
// call it too (tests/metal_harness.py, Planner): one definition of the plan.
#pragma once

#include <cstdint>
#include <string>

#include "common/math.h"

namespace mlx_ext::metal::qmm_plan {

// At most this many rows of x take the GEMV kernels (qmv, qvm), which read
// the weights once per row; more take the tiled GEMMs. Not tuned on hardware.
constexpr int64_t kGemvMaxRows = 8;

struct Launch {
  const char* kernel; // qmv_fast, qmv, qvm, qmm_t or qmm_n; fp_qmv, fp_qvm
  int64_t groups[3]; // threadgroups per grid dimension
  int threads; // threads per threadgroup, along x
};

// x (M, K) times the quantized matrix, out (M, N); M, N >= 1.
inline Launch plan(int64_t M, int64_t N, int64_t K, bool transpose) {
  if (M <= kGemvMaxRows) {
    if (transpose) {
      // 2 simdgroups of 4 output rows; qmv_fast runs whole 512-wide K blocks.
      const bool aligned = K % 512 == 0 && N % 8 == 0;
      return {aligned ? "qmv_fast" : "qmv", {M, ceil_div(N, 8), 1}, 64};
    }
    return {"qvm", {M, N / 32, 1}, 128}; // N is a multiple of the group size
  }
  return {transpose ? "qmm_t" : "qmm_n", {ceil_div(N, 32), ceil_div(M, 32), 1}, 128};
}

// The host name of a kernel: e.g. qmv_fast_float16_gs64_b4.
inline std::string kernel_name(const Launch& launch, const char* type_name, int group_size,
    int bits) {
  return std::string(launch.kernel) + "_" + type_name + "_gs" + std::to_string(group_size) +
      "_b" + std::to_string(bits);
}

// The fp modes (mxfp4, nvfp4, mxfp8): their own GEMVs (fp_qmv on qmv's grid,
// fp_qvm one simdgroup per 32 output columns) and the tiled GEMMs.
inline Launch plan_fp(int64_t M, int64_t N, int64_t K, bool transpose) {
  (void)K;
  if (M <= kGemvMaxRows) {
    if (transpose) return {"fp_qmv", {M, ceil_div(N, 8), 1}, 64};
    return {"fp_qvm", {M, ceil_div(N, 32), 1}, 32};
  }
  return {transpose ? "qmm_t" : "qmm_n", {ceil_div(N, 32), ceil_div(M, 32), 1}, 128};
}

// The host name of an fp-mode kernel: e.g. fp_qmv_float16_mxfp4.
inline std::string fp_kernel_name(const Launch& launch, const char* type_name, const char* mode_name) {
  return std::string(launch.kernel) + "_" + type_name + "_" + mode_name;
}

} // namespace mlx_ext::metal::qmm_plan
