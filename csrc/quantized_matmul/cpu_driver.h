// Runs one quantized matmul on the CPU: picks the GEMV or GEMM path, prepares
// what the kernels share (group sums and permuted x for the GEMV, packed x for
// the GEMM) and spreads output columns over the thread pool. Free of MLX types
// so that native tests can drive the kernels of any ISA directly.
#pragma once

#include <vector>

#include "quantized_matmul/cpu_kernels.h"

namespace mlx_ext::cpu {

// Below this many rows of x the weights are read once per kernel call
// straight from their packed form (GEMV); from here on, dequantizing tiles
// for the register-blocked GEMM is cheaper.
constexpr int64_t kGemmMinRows = 12;

// What every GEMV task reads besides W: x's group sums (affine mode: they
// meet the biases) and x permuted for the fast bit widths, stored in `sums`
// and `prepared` and pointed to by a.x_group_sums / a.x_prepared.
void prepare_qmv(const KernelTable& kernels, QmmArgs& a, std::vector<float>& sums, std::vector<float>& prepared);

// x packed for the GEMM (layout: cpu_kernels.h, PackedA), zero past M:
// packed_x_size floats in all; pack_x_panels fills panels [p0, p1).
int64_t packed_x_size(const KernelTable& kernels, const QmmArgs& a);
void pack_x_panels(const KernelTable& kernels, const QmmArgs& a, float* packed, int64_t p0, int64_t p1);

// `a` is complete but for the fields the driver fills (x_group_sums,
// x_prepared); a.x is float32 (M, K), contiguous.
void run_quantized_matmul(const KernelTable& kernels, QmmArgs a, bool transpose);

} // namespace mlx_ext::cpu
