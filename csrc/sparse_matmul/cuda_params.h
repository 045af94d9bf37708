// The one argument of every CUDA kernel of the sparse matmul, filled by
// cuda.cpp (host, g++) and read by the kernels (*.cu, nvcc): plain C++ only,
// no MLX or CUDA types, so both compilers see the same layout.
#pragma once

#include <cstdint>

#include "common/math.h"

namespace mlx_ext::cuda {

// W (N, K) in one format (sparse_matmul.h lays the arrays out); every
// operand of the kernels' type T (float32, float16 or bfloat16: eval_gpu
// casts x, the values and bias to the output's dtype first), but g and x of
// the sampled product, float32.
struct SpParams {
  // The format's arrays.
  const void* values; // csr data, bitmask values, bsr data, nm values or w_q
  const void* scales; // quantized nm: (N, kc / group_size), type T
  const void* biases;
  const void* pattern; // csr indices (uint16 | uint32), bitmask mask, bsr block
                       // columns (int32), nm codes (uint32 words)
  const int32_t* row_ptr; // csr indptr, bitmask row_ptr, bsr indptr (per block row)
  int N, K;
  int block_n, block_k; // bsr
  int nm_n, nm_m, code_bits, bits, group_size; // nm
  int wide_columns; // csr: uint32 indices
  int vec; // the arrays allow the kernels' 16-byte loads (cuda_plan.h: vector_ok)
  // The operands.
  const void* x; // (M, K) for transpose, (M, N) otherwise
  const void* bias; // (N,) or (K,), or nullptr
  void* out; // (M, N) or (M, K); or float partials (slices, M, K)
  const float* g; // sampled product: g (M, N) and x (M, K) float32
  const float* xf;
  const int32_t* word_prefix; // bitmask: stored values of row n before mask word w (N, words)
  int64_t M;
  int slices; // transposed product: slices of N, each writing float partials when > 1
  int parts; // reduce: (parts, M, K) float partials summed into out
  int64_t stored; // stored values (the sampled product's threads)
};

// Decode kernels (spmv.cu): SPMV_WARPS warps per block, a warp per row of W
// at a time, over a contiguous range of rows (for CSR and Bitmask balanced by
// stored values); x of MT rows in shared memory as [K][MT] of T.
constexpr int SPMV_WARPS = 8;
constexpr int SPMV_THREADS = SPMV_WARPS * 32;
// x in a decode block's shared memory: column k (MT values of T, a "slot")
// at slot k + pad (k / 32). Lanes that each take 32 consecutive columns (a
// Bitmask word, a 2:4 code word) read columns 32 apart: without the pad
// those land in one bank.
constexpr MLX_EXT_HOST_DEVICE int spmv_pad_slots(int slot_bytes) {
  return slot_bytes >= 4 ? 1 : 4 / slot_bytes;
}
constexpr MLX_EXT_HOST_DEVICE int64_t spmv_x_bytes(int K, int slot_bytes) {
  return (int64_t(K) + ceil_div(K, 32) * spmv_pad_slots(slot_bytes)) * slot_bytes;
}

// Prefill kernels (spmm_tc.cu): 8 warps, out tiles of 128 rows of x by 128
// rows of W (block_n for BSR), steps of 32 columns of K.
constexpr int SPMM_TC_THREADS = 256;
constexpr int SPMM_TC_BM = 128, SPMM_TC_BN = 128, SPMM_TC_BK = 32;

// Transposed product and elementwise kernels: a thread per output column.
constexpr int SPN_THREADS = 256;

} // namespace mlx_ext::cuda
