// Runs one quantized matmul on the CPU: picks the GEMV or GEMM path, prepares
// what the kernels share (group sums and permuted x for the GEMV, packed x for
// the GEMM) and spreads output columns over the thread pool. Free of MLX types
// so that native tests can drive the kernels of any ISA directly.
#pragma once

#include "quantized_matmul/cpu_kernels.h"

namespace mlx_ext::cpu {

// `a` is complete but for the fields the driver fills (x_group_sums,
// x_prepared); a.x is float32 (M, K), contiguous.
void run_quantized_matmul(const KernelTable& kernels, QmmArgs a, bool transpose);

} // namespace mlx_ext::cpu
