// Which Metal kernel of metal/sparse_matmul.metal runs a sparse matmul or a
// sampled product, and on what grid. Pure C++ (no MLX, no Metal) so that the
// emulator tests call it too (tests/metal_harness.py, Planner): one
// definition of the plan.
#pragma once

#include <cstdint>
#include <string>

#include "common/math.h"

namespace mlx_ext::metal::sparse_plan {

// Formats as SparseFormat (sparse_matmul.h) numbers them.
enum Format : int { csr = 0, bitmask = 1, bsr = 2, nm = 3 };

// At most this many rows of x take the decode kernels (sp_mv_*), which
// stream the stored values once for up to 8 rows; more take the tiled
// kernels (sp_mm_t_*). CSR has no tiled kernel: its gather kernel runs every
// M in steps of 8 rows. Not tuned on hardware.
constexpr int64_t kDecodeMaxRows = 8;
// CSR decode with long rows (on average at least kLongRowValues stored
// values) takes balanced slices of kSliceValues stored values per simdgroup
// (sp_mv_split_csr, then sp_split_fixup for the rows across slices) instead
// of a simdgroup per row, so that a few long rows do not leave most of the
// GPU idle. Prefill keeps a simdgroup per row: its ceil(M / 8) passes give
// the GPU work enough, and the slices' scratch would grow with M.
// The kernels get kSliceValues in SpmmShape. Not tuned on hardware.
constexpr int64_t kLongRowValues = 256;
constexpr int64_t kSliceValues = 256;

struct Launch {
  const char* kernel; // mv, mv_split, split_fixup, mm_t, mm_n, sampled
  int64_t groups[3]; // threadgroups per grid dimension
  int threads; // threads per threadgroup, along x
};

// The slices of sp_mv_split_csr (at least one, also with nothing stored).
inline int64_t split_slices(int64_t stored) {
  return stored > 0 ? ceil_div(stored, kSliceValues) : 1;
}

// Floats of sp_mv_split_csr's scratch: (ceil(M / 8), slices, 2, 8).
inline int64_t split_partials(int64_t M, int64_t stored) {
  return ceil_div(M, kDecodeMaxRows) * split_slices(stored) * 2 * kDecodeMaxRows;
}

// out = x W^T (transpose; x (M, K)) or x W (x (M, N)) for W (N, K) holding
// `stored` values; M, N, K >= 1.
inline Launch plan(Format format, int64_t M, int64_t N, int64_t K, int64_t stored, bool transpose) {
  if (!transpose) return {"mm_n", {ceil_div(K, 32), ceil_div(M, 32), 1}, 128};
  if (format == csr) {
    if (M <= kDecodeMaxRows && stored >= kLongRowValues * N)
      return {"mv_split", {ceil_div(split_slices(stored), 4), ceil_div(M, kDecodeMaxRows), 1}, 128};
    return {"mv", {ceil_div(N, 4), ceil_div(M, kDecodeMaxRows), 1}, 128};
  }
  if (M <= kDecodeMaxRows) return {"mv", {ceil_div(N, 4), 1, 1}, 128};
  return {"mm_t", {ceil_div(N, 32), ceil_div(M, 32), 1}, 128};
}

// After mv_split: a thread per row of W, per step of 8 rows of x.
inline Launch plan_split_fixup(int64_t M, int64_t N) {
  return {"split_fixup", {ceil_div(N, 128), ceil_div(M, kDecodeMaxRows), 1}, 128};
}

// The host name of the fix-up: e.g. sp_split_fixup_float16.
inline std::string split_fixup_name(const char* type_name) {
  return std::string("sp_split_fixup_") + type_name;
}

// dvalues of the stored values: one simdgroup per row of W.
inline Launch plan_sampled(int64_t N) {
  return {"sampled", {ceil_div(N, 4), 1, 1}, 128};
}

// The format part of a host name: csr_u16 / csr_u32 (column index type),
// bitmask, bsr, nm, nm_b4_gs64 (quantized values).
inline std::string format_name(Format format, bool wide_columns, int bits, int group_size) {
  switch (format) {
    case csr: return wide_columns ? "csr_u32" : "csr_u16";
    case bitmask: return "bitmask";
    case bsr: return "bsr";
    default:
      return bits ? "nm_b" + std::to_string(bits) + "_gs" + std::to_string(group_size) : "nm";
  }
}

// The host name of a product's kernel: e.g. sp_mv_csr_u16_float32_float16
// (output and x float32, values float16).
inline std::string kernel_name(const Launch& launch, const std::string& format, const char* type_name,
    const char* value_type_name) {
  return std::string("sp_") + launch.kernel + "_" + format + "_" + type_name + "_" + value_type_name;
}

// The host name of a sampled product's kernel: e.g. sp_sampled_bsr_bfloat16.
inline std::string sampled_kernel_name(const std::string& format, const char* value_type_name) {
  return "sp_sampled_" + format + "_" + value_type_name;
}

} // namespace mlx_ext::metal::sparse_plan
