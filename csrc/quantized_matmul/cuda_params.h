// The one argument of every CUDA kernel of the quantized matmul, filled by
// cuda.cpp (host, g++) and read by the kernels (*.cu, nvcc): plain C++ only,
// no MLX or CUDA types, so both compilers see the same layout.
#pragma once

#include <cstdint>

#include "common/math.h"

namespace mlx_ext::cuda {

// W is stored as MLX packs it: `rows` rows, each a little-endian bit stream
// of `cols` values of `bits` bits (uint32 words), with scales and biases of
// shape (rows, cols / group_size). transpose: W is (N, K), out = x W^T;
// otherwise W is (K, N), out = x W.
struct QmmParams {
  const void* x; // (M, K) activations, row-major, in the kernel's type
  const uint32_t* w;
  const void* scales; // (rows, cols / group_size), the kernel's type
  const void* biases;
  const void* bias; // (N,) or nullptr
  void* out; // (M, N): the kernel's type, or float partial sums
  // Tensor-core GEMM only (written by the prep kernels): scales and biases
  // as float (K / group_size, n_pad) and the group sums of x (K / group_size, m_pad).
  const float* scales_t;
  const float* biases_t;
  const float* x_sums_t;
  void* x_planes; // prep output: float32 x split into 3 bfloat16 planes (3M, K)
  int64_t M;
  int N, K;
  int group_size;
  int bits;
  int n_pad, m_pad;
  int k_split; // qmv_n: slices of K; > 1 writes float partials (k_split, M, N)
  int parts; // reduce_partials: number of (M, N) float slices to add
};

// Rows of W per warp of qmv_t (qmv.cu): fewer for the bit widths whose
// 16-byte chunks take many registers.
constexpr MLX_EXT_HOST_DEVICE int qmv_t_loads(int bits) {
  return bits == 8 ? 2 : (bits == 3 || bits == 6) ? 3 : bits == 5 ? 5 : 1;
}
constexpr MLX_EXT_HOST_DEVICE int qmv_t_rows_per_warp(int bits) {
  return qmv_t_loads(bits) > 2 ? 2 : 4;
}
constexpr MLX_EXT_HOST_DEVICE int qmv_t_values_per_chunk(int bits) {
  return qmv_t_loads(bits) * 128 / bits;
}
constexpr int QMV_T_WARPS = 8;
constexpr int QMV_N_THREADS = 64;

// The tensor-core GEMV (qmv_tc.cu): QMV_TC_ROWS rows of W per block of
// QMV_TC_THREADS threads; 2-, 4- and 8-bit W with K a multiple of 4 lanes'
// 16-byte chunks, 512 / bits values.
constexpr int QMV_TC_ROWS = 16, QMV_TC_THREADS = 128;
constexpr MLX_EXT_HOST_DEVICE int qmv_tc_k_multiple(int bits) { return 512 / bits; }

// Tile shapes of the tensor-core GEMM (qmm_tc.cu): BM rows of x by BN rows
// of W per block, WM x WN warps, STAGES-deep pipeline of BK = 128 k.
constexpr int BK = 128; // a whole number of 16-byte pieces of W for every bit width
constexpr int MAX_GROUPS = BK / 32; // groups per stage at the smallest group size

template <int BM_, int BN_, int WM_, int WN_, int STAGES_>
struct TcConfig {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int THREADS = WM * WN * 32;
  static constexpr int FM = BM / WM / 16; // m16 tiles per warp (x rows, mma operand A)
  static constexpr int FN = BN / WN / 8; // n8 tiles per warp (W rows, mma operand B)
  static constexpr int PIECES = BN * (BK / 32) / THREADS; // 32-value pieces of W per thread per stage
  static constexpr int X_BYTES = BM * BK * 2;
  static constexpr int SB_FLOATS = MAX_GROUPS * BN; // scales (or biases) of one stage
  static constexpr int XS_FLOATS = MAX_GROUPS * BM;
  static constexpr int STAGE_BYTES = X_BYTES + 4 * (2 * SB_FLOATS + XS_FLOATS);
  static constexpr int Q_BYTES = BN * BK * 2;
  static constexpr int SMEM = STAGES * STAGE_BYTES + 2 * Q_BYTES;
  static_assert(FN % 2 == 0 && PIECES >= 1 && 8 % PIECES == 0, "tile shape");
};
using TcLarge = TcConfig<128, 128, 2, 4, 3>;
using TcSmall = TcConfig<32, 64, 1, 4, 4>;

// The Hopper GEMM (qmm_wgmma.cu, sm_90a): 256 x 128 tiles of out, k tiles of
// 64; a producer warpgroup and two consumer warpgroups; as many stages of x
// and packed W as fit in 227 KB (at most 8).
constexpr int WG_BM = 256, WG_BN = 128, WG_BK = 64, WG_THREADS = 384;
constexpr int WG_X_BYTES = WG_BM * WG_BK * 2; // one x stage, 16-bit values
constexpr MLX_EXT_HOST_DEVICE int wg_raw_stride(int bits) { // bytes per W row in a stage
  return bits == 8 ? 8 * bits + 16 : 8 * bits;
}
constexpr MLX_EXT_HOST_DEVICE int wg_stage_bytes(int bits) { return WG_X_BYTES + WG_BN * wg_raw_stride(bits); }
constexpr MLX_EXT_HOST_DEVICE int wg_stages(int bits) { // + 16: the stage's two mbarriers
  return (227 * 1024 - 1024) / (wg_stage_bytes(bits) + 16) < 8 ? (227 * 1024 - 1024) / (wg_stage_bytes(bits) + 16) : 8;
}
constexpr MLX_EXT_HOST_DEVICE int wg_smem_bytes(int bits) { // + 1024 to align the base
  return 1024 + wg_stages(bits) * (wg_stage_bytes(bits) + 16);
}

} // namespace mlx_ext::cuda
