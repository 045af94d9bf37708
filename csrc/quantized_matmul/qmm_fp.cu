// CUDA kernels of the quantized matmul for MLX's fp modes (mxfp4, nvfp4,
// mxfp8; common/fp_formats.h: codes packed little-endian in each row, uint8
// group scales, no biases), exact float32 arithmetic for every activation
// type. Correct for every shape MLX accepts; not tuned (no tensor cores).
#include "common/cuda/device.cuh"
#include "common/fp_formats.h"
#include "quantized_matmul/cuda_params.h"

namespace mlx_ext::cuda {
namespace {

template <int MODE>
struct Fp {
  static constexpr QuantMode mode = QuantMode(MODE);
  static constexpr int bits = mode_spec(mode).bits;
  static constexpr int group = mode_spec(mode).group_size;
  __device__ static float value(uint32_t code) {
    return bits == 8 ? e4m3_to_float(uint8_t(code)) : e2m1_to_float(uint8_t(code));
  }
  __device__ static float scale(uint8_t code) { return fp_scale_to_float(mode, code); }
};

// transpose=True, out[m, n] = sum_g s[n, g] * sum_{k in g} value(w[n, k]) x[m, k].
// Warp: one output element; lane l takes runs of 16 consecutive k (K is a
//   multiple of 16, so no run is cut and each lies in one group) every 512,
//   and the lanes' sums meet in shuffles.
// Block: 8 warps, 8 consecutive elements of out (row-major).
template <typename T, int MODE>
__device__ __forceinline__ void qmm_fp_t(const QmmParams& p) {
  using F = Fp<MODE>;
  constexpr int run = 16, run_bytes = run * F::bits / 8;
  const int64_t idx = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (idx >= p.M * p.N) return; // the whole warp
  const int64_t m = idx / p.N;
  const int n = int(idx % p.N), K = p.K;
  const T* x = static_cast<const T*>(p.x) + m * K;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(p.w) + int64_t(n) * K * F::bits / 8;
  const uint8_t* scales = static_cast<const uint8_t*>(p.scales) + int64_t(n) * (K / F::group);
  float acc = 0.0f;
  for (int k = lane * run; k < K; k += 32 * run) {
    uint8_t bytes[run_bytes];
#pragma unroll
    for (int i = 0; i < run_bytes; ++i) bytes[i] = w[k * F::bits / 8 + i];
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < run; ++j) {
      const uint32_t code = F::bits == 8 ? bytes[j] : (bytes[j / 2] >> (4 * (j % 2))) & 15;
      dot = fmaf(F::value(code), to_float(x[k + j]), dot);
    }
    acc = fmaf(dot, F::scale(scales[k / F::group]), acc);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) {
    if (p.bias) acc += to_float(static_cast<const T*>(p.bias)[n]);
    static_cast<T*>(p.out)[idx] = from_float<T>(acc);
  }
}

// transpose=False (W is (K, N), groups along N). Thread: one output element,
// over all of K; consecutive threads read consecutive codes of a row.
// Block: 256 consecutive elements of out (row-major); no warp-level work.
template <typename T, int MODE>
__device__ __forceinline__ void qmm_fp_n(const QmmParams& p) {
  using F = Fp<MODE>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.M * p.N) return;
  const int64_t m = idx / p.N;
  const int n = int(idx % p.N), N = p.N, K = p.K;
  const T* x = static_cast<const T*>(p.x) + m * K;
  const uint8_t* col = reinterpret_cast<const uint8_t*>(p.w) + int64_t(n) * F::bits / 8;
  const uint8_t* scales = static_cast<const uint8_t*>(p.scales) + n / F::group;
  const int64_t row_bytes = int64_t(N) * F::bits / 8;
  const int groups = N / F::group;
  const int shift = F::bits == 4 ? 4 * (n % 2) : 0;
  float acc = 0.0f;
  for (int k = 0; k < K; ++k) {
    const uint32_t code = (uint32_t(col[k * row_bytes]) >> shift) & ((1u << F::bits) - 1);
    acc = fmaf(to_float(x[k]), F::scale(scales[int64_t(k) * groups]) * F::value(code), acc);
  }
  if (p.bias) acc += to_float(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.out)[idx] = from_float<T>(acc);
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::QmmParams;

// Kernel names (chosen by cuda_plan.h, plan_fp): qmm_fp_<t|n>_<activation
// type, as MLX spells it>_<mode>.
#define QMM_FP(T, NAME, MODE_NAME, MODE)                                                           \
  extern "C" __global__ void __launch_bounds__(256) qmm_fp_t_##NAME##_##MODE_NAME(const QmmParams p) { \
    mlx_ext::cuda::qmm_fp_t<T, MODE>(p);                                                          \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(256) qmm_fp_n_##NAME##_##MODE_NAME(const QmmParams p) { \
    mlx_ext::cuda::qmm_fp_n<T, MODE>(p);                                                          \
  }
#define QMM_FP_MODES(T, NAME) QMM_FP(T, NAME, mxfp4, 1) QMM_FP(T, NAME, nvfp4, 2) QMM_FP(T, NAME, mxfp8, 3)

QMM_FP_MODES(float, float32)
QMM_FP_MODES(f16, float16)
QMM_FP_MODES(bf16, bfloat16)
