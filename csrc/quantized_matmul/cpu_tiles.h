// What the affine kernels (cpu_kernels.cpp) and the fp-mode kernels
// (cpu_fp_kernels.cpp) share, per ISA: the 32-value block every packed row is
// read in, the GEMV's row blocking, and the blocked GEMM's geometry and
// micro-kernel (both GEMMs run on x packed once by the driver, cpu_driver.cpp,
// to the one GemmPlan both tables report).
#pragma once

#include <type_traits>

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

#if defined(MLX_EXT_ISA_avx512)
constexpr int kMR = 12, kNV = 2; // 24 zmm accumulators
#elif defined(MLX_EXT_ISA_avx2)
constexpr int kMR = 6, kNV = 2; // 12 ymm accumulators
#elif defined(MLX_EXT_ISA_neon)
constexpr int kMR = 6, kNV = 4; // 24 q accumulators
#else
constexpr int kMR = 4, kNV = 2;
#endif
constexpr int kNR = kNV * kWidth;
constexpr int kKC = 256;
constexpr int kNC = 256;
static_assert(kNC % kNR == 0 && kNC % kBlock == 0 && kKC % 128 == 0, "bad GEMM plan");
static_assert(kBlock % kNR == 0 || kNR % kBlock == 0, "nr and the block must nest");

// C[0:MR, 0:NR] (row stride ldc) += A(MR x kc, k-major) * B(kc x NR, k-major).
MLX_EXT_INLINE void micro_kernel(const float* A, const float* B, float* C, int64_t ldc, int kc) {
  VecF c[kMR][kNV];
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) c[i][v] = load(C + i * ldc + v * kWidth);
  for (int k = 0; k < kc; ++k) {
    VecF b[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) b[v] = load(B + k * kNR + v * kWidth);
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      const VecF a = broadcast(A[k * kMR + i]);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) c[i][v] = fma(a, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) store(C + i * ldc + v * kWidth, c[i][v]);
}

} // namespace
} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
