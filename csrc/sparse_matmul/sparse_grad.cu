// The gradient side of the sparse matmul on CUDA cores (float32 arithmetic):
//
// spmm_n: transpose=False, out = x W (x (M, N), out (M, K); the x-gradient of
//   x W^T). A thread per column k of out and MT rows of x walks the rows n of
//   its slice of N, looking W[n, k] up (cuda_formats.cuh: a bit test, a code
//   match or a binary search), so every output is one thread's sum: no
//   atomics, deterministic. grid (ceil(K / SPN_THREADS), slices, ceil(M / MT));
//   with several slices each writes float partials (slices, M, K) and
//   reduce_partials adds them (and the bias) into out.
// sampled: dvalues[j] = sum_m g[m, row_j] x[m, col_j], a thread per stored
//   value j (its row and column found from the format's arrays), so again no
//   atomics: each value gradient is written once.
// bitmask_prefix: the stored values of each row of a Bitmask before each of
//   its mask words (SpParams::word_prefix), for the two kernels above.
#include "sparse_matmul/cuda_formats.cuh"

namespace mlx_ext::cuda::sparse {
namespace {

template <typename T, Fmt F, int CB, int BITS>
__device__ __forceinline__ float element(const SpParams& p, int n, int k) {
  if constexpr (F == NM) {
    return nm_element<T, CB, BITS>(p, n, k);
  } else if constexpr (F == CSR) {
    const int64_t b = p.row_ptr[n], e = p.row_ptr[n + 1];
    int64_t i;
    if (p.wide_columns) {
      const uint32_t* cols = static_cast<const uint32_t*>(p.pattern);
      i = lower_bound(cols, b, e, uint32_t(k));
      if (i == e || cols[i] != uint32_t(k)) return 0.0f;
    } else {
      const uint16_t* cols = static_cast<const uint16_t*>(p.pattern);
      i = lower_bound(cols, b, e, uint16_t(k));
      if (i == e || cols[i] != k) return 0.0f;
    }
    return to_float(static_cast<const T*>(p.values)[i]);
  } else if constexpr (F == BITMASK) {
    const int words = (p.K + 31) / 32, w = k / 32, bit = k % 32;
    const uint32_t word = __ldg(static_cast<const uint32_t*>(p.pattern) + int64_t(n) * words + w);
    if (!((word >> bit) & 1u)) return 0.0f;
    const int64_t i = p.row_ptr[n] + p.word_prefix[int64_t(n) * words + w] + __popc(word & ((1u << bit) - 1));
    return to_float(static_cast<const T*>(p.values)[i]);
  } else { // BSR
    const int bn = p.block_n, bk = p.block_k, br = n / bn, kb = k / bk;
    const int32_t* cols = static_cast<const int32_t*>(p.pattern);
    const int64_t b = p.row_ptr[br], e = p.row_ptr[br + 1];
    const int64_t j = lower_bound(cols, b, e, int32_t(kb));
    if (j == e || cols[j] != kb) return 0.0f;
    return to_float(static_cast<const T*>(p.values)[(j * bn + (n - br * bn)) * bk + (k - kb * bk)]);
  }
}

template <typename T, int MT, Fmt F, int CB, int BITS>
__device__ __forceinline__ void spmm_n(const SpParams& p) {
  const int k = blockIdx.x * SPN_THREADS + threadIdx.x;
  if (k >= p.K) return;
  const int s = blockIdx.y;
  const int n0 = int(int64_t(p.N) * s / p.slices), n1 = int(int64_t(p.N) * (s + 1) / p.slices);
  for (int64_t tile = blockIdx.z; tile * MT < p.M; tile += gridDim.z) { // grid.z capped at 65535
    const int64_t m0 = tile * MT;
    const int mt = int(p.M - m0 < MT ? p.M - m0 : MT);
    const T* x = static_cast<const T*>(p.x) + m0 * p.N;
    float acc[MT] = {};
    for (int n = n0; n < n1; ++n) {
      const float w = element<T, F, CB, BITS>(p, n, k);
      if (w == 0.0f) continue;
#pragma unroll
      for (int i = 0; i < MT; ++i)
        if (i < mt) acc[i] = fmaf(w, to_float(x[int64_t(i) * p.N + n]), acc[i]);
    }
    if (p.slices > 1) {
      float* partials = static_cast<float*>(p.out) + (int64_t(s) * p.M + m0) * p.K;
#pragma unroll
      for (int i = 0; i < MT; ++i)
        if (i < mt) partials[int64_t(i) * p.K + k] = acc[i];
      continue;
    }
    const float b = p.bias ? to_float(static_cast<const T*>(p.bias)[k]) : 0.0f;
    T* out = static_cast<T*>(p.out) + m0 * p.K;
#pragma unroll
    for (int i = 0; i < MT; ++i)
      if (i < mt) out[int64_t(i) * p.K + k] = from_float<T>(acc[i] + b);
  }
}

// out (M, K) = the sum of p.parts float slices (parts, M, K) at p.x, + bias.
template <typename T>
__device__ __forceinline__ void reduce_partials(const SpParams& p) {
  const int64_t i = int64_t(blockIdx.x) * SPN_THREADS + threadIdx.x, total = p.M * p.K;
  if (i >= total) return;
  const float* partials = static_cast<const float*>(p.x);
  float v = p.bias ? to_float(static_cast<const T*>(p.bias)[i % p.K]) : 0.0f;
  for (int s = 0; s < p.parts; ++s) v += partials[s * total + i];
  static_cast<T*>(p.out)[i] = from_float<T>(v);
}

// (row, column) of stored value i.
template <Fmt F, int CB>
__device__ __forceinline__ void position(const SpParams& p, int64_t i, int& row, int& col) {
  if constexpr (F == NM) {
    const int n = p.nm_n, m = p.nm_m, kc = p.K / m * n, words = (kc * CB + 31) / 32;
    row = int(i / kc);
    const int ii = int(i - int64_t(row) * kc);
    const uint32_t code = __ldg(static_cast<const uint32_t*>(p.pattern) + int64_t(row) * words + ii * CB / 32);
    col = (ii / n) * m + int((code >> (ii * CB % 32)) & ((1u << CB) - 1));
  } else if constexpr (F == CSR) {
    row = last_at_most(p.row_ptr, p.N + 1, i);
    while (p.row_ptr[row + 1] <= i) ++row; // empty rows share a pointer: the last one holding i
    col = p.wide_columns ? int(static_cast<const uint32_t*>(p.pattern)[i])
                         : int(static_cast<const uint16_t*>(p.pattern)[i]);
  } else if constexpr (F == BITMASK) {
    row = last_at_most(p.row_ptr, p.N + 1, i);
    while (p.row_ptr[row + 1] <= i) ++row;
    const int words = (p.K + 31) / 32;
    const int32_t* prefix = p.word_prefix + int64_t(row) * words;
    const int j = int(i - p.row_ptr[row]);
    const int w = last_at_most(prefix, words, j);
    int w2 = w; // words without values share a prefix: the one whose bits hold j
    const uint32_t* mask = static_cast<const uint32_t*>(p.pattern) + int64_t(row) * words;
    while (prefix[w2] + __popc(mask[w2]) <= j) ++w2;
    uint32_t bits = mask[w2];
    for (int t = j - prefix[w2]; t > 0; --t) bits &= bits - 1;
    col = w2 * 32 + __ffs(bits) - 1;
  } else { // BSR
    const int bn = p.block_n, bk = p.block_k;
    const int64_t per_block = int64_t(bn) * bk, j = i / per_block;
    const int rem = int(i - j * per_block), r = rem / bk, c = rem - r * bk;
    int br = last_at_most(p.row_ptr, p.N / bn + 1, j);
    while (p.row_ptr[br + 1] <= j) ++br;
    row = br * bn + r;
    col = static_cast<const int32_t*>(p.pattern)[j] * bk + c;
  }
}

template <typename T, Fmt F, int CB>
__device__ __forceinline__ void sampled(const SpParams& p) {
  const int64_t i = int64_t(blockIdx.x) * SPN_THREADS + threadIdx.x;
  if (i >= p.stored) return;
  int row, col;
  position<F, CB>(p, i, row, col);
  float acc = 0.0f;
  for (int64_t m = 0; m < p.M; ++m) acc = fmaf(p.g[m * p.N + row], p.xf[m * p.K + col], acc);
  static_cast<T*>(p.out)[i] = from_float<T>(acc);
}

// A thread per row of the Bitmask.
__device__ __forceinline__ void bitmask_prefix(const SpParams& p) {
  const int n = blockIdx.x * SPN_THREADS + threadIdx.x;
  if (n >= p.N) return;
  const int words = (p.K + 31) / 32;
  const uint32_t* mask = static_cast<const uint32_t*>(p.pattern) + int64_t(n) * words;
  int32_t* prefix = const_cast<int32_t*>(p.word_prefix) + int64_t(n) * words;
  int32_t sum = 0;
  for (int w = 0; w < words; ++w) prefix[w] = sum, sum += __popc(mask[w]);
}

} // namespace
} // namespace mlx_ext::cuda::sparse

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::SpParams;

// Names: spmm_n_<format>_<dtype>_m<MT> (MT = 1 or 8 rows of x per thread),
// sampled_<format>_<dtype> (<dtype>: the values'), reduce_partials_<dtype>,
// bitmask_prefix. <format> as spmv.cu's. Block SPN_THREADS.
#define SPN_ONE(T, DT, FNAME, F, CB, BITS, MT)                                                     \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::SPN_THREADS)                         \
      spmm_n_##FNAME##_##DT##_m##MT(const SpParams p) {                                            \
    mlx_ext::cuda::sparse::spmm_n<T, MT, mlx_ext::cuda::sparse::F, CB, BITS>(p);                   \
  }
#define SPN_FMT(T, DT, FNAME, F, CB, BITS) SPN_ONE(T, DT, FNAME, F, CB, BITS, 1) SPN_ONE(T, DT, FNAME, F, CB, BITS, 8)
#define SAMPLED(T, DT, FNAME, F, CB)                                                               \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::SPN_THREADS)                         \
      sampled_##FNAME##_##DT(const SpParams p) {                                                   \
    mlx_ext::cuda::sparse::sampled<T, mlx_ext::cuda::sparse::F, CB>(p);                            \
  }
#define SPN_DTYPE(T, DT)                                                                           \
  SPN_FMT(T, DT, csr, CSR, 0, 0)                                                                   \
  SPN_FMT(T, DT, bitmask, BITMASK, 0, 0)                                                           \
  SPN_FMT(T, DT, bsr, BSR, 0, 0)                                                                   \
  SPN_FMT(T, DT, nm4, NM, 2, 0)                                                                    \
  SPN_FMT(T, DT, nm8, NM, 4, 0)                                                                    \
  SPN_FMT(T, DT, nm4_q4, NM, 2, 4)                                                                 \
  SPN_FMT(T, DT, nm4_q8, NM, 2, 8)                                                                 \
  SPN_FMT(T, DT, nm8_q4, NM, 4, 4)                                                                 \
  SPN_FMT(T, DT, nm8_q8, NM, 4, 8)                                                                 \
  SAMPLED(T, DT, csr, CSR, 0)                                                                      \
  SAMPLED(T, DT, bitmask, BITMASK, 0)                                                              \
  SAMPLED(T, DT, bsr, BSR, 0)                                                                      \
  SAMPLED(T, DT, nm4, NM, 2)                                                                       \
  SAMPLED(T, DT, nm8, NM, 4)                                                                       \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::SPN_THREADS)                         \
      reduce_partials_##DT(const SpParams p) {                                                     \
    mlx_ext::cuda::sparse::reduce_partials<T>(p);                                                  \
  }
SPN_DTYPE(float, float32)
SPN_DTYPE(f16, float16)
SPN_DTYPE(bf16, bfloat16)

extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::SPN_THREADS) bitmask_prefix(const SpParams p) {
  mlx_ext::cuda::sparse::bitmask_prefix(p);
}
