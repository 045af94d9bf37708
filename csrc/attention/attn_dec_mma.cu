// Split-K decode on tensor cores (flash-decoding with mma.sync m16n8k16):
// the few query rows of one kv head (its G query heads times L queries, up
// to DEC_ROWS = 16 per block) against a chunk of keys, S = Q K^T and O += P V
// as mma tiles instead of per-key shuffles. Writes the same per-chunk
// partials as attn_vec, merged by attn_merge (attn_vec.cu) with the sinks.
// float16 / bfloat16 q and K/V, D = 64 / 128 / 256; everything else (float32,
// quantized K/V, other head dims) stays on attn_vec (cuda_plan.h).
#include "attention/cuda_device.cuh"

namespace mlx_ext::cuda {
namespace {

template <typename T>
__device__ __forceinline__ uint32_t dec_pack2(float a, float b) { // a in the low half
  if constexpr (std::is_same_v<T, bf16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// (a, b) as hi + lo, two 16-bit pairs: P enters P V at float32-level
// accuracy (the op's tolerance) for one more mma per V fragment; with 16
// query rows and memory-bound decode the mma is not what limits.
template <typename T>
__device__ __forceinline__ void dec_split2(float a, float b, uint32_t& hi, uint32_t& lo) {
  hi = dec_pack2<T>(a, b);
  float2 h;
  if constexpr (std::is_same_v<T, bf16>) {
    h = make_float2(__uint_as_float(hi << 16), __uint_as_float(hi & 0xffff0000u));
  } else {
    h = __half22float2(*reinterpret_cast<const __half2*>(&hi));
  }
  lo = dec_pack2<T>(a - h.x, b - h.y);
}

// Block: rows [row0, row0 + DEC_ROWS) of kv head blockIdx.z % Hkv of batch
//   blockIdx.z / Hkv (row r: query head hkv * G + r / L, query r % L; rows
//   past G L are zeros and see nothing), over the keys of chunk blockIdx.y
//   that any of its rows sees, cut into tiles of DEC_KEYS keys.
// Warp w takes tiles w, w + DEC_WARPS, ... through its own ring of
//   dec_stages(D) shared-memory stages (K then V, DEC_KEYS rows each, rows
//   padded to D * 2 + 16 bytes so ldmatrix's 8 rows hit distinct banks),
//   filled by cp.async stages - 1 tiles ahead: only __syncwarp between the
//   warp's own copies and its reads, so a block keeps 4 warps x (stages - 1)
//   tiles of K and V in flight.
// Lane 4 g + t holds rows g and g + 8, keys (or D columns) 2t, 2t + 1 of
//   each 8: S = Q K^T (Q's fragments loaded once), online softmax in base 2
//   per row (max over the 4 lanes of a row), O += P V with P split hi + lo
//   and V read transposed by ldmatrix.trans. At the end the warps' (m, l, O)
//   merge through shared memory into the chunk's partials.
template <typename T, int D>
__device__ __forceinline__ void attn_dec(const AttnParams& p) {
  constexpr int RB = dec_row_bytes(D), CH = D / 8, DT = D / 8, KT = D / 16;
  constexpr int NST = dec_stages(D), BK = DEC_KEYS, W = DEC_WARPS, R = DEC_ROWS;
  static_assert(BK == 16, "one k16 step of P V per tile");
  extern __shared__ __align__(16) char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  char* const sq = smem;
  char* const sw = smem + R * RB + warp * NST * 2 * BK * RB;
  const int L = p.L, G = p.Hq / p.Hkv, rows_total = G * L;
  const int b = blockIdx.z / p.Hkv, hkv = blockIdx.z % p.Hkv;
  const int row0 = blockIdx.x * R;
  const int len = kv_length(p, b);

  // Q's rows to shared memory (zeros past the last row).
  const T* qg = static_cast<const T*>(p.q);
  for (int idx = tid; idx < R * CH; idx += DEC_THREADS) {
    const int r = idx / CH, ch = idx % CH, rr = row0 + r;
    const bool ok = rr < rows_total;
    const int h = hkv * G + (ok ? rr : 0) / L, i = (ok ? rr : 0) % L;
    cp_async<16>(smem_u32(sq + r * RB + ch * 16), qg + ((int64_t(b) * p.Hq + h) * L + i) * D + ch * 8, ok);
  }
  cp_async_commit();

  // The keys any row of the block sees, and those every one sees (tiles
  // inside both skip the per-key tests).
  int key_lo = p.S, key_hi = 0, all_lo = 0, all_hi = p.S;
  for (int r = 0; r < R && row0 + r < rows_total; ++r) {
    const KeyRange kr = visible_keys(p, len, (row0 + r) % L);
    if (kr.lo < kr.hi) key_lo = min(key_lo, kr.lo), key_hi = max(key_hi, kr.hi);
    all_lo = max(all_lo, kr.lo), all_hi = min(all_hi, kr.hi);
  }
  const int c0 = blockIdx.y * p.chunk_len;
  const int k0 = max(c0, key_lo), k1 = min(min(c0 + p.chunk_len, p.S), key_hi);
  const int kb = k0 / BK * BK; // c0 is a multiple of BK: kb >= c0
  const int n_tiles = k0 < k1 ? (k1 - kb + BK - 1) / BK : 0;
  const int my_tiles = n_tiles > warp ? (n_tiles - warp + W - 1) / W : 0;

  // This lane's two rows.
  KeyRange rk[2];
  int64_t mrow[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int rr = row0 + g + 8 * hh;
    rk[hh] = KeyRange{0, 0};
    mrow[hh] = 0;
    if (rr < rows_total) {
      rk[hh] = visible_keys(p, len, rr % L);
      if (p.mask) mrow[hh] = mask_row(p, b, hkv * G + rr / L, rr % L);
    }
  }

  const T* kg = static_cast<const T*>(p.k.x.data);
  const T* vg = static_cast<const T*>(p.v.x.data);
  auto load_tile = [&](int stage, int n) { // the warp's n-th tile; zeros past k1
    const int j0 = kb + (warp + n * W) * BK;
    char* const ks = sw + stage * 2 * BK * RB;
    char* const vs = ks + BK * RB;
#pragma unroll 4
    for (int idx = lane; idx < BK * CH; idx += 32) {
      const int r = idx / CH, ch = idx % CH, j = j0 + r;
      const bool ok = j < k1;
      const int jj = ok ? j : 0;
      cp_async<16>(smem_u32(ks + r * RB + ch * 16), kg + kv_row(p.k.x, b, hkv, jj) * D + ch * 8, ok);
      cp_async<16>(smem_u32(vs + r * RB + ch * 16), vg + kv_row(p.v.x, b, hkv, jj) * D + ch * 8, ok);
    }
  };
#pragma unroll
  for (int s = 0; s < NST - 1; ++s) {
    if (s < my_tiles) load_tile(s, s);
    cp_async_commit();
  }
  cp_async_wait<NST - 1>(); // Q's group
  __syncthreads();
  uint32_t qa[KT][4];
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) ldmatrix_x4(qa[kk], sq + (lane & 15) * RB + (kk * 2 + (lane >> 4)) * 16);

  const float qscale = p.scale * kLog2e;
  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};

  for (int n = 0; n < my_tiles; ++n) {
    if (n + NST - 1 < my_tiles) load_tile((n + NST - 1) % NST, n + NST - 1);
    cp_async_commit();
    cp_async_wait<NST - 1>();
    __syncwarp();
    const char* ks = sw + (n % NST) * 2 * BK * RB;
    const char* vs = ks + BK * RB;

    float s[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
      uint32_t f[4];
      ldmatrix_x4(f, ks + ((lane & 7) + ((lane >> 4) << 3)) * RB + (kk * 2 + ((lane >> 3) & 1)) * 16);
      mma_m16n8k16<T>(s[0], qa[kk], f[0], f[1], s[0]);
      mma_m16n8k16<T>(s[1], qa[kk], f[2], f[3], s[1]);
    }

    const int j0 = kb + (warp + n * W) * BK;
    const bool whole = !p.mask && j0 >= k0 && j0 >= all_lo && j0 + BK <= min(k1, all_hi);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[nt][e] * qscale;
        if (!whole) {
          const int hh = e >> 1, j = j0 + nt * 8 + 2 * t + (e & 1);
          if (j < k0 || j >= k1 || j < rk[hh].lo || j >= rk[hh].hi) v = neg_inf();
          else if (p.mask) v = apply_mask(p, mrow[hh], j, v);
        }
        s[nt][e] = v;
      }

#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = fmaxf(m[hh], fmaxf(fmaxf(s[0][2 * hh], s[0][2 * hh + 1]), fmaxf(s[1][2 * hh], s[1][2 * hh + 1])));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mu = mx == neg_inf() ? 0.0f : mx; // a row that has seen nothing: all weights 0
      const float corr = exp2f(m[hh] - mu);
      m[hh] = mx;
      l[hh] *= corr;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) o[dt][2 * hh] *= corr, o[dt][2 * hh + 1] *= corr;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const float p0 = exp2f(s[nt][2 * hh] - mu), p1 = exp2f(s[nt][2 * hh + 1] - mu);
        s[nt][2 * hh] = p0, s[nt][2 * hh + 1] = p1;
        l[hh] += p0 + p1;
      }
    }

    uint32_t a[4], a_lo[4];
    dec_split2<T>(s[0][0], s[0][1], a[0], a_lo[0]);
    dec_split2<T>(s[0][2], s[0][3], a[1], a_lo[1]);
    dec_split2<T>(s[1][0], s[1][1], a[2], a_lo[2]);
    dec_split2<T>(s[1][2], s[1][3], a[3], a_lo[3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t f[4];
      ldmatrix_x4_trans(f, vs + ((lane & 7) + (((lane >> 3) & 1) << 3)) * RB + (dp * 2 + (lane >> 4)) * 16);
      mma_m16n8k16<T>(o[2 * dp], a, f[0], f[1], o[2 * dp]);
      mma_m16n8k16<T>(o[2 * dp + 1], a, f[2], f[3], o[2 * dp + 1]);
      mma_m16n8k16<T>(o[2 * dp], a_lo, f[0], f[1], o[2 * dp]);
      mma_m16n8k16<T>(o[2 * dp + 1], a_lo, f[2], f[3], o[2 * dp + 1]);
    }
    __syncwarp(); // the stage is reloaded NST - 1 tiles later
  }
  cp_async_wait<0>();

  // The warps merged through shared memory (over the stages, now idle).
  float* const sm_ml = reinterpret_cast<float*>(smem); // [W][R][2]
  float* const sm_o = sm_ml + W * R * 2; // [W][R][D]
  __syncthreads();
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float sum = l[hh];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = g + 8 * hh;
    if (t == 0) sm_ml[(warp * R + r) * 2] = m[hh], sm_ml[(warp * R + r) * 2 + 1] = sum;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      float* at = sm_o + (warp * R + r) * D + dt * 8 + 2 * t;
      at[0] = o[dt][2 * hh], at[1] = o[dt][2 * hh + 1];
    }
  }
  __syncthreads();
  const int64_t n_rows = int64_t(p.B) * p.Hq * L;
  for (int idx = tid; idx < R * D; idx += DEC_THREADS) {
    const int r = idx / D, d = idx % D;
    if (row0 + r >= rows_total) break;
    float M = neg_inf();
#pragma unroll
    for (int w = 0; w < W; ++w) M = fmaxf(M, sm_ml[(w * R + r) * 2]);
    float sum_l = 0.0f, sum_acc = 0.0f;
    if (M != neg_inf()) {
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float f = exp2f(sm_ml[(w * R + r) * 2] - M);
        sum_l += sm_ml[(w * R + r) * 2 + 1] * f;
        sum_acc += sm_o[(w * R + r) * D + d] * f;
      }
    }
    const int h = hkv * G + (row0 + r) / L, i = (row0 + r) % L;
    const int64_t row = (int64_t(b) * p.Hq + h) * L + i;
    const int64_t at = blockIdx.y * n_rows + row;
    p.part_acc[at * D + d] = sum_acc;
    if (d == 0) p.part_ml[2 * at] = M, p.part_ml[2 * at + 1] = sum_l;
  }
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::AttnParams;
using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;

// Kernel names (chosen by cuda_plan.h): attn_dec_<q type>_d<D>; the merge is
// attn_vec.cu's attn_merge_<q type>.
#define ATTN_DEC(T, NAME, D)                                                                       \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::DEC_THREADS, 1)                      \
      attn_dec_##NAME##_d##D(const AttnParams p) {                                                 \
    mlx_ext::cuda::attn_dec<T, D>(p);                                                              \
  }
#define ATTN_DEC_TYPE(T, NAME) ATTN_DEC(T, NAME, 64) ATTN_DEC(T, NAME, 128) ATTN_DEC(T, NAME, 256)

ATTN_DEC_TYPE(f16, float16)
ATTN_DEC_TYPE(bf16, bfloat16)
