// Which CUDA kernels run a sparse matmul, on what grids: the choice cuda.cpp's
// eval_gpu makes, as plain C++ (no MLX or CUDA types) so that
// tests/test_cuda_plan_sparse.py checks it on machines without a GPU. cuda.cpp
// fills the kernels' parameters (cuda_params.h) and launches what the plan says.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/cuda/kernel_launch.h"
#include "common/math.h"
#include "sparse_matmul/cuda_params.h"

namespace mlx_ext::cuda::sparse_plan {

// bfloat16 loads and the kernels' shuffles: Ampere or newer (as the quantized matmul's).
constexpr int kMinComputeCapability = 8;
// The decode kernels' x rows per block (MT): 1 row, up to 4, or tiles of 16.
constexpr int kRowsSmall = 4, kRowsLarge = 16;
// x in shared memory (spmv_x_bytes: K slots of MT values of T, padded) up to
// this many bytes per block: 16 rows of K = 4096 in 16-bit types, one block
// per multiprocessor then (228 KB on Hopper; an A100's 164 KB hold one too).
constexpr int kXSmemMax = 140 * 1024;
constexpr int kSmemPerSm = 160 * 1024; // what an sm_80 multiprocessor offers, the smaller
// Decode blocks per multiprocessor (of SPMV_WARPS warps each): enough warps
// in flight to keep W's loads streaming, few enough that x is copied into
// shared memory only a few times per multiprocessor.
constexpr int kSpmvBlocksPerSm = 4;
// Transposed product (spmm_n): N is cut into slices (float partials, summed by
// reduce_partials) until there are about kFillBlocks blocks; at most
// kMaxSlices, and at least kMinRowsPerSlice rows of W each.
constexpr int64_t kFillBlocks = 1024;
constexpr int64_t kMaxSlices = 64;
constexpr int kMinRowsPerSlice = 16;
constexpr int kSpnRowsMany = 8; // rows of x per thread of spmm_n beyond one
// The tensor-core prefill kernels (spmm_tc) above this many rows of x: below,
// the decode kernels read W once per 16 rows and are bound by that read.
constexpr int64_t kTcMinRows = 32;

enum class Format { csr, bitmask, bsr, nm };
enum class Path { spmv, spmm_tc, spmm_n, sampled };

struct Problem {
  Format format;
  int64_t M; // rows of x
  int N, K; // W is (N, K)
  std::string dtype; // of x, the values and out (common/kernel_names.h spelling)
  int dtype_bytes;
  int block_n = 1, block_k = 1; // bsr
  int nm_n = 0, nm_m = 0, bits = 0; // nm; bits > 0: quantized values
  bool values_aligned = true, pattern_aligned = true, x_aligned = true; // data pointers 16-byte aligned
  bool transpose = true; // out = x W^T (else x W)
};

struct Gpu {
  int cc_major, cc_minor;
  int sm_count; // multiprocessors
  bool tc_enabled = true; // MLX_EXT_CUDA_SPARSE_TC is not "0" (cuda.cpp)
};

struct Plan {
  Path path;
  KernelLaunch main;
  int vec = 0; // SpParams::vec
  int slices = 1; // spmm_n: > 1 writes float partials that `reduce` sums
  KernelLaunch reduce;
  KernelLaunch prep; // bitmask_prefix into a scratch of N * words int32, when named
  int64_t x_rows = 1; // rows of x per block (spmv) or per thread (spmm_n)
};

// The kernel-name part of the format: csr, bitmask, bsr, nm4, nm8, nm4_q4, ...
inline std::string format_name(const Problem& pr) {
  switch (pr.format) {
    case Format::csr: return "csr";
    case Format::bitmask: return "bitmask";
    case Format::bsr: return "bsr";
    case Format::nm: break;
  }
  return "nm" + std::to_string(pr.nm_m) + (pr.bits ? "_q" + std::to_string(pr.bits) : "");
}

// Whether the decode kernels may use 16-byte loads on the format's arrays.
inline bool vector_ok(const Problem& pr) {
  switch (pr.format) {
    case Format::csr: return pr.values_aligned && pr.pattern_aligned;
    case Format::bitmask: return false;
    case Format::bsr: return pr.values_aligned && pr.block_k % 8 == 0;
    case Format::nm: {
      const int64_t kc = int64_t(pr.K) / pr.nm_m * pr.nm_n;
      const int per_word = pr.nm_m == 8 ? 8 : 16; // values per code word
      return pr.bits == 0 && pr.values_aligned && kc % per_word == 0;
    }
  }
  return false;
}

namespace detail {

inline KernelLaunch elementwise(std::string kernel, int64_t elements) {
  return {std::move(kernel), {std::max<int64_t>(1, ceil_div(elements, SPN_THREADS)), 1, 1}, SPN_THREADS, 0};
}

inline KernelLaunch bitmask_prep(const Problem& pr) {
  return pr.format == Format::bitmask ? elementwise("bitmask_prefix", pr.N) : KernelLaunch{};
}

inline Plan spmv(const Problem& pr, const Gpu& gpu) {
  Plan plan;
  plan.path = Path::spmv;
  plan.vec = vector_ok(pr);
  int mt = pr.M <= 1 ? 1 : pr.M <= kRowsSmall ? kRowsSmall : kRowsLarge;
  while (mt > 1 && spmv_x_bytes(pr.K, mt * pr.dtype_bytes) > kXSmemMax) mt = mt == kRowsLarge ? kRowsSmall : 1;
  const int64_t smem = spmv_x_bytes(pr.K, mt * pr.dtype_bytes);
  const bool in_smem = smem <= kXSmemMax;
  const int per_sm = in_smem ? int(std::clamp<int64_t>(kSmemPerSm / (smem + 1024), 1, kSpmvBlocksPerSm))
                             : kSpmvBlocksPerSm;
  const int64_t blocks = std::min<int64_t>(ceil_div(pr.N, SPMV_WARPS), int64_t(gpu.sm_count) * per_sm);
  plan.x_rows = mt;
  plan.main = {"spmv_" + format_name(pr) + "_" + pr.dtype + "_m" + std::to_string(mt) + (in_smem ? "" : "_xg"),
      {std::max<int64_t>(1, blocks), std::min(ceil_div(pr.M, mt), kMaxGridYZ), 1}, SPMV_THREADS,
      in_smem ? int(smem) : 0};
  return plan;
}

// The prefill kernel's format name, or "" where spmm_tc does not take the problem.
inline std::string tc_format(const Problem& pr) {
  if (pr.dtype == "float32" || pr.M <= kTcMinRows || pr.K % SPMM_TC_BK || !pr.x_aligned || !pr.values_aligned)
    return "";
  switch (pr.format) {
    case Format::csr: return "csr";
    case Format::bitmask: return "bitmask";
    case Format::bsr:
      if ((pr.block_n == 32 || pr.block_n == 64) && pr.block_k % SPMM_TC_BK == 0)
        return "bsr" + std::to_string(pr.block_n);
      return "";
    case Format::nm: return pr.nm_n == 2 && pr.nm_m == 4 && pr.bits == 0 ? "nm24" : "";
  }
  return "";
}

inline Plan spmm_tc(const Problem& pr, const std::string& name) {
  Plan plan;
  plan.path = Path::spmm_tc;
  const int bn = pr.format == Format::bsr ? pr.block_n : SPMM_TC_BN;
  plan.x_rows = SPMM_TC_BM;
  plan.main = {"spmm_tc_" + name + "_" + pr.dtype, {ceil_div(pr.N, bn), ceil_div(pr.M, SPMM_TC_BM), 1},
      SPMM_TC_THREADS, 0};
  return plan;
}

inline Plan spmm_n(const Problem& pr) {
  Plan plan;
  plan.path = Path::spmm_n;
  const int mt = pr.M <= 1 ? 1 : kSpnRowsMany;
  const int64_t grid_x = ceil_div(pr.K, SPN_THREADS), grid_z = std::min(ceil_div(pr.M, mt), kMaxGridYZ);
  plan.slices = int(std::min<int64_t>({std::max<int64_t>(1, ceil_div(kFillBlocks, grid_x * grid_z)), kMaxSlices,
      std::max(1, pr.N / kMinRowsPerSlice)}));
  plan.x_rows = mt;
  plan.main = {"spmm_n_" + format_name(pr) + "_" + pr.dtype + "_m" + std::to_string(mt),
      {grid_x, plan.slices, grid_z}, SPN_THREADS, 0};
  if (plan.slices > 1) plan.reduce = elementwise("reduce_partials_" + pr.dtype, pr.M * pr.K);
  plan.prep = bitmask_prep(pr);
  return plan;
}

} // namespace detail

// The decode and transposed-product kernels loop over tiles of x beyond
// CUDA's 65535 blocks along grid.y / grid.z; the prefill kernel's grid.y
// (M / 128) reaches that limit only past 8 million rows.

// The kernels for out = x W^T (transpose) or x W, x (M, K) or (M, N); M, N,
// K >= 1 and a GPU of compute capability kMinComputeCapability or newer.
inline Plan plan(const Problem& pr, const Gpu& gpu) {
  if (!pr.transpose) return detail::spmm_n(pr);
  const std::string tc = gpu.tc_enabled ? detail::tc_format(pr) : "";
  return tc.empty() ? detail::spmv(pr, gpu) : detail::spmm_tc(pr, tc);
}

// The sampled product dvalues (the values' gradient) over `stored` values of
// dtype pr.dtype (float values only); pr.M rows of g and x.
inline Plan plan_sampled(const Problem& pr, int64_t stored) {
  Plan plan;
  plan.path = Path::sampled;
  plan.main = detail::elementwise("sampled_" + format_name(pr) + "_" + pr.dtype, stored);
  plan.prep = detail::bitmask_prep(pr);
  return plan;
}

} // namespace mlx_ext::cuda::sparse_plan
