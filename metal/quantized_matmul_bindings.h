// The binding table of metal/quantized_matmul.metal: buffer indices, function
// constants and the shape argument. The kernels, the host code
// (csrc/quantized_matmul/metal.cpp) and the emulator tests (which parse this
// file) all bind through it. Valid MSL and C++.
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

// Function constants, set when the pipeline is created.
#define QMM_FC_HAS_BIAS 0 // bool: add bias[n] in the epilogue

struct QmmShape {
  int M; // rows of x and out
  int N; // output features
  int K; // reduction length
};
