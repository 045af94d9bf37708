// CUDA-core kernels of the quantized matmul, exact float32 arithmetic for
// every activation type: the GEMV for transpose=True (qmv_t), the kernel for
// transpose=False (qmv_n), the generic kernel for shapes and alignments the
// others do not take, and the sum of float partials (reduce_partials).
#include "common/cuda/affine.cuh"
#include "quantized_matmul/cuda_params.h"

namespace mlx_ext::cuda {
namespace {

// Per-bit-width geometry of the weight loads: each chunk is LOADS 16-byte
// loads holding VPT whole values (3-, 5- and 6-bit values never straddle two
// chunks), processed as sub-chunks of 32 values that each lie in one group.
template <int BITS>
struct Chunk {
  static constexpr int LOADS = qmv_t_loads(BITS);
  static constexpr int VPT = qmv_t_values_per_chunk(BITS);
  static constexpr int WORDS = LOADS * 4;
  static constexpr int SUBS = VPT / 32;
};

// transpose=True, out[m, n] = sum_g s[n, g] * sum_{k in g} q[n, k] x[m, k]
//                             + b[n, g] * sum_{k in g} x[m, k].
// Thread: R rows of W at a time over one chunk of Chunk<BITS>::VPT consecutive
//   k (LOADS 16-byte loads per row) against MT rows of x, dot products in float.
// Warp: those R rows; its lanes take every 32nd chunk along K and add their
//   partial sums with shuffles at the end.
// Block: 8 warps, 8 * R consecutive rows. grid.x covers N, grid.y M in tiles
// of MT (1, or 8 with the rows past M skipped). Needs K % VPT == 0 and w, x
// 16-byte aligned.
template <typename T, int BITS, int MT>
__device__ __forceinline__ void qmv_t(const QmmParams& p) {
  using C = Chunk<BITS>;
  constexpr int R = qmv_t_rows_per_warp(BITS);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = (blockIdx.x * QMV_T_WARPS + warp) * R;
  if (n0 >= p.N) return;
  const int64_t m0 = int64_t(blockIdx.y) * MT;
  const int mt = int(p.M - m0 < MT ? p.M - m0 : MT);
  const int K = p.K, G = K / p.group_size;
  const int gs_shift = __ffs(p.group_size) - 1; // group sizes are powers of two: no division in the loop
  const T* x = static_cast<const T*>(p.x) + m0 * K;
  const int64_t row_words = int64_t(K) * BITS / 32;
  int rows[R];
  const T *scales[R], *biases[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    rows[r] = min(n0 + r, p.N - 1); // past N: recompute, never store
    scales[r] = static_cast<const T*>(p.scales) + int64_t(rows[r]) * G;
    biases[r] = static_cast<const T*>(p.biases) + int64_t(rows[r]) * G;
  }

  float acc[R][MT] = {};
  const int chunks = K / C::VPT;
#pragma unroll 2
  for (int c = lane; c < chunks; c += 32) {
    uint32_t w[R][C::WORDS];
    float sc[R][C::SUBS], bi[R][C::SUBS];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t* src = p.w + rows[r] * row_words + int64_t(c) * C::WORDS;
#pragma unroll
      for (int l = 0; l < C::LOADS; ++l) {
        const uint4 v = load_stream16(src + 4 * l);
        w[r][4 * l] = v.x, w[r][4 * l + 1] = v.y, w[r][4 * l + 2] = v.z, w[r][4 * l + 3] = v.w;
      }
#pragma unroll
      for (int s = 0; s < C::SUBS; ++s) {
        const int g = (c * C::VPT + 32 * s) >> gs_shift;
        sc[r][s] = to_float(scales[r][g]);
        bi[r][s] = to_float(biases[r][g]);
      }
    }
#pragma unroll
    for (int s = 0; s < C::SUBS; ++s) {
      float dot[R][MT] = {}, xsum[MT] = {};
#pragma unroll
      for (int piece = 0; piece < 4; ++piece) {
        // The R rows' 8 values first, then one row of x at a time: few
        // registers for x, and each x value loaded once for all R rows.
        const int k = c * C::VPT + 32 * s + 8 * piece;
        float q[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) dequant8<BITS>(w[r], 32 * s + 8 * piece, q[r]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < mt) {
            float xv[8];
            load8(x + int64_t(m) * K + k, xv);
#pragma unroll
            for (int j = 0; j < 8; ++j) xsum[m] += xv[j];
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int j = 0; j < 8; ++j) dot[r][m] = fmaf(xv[j], q[r][j], dot[r][m]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m)
          acc[r][m] = fmaf(sc[r][s], dot[r][m], fmaf(bi[r][s], xsum[m], acc[r][m]));
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int off = 16; off > 0; off /= 2) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);
  if (lane != 0) return;
  T* out = static_cast<T*>(p.out) + m0 * p.N;
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = n0 + r;
    if (n >= p.N) break;
    const float add = bias ? to_float(bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < mt) out[int64_t(m) * p.N + n] = from_float<T>(acc[r][m] + add);
  }
}

// transpose=False, out[m, n] = sum_k x[m, k] s[k, g(n)] q[k, n] + x[m, k] b[k, g(n)].
// Thread: 32 consecutive columns n (one group) for MT rows of x over a slice
//   of K; x[m, k] * s folds the scale in once per row of W, and the bias term
//   x[m, k] * b is summed once for all 32 columns.
// Warp: 32 such pieces, 1024 consecutive columns. Block: 2 warps.
// grid.x covers N, grid.y the k_split slices of K, grid.z M in tiles of MT;
// with k_split > 1 each slice writes float partials for reduce_partials.
template <typename T, int BITS, int MT>
__device__ __forceinline__ void qmv_n(const QmmParams& p) {
  const int piece = blockIdx.x * blockDim.x + threadIdx.x;
  const int n0 = piece * 32;
  if (n0 >= p.N) return;
  const int64_t m0 = int64_t(blockIdx.z) * MT;
  const int mt = int(p.M - m0 < MT ? p.M - m0 : MT);
  const int K = p.K, N = p.N;
  const int slice = (K + p.k_split - 1) / p.k_split;
  const int k_begin = blockIdx.y * slice, k_end = min(K, k_begin + slice);
  const int G = N / p.group_size, g = n0 / p.group_size;
  const T* x = static_cast<const T*>(p.x) + m0 * K;
  const T* scales = static_cast<const T*>(p.scales);
  const T* biases = static_cast<const T*>(p.biases);
  const int64_t row_words = int64_t(N) * BITS / 32;

  float acc[MT][32] = {}, acc_bias[MT] = {};
#pragma unroll 2
  for (int k = k_begin; k < k_end; ++k) {
    uint32_t w[BITS];
    load_piece<BITS>(p.w + k * row_words + piece * BITS, w);
    const float s = to_float(scales[int64_t(k) * G + g]);
    const float b = to_float(biases[int64_t(k) * G + g]);
    float xs[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float xm = m < mt ? to_float(x[int64_t(m) * K + k]) : 0.0f;
      xs[m] = xm * s;
      acc_bias[m] = fmaf(xm, b, acc_bias[m]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float q[8];
      dequant8<BITS>(w, 8 * i, q);
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[m][8 * i + j] = fmaf(xs[m], q[j], acc[m][8 * i + j]);
    }
  }

  const bool partial = p.k_split > 1;
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= mt) break;
    const int64_t row = (m0 + m) * N + n0;
    if (partial) {
      float* out = static_cast<float*>(p.out) + blockIdx.y * p.M * N + row;
#pragma unroll
      for (int j = 0; j < 32; j += 4)
        *reinterpret_cast<float4*>(out + j) = make_float4(acc[m][j] + acc_bias[m],
            acc[m][j + 1] + acc_bias[m], acc[m][j + 2] + acc_bias[m], acc[m][j + 3] + acc_bias[m]);
    } else {
      T* out = static_cast<T*>(p.out) + row;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        out[j] = from_float<T>(acc[m][j] + acc_bias[m] + (bias ? to_float(bias[n0 + j]) : 0.0f));
    }
  }
}

// Any shape, alignment and bit width, both layouts, one value at a time; for
// problems the kernels above do not take. Thread: one output element.
// Block: 256 consecutive elements of out (row-major); no warp-level work.
template <typename T>
__device__ __forceinline__ void qmm_generic(const QmmParams& p, bool transpose) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.M * p.N) return;
  const int64_t m = idx / p.N;
  const int n = int(idx % p.N), K = p.K, bits = p.bits;
  const int cols = transpose ? K : p.N; // values per row of W
  const int G = cols / p.group_size;
  const int64_t row_words = int64_t(cols) * bits / 32;
  const T* x = static_cast<const T*>(p.x) + m * K;
  const T* scales = static_cast<const T*>(p.scales);
  const T* biases = static_cast<const T*>(p.biases);
  const uint32_t mask = (1u << bits) - 1;
  float acc = 0.0f;
  for (int k = 0; k < K; ++k) {
    const int64_t row = transpose ? n : k;
    const int col = transpose ? k : n;
    const uint32_t* words = p.w + row * row_words;
    const int bit = col * bits, word = bit / 32, shift = bit % 32;
    uint32_t q = words[word] >> shift;
    if (shift + bits > 32) q |= words[word + 1] << (32 - shift);
    const int64_t g = row * G + col / p.group_size;
    const float wv = fmaf(to_float(scales[g]), float(q & mask), to_float(biases[g]));
    acc = fmaf(to_float(x[k]), wv, acc);
  }
  if (p.bias) acc += to_float(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.out)[idx] = from_float<T>(acc);
}

// out[i] = sum over `parts` float slices (M, N) of partials[i] + bias[i % N].
// Thread: one output element. Block: 256 consecutive elements; no warp-level work.
template <typename T>
__device__ __forceinline__ void reduce_partials(const QmmParams& p) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t size = p.M * p.N;
  if (idx >= size) return;
  const float* partials = static_cast<const float*>(p.x);
  float acc = 0.0f;
  for (int i = 0; i < p.parts; ++i) acc += partials[i * size + idx];
  if (p.bias) acc += to_float(static_cast<const T*>(p.bias)[idx % p.N]);
  static_cast<T*>(p.out)[idx] = from_float<T>(acc);
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::QMV_N_THREADS;
using mlx_ext::cuda::QMV_T_WARPS;
using mlx_ext::cuda::QmmParams;

// Kernel names (chosen by cuda_plan.h): <kernel>_<activation type, as MLX
// spells it>_b<bits>_m<rows of x per tile>.
#define QMV_T(T, NAME, BITS, MT)                                                        \
  extern "C" __global__ void __launch_bounds__(QMV_T_WARPS * 32) qmv_t_##NAME##_b##BITS##_m##MT(   \
      const QmmParams p) {                                                               \
    mlx_ext::cuda::qmv_t<T, BITS, MT>(p);                                                \
  }
#define QMV_N(T, NAME, BITS, MT)                                                        \
  extern "C" __global__ void __launch_bounds__(QMV_N_THREADS) qmv_n_##NAME##_b##BITS##_m##MT(     \
      const QmmParams p) {                                                               \
    mlx_ext::cuda::qmv_n<T, BITS, MT>(p);                                                \
  }
#define QMV_ALL_M(T, NAME, BITS) \
  QMV_T(T, NAME, BITS, 1) QMV_T(T, NAME, BITS, 8) \
  QMV_N(T, NAME, BITS, 1) QMV_N(T, NAME, BITS, 2) QMV_N(T, NAME, BITS, 4)
#define QMV_ALL_BITS(T, NAME) \
  QMV_ALL_M(T, NAME, 2) QMV_ALL_M(T, NAME, 3) QMV_ALL_M(T, NAME, 4) \
  QMV_ALL_M(T, NAME, 5) QMV_ALL_M(T, NAME, 6) QMV_ALL_M(T, NAME, 8)
#define PER_TYPE(T, NAME)                                                                  \
  QMV_ALL_BITS(T, NAME)                                                                    \
  extern "C" __global__ void __launch_bounds__(256) qmm_generic_t_##NAME(const QmmParams p) { \
    mlx_ext::cuda::qmm_generic<T>(p, true);                                                \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(256) qmm_generic_n_##NAME(const QmmParams p) { \
    mlx_ext::cuda::qmm_generic<T>(p, false);                                               \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(256) reduce_partials_##NAME(const QmmParams p) { \
    mlx_ext::cuda::reduce_partials<T>(p);                                                  \
  }

PER_TYPE(float, float32)
PER_TYPE(f16, float16)
PER_TYPE(bf16, bfloat16)
