// Split-K decode on tensor cores (flash-decoding with mma.sync m16n8k16):
// the few query rows of one kv head (its G query heads times L queries, up
// to DEC_ROWS = 16 per block) against a chunk of keys, S = Q K^T and O += P V
// as mma tiles instead of per-key shuffles. Writes the same per-chunk
// partials as attn_vec, merged by attn_merge (attn_vec.cu) with the sinks.
// float16 / bfloat16 q, 16-bit K/V (attn_dec) or 8- / 4-bit codes (attn_dec_q),
// D = 64 / 128 / 256; everything else (float32, other head dims, group
// sizes the quantized layout cannot take) stays on attn_vec (cuda_plan.h).
#include "attention/cuda_device.cuh"

namespace mlx_ext::cuda {
namespace {

// P enters P V as hi + lo (split2, cuda_device.cuh): with 16 query rows and
// memory-bound decode the extra mma is not what limits.

// m and the row sum l (added over the 4 lanes of the row) of a warp's row to
// shared memory (ml: 2 floats).
__device__ __forceinline__ void dec_store_ml(float* ml, float m, float l, int t) {
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  if (t == 0) ml[0] = m, ml[1] = l;
}

// The block's warps merged (sm_ml [DEC_WARPS][DEC_ROWS][2], sm_o
// [DEC_WARPS][DEC_ROWS][D], filled before) into the chunk's partials, as
// attn_vec writes them for attn_merge.
__device__ __forceinline__ void dec_write_partials(const AttnParams& p, const float* sm_ml, const float* sm_o,
                                                   int row0, int rows_total, int b, int hkv) {
  constexpr int W = DEC_WARPS, R = DEC_ROWS;
  const int D = p.D, L = p.L, G = p.Hq / p.Hkv;
  __syncthreads();
  const int64_t n_rows = int64_t(p.B) * p.Hq * L;
  for (int idx = threadIdx.x; idx < R * D; idx += DEC_THREADS) {
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

// What a block of attn_dec / attn_dec_q works on: rows [row0, row0 +
// DEC_ROWS) of kv head hkv of batch b (row r: query head hkv * G + r / L,
// query r % L; rows past G L are zeros and see nothing), over the keys
// [k0, k1) of chunk blockIdx.y that any of its rows sees, in tiles of
// DEC_KEYS keys from kb (a multiple of DEC_KEYS); every row sees [all_lo,
// all_hi). Lane 4 g + t's rows g and g + 8: their key ranges and mask rows.
struct DecBlock {
  int row0, rows_total, b, hkv, k0, k1, kb, n_tiles, all_lo, all_hi;
  KeyRange rk[2];
  int64_t mrow[2];
};
__device__ __forceinline__ DecBlock dec_block(const AttnParams& p, int g) {
  DecBlock k;
  const int L = p.L, G = p.Hq / p.Hkv;
  k.rows_total = G * L;
  k.b = blockIdx.z / p.Hkv, k.hkv = blockIdx.z % p.Hkv;
  k.row0 = blockIdx.x * DEC_ROWS;
  const int len = kv_length(p, k.b);
  int key_lo = p.S, key_hi = 0;
  k.all_lo = 0, k.all_hi = p.S;
  for (int r = 0; r < DEC_ROWS && k.row0 + r < k.rows_total; ++r) {
    const KeyRange kr = visible_keys(p, len, (k.row0 + r) % L);
    if (kr.lo < kr.hi) key_lo = min(key_lo, kr.lo), key_hi = max(key_hi, kr.hi);
    k.all_lo = max(k.all_lo, kr.lo), k.all_hi = min(k.all_hi, kr.hi);
  }
  const int c0 = blockIdx.y * p.chunk_len;
  k.k0 = max(c0, key_lo), k.k1 = min(min(c0 + p.chunk_len, p.S), key_hi);
  k.kb = k.k0 / DEC_KEYS * DEC_KEYS; // c0 is a multiple of DEC_KEYS: kb >= c0
  k.n_tiles = k.k0 < k.k1 ? (k.k1 - k.kb + DEC_KEYS - 1) / DEC_KEYS : 0;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int rr = k.row0 + g + 8 * hh;
    k.rk[hh] = KeyRange{0, 0};
    k.mrow[hh] = 0;
    if (rr < k.rows_total) {
      k.rk[hh] = visible_keys(p, len, rr % L);
      if (p.mask) k.mrow[hh] = mask_row(p, k.b, k.hkv * G + rr / L, rr % L);
    }
  }
  return k;
}

// Q's DEC_ROWS rows to shared memory (rows of D values padded to RB bytes,
// zeros past the last row), as one cp.async group.
template <typename T, int D, int RB>
__device__ __forceinline__ void dec_load_q(const AttnParams& p, const DecBlock& k, char* sq) {
  constexpr int CH = D / 8;
  const int L = p.L, G = p.Hq / p.Hkv;
  const T* qg = static_cast<const T*>(p.q);
  for (int idx = threadIdx.x; idx < DEC_ROWS * CH; idx += DEC_THREADS) {
    const int r = idx / CH, ch = idx % CH, rr = k.row0 + r;
    const bool ok = rr < k.rows_total;
    const int h = k.hkv * G + (ok ? rr : 0) / L, i = (ok ? rr : 0) % L;
    cp_async<16>(smem_u32(sq + r * RB + ch * 16), qg + ((int64_t(k.b) * p.Hq + h) * L + i) * D + ch * 8, ok);
  }
  cp_async_commit();
}

// The tile at key j0: s (S = Q K^T of lane 4 g + t: rows g, g + 8 = e >> 1,
// keys j0 + 8 nt + 2 t + (e & 1)) to base-2 logits, masked, then the online
// softmax: m, l and the accumulators o (DT tiles of the same row layout)
// rescaled, s replaced by the weights exp2(s - m).
template <int DT>
__device__ __forceinline__ void dec_softmax(const AttnParams& p, const DecBlock& k, int j0, int t,
                                            float (&s)[2][4], float (&m)[2], float (&l)[2], float (&o)[DT][4]) {
  const float qscale = p.scale * kLog2e;
  const bool whole = !p.mask && j0 >= k.k0 && j0 >= k.all_lo && j0 + DEC_KEYS <= min(k.k1, k.all_hi);
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float v = s[nt][e] * qscale;
      if (!whole) {
        const int hh = e >> 1, j = j0 + nt * 8 + 2 * t + (e & 1);
        if (j < k.k0 || j >= k.k1 || j < k.rk[hh].lo || j >= k.rk[hh].hi) v = neg_inf();
        else if (p.mask) v = apply_mask(p, k.mrow[hh], j, v);
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
}

// Block: the rows and keys of dec_block, 16-bit K/V.
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
  const DecBlock k = dec_block(p, g);
  dec_load_q<T, D, RB>(p, k, sq);
  const int my_tiles = k.n_tiles > warp ? (k.n_tiles - warp + W - 1) / W : 0;

  const T* kg = static_cast<const T*>(p.k.x.data);
  const T* vg = static_cast<const T*>(p.v.x.data);
  auto load_tile = [&](int stage, int n) { // the warp's n-th tile; zeros past k1
    const int j0 = k.kb + (warp + n * W) * BK;
    char* const ks = sw + stage * 2 * BK * RB;
    char* const vs = ks + BK * RB;
#pragma unroll 4
    for (int idx = lane; idx < BK * CH; idx += 32) {
      const int r = idx / CH, ch = idx % CH, j = j0 + r;
      const bool ok = j < k.k1;
      const int jj = ok ? j : 0;
      cp_async<16>(smem_u32(ks + r * RB + ch * 16), kg + kv_row(p.k.x, k.b, k.hkv, jj) * D + ch * 8, ok);
      cp_async<16>(smem_u32(vs + r * RB + ch * 16), vg + kv_row(p.v.x, k.b, k.hkv, jj) * D + ch * 8, ok);
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
    dec_softmax<DT>(p, k, k.kb + (warp + n * W) * BK, t, s, m, l, o);

    uint32_t a[4], a_lo[4];
    split2<T>(s[0][0], s[0][1], a[0], a_lo[0]);
    split2<T>(s[0][2], s[0][3], a[1], a_lo[1]);
    split2<T>(s[1][0], s[1][1], a[2], a_lo[2]);
    split2<T>(s[1][2], s[1][3], a[3], a_lo[3]);
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
    const int r = g + 8 * hh;
    dec_store_ml(sm_ml + (warp * R + r) * 2, m[hh], l[hh], t);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      float* at = sm_o + (warp * R + r) * D + dt * 8 + 2 * t;
      at[0] = o[dt][2 * hh], at[1] = o[dt][2 * hh + 1];
    }
  }
  dec_write_partials(p, sm_ml, sm_o, k.row0, k.rows_total, k.b, k.hkv);
}

// cp.async of 4 bytes global -> shared (scales and biases); zeros when !valid.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}

// The integers (codes, < 2^BITS) in bytes 0 and 1 of x as a pair of T, byte 0
// in the low half, exactly: under T's exponent of 1024 (float16) or 128
// (bfloat16, 4-bit codes) by a byte permute, the exponent's value subtracted;
// 8-bit codes exceed bfloat16's 128 + 127: through float32 (exact), then packed.
template <typename T, int BITS>
__device__ __forceinline__ uint32_t code_pair(uint32_t x) {
  if constexpr (std::is_same_v<T, f16>) {
    const uint32_t h = __byte_perm(x, 0x64u, 0x4140);
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&h), __half2half2(__ushort_as_half(0x6400)));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else if constexpr (BITS <= 7) {
    const uint32_t h = __byte_perm(x, 0x43u, 0x4140);
    const __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&h),
                                     __bfloat162bfloat162(__ushort_as_bfloat16(0x4300)));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    const float f0 = int_bits_to_float(__byte_perm(x, 0x4b000000u, 0x7540));
    const float f1 = int_bits_to_float(__byte_perm(x, 0x4b000000u, 0x7541));
    return pack2<T>(f0, f1);
  }
}

// Block: the rows and keys of dec_block, K/V as BITS-bit codes with a scale
//   and bias per group of group_size values of D (MLX's affine layout); the
//   codes enter the mma exactly (code_pair) and the scales and biases are
//   applied around it, so the bytes read are the codes and the arithmetic is
//   float32's:
//     S[r][j] = sum over 32-value blocks c of D: s_j * (q_r . codes_j)_c + z_j * (sum q_r)_c
//     O[r][d] = sum_j (P[r][j] s_j) code_j[d] + sum_j P[r][j] z_j   (s, z of d's group)
//   with P s split hi + lo as mma's A operand, one per group.
// Warps, stages and rows as attn_dec; a stage holds the tile's codes and
//   its scales and biases (dec_q_stage_bytes), DEC_Q_STAGES stages.
// D is permuted inside each mma (free in a dot product): S's k16 step kk
//   takes, in lane t's k slots 2t, 2t + 1 | 2t + 8, 2t + 9,
//     8-bit: values 16 kk + 4t + (0, 1 | 2, 3), one 32-bit word of codes;
//     4-bit: 32 m + 8t + (0, 2 | 4, 6) (kk = 2m) or (1, 3 | 5, 7) (kk = 2m + 1):
//            one word's low and high nibbles;
//   and Q's A fragments are built to match. P V's n-tile (u, x) (8-bit: u <
//   D / 32, x < 4; 4-bit: u < D / 64, x < 8) has column c = value UD u +
//   (UD / 8) c + x (UD = 32 or 64 values per word column): lane g reads one
//   word per key and block u, and each n-tile's values lie in one group
//   (group_size >= UD, cuda_plan.h).
template <typename T, int BITS, int D>
__device__ __forceinline__ void attn_dec_q(const AttnParams& p) {
  constexpr int RB = dec_row_bytes(D), CP = dec_q_code_row_bytes(D, BITS), QSB = dec_q_stage_bytes(D, BITS);
  constexpr int NST = DEC_Q_STAGES, BK = DEC_KEYS, W = DEC_WARPS, R = DEC_ROWS;
  constexpr int KT = D / 16, NB = D / 32; // k16 steps; 32-value blocks of S's fold
  constexpr int UD = BITS == 8 ? 32 : 64, NU = D / UD, XN = UD / 8; // P V: word blocks, n-tiles per block
  constexpr int DT = D / 8, CB = D * BITS / 8, CC = CB / 16;
  static_assert(BITS == 8 || BITS == 4, "8- or 4-bit codes");
  extern __shared__ __align__(16) char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  char* const sq = smem;
  char* const sw = smem + R * RB + warp * NST * QSB;
  const DecBlock k = dec_block(p, g);
  dec_load_q<T, D, RB>(p, k, sq);
  const int my_tiles = k.n_tiles > warp ? (k.n_tiles - warp + W - 1) / W : 0;
  const int groups = D / p.group_size, gshift = p.group_size == 32 ? 0 : p.group_size == 64 ? 1 : 2;

  const uint8_t* kx = static_cast<const uint8_t*>(p.k.x.data);
  const uint8_t* vx = static_cast<const uint8_t*>(p.v.x.data);
  auto load_tile = [&](int stage, int n) { // the warp's n-th tile; zeros past k1
    const int j0 = k.kb + (warp + n * W) * BK;
    char* const base = sw + stage * QSB;
#pragma unroll 4
    for (int idx = lane; idx < BK * CC; idx += 32) {
      const int r = idx / CC, c = idx % CC, j = j0 + r;
      const bool ok = j < k.k1;
      const int jj = ok ? j : 0;
      cp_async<16>(smem_u32(base + r * CP + c * 16), kx + kv_row(p.k.x, k.b, k.hkv, jj) * CB + c * 16, ok);
      cp_async<16>(smem_u32(base + (BK + r) * CP + c * 16), vx + kv_row(p.v.x, k.b, k.hkv, jj) * CB + c * 16, ok);
    }
    const int half = groups / 2; // 32-bit words (two groups) per key
    for (int idx = lane; idx < BK * half; idx += 32) {
      const int r = idx / half, wi = idx % half, j = j0 + r;
      const bool ok = j < k.k1;
      const int jj = ok ? j : 0;
      const int at = 2 * BK * CP + (r * groups + 2 * wi) * 2;
      const AttnRows* src[4] = {&p.k.scales, &p.k.biases, &p.v.scales, &p.v.biases};
#pragma unroll
      for (int a = 0; a < 4; ++a)
        cp_async4(smem_u32(base + at + a * D),
                  static_cast<const T*>(src[a]->data) + kv_row(*src[a], k.b, k.hkv, jj) * groups + 2 * wi, ok);
    }
  };
#pragma unroll
  for (int s = 0; s < NST - 1; ++s) {
    if (s < my_tiles) load_tile(s, s);
    cp_async_commit();
  }
  cp_async_wait<NST - 1>(); // Q's group
  __syncthreads();

  // Q's A fragments in the permuted order, and its sums over 32-value blocks.
  uint32_t qa[KT][4];
  float q32[2][NB];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const char* row = sq + (g + 8 * hh) * RB;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
      if constexpr (BITS == 8) {
        const uint2 w = *reinterpret_cast<const uint2*>(row + (16 * kk + 4 * t) * 2);
        qa[kk][hh] = w.x, qa[kk][2 + hh] = w.y;
      } else {
        const uint4 w = *reinterpret_cast<const uint4*>(row + (32 * (kk / 2) + 8 * t) * 2);
        const uint32_t sel = kk % 2 ? 0x7632 : 0x5410;
        qa[kk][hh] = __byte_perm(w.x, w.y, sel), qa[kk][2 + hh] = __byte_perm(w.z, w.w, sel);
      }
    }
#pragma unroll
    for (int c = 0; c < NB; ++c) {
      float sum = 0.0f;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v[8];
        load8_f(reinterpret_cast<const T*>(row + (32 * c + 8 * e) * 2), v);
#pragma unroll
        for (int x = 0; x < 8; ++x) sum += v[x];
      }
      q32[hh][c] = sum;
    }
  }

  float o[DT + NU][4]; // P V's tiles, then per block u the bias sums (rows g: [0], g + 8: [2])
#pragma unroll
  for (int dt = 0; dt < DT + NU; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};

  for (int n = 0; n < my_tiles; ++n) {
    if (n + NST - 1 < my_tiles) load_tile((n + NST - 1) % NST, n + NST - 1);
    cp_async_commit();
    cp_async_wait<NST - 1>();
    __syncwarp();
    const char* const base = sw + (n % NST) * QSB;
    const char* const kc = base;
    const char* const vc = base + BK * CP;
    const T* const ksc = reinterpret_cast<const T*>(base + 2 * BK * CP);
    const T* const kbi = reinterpret_cast<const T*>(base + 2 * BK * CP + D);
    const T* const vsc = reinterpret_cast<const T*>(base + 2 * BK * CP + 2 * D);
    const T* const vbi = reinterpret_cast<const T*>(base + 2 * BK * CP + 3 * D);

    float s[2][4] = {};
#pragma unroll
    for (int c = 0; c < NB; ++c) { // 32 values of D: two k16 steps, then the fold
      float acc[2][4] = {};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const char* row = kc + (nt * 8 + g) * CP;
        if constexpr (BITS == 8) {
#pragma unroll
          for (int sub = 0; sub < 2; ++sub) {
            const uint32_t w = *reinterpret_cast<const uint32_t*>(row + 16 * (2 * c + sub) + 4 * t);
            mma_m16n8k16<T>(acc[nt], qa[2 * c + sub], code_pair<T, 8>(w), code_pair<T, 8>(w >> 16), acc[nt]);
          }
        } else {
          const uint32_t w = *reinterpret_cast<const uint32_t*>(row + 16 * c + 4 * t);
          const uint32_t lo = w & 0x0f0f0f0fu, hi = (w >> 4) & 0x0f0f0f0fu;
          mma_m16n8k16<T>(acc[nt], qa[2 * c], code_pair<T, 4>(lo), code_pair<T, 4>(lo >> 16), acc[nt]);
          mma_m16n8k16<T>(acc[nt], qa[2 * c + 1], code_pair<T, 4>(hi), code_pair<T, 4>(hi >> 16), acc[nt]);
        }
      }
      const int grp = c >> gshift;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = nt * 8 + 2 * t + (e & 1);
          const float sc = to_float(ksc[key * groups + grp]), bi = to_float(kbi[key * groups + grp]);
          s[nt][e] = fmaf(sc, acc[nt][e], fmaf(bi, q32[e >> 1][c], s[nt][e]));
        }
    }
    dec_softmax<DT + NU>(p, k, k.kb + (warp + n * W) * BK, t, s, m, l, o);

    const int kq[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int grp = (u * UD / 32) >> gshift;
      float sv[4], zv[4];
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sv[e] = to_float(vsc[kq[e] * groups + grp]), zv[e] = to_float(vbi[kq[e] * groups + grp]);
        w[e] = *reinterpret_cast<const uint32_t*>(vc + kq[e] * CP + 32 * u + 4 * g);
      }
      o[DT + u][0] += s[0][0] * zv[0] + s[0][1] * zv[1] + s[1][0] * zv[2] + s[1][1] * zv[3];
      o[DT + u][2] += s[0][2] * zv[0] + s[0][3] * zv[1] + s[1][2] * zv[2] + s[1][3] * zv[3];
      uint32_t a[4], a_lo[4];
      split2<T>(s[0][0] * sv[0], s[0][1] * sv[1], a[0], a_lo[0]);
      split2<T>(s[0][2] * sv[0], s[0][3] * sv[1], a[1], a_lo[1]);
      split2<T>(s[1][0] * sv[2], s[1][1] * sv[3], a[2], a_lo[2]);
      split2<T>(s[1][2] * sv[2], s[1][3] * sv[3], a[3], a_lo[3]);
      uint32_t src[4][2]; // per key: the words whose bytes hold the codes of x (8-bit: w; 4-bit: low, high nibbles)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if constexpr (BITS == 8) src[e][0] = src[e][1] = w[e];
        else src[e][0] = w[e] & 0x0f0f0f0fu, src[e][1] = (w[e] >> 4) & 0x0f0f0f0fu;
      }
#pragma unroll
      for (int x = 0; x < XN; ++x) {
        const int part = BITS == 8 ? 0 : x % 2, byte = BITS == 8 ? x : x / 2;
        const uint32_t sel = byte | ((byte + 4) << 4);
        const uint32_t b0 = code_pair<T, BITS>(__byte_perm(src[0][part], src[1][part], sel));
        const uint32_t b1 = code_pair<T, BITS>(__byte_perm(src[2][part], src[3][part], sel));
        mma_m16n8k16<T>(o[u * XN + x], a, b0, b1, o[u * XN + x]);
        mma_m16n8k16<T>(o[u * XN + x], a_lo, b0, b1, o[u * XN + x]);
      }
    }
    __syncwarp(); // the stage is reloaded NST - 1 tiles later
  }
  cp_async_wait<0>();

  // The warps merged through shared memory: value UD u + (UD / 8) c + x of
  // n-tile (u, x), column c, plus block u's bias sum (over the row's 4 lanes).
  float* const sm_ml = reinterpret_cast<float*>(smem); // [W][R][2]
  float* const sm_o = sm_ml + W * R * 2; // [W][R][D]
  __syncthreads();
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = g + 8 * hh;
    dec_store_ml(sm_ml + (warp * R + r) * 2, m[hh], l[hh], t);
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      float z = o[DT + u][2 * hh];
      z += __shfl_xor_sync(0xffffffffu, z, 1);
      z += __shfl_xor_sync(0xffffffffu, z, 2);
#pragma unroll
      for (int x = 0; x < XN; ++x)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          sm_o[(warp * R + r) * D + UD * u + (UD / 8) * (2 * t + e) + x] = o[u * XN + x][2 * hh + e] + z;
    }
  }
  dec_write_partials(p, sm_ml, sm_o, k.row0, k.rows_total, k.b, k.hkv);
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::AttnParams;
using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;

// Kernel names (chosen by cuda_plan.h): attn_dec_<q type>_b<bits>_d<D> (bits
// 0: 16-bit K/V); the merge is attn_vec.cu's attn_merge_<q type>.
#define ATTN_DEC(T, NAME, D)                                                                       \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::DEC_THREADS, 1)                      \
      attn_dec_##NAME##_b0_d##D(const AttnParams p) {                                              \
    mlx_ext::cuda::attn_dec<T, D>(p);                                                              \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::DEC_THREADS, 1)                      \
      attn_dec_##NAME##_b8_d##D(const AttnParams p) {                                              \
    mlx_ext::cuda::attn_dec_q<T, 8, D>(p);                                                         \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::DEC_THREADS, 1)                      \
      attn_dec_##NAME##_b4_d##D(const AttnParams p) {                                              \
    mlx_ext::cuda::attn_dec_q<T, 4, D>(p);                                                         \
  }
#define ATTN_DEC_TYPE(T, NAME) ATTN_DEC(T, NAME, 64) ATTN_DEC(T, NAME, 128) ATTN_DEC(T, NAME, 256)

ATTN_DEC_TYPE(f16, float16)
ATTN_DEC_TYPE(bf16, bfloat16)
