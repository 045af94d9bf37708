// Decode kernels of the sparse matmul: transpose=True, out = x W^T, for any
// M (a block takes MT rows of x, grid.y covers M) but meant for M <= 32,
// where the product is bound by reading the compressed W once. CUDA cores,
// float32 accumulation, every format of cuda_formats.cuh.
//
// Block: SPMV_WARPS warps. It first copies its MT rows of x into shared
//   memory as [K][MT] (the MT values of a column side by side: a stored value
//   at column k reads them with one or two 16-byte loads), then each warp
//   walks its rows of W, one at a time, lanes over the row's stored values.
// Grid: grid.x blocks of SPMV_WARPS warps; the warps (all of grid.x) split
//   the N rows into contiguous ranges, for CSR and Bitmask of about equal
//   stored values (a binary search of row_ptr per warp: nonzero-balanced,
//   no atomics), else of equal rows. grid.x is a few blocks per
//   multiprocessor (cuda_plan.h), so x is copied a few times per SM, not
//   once per row.
// XS=false (x too large for shared memory): x read from global memory.
#include "sparse_matmul/cuda_formats.cuh"

namespace mlx_ext::cuda::sparse {
namespace {

// What a row costs beside its stored values (a warp reduction and a store).
constexpr int kRowCost = 32;

// The first row of global warp `w` of `warps`: equal stored values + row
// costs for CSR and Bitmask, equal rows otherwise.
template <Fmt F>
__device__ __forceinline__ int first_row(const SpParams& p, int64_t w, int64_t warps) {
  if (w >= warps) return p.N;
  if constexpr (F == CSR || F == BITMASK) {
    const int64_t total = p.row_ptr[p.N] + int64_t(kRowCost) * p.N;
    const int64_t target = total * w / warps;
    int lo = 0, hi = p.N; // the first r with cost(r) >= target
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (p.row_ptr[mid] + int64_t(kRowCost) * mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  } else {
    return int(int64_t(p.N) * w / warps);
  }
}

template <typename T, int MT, bool XS, Fmt F, int CB, int BITS>
__device__ __forceinline__ void spmv(const SpParams& p) {
  extern __shared__ uint4 smem[];
  const int K = p.K, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t m0 = int64_t(blockIdx.y) * MT;
  const int mt = int(p.M - m0 < MT ? p.M - m0 : MT);
  const T* x = static_cast<const T*>(p.x) + m0 * K;
  XRows<T, MT, XS> xr{x, K, mt};
  if constexpr (XS) {
    T* xs = reinterpret_cast<T*>(smem);
    for (int i = 0; i < MT; ++i)
      for (int k = threadIdx.x; k < K; k += SPMV_THREADS)
        xs[k * MT + i] = i < mt ? x[int64_t(i) * K + k] : from_float<T>(0.0f);
    __syncthreads();
    xr.x = xs;
  }
  const int64_t warps = int64_t(gridDim.x) * SPMV_WARPS, gw = int64_t(blockIdx.x) * SPMV_WARPS + warp;
  const int r0 = first_row<F>(p, gw, warps), r1 = first_row<F>(p, gw + 1, warps);
  T* out = static_cast<T*>(p.out) + m0 * p.N;
  const T* bias = static_cast<const T*>(p.bias);
  for (int row = r0; row < r1; ++row) {
    float acc[MT] = {};
    if constexpr (F == CSR) csr_row<T>(p, row, xr, lane, acc);
    else if constexpr (F == BITMASK) bitmask_row<T>(p, row, xr, lane, acc);
    else if constexpr (F == BSR) bsr_row<T>(p, row, xr, lane, acc);
    else if constexpr (BITS == 0) nm_row<T, MT, CB>(p, row, xr, lane, acc);
    else nmq_row<T, MT, CB, BITS>(p, row, xr, lane, acc);
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int d = 16; d >= 1; d /= 2) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], d);
    const float b = bias ? to_float(bias[row]) : 0.0f;
#pragma unroll
    for (int i = 0; i < MT; ++i)
      if (lane == i % 32 && i < mt) out[int64_t(i) * p.N + row] = from_float<T>(acc[i] + b);
  }
}

} // namespace
} // namespace mlx_ext::cuda::sparse

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::SpParams;

// Names: spmv_<format>_<dtype>_m<MT> (x in shared memory, MT = 1, 4 or 16
// rows of x per block) and spmv_<format>_<dtype>_m1_xg (x read from global
// memory). <format>: csr, bitmask, bsr, nm4 / nm8 (float values, m = 4 or 8),
// nm4_q4, nm4_q8, nm8_q4, nm8_q8 (BITS-bit affine values). Block
// SPMV_THREADS, dynamic shared memory K MT sizeof(T), grid (cuda_plan.h,
// ceil(M / MT)).
#define SPMV_ONE(T, DT, FNAME, F, CB, BITS, MT, XS, SUFFIX)                                         \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::SPMV_THREADS)                         \
      spmv_##FNAME##_##DT##_m##MT##SUFFIX(const SpParams p) {                                       \
    mlx_ext::cuda::sparse::spmv<T, MT, XS, mlx_ext::cuda::sparse::F, CB, BITS>(p);                 \
  }
#define SPMV_MTS(T, DT, FNAME, F, CB, BITS)                                                         \
  SPMV_ONE(T, DT, FNAME, F, CB, BITS, 1, true, )                                                    \
  SPMV_ONE(T, DT, FNAME, F, CB, BITS, 4, true, )                                                    \
  SPMV_ONE(T, DT, FNAME, F, CB, BITS, 16, true, )                                                   \
  SPMV_ONE(T, DT, FNAME, F, CB, BITS, 1, false, _xg)
#define SPMV_DTYPE(T, DT)                                                                           \
  SPMV_MTS(T, DT, csr, CSR, 0, 0)                                                                   \
  SPMV_MTS(T, DT, bitmask, BITMASK, 0, 0)                                                           \
  SPMV_MTS(T, DT, bsr, BSR, 0, 0)                                                                   \
  SPMV_MTS(T, DT, nm4, NM, 2, 0)                                                                    \
  SPMV_MTS(T, DT, nm8, NM, 4, 0)                                                                    \
  SPMV_MTS(T, DT, nm4_q4, NM, 2, 4)                                                                 \
  SPMV_MTS(T, DT, nm4_q8, NM, 2, 8)                                                                 \
  SPMV_MTS(T, DT, nm8_q4, NM, 4, 4)                                                                 \
  SPMV_MTS(T, DT, nm8_q8, NM, 4, 8)
SPMV_DTYPE(float, float32)
SPMV_DTYPE(f16, float16)
SPMV_DTYPE(bf16, bfloat16)
