// Prefill kernels of the sparse matmul: transpose=True, float16 / bfloat16,
// many rows of x, on the tensor cores (mma.sync m16n8k16, float32
// accumulators). The sparse W tile is made dense in shared memory (the
// Flash-LLM idea: W is read compressed from memory, expanded on chip), or,
// for BSR, its stored blocks are copied as they are and empty blocks are
// never visited.
//
// Block: THREADS = 256 (8 warps, WM x WN), an out tile of BM = 128 rows of x
//   by BN rows of W. Per step: BK = 32 columns of K; the x tile (BM x BK) by
//   cp.async, the W tile (BN x BK) by the format's loader, both double
//   buffered: the next step's global loads are in flight during this step's
//   mma. Shared rows are padded by 16 bytes (ldmatrix without bank conflicts).
// Loaders (a thread per half row of the W tile, 16 columns):
//   nm24:    2:4, 8 values (16 bytes) and 16 code bits -> 16 dense columns;
//   bitmask: the row's mask word, a running value cursor per row;
//   csr:     the row's sorted columns from a cursor (zero-filled tile, then
//            the stored values scattered);
//   bsr:     BN = block_n rows; the steps walk the block row's stored blocks
//            only (block_k / BK steps each), W copied by cp.async.
// Needs K % BK == 0 (and block_k % BK == 0), 16-byte aligned x and values.
#include "sparse_matmul/cuda_formats.cuh"

namespace mlx_ext::cuda::sparse {
namespace {

constexpr int BM = SPMM_TC_BM, BK = SPMM_TC_BK, PAD = 8, LD = BK + PAD, THREADS = SPMM_TC_THREADS;

// 16 values of T (as 16-bit words) into the W tile row at `dst` (16-byte aligned).
__device__ __forceinline__ void store16(uint16_t* dst, const uint16_t (&d)[16]) {
  uint32_t w[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) w[i] = uint32_t(d[2 * i]) | (uint32_t(d[2 * i + 1]) << 16);
  reinterpret_cast<uint4*>(dst)[0] = make_uint4(w[0], w[1], w[2], w[3]);
  reinterpret_cast<uint4*>(dst)[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

// 2:4: thread (row r, half h) holds values (k0 + 16 h) / 2 .. + 7 of its row.
template <int BN>
struct Nm24Loader {
  const uint16_t* values;
  const uint32_t* codes;
  int row, half, kc, words;
  bool valid;
  uint4 v;
  uint32_t code;
  __device__ void init(const SpParams& p, int n0, int tid) {
    row = n0 + tid / 2, half = tid % 2;
    valid = row < p.N;
    kc = p.K / 2, words = (kc * 2 + 31) / 32;
    values = static_cast<const uint16_t*>(p.values) + int64_t(valid ? row : 0) * kc;
    codes = static_cast<const uint32_t*>(p.pattern) + int64_t(valid ? row : 0) * words;
  }
  __device__ int steps(const SpParams& p) const { return p.K / BK; }
  __device__ int k_of(int s) const { return s * BK; }
  __device__ void fetch(int s, uint16_t*) {
    const int i0 = s * (BK / 2) + 8 * half;
    v = valid ? load_stream16(values + i0) : make_uint4(0, 0, 0, 0);
    code = valid ? (__ldg(codes + i0 / 16) >> (2 * (i0 % 16))) : 0u;
  }
  __device__ void store(uint16_t* ws, int tid) {
    const uint32_t vw[4] = {v.x, v.y, v.z, v.w};
    uint16_t d[16];
#pragma unroll
    for (int g = 0; g < 4; ++g) { // group g: values 2g (position c0) and 2g + 1 (c1)
      const uint16_t a = uint16_t(vw[g] & 0xffffu), b = uint16_t(vw[g] >> 16);
      const uint32_t c0 = (code >> (4 * g)) & 3u, c1 = (code >> (4 * g + 2)) & 3u;
#pragma unroll
      for (int q = 0; q < 4; ++q) d[4 * g + q] = q == c0 ? a : q == c1 ? b : uint16_t(0);
    }
    store16(ws + (tid / 2) * LD + 16 * (tid % 2), d);
  }
};

// Bitmask: the row's mask word of the step; thread h takes bits 16 h .. 16 h + 15.
template <int BN>
struct BitmaskLoader {
  const uint16_t* values;
  const uint32_t* mask;
  int row, half, words;
  bool valid;
  int64_t cursor; // the row's values before this step
  uint16_t d[16];
  __device__ void init(const SpParams& p, int n0, int tid) {
    row = n0 + tid / 2, half = tid % 2;
    valid = row < p.N;
    words = (p.K + 31) / 32;
    mask = static_cast<const uint32_t*>(p.pattern) + int64_t(valid ? row : 0) * words;
    values = static_cast<const uint16_t*>(p.values);
    cursor = valid ? p.row_ptr[row] : 0;
  }
  __device__ int steps(const SpParams& p) const { return p.K / BK; }
  __device__ int k_of(int s) const { return s * BK; }
  __device__ void fetch(int s, uint16_t*) {
    const uint32_t word = valid ? __ldg(mask + s) : 0u;
    const uint32_t bits = half ? word >> 16 : word & 0xffffu;
    const int64_t start = cursor + (half ? __popc(word & 0xffffu) : 0);
#pragma unroll
    for (int q = 0; q < 16; ++q)
      d[q] = (bits >> q) & 1u ? __ldg(values + start + __popc(bits & ((1u << q) - 1))) : uint16_t(0);
    cursor += __popc(word);
  }
  __device__ void store(uint16_t* ws, int tid) { store16(ws + (tid / 2) * LD + 16 * (tid % 2), d); }
};

// CSR: a cursor per row (both threads of a row walk it; each keeps its half).
template <int BN>
struct CsrLoader {
  const SpParams* pp;
  int row, half;
  int64_t cursor, end;
  int step;
  __device__ void init(const SpParams& p, int n0, int tid) {
    pp = &p;
    row = n0 + tid / 2, half = tid % 2;
    const bool valid = row < p.N;
    cursor = valid ? p.row_ptr[row] : 0;
    end = valid ? p.row_ptr[row + 1] : 0;
  }
  __device__ int steps(const SpParams& p) const { return p.K / BK; }
  __device__ int k_of(int s) const { return s * BK; }
  __device__ void fetch(int s, uint16_t*) { step = s; }
  __device__ void store(uint16_t* ws, int tid) {
    uint16_t* dst = ws + (tid / 2) * LD + 16 * half;
    reinterpret_cast<uint4*>(dst)[0] = make_uint4(0, 0, 0, 0);
    reinterpret_cast<uint4*>(dst)[1] = make_uint4(0, 0, 0, 0);
    const int k0 = step * BK, lo = k0 + 16 * half;
    const uint16_t* values = static_cast<const uint16_t*>(pp->values);
    while (cursor < end) {
      const int c = pp->wide_columns ? int(static_cast<const uint32_t*>(pp->pattern)[cursor])
                                     : int(static_cast<const uint16_t*>(pp->pattern)[cursor]);
      if (c >= k0 + BK) break;
      if (c >= lo && c < lo + 16) dst[c - lo] = values[cursor];
      ++cursor;
    }
  }
};

// BSR with block_n == BN: the steps walk the stored blocks of block row
// blockIdx.x, block_k / BK steps per block; W by cp.async (16 bytes per thread and step).
template <int BN>
struct BsrLoader {
  const uint16_t* data;
  const int32_t* cols;
  int j0, steps_per_block, nsteps, bk;
  __device__ void init(const SpParams& p, int, int) {
    const int br = blockIdx.x;
    bk = p.block_k;
    j0 = p.row_ptr[br];
    steps_per_block = bk / BK;
    nsteps = (p.row_ptr[br + 1] - j0) * steps_per_block;
    data = static_cast<const uint16_t*>(p.values);
    cols = static_cast<const int32_t*>(p.pattern);
  }
  __device__ int steps(const SpParams&) const { return nsteps; }
  __device__ int k_of(int s) const {
    const int j = j0 + s / steps_per_block;
    return __ldg(cols + j) * bk + (s % steps_per_block) * BK;
  }
  __device__ void fetch(int s, uint16_t* ws) {
    const int j = j0 + s / steps_per_block, kk = (s % steps_per_block) * BK;
    constexpr int PIECES = BN * BK / 8; // 16-byte pieces of the tile
    for (int i = threadIdx.x; i < PIECES; i += THREADS) {
      const int r = i / (BK / 8), c = (i % (BK / 8)) * 8;
      cp_async<16>(smem_u32(ws + r * LD + c), data + (int64_t(j) * BN + r) * bk + kk + c, true);
    }
  }
  __device__ void store(uint16_t*, int) {}
};

template <typename T, int BN, int WM, int WN, template <int> class Loader>
__device__ __forceinline__ void spmm_tc(const SpParams& p) {
  constexpr int FM = BM / WM / 16, FN = BN / WN / 8;
  static_assert(WM * WN * 32 == THREADS && FN % 2 == 0, "tile");
  __shared__ __align__(16) uint16_t xs[2][BM * LD];
  __shared__ __align__(16) uint16_t ws[2][BN * LD];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wm = warp / WN, wn = warp % WN;
  const int n0 = blockIdx.x * BN;
  const int64_t m0 = int64_t(blockIdx.y) * BM;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  Loader<BN> loader;
  loader.init(p, n0, tid);
  const int steps = loader.steps(p);

  auto x_async = [&](int s, uint16_t* dst) {
    const int k0 = loader.k_of(s);
#pragma unroll
    for (int i = 0; i < BM * BK / 8 / THREADS; ++i) {
      const int piece = tid + i * THREADS, r = piece / (BK / 8), c = (piece % (BK / 8)) * 8;
      const bool valid = m0 + r < p.M;
      cp_async<16>(smem_u32(dst + r * LD + c), x + (valid ? (m0 + r) * p.K + k0 + c : 0), valid);
    }
  };

  float acc[FM][FN][4] = {};
  if (steps > 0) {
    loader.fetch(0, ws[0]);
    x_async(0, xs[0]);
    cp_async_commit();
    loader.store(ws[0], tid);
    cp_async_wait<0>();
    __syncthreads();
  }
  for (int s = 0; s < steps; ++s) {
    const int buf = s & 1;
    if (s + 1 < steps) {
      loader.fetch(s + 1, ws[buf ^ 1]);
      x_async(s + 1, xs[buf ^ 1]);
      cp_async_commit();
    }
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[FM][4], b[FN][2];
#pragma unroll
      for (int i = 0; i < FM; ++i)
        ldmatrix_x4(a[i], xs[buf] + (wm * FM * 16 + i * 16 + lane % 16) * LD + kk + (lane / 16) * 8);
#pragma unroll
      for (int j = 0; j < FN; j += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, ws[buf] + (wn * FN * 8 + j * 8 + lane % 8 + (lane / 16) * 8) * LD + kk + ((lane / 8) % 2) * 8);
        b[j][0] = r[0], b[j][1] = r[1], b[j + 1][0] = r[2], b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) mma_m16n8k16<T>(acc[i][j], a[i], b[j][0], b[j][1], acc[i][j]);
    }
    if (s + 1 < steps) loader.store(ws[buf ^ 1], tid);
    cp_async_wait<0>();
    __syncthreads();
  }

  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + wm * FM * 16 + i * 16 + g + 8 * (e / 2);
        const int n = n0 + wn * FN * 8 + j * 8 + 2 * t + (e % 2);
        if (m < p.M && n < p.N)
          out[m * p.N + n] = from_float<T>(acc[i][j][e] + (bias ? to_float(bias[n]) : 0.0f));
      }
}

} // namespace
} // namespace mlx_ext::cuda::sparse

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::SpParams;

// Names: spmm_tc_<format>_<dtype>, <format> nm24, bitmask, csr (out tiles
// 128 x 128) and bsr32, bsr64 (128 x block_n). Block SPMM_TC_THREADS, static
// shared memory, grid (ceil(N / BN), ceil(M / 128)).
#define SPMM_TC(T, DT, NAME, LOADER, BN, WM, WN)                                                   \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::SPMM_TC_THREADS)                     \
      spmm_tc_##NAME##_##DT(const SpParams p) {                                                    \
    mlx_ext::cuda::sparse::spmm_tc<T, BN, WM, WN, mlx_ext::cuda::sparse::LOADER>(p);               \
  }
#define SPMM_TC_ALL(T, DT)                                                                         \
  SPMM_TC(T, DT, nm24, Nm24Loader, 128, 2, 4)                                                      \
  SPMM_TC(T, DT, bitmask, BitmaskLoader, 128, 2, 4)                                                \
  SPMM_TC(T, DT, csr, CsrLoader, 128, 2, 4)                                                        \
  SPMM_TC(T, DT, bsr64, BsrLoader, 64, 4, 2)                                                       \
  SPMM_TC(T, DT, bsr32, BsrLoader, 32, 8, 1)
SPMM_TC_ALL(bf16, bfloat16)
SPMM_TC_ALL(f16, float16)
