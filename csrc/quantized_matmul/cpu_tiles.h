// What the affine kernels (cpu_kernels.cpp) and the fp-mode kernels
// (cpu_fp_kernels.cpp) share, per ISA: the 32-value block every packed row is
// read in, the GEMV's row blocking, and the blocked GEMM's geometry and
// micro-kernel (both GEMMs run on x packed once by the driver, cpu_driver.cpp,
// to the one GemmPlan both tables report).
#pragma once

#include <type_traits>

#include "common/cpu/gemm_tile.h" // kMR, kNR, micro_kernel
#include "common/cpu/simd.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {
namespace {

constexpr int kBlock = 32;
constexpr int kVecsPerBlock = kBlock / kWidth;

#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_neon)
constexpr int kQmvRows = 8; // 32 vector registers
#else
constexpr int kQmvRows = 4;
#endif

// Calls f(rows, m) over the rows of x in blocks of kQmvRows, then 4, 2, 1, so
// that every block runs with its row count known at compile time.
template <typename F>
MLX_EXT_INLINE void for_row_blocks(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + kQmvRows <= M; m += kQmvRows) f(std::integral_constant<int, kQmvRows>{}, m);
  if constexpr (kQmvRows > 4)
    if (m + 4 <= M) f(std::integral_constant<int, 4>{}, m), m += 4;
  if (m + 2 <= M) f(std::integral_constant<int, 2>{}, m), m += 2;
  if (m < M) f(std::integral_constant<int, 1>{}, m);
}

constexpr int kKC = 256;
constexpr int kNC = 256;
static_assert(kNC % kNR == 0 && kNC % kBlock == 0 && kKC % 128 == 0, "bad GEMM plan");
static_assert(kBlock % kNR == 0 || kNR % kBlock == 0, "nr and the block must nest");

} // namespace
} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
