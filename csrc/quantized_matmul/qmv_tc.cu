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
// Needs K % (4 * VPC) == 0 and x, w 16-byte aligned (cuda.cpp checks).
#include "quantized_matmul/cuda_common.cuh"

namespace mlx_ext::cuda {
namespace {

// Spans of loads in flight per lane (U), the fastest measured on an H200
// (bench/cuda/kernels.cu): 2 for 4 bits (64 bytes of W: 12.5 us at
// 14336 x 4096, 13.2 with 8 spans, whose 128 registers halve the warps).
constexpr __host__ __device__ int qmv_tc_spans(int bits) { return bits == 8 ? 4 : 2; }

template <typename T, int BITS, int U>
__device__ __forceinline__ void qmv_tc(const QmmParams& p) {
  constexpr int V = 32 / BITS, VPC = 4 * V, SPAN = 4 * VPC;
  static_assert(SPAN == qmv_tc_k_multiple(BITS) && QMV_TC_THREADS == 4 * 32 && QMV_TC_ROWS == 16, "layout");
  constexpr int SUBS = VPC > 32 ? VPC / 32 : 1;  // groups a chunk can touch (group_size >= 32)
  constexpr int WORDS_PER_SUB = 4 / SUBS;
  constexpr uint32_t PAIR_MASK = ((1u << BITS) - 1) * 0x10001u;  // value j and j + V / 2 of a word
  __shared__ float partial[4][32][4];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int N = p.N, K = p.K, gs = p.group_size, G = K / gs;
  const int n0 = blockIdx.x * QMV_TC_ROWS;
  const int64_t m0 = int64_t(blockIdx.y) * 8;
  const int mt = int(p.M - m0 < 8 ? p.M - m0 : 8);
  const bool has_x = g < mt;
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
  const T* x = static_cast<const T*>(p.x) + (m0 + (has_x ? g : 0)) * K;
  const uint32_t magic = opaque(dequant_magic<T>(), p);

  const int spans = K / SPAN;
  const int s_begin = warp * spans / 4, s_end = (warp + 1) * spans / 4;
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};

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
      uint4 xv[VPC / 8];
#pragma unroll
      for (int i = 0; i < VPC / 8; ++i)
        xv[i] = has_x ? __ldg(reinterpret_cast<const uint4*>(x + k0) + i) : make_uint4(0, 0, 0, 0);
      const uint32_t wa[4] = {wv[u][0].x, wv[u][0].y, wv[u][0].z, wv[u][0].w};
      const uint32_t wb[4] = {wv[u][1].x, wv[u][1].y, wv[u][1].z, wv[u][1].w};
      const uint32_t* xw = reinterpret_cast<const uint32_t*>(xv);  // VPC / 2 words of x pairs
#pragma unroll
      for (int c = 0; c < 4; ++c) {  // word c of the chunk: values c V .. c V + V - 1
        const int h = c / WORDS_PER_SUB;
        const uint32_t sa = (sbv[u][0][h] & 0xffffu) * 0x10001u, ba = (sbv[u][0][h] >> 16) * 0x10001u;
        const uint32_t sb = (sbv[u][1][h] & 0xffffu) * 0x10001u, bb = (sbv[u][1][h] >> 16) * 0x10001u;
        const uint32_t* xc = xw + c * (V / 2);  // x values c V .. as V / 2 pairs (2i, 2i + 1)
#pragma unroll
        for (int st = 0; st < V / 4; ++st) {  // mma steps of this word: pairs 2 st, 2 st + 1
          uint32_t a[4], b[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = 2 * st + e;  // pair j: values j and j + V / 2
            a[2 * e] = dequant_pair<T, BITS>((wa[c] >> (BITS * j)) & PAIR_MASK, sa, ba, magic);
            a[2 * e + 1] = dequant_pair<T, BITS>((wb[c] >> (BITS * j)) & PAIR_MASK, sb, bb, magic);
            b[e] = __byte_perm(xc[j / 2], xc[(j + V / 2) / 2], j % 2 ? 0x7632 : 0x5410);
          }
          mma_m16n8k16<T>(d, a, b[0], b[1], d);
        }
      }
    }
  }

  // d: (row g, x rows 2t, 2t + 1), (row g + 8, x rows 2t, 2t + 1). Sum the
  // four quarters of K.
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[warp][lane][i] = d[i];
  __syncthreads();
  if (warp != 0) return;
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = 2 * t + (i % 2), n = n0 + g + 8 * (i / 2);
    if (m >= mt || n >= N) continue;
    float v = partial[0][lane][i] + partial[1][lane][i] + partial[2][lane][i] + partial[3][lane][i];
    if (bias) v += to_float(bias[n]);
    out[(m0 + m) * N + n] = from_float<T>(v);
  }
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::QmmParams;

// Names: qmv_tc_<x type>_b<bits>. Block QMV_TC_THREADS threads, grid
// (ceil(N / QMV_TC_ROWS), ceil(M / 8)).
#define QMV_TC(T, NAME, BITS)                                                                  \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::QMV_TC_THREADS) qmv_tc_##NAME##_b##BITS( \
      const QmmParams p) {                                                                     \
    mlx_ext::cuda::qmv_tc<T, BITS, mlx_ext::cuda::qmv_tc_spans(BITS)>(p);                    \
  }
QMV_TC(bf16, bf16, 2)
QMV_TC(bf16, bf16, 4)
QMV_TC(bf16, bf16, 8)
QMV_TC(f16, f16, 2)
QMV_TC(f16, f16, 4)
QMV_TC(f16, f16, 8)
