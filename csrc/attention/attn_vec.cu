// Split-K attention on CUDA cores (flash-decoding) and the log-sum-exp merge
// of its chunks. attn_vec takes every call the tensor-core kernel does not:
// decode (a few query rows, all of one kv head's query heads sharing each
// K/V load), float32, quantized K/V, head dims that are not multiples of 16,
// unaligned data. Any mask kind, sinks (in the merge), kv_lengths, windows.
#include "attention/cuda_device.cuh"

namespace mlx_ext::cuda {
namespace {

// Block: VEC_ROWS rows (r -> query head hkv * G + r / L, query r % L) of kv
//   head blockIdx.z % Hkv of batch blockIdx.z / Hkv, over the keys of chunk
//   blockIdx.y that any of its rows sees.
// Lane: 8 values of D (chunk c of DMAX / 8, idle past D), for one key at a
//   time of its slot: LPK = DMAX / 8 lanes per key, so a warp holds 32 / LPK
//   slots. Each slot keeps its own running max, sum and accumulator (base-2
//   logits: q is scaled by scale * log2 e) over keys base + u * NSLOTS + slot,
//   U keys per step loaded before any is used; the slots and warps are
//   merged at the end, and the chunk's partials written for attn_merge.
template <typename T, int BITS, int DMAX>
__device__ __forceinline__ void attn_vec(const AttnParams& p) {
  constexpr int LPK = DMAX / 8, KPW = 32 / LPK, NSLOTS = VEC_WARPS * KPW;
  constexpr int U = vec_unroll(BITS), R = VEC_ROWS;
  __shared__ float sm_ml[VEC_WARPS][R][2];
  __shared__ __align__(16) float sm_acc[VEC_WARPS][R][DMAX];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = lane % LPK, slot = warp * KPW + lane / LPK;
  const int D = p.D, L = p.L, G = p.Hq / p.Hkv, rows_total = G * L;
  const bool lane_on = 8 * c < D;
  const int b = blockIdx.z / p.Hkv, hkv = blockIdx.z % p.Hkv;
  const int row0 = blockIdx.x * R;
  const int len = kv_length(p, b);
  const float qscale = p.scale * kLog2e;

  float q[R][8];
  int lo[R], hi[R];
  int64_t mrow[R];
  int key_lo = p.S, key_hi = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    lo[r] = hi[r] = 0;
    mrow[r] = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) q[r][e] = 0.0f;
    if (row0 + r < rows_total) {
      const int h = hkv * G + (row0 + r) / L, i = (row0 + r) % L;
      if (lane_on) {
        load8_f(static_cast<const T*>(p.q) + ((int64_t(b) * p.Hq + h) * L + i) * D + 8 * c, q[r]);
#pragma unroll
        for (int e = 0; e < 8; ++e) q[r][e] *= qscale;
      }
      const KeyRange kr = visible_keys(p, len, i);
      lo[r] = kr.lo, hi[r] = kr.hi;
      if (kr.lo < kr.hi) key_lo = min(key_lo, kr.lo), key_hi = max(key_hi, kr.hi);
      if (p.mask) mrow[r] = mask_row(p, b, h, i);
    }
  }
  const int c0 = blockIdx.y * p.chunk_len;
  const int k0 = max(c0, key_lo), k1 = min(min(c0 + p.chunk_len, p.S), key_hi);

  float m[R], l[R], acc[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = neg_inf(), l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.0f;
  }

  for (int base = k0; base < k1; base += NSLOTS * U) { // block-uniform: shuffles below
    KvRaw<T, BITS> kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * NSLOTS + slot;
      if (j < k1 && lane_on) {
        load_kv_raw<T, BITS>(p.k, b, hkv, j, c, D, p.group_size, kr[u]);
        load_kv_raw<T, BITS>(p.v, b, hkv, j, c, D, p.group_size, vr[u]);
      } else {
        zero_raw(kr[u]), zero_raw(vr[u]);
      }
    }
    float s[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      decode_kv(kr[u], kf);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(q[r][e], kf[e], dot);
#pragma unroll
        for (int off = LPK / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        s[u][r] = dot;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mx = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = base + u * NSLOTS + slot;
        float v = s[u][r];
        if (j >= k1 || j < lo[r] || j >= hi[r]) v = neg_inf();
        else if (p.mask) v = apply_mask(p, mrow[r], j, v);
        s[u][r] = v;
        mx = fmaxf(mx, v);
      }
      if (mx == neg_inf()) continue; // nothing seen yet: m, l, acc stay as they are
      const float corr = exp2f(m[r] - mx);
      l[r] *= corr;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] *= corr;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float pu = exp2f(s[u][r] - mx);
        l[r] += pu;
        s[u][r] = pu;
      }
      m[r] = mx;
    }
    // Each value row decoded once for all rows; s now holds the weights (a
    // row that has seen no key yet skipped the loop above: weight 0).
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      decode_kv(vr[u], vf);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float pu = m[r] == neg_inf() ? 0.0f : s[u][r];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(pu, vf[e], acc[r][e]);
      }
    }
  }

  // The slots of a warp (lanes c, c + LPK, ...) merged pairwise.
#pragma unroll
  for (int off = LPK; off < 32; off *= 2) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[r], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[r], off);
      float a, a2;
      merge_softmax(m[r], l[r], m2, l2, a, a2);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float o = __shfl_xor_sync(0xffffffffu, acc[r][e], off);
        acc[r][e] = acc[r][e] * a + o * a2;
      }
    }
  }
  if (lane < LPK) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (lane == 0) sm_ml[warp][r][0] = m[r], sm_ml[warp][r][1] = l[r];
#pragma unroll
      for (int e = 0; e < 8; ++e) sm_acc[warp][r][8 * c + e] = acc[r][e];
    }
  }
  __syncthreads();

  // The warps merged: thread t takes (row, d) pairs; the chunk's partials out.
  const int64_t n_rows = int64_t(p.B) * p.Hq * L;
  for (int idx = threadIdx.x; idx < R * D; idx += VEC_THREADS) {
    const int r = idx / D, d = idx % D;
    if (row0 + r >= rows_total) break;
    float M = neg_inf();
#pragma unroll
    for (int w = 0; w < VEC_WARPS; ++w) M = fmaxf(M, sm_ml[w][r][0]);
    float sum_l = 0.0f, sum_acc = 0.0f;
    if (M != neg_inf()) {
#pragma unroll
      for (int w = 0; w < VEC_WARPS; ++w) {
        const float f = exp2f(sm_ml[w][r][0] - M);
        sum_l += sm_ml[w][r][1] * f;
        sum_acc += sm_acc[w][r][d] * f;
      }
    }
    const int h = hkv * G + (row0 + r) / L, i = (row0 + r) % L;
    const int64_t row = (int64_t(b) * p.Hq + h) * L + i;
    const int64_t at = blockIdx.y * n_rows + row;
    p.part_acc[at * D + d] = sum_acc;
    if (d == 0) p.part_ml[2 * at] = M, p.part_ml[2 * at + 1] = sum_l;
  }
}

// Thread block of MERGE_THREADS: one warp per row (b, h, i) of the flattened
// (B, Hq, L); lanes over D. The chunks' partials and the row's sink (an extra
// logit of no value) give out = sum_c acc_c 2^(m_c - M) / total and lse =
// ln(total) + M ln 2; a row with no key and no sink gets zeros and -inf.
template <typename T>
__device__ __forceinline__ void attn_merge(const AttnParams& p) {
  const int64_t n_rows = int64_t(p.B) * p.Hq * p.L;
  const int64_t row = int64_t(blockIdx.x) * (MERGE_THREADS / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n_rows) return;
  const int h = int(row / p.L % p.Hq);
  float M = p.sinks ? p.sinks[h] * kLog2e : neg_inf();
  for (int c = 0; c < p.chunks; ++c) M = fmaxf(M, p.part_ml[2 * (c * n_rows + row)]);
  float total = 0.0f;
  if (M != neg_inf()) {
    if (p.sinks) total = exp2f(p.sinks[h] * kLog2e - M);
    for (int c = 0; c < p.chunks; ++c) {
      const int64_t at = 2 * (c * n_rows + row);
      total += p.part_ml[at + 1] * exp2f(p.part_ml[at] - M);
    }
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  T* out = static_cast<T*>(p.out) + row * p.D;
  for (int d = lane; d < p.D; d += 32) {
    float o = 0.0f;
    if (total > 0.0f)
      for (int c = 0; c < p.chunks; ++c) {
        const int64_t at = c * n_rows + row;
        o += p.part_acc[at * p.D + d] * exp2f(p.part_ml[2 * at] - M);
      }
    out[d] = from_float<T>(o * inv);
  }
  if (lane == 0) p.lse[row] = total > 0.0f ? (M + log2f(total)) * kLn2 : neg_inf();
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::AttnParams;
using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;

// Kernel names (chosen by cuda_plan.h): attn_vec_<q type, as MLX spells
// it>_b<bits>_d<DMAX>, attn_merge_<q type>.
#define ATTN_VEC(T, NAME, BITS, DMAX)                                                              \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::VEC_THREADS, 4)                       \
      attn_vec_##NAME##_b##BITS##_d##DMAX(const AttnParams p) {                                    \
    mlx_ext::cuda::attn_vec<T, BITS, DMAX>(p);                                                     \
  }
#define ATTN_VEC_D(T, NAME, BITS) ATTN_VEC(T, NAME, BITS, 64) ATTN_VEC(T, NAME, BITS, 128) ATTN_VEC(T, NAME, BITS, 256)
#define ATTN_VEC_TYPE(T, NAME)                                                                     \
  ATTN_VEC_D(T, NAME, 0) ATTN_VEC_D(T, NAME, 4) ATTN_VEC_D(T, NAME, 8)                             \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::MERGE_THREADS)                       \
      attn_merge_##NAME(const AttnParams p) {                                                      \
    mlx_ext::cuda::attn_merge<T>(p);                                                               \
  }

ATTN_VEC_TYPE(float, float32)
ATTN_VEC_TYPE(f16, float16)
ATTN_VEC_TYPE(bf16, bfloat16)
