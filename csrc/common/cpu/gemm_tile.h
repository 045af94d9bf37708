// The register-blocked GEMM micro-kernel shared by the CPU kernels that
// expand weights into dense panels of W^T (the quantized matmul's blocked GEMM,
// the sparse matmul's BSR prefill), per ISA (simd.h).
//
// Data layout: A is x packed in panels of kMR rows, k-major
// (A[k * kMR + i] = x[i, k]); B is kc x kNR of W^T, k-major
// (B[k * kNR + j] = W[j, k]); C is kMR x kNR, row stride ldc. Each step k
// loads kNV vectors of B, broadcasts kMR values of A and does kMR * kNV FMAs
// into accumulators that stay in registers for the whole tile.
#pragma once

#include "common/cpu/simd.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {
namespace {

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

// A kMR x (NV * kWidth) tile of C held in registers (NV <= kNV): BSR blocks
// narrower than kNR use NV = 1. Callers keep one on the stack across several
// update() calls (one per stored block) and store it once.
template <int NV = kNV>
struct AccTile {
  static constexpr int nr = NV * kWidth;
  VecF c[kMR][NV];

  MLX_EXT_INLINE void zero() {
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = mlx_ext::cpu::MLX_EXT_ISA_NS::zero();
  }
  MLX_EXT_INLINE void load_from(const float* C, int64_t ldc) {
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = load(C + i * ldc + v * kWidth);
  }
  MLX_EXT_INLINE void store_to(float* C, int64_t ldc) const {
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) store(C + i * ldc + v * kWidth, c[i][v]);
  }
  // += A (kc x kMR, k-major) * B (kc x nr, k-major).
  MLX_EXT_INLINE void update(const float* A, const float* B, int kc) {
    for (int k = 0; k < kc; ++k) {
      VecF b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = load(B + k * nr + v * kWidth);
#pragma GCC unroll 16
      for (int i = 0; i < kMR; ++i) {
        const VecF a = broadcast(A[k * kMR + i]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[i][v] = fma(a, b[v], c[i][v]);
      }
    }
  }
};

// C[0:kMR, 0:kNR] (row stride ldc) += A(kMR x kc, k-major) * B(kc x kNR, k-major).
MLX_EXT_INLINE void micro_kernel(const float* A, const float* B, float* C, int64_t ldc, int kc) {
  AccTile<> t;
  t.load_from(C, ldc);
  t.update(A, B, kc);
  t.store_to(C, ldc);
}

} // namespace
} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
