// Runs one sparse matmul or sampled product on the CPU: packs x into panels,
// splits the rows of W over the thread pool balanced by stored values, and
// for out = x W (the x-gradient) first transposes the pattern. Free of MLX
// types so that native tests can drive the kernels of any ISA directly.
#pragma once

#include "sparse_matmul/cpu_kernels.h"

namespace mlx_ext::cpu {

// out = x W^T (transpose) or x W; x float32 (M, K) or (M, N), contiguous.
void run_sparse_matmul(const SparseKernelTable& kernels, const SparseW& w, const float* x,
    int64_t M, const SparseOut& out, bool transpose);

// dvalues[j] = sum_m g[m, row_j] x[m, col_j]; g (M, N), x (M, K) float32.
void run_sparse_sampled(const SparseKernelTable& kernels, const SparseW& w, const float* g,
    const float* x, int64_t M, void* dvalues);

} // namespace mlx_ext::cpu
