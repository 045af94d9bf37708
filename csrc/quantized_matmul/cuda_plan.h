// Which CUDA kernels run a quantized matmul, on what grids: the choice
// cuda.cpp's eval_gpu makes, as plain C++ (no MLX or CUDA types) so that
// tests/test_cuda_plan.py checks it on machines without a GPU. cuda.cpp fills
// the kernels' parameters (cuda_params.h) and launches what the plan says.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "common/cuda/kernel_launch.h"
#include "common/math.h"
#include "quantized_matmul/cuda_params.h"

namespace mlx_ext::cuda::qmm_plan {

// mma.sync with bfloat16 and cp.async: the kernels need Ampere or newer.
constexpr int kMinComputeCapability = 8;
// The tensor-core GEMV (qmv_tc) takes up to 8 rows of x in one m16n8k16 B
// fragment per block (2-, 4- and 8-bit W), up to 16 or 32 rows in blocks of
// 2 or 4 such tiles (4- and 8-bit W, dequantized once for all of them;
// 64-row blocks were slower than 32-row ones, bench/cuda/quantized_matmul.cu).
constexpr int kQmvTcTileRows = 8;
constexpr int kQmvTcMidRows = 16;
constexpr int kQmvTcMaxRows = 32;
// The Hopper GEMM's tiles are 256 rows of x: it takes over from the GEMVs and
// the mma.sync GEMM's small tile only above this many rows.
constexpr int64_t kWgmmaMinRows = 64;
// The CUDA-core GEMV (qmv_t) reads W once per tile of kQmvTTileRows rows of
// x (or of one row): it takes up to one tile where the mma.sync GEMM could
// take the problem too, and more rows only where the GEMM cannot (K % 128).
constexpr int64_t kQmvTMaxRows = 8;
constexpr int kQmvTTileRows = 8;
// The mma.sync GEMM's small tile (TcSmall, 32 rows) up to this many rows of
// its x (3 M for float32 x), the large one (TcLarge, 128 rows) above.
constexpr int64_t kTcSmallMaxRows = 64;
// qmv_n: when its columns and rows give too few blocks to fill the GPU, K is
// cut into slices (float partials, summed by reduce_partials) until there are
// about kFillBlocks blocks; at most kMaxKSplit slices, which bounds the
// partials' scratch (k_split M N floats), and at least kMinKPerSlice rows of
// W per slice, so that a slice sums some k before it writes all its partials.
constexpr int64_t kFillBlocks = 1024;
constexpr int64_t kMaxKSplit = 64;
constexpr int kMinKPerSlice = 16;
// Rows of x per tile of qmv_n (1, 2, or this many).
constexpr int kQmvNMaxTileRows = 4;
// Kernels with one thread per element (generic, prep, reduce): 256 per block.
constexpr int kElementThreads = 256;
constexpr int kWarp = 32; // qmm_prep_x: one warp per (group, row) sum
// The prep kernels' outputs have rows of a multiple of 4 floats: the GEMM
// copies them 16 bytes at a time.
constexpr int kPad = 4;

struct Problem {
  int64_t M; // rows of x and out
  int N, K; // out is (M, N), x is (M, K)
  int bits, group_size;
  bool transpose; // W is (N, K) (out = x W^T), else (K, N)
  std::string dtype; // of x and out, as common/kernel_names.h spells it
  bool x_aligned, w_aligned; // data pointers 16-byte aligned
};

struct Gpu {
  int cc_major, cc_minor; // compute capability
  bool wgmma_loaded; // the Hopper GEMM's kernels (the sm_90a image) are loaded
  bool wgmma_enabled; // MLX_EXT_CUDA_WGMMA is not "0"
};

enum class Path {
  qmv_tc, // tensor-core GEMV (transpose, float16 / bfloat16 x, 1-32 rows)
  wgmma, // Hopper GEMM (transpose, float16 / bfloat16 x, sm_90)
  qmv_t, // CUDA-core GEMV (transpose)
  tensor_core, // prep kernels + mma.sync GEMM (transpose, K % 128 == 0)
  generic_t, // one thread per element, any shape and alignment
  qmv_n, // transpose=False, K sliced when the grid is small
  generic_n, // transpose=False, any shape and alignment
  fp_t, // the fp modes (qmm_fp.cu), transpose: a warp per output element
  fp_n, // the fp modes, transpose=False: a thread per output element
};

struct Plan {
  Path path;
  KernelLaunch main; // the GEMV, GEMM or generic kernel
  int k_split = 1; // qmv_n: slices of K (QmmParams::k_split)
  // > 1: `main` writes `parts` float slices (parts, M, N) to a scratch buffer
  // and `reduce` (reduce_partials) sums them into out, adding the bias.
  int parts = 1;
  KernelLaunch reduce;
  // tensor_core: the prep kernels, then the GEMM on gemm_rows rows of x (3 M
  // bfloat16 planes for float32 x, whose three partial products `reduce`
  // sums); the prep outputs' rows padded to n_pad and m_pad floats.
  KernelLaunch prep_scales, prep_x;
  int64_t gemm_rows = 0;
  int n_pad = 0, m_pad = 0;
};

inline std::string wgmma_kernel(const std::string& dtype, int bits) {
  return "qmm_t_wgmma_" + dtype + "_b" + std::to_string(bits);
}

namespace detail {

inline Plan one_kernel(Path path, KernelLaunch main) {
  Plan plan;
  plan.path = path;
  plan.main = std::move(main);
  return plan;
}

inline KernelLaunch elementwise(std::string kernel, int64_t elements) {
  return {std::move(kernel), {ceil_div(elements, kElementThreads), 1, 1}, kElementThreads, 0};
}

// Rows of x per block of qmv_tc (8, 16 or 32), or 0 where it does not apply.
inline int qmv_tc_rows(int64_t M, int bits) {
  const bool four_or_eight = bits == 4 || bits == 8;
  if (M <= kQmvTcTileRows && (bits == 2 || four_or_eight)) return kQmvTcTileRows;
  if (M <= kQmvTcMaxRows && four_or_eight) return M <= kQmvTcMidRows ? kQmvTcMidRows : kQmvTcMaxRows;
  return 0;
}

inline Plan tensor_core(const Problem& pr) {
  Plan plan;
  plan.path = Path::tensor_core;
  const int64_t G = pr.K / pr.group_size;
  const bool planes = pr.dtype == "float32";
  plan.gemm_rows = planes ? 3 * pr.M : pr.M;
  plan.n_pad = int(round_up(pr.N, kPad));
  plan.m_pad = int(round_up(plan.gemm_rows, kPad));
  plan.prep_scales = elementwise("qmm_prep_scales_" + pr.dtype, G * plan.n_pad);
  plan.prep_x = elementwise("qmm_prep_x_" + pr.dtype, G * plan.m_pad * kWarp);
  const bool small = plan.gemm_rows <= kTcSmallMaxRows;
  const int bm = small ? TcSmall::BM : TcLarge::BM, bn = small ? TcSmall::BN : TcLarge::BN;
  plan.main = {"qmm_t_tc_" + (planes ? std::string("planes") : pr.dtype) + "_b" +
          std::to_string(pr.bits) + (small ? "_s" : "_l"),
      {ceil_div(pr.N, bn), ceil_div(plan.gemm_rows, bm), 1},
      small ? TcSmall::THREADS : TcLarge::THREADS, small ? TcSmall::SMEM : TcLarge::SMEM};
  if (planes) {
    plan.parts = 3;
    plan.reduce = elementwise("reduce_partials_" + pr.dtype, pr.M * pr.N);
  }
  return plan;
}

inline Plan transposed(const Problem& pr, const Gpu& gpu) {
  const int64_t M = pr.M;
  const int N = pr.N, K = pr.K, bits = pr.bits;
  const std::string suffix = pr.dtype + "_b" + std::to_string(bits);
  const bool aligned = pr.x_aligned && pr.w_aligned;
  // float16 / bfloat16 x: tensor-core kernels that round W to x's type as
  // MLX's do. float32 x: exact float32 kernels (the GEMM through planes).
  const bool half_x = pr.dtype != "float32";
  // (For one row of 8-bit W the CUDA-core GEMV is faster on an H200, 17.7 vs
  // 20.7 us at 14336 x 4096, but slower on an H100, 30.7 vs 22.0:
  // bench/cuda/quantized_matmul.cu.)
  const int tc_rows = qmv_tc_rows(M, bits);
  if (half_x && tc_rows && K > 0 && K % qmv_tc_k_multiple(bits) == 0 && aligned) {
    const std::string rows = tc_rows == kQmvTcTileRows ? "" : "_m" + std::to_string(tc_rows);
    return one_kernel(Path::qmv_tc,
        {"qmv_tc_" + suffix + rows, {ceil_div(N, QMV_TC_ROWS), ceil_div(M, tc_rows), 1},
            QMV_TC_THREADS, 0});
  }
  // wgmma exists only in the sm_90a target: compute capability 9.0 exactly.
  const bool sm90 = gpu.cc_major == 9 && gpu.cc_minor == 0;
  if (half_x && sm90 && M > kWgmmaMinRows && K > 0 && K % WG_BK == 0 && aligned &&
      gpu.wgmma_enabled && gpu.wgmma_loaded) {
    return one_kernel(Path::wgmma,
        {wgmma_kernel(pr.dtype, bits), {ceil_div(N, WG_BN), ceil_div(M, WG_BM), 1}, WG_THREADS,
            wg_smem_bytes(bits)});
  }
  const bool qmv_ok = K > 0 && K % qmv_t_values_per_chunk(bits) == 0 && aligned;
  const bool tc_ok = K > 0 && K % BK == 0 && aligned;
  // The grid check counts 8-row tiles even for one row: M is small then.
  if (qmv_ok && (M <= kQmvTMaxRows || !tc_ok) && ceil_div(M, kQmvTTileRows) <= kMaxGridYZ) {
    const int mt = M == 1 ? 1 : kQmvTTileRows;
    const int rows = QMV_T_WARPS * qmv_t_rows_per_warp(bits);
    return one_kernel(Path::qmv_t,
        {"qmv_t_" + suffix + "_m" + std::to_string(mt), {ceil_div(N, rows), ceil_div(M, mt), 1},
            QMV_T_WARPS * 32, 0});
  }
  if (tc_ok) return tensor_core(pr);
  return one_kernel(Path::generic_t, elementwise("qmm_generic_t_" + pr.dtype, M * N));
}

inline Plan not_transposed(const Problem& pr) {
  const int64_t M = pr.M;
  const int N = pr.N, K = pr.K;
  // The grid check counts 4-row tiles whatever the tile: M is small otherwise.
  if (!(K > 0 && pr.w_aligned && ceil_div(M, kQmvNMaxTileRows) <= kMaxGridYZ))
    return one_kernel(Path::generic_n, elementwise("qmm_generic_n_" + pr.dtype, M * N));
  const int mt = M <= 1 ? 1 : M <= 2 ? 2 : kQmvNMaxTileRows;
  // A thread takes 32 columns (one group), a block QMV_N_THREADS of them.
  const int64_t grid_x = ceil_div(N / 32, QMV_N_THREADS), grid_z = ceil_div(M, mt);
  Plan plan;
  plan.path = Path::qmv_n;
  plan.k_split = int(std::min<int64_t>(
      {ceil_div(kFillBlocks, grid_x * grid_z), kMaxKSplit, std::max(1, K / kMinKPerSlice)}));
  plan.main = {"qmv_n_" + pr.dtype + "_b" + std::to_string(pr.bits) + "_m" + std::to_string(mt),
      {grid_x, plan.k_split, grid_z}, QMV_N_THREADS, 0};
  if (plan.k_split > 1) {
    plan.parts = plan.k_split;
    plan.reduce = elementwise("reduce_partials_" + pr.dtype, M * N);
  }
  return plan;
}

} // namespace detail

// The kernels for x (M, K) times W, out (M, N); M, N >= 1, K a multiple of
// group_size, and a GPU of compute capability kMinComputeCapability or newer.
inline Plan plan(const Problem& problem, const Gpu& gpu) {
  return problem.transpose ? detail::transposed(problem, gpu) : detail::not_transposed(problem);
}

// The fp modes (mode_name "mxfp4", "nvfp4" or "mxfp8"; qmm_fp.cu): any
// shape, x of dtype; not tuned yet.
inline Plan plan_fp(int64_t M, int N, bool transpose, const std::string& dtype,
    const std::string& mode_name) {
  const std::string suffix = dtype + "_" + mode_name;
  if (transpose) // 8 warps per block, one output element each
    return detail::one_kernel(Path::fp_t,
        {"qmm_fp_t_" + suffix, {ceil_div(M * N, 8), 1, 1}, kElementThreads, 0});
  return detail::one_kernel(Path::fp_n, detail::elementwise("qmm_fp_n_" + suffix, M * N));
}

} // namespace mlx_ext::cuda::qmm_plan
