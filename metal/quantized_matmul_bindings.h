// The binding table of metal/quantized_matmul.metal: buffer indices, function
// constants and the shape argument. The kernels, the host code
// (csrc/quantized_matmul/metal.cpp, csrc/gather_qmm/metal.cpp) and the
// emulator tests (which parse this file) all bind through it. Valid MSL and C++.
#pragma once

// Buffers. "rows" and "cols" are those of the quantized matrix: (N, K) when
// transpose, else (K, N); T is the output dtype.
#define QMM_BUFFER_W 0 // uint32 (rows, cols * bits / 32), MLX's packing
#define QMM_BUFFER_SCALES 1 // T (rows, cols / group_size); uint8 codes in the fp modes
#define QMM_BUFFER_BIASES 2 // T (rows, cols / group_size); affine only
#define QMM_BUFFER_X 3 // T (M, K), contiguous
#define QMM_BUFFER_OUT 4 // T (M, N)
#define QMM_BUFFER_BIAS 5 // T (N,), bound only when QMM_FC_HAS_BIAS is true
#define QMM_BUFFER_SHAPE 6 // QmmShape
// Gather launches only (QMM_FC_GATHER true; mlx_ext.gather_qmm): pair p of
// the grid's z dimension reads x[lhs[p]] and expert rhs[p]. x is then
// (X, M, K), w, scales and biases (E, rows, ...), bias (E, N) or (N,), out
// (P, M, N).
#define QMM_BUFFER_LHS 7 // uint32 (P,)
#define QMM_BUFFER_RHS 8 // uint32 (P,)

// Function constants, set when the pipeline is created.
#define QMM_FC_HAS_BIAS 0 // bool: add bias[n] in the epilogue
#define QMM_FC_GATHER 1 // bool: one (row, expert) pair per grid z (QMM_BUFFER_LHS/RHS)

struct QmmShape {
  int M; // rows of x and out
  int N; // output features
  int K; // reduction length
  // Gather launches only (0 otherwise): the number of matrices of x and of
  // experts (indices at or past them are out of range), and the elements of
  // one matrix of x (M K), one expert's w (uint32 words), one expert's scales
  // or biases, and one expert's bias row (N, or 0 for a shared (N,) bias).
  int X;
  int E;
  int x_stride;
  int w_stride;
  int group_stride;
  int bias_stride;
};
