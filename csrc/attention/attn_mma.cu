// The tensor-core attention forward (mma.sync m16n8k16, sm_80+): float16 /
// bfloat16 q with float K/V, head dims 64, 96, 128, 192 and 256, every mask
// kind, sinks, kv_lengths and windows. Key tiles that no row of a block sees
// (causal, window, kv_lengths) are skipped whole; tiles that every row sees
// whole are not masked element by element.
#include "attention/cuda_device.cuh"

// 0 drops split2's low part (P rounded to q's type, as FlashAttention does):
// for bench/cuda/attention.cu's measurement of what the split costs.
#ifndef MLX_EXT_MMA_SPLIT_P
#define MLX_EXT_MMA_SPLIT_P 1
#endif

namespace mlx_ext::cuda {
namespace {

// Block: MMA_BM query rows [q0, q0 + MMA_BM) of query head blockIdx.y % Hq of
//   batch blockIdx.y / Hq (the last row tiles first: causal rows see the most
//   keys there), against key tiles of BN keys, two stages in flight (cp.async).
// Shared memory (rows of D 16-bit values padded to D * 2 + 16 bytes, so that
//   ldmatrix's 8 rows fall in distinct banks): Q (MMA_BM rows), then K (2
//   stages of BN rows), then V (2 stages).
// Warp: 16 query rows; S = Q K^T in m16n8 accumulators (NT of them), the
//   online softmax in base 2 on them (row max and sum over the 4 lanes that
//   share a row), P converted in registers to mma's A operand (as two 16-bit
//   parts: split2), O += P V with V read transposed by ldmatrix.trans. Lane 4 g + t holds rows g and
//   g + 8 of the warp's 16, columns 2t and 2t + 1 of each 8.
template <typename T, int D>
__device__ __forceinline__ void attn_mma(const AttnParams& p) {
  constexpr int BN = mma_bn(D), RB = mma_row_bytes(D), NT = BN / 8, DT = D / 8, CH = D / 8;
  extern __shared__ __align__(16) char smem[];
  char* const sq = smem;
  char* const sk = smem + MMA_BM * RB;
  char* const sv = sk + 2 * BN * RB;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, hkv = h / (p.Hq / p.Hkv);
  const int L = p.L, q0 = (gridDim.x - 1 - blockIdx.x) * MMA_BM, q_last = min(L, q0 + MMA_BM) - 1;
  const int len = kv_length(p, b);
  // Both ends of a row's visible range grow with the row: the block's rows
  // see keys in [first.lo, last.hi), and every one of them sees [last.lo, first.hi).
  const KeyRange first = visible_keys(p, len, q0), last = visible_keys(p, len, q_last);
  const int kt0 = first.lo / BN;
  const int kt1 = last.hi > first.lo ? (last.hi + BN - 1) / BN : kt0;

  const T* qg = static_cast<const T*>(p.q) + int64_t(bh) * L * D;
  for (int idx = tid; idx < MMA_BM * CH; idx += MMA_THREADS) {
    const int r = idx / CH, ch = idx % CH;
    const bool ok = q0 + r < L;
    cp_async<16>(smem_u32(sq + r * RB + ch * 16), qg + int64_t(ok ? q0 + r : 0) * D + ch * 8, ok);
  }
  const T* kg = static_cast<const T*>(p.k.x.data);
  const T* vg = static_cast<const T*>(p.v.x.data);
  auto load_kv = [&](int stage, int kt) {
    for (int idx = tid; idx < BN * CH; idx += MMA_THREADS) {
      const int r = idx / CH, ch = idx % CH, j = kt * BN + r;
      const bool ok = j < p.S;
      const int jj = ok ? j : 0;
      const int at = (stage * BN + r) * RB + ch * 16;
      cp_async<16>(smem_u32(sk + at), kg + kv_row(p.k.x, b, hkv, jj) * D + ch * 8, ok);
      cp_async<16>(smem_u32(sv + at), vg + kv_row(p.v.x, b, hkv, jj) * D + ch * 8, ok);
    }
  };
  if (kt0 < kt1) load_kv(0, kt0);
  cp_async_commit();

  const float qscale = p.scale * kLog2e;
  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  // The sink joins as a logit of weight 1 at the start (one lane of the 4 that share a row).
  float m[2], l[2];
  KeyRange rr[2];
  int64_t mrow[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int i = q0 + warp * 16 + g + 8 * hh;
    m[hh] = p.sinks ? p.sinks[h] * kLog2e : neg_inf();
    l[hh] = p.sinks && t == 0 ? 1.0f : 0.0f;
    rr[hh] = i < L ? visible_keys(p, len, i) : KeyRange{0, 0};
    mrow[hh] = p.mask && i < L ? mask_row(p, b, h, i) : 0;
  }

  for (int kt = kt0; kt < kt1; ++kt) {
    const int stage = (kt - kt0) & 1;
    if (kt + 1 < kt1) {
      load_kv(stage ^ 1, kt + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const char* ks = sk + stage * BN * RB;
    const char* vs = sv + stage * BN * RB;

    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sq + (warp * 16 + (lane & 15)) * RB + (kk * 2 + (lane >> 4)) * 16);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t f[4];
        ldmatrix_x4(f, ks + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * RB + (kk * 2 + ((lane >> 3) & 1)) * 16);
        mma_m16n8k16<T>(s[2 * np], a, f[0], f[1], s[2 * np]);
        mma_m16n8k16<T>(s[2 * np + 1], a, f[2], f[3], s[2 * np + 1]);
      }
    }

    const int j0 = kt * BN;
    const bool whole = !p.mask && j0 >= last.lo && j0 + BN <= first.hi;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[nt][e] * qscale;
        if (!whole) {
          const int hh = e >> 1, j = j0 + nt * 8 + 2 * t + (e & 1);
          if (j < rr[hh].lo || j >= rr[hh].hi) v = neg_inf();
          else if (p.mask) v = apply_mask(p, mrow[hh], j, v);
        }
        s[nt][e] = v;
      }

#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = m[hh];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * hh], s[nt][2 * hh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mu = mx == neg_inf() ? 0.0f : mx; // a row that has seen nothing: all weights 0
      const float corr = exp2f(m[hh] - mu);
      m[hh] = mx;
      l[hh] *= corr;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) o[dt][2 * hh] *= corr, o[dt][2 * hh + 1] *= corr;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float p0 = exp2f(s[nt][2 * hh] - mu), p1 = exp2f(s[nt][2 * hh + 1] - mu);
        s[nt][2 * hh] = p0, s[nt][2 * hh + 1] = p1;
        l[hh] += p0 + p1;
      }
    }

#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4], a_lo[4];
      split2<T>(s[2 * kk][0], s[2 * kk][1], a[0], a_lo[0]);
      split2<T>(s[2 * kk][2], s[2 * kk][3], a[1], a_lo[1]);
      split2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1], a[2], a_lo[2]);
      split2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3], a[3], a_lo[3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t f[4];
        ldmatrix_x4_trans(f, vs + (kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3)) * RB + (dp * 2 + (lane >> 4)) * 16);
        mma_m16n8k16<T>(o[2 * dp], a, f[0], f[1], o[2 * dp]);
        mma_m16n8k16<T>(o[2 * dp + 1], a, f[2], f[3], o[2 * dp + 1]);
        if constexpr (MLX_EXT_MMA_SPLIT_P) {
          mma_m16n8k16<T>(o[2 * dp], a_lo, f[0], f[1], o[2 * dp]);
          mma_m16n8k16<T>(o[2 * dp + 1], a_lo, f[2], f[3], o[2 * dp + 1]);
        }
      }
    }
    __syncthreads(); // the next iteration's loads overwrite this stage
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float sum = l[hh];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int i = q0 + warp * 16 + g + 8 * hh;
    if (i >= L) continue;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    uint32_t* out = reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + (int64_t(bh) * L + i) * D);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) out[dt * 4 + t] = pack2<T>(o[dt][2 * hh] * inv, o[dt][2 * hh + 1] * inv);
    if (t == 0) p.lse[int64_t(bh) * L + i] = sum > 0.0f ? (m[hh] + log2f(sum)) * kLn2 : neg_inf();
  }
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::AttnParams;
using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;

// Kernel names (chosen by cuda_plan.h): attn_mma_<q type>_d<D>.
#define ATTN_MMA(T, NAME, D)                                                                      \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::MMA_THREADS)                        \
      attn_mma_##NAME##_d##D(const AttnParams p) {                                                \
    mlx_ext::cuda::attn_mma<T, D>(p);                                                             \
  }
#define ATTN_MMA_D(T, NAME) \
  ATTN_MMA(T, NAME, 64) ATTN_MMA(T, NAME, 96) ATTN_MMA(T, NAME, 128) ATTN_MMA(T, NAME, 192) ATTN_MMA(T, NAME, 256)

ATTN_MMA_D(f16, float16)
ATTN_MMA_D(bf16, bfloat16)
