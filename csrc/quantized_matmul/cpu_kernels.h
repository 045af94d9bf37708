// The interface between the CPU driver (cpu_driver.cpp: the GEMV / GEMM
// choice, threads, packing of x) and the per-ISA kernels (cpu_kernels.cpp, compiled
// once per instruction set). Plain structs and function pointers only: no MLX
// or standard-library types cross this boundary.
#pragma once

#include <cstdint>

#include "common/cpu/float_type.h"
#include "common/cpu/isa.h"

namespace mlx_ext::cpu {

// One quantized matmul. The quantized matrix W is stored as MLX packs it:
// `rows` rows, each a little-endian bit stream of `cols` values of `bits` bits
// (uint32 words, low bits first), with scales/biases of shape
// (rows, cols / group_size). transpose=true: W is (N, K) and out = x W^T;
// transpose=false: W is (K, N) and out = x W. In the fp modes
// (common/fp_formats.h) scales are uint8 codes and biases is nullptr.
struct QmmArgs {
  const float* x; // (M, K) float32, row-major, contiguous
  const float* x_group_sums; // (M, K / group_size): sums of x over each group (qmv only)
  const float* x_prepared; // (M, K): x permuted and pre-scaled by qmv_prepare, or nullptr
  const uint8_t* w; // packed weights, bytes
  const void* scales; // of type `type`, or uint8 codes in the fp modes
  const void* biases; // nullptr in the fp modes
  const void* bias; // (N,) or nullptr
  void* out; // (M, N)
  FloatType type; // of scales, biases, bias and out (the op function casts them to one)
  int64_t M, N, K;
  int group_size;
  int bits;
  int mode; // QuantMode (common/fp_formats.h) as an int: 0 affine
};

// The blocked GEMM's packing geometry (BLIS-style): A (= x) is packed once per
// call into panels of mr rows, kc-deep; each task dequantizes a kc x nc block of
// W^T into panels of nr columns and runs the mr x nr micro-kernel over it.
struct GemmPlan {
  int mr, nr; // micro-kernel tile
  int kc; // depth of one packed block (a multiple of every group size)
  int nc; // width of one task's column block (a multiple of nr and of 32)
};

// x packed for the GEMM: for each K block kb and each panel p of mr rows,
// `a[(kb * panels + p) * mr * kc + k * mr + i] = x[p * mr + i, kb * kc + k]`,
// zero-padded past M.
struct PackedA {
  const float* a;
  int64_t panels;
};

struct KernelTable {
  const char* isa;
  GemmPlan plan;
  // Small M, transpose=true: writes x permuted for the fast bit widths into
  // x_prepared (M * K floats) and returns true, or returns false.
  bool (*qmv_prepare)(const QmmArgs&, float* x_prepared);
  // Small M, transpose=true: out[:, n0:n1].
  void (*qmv)(const QmmArgs&, int64_t n0, int64_t n1);
  // Small M, transpose=false: out[:, n0:n1]; n0 and n1 multiples of 32,
  // n1 - n0 <= qvm_cols.
  void (*qvm)(const QmmArgs&, int64_t n0, int64_t n1);
  // Large M: out[:, n0:n0 + plan.nc] over all of K (qmm_t: transpose=true,
  // qmm_n: transpose=false). `scratch` holds plan.kc * plan.nc floats for the
  // dequantized B block and then panels * mr * plan.nc floats for C.
  void (*qmm_t)(const QmmArgs&, const PackedA&, int64_t n0, float* scratch);
  void (*qmm_n)(const QmmArgs&, const PackedA&, int64_t n0, float* scratch);
  int64_t qvm_cols;
};

// Defined in cpu_kernels.cpp (affine) and cpu_fp_kernels.cpp (the fp modes:
// a.mode picks the format), once per ISA compiled in; selected by
// quantized_matmul_kernels_for(isa) / quantized_matmul_fp_kernels_for(isa).
// Both report the same GemmPlan (cpu_tiles.h).
MLX_EXT_PER_ISA(KernelTable, quantized_matmul_kernels)
MLX_EXT_PER_ISA(KernelTable, quantized_matmul_fp_kernels)

} // namespace mlx_ext::cpu
