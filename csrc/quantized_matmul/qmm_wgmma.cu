// Hopper (sm_90a) GEMM of the quantized matmul for transpose=True and float16
// / bfloat16 activations: out = x W^T + bias with W dequantized in shared
// memory and multiplied by wgmma, the warpgroup-wide asynchronous tensor-core
// instruction (mma.sync reaches a fraction of its rate on an H100).
//
// Block: a 256 x 128 tile of out (256 rows of x by 128 rows of W) over all of
//   K, in tiles of 64 k. Two warpgroups; warpgroup g owns rows 128 g .. 128 g
//   + 127 of the tile as two m64n128 float32 accumulators (128 registers a
//   thread). The tile is tall because dequantizing W costs more than the MMA
//   (measured on an H200: 0.9 vs 0.6 us per k tile at 128 x 256): each
//   dequantized value now feeds 256 rows of x.
// Pipeline, per k tile t (every thread does each step; no producer warps):
//   1. wait for the cp.async group that carried x(t) and raw W(t + 1), barrier;
//   2. cp.async x(t + 2) and raw W(t + 3) into their stages (4 of each);
//   3. issue 4 x 2 wgmma k16 steps on x(t) and the dequantized tile q(t);
//   4. while they run, dequantize raw W(t + 1) into q(t + 1) (3 q tiles);
//   5. wait until at most the wgmma group of step 3 is in flight.
//   The barrier of step 1 orders everything: after it, the wgmma of t - 2 is
//   done in both warpgroups, so q((t + 1) % 3) and the stages of t - 2 are free.
// Shared memory, from a 1024-byte-aligned base (the 128-byte swizzle repeats
//   every 8 rows of 128 bytes, 1024 bytes, and needs that alignment):
//   x stages   4 x 256 rows x 128 B: row r's 16-byte chunk c at r * 128 + ((c ^ r % 8) * 16),
//              the layout wgmma reads as "K-major, 128-byte swizzle";
//   q tiles    3 x 128 rows x 128 B, the same layout, written by the dequantization;
//   raw stages 4 x 128 rows x (8 * BITS) B, W's packed words as stored.
// Thread (dequantization): half (tid % 2) of row tid / 2 of the W tile: 32
//   values of tile t as 4 chunks of 8, each 4 (T, T) pairs, s * q + b rounded
//   once (fma).
// Needs K % 64 == 0 and x, w 16-byte aligned (cuda.cpp checks).
#include "quantized_matmul/cuda_common.cuh"

namespace mlx_ext::cuda {
namespace {

// Ordinary shared-memory writes (and cp.async's) become visible to the
// tensor cores' "async proxy" only after this fence in the writing thread.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups
// 1024 bytes apart (stride byte offset); the leading byte offset is unused
// for swizzled K-major tiles.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return uint64_t((addr & 0x3ffff) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

#define WG_ACC4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define WG_ACC16(i) WG_ACC4(i), WG_ACC4(i + 4), WG_ACC4(i + 8), WG_ACC4(i + 12)
#define WG_ACC64 WG_ACC16(0), WG_ACC16(16), WG_ACC16(32), WG_ACC16(48)
#define WG_REGS64                                                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "          \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d += A B for one m64n128k16 step, A (64 x 16) and B (128 x 16) in shared
// memory behind their descriptors, float32 accumulators.
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b) {
  if constexpr (std::is_same_v<T, bf16>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_REGS64
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : WG_ACC64
                 : "l"(a), "l"(b), "r"(1));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " WG_REGS64
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : WG_ACC64
                 : "l"(a), "l"(b), "r"(1));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(T a, T b) {
  uint32_t u;
  T pair[2] = {a, b};
  memcpy(&u, pair, 4);
  return u;
}

// Values 8c .. 8c + 7 of 32 packed values (BITS words) as four dequantized
// (T, T) pairs.
template <typename T, int BITS>
__device__ __forceinline__ void dequant_chunk(const uint32_t (&w)[BITS], int c, uint32_t s2, uint32_t b2,
                                              uint32_t (&out)[4]) {
  if constexpr (BITS == 4) {
    const uint32_t lo = w[c] & 0x0f0f0f0fu, hi = (w[c] >> 4) & 0x0f0f0f0fu;
#pragma unroll
    for (int j = 0; j < 4; ++j) // bytes (lo_j, -, hi_j, -): values 2j, 2j + 1
      out[j] = dequant_pair<T, BITS>(__byte_perm(lo, hi, j | ((4 + j) << 8)) & 0x00ff00ffu, s2, b2);
  } else if constexpr (BITS == 8) {
#pragma unroll
    for (int j = 0; j < 4; ++j) { // bytes 2 (j % 2), 2 (j % 2) + 1 of word 2c + j / 2 into the halves
      const int b0 = 2 * (j % 2);
      out[j] = dequant_pair<T, BITS>(__byte_perm(w[2 * c + j / 2], 0, b0 | (4 << 4) | ((b0 + 1) << 8) | (4 << 12)),
                                     s2, b2);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      out[j] = dequant_pair<T, BITS>(extract<BITS>(w, 8 * c + 2 * j) | (extract<BITS>(w, 8 * c + 2 * j + 1) << 16),
                                     s2, b2);
  }
}

// SKIP (bench/cuda/kernels.cu only, to see where the time goes; 0 in the
// library): 1 skips the dequantization, 2 the wgmma, 4 the loads.
template <typename T, int BITS, int SKIP = 0>
__device__ __forceinline__ void qmm_t_wgmma(const QmmParams& p) {
  extern __shared__ uint8_t smem_raw[];
  constexpr int RAW_ROW = 8 * BITS;                 // bytes of a row's 64 packed values
  constexpr int CP = RAW_ROW % 16 == 0 ? 16 : 8;    // cp.async size for W
  const int tid = threadIdx.x, wg = tid / 128, warp_in_wg = (tid % 128) / 32, lane = tid % 32;
  const int64_t M = p.M, m0 = int64_t(blockIdx.y) * WG_BM;
  const int N = p.N, K = p.K, n0 = blockIdx.x * WG_BN, KT = K / WG_BK;
  const int gs = p.group_size, G = K / gs;
  const int64_t row_bytes = int64_t(K) * BITS / 8;
  const T* x = static_cast<const T*>(p.x);
  const uint8_t* w = reinterpret_cast<const uint8_t*>(p.w);

  const uint32_t raw_base = smem_u32(smem_raw);
  const uint32_t base = (raw_base + 1023) & ~1023u;
  uint8_t* const gbase = smem_raw + (base - raw_base);  // generic pointer to `base`
  const uint32_t x_smem = base;
  const uint32_t q_smem = x_smem + WG_STAGES * WG_X_BYTES;
  const uint32_t r_smem = q_smem + WG_Q_TILES * WG_Q_BYTES;
  uint8_t* const q_gen = gbase + WG_STAGES * WG_X_BYTES;
  const uint8_t* const r_gen = q_gen + WG_Q_TILES * WG_Q_BYTES;

  auto load_x = [&](int t) {  // 256 rows x 8 chunks, 8 per thread
    if (SKIP & 4) return;
    const uint32_t dst = x_smem + (t % WG_STAGES) * WG_X_BYTES;
#pragma unroll
    for (int i = 0; i < WG_BM * 8 / WG_THREADS; ++i) {
      const int idx = tid + i * WG_THREADS, r = idx / 8, c = idx % 8;
      const bool valid = m0 + r < M;
      const T* src = valid ? x + (m0 + r) * K + t * WG_BK + c * 8 : x;
      cp_async<16>(dst + r * 128 + ((c ^ (r % 8)) * 16), src, valid);
    }
  };
  auto load_w = [&](int t) {  // 128 rows x RAW_ROW bytes
    if (SKIP & 4) return;
    const uint32_t dst = r_smem + (t % WG_STAGES) * wg_raw_bytes(BITS);
    constexpr int PER_ROW = RAW_ROW / CP, COPIES = WG_BN * PER_ROW;
#pragma unroll
    for (int i = 0; i < (COPIES + WG_THREADS - 1) / WG_THREADS; ++i) {
      const int idx = tid + i * WG_THREADS, r = idx / PER_ROW, c = idx % PER_ROW;
      if (COPIES % WG_THREADS != 0 && idx >= COPIES) break;
      const bool valid = n0 + r < N;
      const uint8_t* src = valid ? w + (n0 + r) * row_bytes + int64_t(t) * RAW_ROW + c * CP : w;
      cp_async<CP>(dst + r * RAW_ROW + c * CP, src, valid);
    }
  };

  // This thread's half row of W for the dequantization (32 values, BITS
  // words), and its scale and bias for the tile dequantized next.
  const int row = tid / 2, half = tid % 2, n_row = min(n0 + row, N - 1);
  const uint16_t* scales = static_cast<const uint16_t*>(p.scales) + int64_t(n_row) * G;
  const uint16_t* biases = static_cast<const uint16_t*>(p.biases) + int64_t(n_row) * G;
  uint32_t s2 = 0, b2 = 0;
  auto load_sb = [&](int t) {
    const int g = (t * WG_BK + 32 * half) / gs;
    s2 = __ldg(scales + g) * 0x10001u;
    b2 = __ldg(biases + g) * 0x10001u;
  };
  auto dequant = [&](int t) {
    if (SKIP & 1) return;
    uint32_t words[BITS];
    const uint8_t* src = r_gen + (t % WG_STAGES) * wg_raw_bytes(BITS) + row * RAW_ROW + half * 4 * BITS;
    if constexpr (BITS % 4 == 0) {
#pragma unroll
      for (int i = 0; i < BITS / 4; ++i) {
        const uint4 v = *reinterpret_cast<const uint4*>(src + 16 * i);
        words[4 * i] = v.x, words[4 * i + 1] = v.y, words[4 * i + 2] = v.z, words[4 * i + 3] = v.w;
      }
    } else if constexpr (BITS % 2 == 0) {
#pragma unroll
      for (int i = 0; i < BITS / 2; ++i) {
        const uint2 v = *reinterpret_cast<const uint2*>(src + 8 * i);
        words[2 * i] = v.x, words[2 * i + 1] = v.y;
      }
    } else {
#pragma unroll
      for (int i = 0; i < BITS; ++i) words[i] = reinterpret_cast<const uint32_t*>(src)[i];
    }
    uint8_t* dst = q_gen + (t % WG_Q_TILES) * WG_Q_BYTES + row * 128;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      uint32_t v[4];
      dequant_chunk<T, BITS>(words, c, s2, b2, v);
      *reinterpret_cast<uint4*>(dst + (((4 * half + c) ^ (row % 8)) * 16)) = make_uint4(v[0], v[1], v[2], v[3]);
    }
  };

  // Prologue: x(0), raw W(0), W(1) in one group, x(1), W(2) in the next;
  // q(0) dequantized once the first group lands.
  load_x(0);
  load_w(0);
  if (KT > 1) load_w(1);
  cp_async_commit();
  if (KT > 1) load_x(1);
  if (KT > 2) load_w(2);
  cp_async_commit();
  load_sb(0);
  cp_async_wait<1>();
  __syncthreads();
  dequant(0);
  fence_async_smem();
  if (KT > 1) load_sb(1);

  float d[2][64];  // rows 128 wg + 64 i + ... of the tile, i = 0, 1
#pragma unroll
  for (int i = 0; i < 64; ++i) d[0][i] = d[1][i] = 0.0f;

  for (int t = 0; t < KT; ++t) {
    cp_async_wait<1>();
    fence_async_smem();
    __syncthreads();
    if (t + 2 < KT) load_x(t + 2);
    if (t + 3 < KT) load_w(t + 3);
    cp_async_commit();

    wgmma_fence();
    const uint32_t a_addr = x_smem + (t % WG_STAGES) * WG_X_BYTES + wg * 128 * 128;
    const uint32_t b_addr = q_smem + (t % WG_Q_TILES) * WG_Q_BYTES;
    const uint64_t a_desc = smem_desc(a_addr), b_desc = smem_desc(b_addr);
    constexpr uint64_t A_NEXT = (64 * 128) >> 4;  // the second 64 rows of x, in descriptor units
#pragma unroll
    for (int k = 0; k < WG_BK / 16; ++k) {  // 16 k = 32 bytes along the swizzled rows
      if (!(SKIP & 2)) {
        wgmma_m64n128k16<T>(d[0], a_desc + 2 * k, b_desc + 2 * k);
        wgmma_m64n128k16<T>(d[1], a_desc + A_NEXT + 2 * k, b_desc + 2 * k);
      }
    }
    wgmma_commit();

    if (t + 1 < KT) {
      dequant(t + 1);
      fence_async_smem();
      if (t + 2 < KT) load_sb(t + 2);
    }
    wgmma_wait<1>();
  }
  wgmma_wait<0>();

  // Accumulator layout (m64nNk16): warp w of the warpgroup holds rows
  // 16 w + lane / 4 (+ 8); n8 block j its columns 8 j + 2 (lane % 4) + {0, 1}
  // in d[4 j .. 4 j + 3] as (row, col), (row, col + 1), (row + 8, col), (row + 8, col + 1).
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int j = 0; j < WG_BN / 8; ++j) {
    const int n = n0 + 8 * j + 2 * (lane % 4);
    if (n >= N) continue;
    const float add0 = bias ? to_float(bias[n]) : 0.0f;
    const float add1 = bias && n + 1 < N ? to_float(bias[n + 1]) : 0.0f;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + wg * 128 + 64 * i + warp_in_wg * 16 + lane / 4 + 8 * h;
        if (m >= M) continue;
        T* dst = out + m * N + n;
        const T v0 = from_float<T>(d[i][4 * j + 2 * h] + add0), v1 = from_float<T>(d[i][4 * j + 2 * h + 1] + add1);
        if (n + 1 < N && N % 2 == 0) {
          *reinterpret_cast<uint32_t*>(dst) = pack2<T>(v0, v1);
        } else {
          dst[0] = v0;
          if (n + 1 < N) dst[1] = v1;
        }
      }
  }
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::QmmParams;

// Names: qmm_t_wgmma_<x type>_b<bits>. Block WG_THREADS (256) threads, grid
// (ceil(N / WG_BN), ceil(M / WG_BM)), dynamic shared memory wg_smem_bytes(bits).
#define QMM_WGMMA(T, NAME, BITS)                                                         \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::WG_THREADS, 1)             \
      qmm_t_wgmma_##NAME##_b##BITS(const QmmParams p) {                                  \
    mlx_ext::cuda::qmm_t_wgmma<T, BITS>(p);                                              \
  }
#define QMM_WGMMA_TYPES(BITS) QMM_WGMMA(bf16, bf16, BITS) QMM_WGMMA(f16, f16, BITS)
QMM_WGMMA_TYPES(2)
QMM_WGMMA_TYPES(3)
QMM_WGMMA_TYPES(4)
QMM_WGMMA_TYPES(5)
QMM_WGMMA_TYPES(6)
QMM_WGMMA_TYPES(8)
