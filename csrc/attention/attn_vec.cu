// Split-K attention on CUDA cores (flash-decoding) and the log-sum-exp merge
// of its chunks (attn_merge, which attn_dec_mma.cu's tensor-core decode uses
// too). attn_vec takes every call the tensor-core kernels do not (cuda_plan.h):
// float32, head dims and quantized layouts they lack, a GPU below sm_80; all
// of one kv head's query heads share each K/V load. Any mask kind, sinks (in
// the merge), kv_lengths, windows.
#include "attention/cuda_device.cuh"

namespace mlx_ext::cuda {
namespace {

// Keys base + u * NSLOTS + slot (u < U) of K and V as loaded: the lane's
// pieces of 8 values (piece e of lane c: values 8 (c P + e) ..), zeros past
// k1 and past D.
template <typename T, int BITS, int U, int P, int NSLOTS>
__device__ __forceinline__ void load_step(const AttnParams& p, int b, int hkv, int base, int k1, int slot,
                                          int c, KvRaw<T, BITS> (&kr)[U][P], KvRaw<T, BITS> (&vr)[U][P]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int j = base + u * NSLOTS + slot;
#pragma unroll
    for (int e = 0; e < P; ++e) {
      if (j < k1 && 8 * (c * P + e) < p.D) {
        load_kv_raw<T, BITS>(p.k, b, hkv, j, c * P + e, p.D, p.group_size, kr[u][e]);
        load_kv_raw<T, BITS>(p.v, b, hkv, j, c * P + e, p.D, p.group_size, vr[u][e]);
      } else {
        zero_raw(kr[u][e]), zero_raw(vr[u][e]);
      }
    }
  }
}

// Block: VEC_ROWS rows (r -> query head hkv * G + r / L, query r % L) of kv
//   head blockIdx.z % Hkv of batch blockIdx.z / Hkv, over the keys of chunk
//   blockIdx.y that any of its rows sees.
// Lane: P = VEC_PIECES pieces of 8 values of D (lane c: values from 8 c P,
//   idle past D), for one key at a time of its slot: LPK = DMAX / (8 P) lanes
//   per key, so a warp holds 32 / LPK slots. Each slot keeps its own running max, sum and accumulator (base-2
//   logits: q is scaled by scale * log2 e) over keys base + u * NSLOTS + slot,
//   U keys per step loaded before any is used; the slots and warps are
//   merged at the end, and the chunk's partials written for attn_merge.
template <typename T, int BITS, int DMAX>
__device__ __forceinline__ void attn_vec(const AttnParams& p) {
  constexpr int P = VEC_PIECES, LPK = vec_lanes_per_key(DMAX), KPW = 32 / LPK, NSLOTS = VEC_WARPS * KPW;
  constexpr int U = vec_unroll(BITS), R = VEC_ROWS;
  __shared__ float sm_ml[VEC_WARPS][R][2];
  __shared__ __align__(16) float sm_acc[VEC_WARPS][R][DMAX];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = lane % LPK, slot = warp * KPW + lane / LPK;
  const int D = p.D, L = p.L, G = p.Hq / p.Hkv, rows_total = G * L;
  const int b = blockIdx.z / p.Hkv, hkv = blockIdx.z % p.Hkv;
  const int row0 = blockIdx.x * R;
  const int len = kv_length(p, b);
  const float qscale = p.scale * kLog2e;

  float q[R][P][8];
  int lo[R], hi[R];
  int64_t mrow[R];
  int key_lo = p.S, key_hi = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    lo[r] = hi[r] = 0;
    mrow[r] = 0;
#pragma unroll
    for (int e = 0; e < P; ++e)
#pragma unroll
      for (int x = 0; x < 8; ++x) q[r][e][x] = 0.0f;
    if (row0 + r < rows_total) {
      const int h = hkv * G + (row0 + r) / L, i = (row0 + r) % L;
#pragma unroll
      for (int e = 0; e < P; ++e) {
        if (8 * (c * P + e) < D) {
          load8_f(static_cast<const T*>(p.q) + ((int64_t(b) * p.Hq + h) * L + i) * D + 8 * (c * P + e), q[r][e]);
#pragma unroll
          for (int x = 0; x < 8; ++x) q[r][e][x] *= qscale;
        }
      }
      const KeyRange kr = visible_keys(p, len, i);
      lo[r] = kr.lo, hi[r] = kr.hi;
      if (kr.lo < kr.hi) key_lo = min(key_lo, kr.lo), key_hi = max(key_hi, kr.hi);
      if (p.mask) mrow[r] = mask_row(p, b, h, i);
    }
  }
  // Keys every existing row of the block sees: steps inside them skip the
  // per-key visibility tests (rows past the block's end compute and drop).
  int all_lo = 0, all_hi = p.S;
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (row0 + r < rows_total) all_lo = max(all_lo, lo[r]), all_hi = min(all_hi, hi[r]);
  const int c0 = blockIdx.y * p.chunk_len;
  const int k0 = max(c0, key_lo), k1 = min(min(c0 + p.chunk_len, p.S), key_hi);

  float m[R], l[R], acc[R][P][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = neg_inf(), l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < P; ++e)
#pragma unroll
      for (int x = 0; x < 8; ++x) acc[r][e][x] = 0.0f;
  }

  // Double-buffered: step n + 1's loads are issued before step n's arithmetic.
  KvRaw<T, BITS> kr[U][P], vr[U][P];
  load_step<T, BITS, U, P, NSLOTS>(p, b, hkv, k0, k1, slot, c, kr, vr);
  for (int base = k0; base < k1; base += NSLOTS * U) { // block-uniform: shuffles below
    KvRaw<T, BITS> kn[U][P], vn[U][P];
    load_step<T, BITS, U, P, NSLOTS>(p, b, hkv, base + NSLOTS * U, k1, slot, c, kn, vn);
    float s[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float dot[R] = {};
#pragma unroll
      for (int e = 0; e < P; ++e) {
        float kf[8];
        decode_kv(kr[u][e], kf);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int x = 0; x < 8; ++x) dot[r] = fmaf(q[r][e][x], kf[x], dot[r]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int off = LPK / 2; off > 0; off /= 2) dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], off);
        s[u][r] = dot[r];
      }
    }
    const bool whole = !p.mask && base >= all_lo && base + NSLOTS * U <= min(k1, all_hi);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mx = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float v = s[u][r];
        if (!whole) {
          const int j = base + u * NSLOTS + slot;
          if (j >= k1 || j < lo[r] || j >= hi[r]) v = neg_inf();
          else if (p.mask) v = apply_mask(p, mrow[r], j, v);
        }
        s[u][r] = v;
        mx = fmaxf(mx, v);
      }
      if (mx == neg_inf()) continue; // nothing seen yet: m, l, acc stay as they are
      const float corr = exp2f(m[r] - mx);
      l[r] *= corr;
#pragma unroll
      for (int e = 0; e < P; ++e)
#pragma unroll
        for (int x = 0; x < 8; ++x) acc[r][e][x] *= corr;
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
#pragma unroll
      for (int e = 0; e < P; ++e) {
        float vf[8];
        decode_kv(vr[u][e], vf);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float pu = m[r] == neg_inf() ? 0.0f : s[u][r];
#pragma unroll
          for (int x = 0; x < 8; ++x) acc[r][e][x] = fmaf(pu, vf[x], acc[r][e][x]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int e = 0; e < P; ++e) kr[u][e] = kn[u][e], vr[u][e] = vn[u][e];
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
      for (int e = 0; e < P; ++e)
#pragma unroll
        for (int x = 0; x < 8; ++x) {
          const float o = __shfl_xor_sync(0xffffffffu, acc[r][e][x], off);
          acc[r][e][x] = acc[r][e][x] * a + o * a2;
        }
    }
  }
  if (lane < LPK) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (lane == 0) sm_ml[warp][r][0] = m[r], sm_ml[warp][r][1] = l[r];
#pragma unroll
      for (int e = 0; e < P; ++e)
#pragma unroll
        for (int x = 0; x < 8; ++x) sm_acc[warp][r][8 * (c * P + e) + x] = acc[r][e][x];
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

// Block: one row (b, h, i) of the flattened (B, Hq, L). The chunks' partials
// and the row's sink (an extra logit of no value) give out = sum_c acc_c
// 2^(m_c - M) / total and lse = ln(total) + M ln 2; a row with no key and no
// sink gets zeros and -inf. Threads first take chunks (max, then weights and
// total), then D / 4 float4 columns times MERGE_THREADS / (D / 4) groups of
// chunks, added over the groups at the end: every load independent.
template <typename T>
__device__ __forceinline__ void attn_merge(const AttnParams& p) {
  __shared__ float weight[kMaxMergeChunks];
  __shared__ float red[MERGE_THREADS / 32];
  __shared__ float4 part[MERGE_THREADS];
  const int64_t n_rows = int64_t(p.B) * p.Hq * p.L, row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, D = p.D;
  const int h = int(row / p.L % p.Hq);
  const float sink = p.sinks ? p.sinks[h] * kLog2e : neg_inf();
  auto block_reduce = [&](float v, bool is_max) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float o = __shfl_xor_sync(0xffffffffu, v, off);
      v = is_max ? fmaxf(v, o) : v + o;
    }
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = red[0];
#pragma unroll
    for (int w = 1; w < MERGE_THREADS / 32; ++w) v = is_max ? fmaxf(v, red[w]) : v + red[w];
    return v;
  };
  float M = sink;
  for (int c = tid; c < p.chunks; c += MERGE_THREADS) M = fmaxf(M, p.part_ml[2 * (c * n_rows + row)]);
  M = block_reduce(M, true);
  float total = 0.0f;
  for (int c = tid; c < p.chunks; c += MERGE_THREADS) {
    const int64_t at = 2 * (c * n_rows + row);
    const float w = M == neg_inf() ? 0.0f : exp2f(p.part_ml[at] - M);
    weight[c] = w;
    total += p.part_ml[at + 1] * w;
  }
  total = block_reduce(total, false) + (p.sinks && M != neg_inf() ? exp2f(sink - M) : 0.0f);
  const float inv = total > 0.0f ? 1.0f / total : 0.0f; // the weights are visible: block_reduce synced

  const int cols = D / 4, groups = MERGE_THREADS / cols, col = tid % cols, group = tid / cols;
  float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (group < groups) {
#pragma unroll 4
    for (int c = group; c < p.chunks; c += groups) {
      const float w = weight[c];
      const float4 a = reinterpret_cast<const float4*>(p.part_acc + (c * n_rows + row) * D)[col];
      o.x = fmaf(w, a.x, o.x), o.y = fmaf(w, a.y, o.y), o.z = fmaf(w, a.z, o.z), o.w = fmaf(w, a.w, o.w);
    }
  }
  part[tid] = o;
  __syncthreads();
  if (tid < cols) {
    for (int g = 1; g < groups; ++g) {
      const float4 a = part[g * cols + tid];
      o.x += a.x, o.y += a.y, o.z += a.z, o.w += a.w;
    }
    T* out = static_cast<T*>(p.out) + row * D + 4 * tid;
    out[0] = from_float<T>(o.x * inv), out[1] = from_float<T>(o.y * inv);
    out[2] = from_float<T>(o.z * inv), out[3] = from_float<T>(o.w * inv);
  }
  if (tid == 0) p.lse[row] = total > 0.0f ? (M + log2f(total)) * kLn2 : neg_inf();
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::AttnParams;
using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;

// Kernel names (chosen by cuda_plan.h): attn_vec_<q type, as MLX spells
// it>_b<bits>_d<DMAX>, attn_merge_<q type>.
#define ATTN_VEC(T, NAME, BITS, DMAX)                                                              \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::VEC_THREADS, 2)                     \
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
