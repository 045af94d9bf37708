// gather_qmm's kernel for what the tensor-core kernels (gather_tc.cu) do not
// take: transpose=False (the vjp w.r.t. x runs it), float32 x, 3-, 5- and
// 6-bit W, K not a multiple of 128 / bits, unaligned rows. Exact float32
// arithmetic, one value of W at a time: correct everywhere, not fast.
//
// Thread: one output element (pair-row r = pair * M + m, column n; cuda_params.h).
// Block: 256 consecutive elements of out (P, M, N) row-major; no warp-level work.
// A pair whose index is out of range reads nothing and writes NaN.
#include "common/cuda/device.cuh"
#include "gather_qmm/cuda_params.h"

namespace mlx_ext::cuda {
namespace {

// sum_k x[k] * dequantize(W)[n, k] (transpose) or [k, n], W one expert's
// matrix (rows, packed) and its scales / biases (rows, groups).
template <typename T>
__device__ __forceinline__ float dot_one(const GatherParams& p, const T* x, const uint32_t* w, const T* scales,
                                         const T* biases, int n, bool transpose) {
  const int K = p.K, bits = p.bits;
  const int cols = transpose ? K : p.N;
  const int G = cols / p.group_size;
  const int64_t row_words = int64_t(cols) * bits / 32;
  const uint32_t mask = (1u << bits) - 1;
  float acc = 0.0f;
  for (int k = 0; k < K; ++k) {
    const int64_t row = transpose ? n : k;
    const int col = transpose ? k : n;
    const uint32_t* words = w + row * row_words;
    const int bit = col * bits, word = bit / 32, shift = bit % 32;
    uint32_t q = words[word] >> shift;
    if (shift + bits > 32) q |= words[word + 1] << (32 - shift);
    const int64_t g = row * G + col / p.group_size;
    acc = fmaf(to_float(x[k]), fmaf(to_float(scales[g]), float(q & mask), to_float(biases[g])), acc);
  }
  return acc;
}

template <typename T, int STACKS>
__device__ __forceinline__ void gather_generic(const GatherParams& p, bool transpose) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int M = p.M, N = p.N, K = p.K;
  if (idx >= p.P * M * N) return;
  const int64_t r = idx / N, pair = r / M;
  const int n = int(idx % N), m = int(r % M);
  T* out = static_cast<T*>(p.out);
  const uint32_t e = p.rhs[pair], l = p.lhs[pair];
  if (e >= uint32_t(p.E) || l >= uint32_t(p.X)) {
    out[idx] = from_float<T>(__int_as_float(0x7fc00000));
    return;
  }
  const int rows = transpose ? N : K, cols = transpose ? K : N;
  const int64_t w_stride = int64_t(rows) * cols * p.bits / 32, g_stride = int64_t(rows) * (cols / p.group_size);
  const T* x = static_cast<const T*>(p.x) + (int64_t(l) * M + m) * K;
  float v[STACKS];
#pragma unroll
  for (int s = 0; s < STACKS; ++s) {
    const uint32_t* w = (s ? p.w_up : p.w) + e * w_stride;
    const T* scales = static_cast<const T*>(s ? p.scales_up : p.scales) + e * g_stride;
    const T* biases = static_cast<const T*>(s ? p.biases_up : p.biases) + e * g_stride;
    v[s] = dot_one(p, x, w, scales, biases, n, transpose);
  }
  if constexpr (STACKS == 2) {
    // The products rounded to T first, as the CPU kernel and the unfused graph.
    const float g = to_float(from_float<T>(v[0])), u = to_float(from_float<T>(v[1]));
    out[idx] = from_float<T>(g / (1.0f + expf(-g)) * u);
  } else {
    if (p.bias) v[0] += to_float(static_cast<const T*>(p.bias)[(p.bias_per_expert ? int64_t(e) * N : 0) + n]);
    out[idx] = from_float<T>(v[0]);
  }
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::GatherParams;

// Names (cuda_plan.h): gather_generic_t_<x type>[_swiglu], gather_generic_n_<x type>.
#define GATHER_GENERIC(T, NAME)                                                                      \
  extern "C" __global__ void __launch_bounds__(256) gather_generic_t_##NAME(const GatherParams p) {   \
    mlx_ext::cuda::gather_generic<T, 1>(p, true);                                                    \
  }                                                                                                  \
  extern "C" __global__ void __launch_bounds__(256) gather_generic_t_##NAME##_swiglu(                \
      const GatherParams p) {                                                                        \
    mlx_ext::cuda::gather_generic<T, 2>(p, true);                                                    \
  }                                                                                                  \
  extern "C" __global__ void __launch_bounds__(256) gather_generic_n_##NAME(const GatherParams p) {   \
    mlx_ext::cuda::gather_generic<T, 1>(p, false);                                                   \
  }
GATHER_GENERIC(float, float32)
GATHER_GENERIC(f16, float16)
GATHER_GENERIC(bf16, bfloat16)
