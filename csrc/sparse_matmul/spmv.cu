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
// costs for CSR and Bitmask, equal rows otherwise. The whole warp searches
// row_ptr 32 ways at a time (a few dependent loads, not log2 N).
template <Fmt F>
__device__ __forceinline__ int first_row(const SpParams& p, int64_t w, int64_t warps, int lane) {
  if (w >= warps) return p.N;
  if constexpr (F == CSR || F == BITMASK) {
    auto cost = [&](int r) { return p.row_ptr[r] + int64_t(kRowCost) * r; };
    const int64_t target = cost(p.N) * w / warps;
    int lo = 0, hi = p.N; // the first r in [lo, hi] with cost(r) >= target
    while (hi - lo > 32) {
      const int64_t step = (int64_t(hi - lo) + 31) / 32;
      const int probe = int(lo + step * lane < hi ? lo + step * lane : hi);
      const unsigned below = __ballot_sync(0xffffffffu, cost(probe) < target);
      const int count = __popc(below); // probes below target: lanes 0 .. count - 1
      const int new_lo = lo + int(step) * (count - 1);
      hi = count == 32 ? hi : int(lo + step * count < hi ? lo + step * count : hi);
      lo = count ? new_lo + 1 : lo;
      if (lo > hi) lo = hi;
    }
    const int probe = lo + lane <= hi ? lo + lane : hi;
    const unsigned below = __ballot_sync(0xffffffffu, cost(probe) < target);
    return lo + __popc(below) < hi ? lo + __popc(below) : hi;
  } else {
    return int(int64_t(p.N) * w / warps);
  }
}

template <typename T, int MT, bool XS, Fmt F, int CB, int BITS>
__device__ __forceinline__ void spmv(const SpParams& p) {
  extern __shared__ uint4 smem[];
  const int K = p.K, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t warps = int64_t(gridDim.x) * SPMV_WARPS, gw = int64_t(blockIdx.x) * SPMV_WARPS + warp;
  int r0 = -1, r1 = -1; // this warp's rows, found during the first tile's copy of x
  // grid.y is capped at CUDA's 65535: a block takes every gridDim.y-th tile of x.
  for (int64_t tile = blockIdx.y; tile * MT < p.M; tile += gridDim.y) {
    const int64_t m0 = tile * MT;
    const int mt = int(p.M - m0 < MT ? p.M - m0 : MT);
    const T* x = static_cast<const T*>(p.x) + m0 * K;
    XRows<T, MT, XS> xr{x, K, mt};
    if constexpr (XS) {
      // 8 columns per thread and row at a time; the first chunk's loads are in
      // flight while the warp searches its rows.
      using X = XRows<T, MT, true>;
      T* xs = reinterpret_cast<T*>(smem);
      const bool vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
      auto load_chunk = [&](int k0, float (&v)[MT][8]) {
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          if (i < mt && vec && k0 < K) {
            load8(x + int64_t(i) * K + k0, v[i]);
          } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) v[i][j] = i < mt && k0 + j < K ? to_float(x[int64_t(i) * K + k0 + j]) : 0.0f;
          }
        }
      };
      auto store_chunk = [&](int k0, const float (&v)[MT][8]) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (k0 + j < K)
#pragma unroll
            for (int i = 0; i < MT; ++i) xs[X::slot(k0 + j) * MT + i] = from_float<T>(v[i][j]);
      };
      {
        float v[MT][8];
        load_chunk(8 * threadIdx.x, v);
        if (r0 < 0) r0 = first_row<F>(p, gw, warps, lane), r1 = first_row<F>(p, gw + 1, warps, lane);
        store_chunk(8 * threadIdx.x, v);
      }
      for (int k0 = 8 * threadIdx.x + 8 * SPMV_THREADS; k0 < K; k0 += 8 * SPMV_THREADS) {
        float v[MT][8];
        load_chunk(k0, v);
        store_chunk(k0, v);
      }
      __syncthreads();
      xr.x = xs;
    } else if (r0 < 0) {
      r0 = first_row<F>(p, gw, warps, lane), r1 = first_row<F>(p, gw + 1, warps, lane);
    }
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
    if constexpr (XS) __syncthreads(); // x of the next tile overwrites xs
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
