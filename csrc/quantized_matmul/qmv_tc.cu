// Tensor-core GEMV of the quantized matmul: transpose=True, 1 to 8 rows of
// float16 / bfloat16 x, 2-, 4- or 8-bit W. Memory-bound: the point is to read
// W with 16-byte loads and many of them in flight, and to spend as few
// instructions as possible per weight. W is dequantized in registers straight
// into mma.sync m16n8k16 A fragments (16 rows of W by 16 k), x is the B
// fragment (16 k by 8 rows of x, rows past M zero), so up to 8 rows of x cost
// the same as one.
//
// The order of k inside one mma is free as long as A and B agree. A lane
// (g = lane / 4, t = lane % 4) loads one 16-byte chunk of rows g and g + 8 of
// the tile at the same k, VPC = 128 / BITS consecutive values; the 4 lanes of
// a quad take 4 consecutive chunks (a "span" of 4 VPC k). In each 32-bit word
// of V = 32 / BITS values, value j and value j + V / 2 lie 16 bits apart, so
// (word >> BITS j) & mask is a pair of integers in the two 16-bit halves: one
// shift and one logical op per pair. Pair 2s of a word feeds the fragment's
// k (2t, 2t + 1), pair 2s + 1 its k (2t + 8, 2t + 9); x is permuted alike.
//
// Thread: rows g, g + 8 of W and row g of x over its chunks; W dequantized to
//   T as s * q + b (one rounding, as MLX's kernels do), float32 accumulators.
// Warp: 16 rows of W over a quarter of K's spans.
// Block: 4 warps, the 4 quarters of K for the same 16 rows, summed through
//   shared memory at the end. grid.x covers N in 16s, grid.y M in 8s.
// Needs K % (4 * VPC) == 0 and x, w 16-byte aligned (cuda_plan.h checks).
#include "common/cuda/affine.cuh"
#include "quantized_matmul/cuda_params.h"
#include "quantized_matmul/qmv_tc.cuh"

namespace mlx_ext::cuda {
namespace {

template <typename T, int BITS, int U, int MT>
__device__ __forceinline__ void qmv_tc(const QmmParams& p) {
  constexpr int V = 32 / BITS, VPC = 4 * V, SPAN = 4 * VPC;
  static_assert(SPAN == qmv_tc_k_multiple(BITS) && QMV_TC_THREADS == 4 * 32 && QMV_TC_ROWS == 16, "layout");
  static_assert(MT == 1 || U == 1, "several x tiles: one span at a time");
  constexpr int SUBS = VPC > 32 ? VPC / 32 : 1;  // groups a chunk can touch (group_size >= 32)
  constexpr int WORDS_PER_SUB = 4 / SUBS;
  constexpr int STEPS = V / 4;  // mma steps per word
  __shared__ float partial[4][32][4 * MT];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int N = p.N, K = p.K, gs = p.group_size, G = K / gs;
  const int n0 = blockIdx.x * QMV_TC_ROWS;
  const int64_t m0 = int64_t(blockIdx.y) * 8 * MT;
  const int64_t row_bytes = int64_t(K) * BITS / 8;
  const int rows[2] = {min(n0 + g, N - 1), min(n0 + g + 8, N - 1)};  // past N: recomputed, never stored
  // Per-row base pointers and a shift for the group (group sizes are powers
  // of two): the loop's index arithmetic stays 32-bit and division-free.
  const uint8_t* w[2];
  const uint16_t *scales[2], *biases[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    w[r] = reinterpret_cast<const uint8_t*>(p.w) + rows[r] * row_bytes;
    scales[r] = static_cast<const uint16_t*>(p.scales) + int64_t(rows[r]) * G;
    biases[r] = static_cast<const uint16_t*>(p.biases) + int64_t(rows[r]) * G;
  }
  const int gs_shift = __ffs(gs) - 1;
  // x tile i: rows m0 + 8 i + (0 .. 7); this lane supplies row g of it.
  int mt[MT];
  bool has_x[MT];
  const T* x[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int64_t left = p.M - m0 - 8 * i;
    mt[i] = int(left < 0 ? 0 : left < 8 ? left : 8);
    has_x[i] = g < mt[i];
    x[i] = static_cast<const T*>(p.x) + (has_x[i] ? m0 + 8 * i + g : 0) * K;
  }
  const uint32_t magic = opaque(dequant_magic<T>(), p.M);

  const int spans = K / SPAN;
  const int s_begin = warp * spans / 4, s_end = (warp + 1) * spans / 4;
  float d[MT][4] = {};

  for (int s0 = s_begin; s0 < s_end; s0 += U) {
    // All of W's loads for U spans first (the bytes in flight are what bound
    // a GEMV), then per span x (from L1: every warp reads the same x) and the
    // arithmetic.
    uint4 wv[U][2];
    uint32_t sbv[U][2][SUBS];  // scale | bias << 16
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s0 + u >= s_end) break;
      const int k0 = (s0 + u) * SPAN + t * VPC;  // this lane's chunk
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        wv[u][r] = load_stream16(w[r] + k0 * BITS / 8);
#pragma unroll
        for (int h = 0; h < SUBS; ++h) {
          const int gi = (k0 + 32 * h) >> gs_shift;
          sbv[u][r][h] = __ldg(scales[r] + gi) | (uint32_t(__ldg(biases[r] + gi)) << 16);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s0 + u >= s_end) break;
      const int k0 = (s0 + u) * SPAN + t * VPC;
      const uint32_t wa[4] = {wv[u][0].x, wv[u][0].y, wv[u][0].z, wv[u][0].w};
      const uint32_t wb[4] = {wv[u][1].x, wv[u][1].y, wv[u][1].z, wv[u][1].w};
      auto load_x = [&](int i, uint4 (&xv)[VPC / 8]) {
#pragma unroll
        for (int l = 0; l < VPC / 8; ++l)
          xv[l] = has_x[i] ? __ldg(reinterpret_cast<const uint4*>(x[i] + k0) + l) : make_uint4(0, 0, 0, 0);
      };
      if constexpr (MT == 1) {  // each word's fragments used at once: fewer registers
        uint4 xv[VPC / 8];
        load_x(0, xv);
#pragma unroll
        for (int c = 0; c < 4; ++c) {  // word c of the chunk: values c V .. c V + V - 1
          const int h = c / WORDS_PER_SUB;
          uint32_t a[STEPS][4];
          qmv_tc_dequant_word<T, BITS>(a, wa[c], wb[c], sbv[u][0][h], sbv[u][1][h], magic);
          qmv_tc_mma_word<T, BITS>(d[0], a, reinterpret_cast<const uint32_t*>(xv) + c * (V / 2));
        }
      } else {  // the span's fragments dequantized once for all x tiles
        uint32_t a[4][STEPS][4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int h = c / WORDS_PER_SUB;
          qmv_tc_dequant_word<T, BITS>(a[c], wa[c], wb[c], sbv[u][0][h], sbv[u][1][h], magic);
        }
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          uint4 xv[VPC / 8];
          load_x(i, xv);
#pragma unroll
          for (int c = 0; c < 4; ++c)
            qmv_tc_mma_word<T, BITS>(d[i], a[c], reinterpret_cast<const uint32_t*>(xv) + c * (V / 2));
        }
      }
    }
  }

  // d[i]: (row g, x rows 2t, 2t + 1 of tile i), (row g + 8, same x rows).
  // Sum the four quarters of K.
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) partial[warp][lane][4 * i + e] = d[i][e];
  __syncthreads();
  if (warp != 0) return;
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = 2 * t + (e % 2), n = n0 + g + 8 * (e / 2), q = 4 * i + e;
      if (m >= mt[i] || n >= N) continue;
      float v = partial[0][lane][q] + partial[1][lane][q] + partial[2][lane][q] + partial[3][lane][q];
      if (bias) v += to_float(bias[n]);
      out[(m0 + 8 * i + m) * N + n] = from_float<T>(v);
    }
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::QmmParams;

// Names (<x type> as MLX spells dtypes): qmv_tc_<x type>_b<bits> (8 rows of x per block) and, for 4 and 8
// bits, qmv_tc_<x type>_b<bits>_m<8 MT> (MT = 2 or 4 tiles of 8 rows, W
// loaded and dequantized once for all of them: at 14336 x 4096, 4 bits, 32
// rows, 43.6 us against 58.6 with 8-row blocks; 64-row blocks were slower
// than 32-row ones, bench/cuda/quantized_matmul.cu on an H200). Block QMV_TC_THREADS threads,
// grid (ceil(N / QMV_TC_ROWS), ceil(M / (8 MT))).
#define QMV_TC(T, NAME, BITS)                                                                  \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::QMV_TC_THREADS) qmv_tc_##NAME##_b##BITS( \
      const QmmParams p) {                                                                     \
    mlx_ext::cuda::qmv_tc<T, BITS, mlx_ext::cuda::qmv_tc_spans(BITS), 1>(p);                 \
  }
#define QMV_TC_MT(T, NAME, BITS, MT)                                                           \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::QMV_TC_THREADS)                 \
      qmv_tc_##NAME##_b##BITS##_m##MT(const QmmParams p) {                                     \
    mlx_ext::cuda::qmv_tc<T, BITS, 1, MT / 8>(p);                                              \
  }
#define QMV_TC_ALL(T, NAME)                                                                    \
  QMV_TC(T, NAME, 2) QMV_TC(T, NAME, 4) QMV_TC(T, NAME, 8)                                     \
  QMV_TC_MT(T, NAME, 4, 16) QMV_TC_MT(T, NAME, 4, 32) QMV_TC_MT(T, NAME, 8, 16) QMV_TC_MT(T, NAME, 8, 32)
QMV_TC_ALL(bf16, bfloat16)
QMV_TC_ALL(f16, float16)
