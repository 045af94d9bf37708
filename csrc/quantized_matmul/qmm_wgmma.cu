// Hopper (sm_90a) GEMM of the quantized matmul, transpose=True, float16 /
// bfloat16: out = x W^T + bias, with wgmma, the warpgroup-wide asynchronous
// tensor-core instruction (mma.sync reaches a fraction of its rate on an
// H100). Each weight is s * q + b rounded once to T, as MLX's kernels do;
// float32 accumulation. Warp-specialized, so that loads, dequantization and
// tensor-core work overlap: the earlier design, where the same 8 warps loaded,
// dequantized into shared memory and issued wgmma, ran 1.4x slower (1142 vs
// 804 us at M = N = 4096, K = 14336, 4 bits, on an H200).
//
// Block: a 256 x 128 tile of out (256 rows of x by 128 rows of W) over all of
//   K, in k tiles of 64; three warpgroups of 128 threads:
//   - warpgroup 2, the producer: cp.async of x(t) and packed W(t) into stage
//     t % S (S = wg_stages(bits)); each thread's copies signal the stage's
//     "full" mbarrier when they land. setmaxnreg gives it 40 registers.
//   - warpgroups 0 and 1, the consumers (232 registers): warpgroup c owns W
//     rows 64 c .. 64 c + 63. The product is computed transposed, out^T = W x^T:
//     W is wgmma's A operand, dequantized straight into registers (no shared
//     memory round trip for it), x is the B operand (m64n256k16, 256 rows of x
//     from shared memory). Each thread holds 128 float32 accumulators.
//     Per k tile: issue 4 wgmma on the registers of tile t, wait until tile
//     t - 1's wgmma is done, free its stage ("empty" mbarrier), then dequantize
//     tile t + 1 into the other register set while tile t runs. The consumers
//     load their scales and biases themselves (cached loads, a tile ahead):
//     as per-row 2-byte copies they would cost the producer one scattered
//     request each, and the producer's issue rate bounds the loads.
// Why W in registers (an estimate, not measured): with both operands in shared
//   memory, wgmma's reads of A and B plus the writes of x and of the dequantized
//   W come to about 150 KB a k tile, more than shared memory serves in the
//   ~1000 cycles the tile's wgmma takes; here wgmma reads only x (64 KB a tile)
//   and W's packed bytes are read once per quad of lanes.
// A-fragment layout (as mma.m16n8k16's A): in each k16 step, lane l of warp w
//   holds rows 16 w + l / 4 (+ 8) at k = 2 (l % 4) + {0, 1} (+ 8). So over a
//   64-k tile a thread needs, per row, the value pairs 8 j + 2 (l % 4) + {0, 1},
//   j = 0..7: in the packed stream, the 2 * BITS bits at (8 j + 2 (l % 4)) BITS.
// Shared memory, from a 1024-byte-aligned base, S stages (wg_stages(bits)):
//   x     S x 256 rows x 128 B, 128-byte swizzle: row r's 16-byte chunk c at
//         r * 128 + ((c ^ r % 8) * 16), what wgmma reads as "K-major, 128B swizzle";
//   raw   S x 128 rows x wg_raw_stride(bits) B, W's packed words as stored; 8-bit
//         rows padded to 80 B so that the 8 rows a warp reads at once fall in
//         different banks (4-bit rows keep 32 B: a 2-way conflict costs less
//         than the sixth stage the padding would take);
//   bars  full[S] (128 producer threads, arriving when their cp.async land), empty[S]
//         (8 consumer warps).
//   After the k loop the x stages hold the output tile (row stride 272 B) so that
//   it leaves in 16-byte stores.
// Needs K % 64 == 0 and x, w 16-byte aligned (cuda_plan.h checks).
#include "common/cuda/affine.cuh"
#include "quantized_matmul/cuda_params.h"

namespace mlx_ext::cuda {

namespace {

// Named barrier 1 over the two consumer warpgroups (the producer never waits on it).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;" ::: "memory"); }

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups
// 1024 bytes apart.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  return uint64_t((addr & 0x3ffff) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

#define WS_ACC4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define WS_ACC16(i) WS_ACC4(i), WS_ACC4(i + 4), WS_ACC4(i + 8), WS_ACC4(i + 12)
#define WS_ACC128 \
  WS_ACC16(0), WS_ACC16(16), WS_ACC16(32), WS_ACC16(48), WS_ACC16(64), WS_ACC16(80), WS_ACC16(96), WS_ACC16(112)
#define WS_REGS128                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "  \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "   \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "   \
  "%62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, "   \
  "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, " \
  "%102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, " \
  "%119, %120, %121, %122, %123, %124, %125, %126, %127}"

// d += A B for one m64n256k16 step: A (64 x 16) in registers (4 pairs a
// thread), B (256 x 16, K-major) in shared memory behind its descriptor.
template <typename T>
__device__ __forceinline__ void mma_rs_m64n256k16(float (&d)[128], const uint32_t* a, uint64_t b) {
  if constexpr (std::is_same_v<T, bf16>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WS_REGS128
                 ", {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
                 : WS_ACC128
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " WS_REGS128
                 ", {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
                 : WS_ACC128
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  }
}

// The pair of BITS-bit values 8 j + 2 (lane % 4) + {0, 1} of a row's 64
// packed values (BITS words) in the low bits of the two 16-bit halves, as
// dequant_pair takes them. rs = 2 (lane % 4) BITS; j is a compile-time
// constant after unrolling, so only the last shift depends on the lane.
template <int BITS>
__device__ __forceinline__ uint32_t lane_pair(const uint32_t (&w)[2 * BITS], int j, int rs) {
  if constexpr (BITS == 8) { // bytes 2 (lane % 4), + 1 of words 2 j, 2 j + 1
    const uint32_t v = rs >= 32 ? w[2 * j + 1] : w[2 * j];
    return __byte_perm(v, 0, (rs & 16) ? 0x4342 : 0x4140);
  } else {
    const int lo = 8 * j * BITS, wi = lo / 32, sh = lo % 32;
    uint32_t v;
    if (sh + 8 * BITS <= 32) v = w[wi] >> (sh + rs);
    else v = uint32_t(((uint64_t(w[wi + 1]) << 32) | w[wi]) >> (sh + rs));
    constexpr uint32_t m = (1u << BITS) - 1;
    return (v & m) | (((v >> BITS) & m) << 16);
  }
}

// A row's 64 values of a tile (2 BITS words) from shared memory (generic
// pointer, 16-byte aligned for even BITS, 8-byte aligned otherwise).
template <int BITS>
__device__ __forceinline__ void load_row(const uint8_t* src, uint32_t (&w)[2 * BITS]) {
  if constexpr (BITS % 2 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 2; ++i) {
      const uint4 v = *reinterpret_cast<const uint4*>(src + 16 * i);
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
      const uint2 v = *reinterpret_cast<const uint2*>(src + 8 * i);
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    }
  }
}

// VARIANT (bench/cuda/quantized_matmul.cu only, to see where the time goes; 0 in
// the library): 2 skips the dequantization, 4 the wgmma. (A producer that
// waited for its own cp.async and fenced before signalling, instead of
// cp.async.mbarrier.arrive, measured slower: 1052 vs 906 us.)
template <typename T, int BITS, int VARIANT = 0>
__device__ __forceinline__ void qmm_t_wgmma(const QmmParams& p) {
  extern __shared__ uint8_t smem_raw[];
  constexpr int S = wg_stages(BITS), RAW_ROW = 8 * BITS, RAW_STRIDE = wg_raw_stride(BITS);
  constexpr int CP = RAW_ROW % 16 == 0 ? 16 : 8; // cp.async size for W
  constexpr int PER_ROW = RAW_ROW / CP;
  const int tid = threadIdx.x, wg = tid / 128;
  const int64_t M = p.M, m0 = int64_t(blockIdx.y) * WG_BM;
  const int N = p.N, K = p.K, n0 = blockIdx.x * WG_BN, KT = K / WG_BK;

  const uint32_t raw_base = smem_u32(smem_raw);
  const uint32_t base = (raw_base + 1023) & ~1023u;
  uint8_t* const gbase = smem_raw + (base - raw_base);
  const uint32_t x_smem = base;
  const uint32_t r_smem = x_smem + S * WG_X_BYTES;
  const uint32_t bars = r_smem + S * WG_BN * RAW_STRIDE; // full[S], then empty[S]
  const uint8_t* const r_gen = gbase + S * WG_X_BYTES;

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(bars + 8 * s, 128);
      mbar_init(bars + 8 * (S + s), 8);
    }
  }
  __syncthreads();

  if (wg == 2) { // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    const int pt = tid - 256;
    // x: rows pt / 8 + 16 i (i < 16), chunk pt % 8; the swizzle term is the
    // same for every i (16 i % 8 == 0).
    const int xr = pt / 8, xc = pt % 8;
    const T* x = static_cast<const T*>(p.x);
    const T* xsrc = x + (m0 + xr) * K + xc * 8;
    const int64_t x_step = int64_t(16) * K;
    const int64_t rows_left = M - m0 - xr; // rows i < x_valid exist
    const int x_valid = rows_left <= 0 ? 0 : rows_left >= 256 ? 16 : int((rows_left + 15) / 16);
    const uint32_t x_dst = x_smem + xr * 128 + ((xc ^ (xr % 8)) * 16);
    // W: copy pt + 128 i is chunk % PER_ROW of row / PER_ROW.
    const uint8_t* w = reinterpret_cast<const uint8_t*>(p.w);
    const int64_t row_bytes = int64_t(K) * BITS / 8;
    for (int t = 0; t < KT; ++t) {
      const int s = t % S;
      if (t >= S) mbar_wait(bars + 8 * (S + s), ((t / S) + 1) & 1);
      const T* src = xsrc + t * WG_BK;
      uint32_t dst = x_dst + s * WG_X_BYTES;
      if (x_valid == WG_BM / 16) { // whole tile: no masking
#pragma unroll 4
        for (int i = 0; i < WG_BM / 16; ++i, src += x_step, dst += 16 * 128)
          asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" ::"r"(dst), "l"(src));
      } else {
#pragma unroll 4
        for (int i = 0; i < WG_BM / 16; ++i, src += x_step, dst += 16 * 128) {
          const bool valid = i < x_valid;
          cp_async<16>(dst, valid ? src : x, valid);
        }
      }
#pragma unroll(PER_ROW <= 2 ? PER_ROW : 1) // row pointers in registers or recomputed
      for (int i = 0; i < PER_ROW; ++i) {
        const int idx = pt + 128 * i, r = idx / PER_ROW, c = idx % PER_ROW;
        const bool valid = n0 + r < N;
        const uint8_t* wsrc = valid ? w + (n0 + r) * row_bytes + int64_t(t) * RAW_ROW + c * CP : w;
        cp_async<CP>(r_smem + s * WG_BN * RAW_STRIDE + r * RAW_STRIDE + c * CP, wsrc, valid);
      }
      mbar_arrive_cp_async(bars + 8 * s);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int lane = tid % 32, warp = (tid % 128) / 32, t4 = lane % 4;
  const int row = 64 * wg + 16 * warp + lane / 4; // tile row of W for a[0], a[2]; row + 8 for a[1], a[3]
  const int rs = 2 * t4 * BITS;
  // Scales and biases of rows row, row + 8 (clamped: rows past N are never
  // stored), groups of k 0..31 and 32..63 of a tile, loaded a tile ahead.
  const int gs_shift = __ffs(p.group_size) - 1, G = K >> gs_shift;
  const bool two_groups = p.group_size == 32; // else both halves of a tile share a group
  const int64_t e0 = int64_t(min(n0 + row, N - 1)) * G, e1 = int64_t(min(n0 + row + 8, N - 1)) * G;
  const uint16_t* scales = static_cast<const uint16_t*>(p.scales);
  const uint16_t* biases = static_cast<const uint16_t*>(p.biases);
  uint32_t sb[8]; // scale (row, h) at 2 row + h, bias at 4 + 2 row + h
  auto load_sb = [&](int t) {
    const int g0 = (t * WG_BK) >> gs_shift;
    sb[0] = __ldg(scales + e0 + g0), sb[2] = __ldg(scales + e1 + g0);
    sb[4] = __ldg(biases + e0 + g0), sb[6] = __ldg(biases + e1 + g0);
    if (two_groups) {
      sb[1] = __ldg(scales + e0 + g0 + 1), sb[3] = __ldg(scales + e1 + g0 + 1);
      sb[5] = __ldg(biases + e0 + g0 + 1), sb[7] = __ldg(biases + e1 + g0 + 1);
    } else {
      sb[1] = sb[0], sb[3] = sb[2], sb[5] = sb[4], sb[7] = sb[6];
    }
  };
  load_sb(0);

  const uint32_t magic = opaque(dequant_magic<T>(), p.M);

  // Waits for tile t and dequantizes this thread's 32 values into a.
  auto dequant = [&](int t, uint32_t(&a)[16]) {
    const int s = t % S;
    mbar_wait(bars + 8 * s, (t / S) & 1);
    fence_proxy_async(); // x(t), written by cp.async, is read by wgmma next
    const uint8_t* raw = r_gen + s * WG_BN * RAW_STRIDE + row * RAW_STRIDE;
    uint32_t w0[2 * BITS], w1[2 * BITS];
    load_row<BITS>(raw, w0);
    load_row<BITS>(raw + 8 * RAW_STRIDE, w1);
    // (scale, scale) and (bias, bias) of rows row, row + 8, k 0..31 (h = 0) and 32..63 (h = 1)
    const uint32_t s2[2][2] = {{sb[0] * 0x10001u, sb[1] * 0x10001u}, {sb[2] * 0x10001u, sb[3] * 0x10001u}};
    const uint32_t b2[2][2] = {{sb[4] * 0x10001u, sb[5] * 0x10001u}, {sb[6] * 0x10001u, sb[7] * 0x10001u}};
    if (t + 1 < KT) load_sb(t + 1);
    if constexpr ((VARIANT & 2) != 0) {
#pragma unroll
      for (int i = 0; i < 16; ++i) a[i] = w0[i % (2 * BITS)] ^ s2[i % 2][0] ^ b2[1][i % 2];
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) { // k16 step j / 2, k offset 8 (j % 2)
        a[4 * (j / 2) + 2 * (j % 2)] = dequant_pair<T, BITS>(lane_pair<BITS>(w0, j, rs), s2[0][j / 4], b2[0][j / 4], magic);
        a[4 * (j / 2) + 2 * (j % 2) + 1] =
            dequant_pair<T, BITS>(lane_pair<BITS>(w1, j, rs), s2[1][j / 4], b2[1][j / 4], magic);
      }
    }
  };
  auto mma = [&](int t, const uint32_t(&a)[16], float(&d)[128]) {
    wgmma_fence();
    const uint64_t b_desc = desc_sw128(x_smem + (t % S) * WG_X_BYTES);
#pragma unroll
    for (int k = 0; k < WG_BK / 16; ++k) // 32 B along k
      if (!(VARIANT & 4)) mma_rs_m64n256k16<T>(d, a + 4 * k, b_desc + 2 * k);
    wgmma_commit();
  };
  auto release = [&](int t) { // tile t's wgmma is done: its stage may be refilled
    __syncwarp();
    if (lane == 0) mbar_arrive(bars + 8 * (S + t % S));
  };

  float d[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.0f;
  uint32_t a0[16], a1[16];
  dequant(0, a0);
  for (int t = 0; t < KT; t += 2) {
    mma(t, a0, d);
    wgmma_wait<1>();
    if (t > 0) release(t - 1);
    if (t + 1 < KT) {
      dequant(t + 1, a1);
      mma(t + 1, a1, d);
      wgmma_wait<1>();
      release(t);
      if (t + 2 < KT) dequant(t + 2, a0);
    }
  }
  wgmma_wait<0>();

  // Epilogue. Accumulator layout (m64n256k16): rows (W, n) row and row + 8,
  // columns (x, m) 8 j + 2 t4 + {0, 1}: d[4 j .. 4 j + 3] = (row, m), (row, m + 1),
  // (row + 8, m), (row + 8, m + 1). The tile goes through shared memory as
  // out[m][n] (row stride 136 values: the 4 t4 of a store hit different banks).
  constexpr int OS = WG_BN + 8;
  consumers_sync(); // every wgmma has finished reading the x stages
  T* const tile = reinterpret_cast<T*>(gbase);
  const T* bias = static_cast<const T*>(p.bias);
  const float add0 = bias && n0 + row < N ? to_float(bias[n0 + row]) : 0.0f;
  const float add1 = bias && n0 + row + 8 < N ? to_float(bias[n0 + row + 8]) : 0.0f;
#pragma unroll
  for (int j = 0; j < WG_BM / 8; ++j) {
    const int m = 8 * j + 2 * t4;
    tile[m * OS + row] = from_float<T>(d[4 * j] + add0);
    tile[(m + 1) * OS + row] = from_float<T>(d[4 * j + 1] + add0);
    tile[m * OS + row + 8] = from_float<T>(d[4 * j + 2] + add1);
    tile[(m + 1) * OS + row + 8] = from_float<T>(d[4 * j + 3] + add1);
  }
  consumers_sync();
  T* out = static_cast<T*>(p.out);
  const bool vec = N % 8 == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0;
#pragma unroll 4
  for (int i = 0; i < WG_BM * WG_BN / 8 / 256; ++i) {
    const int idx = tid + 256 * i, r = idx / (WG_BN / 8), n = n0 + 8 * (idx % (WG_BN / 8));
    const int64_t m = m0 + r;
    if (m >= M || n >= N) continue;
    const T* src = tile + r * OS + (n - n0);
    T* dst = out + m * N + n;
    if (vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && n + e < N; ++e) dst[e] = src[e];
    }
  }
}

} // namespace
} // namespace mlx_ext::cuda

// Names: qmm_t_wgmma_<x type, as MLX spells it>_b<bits>. Block WG_THREADS (384) threads, grid
// (ceil(N / WG_BN), ceil(M / WG_BM)), dynamic shared memory wg_smem_bytes(bits).
#define QMM_WGMMA(T, NAME, BITS)                                                      \
  extern "C" __global__ void __launch_bounds__(mlx_ext::cuda::WG_THREADS, 1)             \
      qmm_t_wgmma_##NAME##_b##BITS(const mlx_ext::cuda::QmmParams p) {                \
    mlx_ext::cuda::qmm_t_wgmma<T, BITS>(p);                                       \
  }
#define QMM_WGMMA_TYPES(BITS) \
  QMM_WGMMA(mlx_ext::cuda::bf16, bfloat16, BITS) QMM_WGMMA(mlx_ext::cuda::f16, float16, BITS)
QMM_WGMMA_TYPES(2)
QMM_WGMMA_TYPES(3)
QMM_WGMMA_TYPES(4)
QMM_WGMMA_TYPES(5)
QMM_WGMMA_TYPES(6)
QMM_WGMMA_TYPES(8)
