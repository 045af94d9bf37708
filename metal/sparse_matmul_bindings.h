// The binding table of metal/sparse_matmul.metal: buffer indices, function
// constants and the shape argument. The kernels, the host code
// (csrc/sparse_matmul/metal.cpp) and the emulator tests (which parse this
// file) all bind through it. Valid MSL and C++.
#pragma once

// Buffers. W is (N, K), stored as csrc/sparse_matmul/sparse_matmul.h lays out
// each format; V is the values' dtype (of scales and biases for quantized
// N:M), T the output dtype. The products (sp_mv, sp_mm_t, sp_mm_n):
#define SPMM_BUFFER_VALUES 0 // V: csr data, bitmask values, bsr data, nm values; uint32 w_q (quantized nm)
#define SPMM_BUFFER_SCALES 1 // V (N, K n / m / group_size): quantized nm only
#define SPMM_BUFFER_BIASES 2 // V, as scales: quantized nm only
#define SPMM_BUFFER_PATTERN 3 // csr columns (uint16 | uint32), bitmask words, bsr block columns, nm codes
#define SPMM_BUFFER_ROW_PTR 4 // int32: csr indptr, bitmask row_ptr, bsr indptr; unbound for nm
#define SPMM_BUFFER_X 5 // T (M, K) for x W^T, (M, N) for x W; float32 (M, K) for sp_sampled
#define SPMM_BUFFER_OUT 6 // T (M, N) or (M, K); sp_sampled: V, the values' shape
#define SPMM_BUFFER_BIAS 7 // T (N,) or (K,), bound only when SPMM_FC_HAS_BIAS is true
#define SPMM_BUFFER_SHAPE 8 // SpmmShape
#define SPMM_BUFFER_G 9 // sp_sampled only: float32 (M, N), the output's cotangent
#define SPMM_BUFFER_PARTIALS 10 // sp_mv_split_csr, sp_split_fixup: float32 scratch,
                                // (ceil(M / 8), slices, 2, 8)

// Function constants, set when the pipeline is created.
#define SPMM_FC_HAS_BIAS 0 // bool: add bias in the epilogue (products only)

struct SpmmShape {
  int M; // rows of x and out
  int N; // rows of W
  int K; // columns of W
  int block_n; // bsr block shape (1 for other formats)
  int block_k;
  int n; // nm: n kept of every m (0 for other formats)
  int m;
  int slice_values; // sp_mv_split_csr's slice (metal_plan.h's kSliceValues)
};
