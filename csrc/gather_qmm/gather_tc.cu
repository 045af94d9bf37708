// Tensor-core kernels of gather_qmm (transpose=True, float16 / bfloat16 x,
// 2-, 4- and 8-bit W, K a multiple of 128 / bits), for both gather_qmm and
// gather_quantized_swiglu (STACKS = 2: gate and up, silu(g) * u in float32).
//
// The inner loop is the quantized matmul's tensor-core GEMV
// (quantized_matmul/qmv_tc.cu, whose header comment says the fragment
// layout; its per-word steps are shared through qmv_tc.cuh): 16 rows of one
// expert's W dequantized in registers into mma.sync A fragments, 8 rows of x
// per B fragment. What differs is where the rows of x come from: a tile is a
// list of up to 8 MT "pair-rows" (cuda_params.h) of pairs routed to the same
// expert, held in shared memory, so each expert's W is read once per tile
// whatever the routing.
//
//   gather_tc_decode: one launch for the whole call (few pairs). Block
//     (pair p, 16 rows of W): the first pair of each expert (the leader)
//     gathers every pair routed to that expert and runs tiles of 8 of their
//     rows; the other pairs' blocks return at once. Pairs whose index is out
//     of range write NaN.
//   gather_group + gather_tc_tiles: prefill. gather_group (one block) groups
//     the pairs by expert on the device (a counting sort: no host sync, any
//     order of indices) into order / offsets / tile_offsets and writes NaN to
//     the rows of out-of-range pairs; gather_tc_tiles then runs one block per
//     (tile of 8 MT rows of one expert, 16 rows of W).
#include "common/cuda/affine.cuh"
#include "gather_qmm/cuda_params.h"
#include "quantized_matmul/qmv_tc.cuh"

namespace mlx_ext::cuda {
namespace {

template <typename T>
__device__ __forceinline__ T nan_value() {
  return from_float<T>(__int_as_float(0x7fc00000));
}

// Pair p reads x[lhs[p]] and expert rhs[p]: both within range.
__device__ __forceinline__ bool pair_valid(const GatherParams& p, int64_t pair) {
  return p.rhs[pair] < uint32_t(p.E) && p.lhs[pair] < uint32_t(p.X);
}

// out[row, n] from the float32 sums of each stack: the product (plus bias),
// or silu(gate) * up.
template <typename T, int STACKS>
__device__ __forceinline__ T epilogue(const GatherParams& p, const float (&v)[STACKS], int e, int n) {
  if constexpr (STACKS == 2) { // the products rounded to T first, as the CPU kernel and the unfused graph
    const float g = to_float(from_float<T>(v[0])), u = to_float(from_float<T>(v[1]));
    return from_float<T>(g / (1.0f + expf(-g)) * u);
  } else {
    float r = v[0];
    if (p.bias) r += to_float(static_cast<const T*>(p.bias)[(p.bias_per_expert ? int64_t(e) * p.N : 0) + n]);
    return from_float<T>(r);
  }
}

// One tile: rows n0 .. n0 + 15 of expert e's W (of each stack) against the
// pair-rows rows[0 .. count), count <= 8 MT, written by the caller to shared
// memory before the call. Thread, warp and block as in qmv_tc: lane (g, t)
// takes rows g and g + 8 of W and x row g of each 8-row x tile; warp w the
// w-th quarter of K's spans; the quarters are summed through `partial`.
// WN = 4 instead: warp w takes rows n0 + 16 w .. + 15 over all of K (64 rows
// of W per block, x read once per block from L2 and by the other warps from
// L1) and writes its own outputs; `partial` is unused. Only
// bench/cuda/gather_qmm.cu instantiates WN = 4 (measured there beside WN = 1).
// Every thread of the block calls it (it synchronizes).
template <typename T, int BITS, int U, int MT, int STACKS, int WN = 1>
__device__ __forceinline__ void gather_tile(const GatherParams& p, int e, int n0, const int* rows, int count,
                                            float (*partial)[32][4 * MT * STACKS]) {
  static_assert(WN == 1 || WN == 4, "warps over K, or over N");
  constexpr int V = 32 / BITS, VPC = 4 * V, SPAN = 4 * VPC;
  static_assert(VPC == gather_tc_k_multiple(BITS) && GATHER_TC_THREADS == 4 * 32 && GATHER_TC_ROWS == 16,
                "layout");
  static_assert(MT == 1 || U == 1, "several x tiles: one span at a time");
  constexpr int SUBS = VPC > 32 ? VPC / 32 : 1;
  constexpr int WORDS_PER_SUB = 4 / SUBS;
  constexpr int STEPS = V / 4;
  __syncthreads(); // rows written; partial free (an earlier tile's sums read)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int N = p.N, K = p.K, M = p.M, gs = p.group_size, G = K / gs;
  const int64_t row_bytes = int64_t(K) * BITS / 8;
  if constexpr (WN == 4) n0 += GATHER_TC_ROWS * warp;
  const int wrows[2] = {min(n0 + g, N - 1), min(n0 + g + 8, N - 1)}; // past N: recomputed, never stored
  const int gs_shift = __ffs(gs) - 1;
  bool has_x[MT];
  const T* x[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int j = 8 * i + g;
    has_x[i] = j < count;
    int64_t xrow = 0;
    if (has_x[i]) {
      const int r = rows[j], pair = r / M;
      xrow = int64_t(p.lhs[pair]) * M + (r - pair * M);
    }
    x[i] = static_cast<const T*>(p.x) + xrow * K;
  }
  const uint32_t magic = opaque(dequant_magic<T>(), p.P);
  // K is a multiple of VPC, not always of SPAN (GPT-OSS: 2880 = 22.5 spans of
  // 4-bit W): a lane's chunk past K loads nothing and counts as zeros.
  const int spans = (K + SPAN - 1) / SPAN;
  const int s_begin = WN == 1 ? warp * spans / 4 : 0, s_end = WN == 1 ? (warp + 1) * spans / 4 : spans;
  float d[STACKS][MT][4] = {};

#pragma unroll
  for (int st = 0; st < STACKS; ++st) {
    const uint8_t* w[2];
    const uint16_t *scales[2], *biases[2];
    const uint32_t* wbase = st ? p.w_up : p.w;
    const uint16_t* sbase = static_cast<const uint16_t*>(st ? p.scales_up : p.scales);
    const uint16_t* bbase = static_cast<const uint16_t*>(st ? p.biases_up : p.biases);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = int64_t(e) * N + wrows[r];
      w[r] = reinterpret_cast<const uint8_t*>(wbase) + row * row_bytes;
      scales[r] = sbase + row * G;
      biases[r] = bbase + row * G;
    }
    for (int s0 = s_begin; s0 < s_end; s0 += U) {
      uint4 wv[U][2];
      uint32_t sbv[U][2][SUBS];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s0 + u >= s_end) break;
        const int k0 = (s0 + u) * SPAN + t * VPC;
        const bool in_k = k0 < K;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          wv[u][r] = in_k ? load_stream16(w[r] + k0 * BITS / 8) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int h = 0; h < SUBS; ++h) { // scale 0, bias 0 past K: W reads as zeros
            const int gi = (k0 + 32 * h) >> gs_shift;
            sbv[u][r][h] = in_k ? __ldg(scales[r] + gi) | (uint32_t(__ldg(biases[r] + gi)) << 16) : 0u;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s0 + u >= s_end) break;
        const int k0 = (s0 + u) * SPAN + t * VPC;
        const uint32_t wa[4] = {wv[u][0].x, wv[u][0].y, wv[u][0].z, wv[u][0].w};
        const uint32_t wb[4] = {wv[u][1].x, wv[u][1].y, wv[u][1].z, wv[u][1].w};
        const bool in_k = k0 < K;
        auto load_x = [&](int i, uint4 (&xv)[VPC / 8]) {
#pragma unroll
          for (int l = 0; l < VPC / 8; ++l)
            xv[l] = has_x[i] && in_k ? __ldg(reinterpret_cast<const uint4*>(x[i] + k0) + l) : make_uint4(0, 0, 0, 0);
        };
        if constexpr (MT == 1) {
          uint4 xv[VPC / 8];
          load_x(0, xv);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int h = c / WORDS_PER_SUB;
            uint32_t a[STEPS][4];
            qmv_tc_dequant_word<T, BITS>(a, wa[c], wb[c], sbv[u][0][h], sbv[u][1][h], magic);
            qmv_tc_mma_word<T, BITS>(d[st][0], a, reinterpret_cast<const uint32_t*>(xv) + c * (V / 2));
          }
        } else {
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
              qmv_tc_mma_word<T, BITS>(d[st][i], a[c], reinterpret_cast<const uint32_t*>(xv) + c * (V / 2));
          }
        }
      }
    }
  }

  // d[st][i]: (W row g, x rows 2t, 2t + 1 of tile i), (W row g + 8, same x rows).
  if constexpr (WN == 4) {
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int j = 8 * i + 2 * t + (q % 2), n = n0 + g + 8 * (q / 2);
        if (j >= count || n >= N) continue;
        float v[STACKS];
#pragma unroll
        for (int st = 0; st < STACKS; ++st) v[st] = d[st][i][q];
        out[int64_t(rows[j]) * N + n] = epilogue<T, STACKS>(p, v, e, n);
      }
  } else { // the quarters of K summed by warp 0
#pragma unroll
    for (int st = 0; st < STACKS; ++st)
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) partial[warp][lane][(st * MT + i) * 4 + q] = d[st][i][q];
    __syncthreads();
    if (warp == 0) {
      T* out = static_cast<T*>(p.out);
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int j = 8 * i + 2 * t + (q % 2), n = n0 + g + 8 * (q / 2);
          if (j >= count || n >= N) continue;
          float v[STACKS];
#pragma unroll
          for (int st = 0; st < STACKS; ++st) {
            const int c = (st * MT + i) * 4 + q;
            v[st] = partial[0][lane][c] + partial[1][lane][c] + partial[2][lane][c] + partial[3][lane][c];
          }
          out[int64_t(rows[j]) * N + n] = epilogue<T, STACKS>(p, v, e, n);
        }
    }
  }
}

// Decode: grid (P, ceil(N / 16)), GATHER_TC_THREADS threads; P M <=
// GATHER_DECODE_MAX_ROWS. Block (pair, n0): see the header comment.
template <typename T, int BITS, int STACKS>
__device__ __forceinline__ void gather_tc_decode(const GatherParams& p) {
  __shared__ int rows[GATHER_DECODE_MAX_ROWS];
  __shared__ float partial[4][32][4 * STACKS];
  __shared__ int total_rows;
  const int64_t pair = blockIdx.x;
  const int n0 = blockIdx.y * GATHER_TC_ROWS, M = p.M, N = p.N;
  if (!pair_valid(p, pair)) { // reads nothing: NaN rows (as the CPU and Metal kernels)
    T* out = static_cast<T*>(p.out) + pair * M * N;
    for (int i = threadIdx.x; i < M * GATHER_TC_ROWS; i += blockDim.x) {
      const int n = n0 + i % GATHER_TC_ROWS;
      if (n < N) out[int64_t(i / GATHER_TC_ROWS) * N + n] = nan_value<T>();
    }
    return;
  }
  const uint32_t e = p.rhs[pair];
  // Only the first valid pair of expert e works; it takes all of them.
  bool earlier = false;
  for (int64_t q = threadIdx.x; q < pair; q += blockDim.x) earlier |= p.rhs[q] == e && pair_valid(p, q);
  if (__syncthreads_or(earlier)) return;
  if (threadIdx.x < 32) { // warp 0: this expert's pairs from `pair` on, in order
    const int lane = threadIdx.x;
    int count = 0;
    for (int64_t q0 = pair; q0 < p.P; q0 += 32) {
      const int64_t q = q0 + lane;
      const bool mine = q < p.P && p.rhs[q] == e && pair_valid(p, q);
      const unsigned ballot = __ballot_sync(0xffffffffu, mine);
      if (mine) {
        const int slot = count + __popc(ballot & ((1u << lane) - 1));
        for (int m = 0; m < M; ++m) rows[slot * M + m] = int(q) * M + m;
      }
      count += __popc(ballot);
    }
    if (lane == 0) total_rows = count * M;
  }
  __syncthreads();
  const int total = total_rows;
  for (int c = 0; c < total; c += 8)
    gather_tile<T, BITS, qmv_tc_spans(BITS), 1, STACKS>(p, int(e), n0, rows + c, min(8, total - c), partial);
}

// Exclusive prefix sums of one value per thread over a block of
// GATHER_GROUP_THREADS threads; *total gets the sum (every thread).
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_sums, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inc = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int u = __shfl_up_sync(0xffffffffu, inc, off);
    if (lane >= off) inc += u;
  }
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    int w = warp_sums[lane]; // GATHER_GROUP_THREADS / 32 == 32 warps
    int winc = w;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int u = __shfl_up_sync(0xffffffffu, winc, off);
      if (lane >= off) winc += u;
    }
    warp_sums[lane] = winc - w;
    if (lane == 31) *total = winc;
  }
  __syncthreads();
  const int r = warp_sums[warp] + inc - v;
  __syncthreads(); // warp_sums free for the next scan
  return r;
}

// The grouping pass: one block of GATHER_GROUP_THREADS threads. Counts the
// pairs per expert (bucket E: out-of-range pairs), scans the counts into
// offsets and tile_offsets (tiles of p.tile_rows pair-rows), scatters the
// pair indices into order, and writes NaN to the rows of the invalid pairs.
// Within an expert the order of pairs is that of the atomics: each output
// row is computed alone, so the result does not depend on it.
template <typename T>
__device__ __forceinline__ void gather_group(const GatherParams& p) {
  static_assert(GATHER_GROUP_THREADS == 1024, "block_exclusive_scan: 32 warps");
  __shared__ int warp_sums[32];
  __shared__ int total;
  const int E = p.E, M = p.M, tid = threadIdx.x;
  const int64_t P = p.P;
  auto bucket = [&](int64_t q) { return pair_valid(p, q) ? int(p.rhs[q]) : E; };
  for (int e = tid; e <= E; e += blockDim.x) p.cursor[e] = 0;
  __syncthreads();
  for (int64_t q = tid; q < P; q += blockDim.x) atomicAdd(&p.cursor[bucket(q)], 1);
  __syncthreads();
  // Thread tid owns experts e0 .. e1 - 1.
  const int per = (E + 1 + blockDim.x - 1) / blockDim.x;
  const int e0 = min(E + 1, tid * per), e1 = min(E + 1, e0 + per);
  auto tiles_of = [&](int e, int c) { return e < E ? (c * M + p.tile_rows - 1) / p.tile_rows : 0; };
  int pairs = 0, tiles = 0;
  for (int e = e0; e < e1; ++e) {
    const int c = p.cursor[e];
    pairs += c;
    tiles += tiles_of(e, c);
  }
  int pair_off = block_exclusive_scan(pairs, warp_sums, &total);
  int tile_off = block_exclusive_scan(tiles, warp_sums, &total);
  for (int e = e0; e < e1; ++e) { // tile_offsets[E]: the number of tiles
    const int c = p.cursor[e];
    p.offsets[e] = pair_off;
    p.tile_offsets[e] = tile_off;
    p.cursor[e] = pair_off;
    pair_off += c;
    tile_off += tiles_of(e, c);
  }
  if (tid == 0) p.offsets[E + 1] = int(P);
  __syncthreads();
  for (int64_t q = tid; q < P; q += blockDim.x) p.order[atomicAdd(&p.cursor[bucket(q)], 1)] = int(q);
  __syncthreads();
  const int first_invalid = p.offsets[E];
  const int64_t row_elems = int64_t(M) * p.N;
  const int64_t invalid_elems = (P - first_invalid) * row_elems;
  T* out = static_cast<T*>(p.out);
  for (int64_t i = tid; i < invalid_elems; i += blockDim.x)
    out[int64_t(p.order[first_invalid + i / row_elems]) * row_elems + i % row_elems] = nan_value<T>();
}

// Prefill: grid (an upper bound on the tiles, ceil(N / (16 WN))),
// GATHER_TC_THREADS threads, after gather_group with tile_rows = 8 MT.
template <typename T, int BITS, int MT, int STACKS, int WN = 1>
__device__ __forceinline__ void gather_tc_tiles(const GatherParams& p) {
  __shared__ int rows[8 * MT];
  __shared__ float partial[WN == 1 ? 4 : 1][32][4 * MT * STACKS];
  const int tile = blockIdx.x, n0 = blockIdx.y * GATHER_TC_ROWS * WN, E = p.E, M = p.M;
  if (tile >= p.tile_offsets[E]) return;
  int lo = 0, hi = E - 1; // the last expert whose first tile is <= tile (empty ones skip)
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.tile_offsets[mid] <= tile) lo = mid;
    else hi = mid - 1;
  }
  const int e = lo;
  const int first = (tile - p.tile_offsets[e]) * (8 * MT);
  const int count = min(8 * MT, (p.offsets[e + 1] - p.offsets[e]) * M - first);
  if (threadIdx.x < count) {
    const int r = first + threadIdx.x, pair = p.order[p.offsets[e] + r / M];
    rows[threadIdx.x] = pair * M + r % M;
  }
  gather_tile<T, BITS, 1, MT, STACKS, WN>(p, e, n0, rows, count, partial);
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::GATHER_GROUP_THREADS;
using mlx_ext::cuda::GATHER_TC_THREADS;
using mlx_ext::cuda::GatherParams;

// Names (cuda_plan.h chooses): gather_tc_decode_<x type>_b<bits>[_swiglu],
// gather_tc_tiles_<x type>_b<bits>_m<8 MT>[_swiglu], gather_group_<x type>.
#define GATHER_TC(T, NAME, BITS, STACKS, SUFFIX)                                                     \
  extern "C" __global__ void __launch_bounds__(GATHER_TC_THREADS)                                   \
      gather_tc_decode_##NAME##_b##BITS##SUFFIX(const GatherParams p) {                              \
    mlx_ext::cuda::gather_tc_decode<T, BITS, STACKS>(p);                                            \
  }
#define GATHER_TILES(T, NAME, BITS, MT, STACKS, SUFFIX)                                              \
  extern "C" __global__ void __launch_bounds__(GATHER_TC_THREADS)                                   \
      gather_tc_tiles_##NAME##_b##BITS##_m##MT##SUFFIX(const GatherParams p) {                       \
    mlx_ext::cuda::gather_tc_tiles<T, BITS, MT / 8, STACKS>(p);                                      \
  }
#define GATHER_PER_BITS(T, NAME, BITS, MT)                                                           \
  GATHER_TC(T, NAME, BITS, 1, ) GATHER_TC(T, NAME, BITS, 2, _swiglu)                                 \
  GATHER_TILES(T, NAME, BITS, MT, 1, ) GATHER_TILES(T, NAME, BITS, MT, 2, _swiglu)
#define GATHER_PER_TYPE(T, NAME)                                                                     \
  GATHER_PER_BITS(T, NAME, 2, 8) GATHER_PER_BITS(T, NAME, 4, 32) GATHER_PER_BITS(T, NAME, 8, 32)    \
  extern "C" __global__ void __launch_bounds__(GATHER_GROUP_THREADS) gather_group_##NAME(             \
      const GatherParams p) {                                                                        \
    mlx_ext::cuda::gather_group<T>(p);                                                               \
  }
GATHER_PER_TYPE(bf16, bfloat16)
GATHER_PER_TYPE(f16, float16)
