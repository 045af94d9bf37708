// The fused attention backward on CUDA cores, recomputing the probabilities
// from the forward's log-sum-exp (p = exp(s - lse)), for any L, S and mask:
// attn_bwd_dq (dq; float or quantized K/V) and attn_bwd_dkv (dk and dv;
// float K/V). With delta = sum(d_out * out) per row and dp = d_out . v_j,
// ds = p (dp - delta): dq = scale sum_j ds k_j, dk_j = scale sum_i ds q_i,
// dv_j = sum_i p d_out_i. Lane layout of attn_vec (attn_vec.cu): 8 values of
// D per lane, DMAX / 8 lanes per key or row.
#include "attention/cuda_device.cuh"

namespace mlx_ext::cuda {
namespace {

// The logit (base 2) of key j for a row, after visibility and the mask; -inf
// where the row does not see it.
__device__ __forceinline__ float masked_logit(const AttnParams& p, float s, int j, KeyRange kr,
                                              int64_t mrow) {
  if (j < kr.lo || j >= kr.hi) return neg_inf();
  return p.mask ? apply_mask(p, mrow, j, s) : s;
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&v)[8], float scale) {
#pragma unroll
  for (int e = 0; e < 8; ++e) dst[e] = from_float<T>(v[e] * scale);
}

// Block: BWD_ROWS rows of one kv head (as attn_vec's), over every key they
//   see; each slot of lanes takes keys slot, slot + NSLOTS, ... and keeps its
//   own dq sums, added over slots and warps at the end.
template <typename T, int BITS, int DMAX>
__device__ __forceinline__ void attn_bwd_dq(const AttnParams& p) {
  constexpr int LPK = DMAX / 8, KPW = 32 / LPK, NSLOTS = BWD_WARPS * KPW, R = BWD_ROWS;
  __shared__ __align__(16) float sm_dq[BWD_WARPS][R][DMAX];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = lane % LPK, slot = warp * KPW + lane / LPK;
  const int D = p.D, L = p.L, G = p.Hq / p.Hkv, rows_total = G * L;
  const bool lane_on = 8 * c < D;
  const int b = blockIdx.z / p.Hkv, hkv = blockIdx.z % p.Hkv, row0 = blockIdx.x * R;
  const int len = kv_length(p, b);
  const float qscale = p.scale * kLog2e;

  float q[R][8], dout[R][8], dq[R][8], lse2[R], delta[R];
  KeyRange kr[R];
  int64_t mrow[R];
  int key_lo = p.S, key_hi = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    kr[r] = KeyRange{0, 0};
    mrow[r] = 0, lse2[r] = neg_inf(), delta[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) q[r][e] = dout[r][e] = dq[r][e] = 0.0f;
    if (row0 + r < rows_total) {
      const int h = hkv * G + (row0 + r) / L, i = (row0 + r) % L;
      const int64_t row = (int64_t(b) * p.Hq + h) * L + i;
      if (lane_on) {
        load8_f(static_cast<const T*>(p.q) + row * D + 8 * c, q[r]);
        load8_f(static_cast<const T*>(p.d_out) + row * D + 8 * c, dout[r]);
#pragma unroll
        for (int e = 0; e < 8; ++e) q[r][e] *= qscale;
      }
      lse2[r] = p.bwd_lse[row] * kLog2e;
      delta[r] = p.delta[row];
      kr[r] = visible_keys(p, len, i);
      if (lse2[r] == neg_inf()) kr[r] = KeyRange{0, 0};
      if (kr[r].lo < kr[r].hi) key_lo = min(key_lo, kr[r].lo), key_hi = max(key_hi, kr[r].hi);
      if (p.mask) mrow[r] = mask_row(p, b, h, i);
    }
  }

  for (int base = key_lo; base < key_hi; base += NSLOTS) { // block-uniform: shuffles below
    const int j = base + slot;
    float kf[8], vf[8];
    if (j < key_hi && lane_on) {
      load_kv8<T, BITS>(p.k, b, hkv, j, c, D, p.group_size, kf);
      load_kv8<T, BITS>(p.v, b, hkv, j, c, D, p.group_size, vf);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) kf[e] = vf[e] = 0.0f;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) s = fmaf(q[r][e], kf[e], s), dp = fmaf(dout[r][e], vf[e], dp);
#pragma unroll
      for (int off = LPK / 2; off > 0; off /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, off);
        dp += __shfl_xor_sync(0xffffffffu, dp, off);
      }
      const float x = j < key_hi ? masked_logit(p, s, j, kr[r], mrow[r]) : neg_inf();
      const float pr = x == neg_inf() ? 0.0f : exp2f(x - lse2[r]);
      const float ds = pr * (dp - delta[r]);
#pragma unroll
      for (int e = 0; e < 8; ++e) dq[r][e] = fmaf(ds, kf[e], dq[r][e]);
    }
  }

#pragma unroll
  for (int off = LPK; off < 32; off *= 2)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < 8; ++e) dq[r][e] += __shfl_xor_sync(0xffffffffu, dq[r][e], off);
  if (lane < LPK)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < 8; ++e) sm_dq[warp][r][8 * c + e] = dq[r][e];
  __syncthreads();
  for (int idx = threadIdx.x; idx < R * D; idx += BWD_THREADS) {
    const int r = idx / D, d = idx % D;
    if (row0 + r >= rows_total) break;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < BWD_WARPS; ++w) sum += sm_dq[w][r][d];
    const int h = hkv * G + (row0 + r) / L, i = (row0 + r) % L;
    static_cast<T*>(p.dq)[((int64_t(b) * p.Hq + h) * L + i) * D + d] = from_float<T>(sum * p.scale);
  }
}

// Block: NSLOTS keys [j0, j0 + NSLOTS) of kv head blockIdx.z % Hkv of batch
//   blockIdx.z / Hkv, one per slot of lanes, over the rows of its G query
//   heads that can see any of them (causal and window bound the queries).
template <typename T, int DMAX>
__device__ __forceinline__ void attn_bwd_dkv(const AttnParams& p) {
  constexpr int LPK = DMAX / 8, KPW = 32 / LPK, NSLOTS = BWD_WARPS * KPW;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = lane % LPK, slot = warp * KPW + lane / LPK;
  const int D = p.D, L = p.L, G = p.Hq / p.Hkv;
  const bool lane_on = 8 * c < D;
  const int b = blockIdx.z / p.Hkv, hkv = blockIdx.z % p.Hkv;
  const int j0 = blockIdx.x * NSLOTS, j = j0 + slot;
  const int len = kv_length(p, b);
  const float qscale = p.scale * kLog2e;

  float kf[8], vf[8], dk[8], dv[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) kf[e] = vf[e] = dk[e] = dv[e] = 0.0f;
  if (j < p.S && lane_on) {
    load_kv8<T, 0>(p.k, b, hkv, j, c, D, p.group_size, kf);
    load_kv8<T, 0>(p.v, b, hkv, j, c, D, p.group_size, vf);
  }
  // Rows that see any key of [j0, j1): causal rows from the one whose
  // position reaches j0; with a window, up to the last whose window reaches j1 - 1.
  const int j1 = min(j0 + NSLOTS, len);
  int i_begin = 0, i_end = j0 < len ? L : 0;
  if (p.causal && i_end) {
    i_begin = max(0, j0 - len + L);
    if (p.window) i_end = min(L, max(0, j1 - 1 - len + L + p.window));
  }
  for (int g = 0; g < G; ++g) {
    const int h = hkv * G + g;
    for (int i = i_begin; i < i_end; ++i) { // block-uniform: shuffles below
      const int64_t row = (int64_t(b) * p.Hq + h) * L + i;
      float q[8], dout[8];
      if (lane_on) {
        load8_f(static_cast<const T*>(p.q) + row * D + 8 * c, q);
        load8_f(static_cast<const T*>(p.d_out) + row * D + 8 * c, dout);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) q[e] = dout[e] = 0.0f;
      }
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) s = fmaf(q[e], kf[e], s), dp = fmaf(dout[e], vf[e], dp);
#pragma unroll
      for (int off = LPK / 2; off > 0; off /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, off);
        dp += __shfl_xor_sync(0xffffffffu, dp, off);
      }
      const float lse2 = p.bwd_lse[row] * kLog2e;
      const float x = j < p.S && lse2 != neg_inf()
          ? masked_logit(p, s * qscale, j, visible_keys(p, len, i), p.mask ? mask_row(p, b, h, i) : 0)
          : neg_inf();
      const float pr = x == neg_inf() ? 0.0f : exp2f(x - lse2);
      const float ds = pr * (dp - p.delta[row]);
#pragma unroll
      for (int e = 0; e < 8; ++e) dv[e] = fmaf(pr, dout[e], dv[e]), dk[e] = fmaf(ds, q[e], dk[e]);
    }
  }
  if (j < p.S && lane_on) {
    const int64_t at = ((int64_t(b) * p.Hkv + hkv) * p.S + j) * D + 8 * c;
    store8(static_cast<T*>(p.dk) + at, dk, p.scale);
    store8(static_cast<T*>(p.dv) + at, dv, 1.0f);
  }
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::AttnParams;
using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;

// Kernel names (chosen by cuda_plan.h): attn_bwd_dq_<q type>_b<bits>_d<DMAX>,
// attn_bwd_dkv_<q type>_d<DMAX>.
#define ATTN_BWD_DQ(T, NAME, BITS, DMAX)                                                           \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::BWD_THREADS)                         \
      attn_bwd_dq_##NAME##_b##BITS##_d##DMAX(const AttnParams p) {                                 \
    mlx_ext::cuda::attn_bwd_dq<T, BITS, DMAX>(p);                                                  \
  }
#define ATTN_BWD_DKV(T, NAME, DMAX)                                                                \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::BWD_THREADS)                         \
      attn_bwd_dkv_##NAME##_d##DMAX(const AttnParams p) {                                          \
    mlx_ext::cuda::attn_bwd_dkv<T, DMAX>(p);                                                       \
  }
#define ATTN_BWD_D(T, NAME, DMAX) \
  ATTN_BWD_DQ(T, NAME, 0, DMAX) ATTN_BWD_DQ(T, NAME, 4, DMAX) ATTN_BWD_DQ(T, NAME, 8, DMAX) ATTN_BWD_DKV(T, NAME, DMAX)
#define ATTN_BWD_TYPE(T, NAME) ATTN_BWD_D(T, NAME, 64) ATTN_BWD_D(T, NAME, 128) ATTN_BWD_D(T, NAME, 256)

ATTN_BWD_TYPE(float, float32)
ATTN_BWD_TYPE(f16, float16)
ATTN_BWD_TYPE(bf16, bfloat16)
